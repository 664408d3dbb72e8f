"""``PolicyOptimizationTrainer``: TRL's ``GRPOTrainer`` with its reward side and loss routed through the hooks.

This is the only module that touches TRL internals (private ``GRPOTrainer`` methods and attributes of trl==1.16.0).
Moving to a new TRL release is a change to this file plus its parity tests (``tests/test_parity.py``).
Overridden: ``_calculate_rewards`` (reward shaping), ``_generate_and_score_completions`` (advantages, dense
rewards, group selection), ``_compute_loss`` (the whole trajectory side), ``_save_checkpoint`` and
``_load_optimizer_and_scheduler`` (plugin state).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import os
import time
import warnings
from pathlib import Path

import torch
from transformers import GenerationConfig, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from .batches import LossBatch, RewardBatch
from .config import PolicyOptimizationConfig
from .context import RunContext, independent_copy, per_completion_token
from .diagnostics import Diagnostics, resolve_limits
from .errors import CouplingWarning, OptionError
from .pipeline import Pipeline, assemble
from .registry import get_registry

STATE_FILE = "po_registry_state.pt"
logger = logging.getLogger("po_registry")

# Model inputs besides ids and masks that TRL's rollout may carry (vision-language models).
_EXTRA_MODEL_INPUTS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)


class PolicyOptimizationTrainer(GRPOTrainer):
    """A ``GRPOTrainer`` whose algorithm is assembled from plugins.

    Accepts everything ``GRPOTrainer`` accepts (``peft_config``, ``reward_funcs``, ``tools``,
    ``environment_factory``, ``rollout_func``, vLLM options, accelerate/DeepSpeed/FSDP launch). ``args`` is a
    :class:`~po_registry.PolicyOptimizationConfig`; a plain ``GRPOConfig`` runs the ``grpo`` baseline.
    """

    _tag_names = [*GRPOTrainer._tag_names, "po-registry"]

    def __init__(self, model, reward_funcs=None, args=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PolicyOptimizationConfig(output_dir=f"{Path(name).name or 'model'}-PO")
        assembly = args.checked_assembly() if hasattr(args, "checked_assembly") else None
        if assembly is None:
            methods = getattr(args, "methods", None) or ["grpo"]
            assembly = assemble(methods, getattr(args, "method_options", None) or {})
        self.po_pipeline = Pipeline(assembly)
        with warnings.catch_warnings():
            if assembly is getattr(args, "_po_assembly", None):  # checked when the config was made: warned then
                warnings.simplefilter("ignore", CouplingWarning)
            self.po_pipeline.check_config(args)  # again: settings may have changed since the config was made
        self._po_scores: list[tuple[torch.Tensor, RewardBatch]] | None = None  # one generation round's (see _score_round)
        if kwargs.get("rollout_func") is not None:  # multi-turn environments are a supported use here
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        super().__init__(model, reward_funcs, args, **kwargs)
        _refuse_dropped_fsdp(self)
        self.po_context = RunContext(model=self.accelerator.unwrap_model(self.model),
                                     processing_class=self.processing_class, accelerator=self.accelerator,
                                     args=self.args, auxiliary=self.po_pipeline.auxiliary,
                                     add_callback=self.add_callback)
        self.po_pipeline.setup(self.po_context)
        self._po_sampler = _Sampler(self) if getattr(self.args, "async_staleness", None) is not None else None
        self._po_sampling = False  # inside a training rollout that the sampler serves
        self.po_diagnostics = _diagnostics(args)
        self.add_callback(_WatchLogs(self.po_diagnostics))

    @property
    def po_options(self) -> dict:
        """Resolved option values of the assembled plugins."""
        return self.po_pipeline.options

    # -- for rollout functions (multi-turn environments) ---------------------------------------------------------

    def generate_turn(self, contexts: list[list[int]]) -> list[list[int]]:
        """One completion per token context with the trainer's own generation backend and sampling settings (at
        most ``max_completion_length`` tokens, cut after the first end-of-sequence token, which is kept)."""
        completions, _ = self._generate_single_turn(contexts, None, {}, 1)
        return [list(ids) for ids in completions]

    def log_metric(self, name: str, value: float) -> None:
        """Record a metric for the next log line (averaged with the other values recorded since)."""
        self._metrics[self._mode()][name].append(float(value))

    def any_process(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device)).sum() > 0)

    def sum_over_processes(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes."""
        local = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(local, reduction="sum").tolist()

    # -- helpers ------------------------------------------------------------------------------------------------

    def _mode(self) -> str:
        return "train" if self.model.training else "eval"

    def _metric_logger(self, mode: str):
        def log_metric(name: str, value: float) -> None:
            self._metrics[mode][name].append(float(value))

        return log_metric

    def _gather_padded(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate (B, T) tensors of all processes, right-padding T to the longest with zeros."""
        if self.accelerator.num_processes == 1:  # nothing to gather: skip the collective's bookkeeping (every step)
            return tensor
        return self.accelerator.gather(self.accelerator.pad_across_processes(tensor, dim=1, pad_index=0))

    def _gather_ragged(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D tensors of different lengths from all processes."""
        sentinel = float("-inf")
        padded = self.accelerator.pad_across_processes(values, dim=0, pad_index=sentinel)
        gathered = self.accelerator.gather(padded)
        return gathered[gathered != sentinel]

    # -- reward side --------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        device, mode = rewards.device, self._mode()
        lengths, truncated = self._lengths_and_truncation(completion_ids_list, device)
        batch = RewardBatch(
            reward_names=list(self.reward_func_names),
            reward_weights=self.reward_weights.to(device),
            group_size=self.num_generations if mode == "train" else self.num_generations_eval,
            completion_lengths=lengths,
            truncated=truncated,
            max_completion_length=self.max_completion_length,
            options=self.po_options,
            args=self.args,
            step=self.state.global_step,
            max_steps=self.state.max_steps,
            training=mode == "train",
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            auxiliary=self.po_pipeline.auxiliary,
            carries=self.po_pipeline.assembly.carries,
            log_metric=self._metric_logger(mode),
            processing_class=self.processing_class,
            gather=self._gather_padded,
        )
        rewards = self.po_pipeline.shape_rewards(rewards, batch)
        if self._po_scores is not None:  # inside _score_round, which takes them once TRL's rollout returns
            self._po_scores.append((rewards, batch))
        return rewards

    def _lengths_and_truncation(self, completion_ids_list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) completion lengths and (N,) truncation flags (no stop token at the end), gathered over processes."""
        stop_ids = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        lengths = torch.tensor([len(ids) for ids in completion_ids_list], device=device)
        truncated = torch.tensor([not ids or ids[-1] not in stop_ids for ids in completion_ids_list], device=device)
        if self.accelerator.num_processes == 1:
            return lengths, truncated
        return self.accelerator.gather(lengths), self.accelerator.gather(truncated.long()).bool()

    def _generate_and_score_completions(self, inputs):
        out, kept_groups = self._score_round(inputs)
        if kept_groups is None or not self.model.training:
            return out
        rounds = self.po_pipeline.refill_rounds()
        return self._refill(inputs, out, kept_groups, rounds) if rounds else out

    def _score_round(self, inputs):
        """One generation round through TRL, then the reward side after shaping (``Pipeline.score``). Returns the
        rollout dict (rows the selection drops masked out of the loss) and the local kept-group mask or None."""
        # TRL's rollout scores the completions (our _calculate_rewards shapes them there) but returns neither the
        # reward matrix nor the batch: they come back through this round's list, which exactly one call fills.
        self._po_scores = []
        try:
            self._po_sampling = self._po_sampler is not None and self.model.training
            with self._without_old_logps_pass():
                out = super()._generate_and_score_completions(inputs)
            ((rewards, scoring),) = self._po_scores
        finally:
            self._po_scores, self._po_sampling = None, False
        if self.po_context.old_logps_from_sampler:
            out["old_per_token_logps"] = self._sampler_logps(out)
        loss_mask = (out["completion_mask"] * out["tool_mask"] if "tool_mask" in out else out["completion_mask"]).float()
        batch = dataclasses.replace(
            scoring, local=out, rows=inputs, completion_mask=self._gather_padded(loss_mask),
            policy_logps=functools.cache(lambda: self._behaviour_logps(out)),
            policy_collision_probs=functools.cache(lambda: collision_probabilities(self, out)),
            greedy_completions=functools.cache(lambda: self._greedy_completions(inputs, out)),
            tokenize_prompts=lambda prompts: [list(ids) for ids in self._tokenize_prompts(prompts)[0]])
        scored = self.po_pipeline.score(rewards, batch)
        rows = batch.local_rows
        width = loss_mask.shape[1]
        advantages = scored.advantages
        out["advantages"] = advantages[rows] if advantages.dim() == 1 else advantages[rows, :width]
        out["po_rewards"] = scored.rewards[rows]

        keep = scored.kept_rows(batch.group_size)
        if keep is None:
            return out, None
        if scored.keep_samples is not None:
            batch.log_metric("samples/kept_fraction", scored.keep_samples.float().mean().item())
        if scored.keep_groups is not None:
            batch.log_metric("groups/kept_fraction", scored.keep_groups.float().mean().item())
        keep_rows = keep[rows].to(out["completion_mask"].dtype).unsqueeze(1)
        out["completion_mask"] = out["completion_mask"] * keep_rows
        if "tool_mask" in out:
            out["tool_mask"] = out["tool_mask"] * keep_rows
        out["num_items_in_batch"] = self.accelerator.gather((loss_mask * keep_rows).sum()).sum()
        if scored.keep_groups is None:
            return out, None
        return out, scored.keep_groups[rows.start // batch.group_size: rows.stop // batch.group_size]

    @contextlib.contextmanager
    def _without_old_logps_pass(self):
        """Bypass mode: TRL recomputes pi_old when generation and optimizer steps are misaligned, a test it makes on
        ``args.gradient_accumulation_steps`` alone (read nowhere else in its rollout); a multiple of the generation
        period, for the length of the rollout, turns that forward pass off."""
        if not self.po_context.old_logps_from_sampler:
            yield
            return
        saved = self.args.gradient_accumulation_steps
        self.args.gradient_accumulation_steps = self.args.steps_per_generation * self.num_iterations
        try:
            yield
        finally:
            self.args.gradient_accumulation_steps = saved

    def _sampler_logps(self, out) -> torch.Tensor:
        """Bypass mode's pi_old: the sampler's log-probs, recomputed only where the sampler gave none (NaN)."""
        sampler = out.get("sampling_per_token_logps")
        if sampler is None:
            raise ValueError("bypass mode (the sampler's log-probs as pi_old, rollout_correction_bypass) needs a "
                             "sampler that returns them: use_vllm=True, or a rollout function returning 'logprobs'")
        missing = torch.isnan(sampler)
        return torch.where(missing, sampled_token_logps(self, out), sampler) if missing.any() else sampler

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self._po_sampling:  # a training rollout: the generation worker's batch for these prompts
            return self._po_sampler.take(prompt_ids)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _sample_with(self, model, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """TRL's transformers generation path run on ``model`` (the worker's copy), also recording each sampled
        token's log-prob under the sampling distribution (after temperature and the top-k/top-p filters)."""
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        padded = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                     pad_to_multiple_of=self.pad_to_multiple_of)
        attention = pad([torch.ones_like(t) for t in prompts], padding_value=0, padding_side="left",
                        pad_to_multiple_of=self.pad_to_multiple_of)
        device = self.accelerator.device
        inputs = {"input_ids": padded.to(device), "attention_mask": attention.to(device)}
        generation = unwrap_model_for_generation(model, self.accelerator, generation_kwargs=self.generation_kwargs)
        with generation as unwrapped, torch.no_grad():
            out = unwrapped.generate(**inputs, generation_config=self.generation_config, output_scores=True,
                                     return_dict_in_generate=True)
        completions = out.sequences[:, padded.shape[1]:]
        logps = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        is_eos = torch.isin(completions, torch.tensor(self.eos_token_ids, device=completions.device)).int()
        keep = is_eos.cumsum(1) - is_eos == 0  # up to the first end-of-sequence token, itself included
        return ([c[k].tolist() for c, k in zip(completions.cpu(), keep.cpu())],
                [l[k].tolist() for l, k in zip(logps.cpu(), keep.cpu())])

    def _behaviour_logps(self, out) -> torch.Tensor:
        """Log-probs of the sampled tokens under the policy that sampled them (no gradient)."""
        if out.get("old_per_token_logps") is not None:
            return out["old_per_token_logps"]
        return sampled_token_logps(self, out)

    def _greedy_completions(self, inputs, out):
        """A greedy completion of each row's prompt: one decode per distinct prompt on this process (a prompt's G
        rows are adjacent), scored by the reward functions, gathered: raw rewards (N, K), lengths, truncation.
        The pipeline shapes them like the samples (``Pipeline.greedy_baseline``)."""
        if self.use_vllm:
            raise NotImplementedError("greedy baselines are decoded with transformers; they are not available "
                                      "with use_vllm=True")
        if self.rollout_func is not None:  # one greedy turn is not an episode of the environment
            raise NotImplementedError("greedy baselines decode a single turn; they are not available with a "
                                      "rollout function (multi-turn episodes)")
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(out["prompt_ids"], out["prompt_mask"])]
        firsts = [i for i in range(len(prompts)) if i == 0 or prompts[i] != prompts[i - 1]]
        greedy = {key: value for key, value in self.generation_kwargs.items()
                  if key not in ("temperature", "top_p", "top_k", "min_p")}
        greedy["do_sample"] = False
        sampling = (self.generation_config, self.generation_kwargs)
        self.generation_config, self.generation_kwargs = GenerationConfig(**greedy, disable_compile=True), greedy
        try:
            decoded, _ = self._generate_single_turn([prompts[i] for i in firsts], None, {}, 1)
        finally:
            self.generation_config, self.generation_kwargs = sampling
        starts = set(firsts)
        owner = torch.tensor([i in starts for i in range(len(prompts))]).cumsum(0) - 1
        completion_ids = [decoded[j] for j in owner.tolist()]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational(inputs[0]):
            completions = [[{"role": "assistant", "content": text}] for text in texts]
        else:
            completions = texts
        prompt_texts = [row["prompt"] for row in inputs]
        rewards = GRPOTrainer._calculate_rewards(self, inputs, prompt_texts, completions, completion_ids)
        lengths, truncated = self._lengths_and_truncation(completion_ids, rewards.device)
        decodes = self.accelerator.gather(torch.tensor([float(len(firsts))], device=rewards.device)).sum().item()
        self._metrics[self._mode()]["greedy/decodes"].append(decodes)
        return rewards, lengths, truncated

    def _refill(self, inputs, out, kept_groups, rounds: int):
        """Dynamic sampling: replace dropped groups with groups of fresh prompts until every process has a full
        batch of kept groups or ``rounds`` extra rounds are spent; a shortfall is filled with dropped groups."""
        G = self.num_generations
        needed = len(inputs) // G
        if len(inputs) % G:
            raise ValueError("dynamic sampling needs whole groups on every process: make "
                             "per_device_train_batch_size * steps_per_generation a multiple of num_generations")
        device = out["advantages"].device
        pool = [(out, kept_groups)]
        seed = (self.args.seed * 1_000_003 + self.state.global_step * 1009 + self.accelerator.process_index) % 2**31
        generator = torch.Generator().manual_seed(seed)
        extra = 0
        for _ in range(rounds):
            have = sum(int(kept.sum()) for _, kept in pool)
            if self.accelerator.gather(torch.tensor([have >= needed], device=device)).all():
                break  # every process must agree, or the next round's collectives would hang
            indices = torch.randint(len(self.train_dataset), (needed,), generator=generator).tolist()
            pool.append(self._score_round([dict(self.train_dataset[i]) for i in indices for _ in range(G)]))
            extra += 1
        groups = [(part, g, bool(kept[g])) for part, kept in pool for g in range(len(kept))]
        chosen = ([x for x in groups if x[2]] + [x for x in groups if not x[2]])[:needed]  # kept first
        merged = _concatenate_rows([_rows(part, g * G, (g + 1) * G) for part, g, _ in chosen],
                                   self._tokenizer.pad_token_id)
        loss_mask = merged["completion_mask"] * merged.get("tool_mask", 1)
        merged["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        dropped = torch.tensor([float((~kept_groups).sum())], device=device)
        metrics = self._metrics[self._mode()]
        metrics["dynamic_sampling/extra_rounds"].append(float(extra))
        metrics["dynamic_sampling/dropped_groups"].append(self.accelerator.gather(dropped).sum().item())
        metrics["dynamic_sampling/kept_fraction"].append(sum(kept for _, _, kept in chosen) / needed)
        return merged

    # -- trajectory side ----------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if self._po_sampler is not None and self.model.training:
            self._po_sampler.fill_ahead()  # after TRL has shuffled the batch: the sampler's draws follow in order
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _EXTRA_MODEL_INPUTS},
        )
        advantages = inputs["advantages"]
        old_logps = inputs.get("old_per_token_logps")
        mode = self._mode()
        training = mode == "train"
        batch = LossBatch(
            logps=logps,
            old_logps=logps.detach() if old_logps is None else old_logps,
            advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
            mask=mask.float(),
            entropies=entropies,
            ref_logps=inputs.get("ref_per_token_logps"),
            sampling_logps=inputs.get("sampling_per_token_logps"),
            importance_sampling_ratio=inputs.get("importance_sampling_ratio"),
            num_items_in_batch=inputs["num_items_in_batch"],
            accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
            steps_per_generation=self.args.steps_per_generation,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            max_completion_length=self.max_completion_length,
            options=self.po_options,
            args=self.args,
            inputs=inputs,
            rewards=inputs.get("po_rewards"),
            step=self.state.global_step,
            max_steps=self.state.max_steps,
            training=training,
            ends_optimizer_step=self.accelerator.sync_gradients,
            auxiliary=self.po_pipeline.auxiliary,
            log_metric=self._metric_logger(mode),
            reduce_sum=lambda t: self.accelerator.reduce(t, reduction="sum"),
            gather=self.accelerator.gather,
            gather_ragged=self._gather_ragged,
        )
        loss = self.po_pipeline.loss(batch)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / batch.accumulation_steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._metrics[mode]["entropy"].append(batch.global_masked_mean(entropies))
        return loss

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.po_pipeline.state_dict()
        if state and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(state, os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            self.po_pipeline.load_state_dict(torch.load(path, weights_only=False))


class _Sampler:
    """The generation worker of asynchronous training (``async_staleness`` k): a copy of the policy on its own thread.

    Each generation batch is submitted with a snapshot of the learner's trainable weights at that moment (its
    version, in optimizer steps), and sampled with them while the learner trains on earlier batches; the learner
    takes the batches in order. With k = 0 each batch is submitted when the learner needs it (the synchronous
    trainer's samples); with k >= 1 the worker keeps k batches in flight, drawn from its own copy of the trainer's
    prompt order and submitted after the learner's batch is shuffled: the worker is idle whenever the learner draws
    random numbers, so their draws do not race, but two threads computing at once may split their operations
    differently, so runs with k >= 1 are not bitwise reproducible. The sampled tokens' log-probs travel as the
    rollout's ``sampling_per_token_logps`` (the behaviour policy mu); the learner's pi_old is its own weights when it
    takes the batch."""

    def __init__(self, trainer: PolicyOptimizationTrainer):
        args = trainer.args
        problems = [why for bad, why in (
            (trainer.accelerator.num_processes > 1, "one process only (it runs beside a single learner)"),
            (trainer.use_vllm, "transformers generation only (use_vllm=False)"),
            (trainer.rollout_func is not None, "no rollout function (multi-turn episodes sample turn by turn)"),
            (trainer.po_pipeline.refill_rounds() > 0, "no refill rounds (dynamic sampling draws fresh prompts)"),
            (getattr(trainer, "use_transformers_continuous_batching", False), "no continuous batching")) if bad]
        if problems:
            raise OptionError(f"async_staleness={args.async_staleness}: the generation worker supports "
                              + "; ".join(problems))
        assembly = trainer.po_pipeline.assembly
        # the baseline's sampler-correction applies TRL's vLLM ratio only; a method that replaces it (vespo) or adds
        # a correction of its own reads the sampler's log-probs
        corrected = set(assembly.owners.get("po_rollout_correction", [])) - {"sampler-correction"} or \
            "sampler-correction" not in assembly.components
        if args.async_staleness > 0 and not corrected:
            warnings.warn(f"async_staleness={args.async_staleness} without a rollout correction: batches sampled by "
                          "older weights are trained on as if on-policy (compose rollout-correction, or vespo, to "
                          "correct pi_old / mu)", CouplingWarning, stacklevel=3)
        self.trainer, self.ahead, self.threads = trainer, args.async_staleness, torch.get_num_threads()
        policy = trainer.accelerator.unwrap_model(trainer.model)
        self.model = independent_copy(policy).requires_grad_(False)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="po-sampler")
        self.jobs: collections.deque = collections.deque()  # (prompt ids, version, future), oldest first
        self.loader, self.stream = None, None  # the worker's own copy of the trainer's prompt order
        trainer.add_callback(_StopSampler(self))

    def submit(self, prompt_ids: list[list[int]]) -> None:
        policy = self.trainer.accelerator.unwrap_model(self.trainer.model)
        weights = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
        self.model.train(policy.training)
        future = self.executor.submit(self._sample, prompt_ids, weights)
        self.jobs.append((prompt_ids, self.trainer.state.global_step, future))

    def _sample(self, prompt_ids, weights):
        torch.set_num_threads(self.threads)  # a new thread starts from the process default, not the learner's setting
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        return self.trainer._sample_with(self.model, prompt_ids)

    def take(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """The oldest batch in flight (submitted now when none is), which must be of these prompts."""
        if not self.jobs:
            self.submit(prompt_ids)
        submitted, version, future = self.jobs.popleft()
        started = time.perf_counter()
        completions, logps = future.result()
        concurrent.futures.wait([job[2] for job in self.jobs])  # idle while TRL shuffles: no draw races the worker's
        if submitted != prompt_ids:
            raise RuntimeError("async sampling: the worker's next batch is of other prompts than the learner's "
                               "(its copy of the prompt order went out of step)")
        metrics = self.trainer._metrics["train"]
        metrics["async/staleness"].append(float(self.trainer.state.global_step - version))
        metrics["async/wait_seconds"].append(time.perf_counter() - started)
        return completions, logps

    def fill_ahead(self) -> None:
        """Keep k batches in flight: the next generation batches of the trainer's prompt order."""
        while len(self.jobs) < self.ahead:
            batch = self._next_generation_batch()
            self.submit(self.trainer._tokenize_prompts([row["prompt"] for row in batch])[0])

    def _next_generation_batch(self) -> list[dict]:
        """The trainer's dataloader yields one generation batch per micro-step, each repeated for the ``period``
        micro-steps that train on it; generation n is item n x period, here read from a second iteration of the same
        seeded sampler (epoch after epoch, as the trainer's)."""
        trainer = self.trainer
        period = trainer.args.steps_per_generation * trainer.num_iterations
        if self.loader is None:  # start where the learner is (a resumed run too): past the batches taken or in flight
            self.loader = torch.utils.data.DataLoader(
                trainer.train_dataset, sampler=trainer._get_train_sampler(), collate_fn=lambda rows: rows,
                batch_size=trainer._train_batch_size * trainer.args.steps_per_generation)
            for _ in range(trainer.state.global_step * trainer.args.gradient_accumulation_steps + period):
                self._next_item()
        batch = self._next_item()
        for _ in range(period - 1):
            self._next_item()
        return batch

    def _next_item(self) -> list[dict]:
        item = next(self.stream, None) if self.stream is not None else None
        if item is None:  # a new epoch: the sampler's generator carries on, as the trainer's does
            self.stream = iter(self.loader)
            item = next(self.stream)
        return item

    def close(self) -> None:
        """Drop the batches not started (the run is over) and let the worker finish."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="po-sampler")
        self.jobs.clear()
        self.loader, self.stream = None, None


class _StopSampler(TrainerCallback):
    def __init__(self, sampler: _Sampler):
        self.sampler = sampler

    def on_train_end(self, args, state, control, **kwargs):
        self.sampler.close()


def _diagnostics(args) -> Diagnostics:
    """The run's failure detectors, as the config chose them; a finding is logged as a warning (the command line
    shows it on its progress display instead)."""
    registry = get_registry()
    if hasattr(args, "detector_limits"):
        limits = args.detector_limits()
    else:  # a plain GRPOConfig: every detector at its defaults
        limits = resolve_limits(registry.detectors, None, None)
    return Diagnostics(registry.detectors, registry.failures, limits,
                       listeners=[lambda finding: logger.warning("po-registry: %s", finding.line())])


class _WatchLogs(TrainerCallback):
    """Feeds each logged line of the main process to the detectors."""

    def __init__(self, diagnostics: Diagnostics):
        self.diagnostics = diagnostics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.diagnostics.observe({"step": state.global_step, **logs})


def _refuse_dropped_fsdp(trainer: GRPOTrainer) -> None:
    """accelerate (1.16) shards with FSDP only across GPU-type processes; on CPU it drops an FSDP request without a
    word and trains plain data-parallel. Say so instead of training something else than asked."""
    asked = bool(trainer.args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and not trainer.is_fsdp_enabled:
        state = f"{trainer.accelerator.distributed_type.value}, {trainer.accelerator.device}"
        raise OptionError(f"FSDP was asked for (fsdp / an accelerate FSDP config) but accelerate did not enable it on "
                          f"these processes ({state}): it shards across GPUs only; on CPU train data-parallel with "
                          "torchrun --nproc_per_node N (examples/README.md)")


# -- TRL access for the test kit: rollouts and micro-batch losses of any GRPOTrainer, ours or TRL's ---------------


def rollout(trainer: GRPOTrainer, rows: list[dict]) -> dict:
    """One generation batch (rows repeated G times, grouped), scored as in training."""
    return scored_rollout(trainer, rows)[0]


def scored_rollout(trainer: GRPOTrainer, rows: list[dict]) -> tuple[dict, list[dict]]:
    """:func:`rollout`, also returning copies of the rows with the fields a rollout function added to them."""
    trainer.model.train()
    scored = [dict(row) for row in rows]
    return trainer._generate_and_score_completions(scored), scored


def sampled_token_logps(trainer: GRPOTrainer, batch: dict) -> torch.Tensor:
    """(B, T) log-probs of the batch's completion tokens under the trainer's model, without gradient."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                                 batch["completion_ids"].size(1))
    return logps


def collision_probabilities(trainer: GRPOTrainer, batch: dict) -> torch.Tensor:
    """(B, T) sum_v pi(v | prefix)^2 at each completion position under the trainer's model at the sampling
    temperature, without gradient; a micro-batch of rows at a time (their logits span the vocabulary)."""
    with torch.no_grad(), trainer.accelerator.autocast():
        return per_completion_token(trainer.model, batch, trainer.temperature, trainer.args.per_device_train_batch_size,
                                    lambda logps, ids: logps.exp().square().sum(-1))


def micro_batch_loss(trainer: GRPOTrainer, batch: dict, accumulation_steps: int = 1) -> torch.Tensor:
    """The training loss of one micro-batch, as inside an accumulation window of ``accumulation_steps``."""
    trainer.current_gradient_accumulation_steps = accumulation_steps
    return trainer._compute_loss(trainer.model, batch)


def train_metrics(trainer: GRPOTrainer) -> dict[str, list[float]]:
    """Metrics recorded since the last log, by name."""
    return trainer._metrics["train"]


# Right-padding values of the per-row tensors a rollout dict carries; prompts are left-padded.
_PAD_RIGHT = {"completion_mask": 0, "tool_mask": 1, "old_per_token_logps": 0.0, "ref_per_token_logps": 0.0,
              "sampling_per_token_logps": 0.0, "advantages": 0.0, "importance_sampling_ratio": 1.0}


def _rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of every per-row entry of a rollout dict (other entries are kept as they are)."""
    rows = batch["prompt_ids"].shape[0]

    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return value[start:stop]
        if isinstance(value, list) and len(value) == rows:
            return value[start:stop]
        return value

    return {key: take(value) for key, value in batch.items()}


def _concatenate_rows(parts: list[dict], pad_id: int) -> dict:
    """Stack rollout dicts row-wise, padding prompts on the left and completions on the right."""
    merged = {}
    for key, first in parts[0].items():
        values = [part[key] for part in parts]
        if isinstance(first, list):
            merged[key] = [item for value in values for item in value]
        elif not isinstance(first, torch.Tensor) or first.dim() == 0:
            merged[key] = first
        elif first.dim() == 1:
            merged[key] = torch.cat(values)
        else:
            width = max(v.shape[1] for v in values)
            left = key.startswith("prompt_")
            fill = pad_id if key in ("prompt_ids", "completion_ids") else (0 if left else _PAD_RIGHT.get(key, 0))
            padded = [torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]),
                                              value=fill) for v in values]
            merged[key] = torch.cat(padded)
    return merged
