"""``po-registry compare``: several methods over several seeds and tasks, one budget, one leaderboard.

Every run is a ``po-registry train`` run (same steps, batch, learning rate and evaluation for every method) written
under ``OUT/<task>/<method>/seed-<n>``; a run already there is read, not trained again, so an interrupted
comparison continues and a finished one is re-tabulated for free. The baseline ``grpo`` (equal to TRL's
GRPOTrainer) is always in the table.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "grpo"


@dataclass
class Run:
    """One finished run, read from its directory."""

    task: str
    method: str
    seed: int
    accuracy: list[tuple[int, float]]  # (step, held-out greedy accuracy)
    curves: dict[str, list[tuple[int, float]]]  # reward, entropy, completions/mean_length by step
    seconds: list[tuple[int, float]]  # (step, cumulative training seconds)
    generations: int  # completions decoded: samples, refill rounds and greedy baselines
    findings: list[str] = field(default_factory=list)
    settings: str = ""  # the method's own settings (--method-config), as shown in the table

    def accuracy_at_step(self, step: int) -> float:
        return max((pair for pair in self.accuracy if pair[0] <= step), default=self.accuracy[0])[1]

    def accuracy_within(self, seconds: float) -> float:
        """Held-out accuracy after ``seconds`` of training: linear between the two evaluations around that time
        (evaluations are every few steps; a step's time is its ``step_time``)."""
        elapsed = dict(self.seconds)
        points = [(elapsed[step], value) for step, value in self.accuracy if step in elapsed]
        before = max((p for p in points if p[0] <= seconds + 1e-9), default=points[0])
        after = min((p for p in points if p[0] > seconds + 1e-9), default=before)
        if after[0] == before[0]:
            return before[1]
        return before[1] + (after[1] - before[1]) * (seconds - before[0]) / (after[0] - before[0])


def read_run(directory: Path, task: str, method: str, seed: int, settings: str = "") -> Run:
    import yaml

    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((directory / "summary.json").read_text())
    config = yaml.safe_load((directory / "config.yaml").read_text())
    accuracy = sorted({r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}.items())
    curves = {name: [(r["step"], r[name]) for r in rows if name in r and "reward" in r]
              for name in ("reward", "entropy", "completions/mean_length")}
    elapsed, seconds = 0.0, [(0, 0.0)]
    batch = int(config.get("per_device_train_batch_size", 64))
    generations = 0
    for row in rows:
        if "reward" in row:
            elapsed += float(row.get("step_time", 0.0))
            seconds.append((row["step"], elapsed))
            rounds = 1 + int(row.get("dynamic_sampling/extra_rounds", 0))
            generations += round((batch + row.get("greedy/decodes", 0)) * rounds)
    return Run(task, method, seed, accuracy, curves, seconds, generations,
               [f["failure"] for f in summary.get("findings", [])], settings)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def leaderboard(runs: list[Run], skipped: dict[tuple[str, str], str]) -> dict[str, Any]:
    """Per task, each method's held-out accuracy at the common final step and within the common wall time (the
    fastest method's training time, which every method reached), mean and standard deviation over seeds, plus the
    completions decoded and the failures detected; ``skipped``: (task, method) -> why it could not run."""
    tables = {}
    for task in sorted({run.task for run in runs} | {task for task, _ in skipped}):
        mine = [run for run in runs if run.task == task]
        not_run = {method: why for (other, method), why in sorted(skipped.items()) if other == task}
        if not mine:
            tables[task] = {"final_step": 0, "time_budget": 0.0, "rows": [], "skipped": not_run}
            continue
        final_step = min(run.accuracy[-1][0] for run in mine)
        budget = min(run.seconds[-1][1] for run in mine)
        rows = []
        for method in sorted({run.method for run in mine}, key=lambda m: (m != BASELINE, m)):
            seeds = [run for run in mine if run.method == method]
            at_step = _mean_spread([run.accuracy_at_step(final_step) for run in seeds])
            at_time = _mean_spread([run.accuracy_within(budget) for run in seeds])
            start = _mean_spread([run.accuracy[0][1] for run in seeds])
            rows.append({
                "method": method, "settings": seeds[0].settings, "seeds": sorted(run.seed for run in seeds),
                "accuracy_start": start[0], "accuracy": at_step[0], "accuracy_std": at_step[1],
                "accuracy_at_time": at_time[0], "accuracy_at_time_std": at_time[1],
                "seconds": statistics.fmean(run.seconds[-1][1] for run in seeds),
                "generations": statistics.fmean(run.generations for run in seeds),
                "findings": sorted({f for run in seeds for f in run.findings}),
            })
        rows.sort(key=lambda row: (row["method"] != BASELINE, -row["accuracy"]))
        tables[task] = {"final_step": final_step, "time_budget": budget, "rows": rows, "skipped": not_run}
    return {"tasks": tables}


def leaderboard_markdown(board: dict[str, Any]) -> str:
    lines = []
    for task, table in board["tasks"].items():
        lines += [f"### {task}", ""]
        if not table["rows"]:
            lines += ["No method could run on this task.", ""]
        else:
            lines += [f"Held-out greedy accuracy at step {table['final_step']} and after {table['time_budget']:.1f} s "
                      "of training (the fastest method's time; linear between evaluations), mean ± standard "
                      "deviation over seeds; the baseline first, then by accuracy.", "",
                      "| method | seeds | start | at equal steps | at equal time | train s | completions | detected |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in table["rows"]:
                settings = f" ({row['settings']})" if row["settings"] else ""
                lines.append(
                    f"| `{row['method']}`{settings} | {len(row['seeds'])} | {row['accuracy_start']:.1%} | "
                    f"{row['accuracy']:.1%} ± {row['accuracy_std']:.1%} | "
                    f"{row['accuracy_at_time']:.1%} ± {row['accuracy_at_time_std']:.1%} | {row['seconds']:.1f} | "
                    f"{row['generations']:.0f} | {', '.join(row['findings']) or '—'} |")
            lines.append("")
        if table["skipped"]:
            lines += ["Not run: " + "; ".join(f"`{name}` ({why})" for name, why in table["skipped"].items()), ""]
    return "\n".join(lines)


def plot_task(runs: list[Run], task: str, out: Path) -> None:
    """Accuracy, reward, entropy and length curves of each method (mean over seeds) for one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [run for run in runs if run.task == task]
    methods = sorted({run.method for run in mine}, key=lambda m: (m != BASELINE, m))
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [("held-out accuracy", lambda run: run.accuracy), ("reward", lambda run: run.curves["reward"]),
              ("entropy", lambda run: run.curves["entropy"]),
              ("mean length", lambda run: run.curves["completions/mean_length"])]
    for axis, (title, series) in zip(axes.flat, panels):
        for method in methods:
            by_step: dict[int, list[float]] = {}
            for run in mine:
                if run.method == method:
                    for step, value in series(run):
                        by_step.setdefault(step, []).append(value)
            if by_step:
                steps = sorted(by_step)
                axis.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=method,
                          linewidth=2.5 if method == BASELINE else 1.2, color="black" if method == BASELINE else None)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    figure.suptitle(f"{task}: mean over seeds")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def settings_text(source: Path) -> str:
    """A method's settings file shown the way the table names it: ``beta=0.04, epsilon=0.3``."""
    import yaml

    data = yaml.safe_load(source.read_text()) or {}
    flat = {**{k: v for k, v in data.items() if k not in ("method_options", "options")},
            **data.get("method_options", {}), **data.get("options", {})}
    return ", ".join(f"{key}={value}" for key, value in flat.items())


def compare(methods: list[str], tasks: list[str], seeds: list[int], out: Path, train_args: list[str],
            train: Callable[[list[str]], int], progress=print,
            method_configs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Train (or read) every task x method x seed under ``out`` (``train``: the train command, given its
    arguments; ``method_configs``: a settings file for one method's runs, after ``train_args``' own); write
    leaderboard.md, leaderboard.json and one PNG per task; return the leaderboard. A method that cannot run on a
    task (its train command refuses) is listed as skipped there with the one-line reason."""
    method_configs = method_configs or {}
    methods = [BASELINE, *[m for m in methods if m != BASELINE]]
    runs, skipped = [], {}
    total = len(tasks) * len(methods) * len(seeds)
    done = 0
    for task in tasks:
        for method in methods:
            own = ["--config", str(method_configs[method])] if method in method_configs else []
            settings = settings_text(method_configs[method]) if method in method_configs else ""
            for seed in seeds:
                done += 1
                directory = out / task / method.replace(":", "_").replace(",", "+") / f"seed-{seed}"
                if not (directory / "summary.json").exists():
                    if (task, method) in skipped:
                        continue
                    progress(f"[{done}/{total}] {task} {method} seed {seed}")
                    errors = io.StringIO()
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                        code = train(["--task", task, "--method", method, "--seed", str(seed),
                                      "--output-dir", str(directory), *train_args, *own])
                    if code != 0 or not (directory / "summary.json").exists():
                        marker = "po-registry train: error: "
                        reason = next((line[line.index(marker) + len(marker):] for line in
                                       errors.getvalue().splitlines() if marker in line), f"exit code {code}")
                        skipped[task, method] = reason[:200]
                        continue
                runs.append(read_run(directory, task, method, seed, settings))
    board = leaderboard(runs, skipped)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(json.dumps(board, indent=2))
    (out / "leaderboard.md").write_text(leaderboard_markdown(board))
    for task, table in board["tasks"].items():
        if table["rows"]:
            plot_task(runs, task, out / f"{task}.png")
    return board
