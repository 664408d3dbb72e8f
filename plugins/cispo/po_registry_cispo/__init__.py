"""CISPO: clipped importance-sampling policy optimization (MiniMax-M1, 2025, arXiv 2506.13585).

l_t = -sg[clip(r_t, 1 - eps_low, eps_max)] * A_t * log pi_theta(o_t), token-level mean over the batch.
Every token keeps a gradient: the importance weight is clipped, not the update.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import aggregate


class CISPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "cispo",
            components=["cispo"],
            summary="CISPO: clip the stop-gradient importance weight, never drop a token's gradient",
            targets="PPO clipping drops the gradients of rare pivotal tokens over many off-policy updates",
            paper="arXiv 2506.13585",
            objective=Objective(aggregation="tokens"),  # at ratio 1 the weight is 1: the policy gradient
            fixes=("clip-saturation",),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("cispo_epsilon_max", 5.0, type=float, check=lambda v: v > 1,
                 help="absolute cap of the importance weight, > 1")
        register("cispo_epsilon_low", 0.0, type=float, check=lambda v: 0 <= v < 1,
                 help="lower clip 1 - eps_low of the weight, in [0, 1); 0 leaves it unbounded")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        ratio = torch.exp(log_weights)
        low = batch.options["cispo_epsilon_low"]
        weight = torch.clamp(ratio, min=1 - low if low > 0 else None, max=batch.options["cispo_epsilon_max"])
        capped = (ratio > batch.options["cispo_epsilon_max"]) & (batch.advantages > 0)
        batch.log_metric("cispo/clip_ratio", batch.global_masked_mean(capped.float()))
        return -weight.detach() * batch.advantages * batch.logps

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "global-token-mean",
                         tokens_per_micro_batch=batch.tokens_per_micro_batch)
