"""Multi-turn rollouts with environments: the trajectory side widened from one completion to an interaction.

An environment is any object with

- ``reset(prompt) -> str | None``: start an episode for this prompt (the G samples of a prompt get G fresh
  environments reset with the same prompt); an optional first observation is appended to the prompt;
- ``step(action) -> (observation, reward, done)``: the model's turn (its text, special tokens removed) in, the
  environment's answer out; ``reward`` is this turn's reward;
- optionally ``state_key() -> hashable``: equal keys mean equal environment states (GiGPO's anchor states).

:func:`multi_turn_rollout` turns an environment factory into a TRL ``rollout_func``: each turn the policy generates
until its end-of-sequence token (at most ``max_completion_length`` tokens), the environment answers, and the
answer's tokens join the completion with ``env_mask`` 0, so they are context for later turns but carry no loss
(the trainer's loss mask is ``completion_mask * tool_mask``, which every trajectory-side stage sees). An episode ends
when the environment says done, after ``max_turns`` turns, or past ``max_tokens`` completion tokens.

An environment that raises, outlives ``step_timeout`` seconds, or returns something malformed ends its episode
with reward 0 and a logged failure, never the run; failures, timeouts, turns and success are metrics (``env/*``).

Per row, the rollout returns (reaching reward functions as keyword arguments and reward-side plugins as
``RewardBatch.rows``): ``env_reward`` (sum of turn rewards), ``env_turns``, ``env_done``, ``env_failure`` ("" or
the reason), and per completion token ``turn_index`` (turn k of the token, -1 for environment tokens),
``turn_reward`` (each turn's reward on its last action token, else 0) and ``turn_state`` (a 62-bit hash of the
environment's state when the turn began; -1 without ``state_key``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Environment(Protocol):
    def reset(self, prompt: str) -> str | None: ...

    def step(self, action: str) -> tuple[str, float, bool]: ...


class EnvironmentFailure(Exception):
    """An environment call that raised, timed out or returned something malformed."""

    def __init__(self, kind: str, detail: str):
        self.kind = kind
        super().__init__(f"{kind}: {detail}")


def call_all_with_timeout(calls: list[Callable[[], Any]], timeout: float | None) -> list[Any]:
    """Run every call in its own daemon thread, all at once, and wait at most ``timeout`` seconds in all. Each
    result is the call's value or an EnvironmentFailure: 'error' (it raised) or 'timeout' (still running; the thread
    is abandoned, not killed)."""
    outcomes: list[dict[str, Any]] = [{} for _ in calls]

    def target(call, outcome):
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - any failure of user code ends only its episode
            outcome["error"] = exc

    threads = [threading.Thread(target=target, args=(call, outcome), daemon=True, name="po-registry-environment")
               for call, outcome in zip(calls, outcomes)]
    for thread in threads:
        thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    results = []
    for thread, outcome in zip(threads, outcomes):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            results.append(EnvironmentFailure("timeout", f"no answer within {timeout} s"))
        elif "error" in outcome:
            error = outcome["error"]
            results.append(EnvironmentFailure("error", f"{type(error).__name__}: {error}"))
        else:
            results.append(outcome["value"])
    return results


def checked_step(result: Any) -> tuple[str, float, bool]:
    """Validate a ``step`` result: (str observation, finite number reward, bool done)."""
    if not isinstance(result, tuple | list) or len(result) != 3:
        raise EnvironmentFailure("malformed", f"step returned {type(result).__name__}, expected "
                                              "(observation, reward, done)")
    observation, reward, done = result
    if not isinstance(observation, str):
        raise EnvironmentFailure("malformed", f"observation is {type(observation).__name__}, expected str")
    if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
        raise EnvironmentFailure("malformed", f"reward {reward!r} is not a finite number")
    if not isinstance(done, bool):
        raise EnvironmentFailure("malformed", f"done is {type(done).__name__}, expected bool")
    return observation, float(reward), done


def state_hash(key: Any) -> int:
    """A stable 62-bit hash of a state key (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big") >> 2


@dataclass
class Episode:
    environment: Any
    prompt_ids: list[int]
    completion: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    turn_reward: list[float] = field(default_factory=list)
    turn_state: list[int] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    finished: bool = False  # no more turns (done, failed, or out of turns or tokens)
    failure: str = ""

    def add(self, ids: list[int], is_action: bool, state: int = -1) -> None:
        self.completion += ids
        self.env_mask += [int(is_action)] * len(ids)
        self.turn_index += [self.turns if is_action else -1] * len(ids)
        self.turn_reward += [0.0] * len(ids)
        self.turn_state += [state if is_action else -1] * len(ids)

    def answered(self, observation_ids: list[int], reward: float, done: bool, eos: int, max_turns: int,
                 max_tokens: int) -> None:
        """Record the environment's answer to the action just added: the turn's reward on its last action token,
        the observation (and EOS when the episode is over) as environment tokens; stop at the caps."""
        self.turn_reward[-1] = reward
        self.reward += reward
        self.turns += 1
        self.done = done
        self.add(observation_ids + ([eos] if done else []), is_action=False)
        self.finished = done or self.turns >= max_turns or len(self.completion) >= max_tokens

    def fail(self, failure: EnvironmentFailure, eos: int) -> None:
        self.failure, self.reward, self.finished = failure.kind, 0.0, True
        self.turn_reward = [0.0] * len(self.turn_reward)
        if not self.completion:
            self.add([eos], is_action=False)


def _state(environment) -> int:
    key = getattr(environment, "state_key", None)
    return state_hash(key()) if callable(key) else -1


def multi_turn_rollout(environment_factory: Callable[[], Any], max_turns: int = 8, max_tokens: int = 256,
                       step_timeout: float | None = 10.0):
    """A TRL ``rollout_func`` that plays each prompt as a multi-turn episode in a fresh environment.

    Use with :class:`~po_registry.PolicyOptimizationTrainer` (``rollout_func=multi_turn_rollout(...)``); each turn
    is generated by the trainer's own generation backend through ``trainer.generate_turn``."""
    if max_turns < 1 or max_tokens < 1:
        raise ValueError(f"max_turns and max_tokens must be >= 1, got {max_turns} and {max_tokens}")

    def rollout(prompts: list, trainer) -> dict[str, list]:
        tokenizer = trainer.processing_class
        eos = tokenizer.eos_token_id
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        episodes = [Episode(environment=None, prompt_ids=encode(prompt)) for prompt in prompts]

        def start(prompt: str):
            environment = environment_factory()
            first = environment.reset(prompt)
            if first is not None and not isinstance(first, str):
                raise TypeError(f"reset returned {type(first).__name__}, expected str or None")
            return environment, first

        for episode, started in zip(episodes, call_all_with_timeout([lambda p=p: start(p) for p in prompts],
                                                                  step_timeout)):
            if isinstance(started, EnvironmentFailure):
                episode.fail(started, eos)
                logger.warning("environment failed at reset (%s); the episode gets reward 0", started)
            else:
                episode.environment, first = started
                episode.prompt_ids += encode(first or "")

        for _ in range(max_turns):
            active = [e for e in episodes if not e.finished]
            if not trainer.any_process(bool(active)):
                break
            # Every process generates each round (a dummy context when it has no episode left), so that
            # generation backends with collectives (ZeRO-3, FSDP) stay in step.
            contexts = [e.prompt_ids + e.completion for e in active] or [episodes[0].prompt_ids]
            actions = trainer.generate_turn(contexts)
            texts = [tokenizer.decode(action, skip_special_tokens=True) for action in actions[: len(active)]]
            calls = [lambda env=e.environment, t=t: (_state(env), env.step(t)) for e, t in zip(active, texts)]
            for episode, action, result in zip(active, actions, call_all_with_timeout(calls, step_timeout)):
                state = -1 if isinstance(result, EnvironmentFailure) else result[0]
                episode.add(list(action), is_action=True, state=state)
                try:
                    if isinstance(result, EnvironmentFailure):
                        raise result
                    observation, reward, done = checked_step(result[1])
                except EnvironmentFailure as failure:
                    episode.fail(failure, eos)
                    logger.warning("environment failed at turn %d (%s); the episode gets reward 0",
                                   episode.turns + 1, failure)
                    continue
                episode.answered(encode(observation), reward, done, eos, max_turns, max_tokens)

        counts = {"env/failures": sum(bool(e.failure) for e in episodes),
                  "env/timeouts": sum(e.failure == "timeout" for e in episodes),
                  "env/done": sum(e.done for e in episodes),
                  "env/turns": sum(e.turns for e in episodes)}
        totals = trainer.sum_over_processes([float(v) for v in counts.values()] + [float(len(episodes))])
        for (name, _), total in zip(counts.items(), totals):
            trainer.log_metric(name + ("_mean" if name == "env/turns" else ""),
                               total / totals[-1] if name in ("env/turns", "env/done") else total)
        return {
            "prompt_ids": [e.prompt_ids for e in episodes],
            "completion_ids": [e.completion for e in episodes],
            "logprobs": None,
            "env_mask": [e.env_mask for e in episodes],
            "env_reward": [e.reward for e in episodes],
            "env_turns": [e.turns for e in episodes],
            "env_done": [e.done for e in episodes],
            "env_failure": [e.failure for e in episodes],
            "turn_index": [e.turn_index for e in episodes],
            "turn_reward": [e.turn_reward for e in episodes],
            "turn_state": [e.turn_state for e in episodes],
        }

    return rollout


def environment_reward(completions, env_reward, **kwargs) -> list[float]:
    """Reward function: the episode's summed turn rewards (0 for a failed episode)."""
    return [float(r) for r in env_reward]


def greedy_episodes(model, tokenizer, environment_factory, prompts: list[str], max_turns: int,
                    max_new_tokens: int, max_tokens: int = 256, batch_size: int = 256) -> dict[str, float]:
    """Play every prompt greedily: {"success": fraction done with positive reward, "turns": mean turns of the
    successful episodes, "reward": mean episode reward}. Environment failures count as unsuccessful."""
    import torch

    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        episodes = []
        for prompt in chunk:
            environment = environment_factory()
            first = environment.reset(prompt)
            ids = tokenizer(prompt + (first or ""), add_special_tokens=False)["input_ids"]
            episodes.append(Episode(environment=environment, prompt_ids=ids))
        for _ in range(max_turns):
            active = [e for e in episodes if not e.finished]
            if not active:
                break
            contexts = [e.prompt_ids + e.completion for e in active]
            width = max(len(c) for c in contexts)
            input_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=model.device)
            attention = (torch.arange(width, device=model.device).unsqueeze(0)
                         >= torch.tensor([width - len(c) for c in contexts], device=model.device).unsqueeze(1)).long()
            with torch.no_grad():
                output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                        do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for episode, row in zip(active, output[:, width:].tolist()):
                action = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                episode.add(action, is_action=True)
                try:
                    observation, reward, done = checked_step(episode.environment.step(
                        tokenizer.decode(action, skip_special_tokens=True)))
                except Exception:  # noqa: BLE001 - a failing environment is an unsuccessful episode
                    episode.finished, episode.failure = True, "error"
                    continue
                episode.answered(tokenizer(observation, add_special_tokens=False)["input_ids"], reward, done,
                                 tokenizer.eos_token_id, max_turns, max_tokens)
        results += episodes
    model.train(was_training)
    won = [e for e in results if e.done and not e.failure and e.reward > 0]
    return {"success": len(won) / max(len(results), 1),
            "turns": sum(e.turns for e in won) / max(len(won), 1),
            "reward": sum(e.reward for e in results) / max(len(results), 1)}
