"""`po-registry new-plugin`: generate -> install with pip -> its tests pass, before any edit."""

import os
import subprocess
import sys

import pytest
from test_cli import run_cli

from po_registry.scaffold import TEMPLATES


def test_generated_plugins_install_and_pass_their_tests(capsys, tmp_path):
    names = [f"scaffolded-{stage}" for stage in TEMPLATES]
    for name, stage in zip(names, TEMPLATES):
        code, out, err = run_cli(capsys, "new-plugin", name, "--stage", stage, "--directory", str(tmp_path))
        assert code == 0, err
        assert {"pyproject.toml", "README.md", "tests", name.replace("-", "_")} <= set(os.listdir(tmp_path / name))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), *[str(tmp_path / n) for n in names]],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *[str(tmp_path / n / "tests") for n in names]],
                           capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-4000:]
    assert "failed" not in tests.stdout and " passed" in tests.stdout


@pytest.mark.parametrize(
    "name, message",
    [
        ("My_Method", "invalid plugin name 'My_Method'"),
        ("9lives", "invalid plugin name '9lives'"),
        ("class", "'class' is not a valid Python module name"),
        ("torch", "a package named 'torch' is already installed"),
        ("grpo", "a plugin or method of that name is already registered"),
    ],
)
def test_bad_names_are_refused_in_one_line(capsys, tmp_path, name, message):
    code, _, err = run_cli(capsys, "new-plugin", name, "--directory", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / name).exists()


def test_existing_folder_is_refused(capsys, tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, err = run_cli(capsys, "new-plugin", "taken", "--directory", str(tmp_path))
    assert code == 2 and "already exists" in err
