"""Built-in plugins, registered through the same hooks as third-party ones (as classes: each run builds its own
instances)."""

from .grpo import COMPONENTS, BaselineMethod

BUILTIN_PLUGINS: list[tuple[str, type]] = [("grpo", BaselineMethod), *COMPONENTS.items()]
