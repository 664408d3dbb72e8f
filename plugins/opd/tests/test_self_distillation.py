"""Self-distillation (sdpo): loss and gradients equal to TRL's SDPOTrainer (its own teacher contexts), the
demonstrations and reprompts by hand, the per-token loss and its gradient by hand, the moving-average teacher, the
teacher kinds, conformance and training."""

import copy
import dataclasses
import math

import pytest
import torch
from po_registry_opd.self_distillation import TEACHER, SelfDistillation, demonstrations, reprompt

from po_registry.context import AuxiliaryModel
from po_registry.errors import OptionError
from po_registry.testing import PluginConformance, char_tokenizer, default_args, partial_credit, tiny_causal_lm

NAN = float("nan")
TEACHER_MODEL = tiny_causal_lm(char_tokenizer(), seed=3).eval()


class _Synthetic:
    """Synthetic batches: prompts for the reprompts, the self-teacher po_setup would register, and on the loss side
    the teacher log-probs and active rows the reward side carries."""

    def prepare_reward_batch(self, batch):
        return dataclasses.replace(batch, rows=[{"prompt": f"{k % 7}+{k % 5}="} for k in range(batch.num_rows)])

    def prepare_auxiliary(self, auxiliary):
        auxiliary[TEACHER] = AuxiliaryModel(TEACHER_MODEL)

    def prepare_loss_batch(self, batch):
        rows, width = batch.mask.shape
        batch.inputs["sdpo_teacher_logps"] = batch.logps.detach() - torch.linspace(-0.5, 0.5, rows * width).view(
            rows, width)
        batch.inputs["sdpo_active"] = torch.tensor([float(k % 3 != 2) for k in range(rows)])


class TestConformance(_Synthetic, PluginConformance):
    method = "sdpo"
    metrics = ("sdpo/active_fraction", "sdpo/reverse_kl")
    options = {"sdpo_success_threshold": 0.1}  # the embedded run: partial credit for any digit


class TestConformanceBlended(_Synthetic, PluginConformance):
    method = "sdpo"
    options = {"sdpo_weight": 0.5, "sdpo_teacher": "live", "sdpo_is_clip": 0.0}
    train_steps = 0


def test_demonstrations_by_hand():
    """Group [0, 1, 0, 1]: each row's first successful sibling, itself excluded (row 1 takes row 3); with own
    successes allowed row 1 takes itself. Group [NaN, 0.5, 0, 0] at threshold 1: none."""
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0, NAN, 0.5, 0.0, 0.0])
    assert demonstrations(rewards, 4, 1.0, own=False) == [1, 3, 1, 1, None, None, None, None]
    assert demonstrations(rewards, 4, 1.0, own=True) == [1, 1, 1, 1, None, None, None, None]
    assert demonstrations(rewards, 4, 0.5, own=False)[4:] == [5, None, 5, 5]


def test_reprompts_by_hand():
    options = default_args(["sdpo"]).resolve().options
    tail = "\n\nCorrectly solve the original question.\n"
    assert reprompt("3+4=", "7", options) == "3+4=\nCorrect solution:\n\n7\n\n" + tail
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}]
    assert reprompt(chat, "7", options) == [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "3+4=\nCorrect solution:\n\n7\n\n" + tail}]


def test_loss_and_gradient_by_hand(po_loss_batch):
    """Two rows, three tokens; row 1 inactive (no demonstration), row 0 with a hole at token 1. Per token (log pi -
    log pi_T) log pi with the weight min(pi / pi_old, 2): ratios e^0.1 and e^1 (clipped to 2). The row mean over its
    two tokens, the micro-batch mean over both rows (the inactive one adds 0), times w = 0.5:
    0.5 * (0.5 (g0 l0 e^0.1 + g2 l2 2)) / 2, and d/dl0 = 0.5 * 0.5 * g0 e^0.1 / 2."""
    options = {**default_args(["sdpo"]).resolve().options, "sdpo_weight": 0.5}
    batch = po_loss_batch(rows=2, width=3, options=options, args=default_args(["sdpo"]))
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], requires_grad=True)
    batch.logps, batch.mask = logps, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    batch.old_logps = torch.tensor([[-1.1, -2.0, -1.5], [-1.0, -1.0, -1.0]])
    teacher = torch.tensor([[-0.4, -9.0, -0.7], [-3.0, -3.0, -3.0]])
    batch.inputs = {"sdpo_teacher_logps": teacher, "sdpo_active": torch.tensor([1.0, 0.0])}
    loss = SelfDistillation().po_loss_penalty(batch)
    g0, g2 = -1.0 + 0.4, -0.5 + 0.7
    expected = 0.5 * (0.5 * (g0 * -1.0 * math.exp(0.1) + g2 * -0.5 * 2.0)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert logps.grad[0, 0].item() == pytest.approx(0.5 * 0.5 * g0 * math.exp(0.1) / 2, abs=1e-6)
    assert logps.grad[0, 1] == 0 and (logps.grad[1] == 0).all()


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_equals_trl_sdpo_trainer(po_tiny_model_dir, po_tokenizer, tmp_path, weight):
    """The same rollout through ours and through TRL's SDPOTrainer.compute_loss, with TRL's own teacher contexts
    (its SuccessfulRolloutTeacherContextBuilder) and its GRPO advantages computed here from the rewards: loss and
    gradients to 1e-6, pure (w = 1) and blended with the policy loss (w = 0.5), live teacher."""
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer, micro_batch_loss, rollout

    dataset = get_task("addition").dataset(32)
    common = dict(use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8, max_completion_length=6,
                  temperature=1.0, max_steps=1, save_strategy="no", disable_tqdm=True, seed=0, num_generations=4)
    ours = PolicyOptimizationTrainer(
        model=po_tiny_model_dir, processing_class=po_tokenizer, train_dataset=dataset, reward_funcs=[partial_credit],
        args=PolicyOptimizationConfig(output_dir=str(tmp_path / "ours"), methods=["sdpo"], method_options={
            "sdpo_teacher": "live", "sdpo_success_threshold": 0.1, "sdpo_weight": weight}, **common))
    stock = SDPOTrainer(model=po_tiny_model_dir, processing_class=po_tokenizer, train_dataset=dataset,
                        reward_funcs=[partial_credit], args=SDPOConfig(
                            output_dir=str(tmp_path / "stock"), teacher_model_kind="live", success_reward_threshold=0.1,
                            distillation_weight=weight, **common))
    rows = [dataset[0]] * 4 + [dataset[1]] * 4
    torch.manual_seed(0)
    batch = rollout(ours, rows)
    active = batch["sdpo_active"]
    assert 0 < active.sum() < len(rows)  # some rows have a demonstration, some not
    ours.model.zero_grad()
    loss = micro_batch_loss(ours, dict(batch))
    loss.backward()
    rewards = batch["po_rewards"]
    grouped = rewards.view(-1, 4)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    contexts = stock.teacher_context_builder.build(
        {"completion_ids": batch["completion_ids"], "completion_mask": batch["completion_mask"]},
        [row["prompt"] for row in rows], rewards)
    assert torch.equal(contexts["self_distillation_mask"], active)
    stock.model.train()
    stock.current_gradient_accumulation_steps = 1
    stock_loss = stock.compute_loss(stock.model, {key: batch[key] for key in (
        "prompt_ids", "prompt_mask", "completion_ids", "completion_mask")} | {"advantages": advantages, **contexts})
    stock_loss.backward()
    assert loss.item() == pytest.approx(stock_loss.item(), abs=1e-6)
    assert loss.item() != 0
    for p, q in zip(ours.model.parameters(), stock.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_moving_average_teacher_after_one_step(po_trainer):
    """ema teacher, rate 0.25: after one optimizer step teacher = 0.75 initial + 0.25 updated policy; it is saved in
    and restored from the component's state."""
    trainer = po_trainer(["sdpo"], {"sdpo_ema_rate": 0.25, "sdpo_success_threshold": 0.1}, max_steps=1)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    teacher = trainer.po_pipeline.auxiliary[TEACHER].model
    for t, p, p0 in zip(teacher.parameters(), trainer.model.parameters(), initial):
        assert torch.allclose(t, 0.75 * p0 + 0.25 * p.detach(), atol=1e-6)
    assert any(not p.equal(p0) for p, p0 in zip(trainer.model.parameters(), initial))
    state = copy.deepcopy(trainer.po_pipeline.state_dict())  # as a checkpoint file holds it
    assert set(state) == {"sdpo"}
    with torch.no_grad():
        for t in teacher.parameters():
            t.zero_()
    trainer.po_pipeline.load_state_dict(state)
    for t, p, p0 in zip(teacher.parameters(), trainer.model.parameters(), initial):
        assert torch.allclose(t, 0.75 * p0 + 0.25 * p.detach(), atol=1e-6)


def test_base_teacher_needs_a_lora_student(po_trainer):
    from po_registry.errors import HookError

    with pytest.raises(HookError, match="plugin 'sdpo', hook po_setup: .*sdpo_teacher=base is the LoRA student's"):
        po_trainer(["sdpo"], {"sdpo_teacher": "base"})


def test_trains_with_its_lora_base_as_teacher(po_trainer):
    from peft import LoraConfig

    trainer = po_trainer(["sdpo"], {"sdpo_teacher": "base", "sdpo_success_threshold": 0.1},
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    trainer.train()
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(not p.equal(q) for p, q in zip(before, after))
    assert any(row.get("sdpo/active_fraction", 0) > 0 for row in trainer.state.log_history)


def test_bad_settings_are_refused_by_name():
    with pytest.raises(OptionError, match="sdpo_weight"):
        default_args(["sdpo"], {"sdpo_weight": 1.5})
    with pytest.raises(OptionError, match="sdpo_teacher"):
        default_args(["sdpo"], {"sdpo_teacher": "oracle"})
