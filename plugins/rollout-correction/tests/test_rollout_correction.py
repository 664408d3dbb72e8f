"""Rollout correction: every mode against its formula, the coupling check, and training from a rollout function
that returns sampler log-probs."""

import math

import pytest
import torch
from po_registry_rollout_correction import RolloutCorrection

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args


class TestConformance(PluginConformance):
    method = "rollout-correction"
    train_steps = 0  # trained below, from a rollout function with sampler log-probs


def _batch(po_loss_batch, mode, clip_min=0.0):
    batch = po_loss_batch(rows=2, width=3, options={"rollout_correction_mode": mode, "rollout_correction_clip_max": 2.0,
                                                    "rollout_correction_clip_min": clip_min})
    batch.mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    batch.old_logps = torch.zeros(2, 3)
    # log w = old - sampler: token weights e^0.5, e^-2, e^1 and e^1, e^0.2 (the last is padding)
    batch.sampling_logps = -torch.tensor([[0.5, -2.0, 1.0], [1.0, 0.2, float("nan")]])
    return batch


def test_token_truncate(po_loss_batch):
    weight = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "token_truncate"))
    expected = torch.tensor([[math.exp(0.5), math.exp(-2.0), 2.0], [2.0, math.exp(0.2), 1.0]])
    assert torch.allclose(weight, expected)


def test_token_mask_with_a_lower_bound(po_loss_batch):
    weight = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "token_mask", clip_min=0.5))
    expected = torch.tensor([[math.exp(0.5), 0.0, 0.0], [0.0, math.exp(0.2), 1.0]])
    assert torch.allclose(weight, expected)


def test_sequence_modes(po_loss_batch):
    truncate = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "sequence_truncate"))
    assert torch.allclose(truncate, torch.tensor([[math.exp(-0.5)], [2.0]]))  # sums -0.5 and 1.2
    mask = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "sequence_mask"))
    assert torch.allclose(mask, torch.tensor([[math.exp(-0.5)], [0.0]]))


def test_no_sampler_log_probs_no_correction(po_loss_batch):
    batch = po_loss_batch(options={"rollout_correction_mode": "token_mask", "rollout_correction_clip_max": 3.0,
                                   "rollout_correction_clip_min": 0.0})
    assert RolloutCorrection().po_rollout_correction(batch) is None


def test_mismatched_levels_are_refused_when_asked():
    options = {"rollout_correction_match_ratio": True, "rollout_correction_mode": "sequence_mask"}
    with pytest.raises(OptionError, match="sequence-level rollout correction .* token-level importance ratio of "
                                          "plugin 'policy-ratio'"):
        default_args(["rollout-correction"], options)
    default_args(["rollout-correction"], options, importance_sampling_level="sequence")  # matching levels build
    default_args(["rollout-correction"], {"rollout_correction_mode": "sequence_mask"})  # not asked: allowed


def test_trains_from_a_rollout_function_with_sampler_log_probs(po_tokenizer, po_tiny_model_dir, tmp_path):
    from po_registry.config import PolicyOptimizationConfig
    from po_registry.tasks import exact_match, get_task
    from po_registry.trainer import PolicyOptimizationTrainer

    def rollout(prompts, trainer):
        """Sample with the policy and report log-probs perturbed as a mismatched inference engine would."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        encoded = po_tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=6, do_sample=True, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=po_tokenizer.pad_token_id)
        width = encoded["input_ids"].shape[1]
        scores = torch.stack(out.scores, 1).log_softmax(-1)
        prompt_ids, completion_ids, logprobs = [], [], []
        for row in range(len(prompts)):
            tokens = out.sequences[row, width:].tolist()
            if po_tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(po_tokenizer.eos_token_id) + 1]
            prompt_ids.append(encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist())
            completion_ids.append(tokens)
            logprobs.append([scores[row, t, tok].item() + 0.3 * torch.randn(()).item() for t, tok in enumerate(tokens)])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    def partial(completions, answer, **kwargs):
        return [e + 0.1 * sum(c.isdigit() for c in text) for e, text in zip(exact_match(completions, answer), completions)]

    config = PolicyOptimizationConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
        per_device_train_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-2, max_steps=2,
        logging_steps=1, save_strategy="no", disable_tqdm=True, methods=["rollout-correction"],
        method_options={"rollout_correction_mode": "token_truncate", "rollout_correction_clip_max": 1.5})
    trainer = PolicyOptimizationTrainer(model=po_tiny_model_dir, processing_class=po_tokenizer, reward_funcs=[partial],
                                        args=config, train_dataset=get_task("addition").dataset(64),
                                        rollout_func=rollout)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "rollout_correction/weight_mean" in row]
    assert len(logged) == 2 and all(0 < row["rollout_correction/weight_mean"] <= 1.5 for row in logged)
    assert all(row["rollout_correction/clipped_fraction"] > 0 for row in logged)
