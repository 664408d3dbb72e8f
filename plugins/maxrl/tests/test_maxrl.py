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


def test_non_negative_rewards_by_hand(po_reward_batch):
    nan = float("nan")
    rewards = torch.tensor([[2.0], [0.0], [1.0], [1.0],  # mean 1: A = (R - 1) / (1 + 1e-4)
                            [0.0], [0.0], [0.0], [0.0],  # all zero: A = 0 / (0 + 1e-4) = 0
                            [1e-6], [0.0], [0.0], [0.0],  # mean 2.5e-7: A = (R - 2.5e-7) / (2.5e-7 + 1e-4)
                            [1.0], [nan], [0.0], [0.0]])  # unscored row out of the mean: mean 1/3, its A = 0
    _, batch = po_reward_batch(group_size=4, num_groups=4, rewards=rewards, options={"maxrl_eps": 1e-4})
    got = MaxRL().po_compute_advantages(rewards, batch)
    expected = torch.tensor([0.99990001, -0.99990001, 0.0, 0.0,
                             0.0, 0.0, 0.0, 0.0,
                             0.0074812968, -0.0024937656, -0.0024937656, -0.0024937656,  # 7.5e-7/1.0025e-4 ...
                             1.99940018, 0.0, -0.99970009, -0.99970009])  # (2/3)/(1/3 + 1e-4), (-1/3)/(...)
    assert torch.allclose(got, expected, atol=1e-7, rtol=0)
    # With R >= 0, -1 < A < G - 1 for every group: the near-zero mean stays bounded.
    assert got.min() > -1 and got.max() < 3


def test_mixed_sign_rewards_are_refused_naming_the_reward(po_reward_batch):
    import pytest

    # Before: the group mean is 0 here, and A = R / 1e-4 = +-1e4.
    rewards = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]])
    _, batch = po_reward_batch(group_size=4, num_groups=1, rewards=rewards, options={"maxrl_eps": 1e-4})
    with pytest.raises(ValueError, match=r"maxrl .* rewards >= 0 .*row 1 has weighted reward -1 \(reward_0 = -1 "
                                         r"\(weight 1\).*\(r \+ 1\) / 2"):
        MaxRL().po_compute_advantages(rewards, batch)


def test_mixed_sign_rewards_stop_the_pipeline_with_the_plugin_named(po_reward_batch):
    import pytest

    from po_registry.errors import HookError
    from po_registry.pipeline import Pipeline, assemble

    pipeline = Pipeline(assemble(["maxrl"]))
    rewards = torch.tensor([[1.0], [0.0], [0.5], [-0.25]])
    _, batch = po_reward_batch(group_size=4, num_groups=1, rewards=rewards, options=pipeline.options)
    with pytest.raises(HookError, match="maxrl.*po_compute_advantages.*row 3 has weighted reward -0.25"):
        pipeline.compute_advantages(rewards, batch)
