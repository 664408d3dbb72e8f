"""Self-distillation (SDPO: Huebotter et al. 2026, arXiv 2601.20802): the policy, shown a successful sibling's answer,
is its own teacher.

For each completion y_i of a prompt x, a *demonstration* is another completion of the same group whose reward reaches
the threshold (the first such one). The teacher context is the reprompt c_i = template(x, demonstration); the teacher
is the policy itself (``live``), its LoRA base (``base``) or an exponential moving average of it (``ema``, the
default), scoring the same tokens: log pi_T(y_t | c_i, y_<t). Completions without a demonstration take no part.

The per-token loss on the sampled tokens is (log pi_theta - log pi_T) detached times log pi_theta, whose expected
gradient is that of the reverse KL(pi_theta || pi_T) at each position; with ``sdpo_is_clip`` c it is weighted by
min(pi_theta / pi_old, c) (no gradient). Rows average their active tokens, the micro-batch averages its rows, and
the loss is w times that plus (1 - w) times the policy loss (the group advantages scaled by 1 - w; w = 1, the
default, is pure self-distillation).

The teacher scores the tokens once per generation batch, when the batch is scored (the policy's weights then are the
sampler's); its log-probs travel with the rows to the loss.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from po_registry import hookimpl
from po_registry.context import AuxiliaryModel, completion_token_logps, independent_copy
from po_registry.ops import masked_sum

PAPER = "arXiv 2601.20802 (SDPO)"
TEACHER = "self_teacher"
REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"  # the paper's templates
SOLUTION = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"


def demonstrations(rewards: torch.Tensor, group_size: int, threshold: float, own: bool) -> list[int | None]:
    """For each row, the first row of its group (itself excluded unless ``own``) whose reward is >= ``threshold``."""
    chosen = []
    for i in range(rewards.shape[0]):
        start = i - i % group_size
        found = [j for j in range(start, start + group_size)
                 if (own or j != i) and not torch.isnan(rewards[j]) and rewards[j] >= threshold]
        chosen.append(found[0] if found else None)
    return chosen


def reprompt(prompt, demonstration: str, options):
    """The teacher's prompt: the original with the demonstration; a conversation keeps its messages up to the last
    user turn, whose text is rewritten."""
    solution = options["sdpo_solution_template"].format(successful_previous_attempt=demonstration)
    if isinstance(prompt, str):
        return options["sdpo_reprompt_template"].format(prompt=prompt, solution=solution, feedback="")
    last = max(k for k, message in enumerate(prompt) if message["role"] == "user")
    text = options["sdpo_reprompt_template"].format(prompt=prompt[last]["content"], solution=solution, feedback="")
    return [*prompt[:last], {"role": "user", "content": text}]


def teacher_token_logps(teacher, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor, pad_id: int, temperature: float, chunk: int) -> torch.Tensor:
    """(B, T) the teacher's log-probs of the completion tokens after its own prompts (left-padded), in chunks."""
    width = max(len(ids) for ids in prompt_ids)
    device = completion_ids.device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    rows = {"prompt_ids": ids, "prompt_mask": mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}
    return completion_token_logps(teacher, rows, temperature, chunk)


class _MovingAverage(TrainerCallback):
    """teacher <- (1 - rate) teacher + rate policy after every ``every``-th optimizer step."""

    def __init__(self, teacher: torch.nn.Module, policy: torch.nn.Module, rate: float, every: int):
        self.pairs = [(t, p) for t, p in zip(teacher.parameters(), policy.parameters()) if p.requires_grad]
        self.rate, self.every = rate, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            with torch.no_grad():
                for target, source in self.pairs:
                    target.lerp_(source.to(target.dtype), self.rate)


class SelfDistillation:
    """Component ``sdpo``."""

    po_carries = ("sdpo_teacher_logps", "sdpo_active")
    po_uses_carried = ("sdpo_teacher_logps", "sdpo_active")
    po_explain = {
        "po_compute_advantages": "group advantages x (1 - sdpo_weight); the teacher (the policy shown a successful "
                                 "sibling's answer) scores each completion that has one",
        "po_loss_penalty": "sdpo_weight x mean over rows of the tokens' (log pi - log pi_T) log pi: reverse KL to the "
                           "self-teacher",
    }

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective

        register("sdpo", components=["sdpo"], paper=PAPER,
                 objective=Objective(not_applicable="its teacher is the policy under a reprompt built from the "
                                                    "group's own successes: checked against TRL's SDPOTrainer"),
                 summary="self-distillation: the policy shown a successful sibling's answer is its own teacher",
                 targets="sparse verifier reward: failed samples get dense credit from the model's own successes",
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("sdpo_weight", 1.0, type=float, check=lambda v: 0.0 <= v <= 1.0,
                 help="w: w x self-distillation + (1 - w) x policy loss; 1: pure self-distillation")
        register("sdpo_teacher", "ema", choices=("ema", "live", "base"),
                 help="the teacher's weights: a moving average of the policy, the policy itself, or its LoRA base")
        register("sdpo_ema_rate", 0.05, type=float, check=lambda v: 0.0 < v <= 1.0,
                 help="ema teacher: teacher <- (1 - rate) teacher + rate policy")
        register("sdpo_ema_every", 1, type=int, check=lambda v: v >= 1, help="ema teacher: update every n steps")
        register("sdpo_success_threshold", 1.0, type=float, help="a completion with reward >= this is a demonstration")
        register("sdpo_own_success", False, type=bool,
                 help="a successful completion may be its own demonstration (TRL's dont_reprompt_on_self_success "
                      "negated)")
        register("sdpo_is_clip", 2.0, type=float, check=lambda v: v >= 0.0,
                 help="weight the loss by min(pi_theta / pi_old, c); 0: no weight")
        register("sdpo_max_reprompt_tokens", 10240, type=int, check=lambda v: v >= 1,
                 help="keep the last n tokens of a teacher prompt")
        register("sdpo_reprompt_template", REPROMPT, type=str, help="teacher prompt: {prompt}, {solution}, {feedback}")
        register("sdpo_solution_template", SOLUTION, type=str,
                 help="the demonstration's text: {successful_previous_attempt}")

    @hookimpl
    def po_setup(self, context, options):
        policy, kind = context.model, options["sdpo_teacher"]
        if kind == "live":
            teacher = AuxiliaryModel(policy, shared=True)
        elif kind == "base":
            if not hasattr(policy, "disable_adapter"):
                raise ValueError("sdpo_teacher=base is the LoRA student's base model: this student has no adapter")
            teacher = AuxiliaryModel(policy, adapter_off=True)
        else:
            teacher = AuxiliaryModel(independent_copy(policy))
            context.add_callback(_MovingAverage(teacher.model, policy, options["sdpo_ema_rate"],
                                                options["sdpo_ema_every"]))
            self.moving_average = teacher.model
        context.register_auxiliary(TEACHER, teacher)

    @hookimpl
    def po_state_dict(self):
        teacher = getattr(self, "moving_average", None)
        return None if teacher is None else {"ema": teacher.state_dict()}

    @hookimpl
    def po_load_state_dict(self, state):
        self.moving_average.load_state_dict(state["ema"])

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        from po_registry.builtin.grpo import GroupAdvantage

        options = batch.options
        advantages = GroupAdvantage().po_compute_advantages(rewards, batch) * (1.0 - options["sdpo_weight"])
        total = batch.weighted_reward(rewards)
        chosen = demonstrations(total, batch.group_size, options["sdpo_success_threshold"],
                                options["sdpo_own_success"])
        active = torch.tensor([c is not None for c in chosen], dtype=torch.float32, device=total.device)
        batch.log_metric("sdpo/active_fraction", active.mean().item())
        teacher_logps = torch.zeros_like(batch.completion_mask)
        if active.any():  # decided on the global rewards, so every process gathers the demonstrations alike
            texts = self._demonstration_texts(batch, {j for j in chosen if j is not None})
            local = batch.local_rows
            mine = [(i, chosen[local.start + i]) for i in range(local.stop - local.start)
                    if chosen[local.start + i] is not None]
            if mine:
                teacher_logps[local.start + torch.tensor([i for i, _ in mine])] = self._teacher_logps(batch, mine, texts)
        batch.carry("sdpo_teacher_logps", teacher_logps)
        batch.carry("sdpo_active", active)
        return advantages

    @staticmethod
    def _demonstration_texts(batch, rows: set[int]) -> dict[int, str]:
        """The decoded completions of global ``rows`` (a collective: every process calls it)."""
        ids = batch.gather(batch.local["completion_ids"].float())
        kept = batch.gather(batch.local["completion_mask"].float())
        return {j: batch.processing_class.decode(ids[j][kept[j].bool()].long().tolist(), skip_special_tokens=True)
                for j in rows}

    def _teacher_logps(self, batch, mine: list[tuple[int, int]], texts: dict[int, str]) -> torch.Tensor:
        """(len(mine), T) teacher log-probs of this process's rows ``i`` reprompted with global row ``j``'s answer."""
        if batch.tokenize_prompts is None or TEACHER not in batch.auxiliary:
            raise RuntimeError("sdpo needs its teacher (po_setup) and the trainer's prompt tokenizer "
                               "(RewardBatch.tokenize_prompts); this batch has neither")
        local = batch.local
        prompts = [reprompt(batch.rows[i]["prompt"], texts[j], batch.options) for i, j in mine]
        limit = batch.options["sdpo_max_reprompt_tokens"]
        prompt_ids = [list(p)[-limit:] for p in batch.tokenize_prompts(prompts)]
        rows = torch.tensor([i for i, _ in mine], device=local["completion_ids"].device)
        tokenizer = getattr(batch.processing_class, "tokenizer", batch.processing_class)
        chunk = batch.args.per_device_train_batch_size
        logps = teacher_token_logps(batch.auxiliary[TEACHER], prompt_ids, local["completion_ids"][rows],
                                    local["completion_mask"][rows], tokenizer.pad_token_id, batch.args.temperature,
                                    chunk)
        return torch.nn.functional.pad(logps, (0, batch.completion_mask.shape[1] - logps.shape[1]))

    @hookimpl
    def po_loss_penalty(self, batch):
        weight = batch.options["sdpo_weight"]
        if weight == 0.0:
            return None
        teacher = batch.inputs["sdpo_teacher_logps"][:, : batch.logps.shape[1]]
        mask = batch.mask * batch.inputs["sdpo_active"].unsqueeze(1)
        gap = (batch.logps - teacher).detach()
        per_token = gap * batch.logps
        clip = batch.options["sdpo_is_clip"]
        if clip > 0:
            per_token = per_token * torch.exp((batch.logps - batch.old_logps).detach().clamp(-20, 20)).clamp(max=clip)
        rows = masked_sum(per_token, mask, dim=1) / mask.sum(1).clamp(min=1.0)
        count = torch.tensor(float(rows.shape[0]), device=rows.device)
        total, tokens = batch.reduce_sum(torch.stack([masked_sum(gap, mask), mask.sum()])).tolist()
        batch.log_metric("sdpo/reverse_kl", total / max(tokens, 1.0))  # the sampled estimate, every process's tokens
        return weight * batch.mean_over_processes(rows.sum(), count)
