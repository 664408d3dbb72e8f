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


def test_equals_the_baseline_when_no_bound_is_active(po_loss_batch):
    from po_registry.pipeline import Pipeline, assemble

    results = []
    for method in ("grpo", "dual-clip"):
        pipeline = Pipeline(assemble([method]))
        batch = po_loss_batch(rows=6, width=5, off_policy=0.2, options=pipeline.options)
        results.append(pipeline.loss(batch))
    assert torch.allclose(results[0], results[1])
