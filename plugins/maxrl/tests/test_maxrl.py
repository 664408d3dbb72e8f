"""MaxRL: the formula on hand-computed groups (including all-zero ones), conformance and training."""

import torch
from po_registry_maxrl import MaxRL

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "maxrl"


def test_advantages_are_scaled_by_the_success_rate(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0]])
    _, batch = po_reward_batch(group_size=4, num_groups=2, rewards=rewards, options={"maxrl_eps": 1e-4})
    advantages = MaxRL().po_compute_advantages(rewards, batch)
    p = 0.25
    expected = torch.tensor([(1 - p) / (p + 1e-4), -p / (p + 1e-4), -p / (p + 1e-4), -p / (p + 1e-4), 0, 0, 0, 0])
    assert torch.allclose(advantages, expected)
