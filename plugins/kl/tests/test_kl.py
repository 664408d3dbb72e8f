"""KL estimators as a loss term: formulas, equality with TRL's k3 term, conformance and training."""

import math

import pytest
import torch
from po_registry_kl import KLPenalty

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args


FIXED_BETA = {"kl_target": 0.0, "kl_horizon": 10000.0}


class TestConformanceK3(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    metrics = ("kl/k3",)


class TestConformanceK1(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    options = {"kl_estimator": "k1", "kl_importance_correction": False}
    metrics = ("kl/k1",)


class TestConformanceK2(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    options = {"kl_estimator": "k2"}
    train_steps = 0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_times_beta_and_correction(po_loss_batch, estimator):
    args = default_args(["kl"], beta=0.5)
    batch = po_loss_batch(rows=1, width=3, args=args, options={"kl_estimator": estimator,
                                                               "kl_importance_correction": True, **FIXED_BETA})
    batch.logps = torch.tensor([[-1.0, -2.0, -0.5]])
    batch.ref_logps = torch.tensor([[-1.5, -1.0, -0.5]])
    log_rho = batch.ref_logps - batch.logps
    expected = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": log_rho.exp() - 1 - log_rho}[estimator]
    log_weights = torch.tensor([[0.1, 0.0, -0.2]])
    penalty = KLPenalty().po_token_penalty(batch, log_weights)
    assert torch.allclose(penalty, 0.5 * expected * log_weights.exp())


def _exact_kl(p_logps, q_logps):
    """KL(p || q) summed over positions, by summing over the whole vocabulary."""
    return (p_logps.exp() * (p_logps - q_logps)).sum()


# The expected gradient of each cell of the README's table (r = log pi - log pi_ref; w = pi / pi_old):
GRADIENT_TARGET = {
    ("k1", False): lambda pi, ref: 0.0 * pi.sum(),
    ("k1", True): lambda pi, ref: _exact_kl(pi, ref),
    ("k2", False): lambda pi, ref: _exact_kl(pi, ref),
    # (r + r^2 / 2) grad log pi: the reverse KL's gradient plus that of sum_v pi(v) * (fixed r(v)^2 / 2)
    ("k2", True): lambda pi, ref: _exact_kl(pi, ref) + (pi.exp() * 0.5 * (pi - ref).detach() ** 2).sum(),
    ("k3", False): lambda pi, ref: _exact_kl(ref, pi),
    ("k3", True): lambda pi, ref: _exact_kl(pi, ref),
    ("k1+", False): lambda pi, ref: _exact_kl(pi, ref),  # straight-through: k2's gradient
    ("k1+", True): lambda pi, ref: _exact_kl(pi, ref),
    ("k3+", False): lambda pi, ref: _exact_kl(pi, ref),
    ("k3+", True): lambda pi, ref: _exact_kl(pi, ref),
}


@pytest.mark.parametrize("estimator, correction", list(GRADIENT_TARGET))
def test_kl_gradient_follows_the_divergence_the_readme_names(po_loss_batch, estimator, correction):
    """Vocabulary 4, two positions with their own logits (the parameters), a fixed reference per position, on-policy
    (pi_old = pi_theta). Row v samples token v at both positions; weighting row v's per-token penalty by pi_t(v)
    takes the expectation exactly. It must equal beta times the gradient of the table's target, summed over the
    vocabulary."""
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0], [-0.7, 0.4, 0.2, 0.9]], requires_grad=True)  # (position, vocab)
    reference = torch.log_softmax(torch.tensor([[1.0, 0.5, -0.5, 0.2], [0.1, -1.0, 0.8, 0.3]]), dim=-1)
    policy = torch.log_softmax(logits, dim=-1)
    tokens = torch.arange(4)
    batch = po_loss_batch(rows=4, width=2, args=default_args(["kl"], beta=0.5),
                          options={"kl_estimator": estimator, "kl_importance_correction": correction,
                                   **FIXED_BETA})
    batch.mask = torch.ones(4, 2)
    batch.logps, batch.ref_logps = policy.T[tokens], reference.T[tokens]  # (row v, position t): log pi_t(v)
    batch.old_logps = batch.logps.detach()
    penalty = KLPenalty().po_token_penalty(batch, batch.logps - batch.old_logps)
    method_grad, = torch.autograd.grad((policy.T.detach().exp() * penalty).sum(), logits)
    exact_grad, = torch.autograd.grad(GRADIENT_TARGET[estimator, correction](torch.log_softmax(logits, -1),
                                                                             reference),
                                      logits, allow_unused=True, materialize_grads=True)
    assert torch.allclose(method_grad, 0.5 * exact_grad, atol=1e-6)  # beta = 0.5


def test_needs_a_positive_beta():
    with pytest.raises(OptionError, match="plugin 'kl': the kl method needs beta > 0"):
        default_args(["kl"])


@pytest.mark.parametrize("correction", [True, False])
def test_k3_equals_trl_kl_term(po_trl_parity, correction):
    result = po_trl_parity(["kl"], {"use_bias_correction_kl": correction},
                           options={"kl_importance_correction": correction},
                           shared_flags={"beta": 0.2, "loss_type": "grpo"}, off_policy=0.5)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6


class TestKLRewardConformance(PluginConformance):
    method = "kl-reward"
    config = {"beta": 0.04}
    metrics = ("kl_reward/k1",)


def test_kl_reward_penalty_is_the_return_of_the_sampling_policys_kl_by_hand(po_loss_batch):
    """Row 0 has an environment hole at t = 1 and padding at t = 3, row 1 one token, row 2 none.
    k1 = log pi_old - log pi_ref on action tokens: row 0 [0.5, (hole), -1.0, (pad)], row 1 [-0.8].
    Return over action tokens: row 0 [0.5 - 1.0, -, -1.0, -] = [-0.5, 0, -1.0, 0]; row 1 [-0.8].
    Penalty beta * return * exp(log w) with beta 0.5."""
    from po_registry_kl import KLReward

    batch = po_loss_batch(rows=3, width=4, args=default_args(["kl-reward"], beta=0.5),
                          options={"kl_reward_estimator": "k1", "kl_reward_target": 0.0})
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    batch.old_logps = torch.tensor([[-1.0, -0.5, -2.0, -3.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    batch.ref_logps = torch.tensor([[-1.5, -4.0, -1.0, -1.0], [-0.2, -3.0, -3.0, -3.0], [-3.0, -3.0, -3.0, -3.0]])
    log_weights = torch.tensor([[0.1, 0.3, -0.2, 0.4], [0.2, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = KLReward().po_token_penalty(batch, log_weights)
    assert got[0].tolist() == pytest.approx([0.5 * -0.5 * math.exp(0.1), 0.0, 0.5 * -1.0 * math.exp(-0.2), 0.0])
    assert got[1].tolist() == pytest.approx([0.5 * -0.8 * math.exp(0.2), 0.0, 0.0, 0.0])
    assert got[2].tolist() == [0.0, 0.0, 0.0, 0.0]


# A policy small enough to enumerate: vocabulary 3, completions of two action tokens; token 1 from logits THETA_1,
# token 2 from the row THETA_2[token 1]. The reference is another fixed table; R is a reward per sequence.
THETA_1 = [0.2, -0.5, 0.9]
THETA_2 = [[0.1, 0.7, -0.3], [-1.0, 0.2, 0.4], [0.5, -0.6, 0.0]]
REF_1 = [1.0, 0.0, -0.5]
REF_2 = [[0.0, -0.4, 0.6], [0.3, 0.3, -0.9], [-0.2, 0.8, 0.1]]
REWARD = [[1.0, 0.0, 0.5], [0.0, 2.0, -1.0], [0.3, 1.0, 0.0]]
BETA = 0.3
SEQUENCES = [(a, b) for a in range(3) for b in range(3)]


def _log_probs(first, second, y):
    """log pi(y_1), log pi(y_2 | y_1) under the logit tables ``first`` (3,) and ``second`` (3, 3)."""
    return torch.log_softmax(first, -1)[y[0]], torch.log_softmax(second[y[0]], -1)[y[1]]


def _exact_objective_gradient(theta_1, theta_2, reward_scale=1.0):
    """grad of reward_scale * E[R] - beta KL(pi || pi_ref), both by summing over the 9 sequences."""
    ref_1, ref_2 = torch.tensor(REF_1), torch.tensor(REF_2)
    objective = 0.0
    for y in SEQUENCES:
        log_pi = sum(_log_probs(theta_1, theta_2, y))
        log_ref = sum(_log_probs(ref_1, ref_2, y))
        objective = objective + log_pi.exp() * (reward_scale * REWARD[y[0]][y[1]] - BETA * (log_pi - log_ref))
    return torch.autograd.grad(objective, [theta_1, theta_2])


def _micro_batch(po_loss_batch, pipeline, rows, theta_1, theta_2, advantages, hole):
    """A LossBatch of the completions ``rows``, on-policy (pi_old = pi_theta), log-probs carrying the gradient to the
    logit tables. With ``hole`` an environment token (masked, log-probs that differ from the reference's) sits
    between the two action tokens: it changes neither pi(y) nor the KL between the two policies."""
    args = default_args(["kl-reward"], pipeline.options, beta=BETA, loss_type="grpo")
    width = 3 if hole else 2
    batch = po_loss_batch(rows=len(rows), width=width, args=args, options=pipeline.options, off_policy=0.0)
    ref_1, ref_2 = torch.tensor(REF_1), torch.tensor(REF_2)
    logps, ref_logps = [], []
    for y in rows:
        policy, reference = _log_probs(theta_1, theta_2, y), _log_probs(ref_1, ref_2, y)
        if hole:
            policy, reference = (policy[0], torch.tensor(-0.7), policy[1]), (reference[0], torch.tensor(-2.0),
                                                                              reference[1])
        logps.append(torch.stack(list(policy)))
        ref_logps.append(torch.stack(list(reference)))
    batch.logps, batch.ref_logps = torch.stack(logps), torch.stack(ref_logps)
    batch.old_logps = batch.logps.detach()
    batch.mask = torch.tensor([[1.0, 0.0, 1.0] if hole else [1.0, 1.0]] * len(rows))
    batch.num_items_in_batch = batch.mask.sum()
    batch.advantages = advantages.view(-1, 1)
    return batch


@pytest.mark.parametrize("hole", [False, True])
def test_kl_reward_gradient_is_the_exact_gradient_of_reward_minus_beta_kl(po_loss_batch, hole):
    """Advantage = return-to-go of the outcome R (R on every token), no baseline. The expected gradient of the
    assembled kl-reward loss, sum_y pi(y) grad L(y) (the expectation taken by enumerating the 9 sequences), must be
    -(1/2) grad (E[R] - beta KL(pi || pi_ref)): loss_type grpo averages over the 2 action tokens."""
    from po_registry.pipeline import Pipeline, assemble

    theta_1, theta_2 = torch.tensor(THETA_1, requires_grad=True), torch.tensor(THETA_2, requires_grad=True)
    pipeline = Pipeline(assemble(["kl-reward"]))
    method = [torch.zeros(3), torch.zeros(3, 3)]
    for y in SEQUENCES:
        batch = _micro_batch(po_loss_batch, pipeline, [y], theta_1, theta_2, torch.tensor(REWARD[y[0]][y[1]]), hole)
        probability = batch.logps.detach()[0][batch.mask[0].bool()].sum().exp()
        grads = torch.autograd.grad(pipeline.loss(batch), [theta_1, theta_2])
        method = [m + probability * g for m, g in zip(method, grads)]
    exact = _exact_objective_gradient(theta_1, theta_2)
    for m, e in zip(method, exact):
        assert torch.allclose(-2.0 * m, e, atol=1e-6)


def test_kl_reward_with_the_group_baseline_agrees_in_expectation(po_loss_batch):
    """Groups of G = 2 with the baseline's advantage A_i = R_i - mean(R_1, R_2) (scale_rewards none), every one of the
    81 ordered pairs weighted by pi(y) pi(y'). The mean includes the row itself, so the reward's part of the gradient
    is (G - 1)/G = 1/2 of grad E[R] (E[(R - (R + R')/2) grad log pi(y)] = 1/2 grad E[R], as E[grad log pi(y)] = 0);
    the KL's return is not baselined and keeps its full -beta grad KL. The loss averages over the 2 rows and 2 tokens,
    each row contributing the same in expectation: expected grad L = -(1/2) grad (E[R] / 2 - beta KL)."""
    from po_registry.builtin.grpo import GroupAdvantage
    from po_registry.pipeline import Pipeline, assemble
    from po_registry.testing import reward_batch

    theta_1, theta_2 = torch.tensor(THETA_1, requires_grad=True), torch.tensor(THETA_2, requires_grad=True)
    pipeline = Pipeline(assemble(["kl-reward"]))
    group_args = default_args(["kl-reward"], pipeline.options, beta=BETA, scale_rewards="none")
    method = [torch.zeros(3), torch.zeros(3, 3)]
    for pair in [(y, z) for y in SEQUENCES for z in SEQUENCES]:
        rewards = torch.tensor([[REWARD[y[0]][y[1]]] for y in pair])
        _, group = reward_batch(group_size=2, num_groups=1, width=2, rewards=rewards, args=group_args)
        advantages = GroupAdvantage().po_compute_advantages(rewards, group)
        batch = _micro_batch(po_loss_batch, pipeline, list(pair), theta_1, theta_2, advantages, hole=False)
        probability = batch.logps.detach().sum().exp()
        grads = torch.autograd.grad(pipeline.loss(batch), [theta_1, theta_2])
        method = [m + probability * g for m, g in zip(method, grads)]
    exact = _exact_objective_gradient(theta_1, theta_2, reward_scale=0.5)
    for m, e in zip(method, exact):
        assert torch.allclose(-2.0 * m, e, atol=1e-6)


def test_kl_reward_composes_with_one_advantage_per_sequence():
    """kl-reward adds no dense token rewards, so an advantage owner returning (N,) stays valid with it."""
    from po_registry.pipeline import assemble

    assembly = assemble(["kl-reward"])
    assert not assembly.owners.get("po_token_rewards")
    assert assembly.owners["po_compute_advantages"] == ["group-advantage"]


@pytest.mark.parametrize("estimator", ["abs", "k1+", "k3+"])
@pytest.mark.parametrize("correction", [False, True])
def test_abs_and_straight_through_values_by_hand(po_loss_batch, estimator, correction):
    """abs = |log rho|; k1+ and k3+ take the value of k1 and k3 (times w with the correction) and the gradient of
    k2: d/d logp [(logp - ref)^2 / 2] = logp - ref, times the fixed w."""
    batch = po_loss_batch(rows=1, width=3, args=default_args(["kl"], beta=0.5),
                          options={"kl_estimator": estimator, "kl_importance_correction": correction,
                                   **FIXED_BETA})
    batch.logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    batch.ref_logps = torch.tensor([[-1.5, -1.0, -0.5]])
    log_weights = torch.tensor([[0.1, 0.0, -0.2]])
    w = log_weights.exp() if correction else torch.ones(1, 3)
    log_rho = torch.tensor([[-0.5, 1.0, 0.0]])  # ref - logp
    value = {"abs": log_rho.abs(), "k1+": -log_rho, "k3+": log_rho.exp() - 1 - log_rho}[estimator] * w
    penalty = KLPenalty().po_token_penalty(batch, log_weights)
    assert torch.allclose(penalty.detach(), 0.5 * value)
    penalty.sum().backward()
    if estimator == "abs":  # d|logp - ref| = sign(logp - ref); the ratio's own gradient is not in log_weights here
        expected = torch.sign(-log_rho) * w
    else:
        expected = -log_rho * w
    assert torch.allclose(batch.logps.grad, 0.5 * expected)


def test_straight_through_corrected_follows_the_reverse_kl_off_policy(po_loss_batch):
    """Samples from pi_old != pi_theta, each row weighted by pi_old: with the importance correction, k1+ and k3+
    give beta * grad KL(pi_theta || pi_ref) exactly (w grad k2 with w held fixed averages to E_pi[grad k2])."""
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0], [-0.7, 0.4, 0.2, 0.9]], requires_grad=True)
    reference = torch.log_softmax(torch.tensor([[1.0, 0.5, -0.5, 0.2], [0.1, -1.0, 0.8, 0.3]]), dim=-1)
    old = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.5, -0.5], [0.3, 0.3, -0.2, 0.1]]), dim=-1)
    policy = torch.log_softmax(logits, dim=-1)
    tokens = torch.arange(4)
    for estimator in ("k1+", "k3+"):
        batch = po_loss_batch(rows=4, width=2, args=default_args(["kl"], beta=0.5),
                              options={"kl_estimator": estimator, "kl_importance_correction": True,
                                       **FIXED_BETA})
        batch.mask = torch.ones(4, 2)
        batch.logps, batch.ref_logps, batch.old_logps = policy.T[tokens], reference.T[tokens], old.T[tokens]
        penalty = KLPenalty().po_token_penalty(batch, batch.logps - batch.old_logps)
        method_grad, = torch.autograd.grad((old.T.exp() * penalty).sum(), logits, retain_graph=True)
        exact_grad, = torch.autograd.grad(_exact_kl(torch.log_softmax(logits, -1), reference), logits)
        assert torch.allclose(method_grad, 0.5 * exact_grad, atol=1e-6), estimator


def _step(coefficient_owner, kl_value: float, rows: int, ends: bool, po_loss_batch, options):
    """One micro-batch of ``rows`` two-token rows whose k1 estimate is ``kl_value`` on every token."""
    batch = po_loss_batch(rows=rows, width=2, args=default_args(["kl"], beta=0.1), options=options)
    batch.mask = torch.ones(rows, 2)
    batch.logps = torch.full((rows, 2), -1.0)
    batch.ref_logps = batch.logps - kl_value
    batch.ends_optimizer_step = ends
    return coefficient_owner.po_token_penalty(batch, torch.zeros(rows, 2))


def test_adaptive_beta_by_hand(po_loss_batch):
    """beta 0.1, target 0.05, horizon 100. Step 1: two micro-batches of 2 rows, KL 0.1 and 0.3 per token -> 0.2 =
    4 x target: the error is capped at 0.2, beta *= 1 + 0.2 * 4/100 = 1.008. Step 2: KL 0.04 (error -0.2): beta *=
    1 - 0.2 * 2/100. Each micro-batch uses the beta of its step's start."""
    options = {"kl_estimator": "k1", "kl_importance_correction": False, "kl_target": 0.05, "kl_horizon": 100.0}
    penalty = KLPenalty()
    first = _step(penalty, 0.1, 2, False, po_loss_batch, options)
    second = _step(penalty, 0.3, 2, True, po_loss_batch, options)
    assert torch.allclose(first, torch.full((2, 2), 0.1 * 0.1)) and torch.allclose(second, torch.full((2, 2), 0.03))
    assert penalty.coefficient.beta == pytest.approx(0.1 * 1.008)
    third = _step(penalty, 0.04, 2, True, po_loss_batch, options)
    assert torch.allclose(third, torch.full((2, 2), 0.1 * 1.008 * 0.04))
    assert penalty.coefficient.beta == pytest.approx(0.1 * 1.008 * 0.996)
    assert penalty.po_state_dict() == {"beta": pytest.approx(0.1 * 1.008 * 0.996)}


def test_a_fixed_beta_keeps_no_state(po_loss_batch):
    options = {"kl_estimator": "k1", "kl_importance_correction": False, "kl_target": 0.0, "kl_horizon": 100.0}
    penalty = KLPenalty()
    _step(penalty, 0.3, 2, True, po_loss_batch, options)
    assert penalty.coefficient.beta == 0.1 and penalty.po_state_dict() is None


class TestConformanceAdaptiveBeta(PluginConformance):
    method = "kl"
    config = {"beta": 0.04}
    options = {"kl_estimator": "k3+", "kl_target": 0.001, "kl_horizon": 1000.0}
    metrics = ("kl/k3+", "kl/beta")


class TestKLRewardConformanceAdaptiveBeta(PluginConformance):
    method = "kl-reward"
    config = {"beta": 0.04}
    options = {"kl_reward_target": 0.001, "kl_reward_horizon": 1000.0}
    metrics = ("kl_reward/k1", "kl_reward/beta")


@pytest.mark.parametrize("method, prefix", [("kl", "kl"), ("kl-reward", "kl_reward")])
def test_adaptive_beta_is_resumed_from_a_checkpoint(po_trainer, tmp_path, method, prefix):
    """Interrupted at step 2 and resumed, beta continues where it was: the same betas, losses and parameters as the
    uninterrupted run (a horizon of 5 sequences moves beta visibly every step)."""
    options = {f"{prefix}_target": 0.001, f"{prefix}_horizon": 5.0}
    straight = po_trainer([method], options, max_steps=4, beta=0.04, output_dir=str(tmp_path / "straight"))
    straight.train()
    first = po_trainer([method], options, max_steps=4, beta=0.04, output_dir=str(tmp_path / "split"),
                       save_strategy="steps", save_steps=2)
    first.train()
    resumed = po_trainer([method], options, max_steps=4, beta=0.04, output_dir=str(tmp_path / "split"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    rows = [[row for row in trainer.state.log_history if "loss" in row] for trainer in (straight, resumed)]
    betas = [[row[f"{prefix}/beta"] for row in trainer_rows] for trainer_rows in rows]
    assert betas[0] == pytest.approx(betas[1], rel=1e-9) and len(set(betas[0])) == 4  # it moved every step
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], abs=1e-6)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
