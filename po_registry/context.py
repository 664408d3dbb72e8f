"""What a plugin sees of its run beyond the batches: the :class:`RunContext` that ``po_setup`` receives, and
:class:`AuxiliaryModel`, the one helper for a model that runs beside the policy (a frozen teacher, a learned critic).

Everything here belongs to one run (one trainer): each trainer's pipeline builds its own component instances and
holds its own auxiliary models, so two trainers in one process never share state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass
class RunContext:
    """The narrow view of a run that ``po_setup`` gets: the policy, its tokenizer, the accelerator and the config,
    and the run's auxiliary models. ``add_callback`` takes a ``transformers.TrainerCallback`` (it sees every
    optimizer step)."""

    model: Any  # the policy, unwrapped from its distributed wrapper (a peft model when training LoRA)
    processing_class: Any
    accelerator: Any
    args: Any  # the PolicyOptimizationConfig (TRL's GRPOConfig fields)
    auxiliary: MutableMapping[str, Any] = field(default_factory=dict)  # the pipeline's: name -> AuxiliaryModel
    add_callback: Callable[[Any], None] = lambda callback: None
    # Bypass mode, set by a po_setup: the sampler's log-probs (vLLM, a rollout function's) stand in for pi_old. The
    # trainer skips recomputing pi_old and every stage reads the sampler's as ``old_logps``: the ratio is pi_theta/mu.
    old_logps_from_sampler: bool = False

    def register_auxiliary(self, name: str, model: AuxiliaryModel) -> AuxiliaryModel:
        """Add ``model`` to the run under ``name`` (stages read it as ``batch.auxiliary[name]``). A trainable one
        starts from the main process's weights on every process and steps after each policy optimizer step."""
        if name in self.auxiliary:
            raise ValueError(f"an auxiliary model named {name!r} is already registered for this run")
        self.auxiliary[name] = model
        if model.trainable:
            model.attach(self)
        return model


def completion_logits(model, rows, start: int, stop: int, temperature: float) -> torch.Tensor:
    """(b, T, V) logits predicting each completion token of rows ``start:stop``, divided by the temperature."""
    width = rows["completion_ids"].shape[1]
    ids = torch.cat([rows["prompt_ids"][start:stop], rows["completion_ids"][start:stop]], dim=1)
    attention = torch.cat([rows["prompt_mask"][start:stop], rows["completion_mask"][start:stop]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=width + 1).logits[:, :-1]
    return logits[:, -width:] / temperature


def per_completion_token(model, rows, temperature: float, chunk: int,
                         statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(B, T) ``statistic(log_probs, completion_ids)`` at each completion position, from ``model``'s log-softmax over
    the vocabulary at ``temperature`` ((b, T, V) and (b, T)), ``chunk`` rows at a time (their logits span the
    vocabulary)."""
    ids, parts = rows["completion_ids"], []
    for start in range(0, ids.shape[0], chunk):
        logits = completion_logits(model, rows, start, start + chunk, temperature)
        parts.append(statistic(torch.log_softmax(logits.float(), -1), ids[start: start + chunk]))
    return torch.cat(parts)


def completion_token_logps(model, rows, temperature: float, chunk: int) -> torch.Tensor:
    """(B, T) log-probs of each row's completion tokens under ``model`` at ``temperature``."""
    return per_completion_token(model, rows, temperature, chunk,
                                lambda logps, ids: logps.gather(-1, ids.unsqueeze(-1)).squeeze(-1))


def independent_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` that computes with its own weights. TRL patches the policy's ``forward`` (its fused LM
    head) with a function that calls the original model's bound forward, and a deep copy keeps that function: the
    copy would run the original's weights. Such patches are dropped from the copy, which gets its class's forward
    back (plain forward passes and generation do not use the fused head)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        forward = module.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", forward), "__wrapped__", None) is type(module).forward:
            del module.forward
    return clone


def load_model(source: str, like: torch.nn.Module | None = None, value_head: bool = False,
               lora_r: int = 0) -> torch.nn.Module:
    """A checkpoint on the device and in the dtype of ``like`` (the policy; None: float32 on the CPU): a causal LM,
    or with ``value_head`` its backbone with a fresh scalar head on every position (a value model), optionally with
    a LoRA adapter of rank ``lora_r``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
    from transformers.utils import logging

    parameter = next(like.parameters()) if like is not None else torch.zeros(())
    if not value_head:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=parameter.dtype)
    else:
        config = AutoConfig.from_pretrained(source, num_labels=1, classifier_dropout=0.0)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the load report would list the new head and the unused LM head as problems
        try:
            model = AutoModelForTokenClassification.from_pretrained(source, config=config, dtype=parameter.dtype)
        finally:
            logging.set_verbosity(verbosity)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        task = "TOKEN_CLS" if value_head else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(task_type=task, r=lora_r, lora_alpha=2 * lora_r,
                                                 target_modules="all-linear", exclude_modules=["score", "classifier"]))
    return model.to(parameter.device)


class AuxiliaryModel:
    """A model beside the policy, with the plumbing every such model needs written once.

    Frozen (no ``learning_rate``; a teacher): evaluation mode, no gradient, and :meth:`outputs` computes its outputs
    for a batch once (several stages of one micro-batch ask for the same rows). With ``adapter_off`` the model is
    the LoRA policy itself run with its adapter disabled (its base model as the teacher; left trainable); with
    ``shared`` it is the policy as it is (a live self-teacher), run without gradient and otherwise left alone.

    Trainable (a critic): its own AdamW at ``learning_rate``, the policy's schedule type and warm-up over the run's
    steps, gradient clipping at ``max_grad_norm``; it steps right after each policy optimizer step with its gradients
    averaged over the processes (the loss a stage returns reaches its parameters), starts from the main process's
    weights on every process, and its trainable weights, optimizer and schedule go into checkpoints and come back on
    resume."""

    def __init__(self, model: torch.nn.Module, learning_rate: float | None = None, max_grad_norm: float = 1.0,
                 adapter_off: bool = False, shared: bool = False):
        self.model, self.adapter_off = model, adapter_off
        self.trainable = learning_rate is not None
        self.max_grad_norm = max_grad_norm
        self.parameters = [p for p in model.parameters() if p.requires_grad] if self.trainable else []
        self.optimizer = torch.optim.AdamW(self.parameters, lr=learning_rate, weight_decay=0.0) \
            if self.trainable else None
        self.scheduler, self._pending_state = None, None
        self._reduce_mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        self._memo_key, self._memo = None, None
        if not self.trainable and not adapter_off and not shared:
            model.eval()
            model.requires_grad_(False)

    def __call__(self, *args, **kwargs):
        """A forward pass: with gradient when trainable, else without (and with the adapter off when asked)."""
        if self.trainable:
            return self.model(*args, **kwargs)
        adapter = self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()
        with torch.no_grad(), adapter:
            return self.model(*args, **kwargs)

    def outputs(self, key: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``compute()``, remembered for the tensor ``key`` itself (its identity, so that a later batch's tensor
        cannot be mistaken for it): the stages of one micro-batch share one forward pass."""
        if key is not self._memo_key:
            self._memo_key, self._memo = key, compute()
        return self._memo

    # -- training ---------------------------------------------------------------------------------------------------

    def attach(self, context: RunContext) -> None:
        """Join the run: the main process's weights everywhere, gradients averaged, stepped with the policy."""
        broadcast_from_main_process(self.model)
        self._reduce_mean = lambda t: context.accelerator.reduce(t, reduction="mean")
        context.add_callback(_AuxiliarySteps(self))

    def start_schedule(self, args, max_steps: int) -> None:
        """The policy's learning-rate schedule type and warm-up, scaled to this model's own rate."""
        from transformers import get_scheduler

        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(max_steps),
                                       num_training_steps=max_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        if self._pending_state is not None:  # resuming: the optimizer's rates, then the schedule's position
            self._load_optimizer_and_schedule(self._pending_state)
            self._pending_state = None

    def step(self) -> None:
        """One update from the gradients the stages' losses left (averaged over processes)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = self._reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for parameter, grad in zip(self.parameters, flat.split([g.numel() for g in grads])):
            parameter.grad = grad.view_as(parameter)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        weights = {name: t for name, t in self.model.state_dict().items() if name in trainable}
        return {"weights": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        missing = set(state["weights"]) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"the checkpoint's weights do not fit this model (unknown weights {sorted(missing)[:3]})")
        self.model.load_state_dict(state["weights"], strict=False)
        if self.scheduler is None:
            self._pending_state = state  # the schedule starts with training (after the checkpoint is read)
        else:
            self._load_optimizer_and_schedule(state)

    def _load_optimizer_and_schedule(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


def broadcast_from_main_process(model: torch.nn.Module) -> None:
    """Every process takes the main process's weights (no-op on one process): a fresh head or adapter drawn per
    process would differ."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


class _AuxiliarySteps(TrainerCallback):
    """Starts the auxiliary model's schedule with training and steps it after each policy optimizer step."""

    def __init__(self, auxiliary: AuxiliaryModel):
        self.auxiliary = auxiliary

    def on_train_begin(self, args, state, control, **kwargs):
        self.auxiliary.start_schedule(args, state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.auxiliary.step()
