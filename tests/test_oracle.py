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


# -- the turns set-up: multi-turn episodes ----------------------------------------------------------------------


def test_the_turns_world_carries_a_rollouts_turn_fields():
    """Token 0 is turn 0, token 1 the environment's reply (turn -1, no reward, no state), token 2 turn 1; each turn's
    reward sits on its token, the episode's reward is their sum, and each turn's state is the prefix it began from
    (turn 0 shared by every episode of the prompt, turn 1 by the episodes with the same first token and reply)."""
    from po_registry.oracle import TURNS, turn_rewards

    world = World("turns")
    assert len(world.sequences) == 14 and torch.isclose(world.p.sum(), torch.tensor(1.0))
    states = {}
    for s, tokens in enumerate(world.sequences):
        row = world.rows[s]
        assert len(row["turn_index"]) == len(row["turn_reward"]) == len(row["turn_state"]) == len(tokens)
        assert row["turn_index"] == [0, -1, 1][: len(tokens)]
        assert row["turn_reward"] == [0.0 if k < 0 else turn_rewards(tokens)[k] for k in row["turn_index"]]
        assert math.isclose(sum(row["turn_reward"]), float(world.rewards[s, 0])) and math.isnan(world.rewards[s, 1])
        assert row["turn_state"][1:2] in ([], [-1])
        for t, state in enumerate(row["turn_state"]):
            if t != 1:
                assert states.setdefault(tokens[:t], state) == state
    assert len(set(states.values())) == len(states) == 1 + 4  # the prompt, and the four (turn 0, reply) prefixes
    assert world.turn_exists.sum(1).tolist() == [TURNS] * 12 + [1, 0]
    assert all(row == {} for row in World("environment").rows)


class RewardToGo(Reinforce):
    """Token t of turn k credited with the rewards of turns k, k+1, ...: reward-to-go REINFORCE over turns, read
    from the rows' turn fields. Causality makes its expected gradient E[R]'s, the declaration of plain REINFORCE."""

    objective = Objective(advantage="none", aggregation="sequences", setups=("turns",))

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        turn_reward = batch.token_field("turn_reward") * batch.completion_mask
        return turn_reward.flip(-1).cumsum(-1).flip(-1) * batch.completion_mask


class MyopicTurns(RewardToGo):
    """Each turn credited with its own turn's reward only: blind to the delayed reward of turn 0's choice."""

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        index = batch.token_field("turn_index", fill=-1, dtype=torch.long)
        turn_reward = batch.token_field("turn_reward") * batch.completion_mask
        per_turn = torch.zeros(index.shape[0], 2).scatter_add_(1, index.clamp(min=0), turn_reward * (index >= 0))
        return per_turn.gather(1, index.clamp(min=0)) * (index >= 0) * batch.completion_mask


class FirstTurnOnly(RewardToGo):
    """Every token credited with turn 0's reward: turn 1's reward ignored."""

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        return batch.token_field("turn_reward")[:, :1] * batch.completion_mask


def _reward_to_go(world, groups, options):
    """Independent of the plugins: token t of turn k gets sum_{k' >= k} r_k', by a loop over each episode's turns."""
    credit = torch.zeros(world.turn_reward.shape[0], 3)
    for s, tokens in enumerate(world.sequences):
        for t in range(len(tokens)):
            k = int(world.turn_index[s, t])
            if k >= 0:
                credit[s, t] = float(world.turn_reward[s, k:].sum())
    return credit[groups]


def test_the_turns_set_up_passes_reward_to_go_and_catches_myopic_credit(plugins):
    from po_registry.oracle import Rule, check_all

    right = _register(plugins, RewardToGo, "reward-to-go")
    result = check_method(right, setup="turns")
    assert result.passed and result.cosine > 0.99 and result.bias < 1e-4, result.describe()
    assert [r.setup for r in check_all([right])] == ["turns"]  # it declares the turns set-up only
    assert check_method(right, setup="standard").passed is None
    assert [r.setup for r in check_all(["grpo"])] == ["standard", "environment", "equal-rewards"]
    for wrong in (_register(plugins, MyopicTurns, "myopic-turns"), _register(plugins, FirstTurnOnly, "first-turn")):
        caught = check_method(wrong, setup="turns")
        assert caught.passed is False and caught.error > 5 * caught.tolerance, caught.describe()
    # Declared per token, the same estimator also passes its values' check, and the plain declaration's expectation
    # equals the reward-to-go's (past turns' rewards have zero expected gradient at later tokens).
    world = World("turns")
    rule = Rule("turn reward-to-go", _reward_to_go)
    per_token = Objective(advantage="zero", aggregation="sequences", group_dense=(rule,), scale="exact")
    plain = Objective(advantage="none", aggregation="sequences", scale="exact")
    assert torch.allclose(declared_gradient(world, per_token, {})[0], declared_gradient(world, plain, {})[0],
                          atol=1e-6)
    registry = get_registry()
    registry.methods[right] = dataclasses.replace(registry.methods[right], objective=dataclasses.replace(
        per_token, scale=None, setups=("turns",)))
    assert check_method(right, setup="turns").passed, check_method(right, setup="turns").describe()


def test_per_token_advantages_are_checked_against_the_declared_credit(plugins):
    """R on every token has reward-to-go's expected gradient, so only the advantage values can tell them apart."""
    from po_registry.oracle import Rule

    class Outcome(RewardToGo):
        objective = Objective(advantage="zero", aggregation="sequences", setups=("turns",),
                              group_dense=(Rule("turn reward-to-go", _reward_to_go),))

        @hookimpl
        def po_compute_advantages(self, rewards, batch):
            return batch.weighted_reward(rewards).nan_to_num(0.0).unsqueeze(1) * batch.completion_mask

    caught = check_method(_register(plugins, Outcome, "outcome-everywhere"), setup="turns")
    assert caught.passed is False and "differ from the declared" in caught.note and caught.error < caught.tolerance
