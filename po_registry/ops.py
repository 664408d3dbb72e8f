"""Shared tensor math for policy-optimization plugins.

Plain, typed functions with no trainer state, so that a plugin reads like the formula in its paper.
Shapes: ``B`` rows (completions), ``T`` completion tokens, ``N`` rows of the globally gathered batch,
``G`` completions per prompt (a *group*: ``G`` consecutive rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = [
    "AggregationMode",
    "aggregate",
    "clip_regions",
    "clipped_surrogate",
    "clipped_value_loss",
    "gae",
    "group_mean",
    "group_std",
    "group_normalize",
    "high_entropy_mask",
    "kl_estimate",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "nanstd",
    "outcome_token_rewards",
    "returns_to_go",
    "sequence_log_ratio",
    "tokens_from_turns",
    "turns_from_tokens",
]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when ``dim`` is None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is set; an empty mask gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked positions (population std), 0 outside the mask."""
    mean = masked_mean(x, mask)
    std = masked_mean((x - mean) ** 2, mask).sqrt()
    return (x - mean) / (std + eps) * mask


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaN entries (NaN when fewer than two values)."""
    if (x.numel() if dim is None else x.shape[dim]) > 1 and not torch.isnan(x).any():
        return torch.std(x) if dim is None else torch.std(x, dim=dim, keepdim=keepdim)  # no NaN: one fused op
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    bessel = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan"), dtype=variance.dtype))
    std = torch.sqrt(variance * bessel)
    if dim is None:
        return std.reshape(())
    return std if keepdim else std.squeeze(dim)


def group_mean(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group NaN-ignoring mean of ``values`` (N,), broadcast back to (N,)."""
    return torch.nanmean(values.view(-1, group_size), dim=1).repeat_interleave(group_size)


def group_std(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group Bessel-corrected NaN-ignoring std of ``values`` (N,), broadcast back to (N,).

    A group of size 1 has std 0 (no spread to measure)."""
    if group_size < 2:
        return torch.zeros_like(values)
    return nanstd(values.view(-1, group_size), dim=1).repeat_interleave(group_size)


def group_normalize(values: torch.Tensor, group_size: int, present: torch.Tensor | None = None,
                    eps: float = 1e-4) -> torch.Tensor:
    """(x - mean) / (std + eps) within each group of ``group_size`` rows, column by column, over the ``present``
    entries (Bessel-corrected std; 0 where fewer than two are present); absent entries give 0. ``values``: (N,) or
    (N, K)."""
    flat = values.dim() == 1
    values = values.unsqueeze(1) if flat else values
    present = torch.ones_like(values, dtype=torch.bool) if present is None else present.bool().view_as(values)
    grouped = torch.where(present, values, torch.nan).view(-1, group_size, values.shape[1])
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    std = nanstd(grouped, dim=1, keepdim=True).nan_to_num(0.0)
    normalized = ((grouped - mean) / (std + eps)).nan_to_num(0.0).view_as(values) * present
    return normalized.squeeze(1) if flat else normalized


def turns_from_tokens(token_values: torch.Tensor, turn_index: torch.Tensor, num_turns: int) -> torch.Tensor:
    """(N, K) per-turn sums of (N, T) token values; ``turn_index`` (N, T) holds each token's turn, -1 for none."""
    turns = torch.zeros(token_values.shape[0], num_turns + 1, dtype=token_values.dtype, device=token_values.device)
    slot = torch.where(turn_index >= 0, turn_index, num_turns).long()
    return turns.scatter_add_(1, slot, token_values)[:, :num_turns]


def tokens_from_turns(turn_values: torch.Tensor, turn_index: torch.Tensor) -> torch.Tensor:
    """(N, T) token values from (N, K) per-turn values: each token gets its turn's value, 0 where the index is -1."""
    slot = turn_index.clamp(min=0).long()
    return turn_values.gather(1, slot) * (turn_index >= 0)


def kl_estimate(
    logps: torch.Tensor, ref_logps: torch.Tensor, estimator: Literal["k1", "k2", "k3", "abs"] = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1/k2/k3, and |log rho|).

    With log rho = ref_logps - logps: k1 = -log rho, k2 = (log rho)^2 / 2, k3 = (rho - 1) - log rho, abs = |log rho|."""
    log_rho = ref_logps - logps
    if estimator == "k1":
        return -log_rho
    if estimator == "k2":
        return 0.5 * log_rho**2
    if estimator == "k3":
        return torch.exp(log_rho) - log_rho - 1
    if estimator == "abs":
        return log_rho.abs()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2', 'k3' or 'abs'")


def straight_through(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``gradient_of`` in the backward pass."""
    return gradient_of - gradient_of.detach() + value.detach()


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's last masked-in token (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.bool()).amax(dim=1)


def outcome_token_rewards(outcome: torch.Tensor, mask: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
    """(N, T) per-token rewards: ``dense`` (or zeros) plus the outcome reward (N,) on each row's last token, masked."""
    rewards = torch.zeros_like(mask) if dense is None else dense.clone()
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += outcome
    return rewards * mask


def returns_to_go(rewards: torch.Tensor, gamma: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Discounted return along the last dimension: G_t = sum_{s >= t} gamma^(s - t) r_s.

    Zero rewards past a sequence's end (padding) add nothing, so right-padded rows need no mask. With ``mask``, as
    in :func:`gae`: the sum runs over masked-in tokens only, a hole inside a row (environment tokens) is no step of
    the discount and its reward is not read, and G is 0 outside the mask."""
    if mask is None:
        mask = torch.ones_like(rewards)
    rewards = rewards * mask
    if gamma == 1.0:
        return rewards.flip(-1).cumsum(-1).flip(-1) * mask
    action = mask.bool()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = torch.where(action[..., t], rewards[..., t] + gamma * running, running)
        out[..., t] = running * mask[..., t]
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float | torch.Tensor = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked-in (action) tokens of each row (Schulman et al. 2015).

    delta_t = r_t + gamma V_next - V_t and A_t = delta_t + gamma lam A_next, where *next* is the row's next
    masked-in token: a masked position inside a row (environment tokens between two turns) is skipped, not an end of
    the episode, and is no step of the discount; only the end of the row ends it (V after its last action token is
    0). Returns (advantages, returns = advantages + values), both 0 outside the mask; rewards and values on masked
    positions are not read. ``lam`` is one value or one per row (N,) (VAPO's length-adaptive lambda)."""
    action = mask.bool()
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A of the next action token
    next_value = torch.zeros_like(rewards[:, 0])  # V of the next action token
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        here = action[:, t]
        running = torch.where(here, delta + gamma * lam * running, running)  # a hole passes A_next through
        next_value = torch.where(here, values[:, t], next_value)
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised sequence log-ratio (GSPO): (1/|o|) sum_t log r_t, shape (B, 1)."""
    return masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    delta: float | None = None,
) -> torch.Tensor:
    """Per-token PPO loss -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    ``delta`` (INTELLECT-2) caps the unclipped branch at min(r, delta) so negative advantages are bounded too.
    Shapes broadcast: ratio (B, T) or (B, 1), advantages (B, 1) or (B, T)."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    return -torch.min(ratio * advantages, clipped * advantages)


def clip_regions(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                 epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the clipped surrogate's clip binds (no gradient there): (r < 1 - eps_low and A < 0,
    r > 1 + eps_high and A > 0), as bool tensors broadcast from ``ratio`` and ``advantages``."""
    return (ratio < 1 - epsilon_low) & (advantages < 0), (ratio > 1 + epsilon_high) & (advantages > 0)


AggregationMode = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm", "global-token-mean", "seq-sum"]


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: AggregationMode,
    *,
    max_completion_length: int | None = None,
    tokens_per_micro_batch: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to one micro-batch's scalar loss (the pipeline divides it by the accumulation steps).

    Modes:
      - ``seq-mean-token-mean`` (GRPO): mean over rows of each row's token mean.
      - ``token-mean`` (BNPO): token mean over the micro-batch.
      - ``seq-mean-token-sum-norm`` (Dr.GRPO): token sum / (B * max_completion_length).
      - ``global-token-mean`` (DAPO): token sum / ``tokens_per_micro_batch``, the loss tokens of the whole
        optimizer step (every process, every micro-batch) per micro-batch of one process: over the step, a token
        mean.
      - ``seq-sum`` (LUSPO): mean over rows of each row's token sum.
    """
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token_loss, mask, dim=-1).mean()
    if mode == "token-mean":
        return masked_mean(per_token_loss, mask)
    if mode == "seq-mean-token-sum-norm":
        if max_completion_length is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_completion_length")
        return masked_sum(per_token_loss, mask) / (per_token_loss.size(0) * max_completion_length)
    if mode == "global-token-mean":
        if tokens_per_micro_batch is None:
            raise ValueError("aggregation 'global-token-mean' needs tokens_per_micro_batch")
        return masked_sum(per_token_loss, mask) / tokens_per_micro_batch
    if mode == "seq-sum":
        return masked_sum(per_token_loss, mask, dim=-1).mean()
    raise ValueError(f"unknown aggregation mode {mode!r}")


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, top_fraction: float,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The 80/20 rule as TRL's ``top_entropy_quantile``: (B, T) mask (``mask``'s dtype) of the loss tokens whose
    entropy is at least the (1 - ``top_fraction``) quantile of the entropies of all loss tokens.

    ``gather`` concatenates 1-D tensors of every process (the quantile is then global); ``top_fraction`` >= 1 keeps
    every loss token without a quantile (and without a collective call); no loss token anywhere gives all zeros."""
    if top_fraction >= 1.0:
        return mask.clone()
    values = entropies[mask.bool()].float()
    values = gather(values) if gather is not None else values
    if values.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(values, 1.0 - top_fraction)
    return ((entropies >= threshold) & mask.bool()).to(mask.dtype)
