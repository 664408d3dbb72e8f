"""The main job as a new user runs it: ``po-registry train`` with no arguments, once per seed.

The first run starts from an empty model cache, so its wall time includes building the embedded warm start, as on
a fresh machine; the later seeds reuse that warm start. Prints, per seed, held-out greedy accuracy before and after,
the seconds of RL and of the whole command, and checks that no held-out prompt is among the training prompts.

    python benchmarks/main_job.py                 # seeds 0 1 2, ~3 min on 2 cores
    python benchmarks/main_job.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(seed: int, run_dir: Path, cache: Path) -> dict:
    command = [sys.executable, "-m", "po_registry", "train", "--seed", str(seed), "--output-dir", str(run_dir)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PO_REGISTRY_CACHE": str(cache)})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def overlap() -> tuple[int, int]:
    """(training prompts that are also held-out prompts, distinct held-out prompts) for the default task."""
    from po_registry.registry import get_task

    task = get_task("addition")
    held_out = {prompt for prompt, _ in task.eval_problems()}
    return len(held_out & set(task.dataset()["prompt"])), len(held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    shared, distinct = overlap()
    print(f"held-out prompts: {distinct} distinct, {shared} of them among the training prompts")
    runs = []
    with tempfile.TemporaryDirectory(prefix="po-main-job-") as tmp:
        for seed in args.seeds:
            summary = train(seed, Path(tmp) / f"seed{seed}", Path(tmp) / "cache")
            runs.append(summary)
            print(f"seed {seed}: {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}, "
                  f"{summary['seconds']:.0f} s of RL, {summary['wall_seconds']:.0f} s in all"
                  + (" (warm start built)" if len(runs) == 1 else ""), flush=True)

    after = [r["accuracy_after"] for r in runs]
    print(f"\npo-registry train, seeds {args.seeds}: held-out greedy accuracy "
          f"{statistics.mean(r['accuracy_before'] for r in runs):.1%} -> {statistics.mean(after):.1%} "
          f"(min {min(after):.1%}, max {max(after):.1%}); RL {statistics.mean(r['seconds'] for r in runs):.0f} s "
          f"a run; first run, warm start included: {runs[0]['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
