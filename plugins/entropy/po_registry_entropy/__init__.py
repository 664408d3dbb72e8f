"""Token-level methods against entropy collapse.

- ``high-entropy-tokens`` (Wang et al. 2025, arXiv 2506.01939, the "80/20 rule"): the policy gradient only on
  tokens whose entropy is in the top rho quantile (the "forking" tokens), quantile over all processes.
- ``clip-cov`` and ``kl-cov`` (Cui et al. 2025, arXiv 2505.22617): entropy change follows
  -Cov(log pi(a|s), A(s, a)); with Cov_t = (log pi_t - mean(log pi)) (A_t - mean(A)) over the loss tokens,
  each owns the policy objective, as in the paper's code: Clip-Cov is the PPO clipped surrogate with the gradient
  removed from a random fraction of the tokens with lower < Cov_t < upper, drawn from the tokens the clip leaves a
  gradient (a clipped token is not spent twice); KL-Cov is the unclipped -r A on every token plus
  coef * |log pi_theta - log pi_old| on the top-k fraction of all loss tokens by covariance (the KL replaces the clip).
  Both take the means, the token budget and the selection over the micro-batch of every process together, so on P
  processes they pick the tokens one process would pick from the same samples (not P times as many).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import clip_regions, clipped_surrogate, high_entropy_mask, masked_sum

COV_PAPER = "arXiv 2505.22617"
COV_TARGET = "entropy collapse: high-covariance tokens (confident and rewarded) drive entropy down"


def token_covariance(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     reduce_sum=lambda t: t) -> torch.Tensor:
    """Cov_t = (log pi_t - mean(log pi)) * (A_t - mean(A)), means over the loss tokens (of every process, with
    ``reduce_sum`` summing over processes); 0 outside the mask."""
    advantages = advantages.expand_as(logps)
    logps = logps.detach()
    sums = reduce_sum(torch.stack([masked_sum(logps, mask), masked_sum(advantages, mask), mask.sum()]).float())
    count = sums[2].clamp(min=1.0)
    return (logps - sums[0] / count) * (advantages - sums[1] / count) * mask


class AllLossTokens:
    """The loss tokens of the micro-batch on every process, as one vector in process order (row-major within a
    process): one process's selection over it is every process's, and each keeps its own share."""

    def __init__(self, batch):
        self.batch = batch
        self.here = batch.mask.bool()
        self.local = int(self.here.sum())
        counts = batch.gather(self.here.sum().reshape(1))  # (P,) loss tokens per process
        self.start, self.total = int(counts[: batch.process_index].sum()), int(counts.sum())

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """(total,) the values of ``x`` (B, T) on the loss tokens of every process."""
        return self.batch.gather_ragged(x[self.here].float())

    def local_mask(self, chosen: torch.Tensor) -> torch.Tensor:
        """(B, T) 1 on this process's tokens among ``chosen`` (indices into :meth:`values`), 0 elsewhere."""
        mine = chosen[(chosen >= self.start) & (chosen < self.start + self.local)] - self.start
        flat = torch.zeros(self.local, dtype=self.batch.mask.dtype, device=self.batch.mask.device)
        flat[mine.to(flat.device)] = 1.0
        selected = torch.zeros_like(self.batch.mask)
        selected[self.here] = flat
        return selected


class HighEntropyTokens:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, top_entropy_tokens

        register("high-entropy-tokens", components=["high-entropy-tokens"],
                 summary="80/20 rule: policy gradient only on the top-entropy (forking) tokens",
                 targets="low-entropy tokens dominate the update and reinforce collapse", paper="arXiv 2506.01939",
                 objective=lambda args, options: Objective(
                     token_weights=(top_entropy_tokens(options["entropy_top_quantile"]),)),
                 fixes=("entropy-collapse",))

    @hookimpl
    def po_declare_options(self, register):
        register("entropy_top_quantile", 0.2, type=float, check=lambda v: 0 < v <= 1,
                 help="fraction of tokens kept, highest entropy first, in (0, 1]")

    @hookimpl
    def po_token_mask(self, batch):
        keep = high_entropy_mask(batch.entropies, batch.mask, batch.options["entropy_top_quantile"],
                                 batch.gather_ragged)
        batch.log_metric("entropy/kept_fraction", batch.global_masked_mean(keep.float()))
        return keep


# Loss types that name an objective of their own, which the covariance methods would silently replace.
OTHER_OBJECTIVES = ("cispo", "sapo", "vespo")


def _check_objective_flags(method: str, args, clipped: bool) -> None:
    if args.loss_type in OTHER_OBJECTIVES:
        raise ValueError(f"{method} owns the policy objective ({'the PPO clip' if clipped else 'an unclipped ratio'}"
                         f" with its covariance rule); loss_type={args.loss_type!r} names another objective: use "
                         "grpo, bnpo, dr_grpo, dapo or luspo (they only choose the aggregation)")
    if args.delta is not None:
        raise ValueError(f"{method} does not apply delta (the two-sided clip); leave delta=None")


class ClipCov:
    """The PPO clipped surrogate with the gradient of a few high-covariance tokens removed (Clip-Cov)."""

    po_explain = {"po_policy_objective": "PPO clip (epsilon, epsilon_high) x 0 on a random clip_cov_fraction of "
                                         "the tokens the clip leaves free with lower < Cov_t < upper"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("clip-cov", components=["clip-cov"], paper=COV_PAPER, targets=COV_TARGET,
                 summary="Clip-Cov: drop the gradient of a few random tokens with high covariance",
                 objective=Objective(unmodelled="the gradient of a random fraction of high-covariance tokens is "
                                                "removed"),
                 fixes=("entropy-collapse",))

    @hookimpl
    def po_declare_options(self, register):
        register("clip_cov_fraction", 2e-4, type=float, check=lambda v: 0 < v < 1,
                 help="fraction of loss tokens whose gradient is removed, in (0, 1)")
        register("clip_cov_lower", 1.0, type=float, help="covariance above which a token is eligible")
        register("clip_cov_upper", 5.0, type=float, help="covariance below which a token is eligible")

    @hookimpl
    def po_check_config(self, args):
        _check_objective_flags("clip-cov", args, clipped=True)

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        args, options, mask = batch.args, batch.options, batch.mask
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        ratio, advantages = torch.exp(log_weights), batch.advantages
        loss = clipped_surrogate(ratio, advantages, args.epsilon, epsilon_high)
        # A token whose clip binds has no gradient already: the paper draws only from the others.
        low, high = clip_regions(ratio, advantages, args.epsilon, epsilon_high)
        free = ~(low | high).expand_as(mask)
        cov = token_covariance(batch.logps, advantages, mask, batch.reduce_sum)
        eligible = (cov > options["clip_cov_lower"]) & (cov < options["clip_cov_upper"]) & free
        tokens = AllLossTokens(batch)
        candidates = tokens.values(eligible.float()).nonzero().squeeze(1)
        count = min(len(candidates), max(1, int(options["clip_cov_fraction"] * tokens.total)))
        # Seeded alike on every process, so all draw the same tokens from the same candidates.
        generator = torch.Generator().manual_seed(int(args.seed) * 7919 + batch.step)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)]
        batch.log_metric("clip_cov/clipped_fraction", count / max(1, tokens.total))
        return loss * (1.0 - tokens.local_mask(chosen))


class KLCov:
    """The unclipped ratio objective with a KL penalty on the top-k covariance tokens (KL-Cov)."""

    po_explain = {"po_policy_objective": "-r A on every token (no clip) + kl_cov_coef |log pi_theta - log pi_old| on "
                                         "the kl_cov_fraction of loss tokens with the highest Cov_t"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("kl-cov", components=["kl-cov"], paper=COV_PAPER, targets=COV_TARGET,
                 summary="KL-Cov: a KL penalty to the behaviour policy on the top-k covariance tokens",
                 objective=Objective(),  # at ratio 1: -r A is the policy gradient, |log r| has zero gradient
                 fixes=("entropy-collapse",))

    @hookimpl
    def po_declare_options(self, register):
        register("kl_cov_fraction", 2e-3, type=float, check=lambda v: 0 < v < 1,
                 help="fraction of loss tokens penalised, highest covariance first, in (0, 1)")
        register("kl_cov_coef", 1.0, type=float, check=lambda v: v >= 0, help="penalty coefficient, >= 0")

    @hookimpl
    def po_check_config(self, args):
        _check_objective_flags("kl-cov", args, clipped=False)

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        cov = token_covariance(batch.logps, batch.advantages, batch.mask, batch.reduce_sum)
        tokens = AllLossTokens(batch)
        ranked = tokens.values(cov)
        count = min(tokens.total, max(1, int(batch.options["kl_cov_fraction"] * tokens.total)))
        # Highest covariance first, ties in token order: the same choice however the tokens are split.
        top = torch.sort(ranked, descending=True, stable=True).indices[:count]
        batch.log_metric("kl_cov/penalised_fraction", count / max(1, tokens.total))
        kl = (batch.logps - batch.old_logps).abs()
        policy = -torch.exp(log_weights) * batch.advantages  # the KL on the selected tokens replaces the clip
        return policy + batch.options["kl_cov_coef"] * kl * tokens.local_mask(top)
