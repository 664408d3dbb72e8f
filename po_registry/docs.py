"""Reference docs generated from the code: every hook (from ``hookspecs.py``) and the method map (from the registry).

    python -m po_registry.docs            # rewrite docs/hooks.md and docs/methods.md
    python -m po_registry.docs --check    # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import inspect
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
                f"- built-in implementations: {', '.join(f'`{n}`' for n in implementers) or 'none'}",
                "",
                inspect.getdoc(func),
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def method_map(registry: Registry | None = None) -> list[dict]:
    """Each method with its components grouped by the side of the stages they implement."""
    registry = registry or get_registry()
    rows = []
    for method in sorted(registry.methods.values(), key=lambda m: m.name):
        sides: dict[str, list[str]] = {"reward": [], "trajectory": []}
        for component in method.components:
            info = registry.plugins.get(component)
            if info is None or info.plugin is None:
                continue
            for side in sorted({getattr(hookspecs, h).po_stage.side for h in info.hooks} - {"lifecycle"}):
                sides[side].append(component)
        rows.append({"method": method.name, "side": method.side, "components": sides, "targets": method.targets,
                     "summary": method.summary, "paper": method.paper, "plugin": method.plugin})
    return rows


def methods_markdown(registry: Registry | None = None) -> str:
    lines = [
        "# Method map",
        "",
        "Generated from the registry by `python -m po_registry.docs` (the data `po-registry methods` prints); "
        "methods of installed plugin distributions appear once they are installed.",
        "",
        "| method | side | reward-side components | trajectory-side components | targets | paper |",
        "|---|---|---|---|---|---|",
    ]
    for row in method_map(registry):
        reward = ", ".join(row["components"]["reward"]) or "—"
        trajectory = ", ".join(row["components"]["trajectory"]) or "—"
        lines.append(f"| `{row['method']}` | {row['side']} | {reward} | {trajectory} | {row['targets']} | "
                     f"{row['paper']} |")
    return "\n".join(lines) + "\n"


def generated() -> dict[str, str]:
    registry = repository_registry()
    return {"hooks.md": hook_reference(registry), "methods.md": methods_markdown(registry)}


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
