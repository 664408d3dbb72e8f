"""Run as one process (``python``) and under ``torchrun --nproc_per_node 2``: every method on one generation batch.

Both launches see the same global batch and the same samples: completions are scripted, a deterministic function
of the token context and of its occurrence among equal contexts in the call (``scripted_completion``), so one
process or two, single- or multi-turn, each row gets the same completion and the same sampler log-probs. Each
process holds ``ROWS_PER_SLOT`` rows of every *slot* it owns (two slots: one process owns both, two own one each),
so the global row order is the same in both launches. Per case: the advantages of every row, the micro-batch
losses of one accumulation window of two micro-batches (micro-batch k is chunk k of every slot, as TRL's split
gives each process one chunk per step), the parameter gradient after the window (averaged over processes, as DDP
does) and the metrics the main process would log; then Clip-Cov's and KL-Cov's token choice on a hand-made
micro-batch (``covariance_selections``). Writes ``world-<W>.pt`` into the directory given as the first argument; a
case that raises records its error (both launches run the same code, so both raise alike). Optional further
arguments name the cases to run.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from po_registry.config import PolicyOptimizationConfig  # noqa: E402
from po_registry.testing import char_tokenizer, tiny_causal_lm  # noqa: E402
from po_registry.trainer import PolicyOptimizationTrainer, micro_batch_loss, scored_rollout, train_metrics  # noqa: E402

SLOTS = 2  # the comparison's process count: slot s holds global rows s * ROWS_PER_SLOT ...
G = 4
ROWS_PER_SLOT = 2 * G  # two prompt groups per slot
MICRO_BATCHES = 2  # steps_per_generation = gradient_accumulation_steps
MAX_COMPLETION = 6
TEACHER_SEED = 1

# Single-turn prompts, one group each (slot 0: the first two, slot 1: the last two). In the first group an empty
# completion is unscorable (every reward None); the third group's rewards are all equal ("constant").
PROMPTS = [("3+4=", "7", "unscorable-empty"), ("12+9=", "21", "partial"), ("5+5=", "10", "constant"),
           ("8+1=", "9", "partial")]
GUESS_PROMPTS = ["game 0007: guess 1-16\n", "game 0412: guess 1-16\n", "game 1093: guess 1-16\n",
                 "game 2050: guess 1-16\n"]


def case(methods, options=None, task="addition", **flags):
    return {"methods": list(methods), "options": dict(options or {}), "task": task, "flags": flags}


def cases(teacher: str) -> dict[str, dict]:
    """Every registered method alone (with what it needs), then the documented compositions and flag variants."""
    opd = {"opd_teacher": teacher}
    no_refill = {"dynamic_sampling_max_rounds": 0}  # refill rounds draw fresh prompts per process: see the test
    special = {
        "kl": case(["kl"], beta=0.04),
        "kl-reward": case(["kl-reward"], beta=0.04),
        "reinforce-pp": case(["reinforce-pp"], beta=0.04),
        "reinforce-pp-baseline": case(["reinforce-pp-baseline"], beta=0.04),
        "clip-cov": case(["clip-cov"], {"clip_cov_fraction": 0.1, "clip_cov_lower": 0.0, "clip_cov_upper": 100.0}),
        "kl-cov": case(["kl-cov"], {"kl_cov_fraction": 0.1}),
        "dynamic-sampling": case(["dynamic-sampling"], no_refill),
        "dapo": case(["dapo"], no_refill),
        "high-entropy-tokens": case(["high-entropy-tokens"], {"entropy_top_quantile": 0.5}),
        "positive-nll": case(["positive-nll"], {"positive_nll_threshold": 0.3}),
        "process-reward": case(["process-reward"], {"process_reward_function": "helpers:digit_token_rewards"}),
        "turn-advantage": case(["turn-advantage"], task="guess"),
        "gigpo": case(["gigpo"], task="guess"),
        "turn-return": case(["turn-return"], task="guess"),
    }
    from po_registry import get_registry

    table = {}
    for name in sorted(get_registry().methods):
        table[name] = special.get(name) or case([name], opd if name.startswith("opd") else None)
    table.update({
        "opd (full divergence)": case(["opd"], {**opd, "opd_divergence": "full"}),
        "opd (full generalized JSD)": case(["opd"], {**opd, "opd_divergence": "full", "opd_beta": 0.5}),
        "opd-kl (full divergence)": case(["opd-kl"], {**opd, "opd_divergence": "full"}),
        "grpo (beta, entropy quantile)": case(["grpo"], beta=0.04, top_entropy_quantile=0.5),
        "rollout-correction (rejection, batch normalised)": case(
            ["rollout-correction"], {"rollout_correction_mode": "token_truncate", "rollout_rejection": "seq_max_k3",
                                     "rollout_rejection_bounds": "1.0", "rollout_correction_batch_normalize": True}),
        "rollout-correction (bypass, rejection)": case(
            ["rollout-correction"], {"rollout_correction_bypass": True, "rollout_rejection": "token_k1",
                                     "rollout_rejection_bounds": "0.5_2"}),
        "opd (two teachers, top-k 8, forward KL)": case(
            ["opd"], {"opd_teacher": f"{teacher},{teacher}", "opd_teacher_weights": "0.3,0.7", "opd_divergence": "full",
                      "opd_top_k": 8, "opd_beta": 0.0}),
        "opd-advantage (two teachers)": case(["opd-advantage"], {"opd_teacher": f"{teacher},{teacher}",
                                                                 "opd_teacher_weights": "0.3,0.7"}),
        "sdpo (live teacher, blended)": case(["sdpo"], {"sdpo_teacher": "live", "sdpo_weight": 0.5,
                                                        "sdpo_success_threshold": 0.1}),
        "kl (k3+, adaptive beta)": case(["kl"], {"kl_estimator": "k3+", "kl_target": 0.001, "kl_horizon": 10.0},
                                        beta=0.04),
        "kl-reward (adaptive beta)": case(["kl-reward"], {"kl_reward_target": 0.001, "kl_reward_horizon": 10.0},
                                          beta=0.04),
        # each micro-batch ends an optimizer step here: the controller measures the first, applies to the second
        "grpo (adaptive entropy, entropy quantile)": case(["grpo"], use_adaptive_entropy=True, entropy_coef=0.02,
                                                          entropy_coef_delta=0.05, entropy_target=100.0,
                                                          top_entropy_quantile=0.5),
        "grpo (loss_type grpo, mask truncated)": case(["grpo"], loss_type="grpo", mask_truncated_completions=True),
        "grpo (guess: environment holes)": case(["grpo"], task="guess"),
        "ppo (guess: environment holes)": case(["ppo"], task="guess"),
        "dapo,high-entropy-tokens": case(["dapo", "high-entropy-tokens"], {**no_refill, "entropy_top_quantile": 0.5}),
        "gpg,dynamic-sampling": case(["gpg", "dynamic-sampling"], no_refill),
        "gspo,dynamic-sampling": case(["gspo", "dynamic-sampling"], no_refill),
        "rloo,gspo": case(["rloo", "gspo"]),
        "rloo,kl-reward": case(["rloo", "kl-reward"], beta=0.04),
        "process-reward,gspo-token": case(["process-reward", "gspo-token"],
                                          {"process_reward_function": "helpers:digit_token_rewards"}),
        "gspo,dynamic-sampling,high-entropy-tokens,overlong-reward,kl-reward": case(
            ["gspo", "dynamic-sampling", "high-entropy-tokens", "overlong-reward", "kl-reward"],
            {**no_refill, "entropy_top_quantile": 0.5}, beta=0.04),
    })
    return table


# -- scripted generation ------------------------------------------------------------------------------------------


def _rng(*key) -> random.Random:
    return random.Random(int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big"))


def scripted_completion(context: list[int], occurrence: int, vocabulary: list[int], eos: int,
                        max_length: int) -> tuple[list[int], list[float]]:
    """A completion and its sampler log-probs, drawn from the context and its occurrence: length 1 to max_length,
    ending in EOS when shorter (a length-1 completion is EOS alone) and truncated half the time at max_length."""
    rng = _rng(tuple(context), occurrence)
    length = rng.randint(1, max_length)
    tokens = [rng.choice(vocabulary) for _ in range(length)]
    if length < max_length or rng.random() < 0.5:
        tokens[-1] = eos
    return tokens, [-rng.uniform(3.0, 5.0) for _ in tokens]


def script_generation(trainer, vocabulary: list[int]) -> None:
    """Replace the trainer's sampling (TRL 1.16's ``_generate_single_turn``, which single-turn rollouts and
    ``generate_turn`` both call) with :func:`scripted_completion`; greedy decoding (ReMax's baseline) stays the
    model's own."""
    original = trainer._generate_single_turn
    eos = trainer.processing_class.eos_token_id

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if trainer.generation_kwargs.get("do_sample") is False:
            return original(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        seen: dict[tuple, int] = {}
        completions, logprobs = [], []
        for context in prompt_ids:
            key = tuple(context)
            tokens, logps = scripted_completion(list(context), seen.get(key, 0), vocabulary, eos,
                                                trainer.max_completion_length)
            seen[key] = seen.get(key, 0) + 1
            completions.append(tokens)
            logprobs.append(logps)
        return completions, logprobs

    trainer._generate_single_turn = generate


def scripted_reward(completions, answer, kind, **kwargs):
    """Partial credit (matching leading characters, 0.1 per digit); constant for the "constant" group; None for
    an empty completion of the "unscorable-empty" group."""
    scores = []
    for text, target, row_kind in zip(completions, answer, kind):
        if row_kind == "constant":
            scores.append(0.5)
        elif row_kind == "unscorable-empty" and not text:
            scores.append(None)
        else:
            prefix = next((i for i, (a, b) in enumerate(zip(text, target)) if a != b), min(len(text), len(target)))
            scores.append(prefix / len(target) + 0.1 * sum(ch.isdigit() for ch in text))
    return scores


# -- one case -------------------------------------------------------------------------------------------------------


def take_rows(batch: dict, index: list[int]) -> dict:
    """The given rows of every per-row entry of a rollout dict (0-d tensors and other entries unchanged)."""
    rows = batch["prompt_ids"].shape[0]
    picked = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            picked[key] = value[index]
        elif isinstance(value, list) and len(value) == rows:
            picked[key] = [value[i] for i in index]
        else:
            picked[key] = value
    return picked


def old_logp_offset(global_row: int, position: int) -> float:
    """A fixed departure of the behaviour policy, so that ratios leave 1 and clips bind."""
    return 0.25 * math.sin(1.7 * global_row + 0.9 * position)


def run_case(spec: dict, model_dir: str, tokenizer, out: str, world: int, rank: int) -> dict:
    from po_registry.agentic import environment_reward, multi_turn_rollout
    from po_registry.tasks import GuessNumber

    slots = list(range(rank * SLOTS // world, (rank + 1) * SLOTS // world))
    if spec["task"] == "guess":
        rows = [{"prompt": prompt} for prompt in GUESS_PROMPTS for _ in range(G)]
        reward, rollout_func = environment_reward, multi_turn_rollout(GuessNumber, max_turns=3, max_tokens=24)
        max_completion, vocabulary = 3, [tokenizer.convert_tokens_to_ids(c) for c in "0123456789"]
    else:
        rows = [{"prompt": p, "answer": a, "kind": k} for p, a, k in PROMPTS for _ in range(G)]
        reward, rollout_func = scripted_reward, None
        max_completion, vocabulary = MAX_COMPLETION, [tokenizer.convert_tokens_to_ids(c) for c in "0123456789+"]
    per_process = ROWS_PER_SLOT * len(slots)
    config = PolicyOptimizationConfig(
        output_dir=os.path.join(out, "trainer"), use_cpu=True, bf16=False, report_to="none",
        gradient_checkpointing=False, per_device_train_batch_size=per_process // MICRO_BATCHES,
        gradient_accumulation_steps=MICRO_BATCHES, num_generations=G, num_iterations=2,
        max_completion_length=max_completion, learning_rate=1e-2, max_steps=1, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=0, ddp_backend="gloo" if world > 1 else None, methods=spec["methods"],
        method_options=spec["options"], **spec["flags"])
    torch.manual_seed(0)
    trainer = PolicyOptimizationTrainer(model=model_dir, reward_funcs=[reward], args=config,
                                        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                        rollout_func=rollout_func)
    script_generation(trainer, vocabulary)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # the policy leaves the reference (and the critic's start) behind
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))

    local_rows = [rows[s * ROWS_PER_SLOT + i] for s in slots for i in range(ROWS_PER_SLOT)]
    global_index = [s * ROWS_PER_SLOT + i for s in slots for i in range(ROWS_PER_SLOT)]
    batch, _ = scored_rollout(trainer, local_rows)
    if batch.get("old_per_token_logps") is not None:
        width = batch["old_per_token_logps"].shape[1]
        offsets = torch.tensor([[old_logp_offset(g, t) for t in range(width)] for g in global_index])
        batch["old_per_token_logps"] = batch["old_per_token_logps"] + offsets
    mask = batch["completion_mask"].float()
    loss_mask = mask * batch["tool_mask"] if "tool_mask" in batch else mask
    advantages = batch["advantages"]
    advantages = advantages.unsqueeze(1).expand_as(mask) if advantages.dim() == 1 else advantages
    record = {"advantages": [(advantages * mask)[i].tolist() for i in range(len(local_rows))],
              "mask": [loss_mask[i].tolist() for i in range(len(local_rows))], "losses": []}

    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    for component in trainer.po_pipeline.assembly.components.values():
        extra = getattr(component, "model", None)
        if isinstance(extra, torch.nn.Module):  # a critic trained by the loss
            trainable += [p for p in extra.parameters() if p.requires_grad]
    chunk = ROWS_PER_SLOT // MICRO_BATCHES
    for k in range(MICRO_BATCHES):
        index = [j * ROWS_PER_SLOT + k * chunk + i for j in range(len(slots)) for i in range(chunk)]
        loss = micro_batch_loss(trainer, take_rows(batch, index), accumulation_steps=MICRO_BATCHES)
        loss.backward()
        record["losses"].append(trainer.accelerator.reduce(loss.detach().reshape(1), reduction="mean").item())
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainable])
    record["gradient"] = trainer.accelerator.reduce(grads, reduction="mean")
    record["metrics"] = {name: sum(values) / len(values) for name, values in train_metrics(trainer).items() if values}
    return record


# -- Clip-Cov and KL-Cov on a hand-made micro-batch, split over the slots --------------------------------------------

# 4 rows x 3 tokens; slot 0 holds rows 0-1, slot 1 rows 2-3. A = +1, -1, +1, -1 per row. "split": every token is a
# loss token; "one slot empty": rows 2-3 are fully masked, so one of two processes has no loss token at all.
SELECTION_LOGPS = {"split": [[-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -2.0], [-3.0, -3.0, -2.0]],
                   "one slot empty": [[-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0]]}
SELECTION_MASKS = {"split": [[1.0] * 3] * 4, "one slot empty": [[1.0] * 3] * 2 + [[0.0] * 3] * 2}
SELECTION_OPTIONS = {"clip-cov": {"clip_cov_fraction": 0.34, "clip_cov_lower": 0.5, "clip_cov_upper": 5.0},
                     "kl-cov": {"kl_cov_fraction": 0.1, "kl_cov_coef": 1.0}}


def covariance_selections(world: int, rank: int) -> dict:
    """The per-token objective of Clip-Cov (on-policy, r = 1) and KL-Cov (log r = 0.5) on this process's rows of
    each hand-made micro-batch, with the trainer's collectives."""
    from accelerate.utils import gather, pad_across_processes, reduce
    from po_registry_entropy import ClipCov, KLCov

    from po_registry.batches import LossBatch
    from po_registry.testing import default_args

    def gather_ragged(values):
        padded = gather(pad_across_processes(values, dim=0, pad_index=float("-inf")))
        return padded[padded != float("-inf")]

    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    out = {}
    for variant, logps in SELECTION_LOGPS.items():
        for method, plugin, log_ratio in [("clip-cov", ClipCov(), 0.0), ("kl-cov", KLCov(), 0.5)]:
            mask = torch.tensor(SELECTION_MASKS[variant])[rows]
            logps_here = torch.tensor(logps)[rows]
            metrics = {}
            batch = LossBatch(
                logps=logps_here, old_logps=logps_here - log_ratio,
                advantages=torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])[rows], mask=mask, entropies=None,
                ref_logps=None, sampling_logps=None, importance_sampling_ratio=None,
                num_items_in_batch=torch.tensor(12.0), accumulation_steps=1, steps_per_generation=1,
                num_processes=world, max_completion_length=3, options=SELECTION_OPTIONS[method],
                args=default_args([method], SELECTION_OPTIONS[method]), inputs={}, process_index=rank,
                log_metric=metrics.__setitem__, reduce_sum=lambda t: reduce(t, reduction="sum"), gather=gather,
                gather_ragged=gather_ragged)
            loss = plugin.po_policy_objective(batch, batch.logps - batch.old_logps) * mask
            out[f"{method} ({variant})"] = {"loss": loss.tolist(), "metrics": metrics}
    return out


def main() -> None:
    from accelerate.utils import gather_object

    out = sys.argv[1]
    only = sys.argv[2:]  # optional case names, for a quicker look
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tokenizer = char_tokenizer()
    model_dir, teacher_dir = os.path.join(out, f"model-{world}-{rank}"), os.path.join(out, f"teacher-{world}-{rank}")
    tiny_causal_lm(tokenizer).save_pretrained(model_dir)  # one copy per process: no race on the files
    tiny_causal_lm(tokenizer, seed=TEACHER_SEED).save_pretrained(teacher_dir)
    results = {}
    for name, spec in cases(teacher_dir).items():
        if only and name not in only:
            continue
        try:
            record = run_case(spec, model_dir, tokenizer, os.path.join(out, "runs"), world, rank)
        except Exception as exc:  # noqa: BLE001 - recorded and compared: both launches must fail alike
            record = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      "traceback": traceback.format_exc()}
        if "error" not in record:
            # Rows in global order: every process's rows, process by process; metrics as the main process logs them.
            record["advantages"] = [row for part in gather_object([record["advantages"]]) for row in part]
            record["mask"] = [row for part in gather_object([record["mask"]]) for row in part]
        results[name] = record
    selections = covariance_selections(world, rank)
    for record in selections.values():
        record["loss"] = [row for part in gather_object([record["loss"]]) for row in part]
    if rank == 0:
        torch.save({"world_size": world, "cases": results, "selections": selections},
                   os.path.join(out, f"world-{world}.pt"))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown after the work is done and written


if __name__ == "__main__":
    main()
