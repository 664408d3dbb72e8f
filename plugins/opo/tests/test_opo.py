"""OPO: the length-weighted baseline on hand-computed groups, conformance and training."""

import dataclasses

import torch
from po_registry_opo import OPO

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "opo"
    metrics = ("opo/baseline_mean",)


def test_length_weighted_baseline(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [2.0], [float("nan")]])
    _, batch = po_reward_batch(group_size=2, num_groups=2, rewards=rewards)
    batch = dataclasses.replace(batch, completion_lengths=torch.tensor([3, 1, 4, 6]))
    advantages = OPO().po_compute_advantages(rewards, batch)
    b1 = (3 * 1.0 + 1 * 0.0) / 4
    assert torch.allclose(advantages, torch.tensor([1.0 - b1, 0.0 - b1, 0.0, 0.0]))  # group 2: b = R, NaN -> 0


def test_equal_lengths_give_the_group_mean(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [0.5], [0.5]])
    _, batch = po_reward_batch(group_size=4, num_groups=1, rewards=rewards)
    batch = dataclasses.replace(batch, completion_lengths=torch.full((4,), 5))
    assert torch.allclose(OPO().po_compute_advantages(rewards, batch), rewards.squeeze(1) - 0.5)
