"""Assembly of chosen methods into one pipeline, and the calls of its stages.

Assembly starts from the components of the baseline method ``grpo``. Each chosen method's components join it:
a component that implements a single-owner stage takes that stage over from the baseline; composable
components add up. Two chosen components claiming one single-owner stage is an error naming both.

Stages are called one implementation at a time, so that an exception or a bad return value names the plugin,
the hook and the step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .batches import LossBatch, RewardBatch, Scored, _ignore_metric
from .errors import CompositionError, HookError, OptionError, closest
from . import hookspecs
from .registry import BASELINE_METHOD, STAGE_HOOKS, Method, Registry, get_registry, stage_of


@dataclass
class Assembly:
    """The resolved composition: methods, components (name -> plugin), stage owners and option values."""

    methods: list[Method]
    components: dict[str, Any]
    owners: dict[str, list[str]]  # stage hook -> implementing component names, in call order
    options: dict[str, Any]
    option_sources: dict[str, str] = field(default_factory=dict)  # option -> "default" | "method X" | "user"
    specs: list[str] = field(default_factory=list)  # the methods as chosen, selectors included ("dapo:-aggregation")
    carries: frozenset[str] = frozenset()  # keys the reward-side stages of this composition may carry to the loss

    def importance_level(self, args) -> str:
        """'token' or 'sequence': the granularity of the importance-weight owner (a component may declare
        ``po_importance_level``; the baseline follows ``importance_sampling_level``)."""
        (owner,) = self.owners["po_log_importance_weights"]
        return getattr(self.components[owner], "po_importance_level", None) or args.importance_sampling_level

    def explain(self) -> str:
        """The pipeline stage by stage: side, owners and options."""
        lines = [f"methods: {', '.join(self.specs or [m.name for m in self.methods])}"]
        for hook in STAGE_HOOKS:
            stage = stage_of(hook)
            owners = self.owners.get(hook, [])
            kind = "single owner" if stage.single_owner else f"composable ({stage.combine})"
            lines.append(f"  [{stage.side}] {hook} ({kind}): {', '.join(owners) or '-'}")
            for owner in owners:
                role = getattr(self.components[owner], "po_explain", {}).get(hook)
                if role:
                    lines.append(f"      {owner}: {role}")
        if self.options:
            lines.append("options:")
            for name, value in sorted(self.options.items()):
                lines.append(f"  {name} = {value!r} ({self.option_sources[name]})")
        return "\n".join(lines)


def _implemented_hooks(plugin: Any, registry: Registry) -> set[str]:
    return {caller.name for caller in registry.pm.get_hookcallers(plugin) or []}


def stage_selectors() -> dict[str, frozenset[str]]:
    """What a method selector may name: a side (``reward``, ``trajectory``), a stage's short name (``aggregation``)
    or its hook name (``po_aggregate_loss``), each mapped to the stage hooks it stands for."""
    selectors = {side: frozenset(hook for hook in STAGE_HOOKS if stage_of(hook).side == side)
                 for side in ("reward", "trajectory")}
    for hook in STAGE_HOOKS:
        selectors[stage_of(hook).name] = selectors[hook] = frozenset({hook})
    return selectors


def parse_method(spec: str) -> tuple[str, frozenset[str] | None]:
    """``"name"`` or ``"name:selector+selector"`` -> (name, the stage hooks the method may own, or None for all).
    A selector is a side or a stage; ``-`` in front removes it: ``dr-grpo:reward`` keeps dr-grpo's reward side,
    ``dapo:-aggregation`` all of dapo but its loss aggregation."""
    name, colon, selection = (part.strip() for part in spec.partition(":"))
    if not colon:
        return name, None
    known = stage_selectors()
    include: set[str] = set()
    exclude: set[str] = set()
    for part in (part.strip() for part in selection.split("+")):
        word = part.removeprefix("-")
        if word not in known:
            sides = ", ".join(s for s in known if s in ("reward", "trajectory"))
            stages = ", ".join(stage_of(h).name for h in STAGE_HOOKS)
            raise CompositionError(f"method {spec!r}: unknown selector {word or part!r}.{closest(word, known)} "
                                   f"Selectors: a side ({sides}) or a stage ({stages}), '-' in front to remove it, "
                                   "joined with '+'")
        (exclude if part.startswith("-") else include).update(known[word])
    return name, frozenset((include or set(STAGE_HOOKS)) - exclude)


def _with_selector(spec: str, hook: str) -> str:
    """``spec`` with the stage ``hook`` removed from it: ``dapo`` -> ``dapo:-aggregation``."""
    short = stage_of(hook).name
    return f"{spec}+-{short}" if ":" in spec else f"{spec}:-{short}"


def _clash_message(clashes: list[tuple[str, str, str]], brought_by: Mapping[str, str], specs: list[str],
                   stages: Mapping[str, set[str]]) -> str:
    """Each single-owner stage claimed twice, with both owners, and the two compositions that resolve the clashes
    between the first two methods (each removing those stages from one of them, or the method itself when it would
    keep no other stage)."""
    lines = [f"stage {hook} has two owners: plugin {first!r} (from method {brought_by[first]!r}) and plugin "
             f"{second!r} (from method {brought_by[second]!r})" for hook, first, second in clashes]
    message = "; ".join(lines) + "; a single-owner stage takes exactly one"
    _, first, second = clashes[0]
    pair = (brought_by[first], brought_by[second])
    if pair[0] != pair[1]:
        hooks = [hook for hook, a, b in clashes if {brought_by[a], brought_by[b]} == set(pair)]
        resolutions = []
        for loser in pair:
            own = set().union(*(owned for name, owned in stages.items() if brought_by[name] == loser))
            narrowed = loser
            for hook in hooks:
                narrowed = _with_selector(narrowed, hook)
            kept = [narrowed if spec == loser else spec for spec in specs if spec != loser or own - set(hooks)]
            resolutions.append(",".join(kept))
        message += f". To keep one of them, compose {resolutions[0]!r} or {resolutions[1]!r}"
    return message


def assemble(
    methods: Iterable[str], options: Mapping[str, Any] | None = None, registry: Registry | None = None
) -> Assembly:
    """Resolve method specs (names, with optional side or stage selectors: :func:`parse_method`) into an
    :class:`Assembly`; raise a clear error on any conflict or bad option."""
    registry = registry or get_registry()
    specs = [spec.strip() for spec in methods] or [BASELINE_METHOD]
    parsed = [parse_method(spec) for spec in specs]
    names = [name for name, _ in parsed]
    if len(set(names)) != len(names):
        raise CompositionError(f"method listed twice in {specs}")
    chosen = [registry.method(name) for name in names]
    baseline = registry.method(BASELINE_METHOD)

    # Who brought each component, for error messages; the stages each one owns here (a selector narrows them).
    brought_by: dict[str, str] = {}
    replaced = {name for method in chosen for name in method.replaces}
    components: dict[str, Any] = {}
    stages: dict[str, set[str]] = {}
    deselected: dict[str, set[str]] = {}  # method -> its components that a selector left without a stage
    for spec, (name, allowed), method in zip(specs, parsed, chosen):
        kept_any = False
        for component in method.components:
            plugin = registry.plugin(component, needed_by=method.name)
            hooks = _implemented_hooks(plugin, registry) & set(STAGE_HOOKS)
            kept = hooks if allowed is None else hooks & allowed
            if hooks and not kept:
                deselected.setdefault(method.name, set()).add(component)
                continue
            kept_any = kept_any or bool(kept)
            components[component] = plugin
            brought_by.setdefault(component, spec)
            stages.setdefault(component, set()).update(kept)
        if allowed is not None and not kept_any:
            raise CompositionError(f"method {spec!r} keeps no stage: its selector leaves none of the stages its "
                                   "components implement")

    owners = {hook: [name for name in components if hook in stages[name]] for hook in STAGE_HOOKS}
    clashes = [(hook, *owners[hook][:2]) for hook in STAGE_HOOKS
               if stage_of(hook).single_owner and len(owners[hook]) > 1]
    if clashes:
        raise CompositionError(_clash_message(clashes, brought_by, specs, stages))

    # Fill from the baseline: single-owner stages nobody claimed, and composable baseline components not replaced.
    for name in baseline.components:
        if name in components or name in replaced:
            continue
        plugin = registry.plugin(name, needed_by=BASELINE_METHOD)
        stage_hooks = _implemented_hooks(plugin, registry) & set(STAGE_HOOKS)
        if any(stage_of(h).single_owner and owners[h] for h in stage_hooks):
            continue  # this stage was taken over by a chosen method
        components[name] = plugin
        brought_by[name] = BASELINE_METHOD
        stages[name] = stage_hooks
        for hook in stage_hooks:
            owners[hook].append(name)
    for hook in STAGE_HOOKS:
        if stage_of(hook).single_owner and not owners[hook]:
            raise CompositionError(f"stage {hook} has no owner: no chosen method nor the baseline implements it")
    # Keep the baseline's order first, then the methods' components, for a stable call order.
    order: dict[str, int] = {}
    for name in [*baseline.components, *brought_by]:
        order.setdefault(name, len(order))
    for hook in owners:
        owners[hook].sort(key=lambda name: order[name])

    (advantage_owner,) = owners["po_compute_advantages"]
    if owners["po_token_rewards"] and "token_rewards" not in getattr(components[advantage_owner], "po_reads", ()):
        dense = ", ".join(f"plugin {name!r} (from method {brought_by[name]!r})" for name in owners["po_token_rewards"])
        readers = sorted(method.name for method in registry.methods.values()
                         if any("token_rewards" in getattr(registry.plugins[c].plugin, "po_reads", ())
                                for c in method.components if c in registry.plugins and registry.plugins[c].plugin))
        raise CompositionError(
            f"dense token rewards of {dense} would be dropped: the advantage estimator, plugin {advantage_owner!r} "
            f"(from method {brought_by[advantage_owner]!r}), gives one advantage per sequence and does not read "
            f"batch.token_rewards; compose them with one that does ({', '.join(readers)})")
    reward_side = {hook for hook in STAGE_HOOKS if stage_of(hook).side == "reward"}
    carries = frozenset(key for name, plugin in components.items() if stages[name] & reward_side
                        for key in getattr(plugin, "po_carries", None) or ())
    for name, plugin in components.items():
        missing = [key for key in getattr(plugin, "po_uses_carried", None) or () if key not in carries]
        if missing and stages[name]:
            raise CompositionError(
                f"plugin {name!r} (from method {brought_by[name]!r}) reads {', '.join(map(repr, missing))} from the "
                "rollout, which no reward-side stage of this composition carries (po_carries); keep the stage that "
                "produces it")
    values, sources = _resolve_options(chosen, components, options or {}, registry, deselected)
    return Assembly(chosen, components, owners, values, sources, specs, carries)


def _resolve_options(chosen: list[Method], components: Mapping[str, Any], user: Mapping[str, Any],
                     registry: Registry, deselected: Mapping[str, set[str]]) -> tuple[dict[str, Any], dict[str, str]]:
    declared = {name: opt for name, opt in registry.options.items() if opt.plugin in components}
    values = {name: opt.default for name, opt in declared.items()}
    sources = {name: "default" for name in declared}
    for method in chosen:
        for name, value in method.options.items():
            if name not in declared and name in registry.options and \
                    registry.options[name].plugin in deselected.get(method.name, ()):
                continue  # a default for a component this composition's selector left out
            if name not in declared:
                raise OptionError(f"method {method.name!r} sets option {name!r}, which none of its components declares")
            if sources[name].startswith("method") and values[name] != value:
                raise CompositionError(
                    f"option {name!r} is set to {values[name]!r} by {sources[name]} and to {value!r} by method "
                    f"{method.name!r}"
                )
            values[name], sources[name] = declared[name].coerce(value), f"method {method.name}"
    for name, value in user.items():
        if name not in declared:
            if name in registry.options:
                raise OptionError(f"option {name!r} belongs to plugin {registry.options[name].plugin!r}, which none "
                                  "of the chosen methods uses")
            available = ", ".join(sorted(declared)) or "none"
            raise OptionError(f"unknown option {name!r}.{closest(name, declared)} Options of the chosen methods: "
                              f"{available}.")
        values[name], sources[name] = declared[name].coerce(value), "user"
    return values, sources


class Pipeline:
    """Runs the stages of an :class:`Assembly` with per-plugin attribution and output checks.

    A pipeline is one run's: it builds its own instance of every component (a plugin class is instantiated afresh)
    and holds the run's auxiliary models (``auxiliary``: name -> :class:`~po_registry.context.AuxiliaryModel`, which
    the batches it is given expose to the stages), so two trainers in one process share no state."""

    def __init__(self, assembly: Assembly, registry: Registry | None = None):
        self.assembly = assembly
        registry = registry or get_registry()
        self.components = {name: registry.instantiate(name, plugin) for name, plugin in assembly.components.items()}
        self.auxiliary: dict[str, Any] = {}
        self._impls: dict[str, list[tuple[str, Any, tuple[str, ...]]]] = {}
        for hook in (*STAGE_HOOKS, "po_check_config", "po_setup", "po_state_dict", "po_load_state_dict"):
            impls = []
            callers = assembly.owners.get(hook)  # a stage's owners (a selector may have taken it from a component)
            for impl in getattr(registry.pm.hook, hook).get_hookimpls():
                name = next((n for n, p in assembly.components.items() if p is impl.plugin), None)
                if name is not None and (callers is None or name in callers):
                    impls.append((name, _bound(impl.function, impl.plugin, self.components[name]),
                                  tuple(impl.argnames)))
            order = {name: i for i, name in enumerate(assembly.owners.get(hook) or assembly.components)}
            impls.sort(key=lambda item: order.get(item[0], len(order)))
            self._impls[hook] = impls

    @property
    def options(self) -> dict[str, Any]:
        return self.assembly.options

    def _invoke(self, hook: str, step: int | None, plugin: str, function, argnames, kwargs: Mapping[str, Any]):
        """Call one implementation with the arguments it asks for; an exception names plugin, hook and step."""
        try:
            return function(*[kwargs[name] for name in argnames])
        except HookError:
            raise
        except Exception as exc:
            raise HookError(plugin, hook, step, f"raised {type(exc).__name__}: {exc}") from exc

    def _call(self, hook: str, step: int | None, **kwargs):
        """Yield (plugin, result) for each implementation of ``hook``, in call order."""
        for plugin, function, argnames in self._impls[hook]:
            yield plugin, self._invoke(hook, step, plugin, function, argnames, kwargs)

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def check_config(self, args) -> None:
        for plugin, function, argnames in self._impls["po_check_config"]:
            kwargs = {"args": args, "options": self.options, "assembly": self.assembly}
            try:
                function(*[kwargs[name] for name in argnames])
            except (ValueError, TypeError) as exc:
                raise OptionError(f"plugin {plugin!r}: {exc}") from None

    def setup(self, context) -> None:
        """Each component's po_setup with the run's :class:`~po_registry.context.RunContext`."""
        for _ in self._call("po_setup", None, context=context, options=self.options):
            pass

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: each component's po_state_dict, and every trainable auxiliary model's state."""
        states = {plugin: state for plugin, state in self._call("po_state_dict", None) if state is not None}
        states.update({AUXILIARY_PREFIX + name: model.state_dict() for name, model in self.auxiliary.items()
                       if model.trainable})
        return states

    def load_state_dict(self, states: Mapping[str, Any]) -> None:
        for plugin, function, argnames in self._impls["po_load_state_dict"]:
            if plugin in states:
                self._invoke("po_load_state_dict", None, plugin, function, argnames, {"state": states[plugin]})
        for name, model in self.auxiliary.items():
            if model.trainable and AUXILIARY_PREFIX + name in states:
                model.load_state_dict(states[AUXILIARY_PREFIX + name])

    # -- the stages: each combined and checked as its Stage in the hook specification says -------------------------

    def run(self, hook: str, step: int | None, expect: Mapping[str, Any], initial: Any = None, **kwargs) -> Any:
        """Call every implementation of stage ``hook`` in composition order and combine the results as its
        :class:`~po_registry.hookspecs.Stage` says (``initial``: the value the first result combines with; a fold
        passes each result on as the stage's first argument). Each result is checked against the stage's declared
        output, with ``expect`` giving the run-time sizes (``like``: a tensor on the expected device; ``shapes``:
        the allowed shapes). None is no contribution (an error from a single owner)."""
        stage, fold_argument = _STAGES[hook]
        value = initial
        for plugin, function, argnames in self._impls[hook]:
            result = self._invoke(hook, step, plugin, function, argnames, kwargs)
            if result is None:
                if stage.single_owner:
                    raise HookError(plugin, hook, step, "returned None; the stage's single owner must return "
                                    + hookspecs.OUTPUTS[stage.output])
                continue
            _check_output(stage.output, result, plugin, hook, step, expect)
            if stage.combine in ("single", "fold"):
                value = result
                if fold_argument is not None:
                    kwargs[fold_argument] = result
            elif value is None:
                value = result
            elif stage.combine == "sum":
                value = value + result
            elif stage.combine == "product":
                value = value * result
            elif stage.combine == "all":
                value = value & result
            elif stage.combine == "max":
                value = max(value, result)
        return value

    # -- reward side --------------------------------------------------------------------------------------------

    def shape_rewards(self, rewards: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        """The reward matrix folded through every shaping plugin."""
        return self.run("po_shape_rewards", batch.step, {"like": rewards, "shapes": [tuple(rewards.shape)]},
                        initial=rewards, rewards=rewards, batch=batch)

    def token_rewards(self, batch: RewardBatch) -> torch.Tensor | None:
        """Sum of dense (B, T) token rewards on this process's rows (``batch.local``), or None."""
        like = batch.local_mask if self._impls["po_token_rewards"] else None  # no rollout needed when none runs
        expect = {"like": like, "shapes": [] if like is None else [tuple(like.shape)]}
        return self.run("po_token_rewards", batch.step, expect, batch=batch)

    def greedy_baseline(self, batch: RewardBatch) -> torch.Tensor:
        """(N,) weighted reward of the greedy completions (``batch.greedy_completions``), shaped by the same
        po_shape_rewards fold as the samples, with the greedy completions' own lengths and truncation. Their
        shaping metrics are not logged: the metrics describe the samples."""
        rewards, lengths, truncated = batch.greedy_completions()
        greedy_batch = dataclasses.replace(
            batch, completion_lengths=lengths, truncated=truncated, local={}, rows=[], completion_mask=None,
            token_rewards=None, policy_logps=None, greedy_completions=None, greedy_rewards=None,
            log_metric=_ignore_metric)
        return batch.weighted_reward(self.shape_rewards(rewards, greedy_batch))

    def score(self, rewards: torch.Tensor, batch: RewardBatch) -> Scored:
        """The reward side after shaping, in the order of the specification: dense token rewards on this process's
        rows (gathered), advantages, sample and group selection. ``rewards``: the shaped (N, K) matrix; ``batch``:
        the rollout batch. The advantage stage's batch is built here, once: the rollout batch with the gathered
        ``token_rewards`` and the lazily shaped greedy baseline (when the rollout offers greedy completions)."""
        dense = self.token_rewards(batch)
        greedy = batch.greedy_rewards
        if greedy is None and batch.greedy_completions is not None:
            greedy = functools.cache(lambda: self.greedy_baseline(batch))
        batch = dataclasses.replace(batch, token_rewards=None if dense is None else batch.gather(dense),
                                    greedy_rewards=greedy)
        return Scored(advantages=self.compute_advantages(rewards, batch), rewards=batch.weighted_reward(rewards),
                      keep_samples=self.select_samples(rewards, batch), keep_groups=self.select_groups(rewards, batch))

    def compute_advantages(self, rewards: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        """The advantage stage on a batch that has what it reads (``completion_mask``, ``token_rewards``)."""
        n = batch.num_rows
        shapes = [(n,)] + ([tuple(batch.completion_mask.shape)] if batch.completion_mask is not None else [])
        advantages = self.run("po_compute_advantages", batch.step, {"like": rewards, "shapes": shapes},
                              rewards=rewards, batch=batch)
        if batch.token_rewards is not None and advantages.dim() == 1:
            (owner,) = self.assembly.owners["po_compute_advantages"]
            dense = ", ".join(self.assembly.owners["po_token_rewards"])
            raise HookError(owner, "po_compute_advantages", batch.step,
                            f"returned one advantage per sequence and so drops the dense token rewards of {dense}; "
                            "compose the dense reward with an advantage estimator that uses batch.token_rewards")
        return advantages

    def select_groups(self, rewards: torch.Tensor, batch: RewardBatch) -> torch.Tensor | None:
        """Intersection of the groups every plugin keeps, (N // G,) bool, or None."""
        return self.run("po_select_groups", batch.step, {"shapes": [(batch.num_groups,)]}, rewards=rewards,
                        batch=batch)

    def select_samples(self, rewards: torch.Tensor, batch: RewardBatch) -> torch.Tensor | None:
        """Intersection of the completions every plugin keeps, (N,) bool, or None."""
        return self.run("po_select_samples", batch.step, {"shapes": [(batch.num_rows,)]}, rewards=rewards,
                        batch=batch)

    def refill_rounds(self) -> int:
        """Extra generation rounds for dynamic sampling: the largest any plugin asks for (0 if none)."""
        return self.run("po_refill_rounds", None, {}, initial=0, options=self.options)

    # -- trajectory side ----------------------------------------------------------------------------------------

    def loss(self, batch: LossBatch) -> torch.Tensor:
        """The micro-batch loss: objective x masks x corrections + token penalties, aggregated, + loss penalties,
        divided by the gradient-accumulation steps (so an optimizer step averages its micro-batches)."""
        step, B, T = batch.step, *batch.mask.shape
        tokens = {"like": batch.logps, "shapes": [(B, T), (B, 1)]}
        log_weights = self.run("po_log_importance_weights", step, tokens, batch=batch)
        per_token_loss = self.run("po_policy_objective", step, tokens, batch=batch, log_weights=log_weights)
        per_token_loss = self.run("po_token_mask", step, tokens, initial=per_token_loss, batch=batch)
        per_token_loss = self.run("po_rollout_correction", step, tokens, initial=per_token_loss, batch=batch)
        per_token_loss = self.run("po_token_penalty", step, tokens, initial=per_token_loss, batch=batch,
                                  log_weights=log_weights)
        scalar = {"like": batch.logps, "shapes": [()]}
        loss = self.run("po_aggregate_loss", step, scalar, per_token_loss=per_token_loss, batch=batch)
        loss = self.run("po_loss_penalty", step, scalar, initial=loss, batch=batch)
        return loss / batch.accumulation_steps


# Each stage's spec and, for a fold, the argument each result is passed on as (the hookspec's first parameter).
_STAGES = {hook: (stage_of(hook), next(iter(inspect.signature(getattr(hookspecs, hook)).parameters))
                  if stage_of(hook).combine == "fold" else None) for hook in STAGE_HOOKS}
AUXILIARY_PREFIX = "auxiliary/"  # checkpoint keys of the auxiliary models' states


def _bound(function, prototype: Any, instance: Any):
    """``function`` (a hook implementation of the registry's ``prototype``) bound to this run's ``instance``."""
    if instance is not prototype and inspect.ismethod(function) and function.__self__ is prototype:
        return types.MethodType(function.__func__, instance)
    return function


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}, on {value.device}"
    return type(value).__name__


def _check_output(output: str, value: Any, plugin: str, hook: str, step: int | None,
                  expect: Mapping[str, Any]) -> None:
    """A stage's result against its declared output (:data:`po_registry.hookspecs.OUTPUTS`): a count, a bool mask,
    or a floating-point tensor on the batch's device, of an allowed shape, finite (NaN allowed in a reward matrix)."""
    problem = None
    shapes = expect.get("shapes", [])
    if output == "rounds":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problem = f"must return an int >= 0, got {value!r}"
    elif output in ("row_keep", "group_keep"):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or tuple(value.shape) not in shapes:
            problem = f"must return a bool tensor of shape {shapes[0]}, got {_describe(value)}"
    elif not isinstance(value, torch.Tensor):
        problem = f"must return a tensor, got {_describe(value)}"
    elif not value.is_floating_point():
        problem = f"must return a floating-point tensor, got dtype {value.dtype}"
    elif value.device != expect["like"].device:
        problem = f"returned a tensor on {value.device}, expected {expect['like'].device}"
    elif tuple(value.shape) not in shapes:
        problem = f"returned shape {tuple(value.shape)}, expected {' or '.join(str(s) for s in shapes)}"
    elif output == "reward_matrix" and torch.isinf(value).any():
        problem = "returned inf values"
    elif output != "reward_matrix" and not torch.isfinite(value).all():
        problem = f"returned {'NaN' if torch.isnan(value).any() else 'inf'} values"
    if problem is not None:
        raise HookError(plugin, hook, step, problem)
