"""PPO with a learned critic and VAPO: GAE plumbing against a reference loop, the value loss, the critic learning,
its checkpoint, value pretraining, a LoRA critic, and end-to-end training."""

import dataclasses
import tempfile

import pytest
import torch
from po_registry_ppo import Critic, length_adaptive_lambda, token_values

from po_registry.context import AuxiliaryModel, load_model
from po_registry.ops import clipped_value_loss
from po_registry.registry import get_registry
from po_registry.testing import PluginConformance, char_tokenizer, default_args, tiny_causal_lm

CRITIC_DIR = tempfile.mkdtemp(prefix="po-ppo-critic-")
tiny_causal_lm(char_tokenizer()).save_pretrained(CRITIC_DIR)


def tiny_critic() -> AuxiliaryModel:
    """A fresh trainable value model on the tiny Llama (a trainer's ppo-critic registers its own in po_setup)."""
    return AuxiliaryModel(load_model(CRITIC_DIR, value_head=True), learning_rate=1e-4)


def _defaults(**overrides):
    registry = get_registry()
    options = {name: opt.default for name, opt in registry.options.items() if opt.plugin in ("ppo-critic",)}
    return {**options, **overrides}


@pytest.fixture
def critic():
    return tiny_critic()


def _carry_value_targets(batch):
    generator = torch.Generator().manual_seed(3)
    shape = batch.mask.shape
    batch.inputs.update(ppo_old_values=torch.randn(shape, generator=generator),
                        ppo_returns=torch.randn(shape, generator=generator), ppo_value_mask=torch.ones(shape))


class TestConformance(PluginConformance):
    method = "ppo"
    metrics = ("ppo/value_loss", "ppo/explained_variance", "ppo/value_mean")

    def prepare_auxiliary(self, auxiliary):
        auxiliary["critic"] = tiny_critic()

    def prepare_loss_batch(self, batch):
        _carry_value_targets(batch)


class TestVapoConformance(PluginConformance):
    method = "vapo"
    options = {"ppo_critic_warmup_steps": 0}
    metrics = ("ppo/value_loss", "positive_nll/positive_fraction", "dapo/clip_ratio_high")

    def prepare_auxiliary(self, auxiliary):
        auxiliary["critic"] = tiny_critic()

    def prepare_loss_batch(self, batch):
        _carry_value_targets(batch)


def _reference_gae(rewards, values, gamma, lam):
    """One row, valid tokens only: the textbook backward recursion."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_advantages_and_targets_follow_gae_on_each_row(po_reward_batch, critic, alpha):
    options = _defaults(ppo_gamma=0.9, ppo_lambda=0.8, ppo_critic_lambda=1.0, ppo_whiten_advantages=False,
                        ppo_length_adaptive_alpha=alpha)
    rewards, batch = po_reward_batch(group_size=2, num_groups=3, width=5, options=options, args=default_args(),
                                     auxiliary={"critic": critic})
    rewards[2, 0] = float("nan")  # unscorable: no advantage, no value target
    batch = dataclasses.replace(batch, token_rewards=0.1 * torch.arange(30.0).view(6, 5) * batch.completion_mask)
    advantages = Critic().po_compute_advantages(rewards, batch)
    with torch.no_grad():
        values = token_values(critic.model, batch.local)
    for row in range(6):
        length = int(batch.completion_mask[row].sum())
        if row == 2:
            assert advantages[row].abs().sum() == 0 and batch.local["ppo_value_mask"][row].sum() == 0
            continue
        dense = batch.token_rewards[row, :length].tolist()
        dense[-1] += rewards[row, 0].item()
        lam = 0.8 if alpha == 0 else max(0.0, 1 - 1 / (alpha * length))
        expected, _ = _reference_gae(dense, values[row, :length].tolist(), 0.9, lam)
        _, targets = _reference_gae(dense, values[row, :length].tolist(), 0.9, 1.0)
        assert advantages[row, :length].tolist() == pytest.approx(expected, abs=1e-5)
        assert advantages[row, length:].abs().sum() == 0
        assert batch.local["ppo_returns"][row, :length].tolist() == pytest.approx(targets, abs=1e-5)
        assert batch.local["ppo_old_values"][row, :length].tolist() == pytest.approx(values[row, :length].tolist())


def _with_environment_holes(batch):
    """Mask environment tokens out of the loss (the trainer's loss mask is completion_mask * tool_mask): two holes
    inside row 3 and row 5, one inside row 4; the attention mask (``local``) keeps them as context."""
    holes = torch.ones_like(batch.completion_mask)
    holes[3, 1:3] = 0
    holes[4, 2] = 0
    holes[5, 1:3] = 0
    return dataclasses.replace(batch, completion_mask=batch.completion_mask * holes), holes


def test_advantages_and_targets_flow_through_environment_holes(po_reward_batch, critic):
    """Multi-turn rows: GAE runs over the action tokens only (textbook GAE on the compacted row), the outcome reward
    sits on the last action token, and a hole's dense reward, value and advantage count for nothing."""
    options = _defaults(ppo_gamma=0.9, ppo_lambda=0.8, ppo_critic_lambda=1.0, ppo_whiten_advantages=False)
    rewards, batch = po_reward_batch(group_size=2, num_groups=3, width=5, options=options, args=default_args(),
                                     auxiliary={"critic": critic})
    rewards[:, 0] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    batch.local["completion_mask"][3:] = 1  # full-length rows, so that each hole sits inside a turn sequence
    batch.completion_mask[3:] = 1.0
    batch, holes = _with_environment_holes(batch)
    batch = dataclasses.replace(batch,
                                token_rewards=0.1 * torch.arange(30.0).view(6, 5) * batch.local["completion_mask"])
    advantages = Critic().po_compute_advantages(rewards, batch)
    with torch.no_grad():
        values = token_values(critic.model, batch.local)
    for row in range(3, 6):
        kept = batch.completion_mask[row].bool().nonzero().squeeze(1)
        dense = batch.token_rewards[row, kept].tolist()
        dense[-1] += rewards[row, 0].item()
        expected, _ = _reference_gae(dense, values[row, kept].tolist(), 0.9, 0.8)
        _, targets = _reference_gae(dense, values[row, kept].tolist(), 0.9, 1.0)
        assert advantages[row, kept].tolist() == pytest.approx(expected, abs=1e-5)
        assert batch.local["ppo_returns"][row, kept].tolist() == pytest.approx(targets, abs=1e-5)
        hole = ~holes[row].bool()
        assert (advantages[row][hole] == 0).all() and (batch.local["ppo_returns"][row][hole] == 0).all()
        assert (batch.local["ppo_value_mask"][row][hole] == 0).all()
    # the first turn of row 3 sees the final reward through the hole: lambda_critic = 1 makes its target the
    # discounted return over action tokens 0, 3, 4 (the hole is no step): G_0 = r_0 + 0.9 r_3 + 0.81 (r_4 + R)
    r = batch.token_rewards[3]
    assert batch.local["ppo_returns"][3, 0].item() == pytest.approx(
        (r[0] + 0.9 * r[3] + 0.81 * (r[4] + 1.0)).item(), abs=1e-5)


def test_whitening_and_value_loss_skip_environment_holes(po_reward_batch, po_loss_batch, critic):
    rewards, batch = po_reward_batch(group_size=2, num_groups=3, width=5, options=_defaults(), args=default_args(),
                                     auxiliary={"critic": critic})
    batch.local["completion_mask"][3:] = 1
    batch.completion_mask[3:] = 1.0
    batch, _ = _with_environment_holes(batch)
    advantages = Critic().po_compute_advantages(rewards, batch)
    tokens = advantages[batch.completion_mask.bool()]
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert tokens.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (advantages[~batch.completion_mask.bool()] == 0).all()
    # the value loss: a hole's value error leaves the loss unchanged (the micro-batch mask is the loss mask)
    loss_batch = po_loss_batch(rows=2, width=4, options=_defaults(), args=default_args(["ppo"]),
                               auxiliary={"critic": critic})
    loss_batch.mask = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    loss_batch.inputs["completion_mask"] = torch.ones(2, 4, dtype=torch.long)
    _carry_value_targets(loss_batch)
    with torch.no_grad():
        before = Critic().po_loss_penalty(loss_batch).item()
        loss_batch.inputs["ppo_returns"][0, 1:3] += 100.0
        assert Critic().po_loss_penalty(loss_batch).item() == pytest.approx(before, abs=1e-6)


def test_whitened_advantages_have_zero_mean_and_unit_std_over_loss_tokens(po_reward_batch, critic):
    rewards, batch = po_reward_batch(group_size=4, num_groups=3, width=6, options=_defaults(), args=default_args(),
                                     auxiliary={"critic": critic})
    advantages = Critic().po_compute_advantages(rewards, batch)
    tokens = advantages[batch.completion_mask.bool()]
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert tokens.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_values_are_read_before_each_completion_token(critic):
    """V(s_t) for completion token t is the head at the last position of prompt + completion[:t]."""
    rows = {"prompt_ids": torch.tensor([[5, 6, 7]]), "prompt_mask": torch.ones(1, 3, dtype=torch.long),
            "completion_ids": torch.tensor([[8, 9]]), "completion_mask": torch.ones(1, 2, dtype=torch.long)}
    with torch.no_grad():
        values = token_values(critic.model, rows)
        prefix = critic.model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits[0, :, 0]
    assert values[0].tolist() == pytest.approx([prefix[2].item(), prefix[3].item()], abs=1e-6)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.5, 0.4]), torch.tensor([2.0, 2.0, 0.0])
    got = clipped_value_loss(values, old, returns, clip=0.2)
    # row 0: max((1-2)^2, (0.7-2)^2) = 1.69; row 1: max(4, (0.3-2)^2) = 4; row 2 within the clip: 0.25
    assert got.tolist() == pytest.approx([0.5 * 1.69, 0.5 * 4.0, 0.5 * 0.25])


def test_length_adaptive_lambda():
    got = length_adaptive_lambda(torch.tensor([10, 20, 100, 1000]), alpha=0.05)
    assert got.tolist() == pytest.approx([0.0, 0.0, 0.8, 0.98])


def _with_a_hole(batch):
    """An environment token (masked out of the loss, kept as context) at t = 1 of the first row with >= 3 tokens."""
    row = int((batch.mask.sum(1) >= 3).nonzero()[0])
    batch.mask = batch.mask.clone()
    batch.mask[row, 1] = 0.0
    return row


def test_value_loss_trains_only_the_critic(po_loss_batch, critic):
    """The value loss, written out: 0.5 max((V - G)^2, (V_old + clip(V - V_old, -0.2, 0.2) - G)^2) averaged over the
    loss tokens (one of them an environment hole, left out); its value and its gradient on every critic weight equal
    those of this expression, and no gradient reaches the policy's log-probs."""
    batch = po_loss_batch(options=_defaults(), args=default_args(["ppo"]), auxiliary={"critic": critic})
    _with_a_hole(batch)
    _carry_value_targets(batch)
    loss = Critic().po_loss_penalty(batch)
    loss.backward()
    assert batch.logps.grad is None
    values = token_values(critic.model, batch.inputs)
    old, target = batch.inputs["ppo_old_values"], batch.inputs["ppo_returns"]
    clipped = old + (values - old).clamp(-0.2, 0.2)
    per_token = 0.5 * torch.maximum((values - target) ** 2, (clipped - target) ** 2)
    expected = (per_token * batch.mask).sum() / batch.mask.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    grads = torch.autograd.grad(expected, critic.parameters, allow_unused=True, materialize_grads=True)
    assert any(g.abs().sum() > 0 for g in grads)
    for p, g in zip(critic.parameters, grads):
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), g, atol=1e-6)


def test_missing_value_targets_are_an_error(po_loss_batch, critic):
    batch = po_loss_batch(options=_defaults(), args=default_args(["ppo"]), auxiliary={"critic": critic})
    with pytest.raises(ValueError, match="no value targets"):
        Critic().po_loss_penalty(batch)


def test_positive_nll_on_positive_rows_only(po_loss_batch):
    plugin = get_registry().plugin("positive-nll", needed_by="the tests")
    batch = po_loss_batch(options={"positive_nll_coef": 0.1, "positive_nll_threshold": 1.0}, args=default_args())
    batch.mask[2, 1] = 0.0  # an environment hole inside positive row 2 (5 tokens): not one of the NLL's tokens
    batch.rewards = torch.tensor([1.0, 1.0, 1.5, 2.0, float("nan"), 0.5])
    mask = batch.mask * torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).unsqueeze(1)
    assert mask.sum() == 0 + 1 + 4 + 2  # rows 0 (empty), 1, 2 (hole out), 3
    expected = 0.1 * (-(batch.logps * mask).sum() / mask.sum())
    assert plugin.po_loss_penalty(batch).item() == pytest.approx(expected.item())
    # Another process holds 9 more positive tokens: the mean is over all of them (DDP then averages the two).
    # Hand count: rows 0-3 are positive (7 tokens); P = 2 gives 2 * local sum / (7 + 9).
    batch.num_processes, batch.reduce_sum = 2, lambda t: t + 9.0
    expected = 0.1 * (-(batch.logps * mask).sum()) * 2 / (mask.sum() + 9.0)
    assert plugin.po_loss_penalty(batch).item() == pytest.approx(expected.item())
    batch.rewards = torch.zeros(6)  # no positive row here: 0, and the process still joins the count
    assert plugin.po_loss_penalty(batch).item() == 0.0


def _critic(trainer) -> AuxiliaryModel:
    return trainer.po_pipeline.auxiliary["critic"]


def _critic_weights(trainer):
    return [p.detach().clone() for p in _critic(trainer).parameters]


def test_critic_learns_on_the_embedded_task(po_trainer):
    """With the policy held fixed (value pretraining), the critic's error on a held-out rollout's Monte Carlo
    returns falls, and the logged value loss with it."""
    from po_registry.trainer import rollout

    trainer = po_trainer(["ppo"], {"ppo_critic_lr": 1e-3, "ppo_critic_lambda": 1.0, "ppo_critic_warmup_steps": 30},
                         embedded=True, max_steps=30, per_device_train_batch_size=16, num_generations=4)
    rows = [trainer.train_dataset[i] for i in range(40, 56) for _ in range(4)]
    held_out = rollout(trainer, rows)

    def error():
        mask = held_out["ppo_value_mask"]
        with torch.no_grad():
            values = token_values(_critic(trainer).model, held_out)
        return (((values - held_out["ppo_returns"]) ** 2 * mask).sum() / mask.sum()).item()

    before = error()
    trainer.train()
    after = error()
    losses = [row["ppo/value_loss"] for row in trainer.state.log_history if "ppo/value_loss" in row]
    assert len(losses) == 30
    assert after < 0.6 * before, (before, after)
    assert sum(losses[-10:]) / 10 < losses[0], losses


def test_value_pretraining_freezes_the_policy(po_trainer):
    trainer = po_trainer(["vapo"], {"ppo_critic_warmup_steps": 2}, embedded=True, max_steps=2, learning_rate=1e-3)
    policy = [p.detach().clone() for p in trainer.model.parameters()]
    critic = _critic_weights(trainer)
    trainer.train()
    assert all(p.equal(q) for p, q in zip(policy, trainer.model.parameters())), "the policy moved during warm-up"
    assert any(not p.equal(q) for p, q in zip(critic, _critic(trainer).parameters)), "the critic did not learn"


def test_lora_critic(po_trainer):
    trainer = po_trainer(["ppo"], {"ppo_critic_lora_r": 4}, max_steps=1)
    model = _critic(trainer).model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "score" in name for name in trainable)
    before = _critic_weights(trainer)
    trainer.train()
    assert any(not p.equal(q) for p, q in zip(before, _critic(trainer).parameters))


def test_resume_restores_the_critic_exactly(po_trainer, tmp_path):
    flags = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3, lr_scheduler_type="linear")
    straight = po_trainer(["ppo"], output_dir=str(tmp_path / "straight"), **flags)
    straight.train()
    expected_policy = [p.detach().clone() for p in straight.model.parameters()]
    expected_critic = _critic_weights(straight)
    expected_lr = _critic(straight).scheduler.get_last_lr()

    first = po_trainer(["ppo"], output_dir=str(tmp_path / "resumed"), **flags)
    first.train()  # to step 4 as well, leaving checkpoint-2 behind; the critic ends in step 4's state
    resumed = po_trainer(["ppo"], output_dir=str(tmp_path / "resumed"), **flags)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(expected_policy, resumed.model.parameters()))
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(expected_critic, _critic(resumed).parameters))
    assert _critic(resumed).scheduler.get_last_lr() == pytest.approx(expected_lr)
