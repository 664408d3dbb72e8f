"""Registry: entry-point loading, autoload control, listing, composition and load faults."""

from __future__ import annotations

import sys
import textwrap

import pytest
from helpers import build

from po_registry import (
    CompositionError,
    OptionError,
    PluginLoadError,
    Registry,
    UnknownMethodError,
    assemble,
    hookimpl,
    reload_registry,
)

LOO_PLUGIN = textwrap.dedent(
    '''
    """A third-party method: leave-one-out baseline, published as its own distribution."""
    from po_registry import hookimpl
    from po_registry.ops import group_mean


    class LeaveOneOut:
        @hookimpl
        def po_register_methods(self, register):
            register("loo-example", components=["loo-example"], summary="leave-one-out baseline",
                     options={"loo_scale": 1.5})

        @hookimpl
        def po_declare_options(self, register):
            register("loo_scale", 1.0, help="advantage multiplier, > 0", type=float, check=lambda v: v > 0)

        @hookimpl
        def po_compute_advantages(self, rewards, batch):
            total = batch.weighted_reward(rewards).nan_to_num(0.0)
            G = batch.group_size
            advantages = (total - group_mean(total, G)) * G / (G - 1) * batch.options["loo_scale"]
            batch.log_metric("loo/mean_abs_advantage", advantages.abs().mean().item())
            return advantages
    '''
)


def install_distribution(root, dist_name, module_name, source, entry_points):
    """Write a minimal installed distribution (module + dist-info with entry points) into ``root``."""
    (root / f"{module_name}.py").write_text(source)
    info = root / f"{dist_name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[po_registry]\n{lines}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    yield root
    for module in ("loo_example_plugin", "broken_plugin"):
        sys.modules.pop(module, None)
    monkeypatch.undo()
    reload_registry()


@pytest.fixture
def loo_distribution(site):
    install_distribution(site, "po-registry-loo-example", "loo_example_plugin", LOO_PLUGIN,
                         {"loo-example": "loo_example_plugin:LeaveOneOut"})
    return site


def test_third_party_distribution_is_loaded_and_listed(loo_distribution):
    registry = reload_registry()
    assert "loo-example" in registry.methods
    row = next(r for r in registry.describe() if r["name"] == "loo-example")
    assert row["distribution"] == "po-registry-loo-example" and row["version"] == "0.1.0"
    assert row["hooks"] == ["po_compute_advantages", "po_declare_options", "po_register_methods"]
    assert row["methods"] == ["loo-example"] and row["error"] is None
    baseline = next(r for r in registry.describe() if r["name"] == "grpo")
    assert baseline["builtin"] and baseline["methods"] == ["grpo"]


def test_third_party_method_trains_by_name(loo_distribution, tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    from po_registry.config import PolicyOptimizationConfig
    from po_registry.trainer import PolicyOptimizationTrainer

    reload_registry()
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=["loo-example"], method_options={"loo_scale": 2.0}, max_steps=2)
    assert trainer.po_pipeline.assembly.owners["po_compute_advantages"] == ["loo-example"]
    assert trainer.po_options == {"loo_scale": 2.0}
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loo/mean_abs_advantage" in row]
    # a mean of |A| is never negative: it must be positive (the groups have reward spread under digit_reward)
    assert len(logged) == 2 and all(row["loo/mean_abs_advantage"] > 0 for row in logged)
    assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters()))


def test_method_defaults_and_option_validation(loo_distribution):
    reload_registry()
    assert assemble(["loo-example"]).options == {"loo_scale": 1.5}  # the method's default over the plugin's
    assert assemble(["loo-example"], {"loo_scale": "3"}).options == {"loo_scale": 3.0}  # strings are converted
    with pytest.raises(OptionError, match=r"option 'loo_scale' \(plugin 'loo-example'\) rejects -1.0: advantage"):
        assemble(["loo-example"], {"loo_scale": -1})
    with pytest.raises(OptionError, match="'loo_scale' .*float"):
        assemble(["loo-example"], {"loo_scale": "big"})
    with pytest.raises(OptionError, match="unknown option 'loo_scal'. Did you mean 'loo_scale'"):
        assemble(["loo-example"], {"loo_scal": 2})
    with pytest.raises(OptionError, match="belongs to plugin 'loo-example'"):
        assemble(["grpo"], {"loo_scale": 2})


def test_autoload_can_be_disabled_and_allow_listed(loo_distribution, monkeypatch):
    monkeypatch.setenv("PO_REGISTRY_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "loo-example" not in Registry().methods
    monkeypatch.delenv("PO_REGISTRY_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("PO_REGISTRY_PLUGINS", "something-else")
    assert "loo-example" not in Registry().methods
    monkeypatch.setenv("PO_REGISTRY_PLUGINS", "po-registry-loo-example")  # by distribution name
    assert "loo-example" in Registry().methods
    monkeypatch.setenv("PO_REGISTRY_PLUGINS", "loo-example")  # by entry-point name
    assert "loo-example" in Registry().methods


def test_plugin_that_fails_to_import_is_reported(site):
    install_distribution(site, "po-registry-broken", "broken_plugin", "import not_a_module_anywhere\n",
                         {"broken": "broken_plugin"})
    registry = reload_registry()
    row = next(r for r in registry.describe() if r["name"] == "broken")
    assert row["distribution"] == "po-registry-broken"
    assert "ModuleNotFoundError" in row["error"] and "not_a_module_anywhere" in row["error"]
    with pytest.raises(UnknownMethodError, match="failed to load: broken .*ModuleNotFoundError"):
        assemble(["broken"])
    assemble(["grpo"])  # the rest keeps working


def test_unknown_method_lists_available_and_closest():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'grpoo'. Did you mean 'grpo'\? Available: (.*, )?grpo\b"):
        assemble(["grpoo"])
    with pytest.raises(CompositionError, match="listed twice"):
        assemble(["grpo", "grpo"])


class _Advantage:
    def __init__(self, name, method=None):
        self.name, self.method = name, method or name

    @hookimpl
    def po_register_methods(self, register):
        register(self.method, components=[self.name])

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        return batch.weighted_reward(rewards).nan_to_num(0.0)


class _Penalty:
    @hookimpl
    def po_register_methods(self, register):
        register("penalty", components=["penalty"], replaces=["reference-kl"])

    @hookimpl
    def po_token_penalty(self, batch):
        return None


def test_two_owners_of_a_single_owner_stage_is_an_error(plugins):
    plugins("adv-a", _Advantage("adv-a"))
    plugins("adv-b", _Advantage("adv-b"))
    assert assemble(["adv-a"]).owners["po_compute_advantages"] == ["adv-a"]  # takes over from the baseline
    with pytest.raises(CompositionError) as error:
        assemble(["adv-a", "adv-b"])
    message = str(error.value)
    assert "po_compute_advantages" in message and "'adv-a'" in message and "'adv-b'" in message


def test_composable_components_add_up_and_replace(plugins):
    plugins("penalty", _Penalty())
    assembly = assemble(["penalty"])
    assert assembly.owners["po_token_penalty"] == ["penalty"]  # reference-kl replaced
    assert assembly.owners["po_policy_objective"] == ["clip-objective"]  # everything else from the baseline
    assert "po_token_penalty (composable (sum)): penalty" in assembly.explain()


def test_method_registered_twice_is_a_load_fault(plugins):
    plugins("adv-a", _Advantage("adv-a", method="same-name"))
    plugins("adv-b", _Advantage("adv-b", method="same-name"))
    from po_registry import get_registry

    faults = {row["name"]: row["faults"] for row in get_registry().describe()}
    assert faults["adv-b"] == ["method 'same-name' is already registered by plugin 'adv-a'"]
    with pytest.raises(PluginLoadError, match="needs plugin 'adv-a', which has load faults: method 'same-name'"):
        assemble(["same-name"])


class _FutureApi(_Advantage):
    po_registry_api = 3


class _FormerApi(_Advantage):
    po_registry_api = 1


def test_plugin_for_an_unsupported_hookspec_version_is_listed_and_refused_only_when_needed(plugins):
    from po_registry import get_registry

    plugins("future", _FutureApi("future"))
    plugins("former", _FormerApi("former"))
    rows = {r["name"]: r for r in get_registry().describe()}
    assert rows["future"]["faults"] == ["written for hook specification version 3; this po-registry supports 2"]
    assert rows["former"]["faults"] == ["written for hook specification version 1; this po-registry supports 2 "
                                        "(version 2: po_setup receives a RunContext instead of the trainer, and "
                                        "po_aggregate_loss returns the micro-batch's loss unscaled (the pipeline "
                                        "divides by the accumulation steps))"]
    assemble(["grpo"])  # not needed: no error
    with pytest.raises(PluginLoadError, match="needs plugin 'future', which has load faults: written for hook"):
        assemble(["future"])


class _TriesFirst:
    @hookimpl
    def po_register_methods(self, register):
        register("eager", components=["eager"])

    @hookimpl(tryfirst=True)
    def po_compute_advantages(self, rewards, batch):
        return rewards.sum(1)


def test_a_hook_option_the_pipeline_does_not_honour_is_refused_at_registration(plugins):
    """Stages run in composition order: tryfirst would be ignored, so the plugin is refused and listed."""
    from po_registry import get_registry

    plugins("eager", _TriesFirst())
    row = next(r for r in get_registry().describe() if r["name"] == "eager")
    assert row["error"] == ("po_compute_advantages is marked tryfirst, which po-registry does not honour (stages run "
                            "in composition order; no implementation wraps another)")
    with pytest.raises(UnknownMethodError, match="unknown method 'eager'"):
        assemble(["eager"])
    assemble(["grpo"])  # the rest keeps working


class _MisDeclared(_Advantage):
    po_reads = ("token_reward",)
    po_importance_level = "row"


def test_component_attributes_are_checked_at_load(plugins):
    from po_registry import get_registry

    plugins("misdeclared", _MisDeclared("misdeclared"))
    row = next(r for r in get_registry().describe() if r["name"] == "misdeclared")
    assert row["faults"] == ["po_importance_level must be 'token' or 'sequence', got 'row'",
                             "po_reads names unknown fields ['token_reward']; known: ['token_rewards']"]
