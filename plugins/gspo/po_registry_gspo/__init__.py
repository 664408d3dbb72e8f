"""GSPO and GSPO-token: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071).

GSPO:        s_i = (pi_theta(y_i|x) / pi_old(y_i|x))^(1/|y_i|) = exp((1/|y_i|) sum_t log r_{i,t})
             J = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)
GSPO-token:  s_{i,t} = sg[s_i] * pi_theta(y_{i,t}) / sg[pi_theta(y_{i,t})]   (equals GSPO for uniform A_i,
             and admits per-token advantages A_{i,t})
"""

import torch

from po_registry import hookimpl
from po_registry.ops import aggregate, clip_regions, clipped_surrogate, sequence_log_ratio


class GSPO:
    """Sequence-level importance ratio with its own (narrow) clip range; per-sequence mean aggregation."""

    name = "gspo"
    summary = "GSPO: one length-normalised importance ratio per sequence, clipped at 3e-4/4e-4"
    po_importance_level = "sequence"

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            self.name,
            components=[self.name],
            summary=self.summary,
            targets="per-token importance weights add length-growing noise amplified by clipping; MoE routing "
                    "volatility",
            paper="arXiv 2507.18071",
            objective=Objective(aggregation="length"),  # at ratio 1: A (1/|y|) sum_t grad log pi per sequence
            fixes=("ratio-outliers",),
        )

    @hookimpl
    def po_declare_options(self, register):
        positive = "must be > 0"
        register(f"{self.option_prefix}_epsilon_low", 3e-4, type=float, check=lambda v: v > 0, help=positive)
        register(f"{self.option_prefix}_epsilon_high", 4e-4, type=float, check=lambda v: v > 0, help=positive)

    option_prefix = "gspo"

    @hookimpl
    def po_log_importance_weights(self, batch):
        return sequence_log_ratio(batch.logps - batch.old_logps, batch.mask)

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        low = batch.options[f"{self.option_prefix}_epsilon_low"]
        high = batch.options[f"{self.option_prefix}_epsilon_high"]
        ratio = torch.exp(log_weights)
        clipped_low, clipped_high = clip_regions(ratio, batch.advantages, low, high)
        batch.log_metric(f"{self.name}/clip_ratio", batch.global_masked_mean((clipped_low | clipped_high).float()))
        return clipped_surrogate(ratio, batch.advantages, low, high)

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        # (1/G) sum_i of each sequence's loss; with per-token advantages the sequence loss is its token mean.
        return aggregate(per_token_loss, batch.mask, "seq-mean-token-mean")


class GSPOToken(GSPO):
    """GSPO's sequence ratio carried on every token, so per-token advantages (dense rewards, multi-turn) apply."""

    name = "gspo-token"
    po_importance_level = "token"
    summary = "GSPO-token: the sequence ratio on every token, sg[s_i] pi/sg[pi], for per-token advantages"
    option_prefix = "gspo_token"

    @hookimpl
    def po_log_importance_weights(self, batch):
        sequence = sequence_log_ratio(batch.logps - batch.old_logps, batch.mask).detach()
        return sequence + batch.logps - batch.logps.detach()
