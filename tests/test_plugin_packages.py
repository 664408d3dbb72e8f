"""Every distribution under plugins/ installs on its own and registers its methods through the entry points."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = sorted(p for p in (Path(__file__).resolve().parent.parent / "plugins").iterdir() if (p / "pyproject.toml").exists())


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_installs_alone_and_registers_its_methods(plugin, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(plugin)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    readme = (plugin / "README.md").read_text()
    for field in ("what it changes", "side", "failure it fixes", "formula", "paper", "## Options", "## Use"):
        assert field in readme, f"{plugin.name}'s README lacks {field!r}"
    script = ("import sys; from po_registry.registry import Registry; r = Registry(); "
              "print(sorted(m.name for m in r.methods.values() if m.plugin != 'grpo'))")
    env = {**os.environ, "PYTHONPATH": str(target), "PO_REGISTRY_PLUGINS": ""}
    names = subprocess.run([sys.executable, "-c", script.replace("Registry()", f"Registry(allow={_entry_points(target)!r})")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert names.returncode == 0, names.stderr[-2000:]
    assert names.stdout.strip() not in ("", "[]"), f"{plugin.name} registered no method"


def _entry_points(site: Path) -> list[str]:
    """Entry-point names of the po_registry group in the distribution installed at ``site``."""
    (info,) = site.glob("*.dist-info")
    lines = (info / "entry_points.txt").read_text().splitlines()
    start = lines.index("[po_registry]")
    return [line.split("=")[0].strip() for line in lines[start + 1 :] if "=" in line and not line.startswith("[")]
