"""The plugin registry: a pluggy PluginManager over the ``po_registry`` entry-point group.

Built-in components are registered through the same hooks as third-party plugins. Environment variables:

- ``PO_REGISTRY_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins only).
- ``PO_REGISTRY_PLUGINS=name,name``: load only these entry points (entry-point or distribution names).

A plugin that fails to import, a method name registered twice or an option declared twice is a *load fault*:
shown by :meth:`Registry.describe` and raised when the chosen methods need the faulty plugin.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .diagnostics import SIDES, Detector, Failure
from .errors import OptionError, PluginLoadError, UnknownMethodError, closest

ENTRY_POINT_GROUP = "po_registry"
ENV_DISABLE_AUTOLOAD = "PO_REGISTRY_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "PO_REGISTRY_PLUGINS"
BASELINE_METHOD = "grpo"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected a boolean, got {value!r}")
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected a boolean, got {value!r}")


@dataclass(frozen=True)
class Option:
    """A plugin option: name, default and validation."""

    name: str
    default: Any
    plugin: str
    help: str = ""
    type: Callable[[Any], Any] | None = None
    choices: tuple | None = None
    check: Callable[[Any], bool] | None = None

    def coerce(self, value: Any) -> Any:
        """Convert and validate ``value``; raise :class:`OptionError` naming the option and plugin."""
        convert = _to_bool if self.type is bool else self.type
        try:
            if convert is not None and value is not None:
                value = convert(value)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"option {self.name!r} (plugin {self.plugin!r}): {exc}") from None
        if self.choices is not None and value not in self.choices:
            raise OptionError(
                f"option {self.name!r} (plugin {self.plugin!r}) must be one of {list(self.choices)}, got {value!r}"
            )
        if self.check is not None and not self.check(value):
            hint = f": {self.help}" if self.help else ""
            raise OptionError(f"option {self.name!r} (plugin {self.plugin!r}) rejects {value!r}{hint}")
        return value


@dataclass(frozen=True)
class Method:
    """A named method: components (plugin names) over the baseline, plus default option values."""

    name: str
    components: tuple[str, ...]
    plugin: str
    options: Mapping[str, Any] = field(default_factory=dict)
    replaces: tuple[str, ...] = ()
    # "reward", "trajectory" or "both": derived from the stage hooks its components implement (the registry fills
    # it in; "" while a component is not installed)
    side: str = ""
    summary: str = ""
    targets: str = ""
    paper: str = ""
    # What the method's loss claims to follow, for the gradient oracle: a po_registry.oracle.Objective, or a
    # function (args, options) -> Objective when it depends on the configuration; None: undeclared.
    objective: Any = None
    fixes: tuple[str, ...] = ()  # failure modes it targets (po_registry.diagnostics)
    risks: tuple[str, ...] = ()  # failure modes it may cause


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin."""

    name: str
    plugin: Any  # the instance the registry loaded (hook discovery, registration hooks); runs build their own
    distribution: str
    version: str
    builtin: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    factory: Callable[[], Any] | None = None  # the plugin's class: each run's pipeline builds a fresh instance

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "hooks": self.hooks,
            "error": self.error,
        }


def stage_of(hook_name: str) -> hookspecs.Stage:
    return getattr(hookspecs, hook_name).po_stage


STAGE_HOOKS = tuple(
    name
    for name, func in vars(hookspecs).items()
    if name.startswith("po_") and callable(func) and func.po_stage.side != "lifecycle"
)


class Registry:
    """Loaded plugins, the methods they register and the options they declare."""

    def __init__(self, autoload: bool | None = None, allow: Iterable[str] | None = None):
        if autoload is None:
            autoload = os.environ.get(ENV_DISABLE_AUTOLOAD, "").lower() not in _TRUE
        if allow is None and os.environ.get(ENV_ALLOW):
            allow = [name.strip() for name in os.environ[ENV_ALLOW].split(",") if name.strip()]
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.methods: dict[str, Method] = {}
        self.options: dict[str, Option] = {}
        self.tasks: dict = {}
        self.failures: dict[str, Failure] = {}
        self.detectors: dict[str, Detector] = {}
        self._detector_plugins: dict[str, str] = {}  # detector name -> the plugin that registered it
        self.faults: dict[str, list[str]] = {}  # plugin name -> problems found while loading
        self._load_faults: dict[str, list[str]] = {}

        from .builtin import BUILTIN_PLUGINS

        version = _version("po-registry")
        for name, plugin in BUILTIN_PLUGINS:
            self._add(name, plugin, "po-registry", version, builtin=True)
        if autoload:
            self._load_entry_points(set(allow) if allow is not None else None)
        self._collect()

    # -- loading ------------------------------------------------------------------------------------------------

    def _load_entry_points(self, allow: set[str] | None) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            if allow is not None and ep.name not in allow and dist not in allow:
                continue
            if ep.name in self.plugins:
                problem = f"entry point {ep.name!r} of {dist} clashes with an already loaded plugin"
                self._load_faults.setdefault(ep.name, []).append(problem)
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin is reported, never dropped silently
                self.plugins[ep.name] = PluginInfo(ep.name, None, dist, version, error=f"{type(exc).__name__}: {exc}")
                continue
            self._add(ep.name, plugin, dist, version)

    def _add(self, name: str, plugin: Any, distribution: str, version: str, builtin: bool = False) -> None:
        """Register a plugin: a class (each run builds its own instance; the registry keeps one for discovery) or an
        object used as it is (a module: it must keep no per-run state)."""
        factory = plugin if inspect.isclass(plugin) else None
        try:
            plugin = factory() if factory is not None else plugin
        except Exception as exc:
            self.plugins[name] = PluginInfo(name, None, distribution, version, builtin, f"{type(exc).__name__}: {exc}")
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # bad hook signature, unknown hook name
            self.plugins[name] = PluginInfo(name, None, distribution, version, builtin, f"{type(exc).__name__}: {exc}")
            return
        ignored = _unhonoured_hookimpl_options(self.pm, plugin)
        if ignored:  # the pipeline calls implementations one by one, in composition order: refuse, don't ignore
            self.pm.unregister(plugin)
            self.plugins[name] = PluginInfo(name, None, distribution, version, builtin, "; ".join(ignored))
            return
        hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        self.plugins[name] = PluginInfo(name, plugin, distribution, version, builtin, hooks=hooks, factory=factory)
        for problem in hookspecs.component_attribute_faults(plugin):
            self._load_faults.setdefault(name, []).append(problem)
        api = getattr(plugin, "po_registry_api", hookspecs.API_VERSION)
        if api not in hookspecs.SUPPORTED_API_VERSIONS:
            supported = ", ".join(map(str, sorted(hookspecs.SUPPORTED_API_VERSIONS)))
            changes = "; ".join(f"version {version}: {change}" for version, change in
                                sorted(hookspecs.API_CHANGES.items()) if isinstance(api, int) and version > api)
            self._load_faults.setdefault(name, []).append(
                f"written for hook specification version {api}; this po-registry supports {supported}"
                + (f" ({changes})" if changes else ""))

    def register(self, plugin: Any, name: str, distribution: str = "(registered at run time)") -> None:
        """Register a plugin class or object by hand (notebooks, tests): the same as an entry point named ``name``."""
        if name in self.plugins:
            raise ValueError(f"a plugin named {name!r} is already loaded (from {self.plugins[name].distribution})")
        self._add(name, plugin, distribution, "?")
        self._collect()

    def _fault(self, plugin: str, problem: str) -> None:
        self.faults.setdefault(plugin, []).append(problem)

    def _collect(self) -> None:
        self.methods.clear()
        self.options.clear()
        self.tasks.clear()
        self.failures.clear()
        self.detectors.clear()
        self._detector_plugins.clear()
        self.faults = {name: list(problems) for name, problems in self._load_faults.items()}
        for info in self.plugins.values():
            if info.plugin is None:
                continue
            for impl in self.pm.hook.po_register_methods.get_hookimpls():
                if impl.plugin is info.plugin:
                    self._call_registration(info.name, impl.function, "po_register_methods", self._method_adder)
            for impl in self.pm.hook.po_declare_options.get_hookimpls():
                if impl.plugin is info.plugin:
                    self._call_registration(info.name, impl.function, "po_declare_options", self._option_adder)
            for hook, adder in (("po_register_tasks", self._task_adder), ("po_register_failures", self._failure_adder),
                                ("po_register_detectors", self._detector_adder)):
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin is info.plugin:
                        self._call_registration(info.name, impl.function, hook, adder)

        for name, method in self.methods.items():
            self.methods[name] = dataclasses.replace(method, side=self._derived_side(method))
        self._check_failure_names()

    def _check_failure_names(self) -> None:
        """Every failure a method or detector names is in the vocabulary (a load fault of its plugin otherwise)."""
        def unknown(names):
            return [f"{name!r}{closest(name, self.failures)}" for name in names if name not in self.failures]

        for method in self.methods.values():
            for field_name in ("fixes", "risks"):
                bad = unknown(getattr(method, field_name))
                if bad:
                    self._fault(method.plugin, f"method {method.name!r}: {field_name} names unknown failure(s) "
                                               f"{', '.join(bad)}; see `po-registry failures`")
        for name, detector in list(self.detectors.items()):
            bad = unknown([detector.failure])
            if bad:
                self._fault(self._detector_plugins[name], f"detector {name!r} reports unknown failure {bad[0]}")
                del self.detectors[name]

    def _derived_side(self, method: Method) -> str:
        """The factor(s) of J the method changes: the sides of the stage hooks its components implement."""
        sides = set()
        for component in method.components:
            info = self.plugins.get(component)
            if info is None or info.plugin is None:
                return ""
            sides |= {stage_of(hook).side for hook in info.hooks if hook in STAGE_HOOKS}
        return "both" if len(sides) == 2 else next(iter(sides), "")

    def _call_registration(self, plugin: str, function, hook: str, adder) -> None:
        try:
            function(adder(plugin))
        except Exception as exc:
            self._fault(plugin, f"{hook} raised {type(exc).__name__}: {exc}")

    def _method_adder(self, plugin: str):
        def register(name: str, components: Iterable[str] = (), options: Mapping[str, Any] | None = None,
                     replaces: Iterable[str] = (), summary: str = "", targets: str = "", paper: str = "",
                     objective: Any = None, fixes: Iterable[str] = (), risks: Iterable[str] = ()) -> None:
            if name in self.methods:
                other = self.methods[name].plugin
                self._fault(plugin, f"method {name!r} is already registered by plugin {other!r}")
                self._fault(other, f"method {name!r} is also registered by plugin {plugin!r}")
                return
            if objective is not None:
                from .objectives import Objective

                if not (isinstance(objective, Objective) or callable(objective)):
                    self._fault(plugin, f"method {name!r}: objective must be a po_registry.oracle.Objective or a "
                                        f"function (args, options) -> Objective, got {type(objective).__name__}")
                    return
            self.methods[name] = Method(name, tuple(components), plugin, dict(options or {}), tuple(replaces),
                                        "", summary, targets, paper, objective, _names(fixes), _names(risks))

        return register

    def _option_adder(self, plugin: str):
        def register(name: str, default: Any, help: str = "", type: Callable | None = None,
                     choices: Iterable | None = None, check: Callable[[Any], bool] | None = None) -> None:
            if name in self.options:
                other = self.options[name].plugin
                self._fault(plugin, f"option {name!r} is already declared by plugin {other!r}")
                self._fault(other, f"option {name!r} is also declared by plugin {plugin!r}")
                return
            self.options[name] = Option(name, default, plugin, help, type, tuple(choices) if choices else None, check)

        return register

    def _failure_adder(self, plugin: str):
        def register(name: str, side: str, summary: str) -> None:
            if side not in SIDES:
                self._fault(plugin, f"failure {name!r}: side must be one of {', '.join(SIDES)}, got {side!r}")
            elif name in self.failures:
                other = self.failures[name].plugin
                self._fault(plugin, f"failure {name!r} is already registered by plugin {other!r}")
            else:
                self.failures[name] = Failure(name, side, summary, plugin)

        return register

    def _detector_adder(self, plugin: str):
        def register(detector: Detector) -> None:
            missing = [a for a in ("name", "failure", "metrics", "defaults", "check") if not hasattr(detector, a)]
            if missing:
                self._fault(plugin, f"register({detector!r}): a detector needs {', '.join(missing)} "
                                    "(po_registry.diagnostics.Detector)")
            elif detector.name in self.detectors:
                other = self._detector_plugins[detector.name]
                self._fault(plugin, f"detector {detector.name!r} is already registered by plugin {other!r}")
            else:
                self.detectors[detector.name] = detector
                self._detector_plugins[detector.name] = plugin

        return register

    def _task_adder(self, plugin: str):
        def register(task) -> None:
            if task.name in self.tasks:
                other = self.tasks[task.name].plugin
                self._fault(plugin, f"task {task.name!r} is already registered by plugin {other!r}")
                return
            self.tasks[task.name] = dataclasses.replace(task, plugin=plugin)

        return register

    # -- lookup -------------------------------------------------------------------------------------------------

    def method(self, name: str) -> Method:
        """The method registered as ``name``; an unknown name lists the available ones and the closest match."""
        if name not in self.methods:
            message = f"unknown method {name!r}.{closest(name, self.methods)} Available: {', '.join(sorted(self.methods))}."
            broken = [f"{info.name} ({info.error})" for info in self.plugins.values() if info.error]
            if broken:
                message += f" Plugins that failed to load: {'; '.join(broken)}."
            raise UnknownMethodError(message)
        return self.methods[name]

    def plugin(self, name: str, needed_by: str) -> Any:
        """The loaded plugin object ``name``; raise if it is missing, failed to load or has load faults."""
        info = self.plugins.get(name)
        if info is None:
            raise PluginLoadError(f"method {needed_by!r} needs plugin {name!r}, which is not installed "
                                  f"(or not allowed by {ENV_ALLOW}/{ENV_DISABLE_AUTOLOAD}).")
        if info.error:
            raise PluginLoadError(f"method {needed_by!r} needs plugin {name!r} ({info.distribution}), "
                                  f"which failed to load: {info.error}")
        if name in self.faults:
            raise PluginLoadError(f"method {needed_by!r} needs plugin {name!r}, which has load faults: "
                                  + "; ".join(self.faults[name]))
        return info.plugin

    def instantiate(self, name: str, prototype: Any) -> Any:
        """A fresh instance of plugin ``name`` for one run (the plugin object itself when it is not a class).
        ``prototype``: the loaded instance the assembly chose, checked to be this registry's."""
        info = self.plugins[name]
        if info.plugin is not prototype:
            raise ValueError(f"plugin {name!r} of the assembly is not the one this registry loaded")
        return info.factory() if info.factory is not None else info.plugin

    def option(self, name: str) -> Option:
        if name not in self.options:
            raise OptionError(f"unknown option {name!r}.{closest(name, self.options)}")
        return self.options[name]

    def describe(self) -> list[dict]:
        """Installed plugins: distribution, version, hooks implemented, methods registered, faults."""
        rows = []
        for info in self.plugins.values():
            row = info.as_dict()
            row["methods"] = sorted(m.name for m in self.methods.values() if m.plugin == info.name)
            row["faults"] = self.faults.get(info.name, [])
            rows.append(row)
        return rows


def _names(names: str | Iterable[str]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


UNHONOURED_HOOKIMPL_OPTIONS = ("tryfirst", "trylast", "hookwrapper", "wrapper")


def _unhonoured_hookimpl_options(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """What the plugin's hook implementations ask of pluggy that po-registry does not do: call order comes from
    the composition (a method's components, in the order methods are chosen), not from tryfirst/trylast, and no
    implementation wraps another."""
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin:
                asked = [option for option in UNHONOURED_HOOKIMPL_OPTIONS if getattr(impl, option, False)]
                if asked:
                    problems.append(f"{caller.name} is marked {', '.join(asked)}, which po-registry does not "
                                    "honour (stages run in composition order; no implementation wraps another)")
    return problems


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    return Registry()


def get_tasks() -> dict:
    """Built-in tasks plus those registered by plugins, by name."""
    return get_registry().tasks


def get_task(name: str):
    """The registered :class:`~po_registry.tasks.Task` called ``name``; an unknown name is one clear error."""
    from .tasks import UnknownTaskError

    tasks = get_tasks()
    if name not in tasks:
        raise UnknownTaskError(f"unknown task {name!r}.{closest(name, tasks)} Available: {', '.join(sorted(tasks))}.")
    return tasks[name]


def reload_registry() -> Registry:
    """Forget the loaded registry (after installing a plugin or changing the environment variables)."""
    get_registry.cache_clear()
    return get_registry()
