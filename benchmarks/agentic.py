"""Multi-turn RL on the embedded guess-the-number environment: outcome-only reward against turn-level credit.

Every method runs the main job (``po-registry train --task guess``: the embedded model warm-started on random-play
transcripts, LoRA r16) with the same seeds and steps. Before and after training, the greedy policy plays the
held-out games: success rate (found within 6 turns), mean turns of the won games and mean episode reward. Prints a
table and draws success rate and turns per method.

    python benchmarks/agentic.py                                   # 4 methods x 2 seeds x 60 steps
    python benchmarks/agentic.py --methods grpo gigpo --seeds 0 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def play(model_dir: Path, adapter: Path | None, games: int) -> dict[str, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_registry.agentic import greedy_episodes
    from po_registry.registry import get_task

    task = get_task("guess")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    prompts = [prompt for prompt, _ in task.eval_problems(games)]
    return greedy_episodes(model, tokenizer, task.environment, prompts, task.max_turns, task.max_completion_length,
                           task.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "turn-advantage", "gigpo", "turn-return"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--games", type=int, default=512, help="held-out games per evaluation")
    parser.add_argument("--plot", default="agentic.png")
    args = parser.parse_args()

    from po_registry.embedded import embedded_model_dir
    from po_registry.registry import get_task

    model_dir = embedded_model_dir(get_task("guess"))
    before = play(model_dir, None, args.games)
    print(f"before training: success {before['success']:.1%}, turns {before['turns']:.2f}, "
          f"reward {before['reward']:.3f}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="po-agentic-") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                run_dir = Path(tmp) / f"{method}-{seed}"
                command = [sys.executable, "-m", "po_registry.cli", "train", "--task", "guess", "--method", method,
                           "--seed", str(seed), "--steps", str(args.steps), "--eval-every", str(args.steps),
                           "--eval-size", "64", "--output-dir", str(run_dir)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
                seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]
                after = {**play(model_dir, run_dir / "adapter", args.games), "seconds": seconds}
                results.setdefault(method, []).append(after)
                print(f"{method:16s} seed {seed}: success {after['success']:.1%}, turns {after['turns']:.2f}, "
                      f"reward {after['reward']:.3f} ({seconds:.0f} s)", flush=True)

    print(f"\nguess, {args.steps} steps, seeds {args.seeds}, {args.games} held-out games (greedy)")
    print(f"{'method':16s} {'success':>8s} {'turns':>6s} {'reward':>7s} {'s/run':>6s}")
    print(f"{'(before)':16s} {before['success']:8.1%} {before['turns']:6.2f} {before['reward']:7.3f}")
    for method, runs in results.items():
        mean = {key: statistics.mean(run[key] for run in runs) for key in ("success", "turns", "reward", "seconds")}
        print(f"{method:16s} {mean['success']:8.1%} {mean['turns']:6.2f} {mean['reward']:7.3f} {mean['seconds']:6.0f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["before", *results]
    success = [before["success"], *[statistics.mean(r["success"] for r in runs) for runs in results.values()]]
    turns = [before["turns"], *[statistics.mean(r["turns"] for r in runs) for runs in results.values()]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, success)
    left.set_ylabel("greedy success rate")
    right.bar(names, turns, color="tab:orange")
    right.set_ylabel("mean turns of won games")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30)
    figure.suptitle(f"guess-the-number, {args.steps} steps, seeds {args.seeds}")
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
