"""po-registry: a plugin registry of LLM policy-optimization methods on top of Hugging Face TRL."""

from .batches import LossBatch, RewardBatch
from .errors import (
    CompositionError,
    CouplingWarning,
    HookError,
    OptionError,
    PluginLoadError,
    PORegistryError,
    UnknownMethodError,
)
from .hookspecs import hookimpl
from .pipeline import Assembly, Pipeline, assemble
from .registry import Method, Option, Registry, get_registry, reload_registry

__version__ = "0.1.0"

__all__ = [
    "Assembly",
    "CompositionError",
    "CouplingWarning",
    "HookError",
    "LossBatch",
    "Method",
    "Option",
    "OptionError",
    "Pipeline",
    "PluginLoadError",
    "PolicyOptimizationConfig",
    "PolicyOptimizationTrainer",
    "PORegistryError",
    "Registry",
    "RewardBatch",
    "UnknownMethodError",
    "assemble",
    "get_registry",
    "hookimpl",
    "reload_registry",
]


def __getattr__(name):
    # The trainer and config import TRL (seconds); load them on first use so `import po_registry` stays light.
    if name == "PolicyOptimizationTrainer":
        from .trainer import PolicyOptimizationTrainer

        return PolicyOptimizationTrainer
    if name == "PolicyOptimizationConfig":
        from .config import PolicyOptimizationConfig

        return PolicyOptimizationConfig
    raise AttributeError(f"module 'po_registry' has no attribute {name!r}")
