"""Docs cannot drift: generated references are current, every hook is documented and exercised by a test."""

import inspect
from pathlib import Path

from po_registry.docs import generated, hookspec_functions

ROOT = Path(__file__).resolve().parent.parent


def test_generated_references_are_current():
    for name, text in generated().items():
        assert (ROOT / "docs" / name).read_text() == text, f"docs/{name} is stale: run python -m po_registry.docs"


def test_every_hookspec_is_documented_with_its_side():
    for func in hookspec_functions():
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 80, f"{func.__name__} has no real documentation"
        assert func.po_stage.side in ("reward", "trajectory", "lifecycle")


def test_every_hookspec_is_exercised_by_a_test():
    """Implemented by a test plugin here, or by a plugin under plugins/ (whose own tests call it)."""
    files = [*(ROOT / "tests").glob("test_*.py"), *(ROOT / "plugins").glob("*/*/__init__.py")]
    sources = "\n".join(p.read_text() for p in files if p.name != "test_docs.py")
    missing = [f.__name__ for f in hookspec_functions() if f"def {f.__name__}(" not in sources]
    assert not missing, f"hooks with no test plugin implementing them: {missing}"


def test_readme_and_guide_name_every_hook():
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "authoring.md").read_text()
    missing = [f.__name__ for f in hookspec_functions() if f.__name__ not in text]
    assert not missing, missing
