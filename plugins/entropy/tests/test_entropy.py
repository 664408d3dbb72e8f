"""80/20 tokens, Clip-Cov and KL-Cov: formulas, TRL parity for the entropy mask, conformance and training."""

import pytest
import torch
from po_registry_entropy import ClipCov, HighEntropyTokens, KLCov, token_covariance

from po_registry.testing import PluginConformance, default_args


class TestHighEntropyConformance(PluginConformance):
    method = "high-entropy-tokens"
    metrics = ("entropy/kept_fraction",)


class TestClipCovConformance(PluginConformance):
    method = "clip-cov"
    options = {"clip_cov_fraction": 0.05, "clip_cov_lower": 0.0}
    metrics = ("clip_cov/clipped_fraction",)


class TestKLCovConformance(PluginConformance):
    method = "kl-cov"
    options = {"kl_cov_fraction": 0.05}
    config = {"num_iterations": 2}
    metrics = ("kl_cov/penalised_fraction",)


def test_covariance_formula(po_loss_batch):
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
    advantages = torch.tensor([[1.0], [-1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cov = token_covariance(logps, advantages, mask)
    # mean log pi over loss tokens = -2, mean A = 1/3
    expected = torch.tensor([[1.0 * (2 / 3), -1.0 * (2 / 3)], [0.0 * (-4 / 3), 0.0]])
    assert torch.allclose(cov, expected)


def test_high_entropy_mask_keeps_the_top_quantile(po_loss_batch):
    batch = po_loss_batch(rows=2, width=4, options={"entropy_top_quantile": 0.5})
    batch.mask = torch.ones(2, 4)
    batch.entropies = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.3, 0.7, 0.05]])
    keep = HighEntropyTokens().po_token_mask(batch)
    assert keep.tolist() == [[0, 1, 1, 0], [1, 0, 1, 0]]  # the top half: 0.9, 0.8, 0.7, 0.5


def test_clip_cov_removes_a_fraction_of_eligible_tokens(po_loss_batch):
    batch = po_loss_batch(rows=4, width=5, args=default_args(), options={
        "clip_cov_fraction": 0.1, "clip_cov_lower": -100.0, "clip_cov_upper": 100.0})
    keep = ClipCov().po_token_mask(batch)
    removed = (keep == 0) & batch.mask.bool()
    assert removed.sum() == max(1, int(0.1 * batch.mask.sum()))
    assert (keep[~batch.mask.bool()] == 1).all()


def test_kl_cov_penalises_the_top_covariance_tokens(po_loss_batch):
    batch = po_loss_batch(rows=2, width=2, options={"kl_cov_fraction": 0.3, "kl_cov_coef": 2.0})
    batch.mask = torch.ones(2, 2)
    batch.logps = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]], requires_grad=True)
    batch.old_logps = torch.tensor([[-1.5, -3.0], [-2.0, -1.0]])
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    penalty = KLCov().po_token_penalty(batch)
    cov = token_covariance(batch.logps, batch.advantages, batch.mask)
    top = cov.flatten().argmax()
    expected = torch.zeros(4)
    expected[top] = 2.0 * (batch.logps - batch.old_logps).abs().flatten()[top]
    assert torch.allclose(penalty.flatten(), expected)


def test_high_entropy_tokens_equal_trl_top_entropy_quantile(po_trl_parity):
    result = po_trl_parity(["high-entropy-tokens"], {"top_entropy_quantile": 0.2}, off_policy=0.3)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
