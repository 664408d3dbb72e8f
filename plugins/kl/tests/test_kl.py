"""KL estimators as a loss term: formulas, equality with TRL's k3 term, conformance and training."""

import pytest
import torch
from po_registry_kl import KLPenalty

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args


class TestConformanceK3(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    metrics = ("kl/k3",)


class TestConformanceK1(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    options = {"kl_estimator": "k1", "kl_importance_correction": False}
    metrics = ("kl/k1",)


class TestConformanceK2(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    options = {"kl_estimator": "k2"}
    train_steps = 0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_times_beta_and_correction(po_loss_batch, estimator):
    args = default_args(["kl"], beta=0.5)
    batch = po_loss_batch(rows=1, width=3, args=args, options={"kl_estimator": estimator,
                                                               "kl_importance_correction": True})
    batch.logps = torch.tensor([[-1.0, -2.0, -0.5]])
    batch.ref_logps = torch.tensor([[-1.5, -1.0, -0.5]])
    log_rho = batch.ref_logps - batch.logps
    expected = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": log_rho.exp() - 1 - log_rho}[estimator]
    log_weights = torch.tensor([[0.1, 0.0, -0.2]])
    penalty = KLPenalty().po_token_penalty(batch, log_weights)
    assert torch.allclose(penalty, 0.5 * expected * log_weights.exp())


def test_needs_a_positive_beta():
    with pytest.raises(OptionError, match="plugin 'kl': the kl method needs beta > 0"):
        default_args(["kl"])


@pytest.mark.parametrize("correction", [True, False])
def test_k3_equals_trl_kl_term(po_trl_parity, correction):
    result = po_trl_parity(["kl"], {"use_bias_correction_kl": correction},
                           options={"kl_importance_correction": correction},
                           shared_flags={"beta": 0.2, "loss_type": "grpo"}, off_policy=0.5)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6


class TestKLRewardConformance(PluginConformance):
    method = "kl-reward"
    config = {"beta": 0.04}
    metrics = ("kl_reward/k1",)


def test_kl_reward_gradient_equals_a_dense_reward_in_the_advantage(po_loss_batch):
    """On-policy, kl-reward's gradient is that of advantages A_t - beta * k1_t with no KL term at all."""
    from po_registry.pipeline import Pipeline, assemble

    beta = 0.3
    grads = []
    for methods, shift in ((["kl-reward"], False), (["grpo"], True)):
        pipeline = Pipeline(assemble(methods))
        args = default_args(methods, pipeline.options, beta=beta if not shift else 0.0)
        batch = po_loss_batch(args=args, options=pipeline.options, per_token_advantages=True, off_policy=0.0)
        batch.old_logps = batch.logps.detach()
        if shift:
            k1 = (batch.logps - batch.ref_logps).detach()
            batch.advantages = batch.advantages - beta * k1
        pipeline.loss(batch).backward()
        grads.append(batch.logps.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
