"""MaxRL mean scaling (arXiv 2602.02710): A_i = (R_i - mean_G(R)) / (mean_G(R) + eps), for rewards R >= 0.

For 0/1 rewards the group mean is the success rate p, so the advantage is normalised by p instead of the std:
rare successes on hard prompts get large positive advantages. With R >= 0, R_i <= G mean_G(R), so
-1 < A_i < G - 1 for every group (an all-zero group gives 0). A signed reward can put the group mean near 0 while
R_i - mean stays of order 1, and A reaches 1/eps: such rewards are refused, naming the row and the reward.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import group_mean


def negative_reward_message(rewards: torch.Tensor, total: torch.Tensor, batch) -> str:
    """The first row with a negative weighted reward, with its reward columns, and the fix."""
    row = int(torch.nonzero(total < 0)[0])
    weights = batch.reward_weights.tolist()
    columns = ", ".join(f"{name} = {value:g} (weight {weight:g})"
                        for name, value, weight in zip(batch.reward_names, rewards[row].tolist(), weights))
    return (f"maxrl divides by the group mean reward and is defined for rewards >= 0 (0/1 success in the paper), "
            f"but row {row} has weighted reward {total[row].item():g} ({columns}; after reward shaping). Rescale "
            f"the reward to be >= 0 (for +-1 rewards, (r + 1) / 2), or use a method for signed rewards (grpo, "
            f"dr-grpo, rloo)")


class MaxRL:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Rule

        register("maxrl", components=["maxrl"], paper="arXiv 2602.02710",
                 summary="MaxRL: advantages scaled by the group mean reward (the success rate for 0/1 rewards)",
                 targets="std scaling's difficulty bias; learning from rare successes on hard prompts",
                 objective=Objective(log_reward=True, rewards="non_negative", advantage=Rule(  # maximum likelihood
                     "mean scaling (R - mean) / (mean + eps)", lambda rewards, lengths, options:
                     (rewards - rewards.mean(1, keepdim=True))
                     / (rewards.mean(1, keepdim=True) + options["maxrl_eps"]))))

    @hookimpl
    def po_declare_options(self, register):
        register("maxrl_eps", 1e-4, type=float, check=lambda v: v > 0, help="added to the group mean, > 0")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        if (total < 0).any():  # NaN (unscored) compares False
            raise ValueError(negative_reward_message(rewards, total, batch))
        mean = group_mean(total, batch.group_size)
        return ((total - mean) / (mean + batch.options["maxrl_eps"])).nan_to_num(0.0)
