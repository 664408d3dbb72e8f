"""Prompts a pretrained model can answer, and answers read out of what it writes.

The embedded tasks are written for the embedded character model: raw prompts (``66+1=``) and exact-match answers.
An instruction-tuned model answers in sentences, so for such a model a task is *prompted*:

- ``chat``: the problem goes through the tokenizer's chat template as one user message with a short instruction;
- ``few-shot``: a few solved training problems, one per line, then the problem (for base models);
- ``raw``: the task's own prompt and exact match (the embedded model).

The answer is read from the completion: the text after the last ``Answer:`` tag when there is one, else, for a
numeric answer, the last number in the text, else its last word (few-shot reads the first line only, since the model
goes on with more examples). A dataset whose prompts are chat messages is rendered with the chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError
from .tasks import SingleTurn, is_correct

PROMPT_STYLES = ("auto", "raw", "chat", "few-shot")
INSTRUCTION = "Solve: {prompt}\nReply with the answer only."
SHOTS = 4
COMPLETION_TOKENS = {"chat": 32, "few-shot": 16}  # room for a short sentence / one line
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TAG = re.compile(r"answer\s*[:=]\s*", re.IGNORECASE)


def resolve_style(style: str, tokenizer) -> str:
    """``auto``: ``chat`` when the tokenizer has a chat template, else ``raw``."""
    if style not in PROMPT_STYLES:
        raise OptionError(f"prompt style {style!r}: use one of {', '.join(PROMPT_STYLES)}")
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
    if style == "chat" and not getattr(tokenizer, "chat_template", None):
        raise OptionError("prompt style 'chat': the model's tokenizer has no chat template; use few-shot or raw")
    return style


def extract_answer(completion: str, answer: str, style: str) -> str:
    """The answer a completion gives, as a string to compare with ``answer`` (see the module's docstring)."""
    text = (completion.split("\n", 1)[0] if style == "few-shot" else completion).strip()
    tagged = _TAG.split(text)
    if len(tagged) > 1:
        text = tagged[-1]
    if _NUMBER.fullmatch(str(answer).strip()):
        numbers = _NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else ""
    words = text.split()
    return words[-1].strip(".,;:!?\"'`*") if words else ""


def answers_match(completion: str, answer: str, style: str) -> bool:
    if style == "raw":
        return is_correct(completion, answer)
    given, target = extract_answer(completion, answer, style), str(answer).strip()
    if _NUMBER.fullmatch(target) and _NUMBER.fullmatch(given):
        return float(given) == float(target)
    return given == target


def render_messages(messages: list[dict[str, Any]], tokenizer) -> str:
    """A chat-format prompt (a list of ``{"role", "content"}``) as text, through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise OptionError("the prompts are chat messages but the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class PromptedTask(SingleTurn):
    """A single-turn task as a pretrained model sees it: rendered prompts, answers extracted (same held-out
    problems and training problems as the task it wraps)."""

    task: Any
    tokenizer: Any
    style: str
    max_completion_length: int = 0
    shots: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.name, self.metric = self.task.name, self.task.metric
        if not self.max_completion_length:
            self.max_completion_length = COMPLETION_TOKENS[self.style]
        if self.style == "few-shot" and not self.shots:
            self.shots = [tuple(row) for row in self._train_rows()[:SHOTS]]

    def _train_rows(self) -> list[tuple[str, str]]:
        data = self.task.dataset(count=64) if hasattr(self.task, "make_problem") else self.task.dataset()
        return list(zip(data["prompt"], data["answer"]))

    def render(self, prompt) -> str:
        if isinstance(prompt, list):  # a chat-format dataset row: the messages as written
            return render_messages(prompt, self.tokenizer)
        if self.style == "chat":
            return render_messages([{"role": "user", "content": INSTRUCTION.format(prompt=prompt)}], self.tokenizer)
        return "".join(f"{p}{a}\n" for p, a in self.shots) + prompt

    def dataset(self, count: int | None = None, seed: int = 0):
        data = self.task.dataset(seed=seed) if count is None else self.task.dataset(count, seed=seed)
        return data.map(lambda row: {"prompt": self.render(row["prompt"])})

    def eval_problems(self, count: int = 512):
        return [(self.render(prompt), answer) for prompt, answer in self.task.eval_problems(count)]

    def end_token_ids(self) -> list[int]:
        """Tokens that end a completion: end of sequence, and for few-shot the end of the line (the answer's line is
        the whole answer; without it every completion runs to the token budget and counts as truncated)."""
        ends = [self.tokenizer.eos_token_id]
        newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        if self.style == "few-shot" and len(newline) == 1 and newline[0] not in ends:
            ends.append(newline[0])
        return ends

    def evaluate(self, model, tokenizer, problems) -> float:
        from .tasks import greedy_accuracy

        return greedy_accuracy(model, tokenizer, problems, self.max_completion_length,
                               correct=lambda text, answer: answers_match(text, answer, self.style),
                               eos_token_id=self.end_token_ids())

    def reward_function(self):
        style = self.style

        def answer_match(completions, answer, **kwargs) -> list[float]:
            """1.0 when the answer read from the completion equals the task's answer."""
            return [float(answers_match(text, target, style)) for text, target in zip(completions, answer)]

        return answer_match


def prompted(task, tokenizer, style: str):
    """``task`` as the model should see it under ``style`` (``raw``: the task itself)."""
    resolved = resolve_style(style, tokenizer)
    if has_chat_prompts(task):
        if resolved != "chat":
            raise OptionError(f"the dataset's prompts are chat messages: they need the chat prompt style (the "
                              f"model's tokenizer {'has no chat template' if resolved == 'raw' else 'has one'})")
        return PromptedTask(task, tokenizer, resolved)
    if resolved == "raw" or not isinstance(task, SingleTurn) or task.rollout_function() is not None:
        return task
    return PromptedTask(task, tokenizer, resolved)


def has_chat_prompts(task) -> bool:
    rows = getattr(task, "train_rows", None)
    return bool(rows) and isinstance(rows[0][0], list)
