"""Pass@k: the leave-one-out max on hand numbers, the exact gradient of E[max of G samples] on an enumerable
policy, verl's grpo_passk convention (std scaling), degenerate groups, conformance and training."""

import itertools

import pytest
import torch
from po_registry_pass_at_k import PassAtK, best_of_group_advantages

from po_registry.errors import OptionError
from po_registry.testing import PluginConformance, default_args

NAN = float("nan")


class TestConformance(PluginConformance):
    method = "pass-at-k"
    metrics = ("pass_at_k/credited_fraction",)


class TestConformanceUnscaled(PluginConformance):
    method = "pass-at-k"
    config = {"scale_rewards": "none"}
    train_steps = 0


def test_the_best_gets_its_margin_over_the_runner_up_by_hand():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.1,  # best 0.9, runner-up 0.5
                            1.0, 1.0, 0.0, 0.0,  # a tie at the top: nobody is credited
                            0.0, 0.0, 0.0, 0.0,  # all equal
                            NAN, 0.3, NAN, 0.7,  # unscorable rows take no part
                            NAN, 0.8, NAN, NAN])  # one scorable completion: no runner-up, no credit
    assert best_of_group_advantages(rewards, 4).tolist() == pytest.approx(
        [0, 0.4, 0, 0] + [0] * 4 + [0] * 4 + [0, 0, 0, 0.4] + [0] * 4)


def test_verl_scaling_by_the_group_std(po_reward_batch):
    """scale_rewards='group': verl's grpo_passk divides by torch.std (Bessel) + 1e-6: rewards 0.2, 0.9, 0.5, 0.1 have
    mean 0.425 and std sqrt(((-.225)^2 + .475^2 + .075^2 + (-.325)^2) / 3) = 0.3594..."""
    rewards = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    _, batch = po_reward_batch(group_size=4, num_groups=1, rewards=rewards, args=default_args(["pass-at-k"]))
    std = ((0.225**2 + 0.475**2 + 0.075**2 + 0.325**2) / 3) ** 0.5
    advantages = PassAtK().po_compute_advantages(rewards, batch)
    assert advantages.tolist() == pytest.approx([0.0, 0.4 / (std + 1e-6), 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("group_size", [2, 3])
def test_expected_update_is_the_exact_gradient_of_the_best_of_g(group_size):
    """A policy over 4 answers with rewards 1, 0, 0.5, 0.5 (a tie below the top). Over all G-tuples of answers,
    sum_i A_i grad log pi(y_i) weighted by the tuple's probability equals grad E[max_i R(y_i)], computed exactly."""
    logits = torch.tensor([-0.3, 0.8, 0.1, 0.4], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5])
    logp = torch.log_softmax(logits, dim=0)
    objective, surrogate = 0.0, 0.0
    for answers in itertools.product(range(4), repeat=group_size):
        index = torch.tensor(answers)
        probability = logp[index].sum().exp()
        objective = objective + probability * reward[index].max()
        advantages = best_of_group_advantages(reward[index], group_size)
        surrogate = surrogate + probability.detach() * (advantages * logp[index]).sum()
    exact, = torch.autograd.grad(objective, logits, retain_graph=True)
    estimated, = torch.autograd.grad(surrogate, logits)
    assert torch.allclose(estimated, exact, atol=1e-6)
    assert exact.abs().max() > 1e-3  # not a trivial zero


def test_batch_scaling_is_refused():
    with pytest.raises(OptionError, match="pass-at-k.*scale_rewards='batch'"):
        default_args(["pass-at-k"], scale_rewards="batch")
