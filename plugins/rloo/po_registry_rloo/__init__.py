"""RLOO: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

A_i = R_i - (1 / (G' - 1)) sum_{j != i} R_j over the G' scorable completions of the group (a reward function that
returned None for every column leaves a completion out of its siblings' baselines and gives it A = 0).
Identity: with every completion scorable, A_i = G / (G - 1) * (R_i - mean_G(R)).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import nanstd


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """R_i minus the mean reward of its scorable siblings; NaN where undefined (unscorable, or alone)."""
    grouped = rewards.view(-1, group_size)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    siblings = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
    return (grouped - siblings).view(-1)


class RLOO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("rloo", components=["rloo"],
                 summary="RLOO: leave-one-out baseline, each completion against the mean of its siblings",
                 targets="the group mean includes the sample itself, biasing GRPO's baseline", paper="arXiv 2402.14740",
                 objective=lambda args, options: Objective(  # normalised over the batch: a batch-set scale
                     advantage="leave_one_out", scale="free" if options["rloo_normalize_advantages"] else None),
                 fixes=("gradient-variance",))

    @hookimpl
    def po_declare_options(self, register):
        register("rloo_normalize_advantages", False, type=bool,
                 help="normalise advantages over the batch (mean 0, std 1)")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        advantages = leave_one_out(batch.weighted_reward(rewards), batch.group_size)
        if batch.options["rloo_normalize_advantages"]:
            advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
        return advantages.nan_to_num(0.0)
