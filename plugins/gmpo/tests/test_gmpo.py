"""GMPO: formula on hand-computed tensors, equality with TRL's experimental GMPOTrainer, conformance and training."""

import math

import pytest
import torch
from po_registry_gmpo import GMPO

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "gmpo"
    metrics = ("gmpo/clip_ratio",)


def test_geometric_mean_of_sign_aware_clipped_ratios(po_loss_batch):
    batch = po_loss_batch(rows=2, width=4, options={"gmpo_epsilon_low": 0.4, "gmpo_epsilon_high": 0.4})
    batch.mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # row 1: an environment hole at t = 1
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    log_ratio = torch.tensor([[0.1, 1.0, -1.0, 3.0], [0.1, 7.0, 1.0, 5.0]])
    batch.old_logps = batch.logps.detach() - log_ratio
    log_weights = GMPO().po_log_importance_weights(batch)
    # A > 0: min(x, clip(x)) -> (0.1, 0.4, -1.0); A < 0: max(x, clip(x)) -> (0.1, 1.0); 7.0 and the padding are masked.
    assert torch.allclose(log_weights, torch.tensor([[(0.1 + 0.4 - 1.0) / 3], [(0.1 + 1.0) / 2]]), atol=1e-6)
    loss = GMPO().po_policy_objective(batch, log_weights)
    assert loss[1].item() == pytest.approx(math.exp(0.55))


def test_aggregation_is_the_mean_of_sequence_losses(po_loss_batch):
    """Per-token losses: row 0 has loss tokens 1, 3, 5 around an environment hole (9), row 1 the token 2 before
    padding (7): sequence means 3 and 2, their mean 2.5, whatever the accumulation steps (the pipeline divides by
    them). A (B, 1) loss is already per sequence: (4 + 2) / 2 = 3."""
    batch = po_loss_batch(rows=2, width=4)
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    batch.accumulation_steps = 2
    per_token = torch.tensor([[1.0, 9.0, 3.0, 5.0], [2.0, 7.0, 0.0, 0.0]])
    assert GMPO().po_aggregate_loss(per_token, batch).item() == pytest.approx(2.5)
    assert GMPO().po_aggregate_loss(torch.tensor([[4.0], [2.0]]), batch).item() == pytest.approx(3.0)


def test_geometric_mean_is_bounded_by_the_arithmetic_mean(po_loss_batch):
    batch = po_loss_batch(rows=4, width=5, off_policy=0.05, options={"gmpo_epsilon_low": 9.0, "gmpo_epsilon_high": 9.0})
    batch.advantages = torch.ones(4, 1)
    geometric = torch.exp(GMPO().po_log_importance_weights(batch)).squeeze(1)
    arithmetic = (torch.exp(batch.logps - batch.old_logps) * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1)
    assert (geometric[1:] <= arithmetic[1:] + 1e-6).all()  # AM-GM (row 0 is fully masked)


def test_equals_trl_gmpo(po_trl_parity):
    from trl.experimental.gmpo import GMPOConfig, GMPOTrainer

    result = po_trl_parity(["gmpo"], {"epsilon": 0.4}, off_policy=0.5, stock_classes=(GMPOTrainer, GMPOConfig))
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
