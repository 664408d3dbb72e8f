"""``PolicyOptimizationConfig``: TRL's ``GRPOConfig`` plus the method selection and per-plugin options."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
import torch
from trl import GRPOConfig

from .errors import OptionError
from .pipeline import Pipeline, assemble


def _accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


@dataclass
class PolicyOptimizationConfig(GRPOConfig):
    """Configuration of :class:`~po_registry.PolicyOptimizationTrainer`.

    Every ``GRPOConfig`` field keeps its meaning (the built-in ``grpo`` method follows them exactly). Added:

    Args:
        methods (`list[str]`): method names to compose, e.g. ``["gspo", "rloo"]``; default ``["grpo"]``.
        method_options (`dict` or JSON `str`): values for options the chosen methods' plugins declare.

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

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not self.use_cpu and not _accelerator_available():
            self.bf16 = False
        super().__post_init__()
        if isinstance(self.methods, str):
            self.methods = [name.strip() for name in self.methods.split(",") if name.strip()]
        if isinstance(self.method_options, str):
            try:
                self.method_options = json.loads(self.method_options) if self.method_options.strip() else {}
            except json.JSONDecodeError as exc:
                raise OptionError(f"method_options is not valid JSON: {exc}") from None
        self.method_options = dict(self.method_options or {})
        self.method_options = self.resolve().options

    def resolve(self):
        """Assemble and check the chosen methods against this config; returns the :class:`Assembly`."""
        assembly = assemble(self.methods, self.method_options)
        Pipeline(assembly).check_config(self)
        return assembly
