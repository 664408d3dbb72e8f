"""ReMax: the greedy baseline, its formula, unscorable rows, and end-to-end training with real greedy decodes."""

import dataclasses

import pytest
import torch
from po_registry_remax import ReMax

from po_registry.errors import OptionError
from po_registry.testing import PluginConformance, default_args, partial_credit


class TestConformance(PluginConformance):
    method = "remax"
    metrics = ("remax/greedy_reward", "remax/beats_greedy_fraction")


def test_advantage_is_reward_minus_greedy_reward(po_reward_batch):
    rewards = torch.tensor([[1.0], [0.0], [0.5], [1.0], [0.0], [0.0]])
    _, batch = po_reward_batch(group_size=3, num_groups=2, rewards=rewards)
    batch = dataclasses.replace(batch, greedy_rewards=lambda: torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 0.0]))
    got = ReMax().po_compute_advantages(rewards, batch)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, 0.0, 1.0, 0.0, 0.0]))


def test_weighted_rewards_and_unscorable_rows_get_zero(po_reward_batch):
    rewards = torch.tensor([[1.0, 2.0], [float("nan"), float("nan")], [0.0, 1.0], [1.0, float("nan")]])
    _, batch = po_reward_batch(group_size=2, num_groups=2, rewards=rewards)
    batch = dataclasses.replace(batch,
                                reward_weights=torch.tensor([1.0, 0.5]),
                                greedy_rewards=lambda: torch.tensor([1.0, 1.0, float("nan"), float("nan")]))
    got = ReMax().po_compute_advantages(rewards, batch)
    assert torch.equal(got, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # 1 + 0.5 * 2 - 1; None rewards; no baseline


def test_refuses_vllm():
    with pytest.raises(OptionError, match="remax.*use_vllm"):
        default_args(["remax"], use_vllm=True).resolve()


def test_greedy_baseline_is_the_reward_of_the_greedy_completion(po_trainer):
    """Through the trainer: one greedy decode per prompt, scored by the reward functions, shared by the group."""
    from po_registry.trainer import rollout

    trainer = po_trainer(["remax"], embedded=True, num_generations=4, per_device_train_batch_size=8)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    out = rollout(trainer, [rows[0]] * 4 + [rows[1]] * 4)
    greedy = out["po_rewards"] - out["advantages"]  # A = R - R_greedy; every row is scorable here
    model, tokenizer = trainer.model, trainer.processing_class
    for group, row in enumerate(rows):
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            generated = model.generate(ids, do_sample=False, max_new_tokens=trainer.max_completion_length,
                                       eos_token_id=trainer.eos_token_ids, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        expected = partial_credit([text], [row["answer"]])[0]
        assert greedy[group * 4:(group + 1) * 4] == pytest.approx([expected] * 4, abs=1e-6)


def test_refuses_a_multi_turn_rollout_before_any_update(po_trainer):
    """A greedy single turn is not an episode of the environment: the baseline would score another process."""
    from po_registry.errors import HookError
    from po_registry.registry import get_task

    task = get_task("guess")
    trainer = po_trainer(["remax"], rollout_func=task.rollout_function(), reward_funcs=[task.reward_function()],
                         max_completion_length=task.max_completion_length, max_steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(HookError, match="remax.*greedy baselines decode a single turn.*rollout function"):
        trainer.train()
    assert all(p.equal(q) for p, q in zip(before, trainer.model.parameters()))


def test_the_greedy_decodes_are_counted(po_trainer):
    """One decode per distinct prompt, logged as greedy/decodes (compare counts them as completions)."""
    trainer = po_trainer(["remax"], embedded=True, num_generations=4, per_device_train_batch_size=8, max_steps=1)
    trainer.train()
    assert [row["greedy/decodes"] for row in trainer.state.log_history if "loss" in row] == [2.0]


def always_one(completions, **kwargs):
    return [1.0] * len(completions)


def test_greedy_baseline_goes_through_the_reward_shaping(po_trainer):
    """remax + overlong-reward, L_max 4, L_cache 0.5 * 4 = 2: R_len = 0 up to 2 tokens, (2 - 3)/2 = -0.5 at 3,
    -1 at 4. Every completion scores 1, so R = 1 + R_len(|y|) and the baseline is 1 + R_len(|y_greedy|); the tiny
    random model's greedy decode runs to the cap (4 tokens), so the baseline is 1 - 1 = 0 (before: 1, unshaped)."""
    from po_registry.trainer import rollout

    trainer = po_trainer(["remax", "overlong-reward"], {"overlong_cache_fraction": 0.5}, reward_funcs=[always_one],
                         max_completion_length=4, num_generations=4, per_device_train_batch_size=8)
    rows = [trainer.train_dataset[0], trainer.train_dataset[1]]
    out = rollout(trainer, [rows[0]] * 4 + [rows[1]] * 4)
    penalty = {1: 0.0, 2: 0.0, 3: -0.5, 4: -1.0}
    lengths = out["completion_mask"].sum(1).long().tolist()
    assert out["po_rewards"].tolist() == pytest.approx([1.0 + penalty[n] for n in lengths], abs=1e-6)
    greedy = out["po_rewards"] - out["advantages"]  # A = R - R_greedy
    model, tokenizer = trainer.model, trainer.processing_class
    for group, row in enumerate(rows):
        ids = tokenizer(row["prompt"], return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            generated = model.generate(ids, do_sample=False, max_new_tokens=4, eos_token_id=trainer.eos_token_ids,
                                       pad_token_id=tokenizer.pad_token_id)
        assert generated.shape[1] - ids.shape[1] == 4  # the greedy completion reaches the cap: R_len = -1
        assert greedy[group * 4:(group + 1) * 4].tolist() == pytest.approx([0.0] * 4, abs=1e-6)


def test_the_greedy_baseline_is_shaped_like_the_samples():
    """Composed shaping reaches the baseline: with overlong-reward (L_max 10, L_cache 2: the penalty ramps from 0
    at length 8 to -1 at 10) a greedy completion of length 10 scores 1 - 1 = 0, one of length 4 keeps its 1."""
    from po_registry.batches import RewardBatch
    from po_registry.pipeline import Pipeline, assemble

    pipeline = Pipeline(assemble(["remax", "overlong-reward"], {}))
    greedy = (torch.tensor([[1.0], [1.0], [1.0], [1.0]]), torch.tensor([10, 10, 4, 4]),
              torch.tensor([True, True, False, False]))
    batch = RewardBatch(reward_names=["r"], reward_weights=torch.ones(1), group_size=2,
                        completion_lengths=torch.tensor([9, 3, 3, 10]), truncated=torch.tensor([0, 0, 0, 1]).bool(),
                        max_completion_length=10, options=pipeline.options, args=default_args(["remax"]),
                        greedy_completions=lambda: greedy)
    rewards = pipeline.shape_rewards(torch.tensor([[1.0], [0.0], [1.0], [1.0]]), batch)  # 0.5, 0, 1, 0
    advantages = pipeline.score(rewards, batch).advantages
    assert torch.allclose(advantages, torch.tensor([0.5, 0.0, 0.0, -1.0]))


def test_the_oracle_catches_a_greedy_baseline_that_skips_shaping(monkeypatch):
    """An unshaped baseline is constant per prompt, so the expected gradient stays unbiased: the oracle's check of
    the advantage values against the declaration is what sees it."""
    import warnings

    from po_registry.oracle import check_method
    from po_registry.pipeline import Pipeline

    warnings.simplefilter("ignore")
    assert check_method(["remax", "overlong-reward"], setup="environment", batches=8, rows=256).passed
    monkeypatch.setattr(Pipeline, "greedy_baseline",
                        lambda self, batch: batch.weighted_reward(batch.greedy_completions()[0]))
    caught = check_method(["remax", "overlong-reward"], setup="environment", batches=8, rows=256)
    assert caught.passed is False and "differ from the declared greedy advantage by up to 1" in caught.note
