"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE with the reward of the greedy completion as the baseline.

A(x, y) = R(x, y) - R(x, y_greedy), one greedy decode per prompt, no gradient through it; the gradient is
A * sum_t grad log pi_theta(y_t | x, y_<t). A completion, or a greedy baseline, that no reward function could score
(every reward None) gets A = 0; the count is logged.
"""

import torch

from po_registry import hookimpl

PAPER = "arXiv 2310.10505"


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """R - R_greedy per row (N,); 0 where either is NaN."""
    return (rewards - greedy_rewards).nan_to_num(0.0)


class ReMax:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("remax", components=["remax"], paper=PAPER,
                 summary="ReMax: the reward of a greedy decode of the same prompt is the baseline",
                 targets="REINFORCE's variance, without a critic (one extra greedy generation per prompt)",
                 objective=Objective(advantage="greedy"),
                 fixes=("gradient-variance",), risks=("generation-cost",))

    @hookimpl
    def po_check_config(self, args):
        if args.use_vllm:
            raise ValueError("remax decodes its greedy baselines with transformers; set use_vllm=False")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        greedy = batch.greedy_rewards()
        batch.log_metric("remax/greedy_reward", torch.nanmean(greedy).item())
        batch.log_metric("remax/beats_greedy_fraction", (total > greedy).float().mean().item())
        batch.log_metric("remax/unscored", (torch.isnan(total) | torch.isnan(greedy)).float().sum().item())
        return remax_advantages(total, greedy)
