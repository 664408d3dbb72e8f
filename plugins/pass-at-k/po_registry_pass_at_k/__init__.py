"""Pass@k (max@k) advantages: optimise the best of the G samples of a prompt, not their mean (Tang et al. 2025,
arXiv 2503.19595).

The objective is J = E[max_i R_i] over the G completions of a prompt (k = G; with 0/1 rewards, pass@G). Its
leave-one-out gradient estimator gives completion i the advantage A_i = max_j R_j - max_{j != i} R_j: the best
completion gets the margin over the runner-up, every other completion 0 (a tie at the top gives 0 to all).
Unbiased for grad J: sum_i E[(max - max_{-i}) grad log pi(y_i)], since max_{-i} does not depend on y_i.
With ``scale_rewards="group"`` A is divided by the group's reward std (+ 1e-6, as verl's ``grpo_passk``).
Unscorable completions (every reward None) take no part and get A = 0, as does a group with fewer than two
scorable completions.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import group_std

STD_EPS = 1e-6  # verl's grpo_passk


def best_of_group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) max_j R_j - max_{j != i} R_j over the scorable completions of each group (NaN rewards: unscorable)."""
    grouped = rewards.view(-1, group_size)
    scorable = ~torch.isnan(grouped)
    values = grouped.masked_fill(~scorable, float("-inf"))
    top = values.topk(min(2, group_size), dim=1).values
    best = top[:, :1]
    runner_up = top[:, 1:2] if group_size > 1 else torch.full_like(best, float("-inf"))
    without_me = torch.where(values == best, runner_up, best)  # the max of the others
    advantages = best - without_me
    enough = scorable.sum(dim=1, keepdim=True) >= 2
    return torch.where(scorable & enough, advantages, torch.zeros_like(advantages)).view(-1)


class PassAtK:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("pass-at-k", components=["pass-at-k"], paper="arXiv 2503.19595",
                 objective=Objective(not_applicable="its objective is E[max of the G rewards], not E[R]: the "
                                                    "plugin's tests check it against that objective's exact gradient"),
                 summary="pass@k: the best completion of each group gets its margin over the runner-up, the rest 0",
                 targets="pass@1 training sharpens the policy onto one answer; the best of k samples rewards "
                         "diversity (the objective sampling at inference optimises)",
                 fixes=("entropy-collapse",), risks=("gradient-variance",))

    @hookimpl
    def po_check_config(self, args):
        if args.scale_rewards not in ("group", "none"):
            raise ValueError(f"pass-at-k scales its advantages by the group's reward std (scale_rewards='group') "
                             f"or not at all ('none'), got scale_rewards={args.scale_rewards!r}")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        advantages = best_of_group_advantages(total, batch.group_size)
        winners = (advantages != 0).float().sum().item()
        batch.log_metric("pass_at_k/credited_fraction", winners / max(advantages.numel(), 1))
        if batch.args.scale_rewards == "group":
            advantages = advantages / (group_std(total, batch.group_size).nan_to_num(0.0) + STD_EPS)
        return advantages
