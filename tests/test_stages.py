"""Reward-side stages beyond the baseline: shaping, dense token rewards, group selection; plugin state."""

from __future__ import annotations

import pytest
import torch
from helpers import build, digit_reward, generation_rows

from po_registry import hookimpl
from po_registry.config import PolicyOptimizationConfig
from po_registry.trainer import STATE_FILE, PolicyOptimizationTrainer


class _Component:
    """A plugin that registers a method of the same name made of itself."""

    name = ""

    @hookimpl
    def po_register_methods(self, register):
        register(self.name, components=[self.name])


class LengthPenalty(_Component):
    name = "length-penalty"

    def __init__(self):
        self.seen = None

    @hookimpl
    def po_shape_rewards(self, rewards, batch):
        self.seen = (batch.completion_lengths.clone(), batch.truncated.clone())
        return rewards - 0.01 * batch.completion_lengths.unsqueeze(1)


class DenseBonus(_Component):
    name = "dense-bonus"

    @hookimpl
    def po_token_rewards(self, batch):
        mask = batch.local["completion_mask"].float()
        return 0.5 * mask


class KeepFirstGroup(_Component):
    name = "keep-first"

    @hookimpl
    def po_select_groups(self, rewards, batch):
        keep = torch.zeros(batch.num_groups, dtype=torch.bool)
        keep[0] = True
        return keep


def _trainer(plugins, plugin, tiny_model_dir, tokenizer, prompt_dataset, tmp_path, **flags):
    plugins(plugin.name, plugin)
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=[plugin.name], per_device_train_batch_size=8, **flags)
    trainer.model.train()  # as during training: metrics go to the "train" log
    return trainer


def test_shaping_sees_lengths_and_truncation(plugins, tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    shaper = LengthPenalty()
    trainer = _trainer(plugins, shaper, tiny_model_dir, tokenizer, prompt_dataset, tmp_path)
    rows = generation_rows(prompt_dataset, trainer, prompts=2)
    out = trainer._generate_and_score_completions(rows)
    lengths, truncated = shaper.seen
    assert torch.equal(lengths, out["completion_mask"].sum(1))
    last = out["completion_ids"].gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
    assert torch.equal(truncated, (last != tokenizer.eos_token_id) & (last != tokenizer.pad_token_id))
    # TRL's reward metric is computed from the shaped matrix: the mean of digit_reward - 0.01 * length, scored here
    texts = tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    shaped = [r - 0.01 * n for r, n in zip(digit_reward(texts, [row["answer"] for row in rows]), lengths.tolist())]
    assert trainer._metrics["train"]["reward"] == [pytest.approx(sum(shaped) / len(shaped), abs=1e-6)]


def test_dense_token_rewards_become_per_token_advantages(plugins, tiny_model_dir, tokenizer, prompt_dataset,
                                                           tmp_path):
    trainer = _trainer(plugins, DenseBonus(), tiny_model_dir, tokenizer, prompt_dataset, tmp_path)
    rows = generation_rows(prompt_dataset, trainer, prompts=2)
    out = trainer._generate_and_score_completions(rows)
    advantages, mask = out["advantages"], out["completion_mask"].float()
    assert advantages.shape == mask.shape
    sequence = advantages[:, 0] - 0.5  # the first token is never padding
    assert torch.allclose(advantages, (sequence.unsqueeze(1) + 0.5) * mask)
    trainer.train()  # the loss accepts (B, T) advantages
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_dropped_groups_leave_the_loss_and_the_token_count(plugins, tiny_model_dir, tokenizer, prompt_dataset,
                                                            tmp_path):
    trainer = _trainer(plugins, KeepFirstGroup(), tiny_model_dir, tokenizer, prompt_dataset, tmp_path)
    out = trainer._generate_and_score_completions(generation_rows(prompt_dataset, trainer, prompts=2))
    G = trainer.num_generations
    assert out["completion_mask"][G:].sum() == 0 and out["completion_mask"][:G].sum() > 0
    assert out["num_items_in_batch"] == out["completion_mask"][:G].sum()
    assert trainer._metrics["train"]["groups/kept_fraction"] == [0.5]


class Counter(_Component):
    """A stateful plugin: counts the advantage batches it has seen; the count is checkpointed."""

    name = "counter"

    def __init__(self):
        self.batches = 0

    @hookimpl
    def po_shape_rewards(self, batch):
        self.batches += 1

    @hookimpl
    def po_state_dict(self):
        return {"batches": self.batches}

    @hookimpl
    def po_load_state_dict(self, state):
        self.batches = state["batches"]


def test_plugin_state_is_saved_and_restored_with_checkpoints(plugins, tiny_model_dir, tokenizer, prompt_dataset,
                                                               tmp_path):
    counter = Counter()
    trainer = _trainer(plugins, counter, tiny_model_dir, tokenizer, prompt_dataset, tmp_path, max_steps=2,
                       save_strategy="steps", save_steps=2)
    trainer.train()
    assert counter.batches == 2
    checkpoint = tmp_path / "checkpoint-2"
    assert torch.load(checkpoint / STATE_FILE) == {"counter": {"batches": 2}}
    counter.batches = 0
    resumed = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=["counter"], per_device_train_batch_size=8, max_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert counter.batches == 3  # restored 2, then one more step


class TrajectoryKit(_Component):
    """Implements every trajectory-side stage it can with a known effect, plus set-up and config checks."""

    name = "trajectory-kit"

    def __init__(self):
        self.setup_calls = []

    @hookimpl
    def po_check_config(self, args):
        if args.beta != 0.0:
            raise ValueError(f"beta must be 0 with this kit, got {args.beta}")

    @hookimpl
    def po_setup(self, context, options):
        self.setup_calls.append((context, options))

    @hookimpl
    def po_log_importance_weights(self, batch):
        return (batch.logps - batch.old_logps).sum(-1, keepdim=True)  # an unnormalised sequence log-ratio

    @hookimpl
    def po_token_mask(self, batch):
        keep = torch.zeros_like(batch.mask)
        keep[:, 0] = 1.0
        return keep

    @hookimpl
    def po_rollout_correction(self, batch):
        return torch.full((batch.mask.shape[0], 1), 0.5)

    @hookimpl
    def po_loss_penalty(self, batch):
        return torch.tensor(2.0)


def test_trajectory_stages_compose_in_the_documented_order(plugins):
    """Expected, by hand: objective(sequence ratio) x first-token mask x 0.5, token mean (bnpo) over the loss mask,
    + 2.0, and all of it divided by the 2 accumulation steps. The objective is PPO's -min(r A, clip(r, 0.8, 1.2) A)
    written out here; the loss mask has environment holes (row 2's first token is one: the kit's first-token mask
    removes that row entirely, yet its 2 loss tokens stay in the bnpo denominator of 12)."""
    from po_registry.pipeline import Pipeline, assemble
    from po_registry.testing import default_args, loss_batch

    plugins("trajectory-kit", TrajectoryKit())
    assembly = assemble(["trajectory-kit"])
    assert assembly.owners["po_log_importance_weights"] == ["trajectory-kit"]
    assert assembly.owners["po_token_mask"] == ["entropy-mask", "off-policy-mask", "trajectory-kit"]
    args = default_args(["trajectory-kit"], loss_type="bnpo")
    batch = loss_batch(args=args, per_token_advantages=True)
    batch.mask = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0],
                               [1.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0]])
    batch.accumulation_steps = 2
    loss = Pipeline(assembly).loss(batch)
    ratio = torch.exp((batch.logps - batch.old_logps).sum(-1, keepdim=True))  # the kit's unnormalised ratio
    surrogate = -torch.minimum(ratio * batch.advantages, ratio.clamp(0.8, 1.2) * batch.advantages)
    first = torch.zeros_like(batch.mask)
    first[:, 0] = 1.0
    per_token = surrogate * first * 0.5 * batch.mask
    expected = (per_token.sum() / 12.0 + 2.0) / 2  # 12 loss tokens
    assert batch.mask.sum() == 12.0
    assert torch.allclose(loss, expected, atol=1e-6)


def test_setup_and_config_checks_reach_the_plugin(plugins, po_trainer):
    from po_registry import OptionError

    kit = plugins("trajectory-kit", TrajectoryKit())
    trainer = po_trainer(["trajectory-kit"])
    assert kit.setup_calls == [(trainer.po_context, {})]
    context = trainer.po_context  # the narrow view of the run: the policy unwrapped, its tokenizer, accelerator, args
    assert context.model is trainer.accelerator.unwrap_model(trainer.model) and context.args is trainer.args
    assert context.processing_class is trainer.processing_class and context.auxiliary is trainer.po_pipeline.auxiliary
    with pytest.raises(OptionError, match="plugin 'trajectory-kit': beta must be 0 with this kit, got 0.1"):
        po_trainer(["trajectory-kit"], beta=0.1)


class ScheduledScale(_Component):
    """Advantages scaled by a schedule that advances per batch: its state decides the training trajectory."""

    name = "scheduled-scale"

    def __init__(self):
        self.batches = 0

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        from po_registry.ops import group_mean

        self.batches += 1
        total = batch.weighted_reward(rewards).nan_to_num(0.0)
        return (total - group_mean(total, batch.group_size)) * (1.0 + 0.5 * self.batches)

    @hookimpl
    def po_state_dict(self):
        return {"batches": self.batches}

    @hookimpl
    def po_load_state_dict(self, state):
        self.batches = state["batches"]


def test_resumed_run_continues_exactly_as_the_uninterrupted_one(plugins, po_trainer, tmp_path):
    schedule = plugins("scheduled-scale", ScheduledScale())
    straight = po_trainer(["scheduled-scale"], max_steps=4, output_dir=str(tmp_path / "straight"))
    straight.train()
    straight_losses = [row["loss"] for row in straight.state.log_history if "loss" in row]

    schedule.batches = 0
    first = po_trainer(["scheduled-scale"], max_steps=4, output_dir=str(tmp_path / "split"), save_strategy="steps",
                       save_steps=2)
    first.train()  # runs to 4 too, leaving checkpoint-2 behind
    schedule.batches = 99  # whatever the plugin holds now, resuming restores the checkpoint's state
    resumed = po_trainer(["scheduled-scale"], max_steps=4, output_dir=str(tmp_path / "split"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    assert schedule.batches == 4
    resumed_losses = [row["loss"] for row in resumed.state.log_history if "loss" in row]
    # The resumed history holds steps 1-2 from the checkpoint and 3-4 trained after resuming.
    assert len(resumed_losses) == 4 and resumed_losses == pytest.approx(straight_losses, abs=1e-6)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_training_step_runs_the_stages_in_the_order_of_the_specification(po_trainer, monkeypatch):
    """The hook specification is the order: one optimizer step (with a refill-capable method) calls the stages
    in the order hookspecs.py declares them, each through the one runner."""
    from po_registry.pipeline import Pipeline
    from po_registry.registry import STAGE_HOOKS

    called = []
    run = Pipeline.run

    def recording(self, hook, *args, **kwargs):
        if hook not in called:
            called.append(hook)
        return run(self, hook, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", recording)
    po_trainer(["dynamic-sampling"], max_steps=1).train()
    assert called == list(STAGE_HOOKS)


class MutatingShaper(_Component):
    name = "mutating-shaper"

    @hookimpl
    def po_shape_rewards(self, rewards, batch):
        batch.completion_lengths = batch.completion_lengths * 0  # what a later stage would then see
        return rewards


def test_a_stage_cannot_change_the_batch_the_next_stage_sees(plugins):
    """The reward batch is built whole and frozen: a plugin assigning to it is stopped, named, at that stage."""
    from po_registry.errors import HookError
    from po_registry.pipeline import Pipeline, assemble
    from po_registry.testing import reward_batch

    plugins(MutatingShaper.name, MutatingShaper)
    pipeline = Pipeline(assemble([MutatingShaper.name]))
    rewards, batch = reward_batch(options=pipeline.options)
    lengths = batch.completion_lengths.clone()
    with pytest.raises(HookError, match=r"mutating-shaper.*po_shape_rewards.*cannot assign to field "
                                        r"'completion_lengths'"):
        pipeline.shape_rewards(rewards, batch)
    assert torch.equal(batch.completion_lengths, lengths)


class DenseAsAdvantage(_Component):
    """An advantage estimator that passes the dense rewards through: A_t = r_t."""

    name = "dense-as-advantage"
    po_reads = ("token_rewards",)

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        return batch.token_rewards


def test_the_reward_side_runs_in_one_order_with_one_advantage_batch(plugins):
    """Pipeline.score: dense rewards computed on the local rows reach the advantage stage gathered (its own batch;
    the rollout batch is left as it was), then both selections run and kept_rows intersects them."""
    from po_registry.pipeline import Pipeline, assemble
    from po_registry.testing import reward_batch

    for plugin in (DenseBonus, DenseAsAdvantage, KeepFirstGroup):
        plugins(plugin.name, plugin)
    pipeline = Pipeline(assemble(["dense-bonus", "dense-as-advantage", "keep-first"]))
    rewards, batch = reward_batch(group_size=2, num_groups=3, options=pipeline.options)
    scored = pipeline.score(rewards, batch)
    # DenseBonus gives 0.5 on every completion token of ``local`` (environment tokens included: it reads the
    # completion mask, not the loss mask)
    assert torch.equal(scored.advantages, 0.5 * batch.local["completion_mask"].float())
    assert batch.token_rewards is None
    assert scored.keep_samples is None and scored.keep_groups.tolist() == [True, False, False]
    assert scored.kept_rows(2).tolist() == [True, True, False, False, False, False]
    assert torch.equal(scored.rewards, rewards.squeeze(1))
