"""The declaration vocabulary of the gradient oracle: what a method's loss claims to follow, and its biases by design.

Methods declare an :class:`Objective` when they register (``register(..., objective=Objective(...))``);
:mod:`po_registry.oracle` evaluates it exactly on a policy small enough to enumerate. This module imports nothing of
the core, so the registry and the built-in plugins can use it at any layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# -- ---------------------------------------------------------------------------------

ADVANTAGES = ("none", "zero", "mean", "leave_one_out", "zscore", "greedy")
AGGREGATIONS = ("tokens", "sequences", "max_length", "length")
DIVERGENCES = ("reverse_kl", "forward_kl", "squared_log_ratio", "zero")
PENALTIES = ("entropy", "positive_nll")


@dataclass(frozen=True)
class Rule:
    """A named formula the oracle evaluates on the enumerated completions (see :class:`Objective` for each use)."""

    label: str
    function: Callable


@dataclass(frozen=True)
class Term:
    """A term of the loss besides the policy gradient, with its coefficient.

    In the loss, aggregated with the policy term and taken token by token at a fixed prefix: ``reverse_kl``
    KL(pi || q), ``forward_kl`` KL(q || pi), ``squared_log_ratio`` E_pi[(log pi/q)^2 / 2], ``zero`` (an estimator
    whose expected gradient is zero), against ``reference`` or ``teacher``. Loss penalties with their own token mean:
    ``entropy`` (a bonus: the mean entropy of the loss tokens, on the top ``quantile`` of entropies when set, as
    TRL's ``top_entropy_quantile``) and ``positive_nll`` (the mean NLL of the tokens of completions whose reward
    reaches ``threshold``)."""

    kind: str
    coef: float
    against: str = "reference"
    threshold: float | None = None
    quantile: float | None = None

    def __post_init__(self):
        if self.kind not in DIVERGENCES + PENALTIES:
            raise ValueError(f"Term kind {self.kind!r}: expected one of {', '.join(DIVERGENCES + PENALTIES)}")
        if self.against not in ("reference", "teacher"):
            raise ValueError(f"Term against {self.against!r}: expected 'reference' or 'teacher'")


@dataclass(frozen=True)
class Dense:
    """A per-token reward -coef * k(log pi_t, log q_t) (k1, k2 or k3 on the sampled token, no gradient) credited
    to the earlier tokens through a return-to-go discounted by ``gamma`` (0: each token only its own), the estimate
    clipped to [-clip, clip] when ``clip`` > 0. With k1, gamma = 1 and no clip its expected gradient is that of
    -coef KL(p_theta || q) over whole completions."""

    against: str
    coef: float
    gamma: float = 1.0
    estimator: str = "k1"
    clip: float = 0.0

    def __post_init__(self):
        if self.against not in ("reference", "teacher"):
            raise ValueError(f"Dense against {self.against!r}: expected 'reference' or 'teacher'")
        if self.estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"Dense estimator {self.estimator!r}: expected 'k1', 'k2' or 'k3'")


@dataclass(frozen=True)
class Objective:
    """What a method's loss claims to follow, and how: the declaration the oracle checks.

    A method's declaration adds to the baseline's (what its remaining ``grpo`` components do under the GRPOConfig,
    :func:`baseline_objective`) and to those of the methods it composes; ``None`` leaves a field to them.

    The claim, J(theta) = reward * E[R] - kl_reference KL(p_theta || p_ref) - kl_teacher KL(p_theta || p_teacher):
      ``reward`` weight of E[R] (0 for pure distillation); ``log_reward`` claims log E[R] instead (maximum
      likelihood); ``kl_reference``, ``kl_teacher`` sequence-level KL coefficients (added); ``shaping`` Rules
      ``f(world, options) -> (S,)`` added to R, held fixed (added).
    The estimator, each difference from the claim a bias by design:
      ``advantage`` ``none`` (R), ``zero``, ``mean`` (R - group mean), ``leave_one_out``, ``zscore`` ((R - mean) /
      (std + 1e-4)), ``greedy`` (R - R of the greedy completion, shaped alike) or a Rule ``f(rewards (M, G),
      lengths (M, G), options) -> (M, G)``; ``scale`` ``exact`` or
      ``free`` (a positive factor the batch sets: whitening, GPG's alpha); ``aggregation`` ``tokens`` (sum over
      the batch's loss tokens), ``sequences`` (mean over rows of token sums), ``max_length`` (sum / (B L_max)),
      ``length`` (mean over rows of token means: length normalisation); ``dense`` per-token rewards (added);
      ``group_dense`` Rules ``f(world, groups (M, G), options) -> (M, G, T)`` per-token credit that depends on the
      group (added); ``terms`` (added); ``token_weights`` Rules ``f(world, options) -> (S, T)`` multiplying the
      policy loss per token (masks, corrections; added); ``drop_truncated`` and ``drop_equal_groups`` rows or
      groups that leave the loss.
    Running it: ``needs`` maps the name of an auxiliary model the method's stages read (``batch.auxiliary[name]``)
    to the model the oracle provides for it, as a frozen :class:`~po_registry.context.AuxiliaryModel`:
    ``value_model`` (the exact value function E[R | prefix] as a token-value model) or ``teacher`` (the teacher's
    logit table as a causal LM); ``rewards="non_negative"``: the method is defined for rewards >= 0
    (checked with them, and it must refuse rewards of both signs with an error); ``setups`` the oracle set-ups the
    method runs on (None: the three single-turn ones; ``("turns",)`` for a method that needs multi-turn episodes,
    whose rows carry per-token turn fields); ``not_applicable`` says why the
    oracle cannot check the method; ``unmodelled`` names a bias the oracle reports without checking."""

    reward: float | None = None
    log_reward: bool | None = None
    kl_reference: float | None = None
    kl_teacher: float | None = None
    shaping: tuple[Rule, ...] = ()
    advantage: str | Rule | None = None
    scale: str | None = None
    aggregation: str | None = None
    dense: tuple[Dense, ...] = ()
    group_dense: tuple[Rule, ...] = ()
    terms: tuple[Term, ...] = ()
    token_weights: tuple[Rule, ...] = ()
    drop_truncated: bool | None = None
    drop_equal_groups: bool | None = None
    needs: Mapping[str, str] = field(default_factory=dict)
    rewards: str | None = None
    setups: tuple[str, ...] | None = None
    not_applicable: str = ""
    unmodelled: str = ""

    def __post_init__(self):
        if isinstance(self.advantage, str) and self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage {self.advantage!r}: expected one of {', '.join(ADVANTAGES)} or a Rule")
        if self.aggregation is not None and self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation {self.aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
        if self.scale not in (None, "exact", "free"):
            raise ValueError(f"scale {self.scale!r}: expected 'exact' or 'free'")
        if self.rewards not in (None, "any", "non_negative"):
            raise ValueError(f"rewards {self.rewards!r}: expected 'any' or 'non_negative'")
        if self.setups is not None and (isinstance(self.setups, str) or not set(self.setups) <= {
                "standard", "environment", "equal-rewards", "turns"}):
            raise ValueError(f"setups {self.setups!r}: expected a tuple of 'standard', 'environment', "
                             "'equal-rewards', 'turns'")
        unknown = set(self.needs.values()) - {"value_model", "teacher"}
        if unknown:
            raise ValueError(f"needs {sorted(unknown)}: the oracle provides 'value_model' and 'teacher'")

    def then(self, other: Objective) -> Objective:
        """This declaration with ``other`` on top: its set fields win, its additive fields add."""
        merged = {}
        for item in dataclasses.fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name in ("shaping", "dense", "group_dense", "terms", "token_weights"):
                merged[item.name] = mine + theirs
            elif item.name in ("kl_reference", "kl_teacher"):
                merged[item.name] = None if mine is None and theirs is None else (mine or 0.0) + (theirs or 0.0)
            elif item.name == "needs":
                merged[item.name] = {**mine, **theirs}
            elif item.name in ("drop_truncated", "drop_equal_groups"):
                merged[item.name] = bool(mine) or bool(theirs)
            elif item.name in ("not_applicable", "unmodelled"):
                merged[item.name] = "; ".join(text for text in (mine, theirs) if text)
            else:
                merged[item.name] = theirs if theirs is not None else mine
        return Objective(**merged)


def in_loss_divergence(estimator: str, importance_weighted: bool) -> str:
    """The divergence whose gradient a per-token KL estimator in the loss follows on samples of pi (token by token):
    with log rho = log q - log pi, the pathwise gradient of k1 = -log rho has mean E[grad log pi] = 0; k2 =
    (log rho)^2 / 2 gives E[k1 grad log pi] = grad KL(pi || q); k3 = rho - 1 - log rho gives
    E[(1 - rho) grad log pi] = grad KL(q || pi). Times the ratio pi/pi_old (its gradient at 1: grad log pi) each
    gains E[k grad log pi]: k1 and k3 then follow KL(pi || q), k2 the gradient of E_pi[(log pi/q)^2 / 2]. The
    straight-through k1+ and k3+ carry k2's gradient (times the ratio held fixed when weighted): KL(pi || q) both ways."""
    weighted = {"k1": "reverse_kl", "k2": "squared_log_ratio", "k3": "reverse_kl", "k1+": "reverse_kl",
                "k3+": "reverse_kl"}
    plain = {"k1": "zero", "k2": "reverse_kl", "k3": "forward_kl", "k1+": "reverse_kl", "k3+": "reverse_kl"}
    return (weighted if importance_weighted else plain)[estimator]


def top_entropy_tokens(quantile: float) -> Rule:
    """The 80/20 rule as a token weight: keep the loss tokens whose entropy is in the top ``quantile``."""
    return Rule(f"top-{quantile:g} entropy tokens only", lambda world, options: world.top_entropy_mask(quantile))


class NotModelled(Exception):
    """The declaration (or its combination with the configuration) is outside what the oracle evaluates exactly."""
