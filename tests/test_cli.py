"""The `po-registry` command: the main job end to end, the browsers, and every bad-input case."""

from __future__ import annotations

import json

import pytest

from po_registry import hookimpl
from po_registry.cli import build_parser, main
from po_registry.ops import group_mean


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_on_every_command(capsys):
    for command in ([], ["train"], ["eval"], ["plugins"], ["methods"], ["explain"], ["diagnose"], ["failures"],
                    ["tasks"], ["new-plugin"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: po-registry" in capsys.readouterr().out


BAD_TRAIN_ARGS = {
    "non-numeric steps": (["--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    "zero steps": (["--steps", "0"], "expected a positive integer, got '0'"),
    "unknown flag": (["--stepz", "3"], "unrecognized arguments: --stepz 3"),
    "unknown method": (["--method", "grpoo"], "unknown method 'grpoo'. Did you mean 'grpo'?"),
    "unknown task": (["--task", "additon"], "unknown task 'additon'. Did you mean 'addition'?"),
    "missing dataset": (["--dataset", "nowhere.csv"], "--dataset nowhere.csv: no such file"),
    "unknown option": (["--option", "clip=0.1"], "unknown option 'clip'"),
    "bad option syntax": (["--option", "clip"], "expected KEY=VALUE, got 'clip'"),
    "lora and no-lora": (["--lora-r", "8", "--no-lora"], "not allowed with argument"),
    "bad reward": (["--reward", "no_module_here:f"], "--reward 'no_module_here:f': ModuleNotFoundError"),
    "missing config": (["--config", "nowhere.yaml"], "--config nowhere.yaml: no such file"),
    "missing model": (["--model", "nowhere"], "--model nowhere: not a model directory"),
}


@pytest.mark.parametrize("argv, message", BAD_TRAIN_ARGS.values(), ids=BAD_TRAIN_ARGS.keys())
def test_bad_train_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--output-dir", str(out_dir), *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out_dir.exists(), "nothing may be written on bad input"


def _dataset_case(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
    return str(path)


def test_bad_datasets(capsys, tmp_path):
    cases = [
        ("no_answer.csv", "prompt,target\n1+1=,2\n", "missing column(s) answer (has prompt, target)"),
        ("broken.parquet", b"this is not parquet", "cannot be read"),
        ("data.xlsx", "x", "unsupported format '.xlsx'"),
        ("tiny.csv", "prompt,answer\n1+1=,2\n", "1 rows; at least 10 are needed"),
    ]
    for name, content, message in cases:
        out_dir = tmp_path / f"run-{name}"
        code, _, err = run_cli(capsys, "train", "--dataset", _dataset_case(tmp_path, name, content),
                               "--output-dir", str(out_dir))
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not out_dir.exists()


def test_bad_yaml_and_resume(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stepz: 3\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--output-dir", str(tmp_path / "a"))
    assert code == 2 and "unknown setting 'stepz'. Did you mean 'steps'?" in err
    config.write_text("beta: [1, 2]\nsteps: 5\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--output-dir", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 2 and "not a run directory (no config.yaml)" in err
    # Settings but no checkpoint (killed before its first one): nothing was trained, so it trains from step 0.
    (tmp_path / "config.yaml").write_text("steps: 1\neval_every: 1\neval_size: 8\n")
    code, out, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert code == 0 and "no checkpoint yet; training the run from step 0" in out, err
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1


def test_plugins_methods_explain_tasks(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    rows = json.loads(out)
    assert code == 0 and {"grpo", "clip-objective", "group-advantage"} <= {r["name"] for r in rows}
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "grpo  [both]" in out and "reward side:      group-advantage" in out
    code, out, _ = run_cli(capsys, "methods", "--json")
    grpo = next(r for r in json.loads(out) if r["method"] == "grpo")
    assert "clip-objective" in grpo["components"]["trajectory"]
    code, out, _ = run_cli(capsys, "explain", "grpo")
    assert code == 0 and "po_policy_objective (single owner): clip-objective" in out and "valid" in out
    code, out, _ = run_cli(capsys, "explain", "grpo", "nope")
    assert code == 2 and "composition: INVALID: unknown method 'nope'" in out
    code, listed, _ = run_cli(capsys, "explain", "rloo,kl-cov", "--option", "kl_cov_coef=0.5")
    code2, spaced, _ = run_cli(capsys, "explain", "rloo", "kl-cov", "--option", "kl_cov_coef=0.5")
    assert code == code2 == 0 and listed == spaced  # the comma list train's --method takes, or separate names
    assert "kl_cov_coef = 0.5 (user)" in listed and "kl_cov_fraction = 0.002 (default)" in listed
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and all(name in out for name in ("addition", "reverse", "count"))


def test_main_job_raises_accuracy_and_writes_a_loadable_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--steps", "40", "--output-dir", str(run_dir))
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.03, summary
    assert 0.4 <= summary["accuracy_before"] <= 0.65  # the warm start gives RL a signal and room
    assert summary["findings"] == []  # a healthy run: no detector fires
    assert {"adapter", "metrics.jsonl", "plot.png", "config.yaml", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("reward" in r for r in rows) == 40 and [r["step"] for r in rows if "eval_accuracy" in r] == [0, 20, 40]
    assert "greedy accuracy" in out

    # The adapter loads with peft and reproduces the logged accuracy.
    code, out, _ = run_cli(capsys, "eval", "--adapter", str(run_dir / "adapter"), "--json")
    assert code == 0 and json.loads(out)["accuracy"] == pytest.approx(summary["accuracy_after"], abs=2 / 512)

    # The saved config reproduces the settings; a second run into the same directory is refused.
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["steps"] == 40 and saved["method"] == ["grpo"] and saved["learning_rate"] == 5e-4
    code, _, err = run_cli(capsys, "train", "--output-dir", str(run_dir))
    assert code == 2 and "already holds a run" in err

    # --resume continues from the last checkpoint to the new step count.
    code, out, err = run_cli(capsys, "train", "--resume", str(run_dir), "--steps", "45")
    assert code == 0, err
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["steps"] == 45 and resumed["accuracy_before"] == summary["accuracy_before"]


def test_train_on_a_dataset_file_full_fine_tuning(capsys, tmp_path):
    from po_registry.registry import get_task

    rows = get_task("count").problems(60, seed=5)
    path = tmp_path / "count.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", str(path), "--task", "count", "--no-lora", "--steps", "3",
                             "--eval-every", "3", "--output-dir", str(run_dir), "--method", "grpo")
    assert code == 0, err
    assert (run_dir / "model" / "config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "count.jsonl" and summary["lora"] is False and summary["steps"] == 3


@pytest.mark.slow
def test_default_job_as_the_readme_describes(capsys, tmp_path):
    """`po-registry train` with defaults: about 54% -> above 70% held-out greedy accuracy in 150 steps."""
    code, _, err = run_cli(capsys, "train", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["accuracy_after"] >= 0.7, summary
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.1, summary
    assert summary["findings"] == [], summary  # the default job is healthy: no detector fires


class _TaskAndOption:
    """A plugin that adds a task and a method with an option."""

    @hookimpl
    def po_register_tasks(self, register):
        from po_registry.tasks import Task

        register(Task("double", "double a digit: 'dbl 3=' -> '6'", _double, 4))

    @hookimpl
    def po_register_methods(self, register):
        register("scaled", components=["task-and-option"])

    @hookimpl
    def po_declare_options(self, register):
        register("advantage_scale", 1.0, type=float, check=lambda v: v > 0, help="must be > 0")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards).nan_to_num(0.0)
        return (total - group_mean(total, batch.group_size)) * batch.options["advantage_scale"]


def _double(rng):
    digit = rng.randint(0, 9)
    return f"dbl {digit}=", str(2 * digit)


def test_plugins_add_tasks_and_options_reach_them_from_flags_and_yaml(capsys, tmp_path, plugins):
    plugins("task-and-option", _TaskAndOption())
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "double: double a digit" in out
    code, out, _ = run_cli(capsys, "explain", "scaled", "--option", "advantage_scale=2")
    assert code == 0 and "advantage_scale = 2.0 (user)" in out
    code, _, err = run_cli(capsys, "train", "--method", "scaled", "--option", "advantage_scale=-1",
                           "--output-dir", str(tmp_path / "bad"))
    assert code == 2 and "option 'advantage_scale' (plugin 'task-and-option') rejects -1.0: must be > 0" in err
    config = tmp_path / "run.yaml"
    config.write_text("method: scaled\ntask: double\nsteps: 2\neval_every: 2\neval_size: 16\n"
                      "per_device_train_batch_size: 16\nmethod_options:\n  advantage_scale: 3\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--output-dir", str(tmp_path / "run"),
                           "--model", _embedded_addition_model())
    assert code == 0, err
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method_options"] == {"advantage_scale": 3.0} and saved["task"] == "double"


def _embedded_addition_model() -> str:
    from po_registry.embedded import embedded_model_dir
    from po_registry.registry import get_task

    return str(embedded_model_dir(get_task("addition")))
