"""DPPO: the binary TV and KL trust regions on hand-computed probabilities, the capped weight, the on-policy
gradient, conformance and training on the embedded model."""

import math

import pytest
import torch
from po_registry_dppo import DPPO, binary_kl

from po_registry.testing import PluginConformance


class TestConformanceTV(PluginConformance):
    method = "dppo-tv"
    metrics = ("dppo/masked_fraction", "dppo/capped_fraction")


class TestConformanceKL(PluginConformance):
    method = "dppo-kl"
    metrics = ("dppo/masked_fraction",)


# Four tokens, q = pi_old: 0.5 -> 0.7 (up 0.2), 0.5 -> 0.3 (down 0.2), 0.5 -> 0.6 (up 0.1), 0.01 -> 0.3 (r = 30).
OLD = [0.5, 0.5, 0.5, 0.01]
NEW = [0.7, 0.3, 0.6, 0.3]


def _batch(po_loss_batch, method_options, advantage):
    batch = po_loss_batch(rows=1, width=4, options={"dppo_ratio_cap": 20.0, **method_options})
    batch.mask = torch.ones(1, 4)
    batch.logps = torch.tensor([NEW]).log().requires_grad_()
    batch.old_logps = torch.tensor([OLD]).log()
    batch.advantages = torch.tensor([[advantage]])
    return batch


def test_binary_kl_by_hand():
    # KL(Bern(0.5) || Bern(0.7)) = 0.5 ln(0.5/0.7) + 0.5 ln(0.5/0.3)
    expected = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    assert binary_kl(torch.tensor(0.5).log(), torch.tensor(0.7).log()).item() == pytest.approx(expected, abs=1e-6)
    assert binary_kl(torch.tensor(0.4).log(), torch.tensor(0.4).log()).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("advantage, kept", [
    (1.0, [0.0, 1.0, 1.0, 0.0]),  # A > 0: p - q <= 0.15 (0.2 and 0.29 are out)
    (-1.0, [1.0, 0.0, 1.0, 1.0]),  # A <= 0: p - q >= -0.15 (-0.2 is out)
])
def test_tv_trust_region_and_capped_weight(po_loss_batch, advantage, kept):
    batch = _batch(po_loss_batch, {"dppo_divergence": "tv", "dppo_delta_low": 0.15, "dppo_delta_high": 0.15},
                   advantage)
    ratio = torch.tensor([[0.7 / 0.5, 0.3 / 0.5, 0.6 / 0.5, 20.0]])  # 0.3 / 0.01 = 30 is capped at 20
    loss = DPPO().po_policy_objective(batch, batch.logps.detach() - batch.old_logps)
    expected = -advantage * ratio * torch.tensor([NEW]).log() * torch.tensor([kept])
    assert torch.allclose(loss.detach(), expected, atol=1e-6)
    loss.sum().backward()
    assert torch.allclose(batch.logps.grad, -advantage * ratio * torch.tensor([kept]), atol=1e-6)


@pytest.mark.parametrize("advantage, kept", [
    # KL(0.5||0.7) = 0.0872, KL(0.5||0.3) = 0.0872, KL(0.5||0.6) = 0.0204, KL(0.01||0.3) = 0.3 ln(.01/.3)... > 0.05
    (1.0, [0.0, 1.0, 1.0, 0.0]),  # A > 0: kept if KL <= 0.05 or the token went down
    (-1.0, [1.0, 0.0, 1.0, 1.0]),  # A <= 0: kept if KL <= 0.05 or the token went up
])
def test_kl_trust_region(po_loss_batch, advantage, kept):
    batch = _batch(po_loss_batch, {"dppo_divergence": "kl", "dppo_delta_low": 0.05, "dppo_delta_high": 0.05},
                   advantage)
    loss = DPPO().po_policy_objective(batch, batch.logps.detach() - batch.old_logps)
    assert ((loss.detach() != 0).float() == torch.tensor([kept])).all()


def test_on_policy_it_is_the_policy_gradient(po_loss_batch):
    batch = po_loss_batch(rows=3, width=4, options={"dppo_divergence": "kl", "dppo_delta_low": 0.05,
                                                   "dppo_delta_high": 0.05, "dppo_ratio_cap": 20.0})
    batch.old_logps = batch.logps.detach()
    loss = DPPO().po_policy_objective(batch, torch.zeros(3, 4))
    assert torch.allclose(loss, -batch.advantages * batch.logps)


def test_the_two_variants_are_methods_with_their_bounds():
    from po_registry.pipeline import assemble

    tv, kl = assemble(["dppo-tv"]), assemble(["dppo-kl"])
    assert (tv.options["dppo_divergence"], tv.options["dppo_delta_high"]) == ("tv", 0.15)
    assert (kl.options["dppo_divergence"], kl.options["dppo_delta_low"]) == ("kl", 0.05)
