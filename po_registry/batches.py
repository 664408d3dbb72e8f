"""What the hooks see: the global rollout batch on the reward side, the local micro-batch on the trajectory side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import masked_sum


def _ignore_metric(name: str, value: float) -> None:
    return None


@dataclass(frozen=True)
class RewardBatch:
    """The globally gathered generation batch, as the reward-side hooks see it.

    Rows are grouped: rows ``g * G ... g * G + G - 1`` are the G completions of prompt ``g``. A batch is built
    whole and never changed (frozen): the shaping stage's batch has the scores' fields, the rollout batch adds the
    rollout (``local``, ``rows``, ``completion_mask``, ``policy_logps``, ``policy_collision_probs``,
    ``greedy_completions``), and the pipeline
    builds the advantage stage's batch once, adding ``token_rewards`` and ``greedy_rewards``
    (:meth:`~po_registry.pipeline.Pipeline.score`). ``carry`` is the one way a stage hands the loss a value."""

    reward_names: list[str]
    reward_weights: torch.Tensor  # (K,)
    group_size: int  # G
    completion_lengths: torch.Tensor  # (N,) long: completion tokens, EOS included
    truncated: torch.Tensor  # (N,) bool: the completion hit the length cap without EOS
    max_completion_length: int
    options: Mapping[str, Any]
    args: Any  # the trainer's PolicyOptimizationConfig (TRL's GRPOConfig fields)
    step: int = 0
    max_steps: int = 0  # the run's optimizer steps (0: not known, as before training starts)
    training: bool = True
    process_index: int = 0
    num_processes: int = 1
    auxiliary: Mapping[str, Any] = field(default_factory=dict)  # the run's auxiliary models (RunContext)
    # The keys the composition's components declare they carry (``po_carries``); None: unchecked (synthetic batches)
    carries: frozenset[str] | None = None
    completion_mask: torch.Tensor | None = None  # (N, T) float loss mask of the rollout (None while shaping)
    token_rewards: torch.Tensor | None = None  # (N, T) dense rewards summed over plugins (advantage stage), or None
    local: Mapping[str, Any] = field(default_factory=dict)  # this process's rollout dict (empty while shaping)
    # This process's input rows, with the per-row fields a rollout function returned (multi-turn episodes).
    rows: list[dict] = field(default_factory=list)
    # (B, T) no-grad log-probs of this process's sampled tokens under the policy that sampled them; computed on
    # first call (token_rewards stage). The reference's are ``local.get("ref_per_token_logps")`` when beta != 0.
    policy_logps: Callable[[], torch.Tensor] | None = None
    # (B, T) no-grad collision probability sum_v pi(v | prefix)^2 at each completion position of this process's rows,
    # under the policy that sampled them at the sampling temperature: one forward pass, on first call.
    policy_collision_probs: Callable[[], torch.Tensor] | None = None
    processing_class: Any = None  # the trainer's tokenizer, to decode completions
    # Prompts (strings or conversations) -> token ids, as the trainer tokenizes the prompts it samples from (chat
    # template, generation prompt): for a stage that runs a model on prompts of its own making.
    tokenize_prompts: Callable[[list], list[list[int]]] | None = None
    log_metric: Callable[[str, float], None] = _ignore_metric
    # (B, T) -> (N, T): concatenate this process's rows with every other process's, padding T to the longest.
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # One greedy (temperature 0) completion of each row's prompt, decoded and scored on first call: its raw
    # rewards (N, K), completion lengths (N,) and truncation flags (N,). The trainer provides it; the pipeline
    # shapes it into ``greedy_rewards``.
    greedy_completions: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # (N,) weighted reward of those greedy completions, no gradient, shaped by the same po_shape_rewards fold as
    # the samples (a baseline, as in ReMax); NaN where every reward function returned None and no shaping scored
    # it. The pipeline derives it from ``greedy_completions`` for the advantage stage.
    greedy_rewards: Callable[[], torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.completion_lengths.shape[0])

    @property
    def group_ids(self) -> torch.Tensor:
        """(N,) long: index of each row's prompt group."""
        return torch.arange(self.num_rows, device=self.completion_lengths.device) // self.group_size

    @property
    def num_groups(self) -> int:
        return self.num_rows // self.group_size

    @property
    def local_mask(self) -> torch.Tensor:
        """(B, T) float loss mask of this process's rows (``local``): the completion mask times the tool mask, 0 on
        environment tokens inside a multi-turn completion and on padding."""
        mask = self.local["completion_mask"].float()
        return mask * self.local["tool_mask"] if "tool_mask" in self.local else mask

    @property
    def local_rows(self) -> slice:
        """This process's rows of the global batch (``local`` holds them)."""
        count = self.num_rows // self.num_processes
        return slice(self.process_index * count, (self.process_index + 1) * count)

    def carry(self, key: str, values: torch.Tensor) -> None:
        """Attach per-row values, (N,) or (N, T) over the global batch, to the rollout: this process's rows travel
        with their completions (through shuffling, micro-batching and dynamic sampling) and reach the trajectory
        side as ``LossBatch.inputs[key]``. For what a loss-side stage needs from the reward side (value targets)."""
        if self.carries is not None and key not in self.carries:
            declared = ", ".join(sorted(self.carries)) or "none"
            raise ValueError(f"carry({key!r}): no component of this composition declares it in po_carries "
                             f"(declared: {declared})")
        if values.shape[0] != self.num_rows:
            raise ValueError(f"carry({key!r}): expected {self.num_rows} rows, got {tuple(values.shape)}")
        if key in self.local:
            raise ValueError(f"carry({key!r}): the rollout already has an entry {key!r}")
        mine = values[self.local_rows].detach()
        if mine.dim() == 2:
            mine = mine[:, : self.local["completion_ids"].shape[1]]
        self.local[key] = mine

    def token_field(self, key: str, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, T) tensor of a per-completion-token list field of the rows (``turn_index``, ``turn_reward``, ...),
        right-padded with ``fill`` and gathered over processes."""
        width = self.local["completion_ids"].shape[1]
        device = self.local["completion_ids"].device
        values = [list(row[key])[:width] for row in self.rows]
        local = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype, device=device)
        gathered = self.gather(local - fill) + fill  # shifted, so that the gather's zero padding becomes ``fill``
        if self.completion_mask is not None and gathered.shape[1] < self.completion_mask.shape[1]:
            gathered = torch.nn.functional.pad(gathered, (0, self.completion_mask.shape[1] - gathered.shape[1]),
                                               value=fill)
        return gathered

    def weighted_reward(self, rewards: torch.Tensor) -> torch.Tensor:
        """R = sum_k w_k r_k (N,), NaN-ignoring; a row whose every reward is NaN stays NaN."""
        total = (rewards * self.reward_weights.to(rewards.device).unsqueeze(0)).nansum(dim=1)
        return total.masked_fill(torch.isnan(rewards).all(dim=1), float("nan"))


@dataclass(frozen=True)
class Scored:
    """What the reward side decides for a generation batch (global rows): the trajectory side's inputs."""

    advantages: torch.Tensor  # (N,) or (N, T)
    rewards: torch.Tensor  # (N,) weighted, shaped reward of each row (NaN: unscored)
    keep_samples: torch.Tensor | None  # (N,) bool: the rows every po_select_samples keeps; None: no such stage
    keep_groups: torch.Tensor | None  # (N // G,) bool: the groups every po_select_groups keeps; None: no such stage

    def kept_rows(self, group_size: int) -> torch.Tensor | None:
        """(N,) bool: the rows both selections keep; None when neither stage ran."""
        if self.keep_samples is None and self.keep_groups is None:
            return None
        keep = torch.ones(self.rewards.shape[0], dtype=torch.bool, device=self.rewards.device)
        if self.keep_samples is not None:
            keep &= self.keep_samples
        if self.keep_groups is not None:
            keep &= self.keep_groups.repeat_interleave(group_size)
        return keep


@dataclass
class LossBatch:
    """One local micro-batch, as the trajectory-side hooks see it."""

    logps: torch.Tensor  # (B, T) log pi_theta of the sampled tokens, with gradient
    old_logps: torch.Tensor  # (B, T) behaviour policy log-probs (logps.detach() on-policy)
    advantages: torch.Tensor  # (B, 1) or (B, T)
    mask: torch.Tensor  # (B, T) loss mask: completion mask times tool mask
    entropies: torch.Tensor | None  # (B, T)
    ref_logps: torch.Tensor | None  # (B, T) reference log-probs when beta != 0
    sampling_logps: torch.Tensor | None  # (B, T) sampler log-probs (vLLM, rollout functions)
    importance_sampling_ratio: torch.Tensor | None  # TRL's vLLM correction, (B, T) or (B, 1)
    num_items_in_batch: torch.Tensor  # 0-d: loss tokens in the global generation batch
    accumulation_steps: int  # micro-batches per optimizer step (1 in evaluation)
    steps_per_generation: int
    num_processes: int
    max_completion_length: int
    options: Mapping[str, Any]
    args: Any
    inputs: Mapping[str, Any]  # the raw micro-batch dict from the rollout (with what reward-side stages carried)
    rewards: torch.Tensor | None = None  # (B,) weighted, shaped reward of each row (NaN: unscored)
    process_index: int = 0  # this process's place in the order of ``gather`` and ``gather_ragged``
    step: int = 0
    max_steps: int = 0  # the run's optimizer steps (0: not known)
    training: bool = True
    ends_optimizer_step: bool = True  # the last micro-batch of its optimizer step's accumulation window
    auxiliary: Mapping[str, Any] = field(default_factory=dict)  # the run's auxiliary models (RunContext)
    log_metric: Callable[[str, float], None] = _ignore_metric
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # sum over processes
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # concatenate over processes
    gather_ragged: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # concatenate 1-D tensors of any length

    @property
    def tokens_per_micro_batch(self) -> torch.Tensor:
        """Loss tokens of the whole optimizer step (every process, every micro-batch) per micro-batch of one
        process: the normaliser that makes a micro-batch's token sum, once the pipeline divides by the accumulation
        steps, a token mean over the step (DAPO's), exact across gradient accumulation and processes."""
        tokens = self.num_items_in_batch.clamp(min=1.0) / self.num_processes
        if self.training:  # the count spans the generation batch, split over steps_per_generation micro-batches
            tokens = tokens / self.steps_per_generation
        return tokens

    def token_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This process's share of the mean of ``x`` over the ``mask`` tokens of this micro-batch on every process,
        with gradient: sum_local(x mask) * P / sum_all(mask). Averaged over the P processes (as DDP averages
        gradients) it is the token mean of the whole micro-batch, the same on 2 processes as on 1."""
        return self.mean_over_processes(masked_sum(x, mask), mask.sum())

    def mean_over_processes(self, local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
        """:meth:`token_mean` from this process's sum and count: local_sum * P / (sum of the counts)."""
        count = self.reduce_sum(local_count.detach().float().reshape(()))
        return local_sum * self.num_processes / count.clamp(min=1.0)

    def global_masked_mean(self, x: torch.Tensor) -> float:
        """Mean of ``x`` over loss tokens of all processes; a (B, 1) tensor counts once per row."""
        if x.shape[-1] == 1 and self.mask.shape[-1] != 1:
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([masked_sum(x, self.mask), self.mask.sum().float()])
        totals = self.reduce_sum(local)
        return (totals[0] / totals[1].clamp(min=1.0)).item()


class StepTotals:
    """Sums of a few per-micro-batch statistics over one optimizer step and every process, for a controller that
    moves once a step (an adaptive coefficient): :meth:`add` returns the step's totals at the micro-batch that ends
    it (``LossBatch.ends_optimizer_step``), None before."""

    def __init__(self):
        self._sums: torch.Tensor | None = None

    def add(self, batch: LossBatch, *values: torch.Tensor) -> list[float] | None:
        stats = torch.stack([value.detach().float().reshape(()) for value in values])
        self._sums = stats if self._sums is None else self._sums + stats
        if not batch.ends_optimizer_step:
            return None
        totals, self._sums = batch.reduce_sum(self._sums).tolist(), None
        return totals
