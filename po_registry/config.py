"""``PolicyOptimizationConfig``: TRL's ``GRPOConfig`` plus the method selection and per-plugin options."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig

from .diagnostics import parse_detector_names, resolve_limits
from .errors import OptionError
from .pipeline import Pipeline, assemble
from .registry import get_registry


def _above(low):
    return lambda v: v > low, f"> {low}"


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _within(low, high, low_open=False):
    return (lambda v: (v > low if low_open else v >= low) and v <= high), f"in {'(' if low_open else '['}{low}, {high}]"


# GRPOConfig / TrainingArguments fields whose out-of-range value would train nonsense or fail late (None = unset).
FIELD_RANGES = {
    "learning_rate": _above(0), "temperature": _above(0), "top_p": _within(0, 1, low_open=True),
    "top_k": _at_least(0), "min_p": _within(0, 1), "repetition_penalty": _above(0),
    "num_generations": _at_least(2), "num_generations_eval": _at_least(2),
    "per_device_train_batch_size": _at_least(1), "per_device_eval_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1), "max_completion_length": _at_least(1),
    "generation_batch_size": _at_least(1), "steps_per_generation": _at_least(1), "num_iterations": _at_least(1),
    "beta": _at_least(0), "epsilon": _above(0), "epsilon_high": _above(0), "delta": _above(0),
    "top_entropy_quantile": _within(0, 1), "max_grad_norm": _at_least(0), "weight_decay": _at_least(0),
    "adam_beta1": _within(0, 1), "adam_beta2": _within(0, 1), "adam_epsilon": _above(0),
    "warmup_ratio": _within(0, 1), "warmup_steps": _at_least(0), "num_train_epochs": _above(0),
    "logging_steps": _above(0), "save_steps": _above(0), "save_total_limit": _at_least(1),
    "sapo_temperature_neg": _above(0), "sapo_temperature_pos": _above(0), "async_staleness": _at_least(0),
}


def check_field_ranges(config) -> None:
    """Refuse a mistyped or out-of-range trainer setting, naming the field and its value."""
    for name, (accepts, rule) in FIELD_RANGES.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(f"{name} must be a number {rule}, got {value!r}")
        if not math.isfinite(value) or not accepts(value):
            raise OptionError(f"{name} must be {rule}, got {value!r}")
    if not isinstance(config.max_steps, int) or config.max_steps == 0 or config.max_steps < -1:
        raise OptionError(f"max_steps must be a positive integer (or -1 for epochs), got {config.max_steps!r}")


def _accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class PolicyOptimizationConfig(GRPOConfig):
    """Configuration of :class:`~po_registry.PolicyOptimizationTrainer`.

    Every ``GRPOConfig`` field keeps its meaning (the built-in ``grpo`` method follows them exactly). Added:

    Args:
        methods (`list[str]`): method names to compose, e.g. ``["gspo", "rloo"]``; default ``["grpo"]``.
        method_options (`dict` or JSON `str`): values for options the chosen methods' plugins declare.
        detectors (`list[str]` or `str`): the failure detectors watching the run (``po-registry failures``);
            default all, ``"none"`` or ``[]`` for none.
        detector_thresholds (`dict` or JSON `str`): detector -> {threshold: value}, overriding the defaults, e.g.
            ``{"entropy-collapse": {"ratio": 0.1}}``.
        async_staleness (`int`, *optional*): sample with a generation worker, a copy of the policy on its own
            thread, that runs this many generation batches ahead of the learner (bounded staleness k; 0 samples each
            batch with the learner's current weights). The sampler's log-probs reach the stages as
            ``sampling_logps``. None (default): the synchronous trainer. See docs/async.md.

    On a machine without a GPU, ``bf16`` defaults to False (TRL's default would fail there). The methods and
    options are resolved and validated when the config is built, so a bad name or value fails before training.
    """

    methods: list[str] = field(
        default_factory=lambda: ["grpo"],
        metadata={"help": "Methods to compose, by registered name (see `po-registry methods`)."},
    )
    method_options: dict | str | None = field(
        default=None,
        metadata={"help": "Options of the chosen methods' plugins, as a dict or a JSON string."},
    )

    detectors: list[str] | str | None = field(
        default=None,
        metadata={"help": "Failure detectors to run (default: all registered; 'none' for none)."},
    )
    detector_thresholds: dict | str | None = field(
        default=None,
        metadata={"help": "Detector thresholds as {detector: {threshold: value}}, a dict or a JSON string."},
    )
    async_staleness: int | None = field(
        default=None,
        metadata={"help": "Generation batches a sampler thread runs ahead of the learner (bounded staleness k; 0: "
                          "each batch with the current weights); unset: synchronous."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _accelerator_available():
            self.bf16 = False
        check_field_ranges(self)
        try:
            super().__post_init__()
        except (TypeError, ValueError) as exc:  # TRL's and transformers' own checks, as our error type
            raise OptionError(f"invalid trainer setting: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        if isinstance(self.methods, str):
            self.methods = [name.strip() for name in self.methods.split(",") if name.strip()]
        if isinstance(self.method_options, str):
            try:
                self.method_options = json.loads(self.method_options) if self.method_options.strip() else {}
            except json.JSONDecodeError as exc:
                raise OptionError(f"method_options is not valid JSON: {exc}") from None
        self.method_options = dict(self.method_options or {})
        self.detector_limits()  # a bad detector or threshold fails here, before training
        self._po_assembly = self.resolve()
        self.method_options = self._po_assembly.options

    def detector_limits(self) -> dict[str, dict[str, float]]:
        """The chosen detectors and their thresholds (defaults overridden), checked against the registry."""
        if isinstance(self.detectors, str):
            self.detectors = parse_detector_names(self.detectors)
        if isinstance(self.detector_thresholds, str):
            try:
                self.detector_thresholds = json.loads(self.detector_thresholds or "{}")
            except json.JSONDecodeError as exc:
                raise OptionError(f"detector_thresholds is not valid JSON: {exc}") from None
        if self.detectors is not None and not isinstance(self.detectors, (list, tuple)):
            raise OptionError(f"detectors must be a list of names or a comma list, got {self.detectors!r}")
        if not isinstance(self.detector_thresholds or {}, dict):
            raise OptionError(f"detector_thresholds must map detectors to thresholds, got {self.detector_thresholds!r}")
        self.detector_thresholds = dict(self.detector_thresholds or {})
        return resolve_limits(get_registry().detectors, self.detectors, self.detector_thresholds)

    def resolve(self):
        """Assemble and check the chosen methods against this config; returns the :class:`Assembly`."""
        assembly = assemble(self.methods, self.method_options)
        Pipeline(assembly).check_config(self)
        return assembly

    def checked_assembly(self):
        """The assembly this config was checked with (its option sources intact), or None when the methods or
        options changed since; copies and pickles (checkpoints) do not carry it."""
        assembly = getattr(self, "_po_assembly", None)
        if assembly is None or assembly.specs != [spec.strip() for spec in self.methods or ["grpo"]]:
            return None
        return assembly if assembly.options == self.method_options else None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_po_assembly", None)  # plugin objects are the process's own: never copied or pickled
        return state
