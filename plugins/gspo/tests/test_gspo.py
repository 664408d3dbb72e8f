"""GSPO and GSPO-token: formulas on hand-computed tensors, equality with TRL, conformance and training."""

import math

import pytest
import torch
from po_registry_gspo import GSPO, GSPOToken

from po_registry.pipeline import Pipeline, assemble
from po_registry.testing import PluginConformance, default_args


class TestGSPOConformance(PluginConformance):
    method = "gspo"
    metrics = ("gspo/clip_ratio",)
    config = {"steps_per_generation": 2}


class TestGSPOTokenConformance(PluginConformance):
    method = "gspo-token"
    metrics = ("gspo-token/clip_ratio",)


def test_sequence_ratio_is_the_length_normalised_mean(po_loss_batch):
    """Row 0: log-ratios 0.3 and 0.1 on its loss tokens, 5.0 on an environment hole between them: (0.3 + 0.1) / 2;
    row 1: (0 + 0.3 + 0.3) / 3."""
    batch = po_loss_batch(rows=2, width=3)
    batch.mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    batch.old_logps = batch.logps.detach() - torch.tensor([[0.3, 5.0, 0.1], [0.0, 0.3, 0.3]])
    log_weights = GSPO().po_log_importance_weights(batch)
    assert torch.allclose(log_weights, torch.tensor([[0.2], [0.2]]))


def test_aggregation_is_the_mean_of_sequence_losses(po_loss_batch):
    """Row 0: loss tokens 1, 3, 5 around an environment hole (9), row 1: the token 2 before padding (7): sequence
    means 3 and 2, their mean 2.5, whatever the accumulation steps (the pipeline divides by them)."""
    batch = po_loss_batch(rows=2, width=4)
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    batch.accumulation_steps = 2
    per_token = torch.tensor([[1.0, 9.0, 3.0, 5.0], [2.0, 7.0, 0.0, 0.0]])
    assert GSPO().po_aggregate_loss(per_token, batch).item() == pytest.approx(2.5)


def test_clip_at_the_gspo_boundary(po_loss_batch):
    batch = po_loss_batch(rows=4, width=2, options={"gspo_epsilon_low": 3e-4, "gspo_epsilon_high": 4e-4})
    batch.advantages = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    ratio = torch.tensor([[1.0004], [1.01], [0.9997], [0.99]])
    loss = GSPO().po_policy_objective(batch, ratio.log())
    expected = torch.tensor([[-1.0004], [-1.0004], [0.9997], [0.9997]])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_gspo_token_equals_gspo_for_sequence_advantages(po_loss_batch):
    """Same loss and same gradient: sg[s_i] pi/sg[pi] has the value of s_i and, summed over a sequence's tokens
    and divided by its length, the gradient of s_i."""
    results = []
    for method in ("gspo", "gspo-token"):
        pipeline = Pipeline(assemble([method]))
        batch = po_loss_batch(rows=6, width=5, off_policy=1e-4, options=pipeline.options)  # inside the clip range
        loss = pipeline.loss(batch)
        loss.backward()
        results.append((loss.detach(), batch.logps.grad))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-7)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_gspo_token_carries_per_token_advantages(po_loss_batch):
    batch = po_loss_batch(rows=1, width=3, options=assemble(["gspo-token"]).options)
    batch.mask = torch.ones(1, 3)
    batch.old_logps = batch.logps.detach()
    batch.advantages = torch.tensor([[1.0, -2.0, 3.0]])
    log_weights = GSPOToken().po_log_importance_weights(batch)
    loss = GSPOToken().po_policy_objective(batch, log_weights)
    assert torch.allclose(loss, -batch.advantages)  # ratio 1 on-policy: l_t = -A_t
    loss.sum().backward()
    assert torch.allclose(batch.logps.grad, -batch.advantages)  # d/dlogp of sg[s] pi/sg[pi] is 1 at r = 1


@pytest.mark.parametrize("shared", [{}, {"beta": 0.04}], ids=["beta0", "beta"])
def test_gspo_equals_trl_sequence_level(po_trl_parity, shared):
    result = po_trl_parity(["gspo"], {"importance_sampling_level": "sequence", "loss_type": "grpo",
                                      "epsilon": 3e-4, "epsilon_high": 4e-4}, shared_flags=shared, off_policy=0.001)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6


def test_options_are_the_papers_defaults():
    assert assemble(["gspo"]).options == {"gspo_epsilon_low": 3e-4, "gspo_epsilon_high": 4e-4}
    assert math.isclose(assemble(["gspo-token"]).options["gspo_token_epsilon_high"], 4e-4)
    default_args(["gspo"], {"gspo_epsilon_low": 1e-3})  # a valid override builds
