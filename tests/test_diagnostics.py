"""Diagnostics: the failure vocabulary methods declare, detectors on hand-made histories and on provoked runs of
the embedded model, `po-registry diagnose` (findings, evidence, recommendations, compound failures) and `failures`."""

from __future__ import annotations

import json

import pytest
from test_cli import run_cli

from po_registry import hookimpl
from po_registry.diagnostics import DETECTORS, FAILURES, Diagnostics, Drift, Level, replay, resolve_limits
from po_registry.errors import OptionError
from po_registry.registry import get_registry

BUILTIN = {detector.name: detector for detector in DETECTORS}
VOCABULARY = {failure.name: failure for failure in FAILURES}


def _rows(metric, values, start=1):
    return [{"step": start + i, metric: value} for i, value in enumerate(values)]


def _found(rows, **thresholds):
    limits = resolve_limits(BUILTIN, None, thresholds)
    return {f.detector: f for f in replay(rows, BUILTIN, VOCABULARY, limits).findings}


# -- detectors on hand-made histories --------------------------------------------------------------------------


def test_a_level_detector_fires_once_the_window_mean_crosses_and_dates_the_first_crossing_value():
    # window 3, limit 0.9: means of (0.5, 0.95, 0.95) = 0.8, then (0.95, 0.95, 0.95) = 0.95 at step 4
    found = _found(_rows("frac_reward_zero_std", [0.5, 0.5, 0.95, 0.95, 0.95, 1.0]))
    finding = found["zero-variance-groups"]
    assert finding.step == 3 and finding.side == "reward" and finding.failure == "zero-variance-groups"
    assert finding.evidence == {"frac_reward_zero_std": [(3, 0.95), (4, 0.95), (5, 0.95)]}
    assert "averaged 0.95 over the last 3 logs (at least 0.9)" in finding.message
    assert "zero-variance-groups" not in _found(_rows("frac_reward_zero_std", [0.9, 0.95, 0.8, 0.9, 0.85]))


def test_a_drift_detector_compares_the_newest_window_with_the_first():
    # entropy-collapse: ratio 0.25 of the first window's mean 0.4 = 0.1, and at least 0.05 lower
    values = [0.4, 0.4, 0.4, 0.3, 0.2, 0.09, 0.08, 0.07]
    finding = _found(_rows("entropy", values))["entropy-collapse"]
    assert finding.step == 6 and finding.side == "trajectory"  # the first value at or under 0.1
    assert "from 0.4 (first 3 logs) to 0.08 (last 3): 0.20x, past 0.25x" in finding.message
    # a healthy fall (to half) is no collapse; a tiny entropy halving by less than min_change is none either
    assert not _found(_rows("entropy", [0.4, 0.4, 0.4, 0.2, 0.2, 0.2]))
    assert not _found(_rows("entropy", [0.04, 0.04, 0.04, 0.005, 0.005, 0.005]))
    # explosion: 3x the start and at least 0.3 higher
    assert _found(_rows("entropy", [0.3, 0.3, 0.3, 1.0, 1.0, 1.0]))["entropy-explosion"].step == 4


def test_reward_without_accuracy_is_judged_at_evaluations():
    rewards = _rows("reward", [0.2, 0.2, 0.2, 0.5, 0.6, 0.6])
    flat = [{"step": 0, "eval_accuracy": 0.5}, {"step": 6, "eval_accuracy": 0.5}]
    finding = _found([flat[0], *rewards, flat[1]])["reward-hacking"]
    assert finding.side == "reward" and finding.step == 4  # the first reward half-way up (0.2 + 0.4 / 2 = 0.4)
    assert "reward rose by +0.367 while held-out accuracy moved +0.0% (50.0% -> 50.0%)" in finding.message
    assert "reward-hacking" not in _found([flat[0], *rewards, {"step": 6, "eval_accuracy": 0.6}])
    assert "reward-hacking" not in _found([flat[0], *rewards])  # no second evaluation yet: not judged


def test_each_detector_fires_at_most_once_and_listeners_hear_it_when_it_fires():
    heard = []
    diagnostics = Diagnostics(BUILTIN, VOCABULARY, resolve_limits(BUILTIN, ["truncation"], None), [heard.append])
    for row in _rows("completions/clipped_ratio", [1.0] * 10):
        diagnostics.observe(row)
        assert len(heard) == (1 if row["step"] >= 3 else 0)
    assert [f.step for f in diagnostics.findings] == [1]


@pytest.mark.parametrize("metric", ["sampling/sampling_logp_difference/mean", "rollout_correction/clipped_fraction"])
def test_sampler_mismatch_reads_the_vllm_metric_or_rollout_corrections(metric):
    # Not provoked on the embedded model: TRL logs the first only with vLLM; the second needs sampler log-probs.
    assert _found(_rows(metric, [0.0, 0.3, 0.3, 0.3]))["sampler-mismatch"].step == 2


def test_teacher_divergence_watches_the_reverse_kl_to_the_teacher():
    # Hand-made history: the OPD runs of the test suite use a teacher equal to the student's start.
    assert _found(_rows("opd/reverse_kl", [0.1, 0.1, 0.1, 0.15, 0.3, 0.3, 0.3]))["teacher-divergence"].step == 5


def test_clip_saturation_reads_whichever_clip_metric_the_objective_logs():
    assert _found(_rows("cispo/clip_ratio", [0.3, 0.3, 0.3]))["clip-saturation"].evidence.keys() == {"cispo/clip_ratio"}


def test_thresholds_are_settable_and_bad_ones_are_named():
    rows = _rows("completions/clipped_ratio", [0.3, 0.3, 0.3])
    assert "truncation" not in _found(rows)
    assert _found(rows, truncation={"limit": 0.25})["truncation"].limits == {"limit": 0.25, "window": 3.0}
    with pytest.raises(OptionError, match=r"unknown detector 'truncaton'. Did you mean 'truncation'\?"):
        resolve_limits(BUILTIN, ["truncaton"], None)
    with pytest.raises(OptionError, match=r"detector 'truncation' has no threshold 'limt'. Did you mean 'limit'\?"):
        resolve_limits(BUILTIN, None, {"truncation": {"limt": 0.2}})
    with pytest.raises(OptionError, match=r"detector 'truncation': threshold 'limit' must be a number, got 'x'"):
        resolve_limits(BUILTIN, None, {"truncation": {"limit": "x"}})


def test_the_config_checks_detectors_before_training(tmp_path):
    from po_registry.config import PolicyOptimizationConfig

    def config(**fields):
        return PolicyOptimizationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)

    assert config(detectors="none").detector_limits() == {}
    assert set(config(detectors="truncation, kl-blowup").detector_limits()) == {"truncation", "kl-blowup"}
    assert config(detector_thresholds='{"kl-blowup": {"limit": 2}}').detector_limits()["kl-blowup"]["limit"] == 2.0
    with pytest.raises(OptionError, match="unknown detector 'entropy'"):
        config(detectors=["entropy"])


# -- the vocabulary: declared by methods, extended by plugins --------------------------------------------------


def test_every_method_but_the_baseline_and_maxrl_declares_what_it_fixes():
    registry = get_registry()
    assert not registry.faults
    undeclared = sorted(m.name for m in registry.methods.values() if not m.fixes)
    assert undeclared == ["grpo", "maxrl"]
    assert registry.methods["dapo"].fixes == ("entropy-collapse", "zero-variance-groups", "truncation", "length-drift")
    assert registry.methods["clip-higher"].risks == ("entropy-explosion",)
    assert registry.methods["dynamic-sampling"].risks == ("generation-cost",)
    assert {d.failure for d in registry.detectors.values()} <= set(registry.failures)


class _Repetition:
    """A third-party plugin: a failure mode, its detector, and a method that fixes it."""

    @hookimpl
    def po_register_failures(self, register):
        register("repetition", "reward", "completions repeat one phrase")

    @hookimpl
    def po_register_detectors(self, register):
        register(Level("repetition", "repetition", ("repetition/rate",), 0.5, "repeated phrases stay common"))

    @hookimpl
    def po_register_methods(self, register):
        register("anti-repeat", components=["group-advantage"], fixes=("repetition",))


class _Misdeclared:
    @hookimpl
    def po_register_methods(self, register):
        register("misdeclared", components=["group-advantage"], fixes=("entropy-colapse",))

    @hookimpl
    def po_register_detectors(self, register):
        register(Drift("shrinking", "shrinkage", "entropy", 0.5, "entropy halves"))


def test_plugins_add_failures_and_detectors_and_a_wrong_name_is_a_fault(plugins, capsys, tmp_path):
    plugins("repetition", _Repetition())
    plugins("misdeclared", _Misdeclared())
    registry = get_registry()
    assert registry.failures["repetition"].plugin == "repetition"
    assert registry.detectors["repetition"].failure == "repetition"
    assert registry.faults["misdeclared"] == [
        "method 'misdeclared': fixes names unknown failure(s) 'entropy-colapse' Did you mean 'entropy-collapse'?; "
        "see `po-registry failures`",
        "detector 'shrinking' reports unknown failure 'shrinkage'"]
    assert "shrinking" not in registry.detectors
    code, out, _ = run_cli(capsys, "failures")
    assert code == 0 and "repetition  [reward]  completions repeat one phrase" in out
    assert "fixed by:    anti-repeat" in out
    # a run logging the plugin's metric is diagnosed with the plugin's detector and method
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows("repetition/rate",
                                                                                        [0.6, 0.7, 0.8])))
    code, out, _ = run_cli(capsys, "diagnose", str(tmp_path), "--json")
    result = json.loads(out)
    assert [f["failure"] for f in result["findings"]] == ["repetition"]
    assert result["findings"][0]["recommended"][0]["method"] == "--method anti-repeat"


# -- provoked failures on the embedded model, through the command line -----------------------------------------

REWARDS = '''
def constant(completions, **kwargs):
    return [1.0 for _ in completions]


def wrong(completions, answer, **kwargs):
    return [0.0 if text.strip() == target else 1.0 for text, target in zip(completions, answer)]


def longer(completions, **kwargs):
    return [len(text) / 10 for text in completions]
'''


def _provoke(capsys, tmp_path, name, *argv, config=None):
    """A short embedded run with ``argv``; returns its summary's findings by failure, and its directory."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    run_dir = tmp_path / name
    extra = []
    if config:
        (tmp_path / f"{name}.yaml").write_text(config)
        extra = ["--config", str(tmp_path / f"{name}.yaml")]
    code, out, err = run_cli(capsys, "train", "--eval-size", "64", "--eval-every", "5", "--output-dir", str(run_dir),
                             *extra, *[a.replace("REWARDS", str(tmp_path / "rewards.py")) for a in argv])
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    found = {f["failure"]: f for f in summary["findings"]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [row["finding"]["failure"] for row in rows if "finding" in row]
    assert logged == [f["failure"] for f in summary["findings"]]  # each written to metrics.jsonl once, as it fired
    if found:
        assert "failure(s) detected" in out
    return found, run_dir


def test_a_cap_that_truncates_everything(capsys, tmp_path):
    found, _ = _provoke(capsys, tmp_path, "truncated", "--steps", "5", config="max_completion_length: 1\n")
    assert found["truncation"]["step"] == 1 and found["truncation"]["side"] == "reward"
    assert "completions/clipped_ratio averaged 1 over the last 3 logs" in found["truncation"]["message"]


def test_a_constant_reward_and_the_refills_it_costs(capsys, tmp_path):
    found, _ = _provoke(capsys, tmp_path, "constant", "--steps", "4", "--reward", "REWARDS:constant")
    assert set(found) == {"zero-variance-groups"} and found["zero-variance-groups"]["step"] == 1
    found, _ = _provoke(capsys, tmp_path, "refills", "--steps", "3", "--method", "dapo", "--reward", "REWARDS:constant")
    assert set(found) == {"zero-variance-groups", "generation-cost"}
    assert "dynamic_sampling/extra_rounds averaged 4" in found["generation-cost"]["message"]


def test_too_many_updates_per_generation_saturate_the_clip(capsys, tmp_path):
    found, _ = _provoke(capsys, tmp_path, "clipped", "--steps", "8", "--learning-rate", "0.002",
                        config="num_iterations: 4\nepsilon: 0.02\n")
    assert set(found) == {"clip-saturation"} and found["clip-saturation"]["step"] == 2  # the first reused batch


def test_a_kl_that_blows_up(capsys, tmp_path):
    found, _ = _provoke(capsys, tmp_path, "kl", "--steps", "10", "--learning-rate", "0.005", config="beta: 0.04\n")
    assert set(found) == {"kl-blowup"} and found["kl-blowup"]["side"] == "trajectory"


def test_a_reward_for_wrong_answers_is_hacked(capsys, tmp_path):
    found, _ = _provoke(capsys, tmp_path, "hacked", "--steps", "10", "--learning-rate", "0.002",
                        "--reward", "REWARDS:wrong")
    assert "reward-hacking" in found and "held-out accuracy moved -" in found["reward-hacking"]["message"]


def test_a_length_reward_drifts_then_collapses_entropy(capsys, tmp_path):
    found, run_dir = _provoke(capsys, tmp_path, "long", "--steps", "40", "--learning-rate", "0.008",
                              "--reward", "REWARDS:longer", config="max_completion_length: 16\n")
    assert {"length-drift", "truncation", "reward-hacking", "entropy-collapse"} <= set(found)
    assert found["length-drift"]["step"] < found["entropy-collapse"]["step"]
    # diagnose: a compound failure (length drift on the trajectory side, truncation on the reward side)
    code, out, err = run_cli(capsys, "diagnose", str(run_dir), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {f["failure"] for f in result["findings"]} == set(found)
    compound = result["compound"]
    assert set(compound["trajectory"]) == {"length-drift", "entropy-collapse"}
    assert set(compound["reward"]) >= {"truncation", "reward-hacking"}
    first = compound["recommended"][0]
    assert {"length-drift", "truncation", "entropy-collapse"} <= set(first["fixes"])
    from po_registry.pipeline import assemble

    for choice in compound["recommended"]:  # each is a ready --method value that assembles
        assemble(choice["method"].removeprefix("--method ").split(","))
    for entry in result["findings"]:
        assert open(entry["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "diagnosis" / "report.md").read_text()
    assert "## Compound failure" in report and "![length-drift](length-drift.png)" in report


def test_a_learning_rate_too_high_explodes_entropy_and_diagnose_names_both_sides(capsys, tmp_path):
    found, run_dir = _provoke(capsys, tmp_path, "hot", "--steps", "12", "--learning-rate", "0.02")
    assert {"entropy-explosion", "zero-variance-groups", "truncation"} <= set(found)
    code, out, _ = run_cli(capsys, "diagnose", str(run_dir))
    assert code == 0
    assert "compound failure: entropy-explosion (trajectory side) with zero-variance-groups" in out
    assert "--method dynamic-sampling,kl,overlong-filter  covers" in out
    # the same run read with a detector switched off and a threshold raised
    code, out, _ = run_cli(capsys, "diagnose", str(run_dir), "--json", "--detectors", "truncation",
                           "--threshold", "truncation.limit=0.99", "--out", str(tmp_path / "elsewhere"))
    assert code == 0 and json.loads(out)["findings"] == [] and (tmp_path / "elsewhere" / "report.md").exists()


def test_diagnose_reads_a_plain_trl_run(capsys, tmp_path):
    """A TRL output directory: trainer_state.json's log_history, from the newest checkpoint."""
    history = [{"step": s, "entropy": e, "reward": 0.5} for s, e in enumerate([0.5, 0.5, 0.5, 2.0, 2.0, 2.0], 1)]
    for step, rows in ((3, history[:3]), (6, history)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": rows}))
    code, out, _ = run_cli(capsys, "diagnose", str(tmp_path), "--json")
    result = json.loads(out)
    assert code == 0 and result["source"].endswith("checkpoint-6/trainer_state.json")
    assert [f["failure"] for f in result["findings"]] == ["entropy-explosion"]
    assert result["findings"][0]["recommended"][0]["method"] in ("--method kl", "--method kl-reward")


def test_bad_diagnose_input_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "diagnose", str(tmp_path / "missing"))
    assert code == 2
    assert err.strip() == f"po-registry diagnose: error: {tmp_path / 'missing'}: no such run directory or file"
    code, _, err = run_cli(capsys, "diagnose", str(tmp_path))
    assert code == 2 and "no metrics.jsonl (a po-registry run) or trainer_state.json (a TRL run)" in err
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    code, _, err = run_cli(capsys, "diagnose", str(tmp_path), "--detectors", "nope")
    assert code == 2 and err.strip().startswith("po-registry diagnose: error: unknown detector 'nope'")
    code, _, err = run_cli(capsys, "diagnose", str(tmp_path), "--threshold", "truncation=3")
    assert code == 2 and "expected DETECTOR.THRESHOLD=NUMBER" in err
