"""Cost of the plugin layer: optimizer-step time of the assembled ``grpo`` baseline against TRL's GRPOTrainer.

Both trainers use the same flags, model and data. Runs are interleaved (stock, ours, ours, stock, ...) so that
machine load hits both alike; each run times every optimizer step (generation, loss, backward and optimizer)
with a callback and drops the first steps as warm-up. Prints per-run medians and the median ratio ours/stock.

    python benchmarks/step_overhead.py            # about 1.5 minutes on 2 CPU cores
    python benchmarks/step_overhead.py --rounds 3 --steps 10 --loss-type grpo --beta 0.04
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def exact_sum(completions, answer, **kwargs):
    return [float(text.strip() == target) + 0.1 * sum(c.isdigit() for c in text) for text, target in
            zip(completions, answer)]


def run(trainer_cls, config_cls, model_dir, tokenizer, dataset, args) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = config_cls(
            output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            per_device_train_batch_size=args.batch_size, num_generations=8, max_completion_length=6,
            learning_rate=5e-5, max_steps=args.steps, logging_steps=args.steps, save_strategy="no", seed=0,
            disable_tqdm=True, loss_type=args.loss_type, beta=args.beta, num_iterations=args.num_iterations,
        )
        trainer = trainer_cls(model=model_dir, reward_funcs=[exact_sum], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return timer.times[args.warmup:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved pairs of runs")
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped from each run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--num-iterations", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = char_tokenizer()
    pairs = [(a, b) for a in range(10, 100, 3) for b in range(10, 100, 7)]
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})
    with tempfile.TemporaryDirectory() as model_dir:
        model = tiny_causal_lm(tokenizer, hidden_size=128, num_layers=4)
        model.save_pretrained(model_dir)
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; {args.rounds} rounds x "
              f"{args.steps} steps; batch {args.batch_size}, loss_type {args.loss_type}, beta {args.beta}")
        medians = {"stock": [], "ours": []}
        for round_index in range(args.rounds):
            order = ["stock", "ours"] if round_index % 2 == 0 else ["ours", "stock"]
            for name in order:
                classes = (GRPOTrainer, GRPOConfig) if name == "stock" else (PolicyOptimizationTrainer,
                                                                             PolicyOptimizationConfig)
                times = run(*classes, model_dir, tokenizer, dataset, args)
                medians[name].append(statistics.median(times))
                print(f"round {round_index + 1} {name:5s}: median step {1000 * medians[name][-1]:.1f} ms")
    paired = [o / s for o, s in zip(medians["ours"], medians["stock"])]
    ratio = statistics.median(paired)
    print(f"stock median step: {1000 * statistics.median(medians['stock']):.1f} ms")
    print(f"ours  median step: {1000 * statistics.median(medians['ours']):.1f} ms")
    print(f"median ratio ours/stock: {ratio:.3f} (paired per round: {', '.join(f'{r:.3f}' for r in paired)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
