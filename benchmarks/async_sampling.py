"""Asynchronous sampling against the synchronous trainer, in one run: the main job (``po-registry train``) with
``async_staleness`` unset, 0, 1 and 2 (1 and 2 with ``rollout-correction``), per seed. Prints held-out greedy
accuracy before and after, the seconds of RL, their ratio to the synchronous run of the same seed, and the mean time
a step waited for its batch (``async/wait_seconds``).

    python benchmarks/async_sampling.py               # seeds 0 1 2, ~3 min on 2 cores
    python benchmarks/async_sampling.py --seeds 0 --steps 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {  # name: (async_staleness or None, extra train arguments)
    "sync": (None, []),
    "k=0": (0, []),
    "k=1 + correction": (1, ["--method", "grpo,rollout-correction", "--option", "rollout_correction_mode=token_truncate"]),
    "k=2 + correction": (2, ["--method", "grpo,rollout-correction", "--option", "rollout_correction_mode=token_truncate"]),
}


def train(seed: int, steps: int, staleness: int | None, extra: list[str], run_dir: Path) -> dict:
    command = [sys.executable, "-m", "po_registry", "train", "--seed", str(seed), "--steps", str(steps),
               "--output-dir", str(run_dir), *extra]
    if staleness is not None:
        config = run_dir.with_suffix(".yaml")
        config.write_text(f"async_staleness: {staleness}\n")
        command += ["--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    waits = [row["async/wait_seconds"] for row in rows if "async/wait_seconds" in row]
    summary["wait"] = statistics.mean(waits) if waits else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="po-async-") as tmp:
        for seed in args.seeds:
            for name, (staleness, extra) in SETTINGS.items():
                run = train(seed, args.steps, staleness, extra, Path(tmp) / f"{name.replace(' ', '_')}-{seed}")
                results[name].append(run)
                ratio = run["seconds"] / results["sync"][-1]["seconds"]
                wait = f", waited {run['wait'] * 1000:.0f} ms a step" if run["wait"] is not None else ""
                print(f"seed {seed} {name:17s} {run['accuracy_before']:.1%} -> {run['accuracy_after']:.1%}, "
                      f"{run['seconds']:.1f} s of RL (x{ratio:.2f} of sync){wait}", flush=True)
    print("\nmean over seeds:")
    for name, runs in results.items():
        after = statistics.mean(r["accuracy_after"] for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        print(f"  {name:17s} {after:.1%} after {args.steps} steps, {seconds:.1f} s of RL "
              f"(x{seconds / statistics.mean(r['seconds'] for r in results['sync']):.2f})")


if __name__ == "__main__":
    main()
