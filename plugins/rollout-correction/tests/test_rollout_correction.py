"""Rollout correction: every mode against its formula, the coupling check, and training from a rollout function
that returns sampler log-probs."""

import math
import re

import pytest
import torch
from po_registry_rollout_correction import RolloutCorrection

from po_registry import OptionError
from po_registry.testing import PluginConformance, default_args, partial_credit


class TestConformance(PluginConformance):
    method = "rollout-correction"
    train_steps = 0  # trained below, from a rollout function with sampler log-probs


def _batch(po_loss_batch, mode, clip_min=0.0):
    batch = po_loss_batch(rows=2, width=4, options={"rollout_correction_mode": mode, "rollout_correction_clip_max": 2.0,
                                                    "rollout_correction_clip_min": clip_min,
                                                    "rollout_correction_batch_normalize": False,
                                                    "rollout_correction_bypass": False})
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    batch.old_logps = torch.zeros(2, 4)
    # log w = old - sampler: token weights e^0.5, (hole: e^3), e^-2, e^1 and e^1, e^0.2 (then padding). The hole is an
    # environment token between loss tokens: it is no sample of the policy, so it weighs 1 and adds nothing to a sum.
    batch.sampling_logps = -torch.tensor([[0.5, 3.0, -2.0, 1.0], [1.0, 0.2, float("nan"), float("nan")]])
    return batch


def test_token_truncate(po_loss_batch):
    weight = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "token_truncate"))
    expected = torch.tensor([[math.exp(0.5), 1.0, math.exp(-2.0), 2.0], [2.0, math.exp(0.2), 1.0, 1.0]])
    assert torch.allclose(weight, expected)


def test_token_mask_with_a_lower_bound(po_loss_batch):
    weight = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "token_mask", clip_min=0.5))
    expected = torch.tensor([[math.exp(0.5), 1.0, 0.0, 0.0], [0.0, math.exp(0.2), 1.0, 1.0]])
    assert torch.allclose(weight, expected)


def test_sequence_modes(po_loss_batch):
    """Sequence log-weights over the loss tokens: 0.5 - 2 + 1 = -0.5 (the hole's 3 left out; with it 2.5, which
    truncates to 2 and is masked to 0) and 1 + 0.2 = 1.2 (> log 2: truncated to 2, masked to 0)."""
    truncate = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "sequence_truncate"))
    assert torch.allclose(truncate, torch.tensor([[math.exp(-0.5)], [2.0]]))
    mask = RolloutCorrection().po_rollout_correction(_batch(po_loss_batch, "sequence_mask"))
    assert torch.allclose(mask, torch.tensor([[math.exp(-0.5)], [0.0]]))


def test_no_sampler_log_probs_no_correction(po_loss_batch):
    batch = po_loss_batch(options={"rollout_correction_mode": "token_mask", "rollout_correction_clip_max": 3.0,
                                   "rollout_correction_clip_min": 0.0, "rollout_correction_bypass": False})
    assert RolloutCorrection().po_rollout_correction(batch) is None


def test_mismatched_levels_are_refused_when_asked():
    options = {"rollout_correction_match_ratio": True, "rollout_correction_mode": "sequence_mask"}
    with pytest.raises(OptionError, match="sequence-level rollout correction .* token-level importance ratio of "
                                          "plugin 'policy-ratio'"):
        default_args(["rollout-correction"], options)
    default_args(["rollout-correction"], options, importance_sampling_level="sequence")  # matching levels build
    default_args(["rollout-correction"], {"rollout_correction_mode": "sequence_mask"})  # not asked: allowed


def make_rollout(tokenizer, noise=0.3, seed=0):
    """A rollout function that samples with the policy and reports log-probs perturbed by ``noise``, as a
    mismatched inference engine would; deterministic given the torch seed and ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def rollout(prompts, trainer):
        model = trainer.accelerator.unwrap_model(trainer.model)
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=6, do_sample=True, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
        width = encoded["input_ids"].shape[1]
        scores = torch.stack(out.scores, 1).log_softmax(-1)
        prompt_ids, completion_ids, logprobs = [], [], []
        for row in range(len(prompts)):
            tokens = out.sequences[row, width:].tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            prompt_ids.append(encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist())
            completion_ids.append(tokens)
            shift = noise * torch.randn(len(tokens), generator=generator)
            logprobs.append([scores[row, t, tok].item() + shift[t].item() for t, tok in enumerate(tokens)])
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout


COMMON = dict(use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False, per_device_train_batch_size=8,
              num_generations=4, max_completion_length=6, learning_rate=1e-2, logging_steps=1, save_strategy="no",
              disable_tqdm=True, loss_type="grpo")


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_equals_trl_vllm_importance_sampling(po_tokenizer, po_tiny_model_dir, tmp_path, mode):
    """TRL applies its vLLM correction only with use_vllm; with the sampler replaced by a rollout function and
    the flag switched on after construction, TRL's own code computes the weights, and ours must match."""
    from trl import GRPOConfig, GRPOTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer, micro_batch_loss, rollout

    dataset = get_task("addition").dataset(64)
    rows = [dict(dataset[i]) for i in range(2) for _ in range(4)]
    stock = GRPOTrainer(model=po_tiny_model_dir, processing_class=po_tokenizer, reward_funcs=[partial_credit],
                        train_dataset=dataset, rollout_func=make_rollout(po_tokenizer),
                        args=GRPOConfig(output_dir=str(tmp_path / "stock"), vllm_importance_sampling_mode=mode,
                                        vllm_importance_sampling_clip_max=1.3, vllm_importance_sampling_clip_min=0.8,
                                        **COMMON))
    stock.use_vllm, stock._last_loaded_step = True, stock.state.global_step  # TRL's correction path, no engine
    ours = PolicyOptimizationTrainer(
        model=po_tiny_model_dir, processing_class=po_tokenizer, reward_funcs=[partial_credit], train_dataset=dataset,
        rollout_func=make_rollout(po_tokenizer),
        args=PolicyOptimizationConfig(output_dir=str(tmp_path / "ours"), methods=["rollout-correction"],
                                      method_options={"rollout_correction_mode": mode, "rollout_correction_clip_max": 1.3,
                                                      "rollout_correction_clip_min": 0.8}, **COMMON))
    results = {}
    for name, trainer in (("stock", stock), ("ours", ours)):
        torch.manual_seed(0)
        batch = rollout(trainer, rows)
        trainer.model.zero_grad()
        loss = micro_batch_loss(trainer, batch)
        loss.backward()
        results[name] = (batch, loss.detach(), [p.grad.clone() for p in trainer.model.parameters()])
    stock_batch, ours_batch = results["stock"][0], results["ours"][0]
    assert torch.equal(stock_batch["completion_ids"], ours_batch["completion_ids"])
    ratio = stock_batch["importance_sampling_ratio"]
    assert ((ratio == 0) | (ratio != 1)).any()  # the correction is not a no-op here
    assert torch.allclose(results["stock"][1], results["ours"][1], atol=1e-6)
    for a, b in zip(results["stock"][2], results["ours"][2]):
        assert torch.allclose(a, b, atol=1e-6)


def test_trains_from_a_rollout_function_with_sampler_log_probs(po_tokenizer, po_tiny_model_dir, tmp_path):
    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer

    config = PolicyOptimizationConfig(
        output_dir=str(tmp_path), max_steps=2, methods=["rollout-correction"],
        method_options={"rollout_correction_mode": "token_truncate", "rollout_correction_clip_max": 1.5}, **COMMON)
    trainer = PolicyOptimizationTrainer(model=po_tiny_model_dir, processing_class=po_tokenizer, reward_funcs=[partial_credit],
                                        args=config, train_dataset=get_task("addition").dataset(64),
                                        rollout_func=make_rollout(po_tokenizer))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "rollout_correction/weight_mean" in row]
    assert len(logged) == 2 and all(0 < row["rollout_correction/weight_mean"] <= 1.5 for row in logged)
    assert all(row["rollout_correction/clipped_fraction"] > 0 for row in logged)


# -- rejection sampling and batch normalisation ---------------------------------------------------------------------

REJECTION = {"rollout_correction_mode": "token_truncate", "rollout_correction_clip_max": 100.0,
             "rollout_correction_clip_min": 0.0, "rollout_correction_match_ratio": False,
             "rollout_correction_batch_normalize": False, "rollout_rejection": "", "rollout_rejection_bounds": "",
             "rollout_correction_bypass": False}


def _sampled(po_loss_batch, weights, mask, **options):
    """A micro-batch whose sampler log-probs give the per-token weights pi_old / mu = ``weights``."""
    batch = po_loss_batch(rows=len(weights), width=len(weights[0]), options={**REJECTION, **options})
    batch.mask = torch.tensor(mask)
    batch.old_logps = torch.full(batch.mask.shape, -1.0)
    batch.sampling_logps = batch.old_logps - torch.tensor(weights).log()
    return batch


def test_token_and_sequence_rejection_by_hand(po_loss_batch):
    """Row 0: weights 1.0, 3.0 (a masked 50.0 between them is ignored); row 1: 0.9, 1.1, 1.0.
    token_k1 0.5_2: only row 0's 3.0 is out. seq_max_k3 0.5: k3(3) = 3 - 1 - ln 3 = 0.901 > 0.5 drops row 0;
    row 1's largest k3 is k3(0.9) = 0.9 - 1 - ln 0.9 = 0.00536. seq_mean_k1 0.9_1.2 on row 0: exp((0 + ln 3) / 2)
    = sqrt(3) = 1.73 > 1.2 drops it; row 1: exp(mean of ln 0.9, ln 1.1, 0) = 0.9966, kept."""
    weights = [[1.0, 50.0, 3.0], [0.9, 1.1, 1.0]]
    mask = [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    token = _sampled(po_loss_batch, weights, mask, rollout_rejection="token_k1", rollout_rejection_bounds="0.5_2")
    assert RolloutCorrection().po_token_mask(token)[mask_bool(mask)].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    for criterion, bound in (("seq_max_k3", "0.5"), ("seq_mean_k1", "0.9_1.2")):
        batch = _sampled(po_loss_batch, weights, mask, rollout_rejection=criterion, rollout_rejection_bounds=bound)
        assert RolloutCorrection().po_token_mask(batch).tolist() == [[0.0] * 3, [1.0] * 3], criterion
    # every criterion must pass: seq_sum_k2 0.5 drops row 0 ((ln 3)^2 / 2 = 0.603), keeps row 1 (0.0101); token_k1
    # 0.95_2 then drops row 1's 0.9
    both = _sampled(po_loss_batch, weights, mask, rollout_rejection="seq_sum_k2,token_k1",
                    rollout_rejection_bounds="0.5,0.95_2")
    assert RolloutCorrection().po_token_mask(both).tolist() == [[0.0] * 3, [0.0, 1.0, 1.0]]


def mask_bool(mask):
    return torch.tensor(mask).bool()


def test_batch_normalisation_makes_the_weights_average_one(po_loss_batch):
    """Token truncate at C = 2: weights 1, 3 -> 2, 0.5 over three loss tokens (mean 7/6); each divided by 7/6."""
    batch = _sampled(po_loss_batch, [[1.0, 3.0], [0.5, 9.0]], [[1.0, 1.0], [1.0, 0.0]],
                     rollout_correction_clip_max=2.0, rollout_correction_batch_normalize=True)
    weight = RolloutCorrection().po_rollout_correction(batch)
    assert torch.allclose(weight[batch.mask.bool()], torch.tensor([1.0, 2.0, 0.5]) * 6 / 7)
    sequence = _sampled(po_loss_batch, [[1.0, 3.0], [0.5, 9.0]], [[1.0, 1.0], [1.0, 0.0]],
                        rollout_correction_mode="sequence_truncate", rollout_correction_clip_max=10.0,
                        rollout_correction_batch_normalize=True)  # sequence weights 3 and 0.5: mean 1.75
    assert torch.allclose(RolloutCorrection().po_rollout_correction(sequence), torch.tensor([[3.0], [0.5]]) / 1.75)


@pytest.mark.parametrize("criteria, bounds, message", [
    ("token_k4", "1", "unknown criterion 'token_k4'"),
    ("token_k1,seq_max_k3", "2,3,4", "3 bounds for 2 criteria"),
    ("token_k1", "3_2", "0 < lower <= upper"),
    ("seq_max_k2", "x", "'x' for seq_max_k2 is not a number"),
    ("", "2", "rollout_rejection_bounds is set but rollout_rejection names no criterion"),
])
def test_bad_rejection_settings_are_refused_by_name(criteria, bounds, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        default_args(["rollout-correction"], {"rollout_rejection": criteria, "rollout_rejection_bounds": bounds})


class TestConformanceRejection(PluginConformance):
    method = "rollout-correction"
    options = {"rollout_rejection": "token_k1,seq_max_k3", "rollout_rejection_bounds": "0.5_2,1.0",
               "rollout_correction_batch_normalize": True}
    train_steps = 0


# -- bypass mode: the sampler's log-probs as pi_old ------------------------------------------------------------------

BYPASS = dict(COMMON, num_iterations=2)  # TRL recomputes pi_old here (generation every 2 steps, 1 accumulation step)


def _trainer(kind, po_tokenizer, po_tiny_model_dir, tmp_path, bypass=True, rollout_func=True):
    from trl import GRPOConfig, GRPOTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer

    common = dict(model=po_tiny_model_dir, processing_class=po_tokenizer, reward_funcs=[partial_credit],
                  train_dataset=get_task("addition").dataset(64),
                  rollout_func=make_rollout(po_tokenizer) if rollout_func else None)
    if kind == "stock":
        return GRPOTrainer(args=GRPOConfig(output_dir=str(tmp_path / kind), **BYPASS), **common)
    options = {"rollout_correction_bypass": bypass, "rollout_correction_mode": "token_truncate"}
    return PolicyOptimizationTrainer(args=PolicyOptimizationConfig(
        output_dir=str(tmp_path / kind), methods=["rollout-correction"], method_options=options, **BYPASS), **common)


def _rows():
    from po_registry.registry import get_task

    dataset = get_task("addition").dataset(64)
    return [dict(dataset[i]) for i in range(2) for _ in range(4)]


def test_bypass_takes_the_sampler_log_probs_as_pi_old_without_recomputing_them(po_tokenizer, po_tiny_model_dir,
                                                                               tmp_path, monkeypatch):
    from po_registry.trainer import PolicyOptimizationTrainer, rollout

    passes = []
    original = PolicyOptimizationTrainer._get_per_token_logps_and_entropies
    monkeypatch.setattr(PolicyOptimizationTrainer, "_get_per_token_logps_and_entropies",
                        lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    for bypass, forward_passes in ((False, 1), (True, 0)):
        trainer = _trainer(f"bypass-{bypass}", po_tokenizer, po_tiny_model_dir, tmp_path, bypass=bypass)
        passes.clear()
        torch.manual_seed(0)
        batch = rollout(trainer, _rows())
        assert len(passes) == forward_passes, bypass
        same = torch.equal(batch["old_per_token_logps"], batch["sampling_per_token_logps"])
        assert same == bypass  # the recomputed pi_old differs from the noisy sampler's
        assert trainer.args.gradient_accumulation_steps == 1  # restored after the rollout


def test_bypass_loss_equals_trl_clipping_around_the_sampler(po_tokenizer, po_tiny_model_dir, tmp_path):
    """TRL's own loss with the sampler's log-probs put in place of its recomputed pi_old (verl's bypass with the
    ppo_clip loss): the same loss and gradients, and the ratio pi_theta / mu is clipped for some tokens."""
    from po_registry.trainer import micro_batch_loss, rollout

    results = {}
    for kind in ("stock", "ours"):
        trainer = _trainer(kind, po_tokenizer, po_tiny_model_dir, tmp_path)
        torch.manual_seed(0)
        batch = rollout(trainer, _rows())
        if kind == "stock":
            batch["old_per_token_logps"] = batch["sampling_per_token_logps"]
        trainer.model.zero_grad()
        loss = micro_batch_loss(trainer, batch)
        loss.backward()
        results[kind] = (batch, loss.detach(), [p.grad.clone() for p in trainer.model.parameters()])
    batch = results["ours"][0]
    mask = batch["completion_mask"].bool()
    from po_registry.trainer import sampled_token_logps

    log_ratio = (sampled_token_logps(trainer, batch) - batch["sampling_per_token_logps"])[mask]
    assert (log_ratio.abs() > math.log(1.2)).any()  # outside the clip range for some tokens
    assert torch.allclose(results["stock"][1], results["ours"][1], atol=1e-6)
    for a, b in zip(results["stock"][2], results["ours"][2]):
        assert torch.allclose(a, b, atol=1e-6)


def test_bypass_applies_no_weight_and_rejects_by_the_current_policy_over_the_sampler(po_loss_batch):
    """In bypass mode old_logps is mu: the weight pi_old / mu would be 1. Rejection reads pi_theta / mu instead:
    token log-weights 0.1, 1.0, -1.5 against the k1 bounds [0.5, 2] (|log w| <= 0.693) keep tokens 1 and nothing else."""
    batch = po_loss_batch(rows=1, width=3, options={**REJECTION, "rollout_correction_bypass": True,
                                                    "rollout_rejection": "token_k1",
                                                    "rollout_rejection_bounds": "0.5_2"})
    batch.mask = torch.ones(1, 3)
    batch.sampling_logps = torch.tensor([[-1.0, -2.0, -0.5]])
    batch.old_logps = batch.sampling_logps.clone()  # what the trainer gives in bypass mode
    batch.logps = batch.sampling_logps + torch.tensor([[0.1, 1.0, -1.5]])
    logged = {}
    batch.log_metric = logged.__setitem__
    assert RolloutCorrection().po_rollout_correction(batch) is None
    assert logged["rollout_correction/weight_mean"] == pytest.approx((math.exp(0.1) + math.e + math.exp(-1.5)) / 3)
    assert RolloutCorrection().po_token_mask(batch).tolist() == [[1.0, 0.0, 0.0]]


def test_bypass_without_sampler_log_probs_is_refused_before_any_update(po_tokenizer, po_tiny_model_dir, tmp_path):
    trainer = _trainer("no-sampler", po_tokenizer, po_tiny_model_dir, tmp_path, rollout_func=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="bypass mode .* needs a sampler that returns them"):
        trainer.train()
    assert all(p.equal(q) for p, q in zip(before, trainer.model.parameters()))


def test_bypass_trains_from_a_rollout_function(po_tokenizer, po_tiny_model_dir, tmp_path):
    trainer = _trainer("train", po_tokenizer, po_tiny_model_dir, tmp_path)
    trainer.args.max_steps = 2
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters()))
    assert all("rollout_correction/weight_mean" in row for row in trainer.state.log_history if "loss" in row)
