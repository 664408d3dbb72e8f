"""Turn-level credit assignment for multi-turn episodes (rollouts of :func:`po_registry.agentic.multi_turn_rollout`).

Each completion token knows its turn k (``turn_index``, -1 for environment tokens), each turn its reward r_{i,k}
(``turn_reward``) and the environment state it began in (``turn_state``). Advantages are per token: every action
token of turn k gets its turn's advantage; environment tokens get none (they are out of the loss anyway).

- ``turn-advantage`` (MT-GRPO, arXiv 2505.11821): A_{i,t} = A^out_i + lambda A^turn_{i,k(t)} on the tokens of every
  turn but the episode's final one, A^out_i alone on the final turn; A^out the group-normalised outcome reward,
  A^turn_{i,k} the turn-k reward normalised over the group's episodes in which turn k is not the final turn.
- ``gigpo`` (GiGPO, arXiv 2505.10978): A_{i,t} = A^episode_i + omega A^step_{i,k(t)}; steps of a group that start from
  the same environment state form an anchor group, and A^step normalises the discounted return from the step,
  G_{i,k} = sum_{k' >= k} gamma^(k' - k) r_{i,k'}, within it (0 for an anchor state seen once).
- ``turn-return``: A_{i,t} = (G_{i,k(t)} - mean_j G_{j,k}) / (std_j G_{j,k} + eps) over the group's episodes j that
  play a turn k (0 with fewer than two): each turn is credited with the discounted rewards from that turn on,
  against the same turn's returns in the group's other episodes.
"""

import torch

from po_registry import hookimpl
from po_registry.ops import group_normalize, returns_to_go, tokens_from_turns, turns_from_tokens

MT_GRPO = "arXiv 2505.11821"
GIGPO = "arXiv 2505.10978"


class Turns:
    """The gathered turn structure of a batch: (N, T) turn index, (N, K) turn rewards and which turns exist."""

    def __init__(self, batch):
        if not batch.rows or "turn_index" not in batch.rows[0]:
            raise ValueError("the rows carry no turn structure (turn_index, turn_reward): turn-level credit needs "
                             "multi-turn rollouts (po_registry.agentic.multi_turn_rollout, e.g. --task guess)")
        self.index = batch.token_field("turn_index", fill=-1, dtype=torch.long)
        self.index = torch.where(batch.completion_mask.bool(), self.index, -1)
        self.count = max(int(self.index.max().item()) + 1 if self.index.numel() else 0, 1)
        rewards = batch.token_field("turn_reward", fill=0.0)
        self.rewards = turns_from_tokens(rewards * batch.completion_mask, self.index, self.count)
        positions = torch.arange(self.count, device=self.index.device).unsqueeze(0)
        last = self.index.max(dim=1, keepdim=True).values  # each episode's final turn (-1: none)
        self.exists = positions <= last
        self.intermediate = positions < last  # turns another turn of the same episode follows
        self.batch = batch

    def returns(self, gamma: float) -> torch.Tensor:
        """(N, K) G_{i,k} = sum_{k' >= k} gamma^(k' - k) r_{i,k'}."""
        return returns_to_go(self.rewards, gamma) * self.exists

    def per_token(self, turn_values: torch.Tensor) -> torch.Tensor:
        return tokens_from_turns(turn_values, self.index) * self.batch.completion_mask


def outcome_advantage(rewards, batch) -> torch.Tensor:
    """A^out_i: the weighted outcome reward normalised within its group (unscorable rows: 0)."""
    total = batch.weighted_reward(rewards)
    return group_normalize(total, batch.group_size, present=~torch.isnan(total))


class TurnAdvantage:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, mt_grpo_turn_credit

        register("turn-advantage", components=["turn-advantage"], paper=MT_GRPO,
                 summary="MT-GRPO: outcome advantage plus a turn-level advantage from per-turn rewards",
                 targets="delayed feedback: every turn of an episode gets the same credit under outcome rewards",
                 # J = E[sum_k r_k] (the outcome is the sum of the turn rewards); the outcome z-score on every token,
                 # plus lambda times the intermediate turns' rewards z-scored again: std scaling and a biased turn term.
                 objective=Objective(reward=1.0, advantage="zscore", group_dense=(mt_grpo_turn_credit(),),
                                     setups=("turns",)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("turn_advantage_coef", 1.0, type=float, check=lambda v: v >= 0, help="weight lambda of A^turn")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        turns = Turns(batch)
        # MT-GRPO credits the turns before the final one with their own reward; the final turn's credit is the
        # outcome's alone (its reward is part of the outcome, so a turn term there would count it twice).
        turn = group_normalize(turns.rewards, batch.group_size, present=turns.intermediate)
        outcome = outcome_advantage(rewards, batch)
        batch.log_metric("turns/mean_turns", turns.exists.float().sum(dim=1).mean().item())
        return (outcome.unsqueeze(1) + batch.options["turn_advantage_coef"] * turns.per_token(turn)) * \
            batch.completion_mask


class GiGPO:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, gigpo_step_credit

        register("gigpo", components=["gigpo"], paper=GIGPO,
                 summary="GiGPO: episode advantage plus step advantages over anchor states shared within a group",
                 targets="coarse credit in long episodes, without a critic or extra rollouts",
                 # The episode z-score on every token, plus omega times each step's discounted return z-scored
                 # within its anchor state: std scaling and the step term's bias from E[sum_k r_k].
                 objective=Objective(reward=1.0, advantage="zscore", group_dense=(gigpo_step_credit(),),
                                     setups=("turns",)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("gigpo_step_weight", 1.0, type=float, check=lambda v: v >= 0, help="weight omega of A^step")
        register("gigpo_gamma", 0.95, type=float, check=lambda v: 0 < v <= 1, help="discount of step returns")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        turns = Turns(batch)
        states = turns_from_state(batch, turns)
        returns = turns.returns(batch.options["gigpo_gamma"])
        step = anchor_normalize(returns, states, turns.exists, batch.group_size)
        batch.log_metric("gigpo/anchored_steps", (step != 0).float().sum().item() / max(turns.exists.sum().item(), 1))
        episode = outcome_advantage(rewards, batch)
        return (episode.unsqueeze(1) + batch.options["gigpo_step_weight"] * turns.per_token(step)) * \
            batch.completion_mask


def turns_from_state(batch, turns: Turns) -> torch.Tensor:
    """(N, K) state hash at the start of each turn (-1 where unknown)."""
    tokens = batch.token_field("turn_state", fill=-1, dtype=torch.long)
    states = torch.full((tokens.shape[0], turns.count), -1, dtype=torch.long, device=tokens.device)
    first = turns.index >= 0
    rows, cols = first.nonzero(as_tuple=True)
    states[rows, turns.index[rows, cols]] = tokens[rows, cols]
    return states


def anchor_normalize(returns: torch.Tensor, states: torch.Tensor, exists: torch.Tensor, group_size: int,
                     eps: float = 1e-4) -> torch.Tensor:
    """Normalise each step's return within its anchor group (same state, same prompt group); singletons get 0."""
    advantages = torch.zeros_like(returns)
    for group in range(returns.shape[0] // group_size):
        rows = slice(group * group_size, (group + 1) * group_size)
        keys, values, present = states[rows], returns[rows], exists[rows] & (states[rows] >= 0)
        out = advantages[rows]
        for key in keys[present].unique():
            members = present & (keys == key)
            if members.sum() < 2:
                continue
            anchor = values[members]
            out[members] = (anchor - anchor.mean()) / (anchor.std() + eps)
    return advantages


class TurnReturn:
    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, turn_return_credit

        register("turn-return", components=["turn-return"], paper=MT_GRPO,
                 summary="discounted return over turns: each turn credited with the rewards from that turn on",
                 targets="delayed feedback: early turns credited with rewards they could not influence",
                 # Reward-to-go over turns with the group's same-turn returns as baseline: std scaling, and with
                 # gamma < 1 the later turns' rewards discounted in the earlier turns' credit.
                 objective=Objective(reward=1.0, advantage="zero", group_dense=(turn_return_credit(),),
                                     setups=("turns",)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("turn_return_gamma", 0.9, type=float, check=lambda v: 0 < v <= 1, help="discount over turns")

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        turns = Turns(batch)
        returns = turns.returns(batch.options["turn_return_gamma"])
        # Each turn's return against the same turn's in the group: a group of equal episode returns whose later
        # turns' returns differ (gamma < 1, rewards before the last turn) gets bounded credit, not a division by eps.
        return turns.per_token(group_normalize(returns, batch.group_size, present=turns.exists))
