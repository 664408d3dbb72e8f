"""PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347; GAE: arXiv 1506.02438) and VAPO
(Yue et al. 2025, arXiv 2504.05118).

Reward side: a value model V_psi scores every completion token at rollout time; the outcome reward R sits on the
last token (plus any dense token rewards of other plugins); GAE gives the policy's advantages
A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, whitened over the batch, and the
critic's targets G_t = A_t(lambda_critic) + V_t, all over the action tokens (environment tokens inside a
multi-turn completion are skipped, and the return flows through them). Trajectory side: the clipped value loss
0.5 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2) per micro-batch; the critic has its own optimizer and
learning-rate schedule, steps with the policy's optimizer, and is saved and restored with checkpoints.

VAPO: value pretraining (the policy is frozen for the first ``ppo_critic_warmup_steps`` optimizer steps while the
critic learns the returns of the initial policy), decoupled GAE (lambda_critic = 1, length-adaptive
lambda_policy = 1 - 1 / (alpha l)), clip-higher with the token-level loss, and an NLL loss on positive samples.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from po_registry import hookimpl
from po_registry.ops import clipped_value_loss, gae, masked_mean, masked_whiten, outcome_token_rewards

PPO_PAPER = "arXiv 1707.06347"
VAPO_PAPER = "arXiv 2504.05118"


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's lambda_policy = 1 - 1 / (alpha l) per row, clamped to [0, 1]."""
    return (1.0 - 1.0 / (alpha * lengths.float().clamp(min=1.0))).clamp(0.0, 1.0)


def load_value_model(source: str, device, dtype, lora_r: int) -> torch.nn.Module:
    """A causal LM checkpoint as a value model: its backbone plus a fresh scalar head on every position."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(source, num_labels=1, classifier_dropout=0.0)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the load report would list the new head and the unused LM head as problems
    try:
        model = AutoModelForTokenClassification.from_pretrained(source, config=config, dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="TOKEN_CLS", r=lora_r, lora_alpha=2 * lora_r,
                                                 target_modules="all-linear", exclude_modules=["score", "classifier"]))
    return model.to(device)


def broadcast_from_main_process(model: torch.nn.Module) -> None:
    """Every process takes the main process's weights (no-op on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def token_values(model: torch.nn.Module, rows) -> torch.Tensor:
    """(B, T) V(s_t) for each completion token t: the head's output at the position before it."""
    prompt_length, width = rows["prompt_ids"].shape[1], rows["completion_ids"].shape[1]
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    scores = model(input_ids=ids, attention_mask=attention).logits[..., 0]
    return scores[:, prompt_length - 1 : prompt_length - 1 + width].float()


class _CriticSteps(TrainerCallback):
    """Steps the critic with the policy's optimizer; freezes the policy during value pretraining."""

    def __init__(self, critic: Critic, policy: torch.nn.Module):
        self.critic, self.policy = critic, policy

    def on_train_begin(self, args, state, control, **kwargs):
        self.critic.start_schedule(args, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.critic.options["ppo_critic_warmup_steps"]:
            for parameter in self.policy.parameters():
                parameter.grad = None  # AdamW skips parameters without a gradient: the policy stays as it is

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.critic.step()


class Critic:
    """Component ``ppo-critic``: the value model, GAE advantages and the clipped value loss."""

    po_reads = ("token_rewards",)  # dense rewards join the outcome reward in the GAE

    def __init__(self):
        self.model = None

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        # With the true value function the oracle provides, GAE's expected credit is R's for any lambda.
        def critic(args, options):
            return Objective(not_applicable="ppo_gamma < 1 (a discounted outcome) is not modelled"
                             if options["ppo_gamma"] < 1 else "", advantage="none",
                             scale="free" if options["ppo_whiten_advantages"] else "exact",
                             needs={"value_model": lambda model: setattr(self, "model", model)})

        register("ppo", components=["ppo-critic"], side="reward", paper=PPO_PAPER,
                 summary="PPO with a learned critic: GAE advantages from a value model trained with a clipped loss",
                 targets="Monte Carlo variance of critic-free baselines; per-token credit from a value function",
                 objective=critic)
        register("vapo", components=["ppo-critic", "positive-nll", "clip-higher"], side="both", paper=VAPO_PAPER,
                 options={"ppo_critic_lambda": 1.0, "ppo_length_adaptive_alpha": 0.05, "ppo_critic_warmup_steps": 50},
                 summary="VAPO: value pretraining, decoupled and length-adaptive GAE, clip-higher, positive NLL",
                 targets="value bias on long sequences, heterogeneous lengths and sparse rewards in PPO",
                 objective=critic)  # with positive-nll's and clip-higher's declarations

    @hookimpl
    def po_declare_options(self, register):
        fraction = lambda v: 0.0 <= v <= 1.0  # noqa: E731
        register("ppo_gamma", 1.0, type=float, check=lambda v: 0.0 < v <= 1.0, help="discount gamma, in (0, 1]")
        register("ppo_lambda", 0.95, type=float, check=fraction, help="GAE lambda of the policy, in [0, 1]")
        register("ppo_critic_lambda", 0.95, type=float, check=fraction,
                 help="GAE lambda of the critic's targets, in [0, 1] (VAPO: 1)")
        register("ppo_length_adaptive_alpha", 0.0, type=float, check=lambda v: v >= 0.0,
                 help="VAPO's length-adaptive lambda_policy = 1 - 1/(alpha l); 0 keeps ppo_lambda")
        register("ppo_whiten_advantages", True, type=bool, help="normalise advantages over the batch's loss tokens")
        register("ppo_value_clip", 0.2, type=float, check=lambda v: v > 0.0, help="value clip range, > 0")
        register("ppo_critic_model", "", type=str,
                 help="checkpoint the critic starts from (a causal LM); empty: the policy's own checkpoint")
        register("ppo_critic_lora_r", 0, type=int, check=lambda v: v >= 0, help="LoRA rank of the critic; 0 trains "
                 "it fully")
        register("ppo_critic_lr", 1e-4, type=float, check=lambda v: v > 0.0, help="critic learning rate, > 0")
        register("ppo_critic_max_grad_norm", 1.0, type=float, check=lambda v: v > 0.0,
                 help="gradient-norm clip of the critic, > 0")
        register("ppo_critic_warmup_steps", 0, type=int, check=lambda v: v >= 0,
                 help="value pretraining: optimizer steps during which only the critic learns")

    @hookimpl
    def po_check_config(self, args, options):
        if options["ppo_critic_warmup_steps"] and args.deepspeed:
            raise ValueError("ppo_critic_warmup_steps (value pretraining) is not supported with DeepSpeed, whose "
                             "optimizer holds the gradients; pretrain without it or set it to 0")

    # -- the value model ----------------------------------------------------------------------------------------

    @hookimpl
    def po_setup(self, trainer, options):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        source = options["ppo_critic_model"] or base.config._name_or_path
        if not source:
            raise ValueError("the policy was passed as a model object without a checkpoint path: set "
                             "ppo_critic_model to the checkpoint the critic should start from")
        self.build(source, trainer.accelerator.device, next(policy.parameters()).dtype, options)
        broadcast_from_main_process(self.model)  # a fresh head (and LoRA) drawn per process would differ
        self.reduce_mean = lambda t: trainer.accelerator.reduce(t, reduction="mean")
        trainer.add_callback(_CriticSteps(self, trainer.model))

    def build(self, source: str, device, dtype, options) -> None:
        """Load the critic and its optimizer (the schedule starts with training)."""
        self.options = options
        self.model = load_value_model(source, device, dtype, options["ppo_critic_lora_r"])
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options["ppo_critic_lr"], weight_decay=0.0)
        self.scheduler, self._pending_state = None, None
        self.reduce_mean = lambda t: t

    def start_schedule(self, args, max_steps: int) -> None:
        """The critic follows the policy's learning-rate schedule type and warm-up, scaled to its own rate."""
        from transformers import get_scheduler

        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(max_steps),
                                       num_training_steps=max_steps,
                                       scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
        if self._pending_state is not None:  # resuming: the optimizer's rates, then the schedule's position
            self._load_optimizer_and_schedule(self._pending_state)
            self._pending_state = None

    def step(self) -> None:
        """One critic update from the gradients the value loss left (averaged over processes)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = self.reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        for parameter, grad in zip(self.parameters, flat.split([g.numel() for g in grads])):
            parameter.grad = grad.view_as(parameter)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.options["ppo_critic_max_grad_norm"])
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _require_model(self):
        if self.model is None:
            raise RuntimeError("the critic is not set up: ppo-critic needs po_setup (a PolicyOptimizationTrainer)")
        return self.model

    # -- reward side: GAE -------------------------------------------------------------------------------------

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        options = batch.options
        model, rows, chunk = self._require_model(), batch.local, batch.args.per_device_train_batch_size
        with torch.no_grad():  # a micro-batch of rows at a time, as the trainer scores its own log-probs
            local = torch.cat([token_values(model, {key: rows[key][start : start + chunk] for key in ROW_KEYS})
                               for start in range(0, rows["completion_ids"].shape[0], chunk)])
        values = batch.gather(local)
        total = batch.weighted_reward(rewards)
        mask = batch.completion_mask * (~torch.isnan(total)).unsqueeze(1)  # unscorable rows: no advantage, no target
        values = values[:, : mask.shape[1]] * mask
        token_rewards = outcome_token_rewards(total.nan_to_num(0.0), mask, batch.token_rewards)
        lam = options["ppo_lambda"]
        if options["ppo_length_adaptive_alpha"] > 0:
            lam = length_adaptive_lambda(mask.sum(dim=1), options["ppo_length_adaptive_alpha"])
        advantages, _ = gae(token_rewards, values, mask, options["ppo_gamma"], lam)
        _, returns = gae(token_rewards, values, mask, options["ppo_gamma"], options["ppo_critic_lambda"])
        if options["ppo_whiten_advantages"]:
            advantages = masked_whiten(advantages, mask)
        batch.carry("ppo_old_values", values)
        batch.carry("ppo_returns", returns)
        batch.carry("ppo_value_mask", mask)
        residual = masked_mean((returns - values) ** 2, mask)
        spread = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        batch.log_metric("ppo/value_mean", masked_mean(values, mask).item())
        batch.log_metric("ppo/return_mean", masked_mean(returns, mask).item())
        batch.log_metric("ppo/explained_variance", (1.0 - residual / spread.clamp(min=1e-8)).item())
        return advantages * mask

    # -- trajectory side: the value loss ----------------------------------------------------------------------

    @hookimpl
    def po_loss_penalty(self, batch):
        if not batch.training:
            return None
        inputs = batch.inputs
        if "ppo_returns" not in inputs:
            raise ValueError("the micro-batch carries no value targets (ppo_returns): the advantages were not "
                             "computed by ppo-critic")
        values = token_values(self._require_model(), inputs)
        mask = batch.mask * inputs["ppo_value_mask"]
        per_token = clipped_value_loss(values, inputs["ppo_old_values"], inputs["ppo_returns"],
                                       batch.options["ppo_value_clip"])
        loss = batch.token_mean(per_token, mask)  # over the value tokens of every process
        clipped = (values - inputs["ppo_old_values"]).abs() > batch.options["ppo_value_clip"]
        batch.log_metric("ppo/value_loss", batch.reduce_sum(loss.detach()).item() / batch.num_processes)
        batch.log_metric("ppo/value_clip_fraction", batch.global_masked_mean(clipped.float() * mask))
        return loss.to(batch.logps.dtype)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    @hookimpl
    def po_state_dict(self):
        if self.model is None:
            return None
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        weights = {name: t for name, t in self.model.state_dict().items() if name in trainable}
        return {"critic": weights, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    @hookimpl
    def po_load_state_dict(self, state):
        missing = set(state["critic"]) - set(self.model.state_dict())
        if missing:
            raise ValueError(f"the checkpoint's critic does not fit this critic (unknown weights {sorted(missing)[:3]})")
        self.model.load_state_dict(state["critic"], strict=False)
        if self.scheduler is None:
            self._pending_state = state  # the schedule starts with training (after the checkpoint is read)
        else:
            self._load_optimizer_and_schedule(state)

    def _load_optimizer_and_schedule(self, state) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class PositiveNLL:
    """Component ``positive-nll`` (VAPO): mu * NLL of the sampled tokens of positive completions."""

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Term

        register("positive-nll", components=["positive-nll"], side="trajectory", paper=VAPO_PAPER,
                 summary="an NLL loss on the tokens of completions whose reward reaches a threshold",
                 targets="correct samples the policy-gradient signal underuses (sparse rewards)",
                 objective=lambda args, options: Objective(terms=(Term(
                     "positive_nll", options["positive_nll_coef"], threshold=options["positive_nll_threshold"]),)))

    @hookimpl
    def po_declare_options(self, register):
        register("positive_nll_coef", 0.1, type=float, check=lambda v: v >= 0.0, help="weight mu, >= 0")
        register("positive_nll_threshold", 1.0, type=float,
                 help="a completion is positive when its weighted reward is at least this")

    @hookimpl
    def po_loss_penalty(self, batch):
        if batch.rewards is None:
            return None
        positive = (batch.rewards >= batch.options["positive_nll_threshold"]).to(batch.mask.dtype).unsqueeze(1)
        mask = batch.mask * positive
        batch.log_metric("positive_nll/positive_fraction", batch.global_masked_mean(positive.expand_as(mask) *
                                                                                    batch.mask))
        # The mean over the positive tokens of every process; a process without any still joins the count.
        return batch.options["positive_nll_coef"] * batch.token_mean(-batch.logps, mask)
