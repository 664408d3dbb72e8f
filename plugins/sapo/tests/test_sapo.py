"""SAPO: formula on hand-computed tensors, equality with TRL's sapo loss, conformance and training."""

import math

import pytest
import torch
from po_registry_sapo import SAPO

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "sapo"
    metrics = ("sapo/gate_mean",)


def test_gate_formula_and_on_policy_gradient(po_loss_batch):
    batch = po_loss_batch(rows=2, width=2, options={"sapo_tau_pos": 1.0, "sapo_tau_neg": 2.0})
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    ratio = torch.tensor([[1.0, 2.0], [1.0, 0.5]], requires_grad=True)
    loss = SAPO().po_policy_objective(batch, ratio.log())
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [[-4 * sigmoid(0.0), -4 * sigmoid(1.0)], [2 * sigmoid(0.0), 2 * sigmoid(-1.0)]]
    assert torch.allclose(loss, torch.tensor(expected))
    loss.sum().backward()
    assert ratio.grad[0, 0].item() == pytest.approx(-1.0)  # f'(1) = 1: the plain policy gradient
    assert ratio.grad[1, 0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("shared", [{}, {"beta": 0.04}], ids=["beta0", "beta"])
def test_equals_trl_sapo(po_trl_parity, shared):
    result = po_trl_parity(["sapo"], {"loss_type": "sapo"}, shared_flags=shared, off_policy=0.5)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
