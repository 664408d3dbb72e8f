"""Greedy accuracy of methods on the embedded task at an equal number of optimizer steps.

Each (method, seed) pair is one run of the main job (``po-registry train``: the embedded model, LoRA r16, the
default task and steps); the script reads each run's summary and accuracy curve, prints a table of held-out greedy
accuracy before and after (mean and per seed) and seconds per run, and plots the mean accuracy curves in one figure.

    python benchmarks/method_accuracy.py                                     # grpo vs ppo, 3 seeds, ~6 min
    python benchmarks/method_accuracy.py --methods grpo ppo vapo rloo remax --seeds 0 1 --steps 150
    python benchmarks/method_accuracy.py --methods grpo "ppo --option ppo_critic_lr=3e-4"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(method: str, seed: int, steps: int, out: Path, task: str) -> dict:
    name, *extra = shlex.split(method)
    run_dir = out / f"{name}-{seed}-{abs(hash(method)) % 10_000}"
    command = [sys.executable, "-m", "po_registry.cli", "train", "--method", name, "--seed", str(seed),
               "--steps", str(steps), "--task", task, "--output-dir", str(run_dir), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary["curve"] = [(row["step"], row["eval_accuracy"]) for row in rows if "eval_accuracy" in row]
    return summary


def label(method: str) -> str:
    """The method's name without its flags."""
    return method.split(" --")[0]


def compare(methods: list[str], seeds: list[int], steps: int, task: str, plot_path: str, title: str = "") -> dict:
    """Run every (method, seed), print the table and draw the mean accuracy curves; returns the summaries."""
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="po-bench-") as tmp:
        for seed in seeds:  # seeds outermost, so that machine load drifts alike over the methods
            for method in methods:
                summary = run(method, seed, steps, Path(tmp), task)
                results.setdefault(method, []).append(summary)
                print(f"{label(method):24s} seed {seed}: {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%}"
                      f" ({summary['seconds']:.0f} s)", flush=True)

    print(f"\n{task}, {steps} steps, seeds {seeds}: held-out greedy accuracy")
    print(f"{'method':24s} {'before':>7s} {'after':>7s} {'gain':>7s} {'s/run':>6s}  per seed")
    for method, runs in results.items():
        before = statistics.mean(r["accuracy_before"] for r in runs)
        after = statistics.mean(r["accuracy_after"] for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        per_seed = " ".join(f"{r['accuracy_after']:.1%}" for r in runs)
        print(f"{label(method):24s} {before:7.1%} {after:7.1%} {100 * (after - before):+6.1f}p {seconds:6.0f}  {per_seed}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for method, runs in results.items():
        steps_seen = [step for step, _ in runs[0]["curve"]]
        mean = [statistics.mean(dict(r["curve"])[step] for r in runs) for step in steps_seen]
        axis.plot(steps_seen, mean, marker="o", label=label(method))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("held-out greedy accuracy")
    axis.set_title(title or f"{task}: mean over seeds {seeds}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=120)
    print(f"wrote {plot_path}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "ppo"],
                        help="methods, each optionally with train flags in one quoted string")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--task", default="addition")
    parser.add_argument("--plot", default="method_accuracy.png", help="where the accuracy curves are drawn")
    args = parser.parse_args()
    compare(args.methods, args.seeds, args.steps, args.task, args.plot)


if __name__ == "__main__":
    main()
