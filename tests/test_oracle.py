"""The gradient oracle itself: its exact side against an independent enumeration, and its verdicts on deliberately
right and wrong estimators (test plugins written here, not the methods it checks)."""

import json
import dataclasses
import itertools
import math
import warnings

import pytest
import torch

from po_registry import get_registry, hookimpl
from po_registry.oracle import (EOS, Dense, Objective, World, check_method, claimed_gradient, declared_gradient,
                                describe_bias)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- the exact side ---------------------------------------------------------------------------------------------


def _reference_objective(theta, reference=None, beta=0.0):
    """Independent of the oracle: every completion of at most 3 tokens over {a, b, </s>} by itertools, its
    probability as a product of per-position softmaxes (float64), R = (#a - #b) + (0.5 if it ends with </s>), and
    J = E[R] - beta KL(p || p_ref)."""
    def log_softmax(row):
        top = max(row)
        log_total = top + math.log(sum(math.exp(x - top) for x in row))
        return [x - log_total for x in row]

    logp, logq = [log_softmax(row) for row in theta], [log_softmax(row) for row in reference or theta]
    completions = [(EOS,)] + [(x, EOS) for x in (0, 1)] + [(x, y, z) for x, y in itertools.product((0, 1), repeat=2)
                                                           for z in (0, 1, EOS)]
    J = 0.0
    for tokens in completions:
        lp = sum(logp[t][token] for t, token in enumerate(tokens))
        lq = sum(logq[t][token] for t, token in enumerate(tokens))
        reward = tokens.count(0) - tokens.count(1) + (0.5 if tokens[-1] == EOS else 0.0)
        J += math.exp(lp) * (reward - beta * (lp - lq))
    return J, len(completions)


def _finite_difference(theta, **kwargs):
    grad = [[0.0] * 3 for _ in range(3)]
    for t, v in itertools.product(range(3), range(3)):
        up = [list(row) for row in theta]
        down = [list(row) for row in theta]
        up[t][v] += 1e-5
        down[t][v] -= 1e-5
        grad[t][v] = (_reference_objective(up, **kwargs)[0] - _reference_objective(down, **kwargs)[0]) / 2e-5
    return torch.tensor(grad)


def test_the_world_lists_every_completion_once_with_probabilities_summing_to_one():
    world = World("standard")
    assert len(world.sequences) == len(set(world.sequences)) == _reference_objective([[0.0] * 3] * 3)[1] == 15
    assert torch.isclose(world.p.sum(), torch.tensor(1.0))
    environment = World("environment")  # a@0 or b@0, then a or b from the environment, then one more: 12, + </s>, + ()
    assert len(environment.sequences) == 14 and torch.isclose(environment.p.sum(), torch.tensor(1.0))
    assert environment.loss_mask[:, 1].sum() == 0 and environment.loss_tokens[environment.empty].sum() == 0


def test_claimed_gradient_is_the_exact_gradient_of_expected_reward_minus_kl():
    world = World("standard")
    theta = world.theta.detach().tolist()
    got = claimed_gradient(world, Objective(reward=1.0, log_reward=False))
    assert torch.allclose(got, _finite_difference(theta), atol=1e-4)
    got = claimed_gradient(world, Objective(reward=1.0, log_reward=False, kl_reference=0.5))
    reference = world.reference.tolist()
    assert torch.allclose(got, _finite_difference(theta, reference=reference, beta=0.5), atol=1e-4)


def test_a_dense_kl_reward_with_full_return_has_the_gradient_of_minus_kl():
    """With k1 per token and gamma = 1 the declared credit is the score-function gradient of -KL(p || p_ref)."""
    world = World("standard")
    objective = Objective(reward=0.0, advantage="zero", aggregation="sequences", scale="exact",
                          dense=(Dense("reference", 1.0, gamma=1.0),))
    _, exact = declared_gradient(world, objective, {})
    theta, reference = world.theta.detach().tolist(), world.reference.tolist()
    # -grad KL(p || p_ref) = grad J(beta = 1) - grad J(beta = 0), by finite differences of the reference loop.
    expected = _finite_difference(theta, reference=reference, beta=1.0) - _finite_difference(theta)
    assert torch.allclose(exact, expected, atol=1e-4)
    myopic = declared_gradient(world, Objective(reward=0.0, advantage="zero", aggregation="sequences", scale="exact",
                                                dense=(Dense("reference", 1.0, gamma=0.0),)), {})[1]
    assert (myopic - exact).norm() / exact.norm() > 0.3  # the future KL matters here: myopia is visible


# -- verdicts on test estimators --------------------------------------------------------------------------------


class Reinforce:
    """A = R (no baseline), loss -A log pi summed per sequence, averaged over rows."""

    sign = 1.0
    objective = Objective(advantage="none", aggregation="sequences")

    @hookimpl
    def po_register_methods(self, register):
        register(self.name, components=[self.name], objective=self.objective)

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        return batch.weighted_reward(rewards).nan_to_num(0.0)

    @hookimpl
    def po_policy_objective(self, batch):
        return -self.sign * batch.advantages * batch.logps

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return (per_token_loss * batch.mask).sum() / batch.mask.shape[0]


class Backwards(Reinforce):
    sign = -1.0


class TokenMeanReinforce(Reinforce):
    """Mean over each row's tokens: length normalisation, declared here as if it were not there."""

    @hookimpl
    def po_aggregate_loss(self, per_token_loss, batch):
        return ((per_token_loss * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1.0)).mean()


class KLInTheReward(Reinforce):
    """E[R] - beta KL(p || p_ref) through a k1 reward per token, returned to the earlier tokens (or, myopic, not)."""

    myopic = False
    objective = Objective(advantage="none", aggregation="sequences", kl_reference=0.5,
                          dense=(Dense("reference", 0.5, gamma=1.0),))

    @hookimpl
    def po_token_penalty(self, batch, log_weights):
        k1 = ((batch.old_logps - batch.ref_logps) * batch.mask).detach()
        credit = k1 if self.myopic else k1.flip(-1).cumsum(-1).flip(-1)
        return 0.5 * credit * torch.exp(log_weights)


class MyopicKL(KLInTheReward):
    myopic = True


class HoleBlind(Reinforce):
    """Credits R only to the tokens after the row's last hole, as a return that stops at environment tokens would."""

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        mask = batch.completion_mask
        holes = (mask == 0) & (mask.flip(-1).cumsum(-1).flip(-1) > 0)  # masked, with loss tokens after it
        after = holes.flip(-1).cumsum(-1).flip(-1) == 0  # no hole at or after this position
        return batch.weighted_reward(rewards).nan_to_num(0.0).unsqueeze(1) * after * mask


def _register(plugins, cls, name):
    plugin = type(name.title().replace("-", ""), (cls,), {"name": name})()
    plugins(name, plugin)
    return name


def test_an_unbiased_reinforce_converges_to_the_exact_gradient(plugins):
    name = _register(plugins, Reinforce, "reinforce")
    for setup in ("standard", "environment", "equal-rewards"):
        result = check_method(name, setup=setup)
        assert result.passed, result.describe()
    result = check_method(name)
    assert result.cosine > 0.99 and result.bias < 1e-4 and describe_bias(
        Objective(advantage="none", aggregation="sequences")) == "none"


def test_a_sign_error_is_caught(plugins):
    result = check_method(_register(plugins, Backwards, "backwards"))
    assert result.passed is False and result.cosine < -0.99 and result.error > 1.9, result.describe()


def test_length_normalisation_is_caught_unless_declared(plugins):
    name = _register(plugins, TokenMeanReinforce, "token-mean-reinforce")
    assert check_method(name).passed is False
    registry = get_registry()
    registry.methods[name] = dataclasses.replace(registry.methods[name],
                                                 objective=Objective(advantage="none", aggregation="length"))
    result = check_method(name)
    assert result.passed and result.bias > 0.1 and "length normalisation" in result.declared_bias, result.describe()


def test_a_myopic_kl_reward_is_caught_and_the_return_passes(plugins):
    right = _register(plugins, KLInTheReward, "kl-in-the-reward")
    wrong = _register(plugins, MyopicKL, "myopic-kl")
    for setup in ("standard", "equal-rewards"):
        assert check_method(right, setup=setup).passed, check_method(right, setup=setup).describe()
    caught = check_method(wrong, setup="equal-rewards")  # equal rewards: the KL term alone, measured precisely
    assert caught.passed is False and caught.error > 5 * caught.tolerance, caught.describe()


def test_credit_that_stops_at_a_hole_in_the_mask_is_caught_where_there_are_holes(plugins):
    name = _register(plugins, HoleBlind, "hole-blind")
    assert check_method(name, setup="standard").passed  # no environment tokens: no hole, nothing to see
    caught = check_method(name, setup="environment")
    assert caught.passed is False and caught.error > 5 * caught.tolerance, caught.describe()


def test_the_error_shrinks_as_one_over_the_square_root_of_the_batches(plugins):
    name = _register(plugins, Reinforce, "reinforce")
    few = [check_method(name, batches=4, rows=256, seed=seed).error for seed in range(6)]
    many = [check_method(name, batches=64, rows=256, seed=seed).error for seed in range(6)]
    ratio = (sum(few) / len(few)) / (sum(many) / len(many))
    assert 2.0 < ratio < 8.0, (few, many)  # sqrt(64 / 4) = 4


def test_a_method_declared_for_non_negative_rewards_must_refuse_signed_ones(plugins):
    class Unguarded(Reinforce):
        objective = Objective(advantage="none", aggregation="sequences", rewards="non_negative")

    result = check_method(_register(plugins, Unguarded, "unguarded"))
    assert result.passed is False and "both signs were accepted" in result.note


def test_an_undeclared_method_is_not_checked_and_says_why(plugins):
    class Silent(Reinforce):
        objective = None

    result = check_method(_register(plugins, Silent, "silent"))
    assert result.passed is None and "declares no objective" in result.note


def test_a_bad_declaration_is_a_load_fault_naming_the_method(plugins):
    class Wrong:
        @hookimpl
        def po_register_methods(self, register):
            register("wrong-objective", components=["wrong-objective"], objective="expected reward")

    plugins("wrong-objective", Wrong())
    registry = get_registry()
    assert any("wrong-objective" in fault and "objective must be" in fault
               for fault in registry.faults["wrong-objective"])
    with pytest.raises(ValueError, match="aggregation 'token'"):
        Objective(aggregation="token")


def test_every_registered_method_declares_an_objective():
    from po_registry.docs import repository_registry

    registry = repository_registry()
    undeclared = sorted(name for name, method in registry.methods.items() if method.objective is None)
    assert not undeclared, f"methods without an objective declaration: {undeclared}"


def test_methods_command_runs_the_oracle_on_request(capsys):
    from test_cli import run_cli

    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0 and all("oracle" not in row for row in json.loads(out))  # fast by default
    code, out, err = run_cli(capsys, "methods", "--oracle", "--json")
    grpo = next(row for row in json.loads(out) if row["method"] == "grpo")
    assert code == 0 and "running the gradient oracle" in err
    assert grpo["oracle"] and all(result["passed"] for result in grpo["oracle"])
