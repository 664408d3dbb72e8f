"""VESPO: the Gamma weight on hand-computed numbers, equality with TRL's vespo loss, conformance and training."""

import math

import pytest
import torch
from po_registry_vespo import VESPO

from po_registry.errors import OptionError
from po_registry.testing import PluginConformance, default_args


class TestConformance(PluginConformance):
    method = "vespo"
    metrics = ("vespo/phi_seq_mean",)


def test_sequence_weight_from_hand_numbers_with_a_hole_in_the_mask(po_loss_batch):
    """Row 0 (A = +1, k 2, lambda 3): w = 2 -> phi = e^3 * 4 * e^-6 = 4 e^-3. Row 1 (A = -1, k 3, lambda 2): the masked
    middle token (an environment token, log-ratio log 100) does not count: w = 0.5 -> phi = e^2 * 0.125 * e^-1 =
    e / 8. Row 2 (A = +1): two tokens of log-ratio 30 are clamped to 20 each, the sum to 20: phi = e^(3 + 40 -
    3 e^20) = 0. The weight carries no gradient: d loss / d logp_t = -phi A on every loss token."""
    batch = po_loss_batch(rows=3, width=3)
    batch.advantages = torch.tensor([[1.0], [-1.0], [1.0]])
    batch.mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    log_ratio = torch.tensor([[math.log(2), 0.0, 5.0], [math.log(0.5), math.log(100), 0.0], [30.0, 30.0, 0.0]])
    loss = VESPO().po_policy_objective(batch, log_ratio)
    phi = torch.tensor([[4 * math.exp(-3)], [math.e / 8], [0.0]])
    assert torch.allclose(loss, -phi * batch.advantages * batch.logps.detach(), atol=1e-7)
    loss.sum().backward()
    assert torch.allclose(batch.logps.grad, (-phi * batch.advantages).expand(3, 3), atol=1e-7)


def test_on_policy_the_weight_is_one(po_loss_batch):
    batch = po_loss_batch(rows=2, width=4)
    batch.advantages = torch.tensor([[0.5], [-2.0]])
    loss = VESPO().po_policy_objective(batch, torch.zeros(2, 4))
    assert torch.allclose(loss, -batch.advantages * batch.logps.detach())


def test_bad_shapes_and_levels_are_refused():
    with pytest.raises(OptionError, match="vespo.*vespo_lambda_neg must be > 0, got 0.0"):
        default_args(["vespo"], vespo_lambda_neg=0.0).resolve()
    with pytest.raises(OptionError, match="vespo.*importance_sampling_level='token'"):
        default_args(["vespo"], importance_sampling_level="sequence").resolve()
    with pytest.raises(OptionError, match="vespo.*the importance weights of plugin 'gspo' are per sequence"):
        default_args(["vespo", "gspo:importance"]).resolve()
    with pytest.raises(OptionError, match="vespo.*loss_type='grpo' asks for another aggregation"):
        default_args(["vespo"], loss_type="grpo").resolve()


def test_the_baseline_points_at_the_method_for_loss_type_vespo():
    with pytest.raises(OptionError, match="loss_type='vespo'.*--method vespo"):
        default_args(["grpo"], loss_type="vespo").resolve()


TRL_CASES = {
    "defaults": {},
    "beta-mu2": {"beta": 0.04, "num_iterations": 2},
    "shapes": {"vespo_k_pos": 1.5, "vespo_lambda_pos": 1.0, "vespo_k_neg": 4.0, "vespo_lambda_neg": 3.0},
}


@pytest.mark.parametrize("shared", TRL_CASES.values(), ids=TRL_CASES.keys())
def test_equals_trl_vespo(po_trl_parity, shared):
    result = po_trl_parity(["vespo"], {"loss_type": "vespo"}, shared_flags=shared, off_policy=0.3)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
    assert result["metrics"]["ours"]["vespo/phi_seq_mean"] == pytest.approx(
        result["metrics"]["stock"]["vespo/phi_seq_mean"], abs=1e-6)
