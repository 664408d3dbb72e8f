"""Two CPU processes (gloo): global statistics stay global, and our trainer still equals TRL's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from po_registry.testing import free_port


def _two_processes(script: str, out: Path) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(Path(__file__).with_name(script)), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_match_grpo_trainer(tmp_path):
    result = _two_processes("multiprocess_parity.py", tmp_path)
    assert result["world_size"] == 2
    assert len(result["losses"]["ours"]) == 2
    assert result["losses"]["stock"] == pytest.approx(result["losses"]["ours"], abs=1e-6)
    assert result["max_param_diff"] <= 1e-6


def test_reward_side_methods_use_the_whole_batch_on_two_processes(tmp_path):
    """Each process computes the same advantages for all rows of both processes; batch-global statistics
    (REINFORCE++ and PPO whitening, RLOO's leave-one-out) hold over the gathered batch, not per process."""
    import torch

    result = _two_processes("multiprocess_reward_side.py", tmp_path)
    assert result["world_size"] == 2
    for method, (first, second) in result["methods"].items():
        assert len(first) == len(second) >= 1, method
        for mine, theirs in zip(first, second):
            assert mine["rows"] == 2 * mine["local_rows"], method
            assert torch.allclose(torch.tensor(mine["advantages"]), torch.tensor(theirs["advantages"]), atol=1e-6), method
        advantages, mask = torch.tensor(first[0]["advantages"]), torch.tensor(first[0]["mask"])
        if method in ("reinforce-pp-baseline", "ppo"):  # whitened over every loss token of both processes
            tokens = advantages[mask.bool()]
            assert tokens.mean().item() == pytest.approx(0.0, abs=1e-5), method
            assert tokens.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3), method
        if method == "ppo":  # the critic's fresh head is the main process's on both (broadcast at set-up)
            assert torch.equal(torch.tensor(first[0]["critic"]), torch.tensor(second[0]["critic"]))
        if method == "rloo":  # leave-one-out advantages sum to zero within each group
            assert advantages.view(-1, 4).sum(dim=1).abs().max().item() < 1e-5


def test_the_cli_under_torchrun_writes_one_run_and_resumes(tmp_path, model_cache):
    """`torchrun -m po_registry train`: one run directory written by the main process (one metrics row per step,
    one progress bar), and `--resume` under torchrun continues it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PO_REGISTRY_CACHE": str(model_cache)}

    def torchrun(*argv):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), "-m", "po_registry", "train", *argv]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = torchrun("--steps", "3", "--eval-every", "3", "--eval-size", "16")
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    assert first.stdout.count("wrote ") == 1 and first.stdout.count("before training") == 1
    torchrun("--resume", str(runs[0]), "--steps", "5", "--eval-every", "5")
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 3, 5]
    assert json.loads((runs[0] / "summary.json").read_text())["steps"] == 5


def test_detectors_report_once_under_torchrun(tmp_path, model_cache):
    """Two processes, one run: a provoked failure (a cap that truncates every completion) is reported once, by the
    main process, in metrics.jsonl, summary.json and on the console."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PO_REGISTRY_CACHE": str(model_cache)}
    (tmp_path / "cap.yaml").write_text("max_completion_length: 1\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "po_registry", "train", "--steps", "4", "--eval-every", "4", "--eval-size",
               "16", "--config", "cap.yaml", "--output-dir", "run"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["finding"]["failure"] for row in rows if "finding" in row] == ["zero-variance-groups", "truncation"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [f["failure"] for f in summary["findings"]] == ["zero-variance-groups", "truncation"]
    console = done.stdout + done.stderr
    assert console.count("warning: truncation (reward side) from step 1") == 1
    assert done.stdout.count("2 failure(s) detected") == 1
