"""Bad input wherever a user types: one line on stderr, exit code 2, nothing written (docs/bad-input.md lists the
cases); interrupted runs leave a checkpoint that resumes; a resumed run keeps what it is."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

# id -> (files to create {name: text}, argv ("{tmp}" is the test's folder), a fragment of the one-line message)
TRAIN_CASES = {
    "yaml-temperature-zero": ({"c.yaml": "temperature: 0\n"}, ["--config", "{tmp}/c.yaml"],
                              "temperature must be > 0, got 0"),
    "yaml-learning-rate-word": ({"c.yaml": "learning_rate: fast\n"}, ["--config", "{tmp}/c.yaml"],
                                "learning_rate must be a positive number, got 'fast'"),
    "yaml-learning-rate-negative": ({"c.yaml": "learning_rate: -1.0e-4\n"}, ["--config", "{tmp}/c.yaml"],
                                    "learning_rate must be a positive number, got -0.0001"),
    "yaml-one-generation": ({"c.yaml": "num_generations: 1\n"}, ["--config", "{tmp}/c.yaml"],
                            "num_generations must be >= 2, got 1"),
    "yaml-zero-batch": ({"c.yaml": "per_device_train_batch_size: 0\n"}, ["--config", "{tmp}/c.yaml"],
                        "per_device_train_batch_size must be >= 1, got 0"),
    "yaml-top-p-above-one": ({"c.yaml": "top_p: 2\n"}, ["--config", "{tmp}/c.yaml"], "top_p must be in (0, 1], got 2"),
    "yaml-negative-beta": ({"c.yaml": "beta: -0.1\n"}, ["--config", "{tmp}/c.yaml"], "beta must be >= 0, got -0.1"),
    "yaml-negative-completion-length": ({"c.yaml": "max_completion_length: -3\n"}, ["--config", "{tmp}/c.yaml"],
                                        "max_completion_length must be >= 1, got -3"),
    "yaml-nan-epsilon": ({"c.yaml": "epsilon: .nan\n"}, ["--config", "{tmp}/c.yaml"], "epsilon must be > 0, got nan"),
    "yaml-unknown-scheduler": ({"c.yaml": "lr_scheduler_type: sometimes\n"}, ["--config", "{tmp}/c.yaml"],
                               "sometimes is not a valid SchedulerType"),
    "yaml-steps-word": ({"c.yaml": "steps: ten\n"}, ["--config", "{tmp}/c.yaml"],
                        "steps must be a positive integer, got 'ten'"),
    "yaml-bool-steps": ({"c.yaml": "steps: true\n"}, ["--config", "{tmp}/c.yaml"],
                        "steps must be a positive integer, got True"),
    "yaml-method-number": ({"c.yaml": "method: 3\n"}, ["--config", "{tmp}/c.yaml"],
                           "method must be a name or a list of names, got 3"),
    "yaml-no-lora-word": ({"c.yaml": "no_lora: maybe\n"}, ["--config", "{tmp}/c.yaml"],
                          "no_lora must be true or false, got 'maybe'"),
    "yaml-output-dir": ({"c.yaml": "output_dir: elsewhere\n"}, ["--config", "{tmp}/c.yaml"],
                        "output_dir is chosen with --output-dir"),
    "yaml-not-a-mapping": ({"c.yaml": "- steps\n"}, ["--config", "{tmp}/c.yaml"], "expected a mapping"),
    "yaml-broken": ({"c.yaml": "steps: [1\n"}, ["--config", "{tmp}/c.yaml"], "invalid YAML"),
    "yaml-beta-list": ({"c.yaml": "beta: [1, 2]\n"}, ["--config", "{tmp}/c.yaml"], "beta must be float, got [1, 2]"),
    "flag-learning-rate-negative": ({}, ["--learning-rate", "-1"], "expected a positive number, got '-1'"),
    "flag-learning-rate-zero": ({}, ["--learning-rate", "0"], "expected a positive number, got '0'"),
    "flag-learning-rate-inf": ({}, ["--learning-rate", "inf"], "expected a positive number, got 'inf'"),
    "flag-seed-negative": ({}, ["--seed", "-3"], "expected an integer in [0, 2**32), got '-3'"),
    "flag-eval-size-zero": ({}, ["--eval-size", "0"], "expected a positive integer, got '0'"),
    "option-unknown": ({}, ["--option", "nope=1"], "unknown option 'nope'"),
    "flag-detector-unknown": ({}, ["--detectors", "entropy"], "unknown detector 'entropy'"),
    "flag-threshold-malformed": ({}, ["--threshold", "truncation=0.3"], "expected DETECTOR.THRESHOLD=NUMBER"),
    "flag-threshold-unknown": ({}, ["--threshold", "truncation.limt=0.3"],
                               "detector 'truncation' has no threshold 'limt'. Did you mean 'limit'?"),
    "yaml-detector-thresholds-not-a-mapping": ({"c.yaml": "detector_thresholds: {truncation: 3}\n"},
                                               ["--config", "{tmp}/c.yaml"],
                                               "detector_thresholds['truncation'] must map threshold names"),
    "dense-rewards-with-a-per-sequence-estimator": (
        {}, ["--method", "process-reward,rloo", "--option", "process_reward_function=po_registry.oracle:a_steps"],
        "dense token rewards of plugin 'process-reward' (from method 'process-reward') would be dropped"),
    "dataset-empty": ({"d.jsonl": ""}, ["--dataset", "{tmp}/d.jsonl"], "d.jsonl: the file is empty"),
    "dataset-chat-messages": ({"d.jsonl": '{"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"}\n' * 12},
                              ["--dataset", "{tmp}/d.jsonl"], "its prompts are chat messages; they need a --model whose "
                              "tokenizer has a chat template"),
    "dataset-chat-not-messages": ({"d.jsonl": '{"prompt": ["1+1"], "answer": "2"}\n' * 12},
                                  ["--dataset", "{tmp}/d.jsonl"], "row 1: a chat prompt is a list of {role, content}"),
    "dataset-empty-prompt": ({"d.csv": "prompt,answer\n" + "1+1=,2\n" * 5 + ",3\n" + "1+2=,3\n" * 5},
                             ["--dataset", "{tmp}/d.csv"], "row 6: empty prompt or answer"),
    "reward-module-raises": ({"raising_reward.py": "x = 1 / 0\n"}, ["--reward", "raising_reward:r"],
                             "importing it raised ZeroDivisionError: division by zero"),
    "reward-file-missing": ({}, ["--reward", "{tmp}/nowhere.py:r"], "no such file"),
    "reward-function-missing": ({"some_reward.py": "def other(completions, **kw):\n    return []\n"},
                                ["--reward", "{tmp}/some_reward.py:r"], "AttributeError"),
    "output-dir-is-a-file": ({"taken": "x"}, ["--output-dir", "{tmp}/taken"], "taken is a file"),
}


def _materialise(tmp_path, files, argv):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return [part.replace("{tmp}", str(tmp_path)) for part in argv]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=list(TRAIN_CASES))
def test_bad_train_input(capsys, tmp_path, monkeypatch, case):
    files, argv, message = TRAIN_CASES[case]
    monkeypatch.chdir(tmp_path)  # a reward module in the current directory must be found
    argv = _materialise(tmp_path, files, argv)
    out_dir = tmp_path / "run"
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(out_dir)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, "train", *argv)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing may be written on bad input"


EVAL_CASES = {
    "eval-adapter-missing": ({}, ["--adapter", "{tmp}/nowhere"], "no adapter_config.json there"),
    "eval-adapter-without-weights": ({"adapter/adapter_config.json": "{}"}, ["--adapter", "{tmp}/adapter"],
                                     "no adapter weights there"),
    "eval-adapter-hub-base": ({"adapter/adapter_config.json": '{"base_model_name_or_path": "org/model"}',
                               "adapter/adapter_model.safetensors": ""}, ["--adapter", "{tmp}/adapter"],
                              "its base model org/model is not a local model directory; pass --model"),
    "eval-dataset-missing": ({}, ["--dataset", "{tmp}/nowhere.csv"], "--dataset {tmp}/nowhere.csv: no such file"),
    "eval-unknown-task": ({}, ["--task", "additon"], "unknown task 'additon'"),
    "eval-model-missing": ({}, ["--model", "{tmp}/nowhere"], "not a model directory"),
}


@pytest.mark.parametrize("case", EVAL_CASES, ids=list(EVAL_CASES))
def test_bad_eval_input(capsys, tmp_path, case):
    files, argv, message = EVAL_CASES[case]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    argv = _materialise(tmp_path, files, argv)
    code, _, err = run_cli(capsys, "eval", *argv)
    assert code == 2 and err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err, err


def test_every_case_is_in_the_docs_table():
    table = (ROOT / "docs" / "bad-input.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", table, re.M))
    assert listed == set(TRAIN_CASES) | set(EVAL_CASES) | set(RUN_CASES)


def test_python_api_errors_are_po_registry_errors(tmp_path):
    from po_registry import PolicyOptimizationConfig
    from po_registry.errors import OptionError, PORegistryError

    for fields, message in [({"temperature": 0.0}, "temperature must be > 0"),
                            ({"learning_rate": "1e-4"}, "learning_rate must be a number > 0, got '1e-4'"),
                            ({"max_steps": 0}, "max_steps must be a positive integer"),
                            ({"lr_scheduler_type": "sometimes"}, "invalid trainer setting"),
                            ({"num_generations": 3, "per_device_train_batch_size": 4}, "invalid trainer setting")]:
        with pytest.raises(OptionError, match=re.escape(message)) as caught:
            PolicyOptimizationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **fields)
        assert isinstance(caught.value, PORegistryError)


def test_yaml_numbers_pyyaml_reads_as_strings_are_numbers(tmp_path):
    from po_registry.cli import build_parser
    from po_registry.run import resolve_settings

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nepsilon: 2e-1\n")  # YAML 1.1: both are strings to PyYAML
    run, trainer, _ = resolve_settings(build_parser().parse_args(["train", "--config", str(config)]))
    assert run["learning_rate"] == 1e-4 and trainer["epsilon"] == 0.2


# -- runs that train ------------------------------------------------------------------------------------------

RUN_CASES = {
    "resume-with-another-method": "the run was trained with method grpo; --method ppo would change it",
    "resume-with-output-dir": "--output-dir cannot be given with it",
    "interrupted-run": "SIGINT at step N: checkpoint saved, exit 130; --resume finishes the run",
    "reward-module-in-cwd": "a module:function in the current directory trains",
}


def _po_registry(*argv, cwd, env_cache):
    env = {**os.environ, "PO_REGISTRY_CACHE": env_cache, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "po_registry", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_interrupted_run_saves_a_checkpoint_and_resumes(tmp_path, model_cache, capsys):
    run_dir = tmp_path / "run"
    # Build the warm start in this process first, so the child starts training at once.
    code, _, err = run_cli(capsys, "eval", "--eval-size", "8")
    assert code == 0, err
    child = _po_registry("train", "--steps", "60", "--eval-every", "100", "--eval-size", "16",
                         "--output-dir", str(run_dir), cwd=tmp_path, env_cache=str(model_cache))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and sum('"reward"' in line for line in metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=240)
    assert child.returncode == 130, err
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert 4 <= stopped < 60 and summary["interrupted"] == "SIGINT"
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped}").is_dir()
    assert f"Continue with: po-registry train --resume {run_dir}" in err

    # Resuming with another method would train a different run on this checkpoint: refused.
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--method", "ppo")
    assert code == 2 and RUN_CASES["resume-with-another-method"] in err, err
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "--output-dir", str(tmp_path / "x"))
    assert code == 2 and RUN_CASES["resume-with-output-dir"] in err, err

    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert code == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and "interrupted" not in summary
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "reward" in r) == list(range(1, 61))


def test_a_reward_module_in_the_current_directory_trains(capsys, tmp_path, monkeypatch):
    (tmp_path / "local_reward.py").write_text(
        "def length_reward(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code, _, err = run_cli(capsys, "train", "--reward", "local_reward:length_reward", "--steps", "1",
                           "--eval-every", "1", "--eval-size", "8", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reward", 0) > 0 for r in rows)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(capsys, tmp_path, monkeypatch):
    from po_registry import trainer as trainer_module

    def broken(self, *args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(trainer_module.PolicyOptimizationTrainer, "train", broken)
    with pytest.raises(RuntimeError, match="device fell over"):
        run_cli(capsys, "train", "--steps", "2", "--eval-size", "8", "--output-dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert "nothing was written" in capsys.readouterr().err
