"""Process rewards: dense credit from a step or token reward function (DeepSeekMath process supervision, the
survey's reward-density axis).

A step-reward function ``f(completions, completion_ids, **columns) -> list[list[float]]`` returns, per completion,
one reward per token (a list as long as its completion) or per step (steps end at the last token of each line,
the last step at the completion's end). Step rewards r^j are normalised over the group (all steps of the G
completions): r~ = (r - mean) / (std + eps); the dense term of token t is the sum of the normalised rewards of
the steps that end at or after t, sum_{j: end(j) >= t} r~_j. The advantage estimator adds it to the sequence
advantage (the baseline: A_{i,t} = A_i + dense_t), so process and outcome rewards combine.
"""

import functools
import importlib

import torch

from po_registry import hookimpl
from po_registry.ops import returns_to_go


@functools.lru_cache(maxsize=None)
def load_function(spec: str):
    module, _, name = spec.partition(":")
    function = getattr(importlib.import_module(module), name)
    if not callable(function):
        raise TypeError(f"{spec} is not callable")
    return function


def step_ends(token_texts: list[str]) -> list[int]:
    """Indices of the last token of each step: every token containing a newline, and the final token (an empty
    completion has no step)."""
    ends = [i for i, text in enumerate(token_texts) if "\n" in text]
    if token_texts and (not ends or ends[-1] != len(token_texts) - 1):
        ends.append(len(token_texts) - 1)
    return ends


class ProcessReward:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, process_supervision

        register("process-reward", components=["process-reward"], paper="arXiv 2402.03300 (§4.1.3)",
                 summary="process rewards: per-step or per-token rewards normalised per group, summed to the end",
                 targets="coarse outcome credit: one scalar for every token of a long answer",
                 objective=Objective(group_dense=(process_supervision("process_reward_function"),)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("process_reward_function", "", type=str, help="the step-reward function, module:function")

    @hookimpl
    def po_check_config(self, options):
        spec = options["process_reward_function"]
        if not spec or ":" not in spec:
            raise ValueError("set process_reward_function to a step-reward function as module:function")
        try:
            load_function(spec)
        except (ImportError, AttributeError, TypeError) as exc:
            raise ValueError(f"process_reward_function {spec!r}: {type(exc).__name__}: {exc}") from None

    @hookimpl
    def po_token_rewards(self, batch):
        ids, mask = batch.local["completion_ids"], batch.local["completion_mask"]
        G = batch.group_size
        if ids.shape[0] % G:
            raise ValueError("process rewards are normalised per group: each process needs whole groups "
                             "(per_device_train_batch_size * steps_per_generation a multiple of num_generations)")
        rows = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask)]
        tokenizer = batch.processing_class
        completions = tokenizer.batch_decode(rows, skip_special_tokens=True)
        scores = load_function(batch.options["process_reward_function"])(completions=completions, completion_ids=rows)
        rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        steps = torch.zeros_like(rewards)  # 1 where a step ends
        for i, (row, score) in enumerate(zip(rows, scores)):
            ends = list(range(len(row))) if len(score) == len(row) else step_ends(
                [tokenizer.decode([token]) for token in row])
            if len(score) != len(ends):
                hint = " (an empty completion has no step: return [] for it)" if not row else ""
                raise ValueError(f"completion {i}: {len(score)} rewards for {len(row)} tokens and {len(ends)} steps"
                                 f"{hint}")
            rewards[i, ends] = torch.tensor(score, dtype=torch.float32, device=mask.device)
            steps[i, ends] = 1.0
        normalised = normalise_per_group(rewards, steps, G)
        local = torch.stack([steps.sum(), steps.new_tensor(float(len(rows)))]).reshape(1, 2)
        total, count = batch.gather(local).sum(0)  # over every process's completions
        batch.log_metric("process_reward/steps_per_completion", (total / count.clamp(min=1.0)).item())
        return returns_to_go(normalised) * mask


def normalise_per_group(rewards: torch.Tensor, steps: torch.Tensor, group_size: int) -> torch.Tensor:
    """(r - mean) / (std + 1e-4) over all steps of each group's completions; 0 where no step ends."""
    shape = rewards.shape
    grouped, marks = rewards.reshape(-1, group_size * shape[1]), steps.reshape(-1, group_size * shape[1])
    count = marks.sum(1, keepdim=True)
    mean = (grouped * marks).sum(1, keepdim=True) / count.clamp(min=1.0)
    std = ((((grouped - mean) ** 2) * marks).sum(1, keepdim=True) / (count - 1).clamp(min=1.0)).sqrt()
    return ((grouped - mean) / (std + 1e-4) * marks).reshape(shape)
