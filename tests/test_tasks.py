"""The embedded tasks' splits: held-out prompts are never trained on, by the RL dataset or by the warm start."""

import os
import random
import subprocess
import sys

import pytest

from po_registry.errors import OptionError
from po_registry.registry import get_task
from po_registry.tasks import Task, is_held_out


@pytest.mark.parametrize("name", ["addition", "reverse", "count", "guess"])
def test_held_out_prompts_never_appear_in_training(name):
    task = get_task(name)
    training = set(task.dataset()["prompt"]) | {p for seed in (0, 1, 7) for p, _ in task.problems(500, seed)}
    held_out = {p for p, _ in task.eval_problems(512)}
    assert training.isdisjoint(held_out)
    assert not any(map(is_held_out, training)) and all(map(is_held_out, held_out))
    # About one prompt in eight is held out: measured on prompts drawn without the split.
    rng = random.Random(3)
    drawn = {task.make_problem(rng)[0] for _ in range(4000)}
    assert 0.08 < sum(map(is_held_out, drawn)) / len(drawn) < 0.17


def test_the_split_is_the_same_in_every_process():
    """A prompt's side depends on its text alone, not on Python's per-process string hashing: ranks of one run and
    the run and its later evaluation agree."""
    code = "from po_registry.registry import get_task; print(get_task('addition').eval_problems(64))"
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outputs == {f"{get_task('addition').eval_problems(64)}\n"}


def test_the_warm_start_trains_and_stops_on_the_training_split_only(monkeypatch):
    import po_registry.embedded as embedded

    task = get_task("addition")
    seen = []
    real_batch = embedded._sft_batch
    monkeypatch.setattr(embedded, "_sft_batch", lambda tok, problems: seen.extend(problems) or real_batch(tok, problems))
    evaluated = []
    monkeypatch.setattr(type(task), "evaluate", lambda self, model, tok, problems: evaluated.extend(problems) or 1.0)
    embedded.warm_start(task, max_steps=100, batch_size=4)
    assert len(seen) == 400 and not any(is_held_out(prompt) for prompt, _ in seen)
    assert evaluated and not any(is_held_out(prompt) for prompt, _ in evaluated)


def test_a_task_whose_prompts_all_fall_on_one_side_is_named():
    prompt = next(f"q{i}=" for i in range(100) if not is_held_out(f"q{i}="))
    task = Task("single", "one prompt", lambda rng: (prompt, "1"), 2)
    assert len(task.problems(5, 0)) == 5
    with pytest.raises(OptionError, match="task 'single': fewer than 1 in 1000 of its problems fall in the held-out"):
        task.eval_problems(2)
