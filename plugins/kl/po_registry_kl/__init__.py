"""KL regularisation toward the reference policy with a chosen estimator (Schulman 2020).

Per token, with log rho = log pi_ref - log pi_theta on tokens sampled from pi_theta:
  k1 = -log rho (unbiased, high variance, can be negative), k2 = (log rho)^2 / 2 (biased, low variance),
  k3 = (rho - 1) - log rho (unbiased, low variance, >= 0).
Two placements (methods.md rule 5):
- ``kl`` (in the loss, GRPO): beta * k added to the per-token loss, with gradient through k; with importance
  correction (DeepSeek-V3.2) times pi_theta/pi_old. Expected gradients (README): k2 and corrected k3 follow
  grad KL(pi_theta || pi_ref), k3 alone the forward grad KL(pi_ref || pi_theta), k1 alone zero.
- ``kl-reward`` (in the reward, PPO/RLOO/REINFORCE++ style): a per-token reward -beta * k_t of the sampling policy,
  without gradient, that enters the return of every token up to it: A_t <- A_t - beta sum_{s >= t} k_s. With k1
  its policy gradient is that of E[R] - beta KL(pi_theta || pi_ref).
"""

import torch

from po_registry import hookimpl
from po_registry.ops import kl_estimate, returns_to_go


class KLPenalty:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Term, in_loss_divergence

        register(
            "kl",
            components=["kl"],
            replaces=["reference-kl"],
            summary="KL to the reference in the loss, estimator k1, k2 or k3, optionally importance-corrected",
            targets="drift from the reference policy; the estimator trades bias for variance",
            paper="http://joschu.net/blog/kl-approx.html; arXiv 2512.02556 (importance-corrected)",
            objective=lambda args, options: Objective(kl_reference=args.beta, terms=(Term(in_loss_divergence(
                options["kl_estimator"], options["kl_importance_correction"]), args.beta),)),
            fixes=("kl-blowup", "entropy-explosion"),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("kl_estimator", "k3", choices=("k1", "k2", "k3"), help="which per-token KL estimator")
        register("kl_importance_correction", True, type=bool,
                 help="multiply by pi_theta/pi_old so off-policy samples give an unbiased estimate")

    @hookimpl
    def po_check_config(self, args):
        if args.beta <= 0:
            raise ValueError(f"the kl method needs beta > 0 (the KL coefficient; it also makes the trainer "
                             f"compute reference log-probs), got beta={args.beta}")

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        kl = kl_estimate(batch.logps, batch.ref_logps, batch.options["kl_estimator"])
        if batch.options["kl_importance_correction"]:
            kl = kl * torch.exp(log_weights)
        batch.log_metric(f"kl/{batch.options['kl_estimator']}", batch.global_masked_mean(kl.detach()))
        return batch.args.beta * kl


class KLReward:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Dense, Objective

        register(
            "kl-reward",
            components=["kl-reward"],
            replaces=["reference-kl"],
            summary="KL to the reference folded into the reward: -beta * k_t per token, in the return of every "
                    "earlier token",
            targets="drift from the reference, with the KL as a reward (no gradient through the estimate)",
            paper="PPO/RLOO/REINFORCE++ (arXiv 2501.03262)",
            objective=lambda args, options: Objective(kl_reference=args.beta, dense=(
                Dense("reference", args.beta, gamma=1.0, estimator=options["kl_reward_estimator"]),)),
            fixes=("kl-blowup", "entropy-explosion"),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("kl_reward_estimator", "k1", choices=("k1", "k2", "k3"), help="which per-token KL estimator")

    @hookimpl
    def po_check_config(self, args):
        if args.beta <= 0:
            raise ValueError(f"the kl-reward method needs beta > 0 (the KL coefficient; it also makes the trainer "
                             f"compute reference log-probs), got beta={args.beta}")

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        # The reward -beta k_s is the sampling policy's (pi_old), fixed like any reward, and zero on environment
        # tokens; token t's advantage gains its return -beta sum_{s >= t} k_s, which rides on the importance weight:
        # -(A_t - beta G_t) w_t = -A_t w_t + beta sg[G_t] w_t. Adding it here, not as a dense token reward, keeps it
        # independent of the advantage owner (one advantage per sequence or per token).
        kl = kl_estimate(batch.old_logps, batch.ref_logps, batch.options["kl_reward_estimator"]) * batch.mask
        batch.log_metric(f"kl_reward/{batch.options['kl_reward_estimator']}", batch.global_masked_mean(kl))
        kl_return = returns_to_go(kl.detach(), 1.0, batch.mask)
        return batch.args.beta * kl_return * torch.exp(log_weights) * batch.mask
