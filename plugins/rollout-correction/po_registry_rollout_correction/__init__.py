"""Rollout correction: the sampler (vLLM, any rollout function returning log-probs) and the trainer disagree on
the probabilities of the same weights, so "on-policy" RL is silently off-policy (Yao et al. 2025, "Your efficient
RL framework secretly brings you off-policy RL training").

With w_t = pi_old(o_t) / mu(o_t) (trainer over sampler, same weights), per token or per sequence
(w = prod_t w_t), the per-token loss is multiplied by a weight without gradient:
  TIS (truncate): min(w, C) (and max(w, C_min)); MIS (mask): w if C_min <= w <= C else 0.
"""

import math

import torch

from po_registry import hookimpl

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class RolloutCorrection:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("rollout-correction", components=["rollout-correction"],
                 summary="truncated (TIS) or masked (MIS) importance sampling for sampler/trainer mismatch",
                 targets="the rollout engine's probabilities differ from the trainer's: on-policy RL is off-policy",
                 paper="https://fengyao.notion.site/off-policy-rl; IcePop",
                 objective=Objective(),  # no sampler log-probs on-policy: no correction
                 fixes=("sampler-mismatch",))

    @hookimpl
    def po_declare_options(self, register):
        register("rollout_correction_mode", "sequence_mask", choices=MODES,
                 help="token_* or sequence_* level; truncate (TIS) or mask (MIS)")
        register("rollout_correction_clip_max", 3.0, type=float, check=lambda v: v > 0, help="C, > 0")
        register("rollout_correction_clip_min", 0.0, type=float, check=lambda v: v >= 0,
                 help="lower bound (0: none)")
        register("rollout_correction_match_ratio", False, type=bool,
                 help="refuse a correction level that differs from the importance ratio's level")

    @hookimpl
    def po_check_config(self, args, options, assembly):
        level = options["rollout_correction_mode"].split("_")[0]
        ratio_level = assembly.importance_level(args)
        if options["rollout_correction_match_ratio"] and level != ratio_level:
            owner = assembly.owners["po_log_importance_weights"][0]
            raise ValueError(
                f"a {level}-level rollout correction ({options['rollout_correction_mode']}) under the {ratio_level}"
                f"-level importance ratio of plugin {owner!r}: choose rollout_correction_mode={ratio_level}_truncate "
                f"or {ratio_level}_mask, or set rollout_correction_match_ratio=false")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise ValueError("TRL's own vLLM correction is on as well: set vllm_importance_sampling_correction=false")

    @hookimpl
    def po_rollout_correction(self, batch):
        if batch.sampling_logps is None:
            return None  # the sampler returned no log-probs: nothing to correct
        options = batch.options
        mode = options["rollout_correction_mode"]
        log_w = torch.nan_to_num((batch.old_logps - batch.sampling_logps) * batch.mask, nan=0.0)
        if mode.startswith("sequence"):
            log_w = log_w.sum(-1, keepdim=True)
        high, low = options["rollout_correction_clip_max"], options["rollout_correction_clip_min"]
        log_w = log_w.detach()
        if mode.endswith("truncate"):
            weight = torch.exp(torch.clamp(log_w, min=math.log(low) if low > 0 else None, max=math.log(high)))
        else:
            inside = (log_w <= math.log(high)) & ((log_w >= math.log(low)) if low > 0 else torch.ones_like(log_w, dtype=torch.bool))
            weight = torch.where(inside, torch.exp(log_w), torch.zeros_like(log_w))
        masked = (weight == 0).float() if mode.endswith("mask") else (torch.exp(log_w) > high).float()
        batch.log_metric("rollout_correction/clipped_fraction", batch.global_masked_mean(masked))
        batch.log_metric("rollout_correction/weight_mean", batch.global_masked_mean(weight))
        return weight
