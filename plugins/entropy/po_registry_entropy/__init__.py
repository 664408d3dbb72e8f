"""Token-level methods against entropy collapse.

- ``high-entropy-tokens`` (Wang et al. 2025, arXiv 2506.01939, the "80/20 rule"): the policy gradient only on
  tokens whose entropy is in the top rho quantile (the "forking" tokens), quantile over all processes.
- ``clip-cov`` and ``kl-cov`` (Cui et al. 2025, arXiv 2505.22617): entropy change follows
  -Cov(log pi(a|s), A(s, a)); with Cov_t = (log pi_t - mean(log pi)) (A_t - mean(A)) over the loss tokens,
  Clip-Cov removes the gradient of a random fraction of tokens whose covariance lies in [lower, upper], and KL-Cov
  adds coef * |log pi_theta - log pi_old| on the top-k fraction of tokens by covariance.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import masked_mean

COV_PAPER = "arXiv 2505.22617"
COV_TARGET = "entropy collapse: high-covariance tokens (confident and rewarded) drive entropy down"


def token_covariance(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (log pi_t - mean(log pi)) * (A_t - mean(A)), means over loss tokens; 0 outside the mask."""
    advantages = advantages.expand_as(logps)
    centred_logps = logps.detach() - masked_mean(logps.detach(), mask)
    centred_advantages = advantages - masked_mean(advantages, mask)
    return centred_logps * centred_advantages * mask


class HighEntropyTokens:
    @hookimpl
    def po_register_methods(self, register):
        register("high-entropy-tokens", components=["high-entropy-tokens"], side="trajectory",
                 summary="80/20 rule: policy gradient only on the top-entropy (forking) tokens",
                 targets="low-entropy tokens dominate the update and reinforce collapse", paper="arXiv 2506.01939")

    @hookimpl
    def po_declare_options(self, register):
        register("entropy_top_quantile", 0.2, type=float, check=lambda v: 0 < v <= 1,
                 help="fraction of tokens kept, highest entropy first, in (0, 1]")

    @hookimpl
    def po_token_mask(self, batch):
        values = batch.gather_ragged(batch.entropies[batch.mask.bool()].float())
        if values.numel() == 0:
            return torch.zeros_like(batch.mask)
        threshold = torch.quantile(values, 1.0 - batch.options["entropy_top_quantile"])
        keep = (batch.entropies * batch.mask >= threshold) & batch.mask.bool()
        batch.log_metric("entropy/kept_fraction", batch.global_masked_mean(keep.float()))
        return keep.to(batch.mask.dtype)


class ClipCov:
    @hookimpl
    def po_register_methods(self, register):
        register("clip-cov", components=["clip-cov"], side="trajectory", paper=COV_PAPER, targets=COV_TARGET,
                 summary="Clip-Cov: drop the gradient of a few random tokens with high covariance")

    @hookimpl
    def po_declare_options(self, register):
        register("clip_cov_fraction", 2e-4, type=float, check=lambda v: 0 < v < 1,
                 help="fraction of loss tokens whose gradient is removed, in (0, 1)")
        register("clip_cov_lower", 1.0, type=float, help="lowest covariance eligible")
        register("clip_cov_upper", 5.0, type=float, help="highest covariance eligible")

    @hookimpl
    def po_token_mask(self, batch):
        options = batch.options
        cov = token_covariance(batch.logps, batch.advantages, batch.mask)
        eligible = ((cov >= options["clip_cov_lower"]) & (cov <= options["clip_cov_upper"]) & batch.mask.bool())
        candidates = eligible.flatten().nonzero().squeeze(1)
        count = min(len(candidates), max(1, int(options["clip_cov_fraction"] * batch.mask.sum().item())))
        generator = torch.Generator().manual_seed(int(batch.args.seed) * 7919 + batch.step)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)]
        keep = torch.ones_like(batch.mask).flatten()
        keep[chosen] = 0.0
        batch.log_metric("clip_cov/clipped_fraction", count / max(1.0, batch.mask.sum().item()))
        return keep.view_as(batch.mask)


class KLCov:
    @hookimpl
    def po_register_methods(self, register):
        register("kl-cov", components=["kl-cov"], side="trajectory", paper=COV_PAPER, targets=COV_TARGET,
                 summary="KL-Cov: a KL penalty to the behaviour policy on the top-k covariance tokens")

    @hookimpl
    def po_declare_options(self, register):
        register("kl_cov_fraction", 2e-3, type=float, check=lambda v: 0 < v < 1,
                 help="fraction of loss tokens penalised, highest covariance first, in (0, 1)")
        register("kl_cov_coef", 1.0, type=float, check=lambda v: v >= 0, help="penalty coefficient, >= 0")

    @hookimpl
    def po_token_penalty(self, batch):
        cov = token_covariance(batch.logps, batch.advantages, batch.mask)
        tokens = int(batch.mask.sum().item())
        count = min(tokens, max(1, int(batch.options["kl_cov_fraction"] * tokens)))
        selected = torch.zeros_like(batch.mask).flatten()
        if tokens:
            ranked = cov.masked_fill(~batch.mask.bool(), float("-inf")).flatten()
            selected[torch.topk(ranked, count).indices] = 1.0
        batch.log_metric("kl_cov/penalised_fraction", count / max(1, tokens))
        kl = (batch.logps - batch.old_logps).abs()
        return batch.options["kl_cov_coef"] * kl * selected.view_as(batch.mask)
