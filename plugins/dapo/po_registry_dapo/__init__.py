"""DAPO: decoupled clip and dynamic sampling policy optimization (Yu et al. 2025, arXiv 2503.14476).

Four components, each usable alone, and the method ``dapo`` that composes them:

- ``clip-higher`` (trajectory): clip(r, 1 - eps_low, 1 + eps_high) with eps_high > eps_low, and the token-level
  loss (1 / sum_i |o_i|) sum_i sum_t, normalised over the whole optimizer step.
- ``overlong-filter`` (trajectory, via sample selection): truncated completions leave the loss.
- ``overlong-reward`` (reward): soft overlong punishment R_len(y) = 0 if |y| <= L_max - L_cache,
  ((L_max - L_cache) - |y|) / L_cache if |y| <= L_max, -1 beyond.
- ``dynamic-sampling`` (both sides): drop groups whose rewards are all equal (no gradient) and generate groups of
  fresh prompts until the batch is full again, with a cap on rounds.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import aggregate, clip_regions, clipped_surrogate, group_std

PAPER = "arXiv 2503.14476"


class ClipHigher:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("clip-higher", components=["clip-higher"], paper=PAPER,
                 summary="DAPO's clip-higher (0.2 / 0.28) with the token-level loss",
                 targets="entropy collapse: a symmetric upper clip keeps low-probability exploration tokens down",
                 objective=Objective(aggregation="tokens"),  # at ratio 1 no clip binds
                 fixes=("entropy-collapse",), risks=("entropy-explosion",))

    @hookimpl
    def po_declare_options(self, register):
        register("dapo_epsilon_low", 0.2, type=float, check=lambda v: 0 < v < 1, help="lower clip, in (0, 1)")
        register("dapo_epsilon_high", 0.28, type=float, check=lambda v: v > 0, help="upper clip, > 0")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        low, high = batch.options["dapo_epsilon_low"], batch.options["dapo_epsilon_high"]
        ratio, advantages = torch.exp(log_weights), batch.advantages
        clipped_low, clipped_high = clip_regions(ratio, advantages, low, high)
        batch.log_metric("dapo/clip_ratio_high", batch.global_masked_mean(clipped_high.float()))
        batch.log_metric("dapo/clip_ratio_low", batch.global_masked_mean(clipped_low.float()))
        return clipped_surrogate(ratio, advantages, low, high)

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return aggregate(per_token_loss, batch.mask, "global-token-mean",
                         tokens_per_micro_batch=batch.tokens_per_micro_batch)


class OverlongFilter:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("overlong-filter", components=["overlong-filter"], paper=PAPER,
                 summary="drop truncated completions from the loss",
                 targets="truncated samples punished as wrong inject reward noise",
                 objective=Objective(drop_truncated=True),
                 fixes=("truncation",))

    @hookimpl
    def po_select_samples(self, batch):
        return ~batch.truncated


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """R_len(|y|): 0 up to L_max - L_cache, then a linear ramp to -1 at L_max, -1 beyond."""
    start = max_length - cache
    ramp = (start - lengths.float()) / cache
    return torch.where(lengths <= start, torch.zeros_like(ramp), torch.where(lengths <= max_length, ramp, -1.0))


class OverlongReward:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Rule

        register("overlong-reward", components=["overlong-reward"], paper=PAPER,
                 summary="DAPO's soft overlong punishment added to the reward",
                 targets="over-long answers; a smooth penalty instead of a cliff at the length cap",
                 objective=Objective(shaping=(Rule("soft overlong penalty", lambda world, options: soft_overlong_penalty(
                     world.lengths, world.max_completion_length,
                     max(1, round(options["overlong_cache_fraction"] * world.max_completion_length)))),)),
                 fixes=("truncation", "length-drift"))

    @hookimpl
    def po_declare_options(self, register):
        register("overlong_cache_fraction", 0.2, type=float, check=lambda v: 0 < v < 1,
                 help="L_cache as a fraction of max_completion_length, in (0, 1)")

    @hookimpl
    def po_check_config(self, args):
        if args.reward_weights is not None and not any(args.reward_weights):
            raise ValueError("overlong-reward adds its penalty to the weighted reward, which all-zero reward_weights "
                             f"{list(args.reward_weights)} make 0 whatever the rewards; give a reward a weight")

    @hookimpl
    def po_shape_rewards(self, rewards, batch):
        cache = max(1, round(batch.options["overlong_cache_fraction"] * batch.max_completion_length))
        penalty = soft_overlong_penalty(batch.completion_lengths, batch.max_completion_length, cache)
        batch.log_metric("overlong/penalty_mean", penalty.mean().item())
        return add_to_weighted_reward(rewards, batch.reward_weights.to(rewards.device), penalty.to(rewards.dtype))


def add_to_weighted_reward(rewards: torch.Tensor, weights: torch.Tensor, bonus: torch.Tensor) -> torch.Tensor:
    """(N, K) rewards whose NaN-ignoring weighted sum sum_k w_k r_k is larger by ``bonus`` (N,) on every row, as if
    the bonus were one more reward function of weight 1 (TRL's soft overlong punishment is one). The bonus is spread
    over the scored columns in proportion to their weights (unscored ones stay NaN); a row no reward function scored
    gets it over all weighted columns, so that, as in TRL's nansum, its reward is the bonus alone."""
    weighted = (weights != 0).unsqueeze(0)
    carriers = ~torch.isnan(rewards) & weighted
    none = ~carriers.any(dim=1, keepdim=True)
    carriers = carriers | (none & weighted)
    share = carriers * weights.unsqueeze(0)
    share = share / (share * weights.unsqueeze(0)).sum(dim=1, keepdim=True)
    base = torch.where(none & weighted, rewards.nan_to_num(0.0), rewards)
    return torch.where(carriers, base + bonus.unsqueeze(1) * share, base)


class DynamicSampling:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("dynamic-sampling", components=["dynamic-sampling"], paper=PAPER,
                 summary="drop all-equal-reward groups and refill the batch with fresh prompts",
                 targets="groups with zero reward variance give no gradient (A = 0/0) and shrink the effective batch",
                 objective=Objective(drop_equal_groups=True),
                 fixes=("zero-variance-groups",), risks=("generation-cost",))

    @hookimpl
    def po_declare_options(self, register):
        register("dynamic_sampling_max_rounds", 4, type=int, check=lambda v: v >= 0,
                 help="extra generation rounds per batch, >= 0")

    @hookimpl
    def po_select_groups(self, rewards, batch):
        spread = group_std(batch.weighted_reward(rewards), batch.group_size)[:: batch.group_size]
        return spread > 0  # NaN (fewer than two scored completions) counts as no signal

    @hookimpl
    def po_refill_rounds(self, options):
        return options["dynamic_sampling_max_rounds"]


class DAPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("dapo", components=["clip-higher", "overlong-filter", "overlong-reward", "dynamic-sampling"],
                 paper=PAPER,
                 summary="DAPO: clip-higher, token-level loss, overlong filtering and shaping, dynamic sampling",
                 targets="clip-variance coupling: entropy collapse with vanishing group variance",
                 objective=Objective(),  # its four components' declarations
                 fixes=("entropy-collapse", "zero-variance-groups", "truncation", "length-drift"),
                 risks=("entropy-explosion", "generation-cost"))
