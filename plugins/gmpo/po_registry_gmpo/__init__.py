"""GMPO: geometric-mean policy optimization (Zhao, Liu et al. 2025, arXiv 2507.20673).

Each token's log-ratio is clipped in log space, one-sided by the sign of the advantage (PPO's pessimistic min),
then averaged over the sequence: the sequence weight is the geometric mean of the clipped token ratios,
w_i = exp((1/|o_i|) sum_t clip_sgn(A)(log r_{i,t}, -eps_low, eps_high)), and l_i = -w_i A_i.
The geometric mean is robust to outlier token ratios, so the clip can be wide (e^{+-0.4}).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import masked_mean


class GMPO:
    po_importance_level = "sequence"  # one geometric-mean weight per sequence

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "gmpo",
            components=["gmpo"],
            summary="GMPO: geometric mean of token ratios clipped in log space (e^-0.4, e^0.4)",
            targets="outlier token ratios dominate the arithmetic mean and force narrow clips that kill exploration",
            paper="arXiv 2507.20673",
            objective=Objective(aggregation="length"),  # at ratio 1: A (1/|o|) sum_t grad log pi per sequence
            fixes=("ratio-outliers",),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("gmpo_epsilon_low", 0.4, type=float, check=lambda v: v > 0, help="log-space lower clip, > 0")
        register("gmpo_epsilon_high", 0.4, type=float, check=lambda v: v > 0, help="log-space upper clip, > 0")

    @hookimpl
    def po_log_importance_weights(self, batch):
        log_ratio = batch.logps - batch.old_logps
        bounded = torch.clamp(log_ratio, -batch.options["gmpo_epsilon_low"], batch.options["gmpo_epsilon_high"])
        # Pessimistic side: never let the clip raise the objective.
        clipped = torch.where(batch.advantages > 0, torch.minimum(log_ratio, bounded), torch.maximum(log_ratio, bounded))
        batch.log_metric("gmpo/clip_ratio", batch.global_masked_mean((clipped != log_ratio).float()))
        return masked_mean(clipped, batch.mask, dim=-1).unsqueeze(-1)

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        return -torch.exp(log_weights) * batch.advantages

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        """Plain mean over sequences of each sequence's loss (its token mean when the loss varies by token)."""
        if per_token_loss.shape[-1] == 1:
            per_sequence = per_token_loss.squeeze(-1)
        else:
            per_sequence = masked_mean(per_token_loss, batch.mask, dim=-1)
        return per_sequence.mean()
