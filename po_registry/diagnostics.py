"""Diagnostics: what is going wrong in a run, on which side of J(theta), and which installed methods address it.

A **failure** is a named mode on one side (the vocabulary below; plugins add their own): the reward side R(tau) or
the trajectory side p_theta(tau). Methods declare the failures they fix and those they may cause
(``register(..., fixes=..., risks=...)``). A **detector** reads a run's logged metrics and fires once, with a
**finding**: the failure, the step where it began and the metric values it read. Detectors run during training (the
trainer feeds every log line to :class:`Diagnostics`) and afterwards on a run's log (``po-registry diagnose``
replays it line by line): one code path, so a run and its diagnosis agree. Each check reads only the newest values
of its metrics, so a step costs the same at step 10 and at step 10 000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import OptionError, closest

SIDES = ("reward", "trajectory")


@dataclass(frozen=True)
class Failure:
    """A failure mode: its name, the side of J where it arises, and one line on what goes wrong."""

    name: str
    side: str
    summary: str
    plugin: str = ""  # who registered it (the registry fills it in)


FAILURES = (
    Failure("zero-variance-groups", "reward", "every completion of a prompt gets the same reward: A = 0, the group "
            "gives no gradient and the effective batch shrinks"),
    Failure("entropy-collapse", "trajectory", "the policy's entropy falls far below where it started: exploration "
            "stops and groups turn all-right or all-wrong"),
    Failure("entropy-explosion", "trajectory", "the policy's entropy rises far above where it started: sampling "
            "turns to noise"),
    Failure("clip-saturation", "trajectory", "a large share of tokens sit outside the clip range: their gradient "
            "is dropped (too many updates per batch, or a clip too narrow)"),
    Failure("ratio-outliers", "trajectory", "a few extreme importance ratios dominate the update (token-level "
            "noise, MoE routing changes)"),
    Failure("length-drift", "trajectory", "completion lengths grow far beyond where they started: the loss "
            "aggregation's length bias rewards long wrong answers less harshly"),
    Failure("truncation", "reward", "many completions hit the length cap and are scored as failures: the reward "
            "says 'wrong' where it means 'unfinished'"),
    Failure("kl-blowup", "trajectory", "the KL divergence to the reference policy grows large: the policy leaves "
            "the region the reference anchors"),
    Failure("sampler-mismatch", "trajectory", "the sampler's token probabilities differ from the trainer's: "
            "on-policy training is silently off-policy"),
    Failure("reward-hacking", "reward", "the training reward rises while held-out accuracy stays flat or falls: "
            "the policy exploits the reward instead of solving the task"),
    Failure("gradient-variance", "reward", "a noisy baseline (few samples, Monte Carlo returns) makes the "
            "advantages, and so the gradient, high-variance"),
    Failure("sparse-credit", "reward", "one outcome reward for every token of a long or multi-turn episode: "
            "coarse, delayed credit"),
    Failure("teacher-divergence", "reward", "the student moves away from its teacher during distillation: the "
            "reverse KL to the teacher grows"),
    Failure("generation-cost", "trajectory", "extra generations are spent per step (refill rounds, greedy "
            "baselines) for the same number of updates"),
)


@dataclass(frozen=True)
class Finding:
    """One detector's verdict: a failure, its side, the step where it began, and the evidence it read."""

    detector: str
    failure: str
    side: str
    step: int
    message: str
    evidence: Mapping[str, list[tuple[int, float]]]  # metric -> (step, value) pairs the detector read
    limits: Mapping[str, float] = field(default_factory=dict)  # the thresholds it used

    def line(self) -> str:
        return f"{self.failure} ({self.side} side) from step {self.step}: {self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


class History:
    """A run's logged metrics, metric by metric: (step, value) pairs in logging order (non-numbers are skipped)."""

    def __init__(self):
        self.series: dict[str, list[tuple[int, float]]] = {}

    def add(self, row: Mapping[str, Any]) -> None:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            return
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.series.setdefault(name, []).append((int(step), float(value)))

    def tail(self, name: str, count: int) -> list[tuple[int, float]]:
        return self.series.get(name, [])[-count:]

    def first(self, name: str, count: int) -> list[tuple[int, float]]:
        return self.series.get(name, [])[:count]

    def present(self, names: Iterable[str]) -> str | None:
        """The first of ``names`` that has values."""
        return next((name for name in names if self.series.get(name)), None)


def _mean(pairs: list[tuple[int, float]]) -> float:
    return sum(value for _, value in pairs) / len(pairs)


class Detector:
    """Reads a :class:`History` and reports a failure. Set ``name``, ``failure`` (a registered failure), ``metrics``
    (what it reads), ``defaults`` (threshold name -> default value; users override them) and ``summary``, and
    implement :meth:`check`, which looks at the newest values only and returns ``(step, message, evidence)`` when
    the failure holds now (``step``: where it began), else None."""

    name: str
    failure: str
    metrics: tuple[str, ...]
    defaults: Mapping[str, float]
    summary: str

    def check(self, history: History, limits: Mapping[str, float]):
        raise NotImplementedError


@dataclass(frozen=True)
class Level(Detector):
    """The mean of the newest ``window`` values of the first logged metric of ``metrics`` is at or beyond
    ``limit`` (above it, or below it when ``above`` is False). It began at the first of those values past it."""

    name: str
    failure: str
    metrics: tuple[str, ...]
    limit: float
    summary: str
    window: int = 3
    above: bool = True

    @property
    def defaults(self) -> Mapping[str, float]:
        return {"limit": self.limit, "window": self.window}

    def check(self, history, limits):
        metric = history.present(self.metrics)
        window = int(limits["window"])
        values = history.tail(metric, window) if metric else []
        if len(values) < window:
            return None
        mean, limit = _mean(values), limits["limit"]
        if (mean >= limit) if self.above else (mean <= limit):
            start = next(step for step, value in values if (value >= limit if self.above else value <= limit))
            word = "at least" if self.above else "at most"
            return start, f"{metric} averaged {mean:.3g} over the last {window} logs ({word} {limit:g})", \
                {metric: values}
        return None


@dataclass(frozen=True)
class Drift(Detector):
    """The mean of the newest ``window`` values of ``metric`` has moved to ``ratio`` times the mean of its first
    ``window`` values (a fall when ``ratio`` < 1, a rise when > 1), by at least ``min_change`` in absolute terms."""

    name: str
    failure: str
    metric: str
    ratio: float
    summary: str
    window: int = 3
    min_change: float = 0.0

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    @property
    def defaults(self) -> Mapping[str, float]:
        return {"ratio": self.ratio, "window": self.window, "min_change": self.min_change}

    def check(self, history, limits):
        window, ratio = int(limits["window"]), limits["ratio"]
        start, now = history.first(self.metric, window), history.tail(self.metric, window)
        if len(history.series.get(self.metric, [])) < 2 * window:
            return None
        before, after = _mean(start), _mean(now)
        moved = after <= ratio * before if ratio < 1 else after >= ratio * before
        if moved and abs(after - before) >= limits["min_change"]:
            bound = ratio * before
            series = history.series[self.metric]
            began = next(step for step, value in series[window:]
                         if (value <= bound if ratio < 1 else value >= bound))
            return began, (f"{self.metric} went from {before:.3g} (first {window} logs) to {after:.3g} (last "
                           f"{window}): {after / before if before else math.inf:.2f}x, past {ratio:g}x"), \
                {self.metric: list(series)}
        return None


@dataclass(frozen=True)
class RewardWithoutAccuracy(Detector):
    """At a held-out evaluation: the training reward's recent mean has risen by ``reward_rise`` or more since the
    first ``window`` logs while held-out accuracy has gained at most ``accuracy_gain`` since the first evaluation."""

    name: str = "reward-hacking"
    failure: str = "reward-hacking"
    metrics: tuple[str, ...] = ("reward", "eval_accuracy")
    summary: str = "train reward up while held-out accuracy is flat or down"
    reward_rise: float = 0.2
    accuracy_gain: float = 0.0
    window: int = 3

    @property
    def defaults(self) -> Mapping[str, float]:
        return {"reward_rise": self.reward_rise, "accuracy_gain": self.accuracy_gain, "window": self.window}

    def check(self, history, limits):
        window = int(limits["window"])
        accuracy, reward = history.series.get("eval_accuracy", []), history.series.get("reward", [])
        if len(accuracy) < 2 or len(reward) < 2 * window or reward[-1][0] > accuracy[-1][0]:
            return None  # judged at an evaluation, on the rewards logged up to it
        rise = _mean(reward[-window:]) - _mean(reward[:window])
        gain = accuracy[-1][1] - accuracy[0][1]
        if rise >= limits["reward_rise"] and gain <= limits["accuracy_gain"]:
            began = next((step for step, value in reward[window:] if value - _mean(reward[:window]) >= rise / 2),
                         reward[-1][0])
            return began, (f"reward rose by {rise:+.3f} while held-out accuracy moved {gain:+.1%} "
                           f"({accuracy[0][1]:.1%} -> {accuracy[-1][1]:.1%})"), \
                {"reward": list(reward), "eval_accuracy": list(accuracy)}
        return None


CLIP_METRICS = ("clip_ratio/region_mean", "dapo/clip_ratio_high", "cispo/clip_ratio", "gmpo/clip_ratio",
                "gspo/clip_ratio", "gspo-token/clip_ratio")
KL_METRICS = ("kl", "kl/k3", "kl/k1", "kl/k2", "kl_reward/k1", "kl_reward/k3", "kl_reward/k2", "reinforce-pp/kl")

DETECTORS: tuple[Detector, ...] = (
    Level("zero-variance-groups", "zero-variance-groups", ("frac_reward_zero_std",), 0.9,
          "the share of groups with one reward for every completion stays high"),
    Drift("entropy-collapse", "entropy-collapse", "entropy", 0.25,
          "entropy falls to a fraction of its start", min_change=0.05),
    Drift("entropy-explosion", "entropy-explosion", "entropy", 3.0,
          "entropy rises to a multiple of its start", min_change=0.3),
    Level("clip-saturation", "clip-saturation", CLIP_METRICS, 0.2,
          "the share of clipped tokens stays high"),
    Drift("length-drift", "length-drift", "completions/mean_length", 2.0,
          "mean completion length grows to a multiple of its start", min_change=4.0),
    Level("truncation", "truncation", ("completions/clipped_ratio",), 0.5,
          "the share of completions cut at the length cap stays high"),
    Level("kl-blowup", "kl-blowup", KL_METRICS, 0.5, "the KL to the reference stays high"),
    Level("sampler-mismatch", "sampler-mismatch",
          ("sampling/sampling_logp_difference/mean", "rollout_correction/clipped_fraction"), 0.1,
          "sampler and trainer log-probs differ (TRL's vLLM metric, or rollout-correction's clipped share)"),
    RewardWithoutAccuracy(),
    Drift("teacher-divergence", "teacher-divergence", "opd/reverse_kl", 2.0,
          "the reverse KL to the teacher grows to a multiple of its start", min_change=0.05),
    Level("generation-cost", "generation-cost", ("dynamic_sampling/extra_rounds",), 1.0,
          "refill rounds per step stay high"),
)


def parse_detector_names(names: str | Iterable[str] | None) -> list[str] | None:
    """A detector choice as a list of names: a comma list, ``"none"`` (no detector) or ``"all"`` / None (every
    registered detector, returned as None)."""
    if names is None:
        return None
    if isinstance(names, str):
        text = names.strip().lower()
        if text in ("", "all"):
            return None
        return [] if text == "none" else [name.strip() for name in names.split(",") if name.strip()]
    return list(names)


def resolve_limits(detectors: Mapping[str, Detector], chosen: Iterable[str] | None,
                   thresholds: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, float]]:
    """Detector name -> its limits (defaults overridden by ``thresholds``) for the ``chosen`` detectors (None: all).
    An unknown detector or threshold, or a value that is not a number, is an OptionError naming it."""
    names = list(detectors) if chosen is None else list(chosen)
    for name in [*names, *(thresholds or {})]:
        if name not in detectors:
            raise OptionError(f"unknown detector {name!r}.{closest(name, detectors)} Detectors: "
                              f"{', '.join(sorted(detectors))}")
    limits = {name: dict(detectors[name].defaults) for name in names}
    for name, values in (thresholds or {}).items():
        if not isinstance(values, Mapping):
            raise OptionError(f"detector_thresholds[{name!r}] must map threshold names to numbers, got {values!r}")
        for key, value in values.items():
            if key not in detectors[name].defaults:
                raise OptionError(f"detector {name!r} has no threshold {key!r}.{closest(key, detectors[name].defaults)}"
                                  f" Thresholds: {', '.join(detectors[name].defaults)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OptionError(f"detector {name!r}: threshold {key!r} must be a number, got {value!r}")
            if name in limits:
                limits[name][key] = float(value)
    return limits


class Diagnostics:
    """Detectors over a growing :class:`History`: :meth:`observe` adds one log line and returns the findings it
    completes (each detector fires at most once per run); ``listeners`` hear of each finding as it fires."""

    def __init__(self, detectors: Mapping[str, Detector], failures: Mapping[str, Failure],
                 limits: Mapping[str, Mapping[str, float]], listeners: Iterable[Callable[[Finding], None]] = ()):
        self.detectors = {name: detectors[name] for name in limits}
        self.failures, self.limits = failures, limits
        self.listeners = list(listeners)
        self.history = History()
        self.findings: list[Finding] = []

    def observe(self, row: Mapping[str, Any]) -> list[Finding]:
        self.history.add(row)
        fired = {finding.detector for finding in self.findings}
        new = []
        for name, detector in self.detectors.items():
            if name in fired or not any(metric in row for metric in detector.metrics):
                continue
            verdict = detector.check(self.history, self.limits[name])
            if verdict is not None:
                step, message, evidence = verdict
                failure = self.failures[detector.failure]
                new.append(Finding(name, failure.name, failure.side, step, message, evidence, self.limits[name]))
        for finding in new:
            self.findings.append(finding)
            for listener in self.listeners:
                listener(finding)
        return new


def replay(rows: Iterable[Mapping[str, Any]], detectors: Mapping[str, Detector], failures: Mapping[str, Failure],
           limits: Mapping[str, Mapping[str, float]]) -> Diagnostics:
    """A logged run read line by line, as its training would have read it: the detectors' ``findings`` and the
    whole ``history``."""
    diagnostics = Diagnostics(detectors, failures, limits)
    for row in rows:
        diagnostics.observe(row)
    return diagnostics
