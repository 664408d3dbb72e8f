"""The ``po-registry train`` job: settings, model and data, training with live progress, and the run directory.

A run directory holds ``adapter/`` (LoRA, loadable with peft) or ``model/`` (full fine-tuning), ``metrics.jsonl``
(every logged step and every evaluation), ``plot.png`` (reward and greedy accuracy over steps), ``config.yaml``
(the resolved settings; ``po-registry train --config`` reproduces the run), ``summary.json`` and
``checkpoints/`` (for ``--resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .errors import UsageError, fail, first_line
from .prompting import PROMPT_STYLES, has_chat_prompts, prompted
from .tasks import SingleTurn

RUN_DEFAULTS: dict[str, Any] = {
    "method": ["grpo"],
    "model": None,
    "task": "addition",
    "dataset": None,
    "reward": "exact",
    "prompt_style": "auto",
    "lora_r": 16,
    "no_lora": False,
    "steps": 150,
    "learning_rate": None,
    "seed": 0,
    "eval_every": 20,
    "eval_size": 512,
    "output_dir": None,
}
# Trainer settings of the embedded recipe; a YAML file may override any PolicyOptimizationConfig field.
TRAINER_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "temperature": 1.0,
    "beta": 0.0,
    "lr_scheduler_type": "constant",
    "logging_steps": 1,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "steps",
    "save_total_limit": 1,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}


@dataclasses.dataclass
class DatasetTask(SingleTurn):
    """A task read from a file: the last tenth of the rows is held out for evaluation."""

    name: str
    train_rows: list[tuple[str, str]]
    eval_rows: list[tuple[str, str]]
    max_completion_length: int

    def dataset(self, count: int | None = None, seed: int = 0):
        from datasets import Dataset

        prompts, answers = zip(*self.train_rows)
        return Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)})

    def eval_problems(self, count: int = 512):
        return self.eval_rows[:count]


def resolve_task(name: str):
    from .registry import get_task

    return get_task(name)


def read_dataset(path: str, longest_completion: int = 64, command: str = "train") -> DatasetTask:
    file = Path(path)
    formats = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if not file.is_file():
        fail(command, f"--dataset {path}: no such file")
    if file.suffix.lower() not in formats:
        fail(command, f"--dataset {path}: unsupported format {file.suffix!r}; use {', '.join(formats)}")
    if file.stat().st_size == 0:
        fail(command, f"--dataset {path}: the file is empty")
    try:
        from datasets import load_dataset

        data = load_dataset(formats[file.suffix.lower()], data_files=str(file), split="train")
    except Exception as exc:
        fail(command, f"--dataset {path}: cannot be read ({first_line(exc)})")
    missing = {"prompt", "answer"} - set(data.column_names)
    if missing:
        fail(command, f"--dataset {path}: missing column(s) {', '.join(sorted(missing))} "
                       f"(has {', '.join(data.column_names)})")
    for number, (prompt, answer) in enumerate(zip(data["prompt"], data["answer"]), start=1):
        chat = isinstance(prompt, list)
        if chat and not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
            fail(command, f"--dataset {path}: row {number}: a chat prompt is a list of {{role, content}} messages")
        if prompt is None or answer is None or not (prompt if chat else str(prompt).strip()):
            fail(command, f"--dataset {path}: row {number}: empty prompt or answer")
    rows = [(p if isinstance(p, list) else str(p), str(a)) for p, a in zip(data["prompt"], data["answer"])]
    if len(rows) < 10:
        fail(command, f"--dataset {path}: {len(rows)} rows; at least 10 are needed (a tenth is held out)")
    held_out = max(1, len(rows) // 10)
    longest = max(len(answer) for _, answer in rows)
    return DatasetTask(file.name, rows[:-held_out], rows[-held_out:], min(longest + 2, longest_completion))


def _reward(spec: str, task):
    """'exact', or a reward function as module:function (importable, or a module in the current directory) or
    path/to/file.py:function."""
    if spec == "exact":
        return task.reward_function()
    if ":" not in spec:
        fail("train", f"--reward {spec!r}: use 'exact' or a Python function as module:function or file.py:function")
    module_name, function_name = spec.rsplit(":", 1)
    if module_name.endswith(".py") and not Path(module_name).is_file():
        fail("train", f"--reward {spec!r}: no such file {module_name}")
    try:
        if module_name.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:  # console scripts do not see the cwd
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        fail("train", f"--reward {spec!r}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # the module itself fails to run
        fail("train", f"--reward {spec!r}: importing it raised {first_line(exc)}")
    if not callable(function):
        fail("train", f"--reward {spec!r} is not callable")
    return function


def model_location(model: str | None, task, command: str = "train") -> tuple[Path, dict[str, Any]]:
    """Where ``--model`` is (a directory, a .gguf file, a named model, or the embedded warm start of ``task``),
    and the keyword arguments that load it."""
    from .models import NAMED_MODELS, named_model_dir

    if model is None:
        if not hasattr(task, "make_problem"):
            task = resolve_task("addition")
        return _embedded(task), {}
    if model in NAMED_MODELS:
        return named_model_dir(model, command), {}
    if model.lower().endswith(".gguf"):
        file = Path(model)
        if not file.is_file():
            fail(command, f"--model {model}: no such file")
        if importlib.util.find_spec("gguf") is None:
            fail(command, "--model: reading a GGUF file needs the 'gguf' package (pip install gguf)")
        return file.parent, {"gguf_file": file.name}
    location = Path(model)
    if not (location / "config.json").is_file():
        known = ", ".join(NAMED_MODELS)
        fail(command, f"--model {model}: not a model directory (no config.json), a .gguf file or a named model "
                      f"({known})")
    return location, {}


def load_tokenizer(location: Path, kwargs: dict, command: str = "train"):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except Exception as exc:
        fail(command, f"--model {location}: its tokenizer cannot be loaded ({first_line(exc)})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_weights(location: Path, kwargs: dict, command: str = "train"):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    except Exception as exc:
        fail(command, f"--model {location}: cannot be loaded ({first_line(exc)})")
    if getattr(loaded.config, "quantization_config", None) is not None and kwargs:  # GGUF: de-quantised weights
        del loaded.config.quantization_config
        loaded.hf_quantizer = None
    return loaded


def load_model(model: str | None, task, command: str = "train"):
    """(model, tokenizer) from a directory, a .gguf file, a named model, or the embedded warm start of ``task``."""
    location, kwargs = model_location(model, task, command)
    return load_weights(location, kwargs, command), load_tokenizer(location, kwargs, command)


def _embedded(task) -> Path:
    from tqdm.auto import tqdm

    from .embedded import cache_dir, embedded_model_dir

    bar = None

    def progress(step, loss, accuracy):
        nonlocal bar
        if bar is None:
            print(f"warm-starting the embedded model on {task.name} (first use; cached in {cache_dir()})")
            bar = tqdm(desc="warm start", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"acc": f"{accuracy:.1%}"} if accuracy is not None else {}))

    location = embedded_model_dir(task, progress=progress)
    if bar is not None:
        bar.close()
    return location


# -- settings ---------------------------------------------------------------------------------------------------


def _trainer_fields() -> dict[str, Any]:
    """PolicyOptimizationConfig's fields and their defaults."""
    from .config import PolicyOptimizationConfig

    fields = {}
    for f in dataclasses.fields(PolicyOptimizationConfig):
        if f.init:
            fields[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return fields


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_type(source, key: str, value: Any, default: Any) -> Any:
    """A YAML value must have the type of the field's default (ints are accepted for floats, and so are numeric
    strings: PyYAML reads ``1e-4`` as a string)."""
    if default is None or value is None or isinstance(default, (list, dict)):
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str) and _number(value) is not None:
        return _number(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    fail("train", f"{source}: {key} must be {expected.__name__}, got {value!r}")


def _check_run_value(source: str, key: str, value: Any) -> Any:
    """A run setting from YAML or a flag, with its type and range; returns it normalised."""
    if key == "method":
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            fail("train", f"{source}: method must be a name or a list of names, got {value!r}")
        return [n.strip() for name in names for n in name.split(",") if n.strip()]
    if key in ("lora_r", "steps", "eval_every", "eval_size"):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail("train", f"{source}: {key} must be a positive integer, got {value!r}")
    elif key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("train", f"{source}: seed must be an integer, got {value!r}")
    elif key == "learning_rate" and value is not None:
        number = _number(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < float("inf"):
            fail("train", f"{source}: learning_rate must be a positive number, got {value!r}")
        return float(number)
    elif key == "no_lora":
        if not isinstance(value, bool):
            fail("train", f"{source}: no_lora must be true or false, got {value!r}")
    elif key == "prompt_style" and value not in PROMPT_STYLES:
        fail("train", f"{source}: prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {value!r}")
    elif value is not None and not isinstance(value, str):
        fail("train", f"{source}: {key} must be a string, got {value!r}")
    return value


# What a run is: resuming it with another of these would train a different run on its checkpoint.
RUN_IDENTITY = ("method", "model", "task", "dataset", "reward", "prompt_style", "lora_r", "no_lora")
FLAGS = {"method": "--method", "model": "--model", "task": "--task", "dataset": "--dataset", "reward": "--reward",
         "prompt_style": "--prompt-style", "lora_r": "--lora-r", "no_lora": "--no-lora"}


def _read_yaml(source: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        fail("train", f"{source}: invalid YAML ({str(exc).splitlines()[0]})")
    except (OSError, UnicodeDecodeError) as exc:
        fail("train", f"{source}: cannot be read ({first_line(exc)})")
    if not isinstance(data, dict):
        fail("train", f"{source}: expected a mapping of option names to values")
    return data


def _settings_from(source: Path, fields: dict) -> tuple[dict, dict, dict]:
    """(run settings, trainer overrides, method options) that one YAML file sets."""
    from .errors import closest

    run, trainer, options = {}, {}, {}
    for key, value in _read_yaml(source).items():
        key = str(key).replace("-", "_")
        if key in ("method_options", "options"):
            if not isinstance(value, dict):
                fail("train", f"{source}: {key} must be a mapping")
            options.update(value)
        elif key in ("method", "methods"):
            run["method"] = _check_run_value(str(source), "method", value)
        elif key == "output_dir":
            fail("train", f"{source}: output_dir is chosen with --output-dir, not in the file")
        elif key in RUN_DEFAULTS:
            run[key] = _check_run_value(str(source), key, value)
        elif key in fields:
            trainer[key] = _check_type(source, key, value, fields[key])
        else:
            known = list(RUN_DEFAULTS) + sorted(fields)
            fail("train", f"{source}: unknown setting {key!r}.{closest(key, known)}")
    return run, trainer, options


def _flag_settings(args) -> dict:
    """The run settings given as flags on this command line."""
    run = {}
    for key in RUN_DEFAULTS:
        value = getattr(args, key, None)
        if key == "method" and value:
            run["method"] = _check_run_value("--method", "method", value)
        elif key == "no_lora":
            if value:
                run["no_lora"] = True
        elif key != "method" and value is not None:
            run[key] = value
    if args.lora_r is not None:
        run["no_lora"] = False
    return run


def resolve_settings(args) -> tuple[dict, dict, dict]:
    """(run settings, trainer overrides, method options): defaults < saved run (--resume) < --config < flags.

    Resuming keeps what the run is (its method, model, task, data, reward, LoRA): another value is refused."""
    fields = _trainer_fields()
    run, trainer, options = dict(RUN_DEFAULTS), {}, {}
    if args.resume:
        if args.output_dir:
            fail("train", "--resume continues a run in its own directory; --output-dir cannot be given with it")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            fail("train", f"--resume {args.resume}: not a run directory (no config.yaml)")
        for part, values in zip((run, trainer, options), _settings_from(saved, fields)):
            part.update(values)
    explicit_run, explicit_trainer, explicit_options = ({}, {}, {})
    for source in args.config or []:
        if not Path(source).is_file():
            fail("train", f"--config {source}: no such file")
        for part, values in zip((explicit_run, explicit_trainer, explicit_options), _settings_from(Path(source),
                                                                                                 fields)):
            part.update(values)
    explicit_run.update(_flag_settings(args))
    if not args.resume:  # a resumed run's saved settings already hold its model's recipe
        for key, value in model_recipe(explicit_run.get("model")).items():
            (run if key in RUN_DEFAULTS else trainer)[key] = value
    if args.resume:
        for key in RUN_IDENTITY:
            if key in explicit_run and explicit_run[key] != run[key]:
                saved, given = (",".join(v) if isinstance(v, list) else v for v in (run[key], explicit_run[key]))
                fail("train", f"--resume {args.resume}: the run was trained with {key} {saved}; "
                              f"{FLAGS[key]} {given} would change it (resume without it, or start a "
                              f"new run with --output-dir)")
    run.update(explicit_run)
    trainer.update(explicit_trainer)
    options.update(explicit_options)
    options.update(dict(args.option or []))
    if getattr(args, "detectors", None) is not None:
        trainer["detectors"] = args.detectors
    for detector, key, value in getattr(args, "threshold", None) or []:
        thresholds = trainer["detector_thresholds"] = dict(trainer.get("detector_thresholds") or {})
        thresholds[detector] = {**thresholds.get(detector, {}), key: value}
    return run, trainer, options


def model_recipe(model: str | None) -> dict[str, Any]:
    """The settings a named model's runs start from (empty for a path or the embedded model)."""
    from .models import NAMED_MODELS

    return dict(NAMED_MODELS[model].recipe) if model in NAMED_MODELS else {}


def _last_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / "checkpoints"
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    return Path(found) if found else None


# -- the job ----------------------------------------------------------------------------------------------------


class Processes:
    """The processes of one launch (``torchrun``, ``accelerate launch``): all train, the main one writes the run."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU, as use_cpu trains
        self.main = self.state is None or self.state.is_main_process

    def agree(self, value):
        """The main process's ``value``, on every process."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def main_first(self):
        return contextlib.nullcontext() if self.state is None else self.state.main_process_first()

    def finish(self, code: int) -> int:
        """End of a launch of several processes: all of them finish together, the process group is torn down and
        each process leaves at once. (One that exits while gloo's threads are alive, the main process still writing,
        can abort in the interpreter's teardown: "terminate called without an active exception", and the launcher
        then kills the others.) With one process: ``code``."""
        if self.state is None:
            return code
        import torch.distributed as dist

        self.state.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train(args) -> int:
    import torch

    from .config import PolicyOptimizationConfig
    from .errors import PORegistryError

    run, trainer_overrides, options = resolve_settings(args)
    processes = Processes()
    recipe = {} if args.resume else model_recipe(run["model"])
    kept = {key: value for key, value in recipe.items()
            if (run if key in RUN_DEFAULTS else trainer_overrides).get(key) == value}
    if kept and processes.main:
        print(f"--model {run['model']}: from its recipe (a flag or --config value overrides any): "
              + ", ".join(f"{key} {value}" for key, value in kept.items()))
    resume_from = None
    if args.resume:
        run_dir = Path(args.resume)
        resume_from = _last_checkpoint(run_dir)
        if resume_from is None and processes.main:  # stopped before its first checkpoint: start it again
            print(f"{run_dir}: no checkpoint yet; training the run from step 0 with its saved settings")
            for leftover in ("metrics.jsonl", "summary.json"):
                (run_dir / leftover).unlink(missing_ok=True)
    else:
        stamp = processes.agree(datetime.now().strftime("%Y%m%d-%H%M%S"))  # one run directory for all
        run_dir = Path(run["output_dir"] or f"runs/{run['task']}-{'+'.join(run['method'])}-{stamp}")
        if (run_dir / "config.yaml").exists():
            fail("train", f"--output-dir {run_dir} already holds a run; choose another or --resume it")
        if run_dir.exists() and not run_dir.is_dir():
            fail("train", f"--output-dir {run_dir} is a file")

    try:
        embedded_task = resolve_task(run["task"])
    except PORegistryError as exc:
        fail("train", str(exc))
    task = read_dataset(run["dataset"]) if run["dataset"] else embedded_task
    if has_chat_prompts(task) and (run["model"] is None or run["prompt_style"] in ("raw", "few-shot")):
        fail("train", f"--dataset {run['dataset']}: its prompts are chat messages; they need a --model whose "
                      f"tokenizer has a chat template (the embedded model has none) and the chat prompt style")
    custom_reward = None if run["reward"] == "exact" else _reward(run["reward"], task)
    use_lora = not run["no_lora"]
    learning_rate = run["learning_rate"] if run["learning_rate"] is not None else (5e-4 if use_lora else 5e-5)
    settings = {
        **TRAINER_DEFAULTS,
        "max_completion_length": task.max_completion_length,
        "learning_rate": learning_rate,
        "max_steps": run["steps"],
        "save_steps": max(1, min(50, run["steps"])),
        "seed": run["seed"],
        **trainer_overrides,
        "output_dir": str(run_dir / "checkpoints"),
        "methods": run["method"],
        "method_options": options,
    }
    if not torch.cuda.is_available():
        settings.setdefault("use_cpu", True)
    try:
        config = PolicyOptimizationConfig(**settings)
    except PORegistryError as exc:
        fail("train", str(exc))
    except (TypeError, ValueError) as exc:
        fail("train", f"invalid trainer setting: {first_line(exc)}")

    # Every setting is valid; now the model (the embedded warm start is built on first use) and its prompts.
    with processes.main_first():  # the main process builds (and caches) the embedded warm start
        location, load_kwargs = model_location(run["model"], embedded_task if run["model"] is None else task)
    tokenizer = load_tokenizer(location, load_kwargs)
    try:
        task = prompted(task, tokenizer, run["prompt_style"])
    except PORegistryError as exc:
        fail("train", str(exc))
    if "max_completion_length" not in trainer_overrides:  # a prompted task answers in more tokens
        config.max_completion_length = task.max_completion_length
    reward = custom_reward or task.reward_function()
    model = load_weights(location, load_kwargs)
    if hasattr(task, "end_token_ids"):  # generation stops, and a completion counts as finished, at these tokens
        known = model.generation_config.eos_token_id
        known = [] if known is None else [known] if isinstance(known, int) else list(known)
        model.generation_config.eos_token_id = known + [t for t in task.end_token_ids() if t not in known]
    processes.wait()  # every process has checked everything before the main one writes
    if not processes.main:
        return processes.finish(_fit(run_dir, run, task, config, model, tokenizer, reward, use_lora, resume_from,
                                     main=False))
    # Everything is valid: from here on the run directory is written.
    written = _RunDirectory(run_dir)
    # The settings that reproduce the run; values derived from them (max_steps, save_steps, ...) are left out
    # so that flags given with --resume or --config still apply.
    resolved = {**{k: v for k, v in run.items() if k != "output_dir"}, "learning_rate": learning_rate,
                **TRAINER_DEFAULTS, **trainer_overrides, "method_options": config.method_options}
    _write_yaml(run_dir / "config.yaml", resolved)
    try:
        code = _fit(run_dir, run, task, config, model, tokenizer, reward, use_lora, resume_from)
    except BaseException as exc:
        if _last_checkpoint(run_dir) is None:
            written.remove()  # nothing was trained: leave nothing behind
            where = "nothing was written"
        else:
            where = f"its last checkpoint is kept: po-registry train --resume {run_dir}"
        if isinstance(exc, UsageError):
            raise
        if isinstance(exc, PORegistryError):
            fail("train", f"{exc} ({where})")
        if isinstance(exc, KeyboardInterrupt):
            print(f"\ninterrupted; {where}", file=sys.stderr)
            return 130
        print(f"po-registry train: the run failed ({first_line(exc)}); {where}", file=sys.stderr)
        raise
    return processes.finish(code)


class _RunDirectory:
    """The run directory as this command found it, so that a run which trained nothing can leave nothing."""

    def __init__(self, path: Path):
        self.path, self.existed = path, path.exists()
        self.before = {p.name for p in path.iterdir()} if self.existed else set()
        path.mkdir(parents=True, exist_ok=True)

    def remove(self) -> None:
        import shutil

        if not self.existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for entry in self.path.iterdir():
            if entry.name not in self.before:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _fit(run_dir, run, task, config, model, tokenizer, reward, use_lora, resume_from, main: bool = True) -> int:
    """Train; only the main process evaluates, prints and writes (the trainer saves checkpoints itself)."""
    from peft import LoraConfig
    from transformers import PrinterCallback

    from .trainer import PolicyOptimizationTrainer

    eval_problems = task.eval_problems(run["eval_size"])
    summary_path = run_dir / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    started = time.time()
    before = previous.get("accuracy_before")
    if before is None and main:
        before = task.evaluate(model, tokenizer, eval_problems)
    if main:
        print(f"{task.name}: {task.metric} before training {before:.1%} ({len(eval_problems)} held-out problems)")
    peft_config = LoraConfig(r=run["lora_r"], lora_alpha=2 * run["lora_r"], lora_dropout=0.0,
                             target_modules="all-linear") if use_lora else None
    progress = LiveProgress(run_dir / "metrics.jsonl", lambda m: task.evaluate(m, tokenizer, eval_problems),
                            run["eval_every"], config.max_steps, before or 0.0)
    trainer = PolicyOptimizationTrainer(model=model, reward_funcs=[reward], args=config,
                                        train_dataset=task.dataset(seed=run["seed"]), processing_class=tokenizer,
                                        peft_config=peft_config, callbacks=[progress],
                                        rollout_func=task.rollout_function())
    trainer.remove_callback(PrinterCallback)
    progress.watch(trainer.po_diagnostics)
    with StopOnSignal() as stop:
        trainer.add_callback(stop)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    after = progress.accuracy
    target = run_dir / ("adapter" if use_lora else "model")
    trainer.save_model(str(target))  # every process takes part (sharded models); the main one writes
    if not main:
        return 130 if stop.requested else 0
    elapsed = time.time() - started + previous.get("seconds", 0.0)
    summary = {"task": task.name, "methods": config.methods, "steps": trainer.state.global_step,
               "accuracy_before": before, "accuracy_after": after, "seconds": round(elapsed, 1),
               "lora": use_lora, "saved": target.name}
    if stop.requested:
        summary["interrupted"] = stop.requested
    summary["steps_without_reward_variance"] = progress.flat_steps
    summary["findings"] = [{key: entry[key] for key in ("failure", "side", "step", "message", "detector")}
                           for entry in (finding.as_dict() for finding in trainer.po_diagnostics.findings)]
    if progress.logged_steps and progress.flat_steps == progress.logged_steps:
        summary["warning"] = "no group had any reward variance on any step: nothing was learned from the reward"
        print(f"warning: {summary['warning']}. {FLAT_HINT}", file=sys.stderr)
    summary_path.write_text(json.dumps(summary, indent=2))
    plot(run_dir / "metrics.jsonl", run_dir / "plot.png", title=f"{task.name} - {'+'.join(config.methods)}")
    if stop.requested:
        print(f"stopped by {stop.requested} at step {trainer.state.global_step} of {config.max_steps}; checkpoint "
              f"saved. Continue with: po-registry train --resume {run_dir}", file=sys.stderr)
        return 130
    print(f"{task.name}: {task.metric} {before:.1%} -> {after:.1%} ({100 * (after - before):+.1f} points) in "
          f"{trainer.state.global_step} steps, {elapsed:.0f} s")
    print(f"wrote {run_dir}/: {target.name}/, metrics.jsonl, plot.png, config.yaml, summary.json")
    if summary["findings"]:
        print(f"{len(summary['findings'])} failure(s) detected ({', '.join(f['failure'] for f in summary['findings'])})"
              f": po-registry diagnose {run_dir} shows the evidence and the methods that target them")
    return 0


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM: finish the current step, save a checkpoint and stop; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested: str | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested is not None
        if args.world_size > 1:  # every process stops after the same step, or the others would wait forever
            import torch

            flag = torch.tensor(float(requested), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
            self.requested = self.requested or ("SIGINT" if requested else None)
        if requested:
            control.should_save = True
            control.should_training_stop = True


FLAT_WARNING_STEPS = 3
FLAT_HINT = ("Check that the model can earn the reward: the prompt style (--prompt-style, docs/prompts.md), the "
             "reward function, max_completion_length.")


class LiveProgress(TrainerCallback):
    """A progress bar with live reward and accuracy; writes every log and evaluation to metrics.jsonl."""

    def __init__(self, metrics_path: Path, evaluate, eval_every: int, total_steps: int, accuracy: float):
        self.metrics_path, self.evaluate = metrics_path, evaluate
        self.eval_every, self.total = eval_every, total_steps
        self.accuracy, self.reward, self.bar = accuracy, None, None
        self.flat_steps, self.logged_steps, self.warned = 0, 0, False  # steps where no group had reward variance
        self.diagnostics = None

    def _write(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def watch(self, diagnostics) -> None:
        """Report the trainer's detector findings here (a warning line, a metrics.jsonl row) instead of as log
        warnings, and give the detectors the held-out evaluations. A resumed run's earlier lines are replayed
        first, so a failure found before the interruption is neither lost nor reported twice."""
        self.diagnostics = diagnostics
        diagnostics.listeners = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip():
                    diagnostics.observe(json.loads(line))
        diagnostics.listeners = [self._finding]

    def _finding(self, finding) -> None:
        self._write({"step": finding.step, "finding": finding.as_dict()})
        message = f"warning: {finding.line()}"
        (self.bar.write if self.bar is not None else print)(message)

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:
            return
        self.bar = tqdm(total=self.total, initial=state.global_step, desc="training", unit="step")
        if state.global_step == 0:
            self._evaluated({"step": 0, "eval_accuracy": self.accuracy})

    def _evaluated(self, row: dict) -> None:
        self._write(row)
        if self.diagnostics is not None:
            self.diagnostics.observe(row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and "reward" not in logs and state.is_world_process_zero:
            self._write({"step": state.global_step, **logs})  # a step that reused a generation (num_iterations)
        if logs and "reward" in logs and state.is_world_process_zero:
            self.reward = logs["reward"]
            self._write({"step": state.global_step, **logs})
            self.logged_steps += 1
            if logs.get("frac_reward_zero_std", 0.0) >= 1.0:
                self.flat_steps += 1
                if self.flat_steps >= FLAT_WARNING_STEPS and self.flat_steps == self.logged_steps and not self.warned:
                    self.warned = True
                    message = (f"warning: in every group of the first {self.flat_steps} steps all completions got "
                               f"the same reward (mean {self.reward:.3f}): no gradient signal. {FLAT_HINT}")
                    (self.bar.write if self.bar is not None else print)(message)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        step = state.global_step
        if step % self.eval_every == 0 or step == state.max_steps:
            self.accuracy = self.evaluate(model)
            self._evaluated({"step": step, "eval_accuracy": self.accuracy})
        self.bar.update(step - self.bar.n)
        postfix = {"acc": f"{self.accuracy:.1%}"}
        if self.reward is not None:
            postfix["reward"] = f"{self.reward:.3f}"
        self.bar.set_postfix(postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


def plot(metrics_path: Path, out: Path, title: str = "") -> None:
    """Sampled reward and greedy accuracy over steps, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rewards = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    accuracy = sorted({r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}.items())
    figure, axis = plt.subplots(figsize=(7, 4))
    if rewards:
        steps, values = zip(*rewards)
        axis.plot(steps, values, color="tab:blue", alpha=0.3, label="sampled reward (mean)")
        window = max(1, len(values) // 15)
        smooth = [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                  for i in range(len(values))]
        axis.plot(steps, smooth, color="tab:blue", label=f"sampled reward ({window}-step average)")
    if accuracy:
        axis.plot(*zip(*accuracy), color="tab:red", marker="o", label="greedy accuracy (held out)")
    axis.set_xlabel("optimizer step")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


__all__ = ["load_model", "plot", "resolve_settings", "train"]
