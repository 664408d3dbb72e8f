"""VESPO: variance-reduced sequence-level policy optimization with a smooth Gamma weight (arXiv 2602.10693).

l_t = -sg[phi(w)] * A * log pi_theta(o_t),  phi(w) = e^lambda * w^k * e^(-lambda w)  (phi(1) = 1, largest at
w = k / lambda), where w = exp(sum_t log r_t) is the sequence's importance ratio (each token's log-ratio clamped
to [-20, 20], the sum to [log 1e-8, 20]; times the sampler correction when one is given) and (k, lambda) =
(k_pos, lambda_pos) for A >= 0, (k_neg, lambda_neg) for A < 0. Token-level sum over the batch divided by its
loss tokens (as DAPO). The options are TRL's own ``vespo_*`` config fields, so a TRL configuration carries over.
"""

import math

import torch

from po_registry import hookimpl
from po_registry.ops import aggregate, masked_sum

LOG_W_MIN, LOG_W_MAX = math.log(1e-8), 20.0
TOKEN_LOG_RATIO_BOUND = 20.0


def gamma_weight(log_w: torch.Tensor, advantages: torch.Tensor, k_pos: float, lambda_pos: float, k_neg: float,
                 lambda_neg: float) -> torch.Tensor:
    """phi(w) = exp(lambda + k log w - lambda w) per row, (k, lambda) by the sign of the row's advantage; an
    overflow or NaN gives 0 (no weight) rather than an infinite step."""
    positive = advantages >= 0
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lambda_pos, lambda_neg)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


class VESPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register(
            "vespo",
            components=["vespo"],
            replaces=["sampler-correction"],  # the sampler correction enters the weight, not the loss (as TRL)
            summary="VESPO: weight each sequence by a smooth Gamma function of its importance ratio, phi(1) = 1",
            targets="the variance of sequence-level importance weights off-policy, without a hard clip",
            paper="arXiv 2602.10693",
            objective=Objective(aggregation="tokens"),  # phi(1) = 1: on-policy, the policy gradient
            fixes=("clip-saturation", "ratio-outliers"),
        )

    @hookimpl
    def po_check_config(self, args, assembly):
        for name in ("vespo_k_pos", "vespo_k_neg", "vespo_lambda_pos", "vespo_lambda_neg"):
            if not getattr(args, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(args, name)}")
        if assembly.importance_level(args) != "token":
            (owner,) = assembly.owners["po_log_importance_weights"]
            raise ValueError(f"vespo builds its own sequence weight from token log-ratios, but the importance weights "
                             f"of plugin {owner!r} are per sequence: leave importance_sampling_level='token' and "
                             "compose no sequence-level ratio (gspo, gmpo)")
        if args.use_vllm and args.vllm_importance_sampling_correction and \
                args.vllm_importance_sampling_mode not in ("token_truncate", "token_mask"):
            raise ValueError("vespo folds the sampler correction into each sequence's weight token by token: set "
                             "vllm_importance_sampling_mode to 'token_truncate' or 'token_mask', got "
                             f"{args.vllm_importance_sampling_mode!r}")
        if args.loss_type not in ("vespo", "dapo"):
            raise ValueError(f"vespo aggregates as TRL's loss_type='vespo' (a token mean over the batch); "
                             f"loss_type={args.loss_type!r} asks for another aggregation")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        args = batch.args
        with torch.no_grad():
            log_w = masked_sum(log_weights.clamp(-TOKEN_LOG_RATIO_BOUND, TOKEN_LOG_RATIO_BOUND), batch.mask, dim=1)
            if batch.importance_sampling_ratio is not None:  # TRL's vLLM correction pi_old / pi_sampler
                correction = batch.importance_sampling_ratio.log().clamp(LOG_W_MIN, LOG_W_MAX)
                log_w = log_w + masked_sum(correction.expand_as(batch.mask), batch.mask, dim=1)
            log_w = log_w.clamp(LOG_W_MIN, LOG_W_MAX).unsqueeze(1)
            phi = gamma_weight(log_w, batch.advantages, args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg,
                               args.vespo_lambda_neg)
        batch.log_metric("vespo/phi_seq_mean", batch.global_masked_mean(phi))
        return -phi * batch.advantages * batch.logps

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "global-token-mean",
                         tokens_per_micro_batch=batch.tokens_per_micro_batch)
