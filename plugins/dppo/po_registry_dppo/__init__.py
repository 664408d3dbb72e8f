"""DPPO: divergence proximal policy optimisation (Rethinking the Trust Region in LLM RL, arXiv 2602.04879).

PPO's ratio clip bounds pi/pi_old, which barely moves a low-probability token (0.001 -> 0.0012 is a ratio of 1.2)
and lets a high-probability one shift a lot of mass. DPPO bounds the shift of the distribution instead, with a
cheap binary approximation: the sampled token against everything else, p = pi_theta(o_t), q = pi_old(o_t):
  Binary-TV: D = p - q;  Binary-KL: D = KL(Bern(q) || Bern(p)) = q log(q/p) + (1-q) log((1-q)/(1-p)).
A token keeps its gradient unless the update already moved it out of the trust region in the advantage's direction:
  A > 0: kept if p - q <= delta_high (TV), or KL <= delta_high or p <= q (KL);
  A <= 0: kept if p - q >= -delta_low (TV), or KL <= delta_low or p >= q (KL).
l_t = -A * sg[min(r_t, C)] * log pi_theta(o_t) * kept_t (r = p/q; C caps the weight). On-policy (p = q) every token is
kept and the weight is 1: the policy gradient. The loss aggregation is the configuration's (loss_type).
"""

import torch

from po_registry import hookimpl

PAPER = "arXiv 2602.04879"
EPS = 1e-8  # keeps log(1 - p) finite at p = 1
LOG_RATIO_BOUND = 20.0


def binary_kl(old_logps: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
    """KL(Bern(q) || Bern(p)) per token, q = exp(old_logps), p = exp(logps)."""
    q, p = old_logps.exp(), logps.exp()
    return q * (old_logps - logps) + (1 - q) * (torch.log(1 - q + EPS) - torch.log(1 - p + EPS))


def trust_region(variant: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                 low: float, high: float) -> torch.Tensor:
    """(B, T) bool: the tokens DPPO keeps (the bound in the advantage's direction not yet crossed)."""
    p, q = logps.exp(), old_logps.exp()
    if variant == "tv":
        up, down = p - q <= high, p - q >= -low
    else:
        divergence = binary_kl(old_logps, logps)
        up, down = (divergence <= high) | (p <= q), (divergence <= low) | (p >= q)
    return torch.where(advantages > 0, up, down)


class DPPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        for variant, name, default, measure in (("tv", "dppo-tv", 0.15, "total variation p - q"),
                                                ("kl", "dppo-kl", 0.05, "binary KL")):
            register(name, components=["dppo"], paper=PAPER,
                     options={"dppo_divergence": variant, "dppo_delta_low": default, "dppo_delta_high": default},
                     summary=f"DPPO ({measure}): a trust region on the sampled token's probability shift instead "
                             "of a ratio clip",
                     targets="the ratio clip over-restricts rare tokens and under-restricts likely ones; the "
                             "trust region it claims is not the one it enforces",
                     objective=Objective(),  # on-policy every token is kept with weight 1: the policy gradient
                     fixes=("clip-saturation", "ratio-outliers", "sampler-mismatch"))

    @hookimpl
    def po_declare_options(self, register):
        register("dppo_divergence", "tv", choices=("tv", "kl"), help="the binary divergence of the trust region")
        register("dppo_delta_low", 0.15, type=float, check=lambda v: v > 0,
                 help="trust-region bound for tokens with A <= 0, > 0")
        register("dppo_delta_high", 0.15, type=float, check=lambda v: v > 0,
                 help="trust-region bound for tokens with A > 0, > 0")
        register("dppo_ratio_cap", 20.0, type=float, check=lambda v: v >= 1,
                 help="cap C of the importance weight min(r, C), >= 1")

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        options = batch.options
        with torch.no_grad():
            log_ratio = log_weights.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
            weight = log_ratio.exp().clamp(max=options["dppo_ratio_cap"])
            kept = trust_region(options["dppo_divergence"], batch.logps, batch.old_logps, batch.advantages,
                                options["dppo_delta_low"], options["dppo_delta_high"]).float()
        batch.log_metric("dppo/masked_fraction", batch.global_masked_mean(1.0 - kept))
        batch.log_metric("dppo/capped_fraction", batch.global_masked_mean((log_ratio.exp() > weight).float()))
        return -batch.advantages * weight * batch.logps * kept
