"""GRPO, pure on-policy distillation and the four GRPO-OPD operators on the embedded task, at equal steps.

The teacher is a stronger checkpoint of the embedded model (the warm start trained further, to a held-out greedy
accuracy of ``--teacher-accuracy``; built once and cached); the student is the usual weak warm start. Every method
runs the main job (``po-registry train``, LoRA r16) with the same seeds and steps; the table gives held-out greedy
accuracy before and after, and one plot holds the mean accuracy curves.

    python benchmarks/opd_accuracy.py                          # 6 methods x 2 seeds x 150 steps, ~8 min
    python benchmarks/opd_accuracy.py --seeds 0 --steps 60 --lam 0.5
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from method_accuracy import compare  # noqa: E402

from po_registry.embedded import embedded_model_dir  # noqa: E402
from po_registry.registry import get_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--teacher-accuracy", type=float, default=0.6)
    parser.add_argument("--lam", type=float, default=1.0, help="opd_lambda of the hybrids")
    parser.add_argument("--plot", default="opd_accuracy.png")
    args = parser.parse_args()

    task = get_task("addition")
    teacher = embedded_model_dir(task, target_accuracy=args.teacher_accuracy)
    print(f"teacher: {teacher}", flush=True)
    flags = f"--option opd_teacher={teacher} --option opd_lambda={args.lam}"
    methods = ["grpo", f"opd {flags}", f"opd-ratio {flags}", f"opd-advantage {flags}", f"opd-reward {flags}",
               f"opd-kl {flags}"]
    compare(methods, args.seeds, args.steps, task.name, args.plot,
            title=f"{task.name}: GRPO vs OPD (teacher at {args.teacher_accuracy:.0%}), mean over seeds {args.seeds}")


if __name__ == "__main__":
    main()
