"""Dr.GRPO: formula on hand-computed tensors, equality with TRL's dr_grpo, conformance and training."""

import pytest
import torch
from po_registry_dr_grpo import DrGRPO

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "dr-grpo"


def test_advantages_are_mean_centred_without_std(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0], [2.0], [2.0], [float("nan")], [2.0]])
    _, batch = po_reward_batch(group_size=4, num_groups=2, rewards=rewards)
    advantages = DrGRPO().po_compute_advantages(rewards, batch)
    assert torch.allclose(advantages, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))


def test_constant_normaliser_ignores_lengths(po_loss_batch):
    """Loss tokens 1, 3, 4 (row 0, an environment hole of 9 at t = 1) and 5 (row 1, then padding): their sum over
    B * L_max = 2 * 8: 13 / 16, whatever the accumulation steps (the pipeline divides by them)."""
    batch = po_loss_batch(rows=2, width=4)
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    batch.max_completion_length, batch.accumulation_steps = 8, 2
    per_token = torch.tensor([[1.0, 9.0, 3.0, 4.0], [5.0, 9.0, 9.0, 9.0]])
    loss = DrGRPO().po_aggregate_loss(per_token, batch)
    assert loss.item() == pytest.approx((1 + 3 + 4 + 5) / (2 * 8))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_equals_trl_dr_grpo(po_trl_parity, beta):
    result = po_trl_parity(["dr-grpo"], {"loss_type": "dr_grpo", "scale_rewards": "none"},
                           shared_flags={"beta": beta})
    assert result["completions_equal"] and result["advantages_diff"] <= 1e-6
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
