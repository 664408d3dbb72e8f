"""Dual-clip PPO: formula at and beyond both boundaries, conformance and training."""

import torch
from po_registry_dual_clip import DualClip

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "dual-clip"
    metrics = ("dual_clip/ratio",)


def test_lower_bound_only_for_negative_advantages(po_loss_batch):
    batch = po_loss_batch(rows=2, width=4, options={"dual_clip_c": 3.0})
    batch.advantages = torch.tensor([[-1.0], [1.0]])
    ratio = torch.tensor([[0.5, 2.0, 3.0, 10.0], [0.5, 2.0, 3.0, 10.0]], requires_grad=True)
    loss = DualClip().po_policy_objective(batch, ratio.log())
    # A = -1 (eps 0.2): -min(-r, -clip(r)) = max(r, clip(r)), then bounded at c = 3.
    # A = +1: the plain clipped surrogate -min(r, clip(r)).
    expected = torch.tensor([[0.8, 2.0, 3.0, 3.0], [-0.5, -1.2, -1.2, -1.2]])
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    assert ratio.grad[0, 3].item() == 0.0 and ratio.grad[0, 1].item() == 1.0  # bounded token: no gradient


def test_equals_the_clipped_surrogate_when_no_bound_is_active(po_loss_batch):
    """Ratios e^(0.2 noise) stay far below c = 3, so for A < 0 the PPO loss |A| max(r, clip(r, 0.8, 1.2)) never
    reaches the bound c |A|: the objective is PPO's -min(r A, clip(r, 0.8, 1.2) A), written out here (before, this
    compared with the baseline pipeline, which computes the same surrogate with the same helper)."""
    from po_registry.testing import default_args

    batch = po_loss_batch(rows=6, width=5, off_policy=0.2, args=default_args(["dual-clip"]),
                          options={"dual_clip_c": 3.0}, per_token_advantages=True)
    log_ratio = batch.logps.detach() - batch.old_logps
    ratio, advantages = log_ratio.exp(), batch.advantages
    expected = -torch.minimum(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages)
    assert (expected < 3.0 * advantages.abs()).all()  # the bound is inactive everywhere
    assert ((ratio < 0.8) | (ratio > 1.2)).any()  # while some ratios leave the PPO clip range
    assert torch.allclose(DualClip().po_policy_objective(batch, log_ratio), expected)
