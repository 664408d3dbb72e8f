"""The built-in ``grpo`` method reproduces TRL 1.16's GRPOTrainer exactly: the proof that the hooks cover it."""

from __future__ import annotations

import pytest
import torch
from helpers import build, digit_reward, generation_rows
from trl import GRPOConfig, GRPOTrainer

from po_registry.config import PolicyOptimizationConfig
from po_registry.testing import trl_parity
from po_registry.trainer import PolicyOptimizationTrainer

ATOL = 1e-6


def _pair(model_dir, tokenizer, dataset, tmp_path, peft=False, rewards=None, train=False, **flags):
    """The stock trainer and ours with the same flags; with ``train``, each trains right after it is built
    (the Trainer seeds the global RNG when it is built, and generation samples from it)."""
    kwargs = dict(peft=peft, **flags)
    if rewards is not None:
        kwargs["reward"] = rewards
    trainers = []
    for trainer_cls, config_cls, name in [(GRPOTrainer, GRPOConfig, "stock"),
                                          (PolicyOptimizationTrainer, PolicyOptimizationConfig, "ours")]:
        trainers.append(build(trainer_cls, config_cls, model_dir, tokenizer, dataset, tmp_path / name, **kwargs))
        if train:
            trainers[-1].train()
    return trainers


def _assert_same_parameters(a, b):
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=ATOL, rtol=0), f"{name} differs by {(p - q).abs().max().item():.3g}"


def _losses(trainer):
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


# Each row covers several axes at once; together they cover every axis the issue lists.
TRAIN_CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo-beta": dict(loss_type="bnpo", beta=0.04),
    "dr_grpo-scale-none": dict(loss_type="dr_grpo", scale_rewards="none"),
    "dapo-mu2-ga2": dict(loss_type="dapo", num_iterations=2, gradient_accumulation_steps=2),
    "grpo-sequence-mu2": dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2,
                              epsilon=3e-4, epsilon_high=4e-4),
    "dapo-sequence-beta-ga2-spg4": dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.04,
                                         gradient_accumulation_steps=2, steps_per_generation=4),
    "grpo-beta-mu2-ga2": dict(loss_type="grpo", beta=0.04, num_iterations=2, gradient_accumulation_steps=2),
    "bnpo-batch-scale-clip-higher": dict(loss_type="bnpo", scale_rewards="batch", epsilon_high=0.28,
                                         num_iterations=2),
    "dapo-delta-entropy": dict(loss_type="dapo", delta=1.5, entropy_coef=0.01, num_iterations=2),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
    "dapo-top-entropy-opsm": dict(loss_type="dapo", top_entropy_quantile=0.2, off_policy_mask_threshold=0.01,
                                  num_iterations=2),
}


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("flags", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_training_matches_grpo_trainer(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, flags, peft):
    stock, ours = _pair(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, peft=peft, train=True, max_steps=3,
                        **flags)
    assert _losses(stock) and _losses(stock) == pytest.approx(_losses(ours), abs=ATOL)
    _assert_same_parameters(stock, ours)
    assert any(row.get("grad_norm", 0) > 0 for row in ours.state.log_history), "no gradient reached the model"


LOSS_CASES = [
    dict(loss_type=loss_type, importance_sampling_level=level, beta=beta)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    for level in ("token", "sequence")
    for beta in (0.0, 0.04)
]


@pytest.mark.parametrize("flags", LOSS_CASES, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_loss_and_gradients_match_off_policy(tiny_model_dir, tokenizer, flags):
    """One micro-batch (GA 2) whose behaviour log-probs are shifted off the policy, so clipping acts."""
    epsilons = dict(epsilon=3e-4, epsilon_high=4e-4) if flags["importance_sampling_level"] == "sequence" else {}
    result = trl_parity(tiny_model_dir, tokenizer, ["grpo"], {}, shared_flags={**epsilons, **flags})
    assert result["completions_equal"] and result["advantages_diff"] <= ATOL
    assert result["stock_loss"] != 0.0
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=ATOL)
    assert result["max_grad_diff"] <= ATOL
    clipped = result["metrics"]["ours"]["clip_ratio/region_mean"]
    assert clipped == result["metrics"]["stock"]["clip_ratio/region_mean"] and clipped[0] > 0, "nothing was clipped"


def reward_with_gaps(completions, **kwargs):
    """A second reward that does not apply to some rows (None -> NaN), including every row of one group."""
    return [None if i < 4 or i % 3 == 0 else float(len(text)) / 6 for i, text in enumerate(completions)]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


ADVANTAGE_CASES = {
    "group": dict(scale_rewards="group"),
    "batch": dict(scale_rewards="batch"),
    "none": dict(scale_rewards="none"),
    "normalize-then-sum": dict(multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5]),
    "weighted-group": dict(reward_weights=[0.3, 2.0]),
}


@pytest.mark.parametrize("flags", ADVANTAGE_CASES.values(), ids=ADVANTAGE_CASES.keys())
def test_advantages_match_grpo_trainer(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, flags):
    stock, ours = _pair(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, rewards=[digit_reward, reward_with_gaps],
                        **flags)
    rows = generation_rows(prompt_dataset, stock)
    torch.manual_seed(3)
    expected = stock._generate_and_score_completions([dict(r) for r in rows])
    torch.manual_seed(3)
    got = ours._generate_and_score_completions([dict(r) for r in rows])
    assert torch.equal(expected["completion_ids"], got["completion_ids"])
    assert torch.isfinite(got["advantages"]).all()
    assert torch.allclose(expected["advantages"], got["advantages"], atol=ATOL, rtol=0)


def test_all_equal_group_rewards_give_zero_advantages(tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    stock, ours = _pair(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, rewards=constant_reward)
    rows = generation_rows(prompt_dataset, ours)
    torch.manual_seed(3)
    expected = stock._generate_and_score_completions([dict(r) for r in rows])
    torch.manual_seed(3)
    got = ours._generate_and_score_completions([dict(r) for r in rows])
    assert torch.equal(got["advantages"], torch.zeros_like(got["advantages"]))
    assert torch.equal(expected["advantages"], got["advantages"])


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_entropy_bonus_on_the_kept_tokens_matches_off_policy(tiny_model_dir, tokenizer, loss_type):
    """With top_entropy_quantile < 1, TRL's entropy bonus is the mean entropy over the tokens the entropy mask keeps
    (before: ours averaged over every loss token; loss off by 3.7e-4, gradients by 1.4e-3 for grpo)."""
    flags = dict(loss_type=loss_type, top_entropy_quantile=0.2, entropy_coef=0.5)
    result = trl_parity(tiny_model_dir, tokenizer, ["grpo"], {}, shared_flags=flags)
    assert result["completions_equal"] and result["advantages_diff"] <= ATOL
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=ATOL)
    assert result["max_grad_diff"] <= ATOL


# Skywork-OR1 adaptive entropy control (TRL's use_adaptive_entropy): the tiny model's entropy (about 4.8 nats) sits
# below a target of 100, so from 0.02 the coefficient climbs by 0.05 a step to its 0.1 cap: 0.07, 0.1, 0.1, 0.1 (by
# hand); the bonus applies from step 2 on (step 1 has no measurement yet). Below a target of 1 the coefficient
# falls to its floor and the bonus never applies.
ADAPTIVE_CASES = {
    "climbs-dapo-ga2-top-entropy": (dict(loss_type="dapo", entropy_target=100.0, gradient_accumulation_steps=2,
                                         top_entropy_quantile=0.5, num_iterations=2), [0.07, 0.1, 0.1, 0.1]),
    "falls-grpo": (dict(loss_type="grpo", entropy_target=1.0), [0.0, 0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("flags, coefs", ADAPTIVE_CASES.values(), ids=ADAPTIVE_CASES.keys())
def test_adaptive_entropy_matches_grpo_trainer(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, flags, coefs):
    stock, ours = _pair(tiny_model_dir, tokenizer, prompt_dataset, tmp_path, train=True, max_steps=4,
                        use_adaptive_entropy=True, entropy_coef=0.02, entropy_coef_delta=0.05, entropy_coef_max=0.1,
                        **flags)
    logged = [[row["entropy_coef"] for row in trainer.state.log_history if "loss" in row] for trainer in (stock, ours)]
    assert logged[0] == pytest.approx(coefs, abs=1e-9) and logged[1] == pytest.approx(coefs, abs=1e-9)
    assert _losses(stock) == pytest.approx(_losses(ours), abs=ATOL)
    _assert_same_parameters(stock, ours)


def test_adaptive_entropy_state_is_resumed(tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    """Interrupted at step 2 and resumed, the run continues with the controller where it was: the same coefficients,
    losses and parameters as the uninterrupted run."""
    flags = dict(use_adaptive_entropy=True, entropy_coef=0.0, entropy_coef_delta=0.03, entropy_target=100.0,
                 max_steps=4)
    straight = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                     tmp_path / "straight", **flags)
    straight.train()
    first = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                  tmp_path / "split", save_strategy="steps", save_steps=2, **flags)
    first.train()
    resumed = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path / "split", **flags)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-2"))
    rows = [[row for row in trainer.state.log_history if "loss" in row] for trainer in (straight, resumed)]
    assert [row["entropy_coef"] for row in rows[1]] == pytest.approx([0.03, 0.06, 0.09, 0.12], abs=1e-9)
    assert [row["loss"] for row in rows[1]] == pytest.approx([row["loss"] for row in rows[0]], abs=ATOL)
    _assert_same_parameters(straight, resumed)
