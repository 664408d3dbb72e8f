"""CISPO: formula on hand-computed tensors, equality with TRL's cispo loss, conformance and training."""

import pytest
import torch
from po_registry_cispo import CISPO

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "cispo"
    metrics = ("cispo/clip_ratio",)


class TestConformanceWithLowerClip(PluginConformance):
    method = "cispo"
    options = {"cispo_epsilon_low": 0.5}
    train_steps = 0


def test_weight_is_capped_and_detached_but_every_token_has_gradient(po_loss_batch):
    batch = po_loss_batch(rows=2, width=3, options={"cispo_epsilon_max": 2.0, "cispo_epsilon_low": 0.0})
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    ratio = torch.tensor([[0.1, 1.0, 8.0], [0.1, 1.5, 8.0]])
    loss = CISPO().po_policy_objective(batch, ratio.log())
    weight = torch.tensor([[0.1, 1.0, 2.0], [0.1, 1.5, 2.0]])
    assert torch.allclose(loss, -weight * batch.advantages * batch.logps.detach())
    loss.sum().backward()
    assert torch.allclose(batch.logps.grad, -weight * batch.advantages)  # no token loses its gradient


def test_lower_clip_when_asked(po_loss_batch):
    batch = po_loss_batch(rows=1, width=2, options={"cispo_epsilon_max": 5.0, "cispo_epsilon_low": 0.2})
    batch.advantages = torch.tensor([[1.0]])
    loss = CISPO().po_policy_objective(batch, torch.tensor([[0.5, 0.9]]).log())
    assert torch.allclose(loss, -torch.tensor([[0.8, 0.9]]) * batch.logps.detach())


@pytest.mark.parametrize("shared", [{}, {"num_iterations": 2}], ids=["mu1", "mu2"])
def test_equals_trl_cispo(po_trl_parity, shared):
    result = po_trl_parity(["cispo"], {"loss_type": "cispo", "epsilon_high": 5.0}, shared_flags=shared,
                           off_policy=1.0)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
