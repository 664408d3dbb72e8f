"""Cost of the plugin layer: optimizer-step time of the assembled ``grpo`` baseline against TRL's GRPOTrainer.

Both trainers use the same flags, model and data (the same seed, so the same completions). Runs are interleaved
(stock, ours, ours, stock, ...) so that machine load hits both alike; each run times every optimizer step
(generation, loss, backward and optimizer) with a callback and drops the first steps as warm-up. Two ratios
ours/stock, each with its spread over the rounds:

- *median*: the median over rounds of the ratio of the two runs' median step times;
- *best-of*: per step index, the fastest time over every round (noise only ever adds time), then the median over
  step indices of ours/stock; its spread comes from splitting the rounds into halves.

And the layer's own cost, which machine noise does not blur: the time spent in the trainer's overridden methods
minus the TRL calls inside them (exclusive times), against the same measure of TRL's own loss code (its
``_compute_loss`` minus the forward pass), per step.

    python benchmarks/step_overhead.py            # about 3 minutes on 2 CPU cores
    python benchmarks/step_overhead.py --rounds 3 --steps 10 --loss-type grpo --beta 0.04
"""

from __future__ import annotations

import argparse
import contextlib
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


class ExclusiveTimer:
    """Exclusive time of wrapped methods by kind: a call's time minus that of the wrapped calls inside it."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[float] = []  # time taken by wrapped children of each open call

    @contextlib.contextmanager
    def watching(self, methods: list[tuple[type, str, str]]):
        originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in methods]
        for cls, name, kind in methods:
            setattr(cls, name, self._wrap(cls.__dict__[name], kind))
        try:
            yield self
        finally:
            for cls, name, original in originals:
                setattr(cls, name, original)

    def _wrap(self, function, kind: str):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = self._stack.pop()
                self.totals[kind] = self.totals.get(kind, 0.0) + elapsed - children
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


def layer_methods(name: str) -> list[tuple[type, str, str]]:
    """The methods whose exclusive time is the plugin layer's (ours) or TRL's equivalent loss code (stock)."""
    trl = [(GRPOTrainer, "_generate_and_score_completions", "trl"), (GRPOTrainer, "_calculate_rewards", "trl"),
           (GRPOTrainer, "_get_per_token_logps_and_entropies", "trl")]
    if name == "stock":
        return [*trl, (GRPOTrainer, "_compute_loss", "layer")]
    return [*trl, *[(PolicyOptimizationTrainer, method, "layer") for method in
                    ("_generate_and_score_completions", "_calculate_rewards", "_compute_loss")]]


def exact_sum(completions, answer, **kwargs):
    return [float(text.strip() == target) + 0.1 * sum(c.isdigit() for c in text) for text, target in
            zip(completions, answer)]


def run(trainer_cls, config_cls, model_dir, tokenizer, dataset, args, timer: StepTimer | None = None) -> list[float]:
    timer = timer or StepTimer()
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
        steps = {"stock": [], "ours": []}  # per run: its step times
        layer = {"stock": [], "ours": []}  # per run: the layer's own time per step
        for round_index in range(args.rounds):
            order = ["stock", "ours"] if round_index % 2 == 0 else ["ours", "stock"]
            for name in order:
                classes = (GRPOTrainer, GRPOConfig) if name == "stock" else (PolicyOptimizationTrainer,
                                                                             PolicyOptimizationConfig)
                with ExclusiveTimer().watching(layer_methods(name)) as exclusive:
                    steps[name].append(run(*classes, model_dir, tokenizer, dataset, args))
                layer[name].append(exclusive.totals.get("layer", 0.0) / args.steps)
                print(f"round {round_index + 1} {name:5s}: median step {1000 * statistics.median(steps[name][-1]):.1f} "
                      f"ms, layer {1000 * layer[name][-1]:.2f} ms a step")
    paired = [statistics.median(o) / statistics.median(s) for o, s in zip(steps["ours"], steps["stock"])]
    halves = [best_of_ratio(steps["ours"][part], steps["stock"][part])
              for part in (slice(0, args.rounds // 2), slice(args.rounds // 2, None))]
    print(f"stock median step: {1000 * statistics.median(t for run_ in steps['stock'] for t in run_):.1f} ms")
    print(f"ours  median step: {1000 * statistics.median(t for run_ in steps['ours'] for t in run_):.1f} ms")
    print(f"median ratio ours/stock: {statistics.median(paired):.3f} (rounds: min {min(paired):.3f}, max "
          f"{max(paired):.3f})")
    print(f"best-of-{args.rounds} ratio ours/stock: {best_of_ratio(steps['ours'], steps['stock']):.3f} (halves of the "
          f"rounds: {halves[0]:.3f}, {halves[1]:.3f})")
    ours_layer, stock_layer = (statistics.median(layer[name]) for name in ("ours", "stock"))
    extra = ours_layer - stock_layer
    step = statistics.median(t for run_ in steps["stock"] for t in run_)
    print(f"layer's own work a step: ours {1000 * ours_layer:.2f} ms, TRL's loss code {1000 * stock_layer:.2f} ms: "
          f"{1000 * extra:.2f} ms more, a ratio of {(step + extra) / step:.4f} on the {1000 * step:.1f} ms step")
    return 0


def best_of_ratio(ours: list[list[float]], stock: list[list[float]]) -> float:
    """Per step index, the fastest time over the runs; the median over step indices of ours / stock."""
    best = [min(times) for times in zip(*ours)], [min(times) for times in zip(*stock)]
    return statistics.median(o / s for o, s in zip(*best))


if __name__ == "__main__":
    sys.exit(main())
