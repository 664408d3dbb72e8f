"""Process rewards: step detection, per-group normalisation, dense returns, errors, conformance and training."""

import dataclasses
import statistics

import pytest
import torch
from po_registry_process_reward import ProcessReward, normalise_per_group, step_ends

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args

PER_TOKEN = "test_process_reward:digit_per_token"
PER_STEP = "test_process_reward:one_step"


def digit_per_token(completions, completion_ids, **kwargs):
    """A token-level reward: 1 for each digit, 0 otherwise (one value per completion token)."""
    return [[1.0 if ch.isdigit() else 0.0 for ch in text] + [0.0] * (len(ids) - len(text))
            for text, ids in zip(completions, completion_ids)]


def one_step(completions, completion_ids, **kwargs):
    """A step-level reward with one step per completion (no newline in these answers): its length; an empty
    completion has no step."""
    return [[float(len(ids))] if len(ids) else [] for ids in completion_ids]


class TestConformance(PluginConformance):
    method = "process-reward"
    options = {"process_reward_function": PER_TOKEN}
    metrics = ("process_reward/steps_per_completion",)


class TestConformancePerStep(PluginConformance):
    method = "process-reward"
    options = {"process_reward_function": PER_STEP}
    train_steps = 0


def test_step_ends():
    assert step_ends(["1", "2\n", "3", "4"]) == [1, 3]
    assert step_ends(["a", "b\n"]) == [1]


def test_normalise_per_group_over_rewarded_steps():
    rewards = torch.tensor([[1.0, 0.0, 3.0], [5.0, 0.0, 0.0]])
    steps = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    got = normalise_per_group(rewards, steps, group_size=2)
    mean, std = 3.0, 2.0  # of the steps 1, 3, 5 (Bessel)
    expected = torch.tensor([[(1 - mean) / (std + 1e-4), 0.0, 0.0], [(5 - mean) / (std + 1e-4), 0.0, 0.0]])
    expected[0, 2] = (3 - mean) / (std + 1e-4)
    assert torch.allclose(got, expected)


def test_dense_term_is_the_return_of_normalised_steps(po_reward_batch):
    """One step per completion (no newline), rewarded with its length: lengths 1, 3 in group 0 and 4, 2 in group 1.
    Each group's steps {1, 3} and {4, 2}: mean 2 and 3, Bessel std sqrt(2), so r~ = +-1 / (sqrt(2) + 1e-4)
    = +-0.70706 (the longer row +), and the dense term of each token is its row's r~ on and before the step's last
    token, 0 after it."""
    _, batch = po_reward_batch(group_size=2, num_groups=2, width=4, options={"process_reward_function": PER_STEP})
    digit = batch.processing_class.convert_tokens_to_ids("7")
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    batch.local["completion_ids"], batch.local["completion_mask"] = digit * mask, mask
    dense = ProcessReward().po_token_rewards(batch)
    a = 1 / (2 ** 0.5 + 1e-4)
    expected = torch.tensor([[-a, 0.0, 0.0, 0.0], [a, a, a, 0.0], [a, a, a, a], [-a, -a, 0.0, 0.0]])
    assert torch.allclose(dense, expected, atol=1e-6)


def test_a_bad_function_is_refused_when_the_config_is_built():
    with pytest.raises(OptionError, match="process_reward_function 'nowhere:f': ModuleNotFoundError"):
        default_args(["process-reward"], {"process_reward_function": "nowhere:f"})
    with pytest.raises(OptionError, match="set process_reward_function"):
        default_args(["process-reward"])


def test_wrong_number_of_rewards_names_the_completion(po_reward_batch):
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=4,
                               options={"process_reward_function": "test_process_reward:too_many"})
    with pytest.raises(ValueError, match="completion 0: 9 rewards"):
        ProcessReward().po_token_rewards(batch)


def too_many(completions, completion_ids, **kwargs):
    return [[0.0] * 9 for _ in completions]


def steps_or_none(completions, completion_ids, **kwargs):
    """Per-step rewards by hand for the group below: row 0 two steps, row 1 none (empty), row 2 one step."""
    return [[1.0, 3.0], [], [5.0]][: len(completion_ids)]


def one_step_even_when_empty(completions, completion_ids, **kwargs):
    return [[0.0] for _ in completion_ids]


def _group_with_an_empty_row(po_reward_batch, function):
    _, batch = po_reward_batch(group_size=3, num_groups=1, width=4, options={"process_reward_function": function})
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])  # row 1: no completion token
    newline = batch.processing_class.convert_tokens_to_ids("\n")
    digit = batch.processing_class.convert_tokens_to_ids("7")
    ids = torch.tensor([[digit, newline, digit, 0], [0, 0, 0, 0], [digit, digit, 0, 0]])
    batch.local["completion_ids"], batch.local["completion_mask"] = ids * mask, mask
    return batch


def test_a_row_without_steps_gets_no_dense_credit_and_no_weight(po_reward_batch):
    """Steps: row 0 ends steps at tokens 1 (newline) and 2 (last), rewards 1 and 3; row 1 has none; row 2 one at
    token 1, reward 5. Group statistics over the three real steps only: mean 3, Bessel std 2, so
    r~ = (1 - 3)/2.0001 = -0.99995, (3 - 3)/2.0001 = 0, (5 - 3)/2.0001 = 0.99995; dense_t = sum of r~ of steps
    ending at or after t."""
    batch = _group_with_an_empty_row(po_reward_batch, "test_process_reward:steps_or_none")
    dense = ProcessReward().po_token_rewards(batch)
    expected = torch.tensor([[-0.99995, -0.99995, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0],
                             [0.99995, 0.99995, 0.0, 0.0]])
    assert torch.allclose(dense, expected, atol=1e-5)


def test_a_reward_for_an_empty_completion_is_refused(po_reward_batch):
    """Before, the reward of an empty completion became a phantom step on its last (padding) column: with G = 2 and
    one real step of reward 1, the group became {1, 0} and the real row got +0.707 instead of 0, the phantom -0.707."""
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=4,
                               options={"process_reward_function": "test_process_reward:one_step_even_when_empty"})
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    batch.local["completion_ids"], batch.local["completion_mask"] = batch.local["completion_ids"][:2] * mask, mask
    with pytest.raises(ValueError, match=r"completion 1: 1 rewards for 0 tokens and 0 steps \(an empty completion "
                                         r"has no step: return \[\] for it\)"):
        ProcessReward().po_token_rewards(batch)


def test_step_ends_of_an_empty_completion():
    assert step_ends([]) == []


def test_steps_metric_counts_the_completions_of_every_process(po_reward_batch):
    """One step per non-empty completion: this process has 4 completions and 4 steps; the other (simulated by the
    gather) 4 completions and 1 step, so the logged mean is 5 / 8 (before: this process's 4 / 4 = 1 alone)."""
    _, batch = po_reward_batch(group_size=2, num_groups=2, width=4, options={"process_reward_function": PER_STEP})
    batch = dataclasses.replace(batch, gather=lambda local: torch.cat([local, torch.tensor([[1.0, 4.0]])]))
    logged = {}
    batch = dataclasses.replace(batch, log_metric=logged.__setitem__)
    ProcessReward().po_token_rewards(batch)
    assert logged["process_reward/steps_per_completion"] == pytest.approx(5 / 8)


def digits_per_line(completions, completion_ids, **kwargs):
    """One reward per step (a line, newline included, or the final piece): the digits in it."""
    return [[float(sum(ch.isdigit() for ch in line)) for line in text.splitlines(keepends=True)]
            for text in completions]


def test_multi_turn_steps_read_the_transcript_and_land_on_their_own_tokens(po_reward_batch):
    """A multi-turn completion "1\\n" (the policy), "h\\n" (the environment's reply: tool mask 0), "23" (the policy),
    beside "45". The step function reads the whole transcript, the reply included (a judge needs it): steps end at
    tokens 1 and 3 (newlines) and 5, rewarded 1, 0, 2 digits; row 1 has one step of 2. Positions map through the
    completion mask, which the reply is inside of (only its tool mask is 0), so each step's reward sits on its own
    last token. Group statistics over the four steps: mean 1.25, Bessel std 0.95743; dense_t sums the normalised
    rewards of the steps ending at or after t. The reply's step reaches the action tokens before it through the
    return; the reply's own tokens carry no loss (the trainer's loss mask)."""
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=6,
                               options={"process_reward_function": "test_process_reward:digits_per_line"})
    tokens = batch.processing_class.convert_tokens_to_ids
    ids = torch.tensor([[tokens(c) for c in ["1", "\n", "h", "\n", "2", "3"]],
                        [tokens("4"), tokens("5"), 0, 0, 0, 0]])
    batch.local["completion_ids"] = ids
    batch.local["completion_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    batch.local["tool_mask"] = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    dense = ProcessReward().po_token_rewards(batch)
    mean, std = statistics.mean([1, 0, 2, 2]), statistics.stdev([1, 0, 2, 2])
    a, b, c, d = ((r - mean) / (std + 1e-4) for r in (1, 0, 2, 2))
    expected = torch.tensor([[a + b + c, a + b + c, b + c, b + c, c, c], [d, d, 0, 0, 0, 0]])
    assert torch.allclose(dense, expected, atol=1e-5)
    assert dense[0].tolist() == pytest.approx([-0.78327, -0.78327, -0.52218, -0.52218, 0.78327, 0.78327], abs=1e-4)
