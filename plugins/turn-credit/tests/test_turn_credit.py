"""Turn-level credit assignment: each estimator against hand-computed small episodes, conformance, and training on
the embedded multi-turn environment."""

import dataclasses
import math
import statistics

import pytest
import torch

from po_registry.registry import get_registry
from po_registry.testing import PluginConformance, default_args, trains_on_task

# Two episodes of one prompt: row 0 plays two turns, row 1 three; -1 marks environment tokens.
TURN_INDEX = [[0, 0, -1, 1, -1, -1], [0, -1, 1, -1, 2, -1]]
TURN_REWARD = [[0.0, 0.5, 0.0, 1.0, 0.0, 0.0], [0.2, 0.0, -0.1, 0.0, 0.3, 0.0]]


def _episodes(po_reward_batch, turn_index, turn_reward, turn_state=None, options=None):
    n, width = len(turn_index), len(turn_index[0])
    outcome = torch.tensor([[sum(r)] for r in turn_reward])
    rewards, batch = po_reward_batch(group_size=n, num_groups=1, width=width, rewards=outcome,
                                     options=options or {}, args=default_args())
    rows = [{"turn_index": i, "turn_reward": r, "turn_state": s or [-1] * width}
            for i, r, s in zip(turn_index, turn_reward, turn_state or [None] * n)]
    # the loss mask excludes environment tokens
    batch = dataclasses.replace(batch, completion_mask=(torch.tensor(turn_index) >= 0).float(), rows=rows)
    return rewards, batch


def _normalised(values):
    mean, std = statistics.mean(values), statistics.stdev(values)
    return [(v - mean) / (std + 1e-4) for v in values]


def _component(name):
    return get_registry().plugin(name, needed_by="the tests")


def _expected_tokens(turn_index, per_turn, per_row=None):
    return torch.tensor([[(per_row[i] if per_row else 0.0) + per_turn[i][k] if k >= 0 else 0.0 for k in row]
                         for i, row in enumerate(turn_index)])


def test_turn_advantage_by_hand(po_reward_batch):
    """MT-GRPO: A = A^out + lambda A^turn on the turns before an episode's last, A^out alone on its last turn (the
    authors' code: outcome + coef * turn advantage before the final answer, outcome after it)."""
    rewards, batch = _episodes(po_reward_batch, TURN_INDEX, TURN_REWARD, options={"turn_advantage_coef": 0.5})
    got = _component("turn-advantage").po_compute_advantages(rewards, batch)
    outcome = _normalised([1.5, 0.4])
    turn0 = _normalised([0.5, 0.2])  # turn 0 is intermediate in both episodes
    # Turn 1: intermediate only in row 1 (one episode: 0); it is row 0's final turn. Turn 2: row 1's final turn.
    per_turn = [[0.5 * turn0[0], 0.0], [0.5 * turn0[1], 0.0, 0.0]]
    expected = _expected_tokens(TURN_INDEX, per_turn, outcome)
    assert torch.allclose(got, expected, atol=1e-4)
    # The numbers: A^out = +-0.55 / (0.77782 + 1e-4) = +-0.70702, A^turn_0 = +-0.15 / (0.21213 + 1e-4) = +-0.70677.
    # Row 0's final-turn token had 0.70702 + 0.5 * 0.70702 = 1.06040 before (turn 1 z-scored over {1.0, -0.1}).
    assert got[0].tolist() == pytest.approx([1.06041, 1.06041, 0.0, 0.70702, 0.0, 0.0], abs=1e-4)
    assert got[1].tolist() == pytest.approx([-1.06041, 0.0, -0.70702, 0.0, -0.70702, 0.0], abs=1e-4)


def test_turn_return_by_hand(po_reward_batch):
    """Each turn's discounted return z-scored against the same turn's returns in the group."""
    rewards, batch = _episodes(po_reward_batch, TURN_INDEX, TURN_REWARD, options={"turn_return_gamma": 0.9})
    got = _component("turn-return").po_compute_advantages(rewards, batch)
    returns = [[0.5 + 0.9 * 1.0, 1.0], [0.2 + 0.9 * -0.1 + 0.81 * 0.3, -0.1 + 0.9 * 0.3, 0.3]]
    turn0, turn1 = _normalised([returns[0][0], returns[1][0]]), _normalised([returns[0][1], returns[1][1]])
    per_turn = [[turn0[0], turn1[0]], [turn0[1], turn1[1], 0.0]]  # turn 2: row 1's alone, no one to compare with
    assert torch.allclose(got, _expected_tokens(TURN_INDEX, per_turn), atol=1e-4)
    # G_0 = 1.4 vs 0.353: +-0.5235 / (0.74034 + 1e-4); G_1 = 1.0 vs 0.17: +-0.415 / (0.58690 + 1e-4).
    assert got[0].tolist() == pytest.approx([0.70701, 0.70701, 0.0, 0.70699, 0.0, 0.0], abs=1e-4)
    assert got[1].tolist() == pytest.approx([-0.70701, 0.0, -0.70699, 0.0, 0.0, 0.0], abs=1e-4)


def test_gigpo_by_hand(po_reward_batch):
    """Three episodes from one start state S0; rows 0 and 2 meet again in S1; S2 and S3 are seen once."""
    index = [[0, -1, 1, -1, -1, -1], [0, -1, 1, -1, -1, -1], [0, -1, 1, -1, 2, -1]]
    reward = [[0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [-0.1, 0.0, 0.8, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.7, 0.0]]
    S0, S1, S2, S3 = 11, 22, 33, 44
    state = [[S0, -1, S1, -1, -1, -1], [S0, -1, S2, -1, -1, -1], [S0, -1, S1, -1, S3, -1]]
    rewards, batch = _episodes(po_reward_batch, index, reward, state,
                               options={"gigpo_gamma": 0.5, "gigpo_step_weight": 1.0})
    got = _component("gigpo").po_compute_advantages(rewards, batch)
    returns = [[0.5, 1.0], [-0.1 + 0.4, 0.8], [0.175, 0.35, 0.7]]
    s0 = _normalised([returns[0][0], returns[1][0], returns[2][0]])
    s1 = _normalised([returns[0][1], returns[2][1]])
    step = [[s0[0], s1[0]], [s0[1], 0.0], [s0[2], s1[1], 0.0]]
    episode = _normalised([1.0, 0.7, 0.7])
    assert torch.allclose(got, _expected_tokens(index, step, episode), atol=1e-4)
    assert math.isclose(s0[0], 1.0675, abs_tol=1e-3)  # the hand value: (0.5 - 0.325) / 0.16394


def test_single_turn_rows_are_refused(po_reward_batch):
    rewards, batch = po_reward_batch(args=default_args())
    with pytest.raises(ValueError, match="multi-turn rollouts"):
        _component("gigpo").po_compute_advantages(rewards, batch)


class _Synthetic:
    train_steps = 0  # trained on the multi-turn environment below instead

    def prepare_reward_batch(self, batch):
        n, width = batch.completion_mask.shape
        generator = torch.Generator().manual_seed(n)
        index = torch.where(batch.completion_mask.bool(), torch.arange(width).expand(n, width) // 2, -1)
        rows = [{"turn_index": row.tolist(), "turn_reward": (torch.rand(width, generator=generator) - 0.5).tolist(),
                 "turn_state": (row.clamp(min=0) % 2).tolist()} for row in index]
        return dataclasses.replace(batch, rows=rows)


class TestTurnAdvantageConformance(_Synthetic, PluginConformance):
    method = "turn-advantage"


class TestGiGPOConformance(_Synthetic, PluginConformance):
    method = "gigpo"


class TestTurnReturnConformance(_Synthetic, PluginConformance):
    method = "turn-return"


@pytest.mark.parametrize("method", ["turn-advantage", "gigpo", "turn-return"])
def test_trains_on_the_multi_turn_environment(po_trainer, method):
    trainer = trains_on_task(po_trainer, [method], "guess")
    assert all("env/turns_mean" in row for row in trainer.state.log_history if "loss" in row)


# -- the gradient oracle's turns set-up (po_registry.oracle): two-turn episodes enumerated exactly -----------------


@pytest.mark.parametrize("method", ["turn-advantage", "gigpo", "turn-return"])
def test_the_oracle_passes_the_declared_turn_credit(method):
    """On the oracle's turns set-up the per-token advantages equal the declared formula (computed there by
    enumeration, independently of this plugin) and the mean gradient its expectation; they run there only."""
    from po_registry.oracle import check_all, check_method

    result = check_method(method, setup="turns")
    assert result.passed and not result.note, result.describe()
    assert "E[R]" in result.objective and "group std scaling" in result.declared_bias
    assert check_method(method, setup="standard").passed is None
    assert [r.setup for r in check_all([method], batches=2, rows=64)] == ["turns"]


def test_turn_return_stays_bounded_in_a_group_of_equal_episode_returns(po_reward_batch):
    """A group whose episode returns are all equal while its later turns' returns differ. Before, each turn's return
    was z-scored against the episode returns, whose std is 0 here: turn-1 credit of (1.0 - 1.4) / 1e-4 = -4000 in the
    first case (the oracle's finding: such groups made its gradient check inconclusive)."""
    index = [[0, -1, 1]] * 2
    rewards, batch = _episodes(po_reward_batch, index, [[0.5, 0.0, 1.0]] * 2, options={"turn_return_gamma": 0.9})
    got = _component("turn-return").po_compute_advantages(rewards, batch)
    assert got.abs().max() == 0.0, got  # identical episodes: no credit at all
    # gamma = 1: both episodes return 1.5; turn 1 returns 1.0 and 0.5, which the second turn is credited for.
    rewards, batch = _episodes(po_reward_batch, index, [[0.5, 0.0, 1.0], [1.0, 0.0, 0.5]],
                               options={"turn_return_gamma": 1.0})
    got = _component("turn-return").po_compute_advantages(rewards, batch)
    z = 0.25 / (0.5 / math.sqrt(2) + 1e-4)
    assert torch.allclose(got, torch.tensor([[0.0, 0.0, z], [0.0, 0.0, -z]]), atol=1e-5), got
