"""Dr.GRPO: GRPO done right (Liu et al. 2025, arXiv 2503.20783).

Advantage without the group std, A_i = R_i - mean_G(R), and a constant loss normaliser,
L = (1 / (B * L_max)) sum_i sum_t l_{i,t}, which remove GRPO's difficulty bias and length bias.
"""

from po_registry import hookimpl
from po_registry.ops import aggregate, group_mean


class DrGRPO:
    """Reward side: mean-centred advantages. Loss aggregation: token sum over a constant B * L_max."""

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "dr-grpo",
            components=["dr-grpo"],
            summary="Dr.GRPO: advantages without std scaling, loss over a constant B * L_max",
            targets="length bias (1/|o| favours short right and long wrong answers) and difficulty bias (std)",
            paper="arXiv 2503.20783",
            objective=Objective(advantage="mean", aggregation="max_length"),
            fixes=("length-drift",),
        )

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        total = batch.weighted_reward(rewards)
        return (total - group_mean(total, batch.group_size)).nan_to_num(0.0)

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "seq-mean-token-sum-norm",
                         max_completion_length=batch.max_completion_length)
