"""Cost of the failure detectors next to the plain training step.

The same embedded-size training run twice per round, with every built-in detector and with none
(``detectors="none"``), interleaved over rounds so that machine load hits both alike. Reported:

- the detectors' own time: every ``Diagnostics.observe`` call of the run, timed inside it, per optimizer step, and
  as a fraction of the median step time of the same run (machine noise does not blur this one);
- the wall-clock ratio of the whole ``train()`` with detectors to without, median over rounds with its spread.

    python benchmarks/detector_overhead.py            # about 1 minute on 2 CPU cores
    python benchmarks/detector_overhead.py --rounds 5 --steps 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from step_overhead import StepTimer  # noqa: E402  (this folder is on the path of a script run from it)
from transformers import PrinterCallback  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.diagnostics import Diagnostics  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer  # noqa: E402


def reward(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in text)) / 4 for text in completions]


def one_run(detectors: str, steps: int, observe_time: list[float]) -> tuple[float, list[float]]:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_causal_lm(tokenizer)
    data = Dataset.from_list([{"prompt": f"{i % 10}+{(3 * i) % 10}="} for i in range(256)])
    with tempfile.TemporaryDirectory() as out:
        args = PolicyOptimizationConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=16,
            num_generations=4, max_completion_length=8, learning_rate=1e-3, max_steps=steps, logging_steps=1,
            save_strategy="no", seed=0, disable_tqdm=True, detectors=detectors)
        timer = StepTimer()
        trainer = PolicyOptimizationTrainer(model, reward, args=args, train_dataset=data, processing_class=tokenizer,
                                            callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    observe_times: list[float] = []
    original = Diagnostics.observe

    def timed(self, row):
        start = time.perf_counter()
        try:
            return original(self, row)
        finally:
            observe_times.append(time.perf_counter() - start)

    Diagnostics.observe = timed
    ratios, own = [], []
    for round_index in range(args.rounds):
        order = ("none", "all") if round_index % 2 == 0 else ("all", "none")
        totals = {}
        for detectors in order:
            observe_times.clear()
            totals[detectors], steps = one_run(detectors, args.steps, observe_times)
            if detectors == "all":
                per_step = sum(observe_times) / len(steps)
                own.append((per_step, per_step / statistics.median(steps)))
        ratios.append(totals["all"] / totals["none"])
        print(f"round {round_index + 1}: train() with detectors {totals['all']:.2f} s, without {totals['none']:.2f} s "
              f"(ratio {ratios[-1]:.4f}); detectors' own time {own[-1][0] * 1e6:.0f} us a step, "
              f"{100 * own[-1][1]:.3f}% of the median step")
    spread = f"{min(ratios):.4f}-{max(ratios):.4f}"
    print(f"detectors' own time: {statistics.median(o[0] for o in own) * 1e6:.0f} us a step, "
          f"{100 * statistics.median(o[1] for o in own):.3f}% of the median step (all 11 built-in detectors)")
    print(f"wall-clock ratio with / without: median {statistics.median(ratios):.4f} (spread {spread} over "
          f"{args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
