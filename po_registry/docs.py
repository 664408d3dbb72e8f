"""Reference docs generated from the code: every hook (from ``hookspecs.py``) and the method map (from the registry).

    python -m po_registry.docs            # rewrite docs/hooks.md and docs/methods.md
    python -m po_registry.docs --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
from pathlib import Path

from . import hookspecs
from .registry import Registry, get_registry

ROOT = Path(__file__).resolve().parent.parent

SIDES = [
    ("reward", "Reward side: R(τ)"),
    ("trajectory", "Trajectory side: p_θ(τ)"),
    ("lifecycle", "Lifecycle"),
]
COMBINE = {
    "single": "single owner: exactly one plugin in an assembled pipeline",
    "fold": "composable: folded, each plugin receives the previous output",
    "sum": "composable: summed",
    "product": "composable: multiplied",
    "all": "composable: intersected (kept only if every plugin keeps it)",
    "max": "composable: the largest answer wins",
    "each": "every implementation is called",
}


def hookspec_functions() -> list:
    return [f for name, f in vars(hookspecs).items() if name.startswith("po_") and hasattr(f, "po_stage")]


def repository_registry() -> Registry:
    """Built-ins plus the plugin distributions under ``plugins/`` of this repository, whatever else is installed,
    so the generated docs are the same on every machine."""
    import re

    pattern = re.compile(r'^name\s*=\s*"([^"]+)"', re.MULTILINE)  # our own pyproject files (tomllib is 3.11+)
    names = [pattern.search(p.read_text()).group(1) for p in sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    return Registry(autoload=bool(names), allow=names)


def hook_reference(registry: Registry | None = None) -> str:
    registry = registry or get_registry()
    builtin = [info for info in registry.plugins.values() if info.builtin and info.plugin is not None]
    lines = [
        "# Hook reference",
        "",
        "Generated from `po_registry/hookspecs.py` by `python -m po_registry.docs`; do not edit by hand.",
        "",
        inspect.getdoc(hookspecs).split("\n\n")[0],
        "",
    ]
    for side, title in SIDES:
        lines += [f"## {title}", ""]
        for func in hookspec_functions():
            stage = func.po_stage
            if stage.side != side:
                continue
            signature = f"{func.__name__}{inspect.signature(func)}"
            implementers = sorted(info.name for info in builtin if func.__name__ in info.hooks)
            lines += [
                f"### `{signature}`",
                "",
                f"- side: {stage.side}",
                f"- {COMBINE[stage.combine]}",
                *([f"- returns: {hookspecs.OUTPUTS[stage.output]}", f"- selector: `{stage.name}`"]
                  if stage.output else []),
                f"- built-in implementations: {', '.join(f'`{n}`' for n in implementers) or 'none'}",
                "",
                inspect.getdoc(func),
                "",
            ]
    lines += ["## Component attributes", "",
              "Besides its hooks a component may declare these class attributes; the registry checks their types at "
              "load (a wrong one is a load fault naming the plugin) and assembly acts on them.", "",
              "| attribute | type | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {kind.__name__} | {meaning} |"
              for name, (kind, meaning) in hookspecs.COMPONENT_ATTRIBUTES.items()]
    return "\n".join(lines).rstrip() + "\n"


_ORACLE_CACHE: dict[tuple, dict[str, list[dict]]] = {}


def oracle_results(registry: Registry | None = None) -> dict[str, list[dict]]:
    """The gradient oracle's verdict on every method (:mod:`po_registry.oracle`), by method: one dict per set-up
    (with the ``settings`` it ran with); computed once per registry."""
    import warnings

    from .oracle import ORACLE_BUDGET, ORACLE_SETTINGS, check_all

    registry = registry or get_registry()
    key = (id(registry), tuple(sorted(registry.methods)))
    if key not in _ORACLE_CACHE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the configurations' coupling warnings are not the oracle's business
            results = check_all(registry=registry, settings=ORACLE_SETTINGS, **ORACLE_BUDGET)
        by_method: dict[str, list[dict]] = {}
        for result in results:
            options, config = ORACLE_SETTINGS.get(result.method, ({}, {}))
            settings = ", ".join(f"{name}={value}" for name, value in {**options, **config}.items())
            by_method.setdefault(result.method, []).append({**result.as_dict(), "settings": settings})
        _ORACLE_CACHE[key] = by_method
    return _ORACLE_CACHE[key]


def method_map(registry: Registry | None = None, oracle: bool = True) -> list[dict]:
    """Each method with its components grouped by the side of the stages they implement, and (``oracle``) the
    gradient oracle's verdict on it."""
    registry = registry or get_registry()
    verdicts = oracle_results(registry) if oracle else {}
    rows = []
    for method in sorted(registry.methods.values(), key=lambda m: m.name):
        sides: dict[str, list[str]] = {"reward": [], "trajectory": []}
        for component in method.components:
            info = registry.plugins.get(component)
            if info is None or info.plugin is None:
                continue
            for side in sorted({getattr(hookspecs, h).po_stage.side for h in info.hooks} - {"lifecycle"}):
                sides[side].append(component)
        row = {"method": method.name, "side": method.side, "components": sides, "targets": method.targets,
               "summary": method.summary, "paper": method.paper, "plugin": method.plugin,
               "fixes": list(method.fixes), "risks": list(method.risks)}
        if oracle:
            row["oracle"] = verdicts.get(method.name, [])
        rows.append(row)
    return rows


def _verdict(result: dict) -> str:
    if math.isnan(result["error"]):
        return "FAIL" if result["passed"] is False else "—"
    word = {True: "pass", False: "FAIL", None: "reported"}[result["passed"]]
    return f"{word} {result['error']:.2f} / {result['tolerance']:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar inside a table cell would end it


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def oracle_markdown(rows: list[dict]) -> list[str]:
    """The oracle's table: claimed objective, declared bias, and per set-up the error against the tolerance."""
    from .oracle import ALL_SETUPS as SETUPS, ORACLE_BUDGET, ORACLE_SETTINGS

    lines = [
        "## Gradient oracle",
        "",
        "`po_registry.oracle` on a policy it can enumerate (3 tokens, completions of up to 3, a logit table as the "
        "parameters): the mean gradient of each method's loss through its own pipeline, over sampled batches "
        f"({ORACLE_BUDGET['batches']} x {ORACLE_BUDGET['rows']} completions per set-up here), against the exact "
        "expectation that its declared objective and biases imply. *cosine*: of the measured gradient with the "
        "claimed objective's gradient (on the first set-up a method runs on); *bias*: relative size of the declared "
        "expectation's part that the objective does not explain; per set-up, the relative error and the tolerance "
        "sampling noise allows. Set-ups: standard; environment (an environment token inside every longer "
        "completion, and empty episodes); equal rewards (environment completions all rewarded alike); turns (the "
        "environment's completions as two-turn episodes with a reward per turn, for the multi-turn methods only). "
        + "Methods that need settings run with " + "; ".join(
            f"`{name}`: " + ", ".join(f"{key}={value}" for key, value in {**options, **config}.items())
            for name, (options, config) in ORACLE_SETTINGS.items()) + ".",
        "",
        "| method | claimed objective | declared bias | bias | cosine | " + " | ".join(SETUPS) + " |",
        "|---|---|---|---|---|" + "---|" * len(SETUPS),
    ]
    for row in rows:
        results = {result["setup"]: result for result in row.get("oracle", [])}
        first = next((results[setup] for setup in SETUPS if setup in results), None)
        if first is None:
            continue
        objective = _cell(first["objective"])
        if all(math.isnan(result["error"]) and result["passed"] is None for result in results.values()):
            lines.append(f"| `{row['method']}` | {objective} | not checked: {_cell(first['note'])} | | |"
                         + " |" * len(SETUPS))
            continue
        cells = " | ".join(_verdict(results[setup]) if setup in results else "—" for setup in SETUPS)
        lines.append(f"| `{row['method']}` | {objective} | {_cell(first['declared_bias'])} | "
                     f"{_number(first['bias'])} | {_number(first['cosine'])} | {cells} |")
    return lines


def methods_markdown(registry: Registry | None = None) -> str:
    lines = [
        "# Method map",
        "",
        "Generated from the registry by `python -m po_registry.docs` (the data `po-registry methods` prints); "
        "methods of installed plugin distributions appear once they are installed.",
        "",
        "| method | side | reward-side components | trajectory-side components | targets | fixes | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = method_map(registry)
    for row in rows:
        reward = ", ".join(row["components"]["reward"]) or "—"
        trajectory = ", ".join(row["components"]["trajectory"]) or "—"
        fixes = ", ".join(row["fixes"]) + (f" (may cause {', '.join(row['risks'])})" if row["risks"] else "")
        lines.append(f"| `{row['method']}` | {row['side']} | {reward} | {trajectory} | {row['targets']} | "
                     f"{fixes or '—'} | {row['paper']} |")
    lines += ["", *oracle_markdown(rows)]
    return "\n".join(lines) + "\n"


def failure_map(registry: Registry | None = None) -> list[dict]:
    """Each failure mode: side, summary, its detectors with their default thresholds, the methods that fix it and
    those that may cause it (the data `po-registry failures` prints)."""
    registry = registry or get_registry()
    methods = sorted(registry.methods.values(), key=lambda m: m.name)
    return [{"failure": failure.name, "side": failure.side, "summary": failure.summary, "plugin": failure.plugin,
             "detectors": {d.name: dict(d.defaults) for d in registry.detectors.values() if d.failure == failure.name},
             "fixed_by": [m.name for m in methods if failure.name in m.fixes],
             "risked_by": [m.name for m in methods if failure.name in m.risks]}
            for failure in registry.failures.values()]


def failures_markdown(registry: Registry | None = None) -> str:
    lines = [
        "# Failure vocabulary",
        "",
        "Generated from the registry by `python -m po_registry.docs` (the data `po-registry failures` prints). "
        "How detection and diagnosis work: [diagnostics.md](diagnostics.md).",
        "",
        "| failure | side | what goes wrong | detector (thresholds) | fixed by | may be caused by |",
        "|---|---|---|---|---|---|",
    ]
    for row in failure_map(registry):
        detectors = "; ".join(f"`{name}`: {', '.join(f'{k} {v:g}' for k, v in limits.items())}"
                              for name, limits in row["detectors"].items()) or "—"
        fixed = ", ".join(f"`{name}`" for name in row["fixed_by"]) or "—"
        caused = ", ".join(f"`{name}`" for name in row["risked_by"]) or "—"
        lines.append(f"| `{row['failure']}` | {row['side']} | {_cell(row['summary'])} | {detectors} | {fixed} | "
                     f"{caused} |")
    return "\n".join(lines) + "\n"


def generated() -> dict[str, str]:
    registry = repository_registry()
    return {"hooks.md": hook_reference(registry), "methods.md": methods_markdown(registry),
            "failures.md": failures_markdown(registry)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m po_registry.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--directory", default=str(ROOT / "docs"))
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = Path(args.directory) / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m po_registry.docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
