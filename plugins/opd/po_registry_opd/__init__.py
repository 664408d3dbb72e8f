"""On-policy distillation (OPD; Thinking Machines, 2025) and the four ways a teacher can enter GRPO (the survey's
GRPO-OPD operators T_A-T_D).

The student samples; a frozen teacher scores the sampled tokens. The dense signal is the negated reverse-KL sample
r_t = log pi_T(y_t | prefix) - log pi_old(y_t | prefix) (optionally clipped to [-c, c] against length hacking).

- ``opd`` (pure OPD, divergence minimisation, outside J(theta): the reward functions are not used): A_t = r_t
  (or its discounted return-to-go); with ``opd_divergence: full`` the loss is instead an exact per-token divergence
  over the vocabulary, computed in chunks of rows: by ``opd_beta``, the reverse KL(pi_theta || pi_T) (1), the forward
  KL(pi_T || pi_theta) (0) or the generalized JSD between (GKD's and TRL's beta).
- ``opd-ratio`` (T_A, importance weight): the per-token loss is weighted by w_t = min(exp(lambda r_t), cap).
- ``opd-advantage`` (T_B, advantage): A_{i,t} = A_i + lambda r_t, after the group normalisation of A_i.
- ``opd-reward`` (T_C, reward side): the length-normalised teacher log-ratio (1/|o_i|) sum_t r_{i,t} joins the
  rewards as one more reward column of weight lambda, inside the group normalisation.
- ``opd-kl`` (T_D, external regulariser): + lambda KL(pi_theta || pi_T) per token, or the full-vocabulary divergence.
  On the student's own samples, in the loss, the estimator decides the gradient (README): k2 = (log pi_theta -
  log pi_T)^2 / 2 (the default) follows grad KL(pi_theta || pi_T), the reverse KL T_D names; k3 follows the forward
  grad KL(pi_T || pi_theta); k1 has zero expected gradient.

lambda may follow a schedule (constant, linear or cosine from ``opd_lambda`` to ``opd_lambda_end``). The teacher is
any local causal LM with the student's vocabulary, loaded once per run, frozen, in evaluation mode, on the
student's device and dtype; or, with no path and a LoRA student, the student's base model with the adapter switched
off (a :class:`~po_registry.context.AuxiliaryModel` named ``teacher``). It runs without gradient, a chunk of rows at
a time, and keeps only sampled-token log-probs unless the full divergence is asked for.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch.utils.checkpoint import checkpoint

from po_registry import CouplingWarning, hookimpl
from po_registry.context import AuxiliaryModel, completion_logits, completion_token_logps, load_model
from po_registry.ops import kl_estimate, masked_mean, returns_to_go

PAPER = "thinkingmachines.ai/blog/on-policy-distillation (OPD); survey section 8 (GRPO-OPD operators)"


def teacher_chunk(options, args) -> int:
    """Rows per teacher forward pass: ``opd_teacher_chunk``, or the micro-batch size."""
    return options["opd_teacher_chunk"] or args.per_device_train_batch_size


def teacher_paths(options) -> list[str]:
    return [path.strip() for path in options["opd_teacher"].split(",") if path.strip()]


def teacher_weights(options) -> list[float]:
    """One weight per teacher: ``opd_teacher_weights``, or equal weights summing to 1."""
    count = max(len(teacher_paths(options)), 1)
    given = [part.strip() for part in options["opd_teacher_weights"].split(",") if part.strip()]
    if not given:
        return [1.0 / count] * count
    try:
        weights = [float(part) for part in given]
    except ValueError:
        raise ValueError(f"opd_teacher_weights: {options['opd_teacher_weights']!r} is not a comma-separated list of "
                         "numbers") from None
    if len(weights) != count or any(not w > 0 for w in weights):
        raise ValueError(f"opd_teacher_weights: {len(weights)} weights for {count} teacher(s) in opd_teacher; give one "
                         "weight > 0 per teacher")
    return weights


def teacher_name(index: int) -> str:
    """The auxiliary model name of the teacher at ``index`` in ``opd_teacher``."""
    return "teacher" if index == 0 else f"teacher_{index + 1}"


def teachers(auxiliary, options) -> list[tuple[AuxiliaryModel, float]]:
    """The run's teachers with their weights, in the order of ``opd_teacher``."""
    if "teacher" not in auxiliary:
        raise RuntimeError("no teacher is loaded: the opd components need po_setup (a PolicyOptimizationTrainer)")
    return [(auxiliary[teacher_name(k)], weight) for k, weight in enumerate(teacher_weights(options))]


def teacher_token_logps(teacher: AuxiliaryModel, rows, temperature: float, chunk: int) -> torch.Tensor:
    """(B, T) a teacher's log-probs of the sampled completion tokens, a chunk of rows at a time, computed once for
    the rows' completion tensor (every stage of a micro-batch asks for the same)."""
    return teacher.outputs(rows["completion_ids"], lambda: completion_token_logps(teacher, rows, temperature, chunk))


def chunk_log_ratios(student_ends: list[int], student_logps: list[float], teacher_ends: list[int],
                     teacher_logps: list[float]) -> list[float]:
    """Per student token, the teacher-minus-student log-probability of the text chunk it closes (0 for a token that
    closes none). Chunks end where both tokenizations end a token (``*_ends``: each token's end offset in the text;
    a zero-width token, like an end-of-sequence token, belongs to the chunk that ends where it stands): log P of a
    chunk's text is the sum of its tokens' log-probs under either tokenizer."""
    boundaries = sorted(set(student_ends) & set(teacher_ends))
    closing = {}  # boundary -> the last student token ending there or just before it
    student_sum, teacher_sum = {}, {}
    for k, end in enumerate(student_ends):
        boundary = next(b for b in boundaries if b >= end)
        closing[boundary] = k
        student_sum[boundary] = student_sum.get(boundary, 0.0) + student_logps[k]
    for end, logp in zip(teacher_ends, teacher_logps):
        boundary = next(b for b in boundaries if b >= end)
        teacher_sum[boundary] = teacher_sum.get(boundary, 0.0) + logp
    ratios = [0.0] * len(student_ends)
    for boundary, k in closing.items():
        ratios[k] = teacher_sum.get(boundary, 0.0) - student_sum[boundary]
    return ratios


class TextAlignedTeacher(AuxiliaryModel):
    """A teacher with its own tokenizer: it reads the rows' text in its own tokens, and its signal is taken on the
    text chunks where both tokenizations have a boundary (:func:`chunk_log_ratios`)."""

    def __init__(self, model, tokenizer, student_tokenizer):
        super().__init__(model)
        self.tokenizer, self.student_tokenizer = tokenizer, student_tokenizer

    def log_ratios(self, rows, behaviour_logps: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
        """(B, T) the chunk log-ratios of each row's completion, on its loss tokens."""
        if "tool_mask" in rows and (rows["tool_mask"] * rows["completion_mask"] != rows["completion_mask"]).any():
            raise NotImplementedError("a teacher with another tokenizer cannot read multi-turn completions yet (the "
                                      "environment's text is not the student's)")
        ratios = torch.zeros_like(behaviour_logps)
        for row in range(rows["completion_ids"].shape[0]):
            tokens = rows["completion_ids"][row][rows["completion_mask"][row].bool()].tolist()
            if not tokens:
                continue
            prompt = self.student_tokenizer.decode(rows["prompt_ids"][row][rows["prompt_mask"][row].bool()].tolist(),
                                                   skip_special_tokens=True)
            student_ends = [len(self.student_tokenizer.decode(tokens[: k + 1], skip_special_tokens=True))
                            for k in range(len(tokens))]
            text = self.student_tokenizer.decode(tokens, skip_special_tokens=True)
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            teacher_tokens, teacher_ends = list(encoded["input_ids"]), [end for _, end in encoded["offset_mapping"]]
            if tokens[-1] == self.student_tokenizer.eos_token_id and self.tokenizer.eos_token_id is not None:
                teacher_tokens, teacher_ends = teacher_tokens + [self.tokenizer.eos_token_id], teacher_ends + [len(text)]
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            teacher_rows = {"prompt_ids": torch.tensor([prompt_ids]), "prompt_mask": torch.ones(1, len(prompt_ids)),
                            "completion_ids": torch.tensor([teacher_tokens]),
                            "completion_mask": torch.ones(1, len(teacher_tokens))}
            teacher_rows = {key: value.to(behaviour_logps.device).long() for key, value in teacher_rows.items()}
            with torch.no_grad():
                teacher_logps = completion_token_logps(self.model, teacher_rows, temperature, 1)[0].tolist()
            values = chunk_log_ratios(student_ends, behaviour_logps[row, : len(tokens)].tolist(), teacher_ends,
                                      teacher_logps)
            ratios[row, : len(tokens)] = torch.tensor(values, dtype=ratios.dtype, device=ratios.device)
        return ratios * mask


def teacher_signal(auxiliary, rows, behaviour_logps: torch.Tensor, mask: torch.Tensor, options,
                   args) -> torch.Tensor:
    """r_t = log pi_T(y_t) - log pi_old(y_t) on the loss tokens (0 elsewhere), clipped to [-c, c] when c > 0; with
    several teachers the weighted sum sum_k w_k (log pi_k(y_t) - log pi_old(y_t))."""
    chunk = teacher_chunk(options, args)

    def log_ratios(teacher):
        if isinstance(teacher, TextAlignedTeacher):
            return teacher.log_ratios(rows, behaviour_logps, mask, args.temperature)
        return teacher_token_logps(teacher, rows, args.temperature, chunk) - behaviour_logps

    signal = sum(weight * log_ratios(teacher) for teacher, weight in teachers(auxiliary, options)) * mask
    clip = options["opd_clip"]
    return signal.clamp(-clip, clip) if clip > 0 else signal


def rollout_signal(batch) -> torch.Tensor:
    """(B, T) teacher signal on this process's rows of a generation batch, against the sampling policy."""
    mask = batch.local_mask  # environment tokens were not sampled by the student: no signal there
    signal = teacher_signal(batch.auxiliary, batch.local, batch.policy_logps(), mask, batch.options, batch.args)
    total, tokens = batch.gather(torch.stack([signal.sum(), mask.sum()]).reshape(1, 2)).sum(0)  # every process's
    batch.log_metric("opd/reverse_kl", -(total / tokens.clamp(min=1.0)).item())
    return signal


def scheduled_lambda(options, step: int, max_steps: int) -> float:
    """lambda at ``step``: constant, or linear / cosine from ``opd_lambda`` to ``opd_lambda_end`` over training."""
    start, end, kind = options["opd_lambda"], options["opd_lambda_end"], options["opd_lambda_schedule"]
    if kind == "constant" or max_steps <= 0:
        return start
    progress = min(step / max_steps, 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def current_lambda(batch) -> float:
    value = scheduled_lambda(batch.options, batch.step, batch.max_steps or batch.args.max_steps)
    batch.log_metric("opd/lambda", value)
    return value


def token_divergence(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Per position, over the vocabulary (last dim): beta = 1 the reverse KL(pi_theta || pi_T), beta = 0 the forward
    KL(pi_T || pi_theta), in between the generalized JSD beta KL(pi_T || m) + (1 - beta) KL(pi_theta || m) with the
    mixture m = (1 - beta) pi_theta + beta pi_T (GKD, arXiv 2306.13649; TRL's DistillationConfig.beta)."""
    if beta == 1.0:
        return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    if beta == 0.0:
        return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)
    mixture = torch.logaddexp(student_logps + math.log(1 - beta), teacher_logps + math.log(beta))
    return (beta * teacher_logps.exp() * (teacher_logps - mixture)
            + (1 - beta) * student_logps.exp() * (student_logps - mixture)).sum(-1)


def with_tail(logps: torch.Tensor) -> torch.Tensor:
    """Log-probs of a few outcomes plus one more, the rest of the mass: log(1 - sum exp(logps)) (kept finite when
    the few hold it all)."""
    held = logps.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([logps, torch.log(-torch.expm1(held))], dim=-1)


def on_teacher_top_k(student_logps: torch.Tensor, teacher_logps: torch.Tensor, k: int,
                     tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions seen on the teacher's k most likely tokens only (what a teacher that sends its top-k
    log-probs gives): with ``tail`` each gets one more outcome for the rest of its mass (k + 1 outcomes, exact
    probabilities); without, each is renormalised over the k."""
    teacher_top, tokens = teacher_logps.topk(k, dim=-1)
    student_top = student_logps.gather(-1, tokens)
    if tail:
        return with_tail(student_top), with_tail(teacher_top)
    return student_top.log_softmax(-1), teacher_top.log_softmax(-1)


def full_divergence(student, teacher, rows, mask: torch.Tensor, temperature: float, chunk: int,
                    beta: float = 1.0, top_k: int = 0, tail: bool = True) -> torch.Tensor:
    """Sum over loss tokens of :func:`token_divergence` (beta 1: KL(pi_theta || pi_T)), over the vocabulary or, with
    ``top_k``, over the teacher's top-k tokens (:func:`on_teacher_top_k`).

    Each chunk of rows is checkpointed: its vocabulary-sized logits live only while that chunk is computed."""

    def chunk_sum(start: int, stop: int, chunk_mask: torch.Tensor) -> torch.Tensor:
        student_logps = torch.log_softmax(completion_logits(student, rows, start, stop, temperature).float(), -1)
        teacher_logps = torch.log_softmax(completion_logits(teacher, rows, start, stop, temperature).float(), -1)
        if top_k:
            student_logps, teacher_logps = on_teacher_top_k(student_logps, teacher_logps, top_k, tail)
        return (token_divergence(student_logps, teacher_logps, beta) * chunk_mask).sum()

    total = mask.new_zeros(())
    for start in range(0, mask.shape[0], chunk):
        chunk_mask = mask[start : start + chunk]
        if chunk_mask.any():
            total = total + checkpoint(chunk_sum, start, start + chunk, chunk_mask, use_reentrant=False)
    return total


def _warn_if_sequence_ratio(name: str, args, assembly) -> None:
    if assembly.importance_level(args) == "sequence":
        warnings.warn(f"{name}: a dense per-token teacher signal under a sequence-level importance ratio is "
                      "mismatched (one ratio for tokens with different advantages); use gspo-token or a token-level "
                      "ratio", CouplingWarning, stacklevel=2)


class Teacher:
    """Component ``teacher``: loads the teacher and declares the options every operator shares."""

    @hookimpl
    def po_check_config(self, options, assembly):
        if options["opd_cross_tokenizer"] and (options["opd_divergence"] == "full" or "opd-kl" in assembly.components):
            raise ValueError("opd_cross_tokenizer: a teacher with another tokenizer gives a signal on text chunks, "
                             "not per token: it works with the sampled divergence of opd, opd-ratio, opd-advantage "
                             "and opd-reward, not with opd_divergence=full or opd-kl")
        if options["opd_beta"] != 1.0 and options["opd_divergence"] != "full":
            raise ValueError(f"opd_beta={options['opd_beta']} chooses a full-vocabulary divergence (forward KL, "
                             "JSD): set opd_divergence=full (the sampled divergence is the reverse KL)")
        if options["opd_top_k"] and options["opd_divergence"] != "full":
            raise ValueError(f"opd_top_k={options['opd_top_k']} restricts the full divergence to the teacher's top-k "
                             "tokens: set opd_divergence=full (the sampled divergence reads one token)")
        teacher_weights(options)  # refused here, by name, when they do not fit the teachers

    @hookimpl
    def po_declare_options(self, register):
        register("opd_teacher", "", type=str,
                 help="teacher checkpoint (a local causal LM with the student's vocabulary), or several, comma-"
                      "separated; empty: the base model of a LoRA student")
        register("opd_teacher_weights", "", type=str,
                 help="one weight > 0 per teacher, comma-separated: the signal and divergence are the weighted sums "
                      "of each teacher's; empty: equal weights summing to 1")
        register("opd_cross_tokenizer", False, type=bool,
                 help="allow a teacher with another tokenizer: its signal is taken on text chunks where both "
                      "tokenizations have a boundary (the sampled divergence, not opd-kl)")
        register("opd_top_k", 0, type=int, check=lambda v: v >= 0,
                 help="the full divergence over the teacher's top-k tokens only (a teacher that sends its top-k "
                      "log-probs); 0: the whole vocabulary")
        register("opd_top_k_tail", True, type=bool,
                 help="with opd_top_k: one more outcome holds the rest of each distribution's mass; false: both "
                      "renormalised over the k")
        register("opd_teacher_chunk", 0, type=int, check=lambda v: v >= 0,
                 help="rows per teacher forward pass; 0: per_device_train_batch_size")
        register("opd_lambda", 1.0, type=float, check=lambda v: v >= 0.0, help="weight lambda of the teacher signal")
        register("opd_lambda_schedule", "constant", choices=("constant", "linear", "cosine"),
                 help="how lambda moves from opd_lambda to opd_lambda_end over training")
        register("opd_lambda_end", 0.0, type=float, check=lambda v: v >= 0.0, help="lambda at the end of training")
        register("opd_clip", 0.0, type=float, check=lambda v: v >= 0.0,
                 help="clip the per-token teacher log-ratio to [-c, c]; 0: no clip")
        register("opd_divergence", "sampled", choices=("sampled", "full"),
                 help="opd and opd-kl: the sampled tokens' log-ratio, or the full-vocabulary divergence (opd_beta)")
        register("opd_beta", 1.0, type=float, check=lambda v: 0.0 <= v <= 1.0,
                 help="the full divergence: 1 reverse KL(student || teacher), 0 forward KL(teacher || student), "
                      "between: generalized JSD (TRL's DistillationConfig.beta)")
        register("opd_kl_estimator", "k2", choices=("k1", "k2", "k3"),
                 help="opd-kl: estimator on sampled tokens; its gradient: k2 reverse KL(student || teacher), k3 "
                      "forward KL(teacher || student), k1 zero in expectation")

    @hookimpl
    def po_setup(self, context, options):
        student, paths = context.model, teacher_paths(options)
        if not paths:
            if not hasattr(student, "disable_adapter"):
                raise ValueError("opd_teacher is empty and the student is not a LoRA adapter: give the teacher's "
                                 "checkpoint in opd_teacher")
            context.register_auxiliary("teacher", AuxiliaryModel(student, adapter_off=True))
            return
        for index, path in enumerate(paths):
            if options["opd_cross_tokenizer"]:
                from transformers import AutoTokenizer

                student_tokenizer = getattr(context.processing_class, "tokenizer", context.processing_class)
                teacher = TextAlignedTeacher(load_model(path, like=student), AutoTokenizer.from_pretrained(path),
                                             student_tokenizer)
            else:
                teacher = AuxiliaryModel(load_teacher(path, student, context.processing_class))
            context.register_auxiliary(teacher_name(index), teacher)


def load_teacher(path: str, student, processing_class):
    """The teacher from ``path`` on the student's device and dtype; refused when its vocabulary is not the
    student's."""
    from transformers import AutoTokenizer

    teacher = load_model(path, like=student)
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(f"the teacher {path!r} has a vocabulary of {teacher_vocab} tokens and the student "
                         f"{student_vocab}: OPD needs a teacher that shares the student's tokenizer, or "
                         "opd_cross_tokenizer=true (a signal on text chunks)")
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        teacher_tokenizer = None  # no tokenizer files beside the weights: the vocabulary size was checked
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the teacher {path!r} has a different tokenizer from the student's (the token ids "
                         "differ): OPD needs a teacher that shares the student's tokenizer, or opd_cross_tokenizer=true "
                         "(a signal on text chunks)")
    return teacher


class PureOPD:
    """Component ``opd``: pure on-policy distillation, the teacher's log-ratio as the only reward."""

    po_reads = ("token_rewards",)

    po_explain = {
        "po_token_rewards": "teacher log-ratio r_t = log pi_T - log pi_old as a dense reward (sampled divergence)",
        "po_compute_advantages": "A_t = r_t (return-to-go with opd_gamma); the reward functions are not used",
        "po_loss_penalty": "full-vocabulary reverse KL(pi_theta || pi_T) when opd_divergence = full",
    }

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Dense, Objective

        register("opd", components=["teacher", "opd"], paper=PAPER,
                 summary="pure on-policy distillation: the teacher's per-token log-ratio is the reward",
                 targets="SFT's compounding errors and RL's sparse reward (a boundary case: it leaves J(theta))",
                 objective=lambda args, options: Objective(  # -KL(p_theta || p_T); opd_gamma < 1: token by token
                     not_applicable="the full-vocabulary divergence needs the student model" if options[
                         "opd_divergence"] == "full" else "", reward=0.0, kl_teacher=1.0, advantage="zero",
                     dense=(Dense("teacher", 1.0, gamma=options["opd_gamma"], clip=options["opd_clip"]),),
                     needs={"teacher": "teacher"}),
                 fixes=("sparse-credit", "teacher-divergence"))

    @hookimpl
    def po_declare_options(self, register):
        register("opd_gamma", 0.0, type=float, check=lambda v: 0.0 <= v <= 1.0,
                 help="discount of the teacher reward's return-to-go; 0: each token its own log-ratio")

    @hookimpl
    def po_check_config(self, args, assembly):
        _warn_if_sequence_ratio("opd", args, assembly)

    @hookimpl
    def po_token_rewards(self, batch):
        if batch.options["opd_divergence"] == "full":
            return None
        return rollout_signal(batch)

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        if batch.options["opd_divergence"] == "full":
            return torch.zeros(batch.num_rows, device=rewards.device)
        gamma = batch.options["opd_gamma"]
        mask = batch.completion_mask
        return returns_to_go(batch.token_rewards, gamma, mask) if gamma > 0 else batch.token_rewards * mask

    @hookimpl
    def po_setup(self, context):
        self.student = context.model  # the full divergence runs the student over the vocabulary

    @hookimpl
    def po_loss_penalty(self, batch):
        if batch.options["opd_divergence"] != "full":
            return None
        return _full_kl(batch, self.student, coefficient=1.0)


def _full_kl(batch, student, coefficient: float) -> torch.Tensor:
    options, beta = batch.options, batch.options["opd_beta"]
    total = sum(weight * full_divergence(student, teacher, batch.inputs, batch.mask, batch.args.temperature,
                                         teacher_chunk(options, batch.args), beta, options["opd_top_k"],
                                         options["opd_top_k_tail"])
                for teacher, weight in teachers(batch.auxiliary, options))
    kl = batch.mean_over_processes(total, batch.mask.sum())  # the token mean over every process's micro-batch
    name = {1.0: "full_reverse_kl", 0.0: "full_forward_kl"}.get(beta, "full_jsd")
    batch.log_metric(f"opd/{name}", batch.reduce_sum(kl.detach()).item() / batch.num_processes)
    return coefficient * kl.to(batch.logps.dtype)


def _micro_batch_signal(batch) -> torch.Tensor:
    return teacher_signal(batch.auxiliary, batch.inputs, batch.old_logps, batch.mask, batch.options, batch.args)


class TeacherRatio:
    """Component ``opd-ratio`` (T_A): the teacher enters the importance weight."""

    po_explain = {"po_rollout_correction": "T_A: per-token weight w_t = min(exp(lambda r_t), opd_ratio_cap), "
                                           "r_t = log pi_T - log pi_old"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Rule

        register("opd-ratio", components=["teacher", "opd-ratio"], paper=PAPER,
                 summary="GRPO-OPD T_A: weight each token's loss by the capped teacher/student probability ratio",
                 targets="sparse verifier reward; tokens the teacher prefers get more weight",
                 objective=Objective(needs={"teacher": "teacher"}, token_weights=(Rule(
                     "teacher ratio weights min(exp(lambda r_t), cap)", lambda world, options: torch.exp(
                         options["opd_lambda"] * world.teacher_log_ratio(options["opd_clip"])).clamp(
                         max=options["opd_ratio_cap"])),)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_declare_options(self, register):
        register("opd_ratio_cap", 2.0, type=float, check=lambda v: v > 0.0, help="upper bound of the weight, > 0")

    @hookimpl
    def po_rollout_correction(self, batch):
        signal = _micro_batch_signal(batch)
        weight = torch.exp(current_lambda(batch) * signal).clamp(max=batch.options["opd_ratio_cap"])
        batch.log_metric("opd/ratio_weight_mean", batch.global_masked_mean(weight))
        return weight.detach()


class TeacherAdvantage:
    """Component ``opd-advantage`` (T_B): the teacher's log-ratio is added to the advantage per token."""

    po_explain = {"po_token_rewards": "T_B: lambda r_t added to every token's advantage after group normalisation"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Dense, Objective

        register("opd-advantage", components=["teacher", "opd-advantage"], paper=PAPER,
                 summary="GRPO-OPD T_B: A_{i,t} = A_i + lambda (log pi_T - log pi_old) per token",
                 targets="sparse verifier reward: dense per-token credit from a teacher",
                 objective=lambda args, options: Objective(  # each token its own log-ratio: a token-level KL
                     kl_teacher=options["opd_lambda"], needs={"teacher": "teacher"},
                     dense=(Dense("teacher", options["opd_lambda"], gamma=0.0, clip=options["opd_clip"]),)),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_check_config(self, args, assembly):
        _warn_if_sequence_ratio("opd-advantage", args, assembly)

    @hookimpl
    def po_token_rewards(self, batch):
        return current_lambda(batch) * rollout_signal(batch)


class TeacherReward:
    """Component ``opd-reward`` (T_C): the teacher's log-ratio as one more reward, inside the normalisation."""

    po_explain = {"po_compute_advantages": "T_C: (1/|o|) sum_t r_t joins the rewards as a column of weight lambda, "
                                           "then the baseline's group advantage"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Rule, baseline_advantage

        register("opd-reward", components=["teacher", "opd-reward"], paper=PAPER,
                 summary="GRPO-OPD T_C: the length-normalised teacher log-ratio is an extra reward of weight lambda",
                 targets="sparse verifier reward: in-expectation distillation on the reward side",
                 objective=lambda args, options: baseline_advantage(args).then(Objective(
                     needs={"teacher": "teacher"},
                     shaping=(Rule("lambda x mean teacher log-ratio", lambda world, options: options["opd_lambda"]
                                   * world.teacher_log_ratio(options["opd_clip"]).sum(1)
                                   / world.loss_tokens.clamp(min=1.0)),))),
                 fixes=("sparse-credit",))

    @hookimpl
    def po_check_config(self, args):
        if args.scale_rewards == "group":
            warnings.warn("opd-reward: the teacher term is z-scored per group together with the verifier reward "
                          "(scale_rewards='group'), so its scale mixes with the sparse reward's; lambda and its "
                          "schedule are the knobs (or scale_rewards='batch' / 'none')", CouplingWarning, stacklevel=2)

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        from po_registry.builtin.grpo import GroupAdvantage

        signal = batch.gather(rollout_signal(batch))[:, : batch.completion_mask.shape[1]]
        sequence = masked_mean(signal, batch.completion_mask, dim=1)
        weights = torch.cat([batch.reward_weights, batch.reward_weights.new_tensor([current_lambda(batch)])])
        with_teacher = dataclasses.replace(batch, reward_names=[*batch.reward_names, "teacher"], reward_weights=weights)
        return GroupAdvantage().po_compute_advantages(torch.cat([rewards, sequence.unsqueeze(1)], dim=1), with_teacher)


class TeacherKL:
    """Component ``opd-kl`` (T_D): an external KL(pi_theta || pi_T) regulariser."""

    po_explain = {"po_token_penalty": "T_D: + lambda k(pi_theta, pi_T) per sampled token (opd_kl_estimator; the "
                                      "default k2 follows grad KL(pi_theta || pi_T))",
                  "po_loss_penalty": "T_D: + lambda full-vocabulary KL(pi_theta || pi_T) when opd_divergence = full"}

    @hookimpl
    def po_register_methods(self, register):
        from po_registry.oracle import Objective, Term

        register("opd-kl", components=["teacher", "opd-kl"], paper=PAPER,
                 summary="GRPO-OPD T_D: GRPO plus lambda KL(student || teacher) as a regulariser",
                 targets="sparse verifier reward: keep the student near a teacher while it optimises the reward",
                 objective=lambda args, options: Objective(  # T_D names the reverse KL, whatever the estimator
                     not_applicable="the full-vocabulary divergence needs the student model" if options[
                         "opd_divergence"] == "full" else "", kl_teacher=options["opd_lambda"],
                     terms=(Term("reverse_kl", options["opd_lambda"], against="teacher"),),
                     needs={"teacher": "teacher"}),
                 fixes=("teacher-divergence",))

    @hookimpl
    def po_token_penalty(self, batch):
        if batch.options["opd_divergence"] == "full":
            return None
        chunk, estimator = teacher_chunk(batch.options, batch.args), batch.options["opd_kl_estimator"]
        kl, logged = 0.0, 0.0
        for teacher, weight in teachers(batch.auxiliary, batch.options):
            teacher_logps = teacher_token_logps(teacher, batch.inputs, batch.args.temperature, chunk)
            kl = kl + weight * kl_estimate(batch.logps, teacher_logps, estimator)
            logged = logged + weight * kl_estimate(batch.logps.detach(), teacher_logps, "k3")
        # logged: k3, an unbiased estimate of KL(pi_theta || pi_T) whichever estimator drives the gradient
        batch.log_metric("opd/teacher_kl", batch.global_masked_mean(logged))
        return current_lambda(batch) * kl

    @hookimpl
    def po_setup(self, context):
        self.student = context.model  # the full divergence runs the student over the vocabulary

    @hookimpl
    def po_loss_penalty(self, batch):
        if batch.options["opd_divergence"] != "full":
            return None
        return _full_kl(batch, self.student, coefficient=current_lambda(batch))
