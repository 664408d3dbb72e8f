"""KL regularisation toward the reference policy with a chosen estimator (Schulman 2020).

Per token, with log rho = log pi_ref - log pi_theta on tokens sampled from pi_theta:
  k1 = -log rho (unbiased, high variance, can be negative), k2 = (log rho)^2 / 2 (biased, low variance),
  k3 = (rho - 1) - log rho (unbiased, low variance, >= 0), abs = |log rho|;
  k1+ and k3+ are straight-through: the value of k1 or k3, the gradient of k2 (the reverse KL's, on samples of pi).
Two placements (methods.md rule 5):
- ``kl`` (in the loss, GRPO): beta * k added to the per-token loss, with gradient through k; with importance
  correction (DeepSeek-V3.2) times pi_theta/pi_old (for k1+ and k3+ the gradient is w * grad k2 with the weight w
  held fixed, so off-policy samples still follow grad KL(pi_theta || pi_ref)). Expected gradients (README): k2,
  corrected k1 and k3, and k1+ and k3+ follow grad KL(pi_theta || pi_ref), k3 alone the forward grad KL(pi_ref ||
  pi_theta), k1 alone zero; abs follows no divergence.
- ``kl-reward`` (in the reward, PPO/RLOO/REINFORCE++ style): a per-token reward -beta * k_t of the sampling policy,
  without gradient, that enters the return of every token up to it: A_t <- A_t - beta sum_{s >= t} k_s. With k1
  its policy gradient is that of E[R] - beta KL(pi_theta || pi_ref).
Both take beta fixed, or adaptive (Ziegler et al. 2019) toward a target KL: after each optimizer step, beta <-
beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), KL the step's mean estimate per token and n its
sequences, over every process.
"""

import torch

from po_registry import hookimpl
from po_registry.batches import StepTotals
from po_registry.ops import kl_estimate, masked_sum, returns_to_go, straight_through

LOSS_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+")
REWARD_ESTIMATORS = ("k1", "k2", "k3", "abs")
PROPORTIONAL_ERROR_BOUND = 0.2  # Ziegler et al. 2019


class KLCoefficient:
    """beta of one run: ``args.beta``, or with a target the adaptive controller above, starting from ``args.beta``
    (state kept in checkpoints)."""

    def __init__(self, target_option: str, horizon_option: str):
        self.target_option, self.horizon_option = target_option, horizon_option
        self.beta: float | None = None  # set at the first micro-batch
        self.adaptive = False
        self.step_kl = StepTotals()  # (estimate sum, tokens, sequences) of the current optimizer step

    def current(self, batch) -> float:
        if self.beta is None:
            self.beta, self.adaptive = batch.args.beta, batch.options[self.target_option] > 0
        return self.beta

    def observe(self, batch, kl: torch.Tensor) -> None:
        """Add this micro-batch's per-token estimates (B, T); at its optimizer step's end, move beta."""
        if not batch.training:
            return
        if self.adaptive:
            sequences = (batch.mask.sum(dim=1) > 0).sum()
            totals = self.step_kl.add(batch, masked_sum(kl, batch.mask), batch.mask.sum(), sequences)
            if totals is not None:
                total, tokens, sequences = totals
                error = total / max(tokens, 1.0) / batch.options[self.target_option] - 1.0
                error = min(max(error, -PROPORTIONAL_ERROR_BOUND), PROPORTIONAL_ERROR_BOUND)
                self.beta *= 1.0 + error * sequences / batch.options[self.horizon_option]
        if batch.ends_optimizer_step:
            batch.log_metric(f"{self.target_option.removesuffix('_target')}/beta", self.beta)

    def state_dict(self) -> dict | None:
        return {"beta": self.beta} if self.adaptive else None

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.adaptive = state["beta"], True


def _declare_controller(register, prefix: str) -> None:
    register(f"{prefix}_target", 0.0, type=float, check=lambda v: v >= 0,
             help="target KL per token for the adaptive beta; 0 keeps beta fixed")
    register(f"{prefix}_horizon", 10000.0, type=float, check=lambda v: v > 0,
             help="the adaptive beta's horizon in sequences (larger: slower)")


def _needs_beta(method: str, args) -> None:
    if args.beta <= 0:
        raise ValueError(f"the {method} method needs beta > 0 (the KL coefficient, or the adaptive one's start; "
                         f"it also makes the trainer compute reference log-probs), got beta={args.beta}")


class _KeepsBeta:
    """The adaptive beta's checkpoint state (a component with a ``coefficient``)."""

    coefficient: KLCoefficient

    @hookimpl
    def po_state_dict(self):
        return self.coefficient.state_dict()

    @hookimpl
    def po_load_state_dict(self, state):
        self.coefficient.load_state_dict(state)


def _divergence(options):
    from po_registry.oracle import in_loss_divergence

    return in_loss_divergence(options["kl_estimator"], options["kl_importance_correction"])


class KLPenalty(_KeepsBeta):
    def __init__(self):
        self.coefficient = KLCoefficient("kl_target", "kl_horizon")

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Term

        def objective(args, options):
            if options["kl_estimator"] == "abs":
                return Objective(not_applicable="the abs estimator's gradient, sign(log pi/pi_ref) grad log pi, "
                                                "is no divergence's gradient")
            return Objective(kl_reference=args.beta, terms=(Term(_divergence(options), args.beta),))

        register(
            "kl",
            components=["kl"],
            replaces=["reference-kl"],
            summary="KL to the reference in the loss, estimator k1, k2, k3, abs or straight-through k1+/k3+, "
                    "optionally importance-corrected; beta fixed or adaptive to a target KL",
            targets="drift from the reference policy; the estimator trades bias for variance",
            paper="http://joschu.net/blog/kl-approx.html; arXiv 2512.02556 (importance-corrected); arXiv "
                  "1909.08593 (adaptive beta)",
            objective=objective,
            fixes=("kl-blowup", "entropy-explosion"),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("kl_estimator", "k3", choices=LOSS_ESTIMATORS, help="which per-token KL estimator")
        register("kl_importance_correction", True, type=bool,
                 help="multiply by pi_theta/pi_old so off-policy samples give an unbiased estimate")
        _declare_controller(register, "kl")

    @hookimpl
    def po_check_config(self, args):
        _needs_beta("kl", args)

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        estimator = batch.options["kl_estimator"]
        kl = kl_estimate(batch.logps, batch.ref_logps, estimator.removesuffix("+"))
        weight = torch.exp(log_weights) if batch.options["kl_importance_correction"] else None
        if estimator.endswith("+"):  # the value of k1 or k3, the gradient of k2 (w held fixed)
            carrier = kl_estimate(batch.logps, batch.ref_logps, "k2")
            if weight is not None:
                kl, carrier = kl * weight, carrier * weight.detach()
            kl = straight_through(kl, carrier)
        elif weight is not None:
            kl = kl * weight
        batch.log_metric(f"kl/{estimator}", batch.global_masked_mean(kl.detach()))
        beta = self.coefficient.current(batch)
        self.coefficient.observe(batch, kl)
        return beta * kl


class KLReward(_KeepsBeta):
    def __init__(self):
        self.coefficient = KLCoefficient("kl_reward_target", "kl_reward_horizon")

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Dense, Objective

        def objective(args, options):
            if options["kl_reward_estimator"] == "abs":
                return Objective(not_applicable="a reward of -beta |log pi/pi_ref| is no divergence")
            return Objective(kl_reference=args.beta, dense=(
                Dense("reference", args.beta, gamma=1.0, estimator=options["kl_reward_estimator"]),))

        register(
            "kl-reward",
            components=["kl-reward"],
            replaces=["reference-kl"],
            summary="KL to the reference folded into the reward: -beta * k_t per token, in the return of every "
                    "earlier token; beta fixed or adaptive to a target KL",
            targets="drift from the reference, with the KL as a reward (no gradient through the estimate)",
            paper="PPO/RLOO/REINFORCE++ (arXiv 2501.03262); arXiv 1909.08593 (adaptive beta)",
            objective=objective,
            fixes=("kl-blowup", "entropy-explosion"),
        )

    @hookimpl
    def po_declare_options(self, register):
        register("kl_reward_estimator", "k1", choices=REWARD_ESTIMATORS, help="which per-token KL estimator")
        _declare_controller(register, "kl_reward")

    @hookimpl
    def po_check_config(self, args):
        _needs_beta("kl-reward", args)

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        # The reward -beta k_s is the sampling policy's (pi_old), fixed like any reward, and zero on environment
        # tokens; token t's advantage gains its return -beta sum_{s >= t} k_s, which rides on the importance weight:
        # -(A_t - beta G_t) w_t = -A_t w_t + beta sg[G_t] w_t. Adding it here, not as a dense token reward, keeps it
        # independent of the advantage owner (one advantage per sequence or per token).
        kl = kl_estimate(batch.old_logps, batch.ref_logps, batch.options["kl_reward_estimator"]) * batch.mask
        batch.log_metric(f"kl_reward/{batch.options['kl_reward_estimator']}", batch.global_masked_mean(kl))
        kl_return = returns_to_go(kl.detach(), 1.0, batch.mask)
        beta = self.coefficient.current(batch)
        self.coefficient.observe(batch, kl)
        return beta * kl_return * torch.exp(log_weights) * batch.mask
