"""Compositions of the method plugins under plugins/: what composes, and what is refused with the conflict named."""

import dataclasses

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


# -- side and stage selectors: one method's reward side with another's trajectory side ---------------------------


def _stage_outputs(methods, seed=0):
    """The advantages and the loss of the assembled pipeline on one synthetic batch (holes in the mask included)."""
    import torch

    from po_registry.pipeline import Pipeline
    from po_registry.testing import loss_batch, reward_batch

    args = default_args(methods)
    pipeline = Pipeline(args.checked_assembly())
    rewards, batch = reward_batch(args=args, options=pipeline.options, seed=seed)
    advantages = pipeline.compute_advantages(pipeline.shape_rewards(rewards, batch), batch)
    torch.manual_seed(seed)
    loss = pipeline.loss(loss_batch(args=args, options=pipeline.options, seed=seed, per_token_advantages=True))
    return advantages, loss


def test_a_side_selector_takes_one_side_of_a_method():
    """dr-grpo:reward,gspo: Dr. GRPO's advantages (no std scaling) with GSPO's whole trajectory side. The two were
    refused together (both aggregate the loss); selected, the advantages are dr-grpo's own and the loss gspo's own."""
    assembly = assemble(["dr-grpo:reward", "gspo"])
    assert assembly.owners["po_compute_advantages"] == ["dr-grpo"]
    assert assembly.owners["po_aggregate_loss"] == ["gspo"] and assembly.specs == ["dr-grpo:reward", "gspo"]
    composed_advantages, composed_loss = _stage_outputs(["dr-grpo:reward", "gspo"])
    dr_grpo_advantages, _ = _stage_outputs(["dr-grpo"])
    _, gspo_loss = _stage_outputs(["gspo"])
    assert composed_advantages.equal(dr_grpo_advantages) and composed_loss.item() == gspo_loss.item()
    assert not dr_grpo_advantages.equal(_stage_outputs(["gspo"])[0])  # the sides really differ


def test_a_stage_selector_removes_one_stage_and_the_baseline_takes_it_back():
    assembly = assemble(["dapo:-aggregation"])
    assert assembly.owners["po_aggregate_loss"] == ["loss-aggregation"]  # the baseline's, by loss_type
    assert assembly.owners["po_policy_objective"] == ["clip-higher"]
    shaped = assemble(["dapo:-shaping"])  # the overlong penalty's component leaves, and its options with it
    assert shaped.owners["po_shape_rewards"] == [] and "overlong-reward" not in shaped.components
    assert not any(name.startswith("overlong_reward") for name in shaped.options)
    both = assemble(["dapo:trajectory+-aggregation"])
    assert both.owners["po_shape_rewards"] == [] and both.owners["po_aggregate_loss"] == ["loss-aggregation"]


@pytest.mark.parametrize("methods", [["dapo", "gspo"], ["gspo", "dr-grpo"], ["cispo", "dr-grpo"],
                                     ["sapo", "dual-clip"]])
def test_a_refused_composition_prints_the_selectors_that_resolve_it(methods):
    """Every clash between the two methods is named with both owners, and both suggested compositions assemble: one
    method narrowed by a selector, or left out where the clash is all it brings (dual-clip is only an objective)."""
    with pytest.raises(CompositionError, match="To keep one of them, compose") as error:
        assemble(methods)
    suggestions = str(error.value).split("compose ", 1)[1]
    first, second = (part.strip(" '.") for part in suggestions.split("' or '"))
    for suggestion, narrowed in ((first, 0), (second, 1)):
        specs = assemble(suggestion.split(",")).specs
        if len(specs) == 2:
            assert [spec.split(":")[0] for spec in specs] == methods and ":-" in specs[narrowed]
        else:
            assert specs == [methods[1 - narrowed]]


@pytest.mark.parametrize("spec, message", [
    ("dapo:rewrd", r"unknown selector 'rewrd'\. Did you mean 'reward'\? Selectors: a side \(reward, trajectory\)"),
    ("dapo:", r"unknown selector ''"),
    ("gspo:reward", r"method 'gspo:reward' keeps no stage"),
    ("nosuch:reward", r"unknown method 'nosuch'"),
])
def test_bad_selectors_are_one_clear_error(spec, message):
    with pytest.raises(Exception, match=message):
        assemble([spec])


def test_selectors_reach_the_config_yaml_and_explain(tmp_path, capsys):
    """A config keeps the specs as given (its checked assembly is reused, not rebuilt), YAML takes them, and
    `explain` shows the selected pipeline."""
    from po_registry.cli import main

    args = default_args(["dr-grpo:reward", "gspo"])
    assert args.methods == ["dr-grpo:reward", "gspo"] and args.checked_assembly() is not None
    from po_registry.run import _settings_from

    config = tmp_path / "run.yaml"
    config.write_text("methods: [\"dr-grpo:reward\", gspo]\n")
    assert _settings_from(config, {})[0]["method"] == ["dr-grpo:reward", "gspo"]
    config.write_text("methods: [\"dr-grpo:rewrd\", gspo]\n")
    assert main(["train", "--config", str(config), "--output-dir", str(tmp_path / "run")]) == 2
    assert "unknown selector 'rewrd'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["explain", "dr-grpo:reward,gspo"]) == 0
    out = capsys.readouterr().out
    assert "methods: dr-grpo:reward, gspo" in out and "po_aggregate_loss (single owner): gspo" in out


def test_the_oracle_leaves_a_selected_composition_unchecked():
    """A method's declaration describes the whole method: a selector leaves it out of the oracle's claim, saying so."""
    from po_registry.oracle import check_method

    result = check_method(["dr-grpo:reward", "gspo"], batches=2, rows=64)
    assert result.passed is None and "selector" in result.note


def test_a_value_carried_from_the_reward_side_is_declared_and_its_producer_checked_at_assembly():
    """PPO's value loss reads the targets its advantage stage carries (po_carries / po_uses_carried): a selector that
    removes the advantage stage leaves the value loss without them, refused at assembly naming the plugin and keys;
    at run time a key no component declared is refused by carry itself."""
    import torch

    from po_registry.testing import reward_batch

    assert assemble(["ppo"]).carries == {"ppo_old_values", "ppo_returns", "ppo_value_mask"}
    assert assemble(["grpo"]).carries == frozenset()
    with pytest.raises(CompositionError, match=r"plugin 'ppo-critic' \(from method 'ppo:-advantages'\) reads "
                                               r"'ppo_old_values', 'ppo_returns', 'ppo_value_mask' from the rollout"):
        assemble(["ppo:-advantages"])
    _, batch = reward_batch()
    batch = dataclasses.replace(batch, carries=frozenset({"ppo_returns"}))
    batch.carry("ppo_returns", torch.zeros(batch.num_rows))
    with pytest.raises(ValueError, match=r"carry\('value_targets'\): no component of this composition declares it "
                                         r"in po_carries \(declared: ppo_returns\)"):
        batch.carry("value_targets", torch.zeros(batch.num_rows))
