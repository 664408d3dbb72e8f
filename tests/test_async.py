"""Asynchronous sampling (``async_staleness``): a generation worker with its own copy of the policy. k = 0 equals the
synchronous trainer exactly; k >= 1 keeps its batches within k versions, records the sampler's log-probs (checked
against the weights of the version that sampled), follows the trainer's prompt order across epochs, is reproducible,
refuses what it does not support, and learns the embedded task."""

import warnings

import pytest
import torch

from po_registry.errors import CouplingWarning, OptionError
from po_registry.testing import partial_credit


def _weights(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def _logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def test_zero_staleness_equals_the_synchronous_trainer(po_trainer):
    sync = po_trainer(["grpo"], max_steps=3)
    sync.train()
    worker = po_trainer(["grpo"], max_steps=3, async_staleness=0, output_dir=str(sync.args.output_dir) + "-async")
    worker.train()
    assert _logged(worker, "loss") == _logged(sync, "loss")
    assert all(p.equal(q) for p, q in zip(sync.model.parameters(), worker.model.parameters()))
    assert _logged(worker, "async/staleness") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_batch_ahead_samples_with_the_previous_weights(po_trainer, monkeypatch, lora):
    """k = 1: after the first batch every batch was sampled by the weights one optimizer step old. Its recorded
    log-probs are those weights' log-probs of the sampled tokens (recomputed here with a copy holding them), not the
    learner's at the time it trains on them; for full fine-tuning and for a LoRA adapter."""
    from peft import LoraConfig

    from po_registry.trainer import PolicyOptimizationTrainer, sampled_token_logps

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    trainer = po_trainer(["grpo", "rollout-correction"], max_steps=4, async_staleness=1, peft_config=peft_config,
                         learning_rate=5e-2 if lora else 1e-2,
                         method_options={"rollout_correction_mode": "token_truncate"})
    versions = {0: _weights(trainer)}
    rollouts = []
    original = PolicyOptimizationTrainer._score_round

    def record(self, inputs):
        out, kept = original(self, inputs)
        rollouts.append((self.state.global_step, {key: value for key, value in out.items()}))
        return out, kept

    monkeypatch.setattr(PolicyOptimizationTrainer, "_score_round", record)
    from transformers import TrainerCallback

    class Versions(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            versions[state.global_step] = _weights(trainer)

    trainer.add_callback(Versions())
    trainer.train()
    assert _logged(trainer, "async/staleness") == [0.0, 1.0, 1.0, 1.0]

    def logps_at(version, out):  # the trainer's model, trained, set back to a version's weights
        with torch.no_grad():
            for p, w in zip(trainer.model.parameters(), versions[version]):
                p.copy_(w)
        return sampled_token_logps(trainer, out)

    for step, out in rollouts[1:]:
        mask = out["completion_mask"].bool()
        behaviour = out["sampling_per_token_logps"][mask]
        assert torch.allclose(behaviour, logps_at(step - 1, out)[mask], atol=1e-5)
        assert (behaviour - logps_at(step, out)[mask]).abs().max() > 1e-4  # the learner's own differ


def test_in_the_trainers_prompt_order_across_epochs(po_trainer):
    """Two prompts per batch from a dataset of eight: four batches an epoch, so nine steps two batches ahead cross two
    epoch boundaries; the worker's batches must be the trainer's (it raises otherwise)."""
    from po_registry.registry import get_task

    trainer = po_trainer(["grpo"], max_steps=9, async_staleness=2)
    trainer.train_dataset = get_task("addition").dataset(8)
    trainer.train()
    assert _logged(trainer, "async/staleness") == [0.0, 1.0] + [2.0] * 7


def test_without_a_correction_it_warns(po_trainer):
    with pytest.warns(CouplingWarning, match="async_staleness=1 without a rollout correction"):
        po_trainer(["grpo"], async_staleness=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CouplingWarning)
        po_trainer(["grpo"], async_staleness=0)  # nothing is stale


@pytest.mark.parametrize("methods, fields, message", [
    (["dynamic-sampling"], {}, "no refill rounds"),
    (["grpo"], {"rollout_func": lambda prompts, trainer: None}, "no rollout function"),
])
def test_unsupported_settings_are_refused_by_name(po_trainer, methods, fields, message):
    with pytest.raises(OptionError, match=f"async_staleness=1: the generation worker supports .*{message}"):
        po_trainer(methods, async_staleness=1, **fields)


def test_a_negative_staleness_is_refused():
    from po_registry.testing import default_args

    with pytest.raises(OptionError, match="async_staleness must be >= 0"):
        default_args(async_staleness=-1)


def test_one_batch_ahead_learns_the_embedded_task(capsys, tmp_path):
    """The main job (embedded warm start, addition, LoRA), 40 steps with the worker one batch ahead and the rollout
    correction, through the command line and a config file: held-out greedy accuracy rises, every batch after the
    first one step stale."""
    import json

    from po_registry.cli import main

    config = tmp_path / "async.yaml"
    config.write_text("async_staleness: 1\n")
    code = main(["train", "--steps", "40", "--config", str(config), "--method", "grpo,rollout-correction",
                 "--option", "rollout_correction_mode=token_truncate", "--output-dir", str(tmp_path / "run")])
    _, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.03, summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["async/staleness"] for row in rows if "async/staleness" in row] == [0.0] + [1.0] * 39


def test_an_independent_copy_computes_with_its_own_weights():
    """TRL patches the policy's forward (its fused LM head) with a function that calls the original model: a plain
    deep copy, its weights zeroed, still gives the original's logits. The worker's and the ema teacher's copies
    (context.independent_copy) give their own."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from po_registry.context import independent_copy
    from po_registry.testing import char_tokenizer, tiny_causal_lm

    model = tiny_causal_lm(char_tokenizer())
    add_fused_lm_head(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    for clone, own in ((copy.deepcopy(model), False), (independent_copy(model), True)):
        with torch.no_grad():
            for p in clone.parameters():
                p.zero_()
            logits = clone(input_ids=ids).logits
        assert (logits.abs().sum() == 0) == own
