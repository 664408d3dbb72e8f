"""``po-registry diagnose``: a run's findings with their side and evidence, and the installed compositions that
target them, as ready ``--method`` values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diagnostics import Finding, History, replay, resolve_limits
from .errors import PORegistryError, fail
from .registry import Registry, get_registry

REPORT_DIRECTORY = "diagnosis"


def read_log(path: Path, command: str = "diagnose") -> tuple[list[dict], Path]:
    """The metric rows of a run and the file they came from: ``metrics.jsonl`` of a po-registry run directory, or
    the ``log_history`` of a TRL run's ``trainer_state.json`` (its output directory, or its newest checkpoint)."""
    if path.is_file():
        source = path
    elif not path.is_dir():
        fail(command, f"{path}: no such run directory or file")
    elif (path / "metrics.jsonl").is_file():
        source = path / "metrics.jsonl"
    elif (path / "trainer_state.json").is_file():
        source = path / "trainer_state.json"
    else:
        checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"),
                             key=lambda p: int(p.parent.name.rpartition("-")[2] or 0))
        if not checkpoints:
            fail(command, f"{path}: no metrics.jsonl (a po-registry run) or trainer_state.json (a TRL run) in it")
        source = checkpoints[-1]
    try:
        if source.name.endswith(".json"):
            rows = json.loads(source.read_text())["log_history"]
        else:
            rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    except (ValueError, KeyError, TypeError) as exc:
        fail(command, f"{source}: not a metric log ({type(exc).__name__}: {exc})")
    return [row for row in rows if isinstance(row, dict)], source


@dataclass
class Composition:
    """A ``--method`` value and the found failures it targets (and those it may cause)."""

    methods: list[str]
    fixes: list[str]
    risks: list[str] = field(default_factory=list)

    @property
    def flag(self) -> str:
        return f"--method {','.join(self.methods)}"


def _valid(methods: list[str]) -> bool:
    from .pipeline import assemble

    try:
        assemble(methods, {})
    except PORegistryError:
        return False
    return True


def recommend(findings: list[Finding], registry: Registry) -> tuple[dict[str, list[Composition]], list[Composition]]:
    """Per found failure, the installed methods that declare they fix it (fewest of the found failures among their
    risks first). When failures sit on both sides: up to three valid compositions that change both sides, each
    built greedily (the method fixing most of what is still uncovered and risking the least of what was found),
    from different first methods; empty when no installed composition covers a failure of each side."""
    found = list(dict.fromkeys(finding.failure for finding in findings))
    methods = sorted(registry.methods.values(), key=lambda m: m.name)

    def composition(names: list[str]) -> Composition:
        chosen = [registry.methods[name] for name in names]
        return Composition(names, [f for f in found if any(f in m.fixes for m in chosen)],
                           sorted({f for m in chosen for f in m.risks if f in found}))

    def rank(c: Composition):
        return len(c.risks), -len(c.fixes), len(c.methods), c.methods

    per_failure = {failure: sorted((composition([m.name]) for m in methods if failure in m.fixes), key=rank)
                   for failure in found}
    sides = {finding.failure: finding.side for finding in findings}
    if set(sides.values()) != {"reward", "trajectory"}:
        return per_failure, []

    def greedy(first: str) -> Composition:
        names = [first]
        while True:
            uncovered = set(found) - set(composition(names).fixes)
            options = [composition([*names, m.name]) for m in methods
                       if m.name not in names and uncovered & set(m.fixes)]
            options = [c for c in sorted(options, key=rank) if _valid(c.methods)]
            if not uncovered or not options:
                return composition(names)
            names = options[0].methods

    results: list[Composition] = []
    for first in sorted((composition([m.name]) for m in methods if set(m.fixes) & set(found)), key=rank):
        candidate = greedy(first.methods[0])
        covered_sides = {sides[f] for f in candidate.fixes}
        if covered_sides == {"reward", "trajectory"} and _valid(candidate.methods) \
                and all(set(candidate.methods) != set(c.methods) for c in results):
            results.append(candidate)
    return per_failure, sorted(results, key=rank)[:3]


def plot_finding(finding: Finding, out: Path, history: History | None = None) -> None:
    """The evidence of one finding over the whole run (``history``; else as far as the detector read it), with the
    step where it began and the threshold it crossed marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(finding.evidence), 1, figsize=(7, 2.6 * len(finding.evidence)), squeeze=False)
    for axis, (metric, pairs) in zip(axes[:, 0], finding.evidence.items()):
        pairs = history.series.get(metric, pairs) if history is not None else pairs
        steps, values = zip(*pairs) if pairs else ((), ())
        axis.plot(steps, values, marker="." if len(steps) < 40 else None, color="tab:blue")
        axis.axvline(finding.step, color="tab:red", linestyle="--", label=f"began at step {finding.step}")
        if len(finding.evidence) == 1 and "limit" in finding.limits:
            axis.axhline(finding.limits["limit"], color="tab:gray", linestyle=":", label="threshold")
        elif len(finding.evidence) == 1 and "ratio" in finding.limits and pairs:
            start = [value for _, value in pairs[: int(finding.limits["window"])]]
            axis.axhline(finding.limits["ratio"] * sum(start) / len(start), color="tab:gray", linestyle=":",
                         label=f"{finding.limits['ratio']:g}x the start")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].set_title(f"{finding.failure} ({finding.side} side)")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def diagnose(path: Path, detectors: list[str] | None = None, thresholds: dict | None = None,
             out: Path | None = None, registry: Registry | None = None, plots: bool = True) -> dict[str, Any]:
    """Findings, recommendations and the report of the run at ``path``; writes ``report.md`` and one PNG per
    finding under ``out`` (default ``RUN_DIR/diagnosis``). Returns what ``--json`` prints."""
    registry = registry or get_registry()
    rows, source = read_log(path)
    limits = resolve_limits(registry.detectors, detectors, thresholds)
    replayed = replay(rows, registry.detectors, registry.failures, limits)
    findings = replayed.findings
    per_failure, compound = recommend(findings, registry)
    out = out or (source.parent / REPORT_DIRECTORY)
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted({int(row["step"]) for row in rows if isinstance(row.get("step"), (int, float))})
    result = {
        "run": str(path), "source": str(source), "logged_steps": len(steps), "detectors": sorted(limits),
        "findings": [], "compound": None, "report": str(out / "report.md"),
    }
    for finding in findings:
        entry = finding.as_dict()
        entry["summary"] = registry.failures[finding.failure].summary
        entry["recommended"] = [{"method": c.flag, "fixes": c.fixes, "risks": c.risks}
                                for c in per_failure[finding.failure]]
        if plots:
            figure = out / f"{finding.failure}.png"
            plot_finding(finding, figure, replayed.history)
            entry["plot"] = str(figure)
        result["findings"].append(entry)
    if len({finding.side for finding in findings}) == 2:
        result["compound"] = {
            "trajectory": [f.failure for f in findings if f.side == "trajectory"],
            "reward": [f.failure for f in findings if f.side == "reward"],
            "recommended": [{"method": c.flag, "fixes": c.fixes, "risks": c.risks} for c in compound],
        }
    (out / "report.md").write_text(report_markdown(result))
    return result


def report_text(result: dict[str, Any]) -> str:
    """The diagnosis as terminal lines."""
    lines = [f"{result['run']}: {result['logged_steps']} logged steps from {result['source']}, "
             f"{len(result['detectors'])} detectors"]
    if not result["findings"]:
        lines.append("no failure found")
    for entry in result["findings"]:
        lines.append(f"{entry['failure']} ({entry['side']} side) from step {entry['step']}: {entry['message']}")
        lines.append(f"  what goes wrong: {entry['summary']}")
        if entry["recommended"]:
            choices = [r["method"] + (f" (may cause {', '.join(r['risks'])})" if r["risks"] else "")
                       for r in entry["recommended"][:4]]
            lines.append(f"  installed fixes: {' | '.join(choices)}")
        else:
            lines.append("  installed fixes: none of the installed methods declares a fix for it")
        if entry.get("plot"):
            lines.append(f"  evidence: {entry['plot']}")
    compound = result["compound"]
    if compound:
        lines.append(f"compound failure: {', '.join(compound['trajectory'])} (trajectory side) with "
                     f"{', '.join(compound['reward'])} (reward side): a fix on one side alone leaves the other")
        if compound["recommended"]:
            for choice in compound["recommended"]:
                lines.append(f"  {choice['method']}  covers {', '.join(choice['fixes'])}"
                             + (f"; may cause {', '.join(choice['risks'])}" if choice["risks"] else ""))
        else:
            lines.append("  no installed composition changes both sides for these failures")
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)


def report_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Diagnosis of {result['run']}", "",
             f"{result['logged_steps']} logged steps read from `{result['source']}` by {len(result['detectors'])} "
             f"detectors ({', '.join(result['detectors'])}).", ""]
    if not result["findings"]:
        lines.append("No failure found.")
    for entry in result["findings"]:
        lines += [f"## {entry['failure']} ({entry['side']} side), from step {entry['step']}", "",
                  entry["summary"] + ".", "", f"Evidence: {entry['message']}.", ""]
        if entry.get("plot"):
            lines += [f"![{entry['failure']}]({Path(entry['plot']).name})", ""]
        if entry["recommended"]:
            lines.append("Installed methods that target it:")
            lines += [f"- `{r['method']}`" + (f" (may cause {', '.join(r['risks'])})" if r["risks"] else "")
                      for r in entry["recommended"]]
        else:
            lines.append("None of the installed methods declares a fix for it.")
        lines.append("")
    compound = result["compound"]
    if compound:
        lines += ["## Compound failure", "",
                  f"{', '.join(compound['trajectory'])} on the trajectory side with {', '.join(compound['reward'])} "
                  "on the reward side: a fix on one side alone leaves the other.", ""]
        if compound["recommended"]:
            lines += [f"- `{c['method']}` covers {', '.join(c['fixes'])}"
                      + (f"; may cause {', '.join(c['risks'])}" if c["risks"] else "") for c in compound["recommended"]]
        else:
            lines.append("No installed composition changes both sides for these failures.")
        lines.append("")
    return "\n".join(lines)
