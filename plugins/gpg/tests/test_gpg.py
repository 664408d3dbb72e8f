"""GPG: alpha = B/(B-M), the plain policy-gradient loss, the refused couplings, conformance and training."""

import pytest
import torch
from po_registry_gpg import GPG

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args


class TestConformance(PluginConformance):
    method = "gpg"
    metrics = ("gpg/alpha",)


def test_alpha_corrects_for_degenerate_groups(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0]])  # groups of 2: one live, two degenerate
    _, batch = po_reward_batch(group_size=2, num_groups=3, rewards=rewards)
    advantages = GPG().po_compute_advantages(rewards, batch)
    assert torch.allclose(advantages, 3.0 * torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0]))  # alpha = 6 / (6 - 4)


def test_loss_is_the_plain_policy_gradient(po_loss_batch):
    batch = po_loss_batch(rows=3, width=4, per_token_advantages=False)
    loss = GPG().po_policy_objective(batch)
    assert torch.allclose(loss, -batch.advantages * batch.logps)
    loss.sum().backward()
    assert torch.allclose(batch.logps.grad, -batch.advantages.expand_as(batch.logps))


@pytest.mark.parametrize("field, value", [("beta", 0.04), ("entropy_coef", 0.01), ("top_entropy_quantile", 0.2),
                                          ("mask_truncated_completions", True),
                                          ("multi_objective_aggregation", "normalize_then_sum")])
def test_couplings_that_break_alpha_are_refused(field, value):
    with pytest.raises(OptionError, match=f"plugin 'gpg': GPG's B/\\(B-M\\) correction is invalid with {field}"):
        default_args(["gpg"], **{field: value})
