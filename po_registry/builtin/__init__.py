"""Built-in plugins, registered through the same hooks as third-party ones."""

from .grpo import COMPONENTS, BaselineMethod

BUILTIN_PLUGINS: list[tuple[str, object]] = [("grpo", BaselineMethod()), *COMPONENTS.items()]
