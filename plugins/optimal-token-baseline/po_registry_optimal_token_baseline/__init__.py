"""Optimal token baseline (OTB): a per-token baseline that minimises the variance of the policy gradient, weighted
by each path's gradient energy (verl's ``optimal_token_baseline`` and its tool-integrated variant).

For completion i at token t: G_{i,t} is the return-to-go (the outcome reward, plus any dense token rewards, from t
on) and W_{i,t} = sum_{j <= t} w_{i,j} its path energy, with w_j = 1 - 2 pi(y_j) + sum_v pi(v)^2 the squared norm
of grad_logits log pi(y_j) under the sampling policy (exact for a softmax over logits). Within a prompt's group

    B_t = sum_i G_{i,t} W_{i,t} / (sum_i W_{i,t} + 1e-8),   A_{i,t} = G_{i,t} - B_t,

the b that minimises sum_i (G_{i,t} - b)^2 W_{i,t}, the second moment of the per-sample gradient (G - b) grad log p
when the steps' gradients are orthogonal (exact for a policy with separate parameters per step). The sums run over
the completions that reach token t. ``tir-optimal-token-baseline`` indexes t by the completion's own tokens only
(environment tokens between turns removed), so turns align by how many tokens the model has written, and by
default zeroes the baseline past the second-longest completion (a lone tail would be its own baseline, A = 0).
"""

from __future__ import annotations

import torch

from po_registry import hookimpl
from po_registry.ops import outcome_token_rewards, returns_to_go

PAPER = "verl optimal_token_baseline (Optimal Token Baseline, verl docs 2025)"
EPSILON = 1e-8  # verl's


def token_energy(logps: torch.Tensor, collision: torch.Tensor) -> torch.Tensor:
    """(N, T) w_t = 1 - 2 pi(y_t) + sum_v pi(v)^2 = ||grad_logits log pi(y_t)||^2 for a softmax policy."""
    return 1 - 2 * logps.exp() + collision


def group_token_baselines(returns: torch.Tensor, energy: torch.Tensor, mask: torch.Tensor, group_size: int,
                          zero_tail: bool) -> torch.Tensor:
    """(N, T) B_t = sum_i G_{i,t} W_{i,t} / (sum_i W_{i,t} + eps) over each group's rows that reach t (``mask``);
    0 for a group with fewer than two rows in it. With ``zero_tail``, 0 on a unique longest row past the end of
    the second-longest (length: one past the last masked-in position)."""
    n, width = returns.shape
    g, w, m = (x.reshape(-1, group_size, width) for x in (returns, energy, mask))
    baseline = (g * w * m).sum(1) / ((w * m).sum(1) + EPSILON)
    baseline = baseline.unsqueeze(1).expand(-1, group_size, -1).clone()
    present = m.any(dim=2)  # (groups, G): rows with at least one token
    baseline[present.sum(1) < 2] = 0.0
    if zero_tail and group_size > 1:
        positions = torch.arange(width, device=mask.device)
        ends = ((positions + 1) * m.bool()).amax(dim=2)  # (groups, G)
        top = ends.topk(2, dim=1).values
        longest = (ends == top[:, :1]) & ((ends == top[:, :1]).sum(1, keepdim=True) == 1) & (top[:, :1] > top[:, 1:])
        tail = longest.unsqueeze(2) & (positions >= top[:, 1:].unsqueeze(2))
        baseline = baseline.masked_fill(tail, 0.0)
    return baseline.reshape(n, width)


def compress(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values at the masked-in tokens of each row, moved left in order, right-padded with 0; their mask)."""
    rank = (mask.cumsum(dim=-1) - 1).clamp(min=0).long()
    width = max(int(mask.sum(dim=-1).max().item()), 1) if mask.numel() else 1
    packed = torch.zeros(values.shape[0], width, dtype=values.dtype, device=values.device)
    packed_mask = torch.zeros_like(packed)
    keep = mask.bool()
    rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(rank)
    packed[rows[keep], rank[keep]] = values[keep]
    packed_mask[rows[keep], rank[keep]] = 1.0
    return packed, packed_mask


def expand(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`compress`: each masked-in token takes its rank's value, others 0."""
    rank = (mask.cumsum(dim=-1) - 1).clamp(min=0).long().clamp(max=packed.shape[1] - 1)
    return packed.gather(1, rank) * mask


class OptimalTokenBaseline:
    name = "optimal-token-baseline"
    by_own_tokens = False  # TIR: positions count the completion's own tokens
    po_reads = ("token_rewards",)

    @property
    def option(self) -> str:
        return self.name.replace("-", "_") + "_zero_tail"

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        tir = self.by_own_tokens
        register(self.name, components=[self.name], paper=PAPER,
                 objective=Objective(not_applicable="a per-token baseline from the group's own samples, weighted by "
                                                    "their gradient energy: its tests check it minimises the "
                                                    "per-sample gradient's second moment, by autograd"),
                 summary=("optimal token baseline over the completion's own tokens (environment tokens removed), "
                          "multi-turn" if tir else
                          "optimal token baseline: per-token group baseline weighted by each path's gradient energy"),
                 targets="a single group-mean baseline per sequence leaves the per-token gradient variance high; "
                         "the variance-minimising baseline weights each sample by its gradient's squared norm",
                 fixes=("gradient-variance",))

    @hookimpl
    def po_declare_options(self, register):
        register(self.option, self.by_own_tokens, type=bool,
                 help="zero the baseline of a group's unique longest completion past the second-longest's end "
                      "(a lone tail would be its own baseline and get no gradient)")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        if batch.policy_logps is None or batch.policy_collision_probs is None:
            raise RuntimeError(f"{self.name} needs the sampling policy's log-probs and collision probabilities "
                               f"(RewardBatch.policy_logps, policy_collision_probs); this batch has none")
        total = batch.weighted_reward(rewards)
        scorable = ~torch.isnan(total)
        mask = batch.completion_mask * scorable.unsqueeze(1)
        width = mask.shape[1]
        logps = batch.gather(batch.policy_logps())[:, :width]
        collision = batch.gather(batch.policy_collision_probs())[:, :width]
        returns = returns_to_go(outcome_token_rewards(total.nan_to_num(0.0), mask, batch.token_rewards), 1.0, mask)
        per_token = token_energy(logps, collision)
        energy = (per_token * mask).cumsum(dim=-1)  # W_t, the path energy
        zero_tail = batch.options[self.option]
        if not self.by_own_tokens:
            baseline = group_token_baselines(returns, energy, mask, batch.group_size, zero_tail)
        else:
            packed_returns, packed_mask = compress(returns, mask)
            packed_energy, _ = compress(energy, mask)
            baseline = expand(group_token_baselines(packed_returns, packed_energy, packed_mask, batch.group_size,
                                                    zero_tail), mask)
        batch.log_metric("token_baseline/energy_mean", ((per_token * mask).sum() / mask.sum().clamp(min=1)).item())
        return (returns - baseline) * mask


class TIROptimalTokenBaseline(OptimalTokenBaseline):
    name = "tir-optimal-token-baseline"
    by_own_tokens = True
