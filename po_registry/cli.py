"""The ``po-registry`` command: train, eval, and browse plugins and methods.

Bad arguments print one line on stderr and exit with code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .errors import UsageError, fail
from .prompting import PROMPT_STYLES, prompted

PROG = "po-registry"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise UsageError(f"{self.prog}: error: {message} (see --help)")


def _checked(convert, accepts, expected: str):
    """An argparse type: ``convert`` the text, then ``accepts`` the value, else 'expected <expected>, got ...'."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v > 0, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_seed = _checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
_seeds = _checked(lambda text: [_seed(part) for part in text.split(",")], bool, "a comma list of seeds")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def _threshold(text: str) -> tuple[str, str, float]:
    name, equals, value = text.partition("=")
    detector, dot, key = name.rpartition(".")
    try:
        number = float(value) if equals else None
    except ValueError:
        number = None
    if not dot or not detector or not key or number is None:
        raise argparse.ArgumentTypeError(f"expected DETECTOR.THRESHOLD=NUMBER, got {text!r}")
    return detector.strip(), key.strip(), number


def _detector_flags(parser) -> None:
    parser.add_argument("--detectors", metavar="NAME[,NAME]", help="failure detectors to run (default: all; "
                        "'none' for none; see `po-registry failures`)")
    parser.add_argument("--threshold", action="append", type=_threshold, metavar="DETECTOR.THRESHOLD=VALUE",
                        help="a detector threshold, e.g. entropy-collapse.ratio=0.1 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Policy-optimization methods for language models, as plugins on TRL.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = commands.add_parser("train", help="train a model with the chosen methods (default: the embedded job)",
                                description="Train with LoRA (default) or full fine-tuning. With no arguments: "
                                "the embedded ~1M-parameter model on 2-digit addition, GRPO, LoRA r16.")
    train.add_argument("--method", action="append", metavar="NAME[:SELECTOR][,NAME]",
                       help="method(s) to compose; repeat or comma-separate (default: grpo); a selector takes part "
                       "of a method: a side or a stage, '-' to remove it, joined with '+' (dr-grpo:reward, "
                       "dapo:-aggregation)")
    train.add_argument("--model", help="a local Hugging Face model directory, a .gguf file, or a named model: "
                       "smollm2 (its recipe sets the task, prompt style, steps and batch; see docs/prompts.md) "
                       "(default: embedded)")
    train.add_argument("--task", help="embedded task (default: addition; see `po-registry tasks`)")
    train.add_argument("--dataset", help="a local file that `datasets` loads (csv, json, jsonl, parquet) with "
                       "'prompt' and 'answer' columns; evaluated on a held-out tenth")
    train.add_argument("--reward", help="'exact' (default: the task's answer check) or a Python reward function as "
                       "module:function or file.py:function")
    train.add_argument("--prompt-style", choices=PROMPT_STYLES, help="how prompts reach the model: chat (the "
                       "tokenizer's chat template), few-shot, raw; default auto: chat when the tokenizer has a "
                       "template, else raw (see docs/prompts.md)")
    lora = train.add_mutually_exclusive_group()
    lora.add_argument("--lora-r", type=_positive_int, help="LoRA rank (default 16)")
    lora.add_argument("--no-lora", action="store_true", help="full fine-tuning instead of LoRA")
    train.add_argument("--steps", type=_positive_int, help="optimizer steps (default 150)")
    train.add_argument("--learning-rate", type=_positive_float, help="default 5e-4 with LoRA, 5e-5 without")
    train.add_argument("--config", action="append", help="YAML file: any of these options and any "
                       "PolicyOptimizationConfig field (repeatable: a later file overrides an earlier one)")
    train.add_argument("--option", action="append", type=_key_value, metavar="KEY=VALUE",
                       help="an option of the chosen methods' plugins (repeatable)")
    train.add_argument("--output-dir", help="where the run is written (default: runs/<task>-<methods>)")
    train.add_argument("--seed", type=_seed, help="random seed (default 0)")
    train.add_argument("--eval-every", type=_positive_int, help="greedy-accuracy evaluation period (default 20)")
    train.add_argument("--eval-size", type=_positive_int, help="held-out problems per evaluation (default 512)")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    _detector_flags(train)

    evaluate = commands.add_parser("eval", help="greedy accuracy of a model (and adapter) on a task",
                                   description="Greedy accuracy on the task's held-out problems.")
    evaluate.add_argument("--model", help="model directory or .gguf file (default: the adapter's base model, "
                          "else the embedded warm start)")
    evaluate.add_argument("--adapter", help="a LoRA adapter directory to apply (from `po-registry train`)")
    evaluate.add_argument("--task", help="embedded task (default: the adapter's run's task, else addition)")
    evaluate.add_argument("--dataset", help="score a prompt/answer file's held-out tenth instead of a task")
    evaluate.add_argument("--prompt-style", choices=PROMPT_STYLES, default="auto",
                          help="as for train (default auto)")
    evaluate.add_argument("--eval-size", type=_positive_int, default=512, help="held-out problems (default 512)")
    evaluate.add_argument("--json", action="store_true", help="print JSON")

    plugins = commands.add_parser("plugins", help="installed plugins: versions, hooks, methods, load errors",
                                  description="List installed plugins.")
    plugins.add_argument("--json", action="store_true", help="print JSON")

    methods = commands.add_parser("methods", help="the method map: each method's components by side",
                                  description="Each method, which side each of its components changes, the "
                                  "failure it targets and its paper.")
    methods.add_argument("--json", action="store_true", help="print JSON")
    methods.add_argument("--oracle", action="store_true", help="also run the gradient oracle on every method "
                         "(about 15 s; its table is in docs/methods.md)")

    explain = commands.add_parser("explain", help="the assembled pipeline of one or more methods",
                                  description="Which plugin owns each stage, the options and whether the "
                                  "composition is valid.")
    explain.add_argument("methods", nargs="+", metavar="METHOD[,METHOD]",
                         help="methods to compose, as train's --method takes them (names or comma lists, with "
                         "selectors: dr-grpo:reward,gspo)")
    explain.add_argument("--option", action="append", type=_key_value, metavar="KEY=VALUE")

    diagnose = commands.add_parser("diagnose", help="what went wrong in a run, on which side, and which methods "
                                   "target it", description="Replay the failure detectors over a run's logged "
                                   "metrics (a po-registry run directory, or a TRL output directory with "
                                   "trainer_state.json): each finding with its side, the step it began and its "
                                   "evidence plotted, the installed methods that fix it as --method values, and "
                                   "compositions that change both sides for a compound failure.")
    diagnose.add_argument("run", metavar="RUN_DIR", help="a run directory (metrics.jsonl) or a TRL output directory")
    diagnose.add_argument("--out", metavar="DIR", help="where report.md and the plots go (default: RUN_DIR/diagnosis)")
    diagnose.add_argument("--json", action="store_true", help="print JSON")
    _detector_flags(diagnose)

    compare = commands.add_parser("compare", help="a leaderboard of methods over seeds and tasks, one budget",
                                  description="Train (or read, when already there) every task x method x seed with "
                                  "the same steps, batch and evaluation, then tabulate held-out accuracy at equal "
                                  "steps and at equal wall time (mean and spread over seeds), completions sampled "
                                  "and detected failures; writes leaderboard.md, leaderboard.json and curves per "
                                  "task. The baseline grpo is always included.")
    compare.add_argument("--method", action="append", metavar="METHOD", help="a method or composition to compare "
                         "(repeat for several; commas compose: dr-grpo:reward,gspo)")
    compare.add_argument("--all-methods", action="store_true", help="every installed method")
    compare.add_argument("--task", action="append", help="embedded task (repeat for several; default: addition)")
    compare.add_argument("--seeds", default="0,1,2", type=_seeds, help="comma list of seeds (default 0,1,2)")
    compare.add_argument("--steps", type=_positive_int, default=40, help="optimizer steps per run (default 40)")
    compare.add_argument("--eval-every", type=_positive_int, default=10, help="evaluation period (default 10)")
    compare.add_argument("--eval-size", type=_positive_int, default=256, help="held-out problems (default 256)")
    compare.add_argument("--learning-rate", type=_positive_float, help="for every run (default: train's)")
    compare.add_argument("--config", help="YAML settings for every run (as train's --config)")
    compare.add_argument("--method-config", action="append", type=_key_value, metavar="METHOD=FILE",
                         help="YAML settings for one method's runs, over --config (repeatable; e.g. kl=kl.yaml "
                         "with beta: 0.04)")
    compare.add_argument("--output-dir", default="compare", help="where runs and the leaderboard go "
                         "(default: compare/; runs already there are read, not retrained)")
    compare.add_argument("--json", action="store_true", help="print the leaderboard as JSON")

    failures = commands.add_parser("failures", help="the failure vocabulary: side, detector, methods that fix it",
                                   description="Each failure mode: its side, the detector that reports it (and "
                                   "its thresholds), the methods that fix it and those that may cause it.")
    failures.add_argument("--json", action="store_true", help="print JSON")

    tasks = commands.add_parser("tasks", help="the embedded tasks", description="List the embedded tasks.")
    tasks.add_argument("--json", action="store_true", help="print JSON")

    from .scaffold import TEMPLATES

    scaffold = commands.add_parser("new-plugin", help="generate a method-plugin distribution",
                                   description="Generate a pip-installable method plugin: entry point, a working "
                                   "component for one stage, README, and tests that pass before any edit.")
    scaffold.add_argument("name", help="distribution and method name, e.g. my-method")
    scaffold.add_argument("--stage", choices=list(TEMPLATES), default="advantages",
                          help="which stage the skeleton implements (default: advantages)")
    scaffold.add_argument("--directory", default=".", help="where to create NAME/ (default: here)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        handler = {"train": _train, "eval": _eval, "plugins": _plugins, "methods": _methods,
                   "explain": _explain, "diagnose": _diagnose, "compare": _compare, "failures": _failures,
                   "tasks": _tasks,
                   "new-plugin": _new_plugin}[args.command]
        return handler(args)
    except UsageError as exc:
        print(str(exc).splitlines()[0], file=sys.stderr)
        return 2
    except BrokenPipeError:  # `po-registry plugins | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# -- browsing ---------------------------------------------------------------------------------------------------


def _plugins(args) -> int:
    from .registry import get_registry

    rows = get_registry().describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        origin = "built-in" if row["builtin"] else f"{row['distribution']} {row['version']}"
        print(f"{row['name']} ({origin})")
        if row["error"]:
            print(f"  FAILED TO LOAD: {row['error']}")
        for fault in row["faults"]:
            print(f"  fault: {fault}")
        if row["hooks"]:
            print(f"  hooks: {', '.join(row['hooks'])}")
        if row["methods"]:
            print(f"  methods: {', '.join(row['methods'])}")
    return 0


def _methods(args) -> int:
    from .docs import method_map

    if args.oracle:
        print("running the gradient oracle on every method (about 15 s)...", file=sys.stderr, flush=True)
    rows = method_map(oracle=args.oracle)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['method']}  [{row['side'] or '?'}]  {row['summary']}")
        for side in ("reward", "trajectory"):
            if row["components"][side]:
                print(f"  {side + ' side:':17s} {', '.join(row['components'][side])}")
        if row["targets"]:
            print(f"  {'targets:':17s} {row['targets']}")
        if row["fixes"]:
            print(f"  {'fixes:':17s} {', '.join(row['fixes'])}")
        if row["risks"]:
            print(f"  {'may cause:':17s} {', '.join(row['risks'])}")
        if row["paper"]:
            print(f"  {'paper:':17s} {row['paper']}")
        results = row.get("oracle") or []
        if results:
            first = results[0]
            settings = f"; run with {first['settings']}" if first["settings"] else ""
            print(f"  {'objective:':17s} {first['objective']}  (declared bias: {first['declared_bias']}{settings})")
            verdicts = []
            for result in results:
                if result["error"] != result["error"]:  # NaN: not run
                    verdicts.append(f"{result['setup']} {'FAIL' if result['passed'] is False else 'not checked'}")
                else:
                    word = {True: "pass", False: "FAIL", None: "reported"}[result["passed"]]
                    verdicts.append(f"{result['setup']} {word} (error {result['error']:.2f}, tolerance "
                                    f"{result['tolerance']:.2f})")
            cosine = "" if first["cosine"] != first["cosine"] else f"cosine {first['cosine']:.2f}, "
            bias = "" if first["bias"] != first["bias"] else f"bias {first['bias']:.2f}; "
            print(f"  {'oracle:':17s} {cosine}{bias}{'; '.join(verdicts)}")
            notes = sorted({result["note"] for result in results if result["note"]})
            if notes:
                print(f"  {'':17s} {'; '.join(notes)}")
    return 0


def _explain(args) -> int:
    import tempfile
    import warnings

    from .config import PolicyOptimizationConfig
    from .errors import CouplingWarning, PORegistryError

    methods = [name.strip() for names in args.methods for name in names.split(",") if name.strip()]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CouplingWarning)
            config = PolicyOptimizationConfig(output_dir=tempfile.gettempdir(), methods=methods, use_cpu=True,
                                              method_options=dict(args.option or []), report_to="none")
        assembly = config.checked_assembly()
    except PORegistryError as exc:
        print(f"composition: INVALID: {exc}")
        return 2
    print(assembly.explain())
    couplings = [str(w.message) for w in caught if issubclass(w.category, CouplingWarning)]
    for message in couplings:
        print(f"coupling: {message}")
    print("composition: valid" + (f" ({len(couplings)} coupling warning(s))" if couplings else ""))
    return 0


def _diagnose(args) -> int:
    from .diagnose import diagnose, report_text
    from .diagnostics import parse_detector_names
    from .errors import OptionError

    thresholds: dict = {}
    for detector, key, value in args.threshold or []:
        thresholds.setdefault(detector, {})[key] = value
    try:
        result = diagnose(Path(args.run), parse_detector_names(args.detectors), thresholds,
                          Path(args.out) if args.out else None)
    except OptionError as exc:
        fail("diagnose", str(exc))
    print(json.dumps(result, indent=2) if args.json else report_text(result))
    return 0


def _compare(args) -> int:
    from .compare import BASELINE, compare, leaderboard_markdown
    from .registry import get_registry

    registry = get_registry()
    methods = sorted(registry.methods) if args.all_methods else list(args.method or [])
    if not methods:
        fail("compare", "name the methods to compare with --method (repeatable) or use --all-methods")
    if args.config and not Path(args.config).is_file():
        fail("compare", f"--config {args.config}: no such file")
    tasks = args.task or ["addition"]
    for task in tasks:
        if task not in registry.tasks:
            fail("compare", f"--task {task!r}: unknown task; see `po-registry tasks`")
    train_args = ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--eval-size", str(args.eval_size)]
    if args.learning_rate:
        train_args += ["--learning-rate", str(args.learning_rate)]
    if args.config:
        train_args += ["--config", args.config]
    method_configs = {}
    for method, source in args.method_config or []:
        if method not in (*methods, BASELINE):
            fail("compare", f"--method-config {method}={source}: {method!r} is not among the compared methods")
        if not Path(source).is_file():
            fail("compare", f"--method-config {method}={source}: no such file")
        method_configs[method] = Path(source)
    board = compare(methods, tasks, args.seeds, Path(args.output_dir), train_args,
                    train=lambda argv: main(["train", *argv]),
                    progress=lambda line: print(line, file=sys.stderr, flush=True), method_configs=method_configs)
    print(json.dumps(board, indent=2) if args.json else leaderboard_markdown(board))
    if not args.json:
        print(f"wrote {args.output_dir}/: leaderboard.md, leaderboard.json, " + ", ".join(f"{t}.png" for t in
                                                                                      board["tasks"]))
    return 0


def _failures(args) -> int:
    from .docs import failure_map

    rows = failure_map()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['failure']}  [{row['side']}]  {row['summary']}")
        for name, limits in row["detectors"].items():
            print(f"  {'detector:':12s} {name} ({', '.join(f'{k} {v:g}' for k, v in limits.items())})")
        if not row["detectors"]:
            print(f"  {'detector:':12s} none (declared for methods and for detectors that plugins add)")
        print(f"  {'fixed by:':12s} {', '.join(row['fixed_by']) or '-'}")
        if row["risked_by"]:
            print(f"  {'caused by:':12s} {', '.join(row['risked_by'])} (may)")
    return 0


def _tasks(args) -> int:
    from .registry import get_tasks

    rows = [{"task": t.name, "description": t.description, "max_completion_length": t.max_completion_length,
             "plugin": t.plugin, "example": list(t.problems(1, 0)[0])} for t in get_tasks().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        prompt, answer = row["example"]
        print(f"{row['task']}: {row['description']}  e.g. {prompt!r} -> {answer!r}")
    return 0


def _new_plugin(args) -> int:
    from .scaffold import ScaffoldError, generate

    try:
        root = generate(args.name, args.stage, args.directory)
    except ScaffoldError as exc:
        fail("new-plugin", str(exc))
    print(f"created {root}/ ({args.stage} template). Next:")
    print(f"  pip install -e {root} && python -m pytest {root}/tests")
    return 0


# -- eval -------------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bars: no library deprecation chatter or per-file loading bars."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    import datasets
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # we report unreadable files ourselves


def _eval(args) -> int:
    from .errors import PORegistryError, first_line
    from .run import load_model, read_dataset, resolve_task

    _quiet_libraries()
    run = _adapter_run(args.adapter)  # an adapter's run: its task, data and prompt style, unless given here
    dataset = args.dataset or (run.get("dataset") if args.task is None else None)
    if dataset:
        task = read_dataset(dataset, command="eval")
    else:
        try:
            task = resolve_task(args.task or run.get("task") or "addition")
        except PORegistryError as exc:
            fail("eval", str(exc))
    model_path = args.model
    if args.adapter:
        model_path = model_path or _adapter_base(args.adapter)
    model, tokenizer = load_model(model_path, task, command="eval")
    style = run.get("prompt_style", "auto") if args.prompt_style == "auto" else args.prompt_style
    try:
        task = prompted(task, tokenizer, style)
    except PORegistryError as exc:
        fail("eval", str(exc))
    if args.adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.adapter)
        except Exception as exc:  # noqa: BLE001 - a mismatched adapter: one line, not peft's traceback
            fail("eval", f"--adapter {args.adapter} does not fit the model {model_path or 'embedded'} "
                         f"({first_line(exc)[:300]})")
    problems = task.eval_problems(args.eval_size)
    accuracy = task.evaluate(model, tokenizer, problems)
    if args.json:
        print(json.dumps({"task": task.name, "accuracy": accuracy, "problems": len(problems)}))
    else:
        print(f"{task.name}: {task.metric} {accuracy:.1%} on {len(problems)} held-out problems")
    return 0


def _adapter_run(adapter: str | None) -> dict:
    """The settings of the run that wrote ``adapter`` (its config.yaml beside it), or {}."""
    saved = Path(adapter).parent / "config.yaml" if adapter else None
    if saved is None or not saved.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        fail("eval", f"--adapter {adapter}: its run's {saved} cannot be read ({str(exc).splitlines()[0]})")
    return data if isinstance(data, dict) else {}


def _adapter_base(adapter: str) -> str | None:
    """The local base model recorded in an adapter (None: the embedded model, which load_model finds itself)."""
    folder = Path(adapter)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        fail("eval", f"--adapter {adapter}: no adapter_config.json there")
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        fail("eval", f"--adapter {adapter}: no adapter weights there (adapter_model.safetensors)")
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (ValueError, OSError) as exc:
        fail("eval", f"--adapter {adapter}: adapter_config.json cannot be read ({exc})")
    if not base:
        return None
    if not (Path(base) / "config.json").is_file():
        fail("eval", f"--adapter {adapter}: its base model {base} is not a local model directory; pass --model")
    return base


def _train(args) -> int:
    from .run import train

    _quiet_libraries()
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
