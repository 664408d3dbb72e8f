"""A gradient oracle that does not trust the code: exact expected gradients on a policy small enough to enumerate.

The policy: a vocabulary of three tokens ``a``, ``b`` and end-of-sequence, completions of at most three tokens, and a
per-position logit table theta (3 x 3) as its only parameters. Every completion can be listed (15 of them), so the
objective a method claims to follow, for example J(theta) = E[R] - beta KL(p_theta || p_ref), is a finite sum whose
gradient autograd gives exactly. On the other side the oracle samples batches of groups from the policy, runs them
through the method's assembled :class:`~po_registry.Pipeline` (the trainer's own stages: shaping, dense rewards,
advantages, selection, the loss), backpropagates the loss to theta and averages over batches.

Each method declares, when it registers (``register(..., objective=Objective(...))``), the objective it claims and
the biases it has by design (group std scaling, length normalisation, a KL taken token by token, a mask, ...). The
oracle turns the declaration into the exact large-batch expectation of the loss gradient, enumerating every group of
G completions where the advantage depends on the group, and checks the measured mean against it: an unbiased
method converges to the objective's gradient (the error shrinks as 1/sqrt(batches)), a biased one to the declared
bias. Three set-ups: ``standard``; ``environment`` (the middle token comes from an environment and carries no loss,
and one episode in ten ends before its first token: a hole in the mask and fully masked rows); ``equal-rewards``
(the environment's completions, every one rewarded alike: the policy gradient must vanish, which isolates the KL,
entropy and dense-reward terms). And a fourth, ``turns``, for the methods that need multi-turn episodes (declared with
``setups=("turns",)``): the environment world read as two turns, token 0 the policy's turn 0, token 1 the
environment's reply, token 2 the policy's turn 1, each turn with its own reward (:func:`turn_rewards`; the episode's
reward is their sum) and the state it began in (the prefix so far), in the per-token row fields a multi-turn rollout
gives (``turn_index``, ``turn_reward``, ``turn_state``: :mod:`po_registry.agentic`).

    python -m po_registry.oracle grpo dr-grpo      # the oracle's verdict for these methods
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from .context import AuxiliaryModel
from .objectives import (  # the declaration vocabulary, re-exported: plugins declare with po_registry.oracle's names
    ADVANTAGES, AGGREGATIONS, DIVERGENCES, PENALTIES, Rule, Term, Dense, Objective, in_loss_divergence, top_entropy_tokens, NotModelled,
)

def process_supervision(option: str = "process_reward_function") -> Rule:
    """DeepSeekMath's process supervision as group credit: the step rewards of the function named by ``option``
    (one per token, or one per step, a step ending at a token that holds a newline or at the completion's end; a
    completion without tokens has no step) are normalised over all steps of the group's completions,
    r~ = (r - mean) / (std + 1e-4), and token t gets sum_{steps j ending at or after t} r~_j."""

    def credit(world: World, groups: torch.Tensor, options) -> torch.Tensor:
        import importlib

        module, _, name = options[option].partition(":")
        function = getattr(importlib.import_module(module), name)
        rows = [list(tokens) for tokens in world.sequences]
        texts = TinyTokenizer().batch_decode(rows, skip_special_tokens=True)
        scores = function(completions=texts, completion_ids=rows)
        rewards, steps = torch.zeros(len(rows), LENGTH), torch.zeros(len(rows), LENGTH)
        for s, (tokens, score) in enumerate(zip(rows, scores)):
            if not tokens:
                continue
            ends = list(range(len(tokens))) if len(score) == len(tokens) else \
                [t for t, token in enumerate(tokens) if "\n" in TOKENS[token]]
            if len(score) != len(tokens) and (not ends or ends[-1] != len(tokens) - 1):
                ends.append(len(tokens) - 1)
            if len(score) != len(ends):
                raise NotModelled(f"the step function gives {len(score)} rewards for {len(ends)} steps")
            rewards[s, ends], steps[s, ends] = torch.tensor(score, dtype=torch.float32), 1.0
        r, marks = rewards[groups], steps[groups]  # (M, G, T)
        count = marks.sum((1, 2), keepdim=True)
        mean = (r * marks).sum((1, 2), keepdim=True) / count.clamp(min=1.0)
        std = (((r - mean) ** 2 * marks).sum((1, 2), keepdim=True) / (count - 1).clamp(min=1.0)).sqrt()
        normalised = (r - mean) / (std + 1e-4) * marks
        return normalised.flip(-1).cumsum(-1).flip(-1)

    return Rule("process rewards z-scored over the group's steps", credit)


# -- turn-level credit (the turns set-up), from the papers' formulas on the enumerated episodes ---------------------


def _normalise_over(values: torch.Tensor, members: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(v - mean) / (std + eps) over the members of the last dimension (Bessel std; 0 where fewer than two, and
    off the members). ``values``, ``members``: (..., n) or, for per-entry member sets, (..., n, n)."""
    members = members.float()
    if members.dim() == values.dim():  # one member set for every entry
        members = members.unsqueeze(-2).expand(*members.shape[:-1], members.shape[-1], members.shape[-1]) * \
            members.unsqueeze(-1)
    pool = values.unsqueeze(-2)  # (..., 1, n): every entry's members
    count = members.sum(-1)
    mean = (members * pool).sum(-1) / count.clamp(min=1.0)
    std = ((members * (pool - mean.unsqueeze(-1)) ** 2).sum(-1) / (count - 1).clamp(min=1.0)).sqrt()
    return torch.where(count >= 2, (values - mean) / (std + eps), 0.0)


def _turn_tokens(world: World, groups: torch.Tensor, per_turn: torch.Tensor) -> torch.Tensor:
    """(M, G, K) values per turn -> (M, G, T) on each turn's tokens (0 on environment tokens and padding)."""
    index = world.turn_index[groups]  # (M, G, T)
    return torch.where(index >= 0, per_turn.gather(2, index.clamp(min=0)), 0.0)


def _discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """(..., K) G_k = sum_{k' >= k} gamma^(k' - k) r_k'."""
    returns, running = torch.zeros_like(rewards), torch.zeros_like(rewards[..., 0])
    for k in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., k] + gamma * running
        returns[..., k] = running
    return returns


def mt_grpo_turn_credit(coef: str = "turn_advantage_coef") -> Rule:
    """MT-GRPO's turn term (arXiv 2505.11821): lambda A^turn_{i,k} on the tokens of every turn k that is not its
    episode's final one, A^turn_{i,k} = (r_{i,k} - mean) / (std + 1e-4) over the group's episodes in which turn k is
    not the final turn (0 with fewer than two); lambda the option ``coef``. Added to the outcome z-score on every
    token, it rewards each intermediate turn's own reward a second time: a heuristic, biased from E[sum_k r_k]."""

    def credit(world: World, groups: torch.Tensor, options) -> torch.Tensor:
        exists = world.turn_exists[groups]  # (M, G, K)
        last = exists.long().sum(2, keepdim=True) - 1
        intermediate = torch.arange(TURNS).view(1, 1, -1) < last
        rewards = world.turn_reward[groups].transpose(1, 2)  # (M, K, G): normalise over the group
        turn = _normalise_over(rewards, intermediate.transpose(1, 2)).transpose(1, 2) * intermediate
        return options[coef] * _turn_tokens(world, groups, turn)

    return Rule("MT-GRPO turn term: intermediate turns' own rewards z-scored again", credit)


def gigpo_step_credit(weight: str = "gigpo_step_weight", gamma: str = "gigpo_gamma") -> Rule:
    """GiGPO's step term (arXiv 2505.10978): omega A^step_{i,k}, the discounted return from step k,
    G_{i,k} = sum_{k' >= k} gamma^(k' - k) r_{i,k'}, z-scored within its anchor group (the steps of the group's
    episodes that began in the same environment state; 0 for a state seen once); omega, gamma the options
    ``weight``, ``gamma``. A second, state-conditioned advantage on top of the episode z-score: the steps' returns
    counted again (discounted), a bias from E[sum_k r_k]."""

    def credit(world: World, groups: torch.Tensor, options) -> torch.Tensor:
        M, G = groups.shape
        returns = _discounted_returns(world.turn_reward[groups], options[gamma]) * world.turn_exists[groups]
        states, exists = world.turn_state[groups].view(M, G * TURNS), world.turn_exists[groups].view(M, G * TURNS)
        anchors = (states.unsqueeze(2) == states.unsqueeze(1)) & exists.unsqueeze(2) & exists.unsqueeze(1)
        step = _normalise_over(returns.view(M, G * TURNS), anchors).view(M, G, TURNS) * world.turn_exists[groups]
        return options[weight] * _turn_tokens(world, groups, step)

    return Rule("GiGPO step term: discounted step returns z-scored within anchor states", credit)


def turn_return_credit(gamma: str = "turn_return_gamma") -> Rule:
    """Reward-to-go over turns against the same turn in the group: token t of turn k gets
    (G_{i,k} - mean_j G_{j,k}) / (std_j G_{j,k} + 1e-4), G the return discounted by the option ``gamma`` over turns
    and the mean and Bessel std over the group's episodes j that play a turn k (0 with fewer than two). With
    gamma = 1 a reward-to-go REINFORCE with a per-turn group baseline and std scaling; gamma < 1 discounts the later
    turns' rewards."""

    def credit(world: World, groups: torch.Tensor, options) -> torch.Tensor:
        exists = world.turn_exists[groups]  # (M, G, K)
        returns = _discounted_returns(world.turn_reward[groups], options[gamma]) * exists
        advantage = _normalise_over(returns.transpose(1, 2), exists.transpose(1, 2)).transpose(1, 2) * exists
        return _turn_tokens(world, groups, advantage)

    return Rule("turn reward-to-go z-scored over the group's same-turn returns (group std scaling)", credit)


# -- the enumerable world ---------------------------------------------------------------------------------------

TOKENS = ("a", "b", "</s>")
A, B, EOS = 0, 1, 2
LENGTH = 3  # max_completion_length
PROMPT = (A,)
GROUP_SIZE = 4
# Per-position logits (position x token): the policy at which the gradient is taken, the reference, the teacher.
POLICY_LOGITS = ((0.2, 0.0, -0.2), (0.2, -0.3, 0.1), (-0.3, 0.2, 0.4))
REFERENCE_LOGITS = ((0.3, -0.6, -0.9), (1.1, -0.3, -0.3), (2.4, 0.0, -1.0))
TEACHER_LOGITS = ((1.0, -0.6, 0.0), (-0.6, 0.9, 0.1), (0.7, -0.5, 0.2))
ENVIRONMENT = {1: (0.7, 0.3)}  # environment set-up: position 1 is an environment token, P(a), P(b)
EMPTY_EPISODES = 0.1  # environment set-up: episodes that end before their first token
SETUPS = ("standard", "environment", "equal-rewards")  # every single-turn method runs on these
TURN_SETUPS = ("turns",)  # for methods that declare setups=("turns",): multi-turn episodes
ALL_SETUPS = SETUPS + TURN_SETUPS
TURNS = 2  # turns set-up: turn 0 at position 0, the environment's reply at 1, turn 1 at 2


def score_reward(tokens: tuple[int, ...]) -> float:
    """Reward function 1: #a - #b (both signs)."""
    return float(tokens.count(A) - tokens.count(B))


def count_reward(tokens: tuple[int, ...]) -> float:
    """Reward function 1 for methods defined on rewards >= 0: #a."""
    return float(tokens.count(A))


def format_reward(tokens: tuple[int, ...]) -> float | None:
    """Reward function 2: 0.5 for a completion that ends with end-of-sequence, None (unscored) otherwise."""
    return 0.5 if tokens and tokens[-1] == EOS else None


def constant_reward(tokens: tuple[int, ...]) -> float:
    """Reward function 1 of the equal-rewards set-up."""
    return 1.0


def unscored_reward(tokens: tuple[int, ...]) -> None:
    """Reward function 2 of the equal-rewards set-up: never scores."""
    return None


def turn_rewards(tokens: tuple[int, ...]) -> tuple[float, ...]:
    """The turns set-up's reward of each turn of an episode (one per turn the policy played). Turn 0: 0.5 for
    ``a``, -0.5 for ``b``, 0.25 for ending the episode at once. Turn 1 (after the environment's reply e): 1 for
    repeating e, -0.5 for the other token, 0 for end-of-sequence, plus 1.5 when turn 0 was ``b``: a delayed reward
    that turn 0's choice earns only at turn 1 (so credit that stops at a turn's own reward is visibly wrong: ``b``
    loses at turn 0 and wins over the episode)."""
    rewards = []
    if tokens:
        rewards.append({A: 0.5, B: -0.5, EOS: 0.25}[tokens[0]])
    if len(tokens) == LENGTH:
        first, reply, last = tokens
        rewards.append((1.0 if last == reply else 0.0 if last == EOS else -0.5) + (1.5 if first == B else 0.0))
    return tuple(rewards)


def episode_reward(tokens: tuple[int, ...]) -> float:
    """Reward function 1 of the turns set-up: the episode's reward, the sum of its turn rewards (``env_reward``)."""
    return float(sum(turn_rewards(tokens)))


def a_steps(completions, completion_ids, **kwargs) -> list[list[float]]:
    """A step-reward function for the oracle's completions (``po_registry.oracle:a_steps``): per token, 1 for ``a``,
    -0.5 otherwise; an empty completion has no step."""
    return [[1.0 if token == A else -0.5 for token in ids] for ids in completion_ids]


class TinyTokenizer:
    """Decodes the oracle's token ids (for plugins that read completion texts)."""

    pad_token_id = eos_token_id = EOS

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(TOKENS[i] for i in ids if not (skip_special_tokens and i == EOS))

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]


class World:
    """Every completion of a set-up with its probability under a logit table, rewards and per-token values.

    ``S`` completions, ``T = LENGTH`` positions. Tensors are detached unless a function says otherwise."""

    def __init__(self, setup: str = "standard", non_negative: bool = False, theta: torch.Tensor | None = None):
        if setup not in ALL_SETUPS:
            raise ValueError(f"unknown oracle set-up {setup!r}; expected one of {', '.join(ALL_SETUPS)}")
        self.setup = setup
        self.environment = ENVIRONMENT if setup != "standard" else {}
        self.sequences = list(self._completions(()))
        empty = EMPTY_EPISODES if setup != "standard" else 0.0
        if empty:
            self.sequences.append(())
        S, T = len(self.sequences), LENGTH
        self.max_completion_length = LENGTH
        self.theta = (torch.tensor(POLICY_LOGITS) if theta is None else theta.detach().clone()).requires_grad_()
        self.reference = torch.tensor(REFERENCE_LOGITS)
        self.teacher = torch.tensor(TEACHER_LOGITS)
        self.ids = torch.full((S, T), EOS, dtype=torch.long)
        self.completion_mask = torch.zeros(S, T)
        self.policy_positions = torch.zeros(S, T)  # 1 where the policy chose the token (0: environment, padding)
        for s, tokens in enumerate(self.sequences):
            for t, token in enumerate(tokens):
                self.ids[s, t] = token
                self.completion_mask[s, t] = 1.0
                self.policy_positions[s, t] = 0.0 if t in self.environment else 1.0
        self.loss_mask = self.policy_positions  # completion mask times tool mask
        self.lengths = self.completion_mask.sum(1).long()  # completion tokens, environment tokens included
        self.loss_tokens = self.loss_mask.sum(1)
        self.truncated = torch.tensor([len(x) == T and x[-1] != EOS for x in self.sequences])
        self.empty = torch.tensor([len(x) == 0 for x in self.sequences])
        environment = torch.zeros(S)
        for s, tokens in enumerate(self.sequences):
            environment[s] = sum(math.log(self.environment[t][token]) for t, token in enumerate(tokens)
                                 if t in self.environment)
        self.environment_logp = environment + torch.where(self.empty, math.log(empty) if empty else 0.0,
                                                          math.log1p(-empty))
        first = count_reward if non_negative else score_reward
        second = format_reward
        if setup == "equal-rewards":  # every group degenerate: only the terms besides the policy gradient remain
            first, second = constant_reward, unscored_reward
        if setup == "turns":  # the outcome is the sum of the turn rewards
            first, second = episode_reward, unscored_reward
        self.reward_names = [first.__name__, second.__name__]
        self.rewards = torch.tensor([[first(x), math.nan if second(x) is None else second(x)]
                                     for x in self.sequences])
        self.reward_weights = torch.ones(2)
        self.options: Mapping[str, Any] = {}  # the method's resolved options, for the declaration's rules
        self._turns()
        self.refresh()

    def _turns(self) -> None:
        """The turn structure (turns set-up; elsewhere no turns and rows without fields): ``turn_index`` (S, T)
        turn of each token (-1: environment token or padding), ``turn_reward`` (S, K) and ``turn_exists`` (S, K),
        ``turn_state`` (S, K) the state each turn began in (the hash of the prefix so far, as a rollout's
        ``state_key``), and ``rows``: each completion's row fields as :func:`po_registry.agentic.multi_turn_rollout`
        returns them (per token: turn index, the turn's reward on its last action token, the turn's start state)."""
        from .agentic import state_hash

        S, K = len(self.sequences), TURNS
        self.turn_index = torch.full((S, LENGTH), -1, dtype=torch.long)
        self.turn_reward = torch.zeros(S, K)
        self.turn_exists = torch.zeros(S, K, dtype=torch.bool)
        self.turn_state = torch.full((S, K), -1, dtype=torch.long)
        self.rows: list[dict] = [{} for _ in self.sequences]
        if self.setup != "turns":
            return
        for s, tokens in enumerate(self.sequences):
            rewards = turn_rewards(tokens)
            row = {"turn_index": [], "turn_reward": [], "turn_state": [], "env_reward": sum(rewards),
                   "env_turns": len(rewards)}
            turn = 0
            for t, token in enumerate(tokens):
                if t in self.environment:
                    row["turn_index"].append(-1), row["turn_reward"].append(0.0), row["turn_state"].append(-1)
                    continue
                state = state_hash(("oracle", PROMPT, tokens[:t]))
                self.turn_index[s, t], self.turn_reward[s, turn] = turn, rewards[turn]
                self.turn_exists[s, turn], self.turn_state[s, turn] = True, state
                row["turn_index"].append(turn), row["turn_reward"].append(rewards[turn])
                row["turn_state"].append(state)
                turn += 1
            self.rows[s] = row

    def _completions(self, prefix: tuple[int, ...]):
        t = len(prefix)
        if t == LENGTH:
            yield prefix
            return
        for token in ((A, B) if t in self.environment else (A, B, EOS)):
            if token == EOS:
                yield prefix + (token,)
            else:
                yield from self._completions(prefix + (token,))

    # -- functions of the tables ----------------------------------------------------------------------------------

    def token_logps(self, table: torch.Tensor) -> torch.Tensor:
        """(S, T) log-probability of each completion token under a table (with the table's gradient)."""
        logps = torch.log_softmax(table, dim=-1)  # (T, V)
        return logps.unsqueeze(0).expand(len(self.sequences), -1, -1).gather(2, self.ids.unsqueeze(2)).squeeze(2)

    def sequence_logp(self, table: torch.Tensor) -> torch.Tensor:
        """(S,) log p(completion): the policy's tokens under ``table``, the environment's under the environment."""
        return (self.token_logps(table) * self.policy_positions).sum(1) + self.environment_logp

    def refresh(self) -> None:
        """Recompute the detached quantities at the current theta."""
        with torch.no_grad():
            self.p = self.sequence_logp(self.theta).exp()
            self.logps = self.token_logps(self.theta)
            self.ref_logps = self.token_logps(self.reference)
            self.teacher_logps = self.token_logps(self.teacher)
            probs = torch.softmax(self.theta, -1)
            self.position_entropy = -(probs * probs.log()).sum(-1)  # (T,): the logits do not depend on the prefix
            self.entropies = self.position_entropy.expand(len(self.sequences), -1).clone()

    def teacher_log_ratio(self, clip: float = 0.0) -> torch.Tensor:
        """(S, T) r_t = log pi_T(y_t) - log pi(y_t) on the loss tokens, clipped to [-clip, clip] when clip > 0."""
        ratio = (self.teacher_logps - self.logps) * self.loss_mask
        return ratio.clamp(-clip, clip) if clip > 0 else ratio

    def weighted_reward(self, shaping=()) -> torch.Tensor:
        """(S,) R = sum_k w_k r_k with an unscored (None) reward counting 0 (TRL's nansum), plus the shaping."""
        total = (self.rewards * self.reward_weights).nansum(1)
        for rule in shaping:
            total = total + torch.as_tensor(rule.function(self, self.options), dtype=total.dtype)
        return total

    def top_entropy_mask(self, quantile: float) -> torch.Tensor:
        """(S, T) 1 on the loss tokens whose entropy reaches the (1 - quantile) quantile of all loss tokens' entropies
        (the limit of the batch quantile: its atoms are the positions, weighted by how often they are loss tokens)."""
        weights = (self.p.unsqueeze(1) * self.loss_mask).sum(0)  # (T,) expected loss tokens at each position
        order = torch.argsort(self.position_entropy)
        cumulative = torch.cumsum(weights[order], 0) / weights.sum()
        level = 1.0 - quantile
        if (cumulative - level).abs().min() < 0.02:
            raise NotModelled(f"the {level:g} entropy quantile falls on a boundary between positions")
        threshold = self.position_entropy[order][int((cumulative < level).sum())]
        return (self.entropies >= threshold).float() * self.loss_mask

    def values(self, rewards: torch.Tensor) -> torch.Tensor:
        """(S, T) V_t = E[R | the completion's first t tokens] under the current policy (0 past the end)."""
        values = torch.zeros(len(self.sequences), LENGTH)
        for s, tokens in enumerate(self.sequences):
            for t in range(len(tokens)):
                same = torch.tensor([x[:t] == tokens[:t] and len(x) > t for x in self.sequences])
                values[s, t] = (self.p * rewards * same).sum() / (self.p * same).sum()
        return values

    def greedy(self) -> int:
        """Index of the greedy (argmax) completion; environment tokens at their most likely value."""
        tokens: tuple[int, ...] = ()
        while len(tokens) < LENGTH and (not tokens or tokens[-1] != EOS):
            t = len(tokens)
            token = max(range(2), key=lambda v: self.environment[t][v]) if t in self.environment else \
                int(self.theta[t].argmax())
            tokens += (token,)
        return self.sequences.index(tokens)


# -- the models the oracle provides -----------------------------------------------------------------------------


class TableLM(torch.nn.Module):
    """A causal LM whose logits are a per-position table: the logits predicting completion token t are row t."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, **kwargs):
        positions = (torch.arange(input_ids.shape[1]) + 1 - len(PROMPT)).clamp(0, LENGTH - 1)
        logits = self.table[positions].unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class ExactCritic(torch.nn.Module):
    """A token-value model that knows the true value: its output before completion token t of a row is
    E[R | the row's first t tokens] (looked up by the row's completion tokens)."""

    def __init__(self, world: World, values: torch.Tensor):
        super().__init__()
        self.index = {tokens: s for s, tokens in enumerate(world.sequences)}
        self.table = values

    def forward(self, input_ids, attention_mask=None, **kwargs):
        completion = input_ids[:, len(PROMPT):]
        mask = attention_mask[:, len(PROMPT):] if attention_mask is not None else torch.ones_like(completion)
        scores = torch.zeros(input_ids.shape[0], input_ids.shape[1], 1)
        width = min(LENGTH, completion.shape[1])
        for row, (ids, row_mask) in enumerate(zip(completion.tolist(), mask.tolist())):
            s = self.index.get(tuple(i for i, m in zip(ids, row_mask) if m))
            if s is not None:  # a row dropped from the loss (its mask zeroed) has no value to give
                scores[row, len(PROMPT) - 1 : len(PROMPT) - 1 + width, 0] = self.table[s, :width]
        return SimpleNamespace(logits=scores)


# -- declarations: the baseline's, a method's --------------------------------------------------------------------

AGGREGATION_BY_LOSS_TYPE = {"grpo": "length", "sapo": "length", "bnpo": "tokens", "dapo": "tokens",
                            "cispo": "tokens", "vespo": "tokens", "dr_grpo": "max_length", "luspo": "sequences"}


def baseline_advantage(args) -> Objective:
    """The group advantage of the baseline under ``args`` (for a method that computes it, too): the group z-score
    with ``scale_rewards="group"``, R - mean otherwise (times a batch std: a free scale, with ``"batch"``)."""
    if args.multi_objective_aggregation != "sum_then_normalize":
        return Objective(not_applicable="multi_objective_aggregation=normalize_then_sum (a batch z-score of "
                                        "per-reward group z-scores) is not modelled")
    if args.scale_rewards == "group":
        return Objective(advantage="zscore")
    return Objective(advantage="mean", scale="free" if args.scale_rewards == "batch" else None)


def baseline_objective(args, components) -> Objective:
    """What the ``grpo`` components still in a pipeline do under ``args``: the baseline's claim is E[R], minus
    beta KL(p_theta || p_ref) with the reference KL in the loss (k3, times pi/pi_old with
    ``use_bias_correction_kl``, which on-policy follows the reverse KL token by token)."""
    parts = Objective(reward=1.0, log_reward=False, scale="exact", rewards="any")
    if "group-advantage" in components:
        parts = parts.then(baseline_advantage(args))
    if "loss-aggregation" in components:
        parts = parts.then(Objective(aggregation=AGGREGATION_BY_LOSS_TYPE[args.loss_type]))
    if "reference-kl" in components and args.beta:
        kind = in_loss_divergence("k3", args.use_bias_correction_kl)
        parts = parts.then(Objective(kl_reference=args.beta, terms=(Term(kind, args.beta),)))
        if args.use_bias_correction_kl and args.importance_sampling_level == "sequence":
            parts = parts.then(Objective(not_applicable="the reference KL corrected by a sequence-level ratio is "
                                                        "not modelled"))
    if "entropy-mask" in components and args.top_entropy_quantile < 1.0:
        parts = parts.then(Objective(token_weights=(top_entropy_tokens(args.top_entropy_quantile),)))
    if "entropy-bonus" in components and args.entropy_coef:
        quantile = args.top_entropy_quantile if "entropy-mask" in components and args.top_entropy_quantile < 1 \
            else None
        parts = parts.then(Objective(terms=(Term("entropy", args.entropy_coef, quantile=quantile),)))
    if args.mask_truncated_completions:
        parts = parts.then(Objective(drop_truncated=True))
    return parts


def declared_objective(methods: list[str], args, assembly, registry) -> Objective:
    """The full declaration of the chosen ``methods`` under ``args`` and the assembly's options: the baseline's,
    then, for each method, those of the methods it is built from (components registered as methods) and its own."""
    from .pipeline import parse_method

    declaration = baseline_objective(args, assembly.components)
    if any(parse_method(spec)[1] is not None for spec in methods):
        return declaration.then(Objective(not_applicable="a selector takes part of a method, whose declaration "
                                                         "describes the whole method"))
    names = []
    for method in methods:
        parts = [name for name in registry.method(method).components if name != method and name in registry.methods]
        names += [name for name in [*parts, method] if name not in names]
    for name in names:
        own = registry.methods[name].objective
        if own is None:
            return declaration.then(Objective(not_applicable=f"method {name!r} declares no objective"))
        declaration = declaration.then(own(args, assembly.options) if callable(own) else own)
    return declaration


def describe_claim(objective: Objective) -> str:
    """The claimed objective as a formula."""
    def times(coef: float, what: str) -> str:
        return what if coef == 1 else f"{coef:g} {what}"

    parts = [times(objective.reward, "log E[R]" if objective.log_reward else "E[R]")] if objective.reward else []
    for coef, what in ((objective.kl_reference, "KL(pi||ref)"), (objective.kl_teacher, "KL(pi||teacher)")):
        if coef:
            parts.append(times(coef, what))
    text = " - ".join(parts) if objective.reward else "- " + " - ".join(parts)
    if objective.shaping:
        text += " (R with " + ", ".join(rule.label for rule in objective.shaping) + ")"
    return text


def describe_bias(objective: Objective) -> str:
    """The biases by design the declaration implies (how its estimator differs from its claim), or 'none'."""
    labels = []
    if objective.advantage == "zscore":
        labels.append("group std scaling")
    elif isinstance(objective.advantage, Rule):
        labels.append(objective.advantage.label)
    if objective.aggregation == "length":
        labels.append("length normalisation")
    names = {"reverse_kl": "KL(pi||{})", "forward_kl": "KL({}||pi)", "squared_log_ratio": "E[log^2(pi/{})/2]"}
    for term in objective.terms:
        if term.kind == "zero":
            labels.append(f"KL to the {term.against} with zero expected gradient")
        elif term.kind in names:
            labels.append("token-level " + names[term.kind].format("ref" if term.against == "reference" else "T"))
        elif term.kind == "entropy":
            labels.append(f"entropy bonus {term.coef:g}")
        else:
            labels.append(f"NLL of positive samples {term.coef:g}")
    for dense in objective.dense:
        if dense.gamma < 1:
            labels.append(f"{dense.against} KL reward returned with gamma={dense.gamma:g}")
        if dense.estimator != "k1":
            labels.append(f"{dense.estimator} KL reward")
        if dense.clip > 0:
            labels.append(f"{dense.against} KL reward clipped at {dense.clip:g}")
    labels += [rule.label for rule in (*objective.group_dense, *objective.token_weights)]
    if objective.drop_truncated:
        labels.append("truncated completions dropped")
    if objective.drop_equal_groups:
        labels.append("equal-reward groups dropped")
    if objective.unmodelled:
        labels.append(f"unmodelled: {objective.unmodelled}")
    return ", ".join(labels) or "none"


# -- the exact side ---------------------------------------------------------------------------------------------


def claimed_gradient(world: World, objective: Objective) -> torch.Tensor:
    """The exact gradient of the claimed J(theta), summed over every completion."""
    theta = world.theta
    logp = world.sequence_logp(theta)
    p = logp.exp()
    reward = world.weighted_reward(objective.shaping)
    expected = (p * reward).sum()
    J = (objective.reward or 0.0) * (torch.log(expected) if objective.log_reward else expected)
    for coef, table in ((objective.kl_reference, world.reference), (objective.kl_teacher, world.teacher)):
        if coef:
            J = J - coef * (p * (logp - world.sequence_logp(table))).sum()
    (grad,) = torch.autograd.grad(J, theta, allow_unused=True)
    return torch.zeros_like(theta) if grad is None else grad


def _group_advantage(rule, rewards: torch.Tensor, lengths: torch.Tensor, options, greedy: torch.Tensor):
    G = rewards.shape[1]
    mean = rewards.mean(1, keepdim=True)
    if isinstance(rule, Rule):
        return rule.function(rewards, lengths, options)
    if rule == "none":
        return rewards
    if rule == "zero":
        return torch.zeros_like(rewards)
    if rule == "mean":
        return rewards - mean
    if rule == "leave_one_out":
        return rewards - (rewards.sum(1, keepdim=True) - rewards) / (G - 1)
    if rule == "zscore":
        return (rewards - mean) / (rewards.std(1, keepdim=True) + 1e-4)  # Bessel-corrected, as GRPO
    if rule == "greedy":
        return rewards - greedy
    raise NotModelled(f"no advantage rule declared (got {rule!r})")


def _divergence(kind: str, logits: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(T,) a divergence of softmax(logits) from softmax(table) at each position."""
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(table, -1)
    p, q = logp.exp(), logq.exp()
    if kind == "reverse_kl":
        return (p * (logp - logq)).sum(-1)
    if kind == "forward_kl":
        return (q * (logq - logp)).sum(-1)
    if kind == "squared_log_ratio":
        return (p * 0.5 * (logp - logq) ** 2).sum(-1)
    return torch.zeros(logits.shape[0])


def _sampled_kl(estimator: str, logps: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    log_ratio = other - logps  # log q/pi of the sampled token
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return log_ratio.exp() - 1 - log_ratio


def declared_gradient(world: World, objective: Objective, options,
                      max_completion_length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact large-batch expectation of the ascent direction -grad(loss) the declaration implies, as
    (the part with a free positive scale, the part with an exact scale). Every group of G completions is enumerated
    (S^G of them) where advantages or row selection depend on the group."""
    S, T, G = len(world.sequences), LENGTH, GROUP_SIZE
    groups = torch.tensor(list(itertools.product(range(S), repeat=G)))  # (M, G)
    probability = world.p[groups].prod(1)  # (M,)
    reward = world.weighted_reward(objective.shaping)
    R = reward[groups]
    keep = torch.ones_like(R)
    if objective.drop_truncated:
        keep = keep * ~world.truncated[groups]
    if objective.drop_equal_groups:
        keep = keep * (R.std(1, keepdim=True) > 0)
    advantage = _group_advantage(objective.advantage, R, world.lengths[groups].float(), options,
                                 reward[world.greedy()])
    if objective.aggregation == "length":
        row_weight = torch.where(world.loss_tokens > 0, 1.0 / world.loss_tokens.clamp(min=1.0), 0.0)
    else:
        row_weight = torch.ones(S)
    if objective.aggregation not in AGGREGATIONS:
        raise NotModelled("no loss aggregation declared")

    def per_sequence(values: torch.Tensor) -> torch.Tensor:  # (M, G[, T]) -> (S[, T]) expectation per row
        weighted = probability.view(-1, *[1] * (values.dim() - 1)) * values
        out = torch.zeros(S, *values.shape[2:])
        return out.index_add_(0, groups.flatten(), weighted.flatten(0, 1))

    included = per_sequence(keep)  # G p_s P(row kept | it is s)
    credit = per_sequence(keep * advantage).unsqueeze(1) * world.loss_mask  # (S, T)
    for rule in objective.group_dense:
        credit = credit + per_sequence(keep.unsqueeze(2) * rule.function(world, groups, options)) * world.loss_mask
    for dense in objective.dense:
        other = world.ref_logps if dense.against == "reference" else world.teacher_logps
        estimate = _sampled_kl(dense.estimator, world.logps, other)
        if dense.clip > 0:
            estimate = estimate.clamp(-dense.clip, dense.clip)
        per_token = -dense.coef * estimate * world.loss_mask
        returns = torch.zeros_like(per_token)
        running = torch.zeros(S)
        for t in range(T - 1, -1, -1):
            running = per_token[:, t] + dense.gamma * running
            returns[:, t] = running
        credit = credit + included.unsqueeze(1) * returns * world.loss_mask
    weight = torch.ones(S, T)
    for rule in objective.token_weights:
        weight = weight * torch.as_tensor(rule.function(world, options), dtype=weight.dtype)
    credit = credit * weight * row_weight.unsqueeze(1)

    # Nothing kept (every group dropped) gives a zero loss, as the batch's token count is clamped at 1.
    normaliser = {"tokens": (included * world.loss_tokens).sum().clamp(min=1e-12), "sequences": torch.tensor(float(G)),
                  "max_length": torch.tensor(float(G * max_completion_length)),
                  "length": torch.tensor(float(G))}[objective.aggregation]
    theta = world.theta
    logps = world.token_logps(theta)
    policy = (credit.detach() * logps).sum() / normaliser
    exact = torch.zeros(())
    tokens_at = (included.unsqueeze(1) * world.loss_mask).sum(0)  # (T,) expected loss tokens per position
    for term in objective.terms:
        table = world.reference if term.against == "reference" else world.teacher
        if term.kind in DIVERGENCES:
            if objective.drop_truncated or objective.drop_equal_groups or objective.aggregation == "length":
                raise NotModelled("a KL term in the loss with rows kept or weighted by their sampled tokens")
            exact = exact - term.coef * (tokens_at * _divergence(term.kind, theta, table)).sum() / normaliser
        elif term.kind == "entropy":
            mask = world.loss_mask if term.quantile is None else world.top_entropy_mask(term.quantile)
            at = (included.unsqueeze(1) * mask).sum(0)
            probs = torch.softmax(theta, -1)
            entropy = -(probs * torch.log_softmax(theta, -1)).sum(-1)
            exact = exact + term.coef * (at * entropy).sum() / at.sum().clamp(min=1e-12)
        else:  # positive_nll
            positive = (reward >= term.threshold).float() * included
            count = (positive * world.loss_tokens).sum()
            if count > 0:
                exact = exact + term.coef * (positive.unsqueeze(1) * world.loss_mask * logps).sum() / count
    free_part = torch.autograd.grad(policy, theta, retain_graph=True)[0]
    exact_part = torch.autograd.grad(exact + 0.0 * theta.sum(), theta)[0]  # + 0 theta: a graph even with no term
    if objective.scale == "free":
        return free_part, exact_part
    return torch.zeros_like(theta), free_part + exact_part


# -- the sampled side: the method's own pipeline ------------------------------------------------------------------


def _oracle_args(methods: list[str], options, config):
    """The run's PolicyOptimizationConfig: the given fields, with the oracle's completion length and group size."""
    import tempfile

    from .config import PolicyOptimizationConfig

    fields = {"use_cpu": True, "bf16": False, "report_to": "none", **dict(config or {}),
              "max_completion_length": LENGTH, "num_generations": GROUP_SIZE}
    return PolicyOptimizationConfig(output_dir=tempfile.gettempdir(), methods=list(methods),
                                    method_options=dict(options or {}), **fields)


def _greedy_completions(world: World, rows: int):
    """The greedy completion's raw rewards, length and truncation for each of ``rows`` rows (the contract of
    ``RewardBatch.greedy_completions``: the trainer decodes and scores it, here it is the argmax completion; the
    pipeline shapes it like the samples)."""
    g = world.greedy()
    return (world.rewards[g : g + 1].expand(rows, -1).clone(), world.lengths[g : g + 1].expand(rows).clone(),
            world.truncated[g : g + 1].expand(rows).clone())


def pipeline_gradient(pipeline, world: World, args, rows: int, generator: torch.Generator,
                      seen: dict | None = None) -> torch.Tensor:
    """-grad(loss) of one sampled batch of ``rows`` completions (groups of G), through the pipeline's stages;
    ``seen`` (when given) receives the sampled completions' indices and the advantage stage's output."""
    from .batches import LossBatch, RewardBatch

    G, T = GROUP_SIZE, LENGTH
    picked = torch.multinomial(world.p, rows, replacement=True, generator=generator)
    ids, completion_mask = world.ids[picked], world.completion_mask[picked]
    tool_mask = world.policy_positions[picked] + (1 - world.completion_mask[picked])  # 0 on environment tokens
    loss_mask = completion_mask * tool_mask
    truncated = world.truncated[picked]
    if args.mask_truncated_completions:  # TRL masks truncated completions before the reward side sees them
        completion_mask = completion_mask * ~truncated.unsqueeze(1)
        loss_mask = loss_mask * ~truncated.unsqueeze(1)
    theta = world.theta
    logps = world.token_logps(theta)[picked]
    probs = torch.softmax(theta, -1)
    entropies = (-(probs * torch.log_softmax(theta, -1)).sum(-1)).expand(rows, -1)
    ref_logps = world.ref_logps[picked]
    local = {"prompt_ids": torch.tensor(PROMPT).repeat(rows, 1), "prompt_mask": torch.ones(rows, len(PROMPT)).long(),
             "completion_ids": ids, "completion_mask": completion_mask.long(), "tool_mask": tool_mask.long(),
             "ref_per_token_logps": ref_logps}
    batch = RewardBatch(
        reward_names=list(world.reward_names), reward_weights=world.reward_weights.clone(), group_size=G,
        completion_lengths=world.lengths[picked], truncated=truncated, max_completion_length=T,
        options=pipeline.options, args=args, auxiliary=pipeline.auxiliary, carries=pipeline.assembly.carries)
    # The stages in the trainer's order, each seeing what the trainer gives it at that point.
    rewards = pipeline.shape_rewards(world.rewards[picked].clone(), batch)
    batch = dataclasses.replace(
        batch, local=local, rows=[dict(world.rows[s]) for s in picked.tolist()], completion_mask=loss_mask,
        policy_logps=lambda: logps.detach(), processing_class=TinyTokenizer(),
        policy_collision_probs=lambda: probs.detach().square().sum(-1).expand(rows, -1),
        greedy_completions=lambda: _greedy_completions(world, rows))
    scored = pipeline.score(rewards, batch)
    advantages = scored.advantages
    if seen is not None:
        seen.update(picked=picked, advantages=advantages.detach())
    keep = scored.kept_rows(G)
    keep = torch.ones(rows, dtype=torch.bool) if keep is None else keep
    kept = keep.unsqueeze(1).float()
    local["completion_mask"] = local["completion_mask"] * kept.long()
    local["tool_mask"] = local["tool_mask"] * kept.long()
    mask = loss_mask * kept
    loss_batch = LossBatch(
        logps=logps, old_logps=logps.detach(),
        advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
        mask=mask, entropies=entropies, ref_logps=ref_logps, sampling_logps=None, importance_sampling_ratio=None,
        num_items_in_batch=mask.sum(), accumulation_steps=1, steps_per_generation=1, num_processes=1,
        max_completion_length=T, options=pipeline.options, args=args, inputs=local,
        rewards=scored.rewards, auxiliary=pipeline.auxiliary,
        ends_optimizer_step=False)  # a gradient at fixed parameters: no step moves a plugin's controller
    loss = pipeline.loss(loss_batch)
    (grad,) = torch.autograd.grad(loss, theta, allow_unused=True)
    return torch.zeros_like(theta) if grad is None else -grad


# -- the verdict ----------------------------------------------------------------------------------------------------


@dataclass
class OracleResult:
    """One method on one set-up. ``cosine``: of the measured mean gradient with the claimed objective's gradient;
    ``error``: relative distance of the measured mean to the declared expectation (a free scale fitted where
    declared); ``tolerance``: what sampling noise allows (4 standard errors + 1%); ``bias``: relative size of the
    part of the declared expectation that the claimed objective does not explain (0: unbiased)."""

    method: str
    setup: str
    objective: str
    declared_bias: str
    cosine: float = math.nan
    error: float = math.nan
    tolerance: float = math.nan
    bias: float = math.nan
    samples: int = 0
    passed: bool | None = None  # None: not checked (not applicable or an unmodelled bias)
    note: str = ""

    def describe(self) -> str:
        if math.isnan(self.error):
            return f"{self.method} [{self.setup}]: {'FAIL' if self.passed is False else 'not checked'}: {self.note}"
        verdict = {True: "PASS", False: "FAIL", None: "reported"}[self.passed]
        text = (f"{self.method} [{self.setup}]: {verdict}  cosine {self.cosine:.3f}  error {self.error:.3f} "
                f"(tolerance {self.tolerance:.3f})  bias {self.bias:.3f} [{self.declared_bias}]  "
                f"objective {self.objective}")
        return text + (f"  ({self.note})" if self.note else "")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


ZERO = 1e-5  # a gradient norm below this counts as zero (float32 sums of zero-mean scores are not exactly 0)
NOISY = 0.5  # a tolerance above this (relative to the declared gradient) makes a verdict vacuous: a failure


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.norm() == 0 or b.norm() == 0:
        return math.nan
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))


def check_method(methods: str | list[str], options: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, setup: str = "standard", batches: int = 48, rows: int = 512,
                 seed: int = 0, registry=None) -> OracleResult:
    """The oracle's verdict on a method or a composition (with plugin ``options`` and GRPOConfig ``config``
    fields) on one set-up: ``batches`` batches of ``rows`` completions (groups of G) through its pipeline."""
    from .errors import PORegistryError
    from .pipeline import Pipeline, assemble
    from .registry import get_registry

    registry = registry or get_registry()
    methods = [methods] if isinstance(methods, str) else list(methods)
    args = _oracle_args(methods, options, config)
    assembly = assemble(methods, args.method_options, registry)
    objective = declared_objective(methods, args, assembly, registry)
    result = OracleResult(",".join(methods), setup, describe_claim(objective), describe_bias(objective))
    if objective.not_applicable:
        result.note = objective.not_applicable
        return result
    if setup not in declared_setups(objective):
        result.note = (f"runs on the {', '.join(declared_setups(objective))} set-up(s) only" if objective.setups else
                       "a single-turn method: the turns set-up is for methods that declare setups=('turns',)")
        return result
    world = World(setup, non_negative=objective.rewards == "non_negative")
    world.options = assembly.options
    pipeline = Pipeline(assembly, registry)
    models = {"teacher": lambda: TableLM(world.teacher.clone()),
              "value_model": lambda: ExactCritic(world, world.values(world.weighted_reward(objective.shaping)))}
    for name, provided in objective.needs.items():
        pipeline.auxiliary[name] = AuxiliaryModel(models[provided]())
    try:
        exact_free, exact_fixed = declared_gradient(world, objective, assembly.options, LENGTH)
    except NotModelled as exc:
        result.note = str(exc)
        return result
    if not (torch.isfinite(exact_free).all() and torch.isfinite(exact_fixed).all()):
        result.passed, result.note = False, "the declaration's expectation is not finite (a Rule divides by 0?)"
        return result
    generator = torch.Generator().manual_seed(seed)
    seen = {}
    try:
        samples = torch.stack([pipeline_gradient(pipeline, world, args, rows, generator, seen if i == 0 else None)
                               for i in range(batches)])
    except PORegistryError as exc:  # a stage that fails on the oracle's batches fails the check
        result.passed, result.note = False, f"{type(exc).__name__}: {exc}"
        return result
    result.note = _advantage_mismatch(world, objective, assembly.options, **seen)
    if objective.rewards == "non_negative":
        result.note = result.note or _refuses_mixed_signs(pipeline, args, rows, generator, PORegistryError)
    measured = samples.mean(0)
    scale = 1.0
    if exact_free.norm() > ZERO and objective.scale == "free":
        scale = float(((measured - exact_fixed).flatten() @ exact_free.flatten()) / exact_free.norm() ** 2)
    declared = scale * exact_free + exact_fixed
    claimed = claimed_gradient(world, objective)
    fit = float((declared.flatten() @ claimed.flatten()) / claimed.norm().clamp(min=1e-12) ** 2)
    result.samples = batches * rows
    result.cosine = _cosine(measured, claimed)
    noise = 4 * float(samples.std(0).norm()) / math.sqrt(batches)  # 4 standard errors of the mean
    if declared.norm() > ZERO:
        result.error = _relative(measured, declared)
        result.tolerance = noise / float(declared.norm()) + 0.01
    else:  # nothing to follow (equal rewards, no other term): an absolute error, within the noise
        result.error, result.tolerance = float(measured.norm()), noise + ZERO
    result.bias = _relative(declared, fit * claimed) if claimed.norm() > ZERO else math.nan
    if declared.norm() > ZERO and result.tolerance > NOISY and not result.note:
        result.note = (f"inconclusive: the sampling noise allows an error of {result.tolerance:.3g} times the declared "
                       "gradient (heavy-tailed credit: advantages that blow up in rare groups?)")
    if objective.unmodelled:
        result.passed = None
    else:
        result.passed = result.error <= result.tolerance and scale > 0 and not result.note
    return result


def declared_setups(objective: Objective) -> tuple[str, ...]:
    """The set-ups the oracle checks a declaration on: those it names, else the single-turn ones."""
    return tuple(objective.setups) if objective.setups is not None else SETUPS


def _advantage_mismatch(world: World, objective: Objective, options, picked: torch.Tensor,
                        advantages: torch.Tensor) -> str:
    """'' when the advantage stage's output on a sampled batch equals the declared advantage of each sampled group
    (where the declaration fixes it exactly), else the largest difference: per sequence, or per token on the loss
    tokens for a declaration with per-token group credit (``group_dense``) and a per-token advantage. A baseline
    that depends only on the prompt (ReMax's greedy reward) leaves the expected gradient unbiased whatever its
    value, so the gradient alone cannot see it wrong; the values can."""
    if objective.scale != "exact" or objective.dense or objective.advantage is None:
        return ""
    per_token = advantages.dim() == 2 and bool(objective.group_dense)
    if not per_token and (advantages.dim() != 1 or objective.group_dense or objective.advantage == "zero"):
        return ""
    reward = world.weighted_reward(objective.shaping)
    groups = picked.view(-1, GROUP_SIZE)
    expected = _group_advantage(objective.advantage, reward[groups], world.lengths[groups].float(), options,
                                reward[world.greedy()]).flatten()
    got = advantages.float()
    if per_token:
        mask = world.loss_mask[picked]
        if objective.drop_truncated:
            mask = mask * ~world.truncated[picked].unsqueeze(1)
        dense = sum(rule.function(world, groups, options) for rule in objective.group_dense).flatten(0, 1)
        expected, got = (expected.unsqueeze(1) + dense) * mask, got * mask
    gap = float((got - expected).abs().max())
    if gap <= 1e-4 * (1 + float(expected.abs().max())):
        return ""
    what = objective.advantage.label if isinstance(objective.advantage, Rule) else objective.advantage
    if per_token:
        what += " advantage with " + ", ".join(rule.label for rule in objective.group_dense) + " (per token)"
    else:
        what += " advantage"
    return f"the advantages differ from the declared {what} by up to {gap:.3g}"


def _refuses_mixed_signs(pipeline, args, rows, generator, error_type) -> str:
    """'' when the method refuses rewards of both signs with a po_registry error, else what went wrong."""
    world = World("standard", non_negative=False)
    world.options = pipeline.options
    try:
        pipeline_gradient(pipeline, world, args, rows, generator)
    except error_type:
        return ""
    return "rewards of both signs were accepted, though the method declares rewards >= 0"


# Settings the oracle runs a method with when its defaults do not assemble: (options, GRPOConfig fields).
ORACLE_SETTINGS = {
    "kl": ({}, {"beta": 0.04}),
    "kl-reward": ({}, {"beta": 0.04}),
    "process-reward": ({"process_reward_function": "po_registry.oracle:a_steps"}, {}),
}
ORACLE_BUDGET = {"batches": 16, "rows": 256}  # per method and set-up: about 0.1 s; the conformance suite runs more


def method_setups(methods: str | list[str], options=None, config=None, registry=None) -> tuple[str, ...]:
    """The set-ups a method (or composition) is checked on: those its declaration names (``setups``), else the
    three single-turn ones."""
    from .pipeline import assemble
    from .registry import get_registry

    registry = registry or get_registry()
    methods = [methods] if isinstance(methods, str) else list(methods)
    args = _oracle_args(methods, options, config)
    assembly = assemble(methods, args.method_options, registry)
    return declared_setups(declared_objective(methods, args, assembly, registry))


def check_all(methods=None, setups=None, registry=None, settings: Mapping[str, tuple] | None = None,
              **kwargs) -> list[OracleResult]:
    """The verdict on every registered method, on each set-up (``None``: the set-ups each method declares, by
    default the three single-turn ones): with its default options, or with the ``(options, config)`` that
    ``settings`` gives for it (a method that needs some, as ``kl`` needs beta > 0)."""
    from .errors import PORegistryError
    from .registry import get_registry

    registry = registry or get_registry()
    results = []
    for name in methods or sorted(registry.methods):
        options, config = (settings or {}).get(name, ({}, {}))
        try:
            chosen = setups or method_setups(name, options, config, registry)
        except PORegistryError:
            chosen = SETUPS  # it does not assemble: each set-up below says so
        for setup in chosen:
            try:
                results.append(check_method(name, options, config, setup=setup, registry=registry, **kwargs))
            except PORegistryError as exc:  # it does not assemble with these settings: say so, check the others
                results.append(OracleResult(name, setup, "?", "?", note=f"{type(exc).__name__}: {exc}"))
    return results


def main(argv=None) -> int:
    import warnings

    warnings.simplefilter("ignore")
    results = []
    for name in list(argv if argv is not None else sys.argv[1:]) or [None]:
        if name is not None and "," in name:  # a composition, as --method takes it
            results += [check_method(name.split(","), setup=setup) for setup in method_setups(name.split(","))]
        else:
            results += check_all([name] if name else None, settings=ORACLE_SETTINGS)
    for result in results:
        print(result.describe())
    return 0 if all(r.passed is not False for r in results) else 1


if __name__ == "__main__":
    # Run the imported module's main: plugins declare with po_registry.oracle's classes, not __main__'s copies.
    from po_registry.oracle import main as _main

    sys.exit(_main())
