"""Optimal token baseline: the energy is the squared gradient norm and the baseline the variance-minimising one
(both by autograd on tabular policies), hand-computed groups (tails, holes, the multi-turn alignment, dense
rewards), degenerate groups, conformance and training, single- and multi-turn."""

import pytest
import torch
from po_registry_optimal_token_baseline import OptimalTokenBaseline, TIROptimalTokenBaseline, token_energy

from po_registry.testing import PluginConformance, default_args, trains_on_task

NAN = float("nan")


class TestConformance(PluginConformance):
    method = "optimal-token-baseline"
    metrics = ("token_baseline/energy_mean",)


class TestConformanceTIR(PluginConformance):
    method = "tir-optimal-token-baseline"


def _batch(po_reward_batch, rewards, mask, probs, collision, method="optimal-token-baseline", options=None, **fields):
    """A one-group batch with the given (N, T) loss mask, sampled-token probabilities and collision probabilities."""
    rewards = torch.tensor(rewards).unsqueeze(1)
    mask, probs, collision = (torch.tensor(x) for x in (mask, probs, collision))
    args = default_args([method], options)
    _, batch = po_reward_batch(group_size=len(rewards), num_groups=1, width=mask.shape[1], rewards=rewards,
                               args=args, options=args.resolve().options, completion_mask=mask,
                               policy_logps=lambda: probs.log(), policy_collision_probs=lambda: collision, **fields)
    return rewards, batch


def _advantages(component, rewards, batch):
    return component.po_compute_advantages(rewards, batch)


def test_token_energy_is_the_squared_gradient_norm_of_the_sampled_token():
    """||grad_z log softmax(z)_y||^2 = 1 - 2 pi_y + sum_v pi_v^2, for every token y of a 5-way softmax."""
    logits = torch.tensor([0.3, -1.2, 2.0, 0.0, 0.7], requires_grad=True)
    probs = torch.softmax(logits, 0)
    for y in range(5):
        grad, = torch.autograd.grad(torch.log_softmax(logits, 0)[y], logits)
        energy = token_energy(probs[y].log(), probs.square().sum())
        assert energy.item() == pytest.approx(grad.square().sum().item(), abs=1e-6)


def test_baseline_minimises_the_second_moment_of_the_per_sample_gradient(po_reward_batch):
    """A tabular two-step policy (step 2's logits depend on the first token: separate parameters per step). For
    each step t and the group's samples y_i, B_t minimises f(b) = sum_i ||(G_i - b) grad log p(y_i,<=t)||^2: f'(B_t)
    is 0 by autograd, and the plugin's path energy is that squared gradient norm."""
    first = torch.tensor([0.2, -0.5, 1.0], requires_grad=True)
    second = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.5, -0.3], [-1.0, 0.2, 0.9]], requires_grad=True)
    samples = [(0, 1), (2, 2), (1, 0), (2, 1), (0, 0)]
    returns = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0])
    log1, log2 = torch.log_softmax(first, 0), torch.log_softmax(second, 1)
    probs, collision, norms = [], [], []
    for y1, y2 in samples:
        g1 = torch.autograd.grad(log1[y1], (first, second), retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(log1[y1] + log2[y1, y2], (first, second), retain_graph=True)
        norm = [sum(g.square().sum() for g in grads if g is not None) for grads in (g1, g2)]
        norms.append(norm)
        probs.append([log1[y1].exp().item(), log2[y1, y2].exp().item()])
        collision.append([log1.exp().square().sum().item(), log2[y1].exp().square().sum().item()])
    norms = torch.tensor(norms)
    rewards, batch = _batch(po_reward_batch, returns.tolist(), [[1.0, 1.0]] * 5, probs, collision)
    advantages = _advantages(OptimalTokenBaseline(), rewards, batch)
    baseline = returns.unsqueeze(1) - advantages
    for t in range(2):
        b = baseline[0, t].clone().requires_grad_()
        second_moment = ((returns - b).square() * norms[:, t]).sum()
        slope, = torch.autograd.grad(second_moment, b)
        assert abs(slope.item()) < 1e-5
        assert torch.allclose(baseline[:, t], baseline[0, t].expand(5))  # one baseline for the group per step
    group_mean = returns.mean().item()
    assert abs(baseline[0, 1].item() - group_mean) > 1e-3  # not the plain group mean


def test_two_completions_by_hand(po_reward_batch):
    """Row 0 (R = 1): pi = .5, .5, .25 and sum pi^2 = .5, .5, .5 give w = .5, .5, 1, W = .5, 1, 2. Row 1 (R = 0, two
    tokens): pi = .25, .5, sum pi^2 = .25, .5 give w = .75, .5, W = .75, 1.25. B_1 = .5 / 1.25 = .4, B_2 = 1 / 2.25,
    B_3 = 2 / 2 = 1 (row 0 alone): A_0 = .6, 1 - 1/2.25, 0 and A_1 = -.4, -1/2.25. With the zero tail, row 0 (the
    unique longest) has no baseline past position 2: A_0,3 = 1."""
    mask = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    probs = [[0.5, 0.5, 0.25], [0.25, 0.5, 1.0]]
    collision = [[0.5, 0.5, 0.5], [0.25, 0.5, 1.0]]
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], mask, probs, collision)
    expected = torch.tensor([[0.6, 1 - 1 / 2.25, 0.0], [-0.4, -1 / 2.25, 0.0]])
    assert torch.allclose(_advantages(OptimalTokenBaseline(), rewards, batch), expected, atol=1e-6)
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], mask, probs, collision,
                            options={"optimal_token_baseline_zero_tail": True})
    expected[0, 2] = 1.0
    assert torch.allclose(_advantages(OptimalTokenBaseline(), rewards, batch), expected, atol=1e-6)


def test_a_tie_for_the_longest_keeps_the_tail_baseline(po_reward_batch):
    mask = [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0, 0.0], mask, [[0.5] * 2] * 3, [[0.5] * 2] * 3,
                            options={"optimal_token_baseline_zero_tail": True})
    advantages = _advantages(OptimalTokenBaseline(), rewards, batch)
    # equal energies: B_1 = 1/3, B_2 = 1/2 over the two rows that reach it, zero tail not applied (a tie)
    assert torch.allclose(advantages, torch.tensor([[2 / 3, 0.5], [-1 / 3, -0.5], [-1 / 3, 0.0]]), atol=1e-6)


def test_multi_turn_alignment_by_own_tokens(po_reward_batch):
    """Row 0's second own token sits after an environment token (position 2); row 1's at position 1. By absolute
    position (optimal-token-baseline) they meet nobody: position 1 has row 1 alone, position 2 row 0 alone, and each
    is its own baseline (A = 0). By own tokens (tir-) they are both 'second token' and share B_2. Equal energies w = .5:
    W = .5, 1 on both rows, so B_1 = B_2 = 1/2 and A = +-1/2."""
    mask = [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    probs, collision = [[0.5] * 3] * 2, [[0.5] * 3] * 2
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], mask, probs, collision)
    assert torch.allclose(_advantages(OptimalTokenBaseline(), rewards, batch),
                          torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]), atol=1e-6)
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], mask, probs, collision, method="tir-optimal-token-baseline")
    assert torch.allclose(_advantages(TIROptimalTokenBaseline(), rewards, batch),
                          torch.tensor([[0.5, 0.0, 0.5], [-0.5, -0.5, 0.0]]), atol=1e-6)


def test_dense_rewards_enter_the_return_to_go(po_reward_batch):
    """Token rewards .2 at t=1 and .3 at t=2 on row 0 (outcome 1), none on row 1 (outcome 0): G_0 = 1.5, 1.3, G_1 =
    0, 0; equal energies give B_t = (G_0 W + 0) / 2W = G_0 / 2 and A = +-G_0 / 2."""
    dense = torch.tensor([[0.2, 0.3], [0.0, 0.0]])
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], [[1.0, 1.0]] * 2, [[0.5] * 2] * 2, [[0.5] * 2] * 2,
                            token_rewards=dense)
    assert torch.allclose(_advantages(OptimalTokenBaseline(), rewards, batch),
                          torch.tensor([[0.75, 0.65], [-0.75, -0.65]]), atol=1e-6)


@pytest.mark.parametrize("component", [OptimalTokenBaseline(), TIROptimalTokenBaseline()])
def test_degenerate_groups(po_reward_batch, component):
    """All-equal rewards: no advantage anywhere (without the zero tail; with it, the unique longest row's tail keeps
    its return). An unscorable row takes no part: the others equal the group without it. A group with one scorable
    row: no baseline (A = G), as verl for a group of one."""
    method = component.name
    mask = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    probs, collision = [[0.3, 0.6, 0.9]] * 3, [[0.4, 0.5, 0.85]] * 3
    for zero_tail in (False, True):
        rewards, batch = _batch(po_reward_batch, [0.5, 0.5, 0.5], mask, probs, collision, method=method,
                                options={component.option: zero_tail})
        tail = torch.zeros(3, 3)
        tail[1, 2] = 0.5 * zero_tail
        assert torch.equal(_advantages(component, rewards, batch), tail)
    rewards, batch = _batch(po_reward_batch, [1.0, NAN, 0.0], mask, probs, collision, method=method)
    with_nan = _advantages(component, rewards, batch)
    rewards, batch = _batch(po_reward_batch, [1.0, 0.0], [mask[0], mask[2]], probs[:2], collision[:2], method=method)
    without = _advantages(component, rewards, batch)
    assert with_nan[1].abs().max() == 0
    assert torch.allclose(with_nan[[0, 2]], without, atol=1e-6)
    rewards, batch = _batch(po_reward_batch, [NAN, 0.7, NAN], mask, probs, collision, method=method)
    assert torch.allclose(_advantages(component, rewards, batch), torch.tensor([[0.0] * 3, [0.7] * 3, [0.0] * 3]))


def test_a_batch_without_collision_probabilities_is_refused(po_reward_batch):
    rewards, batch = po_reward_batch(args=default_args(["optimal-token-baseline"]), policy_collision_probs=None)
    with pytest.raises(RuntimeError, match="optimal-token-baseline needs .*collision"):
        OptimalTokenBaseline().po_compute_advantages(rewards, batch)


def test_collision_probabilities_of_the_trainer_match_the_sampling_distribution(po_trainer):
    """The trainer's RewardBatch.policy_collision_probs: sum_v softmax(logits / temperature)^2 at each completion
    position, from a forward pass of its own (checked against the model's logits here), in chunks of the micro-batch."""
    from po_registry.trainer import collision_probabilities

    trainer = po_trainer(["optimal-token-baseline"], temperature=0.7, max_steps=1)
    torch.manual_seed(0)
    rows = {"prompt_ids": torch.randint(4, 20, (5, 3)), "prompt_mask": torch.ones(5, 3, dtype=torch.long),
            "completion_ids": torch.randint(4, 20, (5, 4)), "completion_mask": torch.ones(5, 4, dtype=torch.long)}
    got = collision_probabilities(trainer, rows)
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)).logits
    expected = torch.softmax(logits[:, 2:-1] / 0.7, -1).square().sum(-1)
    assert got.shape == (5, 4) and torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["optimal-token-baseline", "tir-optimal-token-baseline"])
def test_trains_on_the_multi_turn_environment(po_trainer, method):
    trainer = trains_on_task(po_trainer, [method], "guess")
    assert all("token_baseline/energy_mean" in row for row in trainer.state.log_history if "loss" in row)
