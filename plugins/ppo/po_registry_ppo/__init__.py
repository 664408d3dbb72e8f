"""PPO with a learned critic (Schulman et al. 2017, arXiv 1707.06347; GAE: arXiv 1506.02438) and VAPO
(Yue et al. 2025, arXiv 2504.05118).

Reward side: a value model V_psi scores every completion token at rollout time; the outcome reward R sits on the
last token (plus any dense token rewards of other plugins); GAE gives the policy's advantages
A_t = sum_l (gamma lambda)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, whitened over the batch, and the
critic's targets G_t = A_t(lambda_critic) + V_t, all over the action tokens (environment tokens inside a
multi-turn completion are skipped, and the return flows through them). Trajectory side: the clipped value loss
0.5 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2) per micro-batch; the critic has its own optimizer and
learning-rate schedule, steps with the policy's optimizer, and is saved and restored with checkpoints (all of it
the core's :class:`~po_registry.context.AuxiliaryModel`).

VAPO: value pretraining (the policy is frozen for the first ``ppo_critic_warmup_steps`` optimizer steps while the
critic learns the returns of the initial policy), decoupled GAE (lambda_critic = 1, length-adaptive
lambda_policy = 1 - 1 / (alpha l)), clip-higher with the token-level loss, and an NLL loss on positive samples.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from po_registry import hookimpl
from po_registry.context import AuxiliaryModel, load_model
from po_registry.ops import clipped_value_loss, gae, masked_mean, masked_whiten, outcome_token_rewards

PPO_PAPER = "arXiv 1707.06347"
VAPO_PAPER = "arXiv 2504.05118"


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's lambda_policy = 1 - 1 / (alpha l) per row, clamped to [0, 1]."""
    return (1.0 - 1.0 / (alpha * lengths.float().clamp(min=1.0))).clamp(0.0, 1.0)


ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


def token_values(model: torch.nn.Module, rows) -> torch.Tensor:
    """(B, T) V(s_t) for each completion token t: the head's output at the position before it."""
    prompt_length, width = rows["prompt_ids"].shape[1], rows["completion_ids"].shape[1]
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    scores = model(input_ids=ids, attention_mask=attention).logits[..., 0]
    return scores[:, prompt_length - 1 : prompt_length - 1 + width].float()


class _PretrainValues(TrainerCallback):
    """Value pretraining: the policy's gradients are dropped for its first ``steps`` optimizer steps."""

    def __init__(self, policy: torch.nn.Module, steps: int):
        self.policy, self.steps = policy, steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step < self.steps:
            for parameter in self.policy.parameters():
                parameter.grad = None  # AdamW skips parameters without a gradient: the policy stays as it is


class Critic:
    """Component ``ppo-critic``: the value model, GAE advantages and the clipped value loss."""

    po_reads = ("token_rewards",)  # dense rewards join the outcome reward in the GAE
    po_carries = po_uses_carried = ("ppo_old_values", "ppo_returns", "ppo_value_mask")  # the value loss's targets

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        # With the true value function the oracle provides, GAE's expected credit is R's for any lambda.
        def critic(args, options):
            return Objective(not_applicable="ppo_gamma < 1 (a discounted outcome) is not modelled"
                             if options["ppo_gamma"] < 1 else "", advantage="none",
                             scale="free" if options["ppo_whiten_advantages"] else "exact",
                             needs={"critic": "value_model"})

        register("ppo", components=["ppo-critic"], paper=PPO_PAPER,
                 summary="PPO with a learned critic: GAE advantages from a value model trained with a clipped loss",
                 targets="Monte Carlo variance of critic-free baselines; per-token credit from a value function",
                 objective=critic,
                 fixes=("gradient-variance", "sparse-credit"))
        register("vapo", components=["ppo-critic", "positive-nll", "clip-higher"], paper=VAPO_PAPER,
                 options={"ppo_critic_lambda": 1.0, "ppo_length_adaptive_alpha": 0.05, "ppo_critic_warmup_steps": 50},
                 summary="VAPO: value pretraining, decoupled and length-adaptive GAE, clip-higher, positive NLL",
                 targets="value bias on long sequences, heterogeneous lengths and sparse rewards in PPO",
                 objective=critic,  # with positive-nll's and clip-higher's declarations
                 fixes=("gradient-variance", "sparse-credit", "entropy-collapse"), risks=("entropy-explosion",))

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
    def po_setup(self, context, options):
        policy = context.model
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        source = options["ppo_critic_model"] or base.config._name_or_path
        if not source:
            raise ValueError("the policy was passed as a model object without a checkpoint path: set "
                             "ppo_critic_model to the checkpoint the critic should start from")
        model = load_model(source, like=policy, value_head=True, lora_r=options["ppo_critic_lora_r"])
        context.register_auxiliary("critic", AuxiliaryModel(model, learning_rate=options["ppo_critic_lr"],
                                                            max_grad_norm=options["ppo_critic_max_grad_norm"]))
        if options["ppo_critic_warmup_steps"]:
            context.add_callback(_PretrainValues(context.model, options["ppo_critic_warmup_steps"]))

    # -- reward side: GAE -------------------------------------------------------------------------------------

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        options = batch.options
        model, rows, chunk = _critic(batch).model, batch.local, batch.args.per_device_train_batch_size
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
        values = token_values(_critic(batch).model, inputs)
        mask = batch.mask * inputs["ppo_value_mask"]
        per_token = clipped_value_loss(values, inputs["ppo_old_values"], inputs["ppo_returns"],
                                       batch.options["ppo_value_clip"])
        loss = batch.token_mean(per_token, mask)  # over the value tokens of every process
        clipped = (values - inputs["ppo_old_values"]).abs() > batch.options["ppo_value_clip"]
        batch.log_metric("ppo/value_loss", batch.reduce_sum(loss.detach()).item() / batch.num_processes)
        batch.log_metric("ppo/value_clip_fraction", batch.global_masked_mean(clipped.float() * mask))
        return loss.to(batch.logps.dtype)


def _critic(batch) -> AuxiliaryModel:
    if "critic" not in batch.auxiliary:
        raise RuntimeError("the critic is not set up: ppo-critic needs po_setup (a PolicyOptimizationTrainer)")
    return batch.auxiliary["critic"]


class PositiveNLL:
    """Component ``positive-nll`` (VAPO): mu * NLL of the sampled tokens of positive completions."""

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Term

        register("positive-nll", components=["positive-nll"], paper=VAPO_PAPER,
                 summary="an NLL loss on the tokens of completions whose reward reaches a threshold",
                 targets="correct samples the policy-gradient signal underuses (sparse rewards)",
                 objective=lambda args, options: Objective(terms=(Term(
                     "positive_nll", options["positive_nll_coef"], threshold=options["positive_nll_threshold"]),)),
                 fixes=("zero-variance-groups",))

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
