"""Errors. Each names its culprit: the method, plugin, stage, option or hook."""

from __future__ import annotations

import difflib
from typing import NoReturn


class PORegistryError(Exception):
    """Base class of every error raised by po-registry."""


class UnknownMethodError(PORegistryError, ValueError):
    """A method name that no loaded plugin registered."""


class CompositionError(PORegistryError, ValueError):
    """Selected methods or components that cannot be assembled into one pipeline."""


class OptionError(PORegistryError, ValueError):
    """An unknown option, or a value an option does not accept."""


class PluginLoadError(PORegistryError):
    """A plugin that failed to load and is needed by the chosen methods."""


class HookError(PORegistryError, RuntimeError):
    """A hook implementation that raised, or returned a value that breaks the hook's contract."""

    def __init__(self, plugin: str, hook: str, step: int | None, problem: str):
        self.plugin, self.hook, self.step = plugin, hook, step
        where = f" at step {step}" if step is not None else ""
        super().__init__(f"plugin {plugin!r}, hook {hook}{where}: {problem}")


class UsageError(PORegistryError):
    """Bad input to a ``po-registry`` command, found before anything is written: one line, exit code 2."""


def fail(command: str, message: str) -> NoReturn:
    raise UsageError(f"po-registry {command}: error: {message}")


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class CouplingWarning(UserWarning):
    """A valid composition with a known coupling between its parts (for example a dense per-token signal under
    group std normalisation); plugins raise it from ``po_check_config``."""


def closest(name: str, candidates) -> str:
    """' Did you mean X?' for the closest candidate, or ''."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
