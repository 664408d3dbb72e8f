"""Embedded verifiable tasks: problem generators, rewards and a held-out greedy-accuracy evaluation.

Tasks are a registry too: a plugin adds one with the ``po_register_tasks(register)`` hook.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UnknownMethodError, closest

EVAL_SEED = 1234
TRAIN_SEED = 0


class UnknownTaskError(UnknownMethodError):
    """A task name that no loaded plugin registered."""


@dataclass(frozen=True)
class Task:
    """A verifiable task: ``make_problem(rng) -> (prompt, answer)``; a completion is right when its text, up to
    the end-of-sequence token and stripped, equals the answer."""

    name: str
    description: str
    make_problem: Callable[[random.Random], tuple[str, str]]
    max_completion_length: int
    plugin: str = "po-registry"

    def problems(self, count: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        return [self.make_problem(rng) for _ in range(count)]

    def dataset(self, count: int = 2048, seed: int = TRAIN_SEED):
        """A ``datasets.Dataset`` with ``prompt`` and ``answer`` columns."""
        from datasets import Dataset

        prompts, answers = zip(*self.problems(count, seed))
        return Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)})

    def eval_problems(self, count: int = 512) -> list[tuple[str, str]]:
        """Held out: drawn from a seed the training set never uses."""
        return self.problems(count, EVAL_SEED)


def is_correct(completion: str, answer: str) -> bool:
    return completion.strip() == str(answer).strip()


def exact_match(completions, answer, **kwargs) -> list[float]:
    """Verifiable reward: 1.0 when the completion equals the answer, else 0.0."""
    return [float(is_correct(text, target)) for text, target in zip(completions, answer)]


def _operand(rng: random.Random) -> int:
    # A quarter one-digit operands: uniform 0-99 would make them 1 in 10 and the warm start never learns them.
    return rng.randint(0, 9) if rng.random() < 0.25 else rng.randint(10, 99)


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = _operand(rng), _operand(rng)
    return f"{a}+{b}=", str(a + b)


REVERSE_LETTERS = "abcdefgh"


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(REVERSE_LETTERS) for _ in range(rng.randint(2, 6)))
    return f"rev {word}=", word[::-1]


def _count(rng: random.Random) -> tuple[str, str]:
    letters = "abcd"
    word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 9)))
    target = rng.choice(letters)
    return f"count {target} in {word}=", str(word.count(target))


BUILTIN_TASKS = [
    Task("addition", "addition of numbers below 100: 'a+b=' -> the sum (answers of 1 to 3 digits)", _addition, 6),
    Task("reverse", "reverse a word of 2-6 letters: 'rev abc=' -> 'cba' (answers of varying length)", _reverse, 8),
    Task("count", "count a letter in a word: 'count a in abca=' -> '2'", _count, 4),
]


def get_tasks() -> dict[str, Task]:
    """Built-in tasks plus those registered by plugins."""
    from .registry import get_registry

    return get_registry().tasks


def get_task(name: str) -> Task:
    tasks = get_tasks()
    if name not in tasks:
        raise UnknownTaskError(f"unknown task {name!r}.{closest(name, tasks)} Available: {', '.join(sorted(tasks))}.")
    return tasks[name]
