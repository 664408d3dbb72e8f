"""Rollout correction: the sampler (vLLM, any rollout function returning log-probs) and the trainer disagree on
the probabilities of the same weights, so "on-policy" RL is silently off-policy (Yao et al. 2025, "Your efficient
RL framework secretly brings you off-policy RL training").

With w_t = pi_old(o_t) / mu(o_t) (trainer over sampler, same weights), per token or per sequence
(w = prod_t w_t), the per-token loss is multiplied by a weight without gradient:
  TIS (truncate): min(w, C) (and max(w, C_min)); MIS (mask): w if C_min <= w <= C else 0.
Batch normalisation (optional) divides the weights by their mean over the micro-batch's loss tokens (token modes) or
sequences (sequence modes) on every process, so they average to 1.
Rejection sampling (optional, verl's rollout_rs) drops tokens or whole sequences whose divergence between sampler and
trainer is out of bounds, from the token statistics log w (k1), (log w)^2 / 2 (k2), w - 1 - log w (k3) (the
estimators of KL(mu || pi_old) on samples of mu), per token or reduced per sequence by sum, mean or max:
  token_k1, seq_sum_k1, seq_mean_k1: lower <= exp(statistic) <= upper (a bound on the weight);
  the k2 and k3 criteria: statistic <= upper. Several criteria must all pass.
Bypass mode (optional, verl's bypass_mode with its ppo_clip loss): the sampler's log-probs stand in for pi_old, which
is then not recomputed. The importance ratio becomes pi_theta / mu and the objective's clip its trust region, so no
weight is applied on top (it would count the ratio twice); rejection sampling then reads w = pi_theta / mu.
"""

import math

import torch

from po_registry import hookimpl
from po_registry.ops import kl_estimate, masked_mean, masked_sum

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
REJECTION_CRITERIA = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                      "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
LOG_RATIO_BOUND = 20.0


def parse_rejection(criteria: str, bounds: str) -> list[tuple[str, float, float]]:
    """``"token_k1,seq_max_k3"`` and ``"0.5_2,0.1"`` -> [(criterion, lower, upper)]. A k1 bound is ``lower_upper`` on
    the weight, or ``upper`` alone (lower = 1 / upper); a k2 or k3 bound is the statistic's upper bound. One bound may
    serve every criterion."""
    names = [name.strip() for name in criteria.split(",") if name.strip()]
    for name in names:
        if name not in REJECTION_CRITERIA:
            raise ValueError(f"rollout_rejection: unknown criterion {name!r}; expected {', '.join(REJECTION_CRITERIA)}")
    specs = [spec.strip() for spec in bounds.split(",") if spec.strip()]
    if names and len(specs) not in (1, len(names)):
        raise ValueError(f"rollout_rejection_bounds: {len(specs)} bounds for {len(names)} criteria; give one bound, "
                         "or one per criterion")
    parsed = []
    for name, spec in zip(names, specs * len(names) if len(specs) == 1 else specs):
        try:
            values = [float(part) for part in spec.split("_")]
        except ValueError:
            raise ValueError(f"rollout_rejection_bounds: {spec!r} for {name} is not a number (or lower_upper)") from None
        if name.endswith("k1"):
            lower, upper = (1.0 / values[0], values[0]) if len(values) == 1 else values[:2]
            if len(values) > 2 or not 0 < lower <= upper:
                raise ValueError(f"rollout_rejection_bounds: {spec!r} for {name}: expected upper or lower_upper with "
                                 "0 < lower <= upper (bounds on the weight pi_old / mu)")
        else:
            if len(values) != 1 or values[0] <= 0:
                raise ValueError(f"rollout_rejection_bounds: {spec!r} for {name}: expected one upper bound > 0")
            lower, upper = 0.0, values[0]
        parsed.append((name, lower, upper))
    return parsed


def rejection_keep(log_w: torch.Tensor, mask: torch.Tensor, criteria: list[tuple[str, float, float]]) -> torch.Tensor:
    """(B, T) float: 1 where every criterion passes (a sequence criterion keeps or drops the whole row)."""
    log_w = log_w.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    sampler = torch.zeros_like(log_w)  # kl_estimate(mu, pi_old) needs log mu and log pi_old: their difference is log w
    statistics = {"k1": log_w, "k2": kl_estimate(sampler, log_w, "k2"), "k3": kl_estimate(sampler, log_w, "k3")}
    keep = torch.ones_like(log_w)
    for name, lower, upper in criteria:
        level, estimator = name.rsplit("_", 1)
        value = statistics[estimator]
        if level == "seq_sum":
            value = masked_sum(value, mask, dim=1).unsqueeze(1)
        elif level == "seq_mean":
            value = masked_mean(value, mask, dim=1).unsqueeze(1)
        elif level == "seq_max":
            value = value.masked_fill(mask == 0, float("-inf")).amax(dim=1, keepdim=True).clamp(min=0.0)
        if estimator == "k1":
            passed = (value >= math.log(lower)) & (value <= math.log(upper))
        else:
            passed = value <= upper
        keep = keep * passed.float()
    return keep


def sampler_log_weight(batch) -> torch.Tensor:
    """(B, T) log w, without gradient, 0 off the loss mask and where the sampler gave no log-prob: log pi_old - log mu,
    or in bypass mode (pi_old is mu there) log pi_theta - log mu."""
    policy = batch.logps if batch.options["rollout_correction_bypass"] else batch.old_logps
    return torch.nan_to_num((policy.detach() - batch.sampling_logps) * batch.mask, nan=0.0)


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
        register("rollout_correction_batch_normalize", False, type=bool,
                 help="divide the weights by their mean over the micro-batch (every process), so they average to 1")
        register("rollout_correction_bypass", False, type=bool,
                 help="bypass mode: the sampler's log-probs are pi_old (not recomputed); the ratio pi_theta/mu and "
                      "its clip correct, no weight on top; rejection reads pi_theta/mu")
        register("rollout_rejection", "", type=str,
                 help="rejection criteria, comma-separated: " + ", ".join(REJECTION_CRITERIA) + " ('': none)")
        register("rollout_rejection_bounds", "", type=str,
                 help="one bound per criterion (or one for all): k1 'lower_upper' or 'upper' on the weight, k2/k3 "
                      "the statistic's upper bound")

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
        criteria = parse_rejection(options["rollout_rejection"], options["rollout_rejection_bounds"])
        if options["rollout_rejection"].strip() and not criteria:
            raise ValueError("rollout_rejection names no criterion")
        if criteria == [] and options["rollout_rejection_bounds"].strip():
            raise ValueError("rollout_rejection_bounds is set but rollout_rejection names no criterion")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            raise ValueError("TRL's own vLLM correction is on as well: set vllm_importance_sampling_correction=false")

    @hookimpl
    def po_setup(self, context, options):
        if options["rollout_correction_bypass"]:
            context.old_logps_from_sampler = True

    @hookimpl
    def po_rollout_correction(self, batch):
        if batch.sampling_logps is None:
            return None  # the sampler returned no log-probs: nothing to correct
        options = batch.options
        if options["rollout_correction_bypass"]:
            weight = torch.exp(sampler_log_weight(batch).clamp(max=LOG_RATIO_BOUND))
            batch.log_metric("rollout_correction/weight_mean", batch.global_masked_mean(weight))
            return None  # the ratio pi_theta / mu is the importance weight already
        mode = options["rollout_correction_mode"]
        log_w = sampler_log_weight(batch)
        if mode.startswith("sequence"):
            log_w = log_w.sum(-1, keepdim=True)
        high, low = options["rollout_correction_clip_max"], options["rollout_correction_clip_min"]
        if mode.endswith("truncate"):
            weight = torch.exp(torch.clamp(log_w, min=math.log(low) if low > 0 else None, max=math.log(high)))
        else:
            inside = (log_w <= math.log(high)) & ((log_w >= math.log(low)) if low > 0 else torch.ones_like(log_w, dtype=torch.bool))
            weight = torch.where(inside, torch.exp(log_w), torch.zeros_like(log_w))
        masked = (weight == 0).float() if mode.endswith("mask") else (torch.exp(log_w) > high).float()
        batch.log_metric("rollout_correction/clipped_fraction", batch.global_masked_mean(masked))
        batch.log_metric("rollout_correction/weight_mean", batch.global_masked_mean(weight))
        if options["rollout_correction_batch_normalize"]:
            if mode.startswith("sequence"):
                rows = (batch.mask.sum(dim=1, keepdim=True) > 0).float()
                total = batch.reduce_sum(torch.stack([(weight * rows).sum(), rows.sum()]))
            else:
                total = batch.reduce_sum(torch.stack([masked_sum(weight, batch.mask), batch.mask.sum()]))
            mean = total[0] / total[1].clamp(min=1.0)
            weight = weight / mean if mean > 0 else weight
            batch.log_metric("rollout_correction/normalizer", mean.item())
        return weight

    @hookimpl
    def po_token_mask(self, batch):
        criteria = parse_rejection(batch.options["rollout_rejection"], batch.options["rollout_rejection_bounds"])
        if not criteria or batch.sampling_logps is None:
            return None
        keep = rejection_keep(sampler_log_weight(batch), batch.mask, criteria)
        batch.log_metric("rollout_correction/rejected_fraction", batch.global_masked_mean(1.0 - keep))
        return keep.expand_as(batch.mask)
