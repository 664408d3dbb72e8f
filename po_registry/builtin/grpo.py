"""The built-in GRPO baseline, one component per stage, each honouring the GRPOConfig flags of its stage.

Assembled together (method ``grpo``) they reproduce TRL 1.16's ``GRPOTrainer`` exactly for the same flags;
a method plugin replaces the components whose stages it changes.
"""

from __future__ import annotations

import math

import torch

from ..batches import StepTotals
from ..hookspecs import hookimpl
from ..ops import aggregate, clip_regions, clipped_surrogate, group_mean, group_std, high_entropy_mask, kl_estimate
from ..ops import masked_mean, masked_sum, nanstd
from ..ops import sequence_log_ratio

STD_EPS = 1e-4  # TRL's divisor guard: A = (R - mean) / (std + 1e-4)


def _epsilon_high(args) -> float:
    return args.epsilon_high if args.epsilon_high is not None else args.epsilon


class GroupAdvantage:
    """Group-relative advantages: A_i = (R_i - mean_G(R)) / (std(R) + 1e-4), by ``scale_rewards`` and
    ``multi_objective_aggregation``; dense token rewards, when a plugin supplies them, are added per token."""

    po_reads = ("token_rewards",)

    @hookimpl
    def po_check_config(self, args):
        if args.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {args.scale_rewards!r}")
        if args.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', "
                f"got {args.multi_objective_aggregation!r}"
            )

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        G, args = batch.group_size, batch.args
        if args.multi_objective_aggregation == "sum_then_normalize":
            total = batch.weighted_reward(rewards)
            advantages = total - group_mean(total, G)
            if args.scale_rewards == "group":
                advantages = advantages / (group_std(total, G) + STD_EPS)
            elif args.scale_rewards == "batch":
                std = nanstd(total) if total.numel() > 1 else torch.zeros_like(total)
                advantages = advantages / (std + STD_EPS)
        else:  # normalize_then_sum (GDPO): z-score each reward within its group, sum, z-score over the batch
            grouped = rewards.view(-1, G, rewards.shape[1])
            std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(grouped[:, :1])
            normalised = ((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (std_k + STD_EPS)).view_as(rewards)
            total = batch.weighted_reward(normalised)
            std = nanstd(total) if total.numel() > 1 else torch.zeros_like(total)
            advantages = (total - torch.nanmean(total)) / (std + STD_EPS)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        if batch.token_rewards is not None:
            advantages = (advantages.unsqueeze(1) + batch.token_rewards) * batch.completion_mask
        return advantages


class PolicyRatio:
    """Importance weight pi_theta / pi_old per token, or per sequence (GSPO), by ``importance_sampling_level``."""

    @hookimpl
    def po_check_config(self, args):
        if args.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                f"importance_sampling_level must be 'token' or 'sequence', got {args.importance_sampling_level!r}"
            )

    @hookimpl
    def po_log_importance_weights(self, batch):
        log_ratio = batch.logps - batch.old_logps
        if batch.args.importance_sampling_level == "sequence":
            return sequence_log_ratio(log_ratio, batch.mask)
        return log_ratio


CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
OBJECTIVE_METHODS = ("cispo", "sapo", "vespo")  # TRL loss types whose objective is a method plugin of that name


class ClipObjective:
    """PPO clipped surrogate with clip-higher (``epsilon``, ``epsilon_high``) and the two-sided ``delta``."""

    @hookimpl
    def po_check_config(self, args):
        if args.loss_type not in CLIP_LOSS_TYPES:
            hint = (f"TRL's {args.loss_type} objective is the method {args.loss_type!r} (--method {args.loss_type})"
                    if args.loss_type in OBJECTIVE_METHODS else "select a method plugin that provides it instead")
            raise ValueError(
                f"loss_type={args.loss_type!r} is not a clipped-surrogate loss; the baseline supports "
                f"{', '.join(CLIP_LOSS_TYPES)}; {hint}"
            )

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        args, A = batch.args, batch.advantages
        ratio = torch.exp(log_weights)
        loss = clipped_surrogate(ratio, A, args.epsilon, _epsilon_high(args), args.delta)
        low, high = clip_regions(ratio, A, args.epsilon, _epsilon_high(args))
        batch.log_metric("clip_ratio/low_mean", batch.global_masked_mean(low.float()))
        batch.log_metric("clip_ratio/high_mean", batch.global_masked_mean(high.float()))
        batch.log_metric("clip_ratio/region_mean", batch.global_masked_mean((low | high).float()))
        return loss


class EntropyMask:
    """80/20 rule: keep the policy loss only on tokens whose entropy is in the top ``top_entropy_quantile``,
    the quantile taken over loss tokens of all processes."""

    @hookimpl
    def po_check_config(self, args):
        if not 0.0 <= args.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {args.top_entropy_quantile}")

    @hookimpl
    def po_token_mask(self, batch):
        quantile = batch.args.top_entropy_quantile
        if quantile >= 1.0:
            return None
        return high_entropy_mask(batch.entropies, batch.mask, quantile, batch.gather_ragged)


class OffPolicyMask:
    """DeepSeek-V3.2 off-policy sequence masking: drop a sequence with A < 0 whose mean sampler-vs-policy
    log-ratio exceeds ``off_policy_mask_threshold``."""

    @hookimpl
    def po_token_mask(self, batch):
        threshold = batch.args.off_policy_mask_threshold
        if threshold is None:
            return None
        behaviour = batch.sampling_logps if batch.sampling_logps is not None else batch.old_logps
        log_gap = torch.nan_to_num(behaviour - batch.logps.detach(), nan=0.0)
        keep = (batch.advantages >= 0) | (masked_mean(log_gap, batch.mask, dim=1).unsqueeze(1) <= threshold)
        return keep.to(batch.mask.dtype)


class SamplerCorrection:
    """TRL's own rollout correction for vLLM (``vllm_importance_sampling_*``), computed during generation."""

    @hookimpl
    def po_rollout_correction(self, batch):
        args = batch.args
        if args.use_vllm and args.vllm_importance_sampling_correction:
            return batch.importance_sampling_ratio
        return None


class ReferenceKL:
    """beta * k3 KL to the reference per token; times the importance weight with ``use_bias_correction_kl``.

    Kept as TRL computes it (parity). Its gradient, in the loss on samples of pi_old: with the correction (TRL's
    default), grad (k3 pi_theta/pi_old) averages to grad KL(pi_theta || pi_ref), the reverse KL; without it (on-policy),
    grad k3 = (1 - pi_ref/pi_theta) grad log pi_theta averages to grad KL(pi_ref || pi_theta), the forward KL."""

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        beta = batch.args.beta
        if beta == 0.0:
            return None
        kl = kl_estimate(batch.logps, batch.ref_logps, "k3")
        if batch.args.use_bias_correction_kl:
            kl = kl * torch.exp(log_weights)
        batch.log_metric("kl", batch.global_masked_mean(kl))
        return beta * kl


# Options of entropy masks (plugins) whose kept tokens the entropy bonus acts on, as TRL's bonus acts on the tokens
# its top_entropy_quantile keeps: option name -> the fraction of loss tokens kept.
ENTROPY_MASK_OPTIONS = ("entropy_top_quantile",)  # plugins/entropy: high-entropy-tokens


class EntropyBonus:
    """Entropy bonus: loss -= c * mean entropy over the tokens the entropy masks keep (TRL 1.16: the loss mask times
    the ``top_entropy_quantile`` mask; a high-entropy-tokens plugin's mask counts the same way). The mean is over the
    micro-batch's kept tokens on every process (TRL averages per process: the same on one process; on several, ours
    does not depend on how tokens fall between them).

    c is ``entropy_coef``, or with ``use_adaptive_entropy`` (Skywork-OR1) a controller: after each optimizer step,
    whose entropy H is the token mean over all its micro-batches and processes, c += ``entropy_coef_delta`` if H <=
    ``entropy_target`` else c -= delta, within [``entropy_coef_min``, ``entropy_coef_max``]; a step applies the bonus
    only if the previous step's H was at most the target (none before the first measurement). The controller's
    state is kept in checkpoints."""

    def __init__(self):
        self.coef = 0.0  # the adaptive coefficient (from entropy_coef at setup)
        self.last_entropy = math.inf  # H of the last optimizer step
        self.step_entropy = StepTotals()  # (entropy sum, token count) of the current optimizer step
        self.adaptive = False

    @hookimpl
    def po_check_config(self, args):
        if args.use_adaptive_entropy:
            if not 0.0 <= args.entropy_coef_min <= args.entropy_coef_max:
                raise ValueError("use_adaptive_entropy needs 0 <= entropy_coef_min <= entropy_coef_max, got "
                                 f"{args.entropy_coef_min} and {args.entropy_coef_max}")
            if args.entropy_coef_delta < 0:
                raise ValueError(f"entropy_coef_delta must be >= 0, got {args.entropy_coef_delta}")

    @hookimpl
    def po_setup(self, context):
        self.adaptive, self.coef = context.args.use_adaptive_entropy, context.args.entropy_coef

    @hookimpl
    def po_state_dict(self):
        return {"entropy_coef": self.coef, "last_entropy": self.last_entropy} if self.adaptive else None

    @hookimpl
    def po_load_state_dict(self, state):
        self.coef, self.last_entropy = state["entropy_coef"], state["last_entropy"]

    @hookimpl
    def po_loss_penalty(self, batch):
        args = batch.args
        if not args.use_adaptive_entropy and args.entropy_coef == 0.0:
            return None
        fractions = [args.top_entropy_quantile, *(batch.options[name] for name in ENTROPY_MASK_OPTIONS
                                                  if name in batch.options)]
        acting = batch.mask
        for fraction in fractions:
            if fraction < 1.0:
                acting = acting * high_entropy_mask(batch.entropies, batch.mask, fraction, batch.gather_ragged)
        if not args.use_adaptive_entropy:
            coef = args.entropy_coef
        else:
            coef = self.coef if self.last_entropy <= args.entropy_target else 0.0  # decided at the last step's end
            if batch.training:
                self._measure(batch, acting)
        if batch.training and batch.ends_optimizer_step:
            batch.log_metric("entropy_coef", self.coef if args.use_adaptive_entropy else coef)
        return -coef * batch.token_mean(batch.entropies, acting)

    def _measure(self, batch, acting):
        """Add this micro-batch to the step's entropy; at the step's end, move the coefficient for the next step."""
        totals = self.step_entropy.add(batch, masked_sum(batch.entropies, acting), acting.sum())
        if totals is None:
            return
        self.last_entropy = totals[0] / max(totals[1], 1.0)
        args = batch.args
        if self.last_entropy <= args.entropy_target:
            self.coef = min(self.coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.coef = max(self.coef - args.entropy_coef_delta, args.entropy_coef_min)


AGGREGATION_BY_LOSS_TYPE = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "global-token-mean",
    "cispo": "global-token-mean",
    "vespo": "global-token-mean",
    "luspo": "seq-sum",
}


class LossAggregation:
    """Reduce the per-token loss as ``loss_type`` says (see :func:`po_registry.ops.aggregate`)."""

    @hookimpl
    def po_check_config(self, args):
        if args.loss_type not in AGGREGATION_BY_LOSS_TYPE:
            raise ValueError(f"unknown loss_type {args.loss_type!r}; expected one of {sorted(AGGREGATION_BY_LOSS_TYPE)}")

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(
            per_token_loss,
            batch.mask,
            AGGREGATION_BY_LOSS_TYPE[batch.args.loss_type],
            max_completion_length=batch.max_completion_length,
            tokens_per_micro_batch=batch.tokens_per_micro_batch,
        )


COMPONENTS = {
    "group-advantage": GroupAdvantage,
    "policy-ratio": PolicyRatio,
    "clip-objective": ClipObjective,
    "entropy-mask": EntropyMask,
    "off-policy-mask": OffPolicyMask,
    "sampler-correction": SamplerCorrection,
    "reference-kl": ReferenceKL,
    "entropy-bonus": EntropyBonus,
    "loss-aggregation": LossAggregation,
}


class BaselineMethod:
    """Registers the ``grpo`` method (every baseline component), the embedded tasks, and the failure vocabulary and
    detectors of :mod:`po_registry.diagnostics`."""

    @hookimpl
    def po_register_tasks(self, register):
        from ..tasks import BUILTIN_TASKS

        for task in BUILTIN_TASKS:
            register(task)

    @hookimpl
    def po_register_failures(self, register):
        from ..diagnostics import FAILURES

        for failure in FAILURES:
            register(failure.name, failure.side, failure.summary)

    @hookimpl
    def po_register_detectors(self, register):
        from ..diagnostics import DETECTORS

        for detector in DETECTORS:
            register(detector)

    @hookimpl
    def po_register_methods(self, register):
        from ..objectives import Objective

        register(
            "grpo",
            components=list(COMPONENTS),
            summary="TRL GRPOTrainer baseline: follows GRPOConfig's loss_type, scale_rewards, epsilon, beta, ...",
            targets="policy-sized critic (group-relative baseline instead)",
            paper="arXiv 2402.03300",
            objective=Objective(),  # what each component does under the GRPOConfig: oracle.baseline_objective
        )
