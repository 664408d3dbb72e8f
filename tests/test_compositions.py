"""Compositions of the method plugins under plugins/: what composes, and what is refused with the conflict named."""

import pytest

from po_registry import CompositionError, OptionError
from po_registry.pipeline import assemble
from po_registry.testing import default_args


@pytest.mark.parametrize(
    "methods, stage, first, second",
    [
        (["cispo", "dr-grpo"], "po_aggregate_loss", "cispo", "dr-grpo"),  # two loss aggregations
        (["gspo", "dr-grpo"], "po_aggregate_loss", "gspo", "dr-grpo"),  # GSPO's per-sequence mean vs B * L_max
        (["gspo", "gmpo"], "po_log_importance_weights", "gspo", "gmpo"),  # two importance ratios
        (["sapo", "dual-clip"], "po_policy_objective", "sapo", "dual-clip"),  # two objectives
        (["kl", "kl-reward"], None, None, None),
    ],
)
def test_conflicting_methods_are_refused_naming_both(methods, stage, first, second):
    if stage is None:  # kl and kl-reward both add a token penalty: composable, both apply
        assert assemble(methods).owners["po_token_penalty"] == ["kl", "kl-reward"]
        return
    with pytest.raises(CompositionError) as error:
        assemble(methods)
    message = str(error.value)
    assert stage in message and f"'{first}'" in message and f"'{second}'" in message


def test_orthogonal_methods_compose():
    assembly = assemble(["gspo", "dynamic-sampling", "high-entropy-tokens", "overlong-reward", "kl-reward"])
    owners = assembly.owners
    assert owners["po_log_importance_weights"] == ["gspo"] and owners["po_aggregate_loss"] == ["gspo"]
    assert owners["po_compute_advantages"] == ["group-advantage"] and owners["po_token_penalty"] == ["kl-reward"]
    assert "high-entropy-tokens" in owners["po_token_mask"] and owners["po_refill_rounds"] == ["dynamic-sampling"]


def test_a_sequence_ratio_with_a_token_correction_is_refused_when_asked():
    with pytest.raises(OptionError, match="token-level rollout correction .* sequence-level importance ratio of "
                                          "plugin 'gspo'"):
        default_args(["gspo", "rollout-correction"], {"rollout_correction_mode": "token_mask",
                                                      "rollout_correction_match_ratio": True})


def test_a_trainer_uses_the_assembly_its_config_was_checked_with(po_trainer, tmp_path):
    """Assembled and checked once: a coupling warning is printed once, and `explain`'s option sources stay as the
    user and the methods set them (re-assembling from the config's resolved options made every one "user")."""
    import warnings

    from po_registry import CouplingWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = po_trainer(["opd-reward"], {"opd_lambda": 0.5, "opd_teacher": str(tmp_path / "tiny-model")})
    coupling = [w for w in caught if issubclass(w.category, CouplingWarning)]
    assert len(coupling) == 1 and "opd-reward" in str(coupling[0].message)
    sources = trainer.po_pipeline.assembly.option_sources
    assert sources["opd_lambda"] == "user" and sources["opd_clip"] == "default"
