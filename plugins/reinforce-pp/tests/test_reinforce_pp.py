"""REINFORCE++ and REINFORCE++-baseline: returns, KL in the reward, global normalisation, conformance, training."""

import dataclasses

import pytest
import torch
from po_registry_reinforce_pp import ReinforcePP, ReinforcePPBaseline

from po_registry.testing import PluginConformance, default_args


class TestConformance(PluginConformance):
    method = "reinforce-pp"


class TestConformanceWithKL(PluginConformance):
    method = "reinforce-pp"
    config = {"beta": 0.04}
    metrics = ("reinforce-pp/kl",)


class TestBaselineConformance(PluginConformance):
    method = "reinforce-pp-baseline"
    config = {"beta": 0.04}


def _expected(total, mask):
    """Outcome reward on every loss token (no KL), normalised over all loss tokens."""
    advantages = total.unsqueeze(1) * mask
    mean = advantages.sum() / mask.sum()
    std = (((advantages - mean) ** 2) * mask).sum().div(mask.sum()).sqrt()
    return (advantages - mean) / (std + 1e-8) * mask


def test_global_normalisation_without_kl(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    _, batch = po_reward_batch(group_size=2, num_groups=2, rewards=rewards, width=3,
                               options={"reinforce_pp_gamma": 1.0}, args=default_args())
    # row 0 has an environment hole at t = 1: its outcome sits on t = 2 and its return reaches t = 0 across the hole
    holes = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    batch = dataclasses.replace(batch, completion_mask=holes)
    got = ReinforcePP().po_compute_advantages(rewards, batch)
    assert torch.allclose(got, _expected(rewards.squeeze(1), batch.completion_mask), atol=1e-6)
    # by hand: 8 loss tokens with returns (1, 1 | 0, 0, 0 | 1 | 1, 1): mean 5/8, population std
    # sqrt(5/8 * 3/8) = 0.484123; a token of R = 1 gets (3/8) / 0.484123 = 0.774597, one of R = 0 -1.290994
    assert got[0].tolist() == pytest.approx([0.774597, 0.0, 0.774597], abs=1e-5)
    assert got[1].tolist() == pytest.approx([-1.290994] * 3, abs=1e-5)


def test_baseline_subtracts_the_group_mean_first(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [1.0], [1.0]])
    _, batch = po_reward_batch(group_size=2, num_groups=2, rewards=rewards, width=3,
                               options={"reinforce_pp_baseline_gamma": 1.0}, args=default_args())
    batch = dataclasses.replace(batch, completion_mask=torch.ones(4, 3))
    got = ReinforcePPBaseline().po_compute_advantages(rewards, batch)
    assert torch.allclose(got, _expected(torch.tensor([0.5, -0.5, 0.0, 0.0]), batch.completion_mask), atol=1e-6)


def test_kl_is_folded_into_the_reward_per_token(po_reward_batch):
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=3, args=default_args(beta=0.5))
    mask = batch.local["completion_mask"].float()
    expected = -0.5 * (batch.policy_logps() - batch.local["ref_per_token_logps"]) * mask
    assert torch.allclose(ReinforcePP().po_token_rewards(batch), expected)


def test_kl_rewards_enter_the_returns(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0]])
    _, batch = po_reward_batch(group_size=2, num_groups=1, rewards=rewards, width=3,
                               options={"reinforce_pp_gamma": 1.0}, args=default_args())
    # row 0: action tokens at t = 0 and t = 2 around an environment hole, whose reward -5 (on no action) is not read
    batch = dataclasses.replace(batch,
                                completion_mask=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
                                token_rewards=torch.tensor([[-0.1, -5.0, -0.2], [-0.3, 0.0, 0.0]]))
    got = ReinforcePP().po_compute_advantages(rewards, batch)
    # return-to-go over the action tokens of [-0.1, -0.2 + 1] and [-0.3, 0]: [0.7, 0.8] and [-0.3, 0]
    tokens = torch.tensor([0.7, 0.8, -0.3, 0.0])
    mean, std = tokens.mean(), tokens.std(unbiased=False)  # over the 4 loss tokens: 0.3 and sqrt(0.215)
    raw = torch.tensor([[0.7, 0.0, 0.8], [-0.3, 0.0, 0.0]])
    assert torch.allclose(got, (raw - mean) / (std + 1e-8) * batch.completion_mask, atol=1e-6)


def test_kl_metric_is_the_mean_over_every_process(po_reward_batch):
    """k1 = log pi_old - log pi_ref = [[0.5, 0, (-1 masked)], [0, 1, 0]]: this process's sum 1.5 over 5 tokens; the
    other process (simulated by the gather) has sum 3.0 over 2 tokens, so the logged mean is 4.5 / 7 (before: this
    process's 1.5 / 5 = 0.3 alone)."""
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=3, args=default_args(beta=0.5))
    batch.local["completion_mask"] = torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch.local["ref_per_token_logps"] = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    batch = dataclasses.replace(batch,
                                policy_logps=lambda: torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
                                gather=lambda local: torch.cat([local, torch.tensor([[3.0, 2.0]])]))
    logged = {}
    batch = dataclasses.replace(batch, log_metric=logged.__setitem__)
    ReinforcePP().po_token_rewards(batch)
    assert logged["reinforce-pp/kl"] == pytest.approx(4.5 / 7)


def test_kl_reward_and_metric_skip_environment_tokens(po_reward_batch):
    """Row 1's middle token is an environment reply (tool mask 0): not the policy's sample, so no KL reward there and
    no place in the logged mean. k1 = [[0.5, 0, -1], [0, (1: environment), 0]]: this process's sum -0.5 over 5 loss
    tokens, the other process's 3.0 over 2: logged 2.5 / 7 (before: 0.5 / 6 here, 3.5 / 8 logged, and a reward of
    -0.5 on the environment token)."""
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=3, args=default_args(beta=0.5))
    batch.local["completion_mask"] = torch.ones(2, 3, dtype=torch.long)
    batch.local["tool_mask"] = torch.tensor([[1, 1, 1], [1, 0, 1]])
    batch.local["ref_per_token_logps"] = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    batch = dataclasses.replace(batch,
                                policy_logps=lambda: torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
                                gather=lambda local: torch.cat([local, torch.tensor([[3.0, 2.0]])]))
    logged = {}
    batch = dataclasses.replace(batch, log_metric=logged.__setitem__)
    dense = ReinforcePP().po_token_rewards(batch)
    assert logged["reinforce-pp/kl"] == pytest.approx(2.5 / 7)
    assert torch.allclose(dense, torch.tensor([[-0.25, 0.0, 0.5], [0.0, 0.0, 0.0]]))
