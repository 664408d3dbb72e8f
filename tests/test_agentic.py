"""Multi-turn rollouts: the episode layout, environment tokens out of the loss (by gradient), robust environments,
the guess-the-number environment, and multi-turn training end to end."""

import time

import pytest
import torch

from po_registry.agentic import environment_reward, multi_turn_rollout, state_hash
from po_registry.hookspecs import hookimpl
from po_registry.registry import get_task
from po_registry.tasks import GuessNumber, guess_secret
from po_registry.trainer import micro_batch_loss, rollout, sampled_token_logps, scored_rollout


class Echo:
    """Answers every action with 'ok' and ends after three turns; turn rewards 0.1, 0.2, 1.0."""

    def reset(self, prompt):
        self.turns = 0

    def step(self, action):
        self.turns += 1
        rewards = {1: 0.1, 2: 0.2, 3: 1.0}
        return "ok\n", rewards[self.turns], self.turns == 3

    def state_key(self):
        return self.turns


def _trainer(po_trainer, environment, **kwargs):
    return po_trainer(rollout_func=multi_turn_rollout(environment, max_turns=4, max_tokens=64, step_timeout=2.0),
                      reward_funcs=[environment_reward], max_completion_length=3, **kwargs)


def _rows(trainer, groups=2):
    return [trainer.train_dataset[g] for g in range(groups) for _ in range(trainer.num_generations)]


def test_episode_layout(po_trainer):
    trainer = _trainer(po_trainer, Echo)
    out, rows = scored_rollout(trainer, _rows(trainer))
    tokenizer = trainer.processing_class
    ok = tokenizer("ok\n", add_special_tokens=False)["input_ids"]
    for i, row in enumerate(rows):
        ids = out["completion_ids"][i][out["completion_mask"][i].bool()].tolist()
        env = out["tool_mask"][i][out["completion_mask"][i].bool()].tolist()
        assert row["env_turns"] == 3 and row["env_done"] and row["env_failure"] == ""
        assert row["env_reward"] == pytest.approx(1.3)
        # three action turns, each followed by the environment's 'ok\n' (the last one also by EOS), masked out
        observed = [ids[j] for j in range(len(ids)) if env[j] == 0]
        assert observed == ok + ok + ok + [tokenizer.eos_token_id]
        turns = row["turn_index"]
        assert [t for t in turns if t >= 0] == sorted(t for t in turns if t >= 0)
        assert set(t for t in turns if t >= 0) == {0, 1, 2}
        assert all((t >= 0) == bool(m) for t, m in zip(turns, env))
        # each turn's reward sits on its last action token
        last = {k: max(j for j, t in enumerate(turns) if t == k) for k in range(3)}
        assert [row["turn_reward"][last[k]] for k in range(3)] == pytest.approx([0.1, 0.2, 1.0])
        assert sum(row["turn_reward"]) == pytest.approx(1.3)
        assert [row["turn_state"][last[k]] for k in range(3)] == [state_hash(k) for k in range(3)]
    assert out["po_rewards"].tolist() == pytest.approx([1.3] * len(rows))


class CaptureLogps:
    """A test component that keeps the policy log-probs of the loss for a gradient check."""

    seen = None

    @hookimpl
    def po_register_methods(self, register):
        register("capture-logps", components=["capture-logps"])

    @hookimpl
    def po_token_penalty(self, batch):
        batch.logps.retain_grad()
        CaptureLogps.seen = batch
        return None



@pytest.mark.parametrize("method", ["grpo", "clip-higher", "cispo", "gspo-token", "dr-grpo"])
def test_environment_tokens_carry_no_gradient(po_trainer, plugins, method):
    """Through the whole loss of each trajectory-side method: d loss / d log pi is 0 on every environment token
    and non-zero on every action token."""
    plugins("capture-logps", CaptureLogps())
    trainer = _trainer(po_trainer, Echo, methods=[method, "capture-logps"], num_iterations=2)
    out = rollout(trainer, _rows(trainer))
    out["advantages"] = torch.randn(out["advantages"].shape[0])  # every action token gets a non-zero gradient
    out["old_per_token_logps"] = sampled_token_logps(trainer, out)  # ratios at 1: inside every clip range
    loss = micro_batch_loss(trainer, dict(out))
    loss.backward()
    grad = CaptureLogps.seen.logps.grad
    actions = (out["completion_mask"] * out["tool_mask"]).bool()
    environment = out["completion_mask"].bool() & ~out["tool_mask"].bool()
    assert environment.any() and actions.any()
    assert (grad[environment] == 0).all(), "environment tokens received gradient"
    assert (grad[actions] != 0).all(), "an action token received no gradient"


class Raises(Echo):
    def step(self, action):
        raise RuntimeError("the environment broke")


class Hangs(Echo):
    def step(self, action):
        time.sleep(30)


class Malformed(Echo):
    def step(self, action):
        return "ok", float("nan"), False


@pytest.mark.parametrize("environment, kind", [(Raises, "error"), (Hangs, "timeout"), (Malformed, "malformed")])
def test_a_failing_environment_ends_the_episode_not_the_run(po_trainer, environment, kind):
    trainer = _trainer(po_trainer, environment, max_steps=1)
    started = time.monotonic()
    trainer.train()
    assert time.monotonic() - started < 25, "a hung environment held the run"
    logged = [row for row in trainer.state.log_history if "env/failures" in row]
    assert logged and logged[0]["env/failures"] == 8
    assert logged[0]["env/timeouts"] == (8 if kind == "timeout" else 0)
    out, rows = scored_rollout(trainer, _rows(trainer, groups=1))
    assert all(row["env_failure"] == kind and row["env_reward"] == 0.0 for row in rows)
    assert out["po_rewards"].abs().sum() == 0


def test_guess_environment():
    game = GuessNumber()
    prompt = "game 0042: guess 1-16\n"
    game.reset(prompt)
    secret = guess_secret(prompt)
    assert 1 <= secret <= 16 and secret == guess_secret(prompt)
    low_guess = 1 if secret > 1 else 2
    observation, reward, done = game.step(str(low_guess))
    assert (observation, done) == (("higher\n" if secret > 1 else "lower\n"), False) and reward == 0.0
    assert game.state_key() == ((2, 16) if secret > 1 else (1, 1))  # the range the answer leaves
    assert game.step("banana") == ("invalid\n", -0.1, False)
    # the same guess again: the answer already ruled it out, so it is wasted (-0.1) and the range stays
    observation, reward, done = game.step(str(low_guess))
    assert (observation, done) == (("higher\n" if secret > 1 else "lower\n"), False)
    assert reward == pytest.approx(-0.1) and game.state_key() == ((2, 16) if secret > 1 else (1, 1))
    observation, reward, done = game.step(str(secret))
    assert observation == "correct\n" and done and reward == pytest.approx(1.0 - 0.1 * 3)  # found at turn 4


def test_random_play_transcripts_follow_the_rules():
    for prompt, transcript in get_task("guess").problems(50, seed=3):
        game = GuessNumber()
        game.reset(prompt)
        turns = transcript.split("<eos>")
        for action, observation in zip(turns[:-1], turns[1:]):
            observation = observation.split("\n")[0] + "\n"
            assert game.step(action.split("\n")[-1])[0] == observation


def test_multi_turn_training_on_the_guess_environment(po_trainer):
    """A tiny model plays the embedded environment for two steps; the episode metrics are logged."""
    task = get_task("guess")
    trainer = po_trainer(rollout_func=task.rollout_function(), reward_funcs=[task.reward_function()],
                         max_completion_length=task.max_completion_length, max_steps=2)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "env/turns_mean" in row]
    assert len(logged) == 2
    for row in logged:
        assert 1 <= row["env/turns_mean"] <= task.max_turns and row["env/failures"] == 0
        assert "env/done" in row and "reward" in row


@pytest.mark.slow
def test_multi_turn_training_on_the_embedded_environment(po_trainer):
    """The warm-started embedded model (random-play transcripts) in the embedded environment."""
    task = get_task("guess")
    trainer = po_trainer(embedded=True, task="guess", rollout_func=task.rollout_function(),
                         reward_funcs=[task.reward_function()], max_completion_length=task.max_completion_length,
                         max_steps=2, learning_rate=1e-4)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "env/turns_mean" in row]
    assert len(logged) == 2
    for row in logged:
        assert 1 <= row["env/turns_mean"] <= task.max_turns and 0 <= row["env/done"] <= 1
        assert row["env/failures"] == 0
