"""Every built-in configuration passes the conformance suite that plugin authors run."""

import pytest

from po_registry import hookimpl
from po_registry.testing import PluginConformance


class TestGrpo(PluginConformance):
    method = "grpo"


class TestGrpoSequenceLevelWithKL(PluginConformance):
    method = "grpo"
    config = {"importance_sampling_level": "sequence", "beta": 0.04, "loss_type": "grpo", "epsilon": 3e-4,
              "epsilon_high": 4e-4}


class TestDrGrpoNoScaling(PluginConformance):
    method = "grpo"
    config = {"loss_type": "dr_grpo", "scale_rewards": "none"}


class TestBnpoBatchScalingEntropy(PluginConformance):
    method = "grpo"
    config = {"loss_type": "bnpo", "scale_rewards": "batch", "entropy_coef": 0.01, "delta": 1.5}


class TestDapoMasks(PluginConformance):
    method = "grpo"
    config = {"loss_type": "dapo", "top_entropy_quantile": 0.5, "off_policy_mask_threshold": 0.1}


class TestLuspoNormalizeThenSum(PluginConformance):
    method = "grpo"
    config = {"loss_type": "luspo", "importance_sampling_level": "sequence",
              "multi_objective_aggregation": "normalize_then_sum"}
    train_steps = 0  # trained in test_parity


class _LeakyAggregation:
    """Averages over every position, masked or not: the suite must catch it."""

    @hookimpl
    def po_register_methods(self, register):
        register("leaky", components=["leaky"])

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return per_token_loss.expand_as(batch.mask).mean()


def test_the_suite_catches_a_plugin_that_ignores_the_mask(plugins):
    plugins("leaky", _LeakyAggregation())
    suite = type("Leaky", (PluginConformance,), {"method": "leaky"})()
    suite.test_method_assembles_with_its_components()
    with pytest.raises(AssertionError, match="masked tokens received gradient"):
        suite.test_loss_is_a_finite_scalar_with_gradient(per_token_advantages=True)
    with pytest.raises(AssertionError, match="values at masked positions changed the loss"):
        suite.test_masked_positions_have_no_effect()
