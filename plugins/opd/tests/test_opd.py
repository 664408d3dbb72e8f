"""On-policy distillation and the GRPO-OPD operators: each against its formula on small tensors, the full-vocabulary
reverse KL against TRL's DistillationTrainer, the teacher's loading rules, and training end to end."""

import dataclasses
import math
import re
import tempfile
import warnings

import pytest
import torch
import po_registry_opd
from po_registry_opd import full_divergence, load_teacher, rollout_signal, scheduled_lambda, teacher_signal, \
    teacher_token_logps

from po_registry.builtin.grpo import GroupAdvantage
from po_registry.context import AuxiliaryModel
from po_registry.errors import CouplingWarning, OptionError
from po_registry.registry import get_registry
from po_registry.testing import (PluginConformance, char_tokenizer, default_args, loss_batch, partial_credit,
                                 reward_batch, tiny_causal_lm)

TEACHER_DIR = tempfile.mkdtemp(prefix="po-opd-teacher-")
tiny_causal_lm(char_tokenizer(), seed=1).save_pretrained(TEACHER_DIR)  # a different model with the same vocabulary
OPTIONS = {"opd_teacher": TEACHER_DIR, "opd_lambda": 0.5}


def _teacher_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TEACHER_DIR).eval()


TEACHER_MODEL = _teacher_model()


def _auxiliary() -> dict:
    """Synthetic batches have no trainer: the teacher as its po_setup registers it (a fresh one, no outputs kept)."""
    return {"teacher": AuxiliaryModel(TEACHER_MODEL)}


@pytest.fixture
def po_reward_batch():
    """The kit's factory, with this run's teacher among the batch's auxiliary models."""
    return lambda **kwargs: reward_batch(**{"auxiliary": _auxiliary(), **kwargs})


@pytest.fixture
def po_loss_batch():
    return lambda **kwargs: loss_batch(**{"auxiliary": _auxiliary(), **kwargs})


def _component(name):
    return get_registry().plugin(name, needed_by="the tests")


def _options(**overrides):
    registry = get_registry()
    defaults = {name: opt.default for name, opt in registry.options.items() if opt.plugin in
                ("teacher", "opd", "opd-ratio")}
    return {**defaults, **OPTIONS, **overrides}


def _teacher_logps(rows):
    """Reference: the teacher's log-softmax at each completion position, gathered at the sampled token."""
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = TEACHER_MODEL(input_ids=ids, attention_mask=attention).logits
    width, prompt = rows["completion_ids"].shape[1], rows["prompt_ids"].shape[1]
    logps = torch.log_softmax(logits[:, prompt - 1 : prompt - 1 + width], dim=-1)
    return logps.gather(-1, rows["completion_ids"].unsqueeze(-1)).squeeze(-1)


class TestOPDConformance(PluginConformance):
    method = "opd"
    options = OPTIONS
    metrics = ("opd/reverse_kl",)

    def prepare_auxiliary(self, auxiliary):
        auxiliary.update(_auxiliary())


class TestRatioConformance(PluginConformance):
    method = "opd-ratio"
    options = OPTIONS
    metrics = ("opd/ratio_weight_mean", "opd/lambda")

    def prepare_auxiliary(self, auxiliary):
        auxiliary.update(_auxiliary())


class TestAdvantageConformance(PluginConformance):
    method = "opd-advantage"
    options = OPTIONS
    metrics = ("opd/reverse_kl",)

    def prepare_auxiliary(self, auxiliary):
        auxiliary.update(_auxiliary())


class TestRewardConformance(PluginConformance):
    method = "opd-reward"
    options = OPTIONS
    metrics = ("opd/reverse_kl",)

    def prepare_auxiliary(self, auxiliary):
        auxiliary.update(_auxiliary())


class TestKLConformance(PluginConformance):
    method = "opd-kl"
    options = OPTIONS
    metrics = ("opd/teacher_kl",)

    def prepare_auxiliary(self, auxiliary):
        auxiliary.update(_auxiliary())


def test_teacher_signal_is_the_sampled_token_log_ratio(po_reward_batch):
    _, batch = po_reward_batch(group_size=2, num_groups=2, width=4, options=_options(), args=default_args())
    mask = batch.local["completion_mask"].float()
    got = teacher_signal(batch.auxiliary, batch.local, batch.policy_logps(), mask, _options(), batch.args)
    expected = (_teacher_logps(batch.local) - batch.policy_logps()) * mask
    assert torch.allclose(got, expected, atol=1e-5)
    clipped = teacher_signal(batch.auxiliary, batch.local, batch.policy_logps(), mask, _options(opd_clip=0.5),
                             batch.args)
    assert torch.allclose(clipped, expected.clamp(-0.5, 0.5), atol=1e-5)


def test_teacher_runs_in_chunks_of_rows_with_the_same_result(po_reward_batch):
    _, batch = po_reward_batch(group_size=4, num_groups=3, width=5, args=default_args())
    whole = teacher_token_logps(batch.auxiliary["teacher"], batch.local, 1.0, chunk=12)
    assert torch.allclose(teacher_token_logps(_auxiliary()["teacher"], batch.local, 1.0, chunk=5), whole, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_pure_opd_advantage_is_the_dense_teacher_reward(po_reward_batch, gamma):
    rewards, batch = po_reward_batch(group_size=2, num_groups=2, width=4, options=_options(opd_gamma=gamma),
                                     args=default_args())
    opd = _component("opd")
    batch = dataclasses.replace(batch, token_rewards=opd.po_token_rewards(batch))
    got = opd.po_compute_advantages(rewards, batch)
    signal = (_teacher_logps(batch.local) - batch.policy_logps()) * batch.completion_mask
    expected = signal.clone()
    if gamma:  # the return over each row's loss tokens: the environment token of row 2 is no discount step
        for row, (values, mask) in enumerate(zip(signal.tolist(), batch.completion_mask.tolist())):
            running = 0.0
            for t in reversed(range(len(values))):
                if mask[t]:
                    running = values[t] + gamma * running
                    expected[row, t] = running
    assert torch.allclose(got, expected * batch.completion_mask, atol=1e-5)


def test_ratio_operator_weights_tokens_by_the_capped_teacher_ratio(po_loss_batch):
    batch = po_loss_batch(options=_options(opd_ratio_cap=1.5), args=default_args())
    got = _component("opd-ratio").po_rollout_correction(batch)
    signal = (_teacher_logps(batch.inputs) - batch.old_logps) * batch.mask
    assert torch.allclose(got, torch.exp(0.5 * signal).clamp(max=1.5), atol=1e-5)
    assert not got.requires_grad


def test_advantage_operator_adds_lambda_times_the_signal_after_normalisation(po_reward_batch):
    rewards, batch = po_reward_batch(group_size=2, num_groups=2, width=4, options=_options(), args=default_args())
    batch = dataclasses.replace(batch, token_rewards=_component("opd-advantage").po_token_rewards(batch))
    got = GroupAdvantage().po_compute_advantages(rewards, batch)
    total = rewards.squeeze(1)
    grouped = total.view(-1, 2)
    sequence = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    signal = (_teacher_logps(batch.local) - batch.policy_logps()) * batch.completion_mask
    assert torch.allclose(got, (sequence.unsqueeze(1) + 0.5 * signal) * batch.completion_mask, atol=1e-5)


def test_reward_operator_adds_the_length_normalised_signal_inside_the_group_normalisation(po_reward_batch):
    rewards, batch = po_reward_batch(group_size=3, num_groups=2, width=4, options=_options(), args=default_args())
    got = _component("opd-reward").po_compute_advantages(rewards, batch)
    mask = batch.completion_mask
    signal = (_teacher_logps(batch.local) - batch.policy_logps()) * mask
    shaped = rewards.squeeze(1) + 0.5 * signal.sum(1) / mask.sum(1)
    grouped = shaped.view(-1, 3)
    expected = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_kl_operator_default_is_k2_on_the_real_teacher(po_loss_batch):
    """Plumbing: the teacher model's sampled-token log-probs enter lambda (log pi_theta - log pi_T)^2 / 2."""
    batch = po_loss_batch(options=_options(), args=default_args())
    assert batch.options["opd_kl_estimator"] == "k2"
    got = _component("opd-kl").po_token_penalty(batch)
    expected = 0.5 * 0.5 * (batch.logps.detach() - _teacher_logps(batch.inputs)) ** 2
    assert torch.allclose(got, expected, atol=1e-5)
    got.sum().backward()  # d/d log pi of lambda (log pi - log pi_T)^2 / 2 = lambda (log pi - log pi_T)
    assert torch.allclose(batch.logps.grad, 0.5 * (batch.logps.detach() - _teacher_logps(batch.inputs)), atol=1e-5)


def _fixed_teacher(monkeypatch, teacher_logps):
    """The teacher's log-probs of the sampled tokens, given directly (the teacher model's plumbing is tested above)."""
    monkeypatch.setattr(po_registry_opd, "teacher_token_logps",
                        lambda teacher, rows, temperature, chunk: teacher_logps)


@pytest.mark.parametrize("estimator, per_token", [
    # r = log pi - log pi_T = [0.5, -1.0]; k1 = r; k2 = r^2 / 2; k3 = exp(-r) - 1 + r
    ("k1", [0.5, -1.0]),
    ("k2", [0.125, 0.5]),
    ("k3", [math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0]),
])
def test_kl_operator_values_by_hand(po_loss_batch, monkeypatch, estimator, per_token):
    batch = po_loss_batch(rows=1, width=2, options=_options(opd_kl_estimator=estimator), args=default_args())
    batch.logps = torch.tensor([[-1.0, -2.0]])
    _fixed_teacher(monkeypatch, torch.tensor([[-1.5, -1.0]]))
    got = _component("opd-kl").po_token_penalty(batch)
    assert got[0].tolist() == pytest.approx([0.5 * k for k in per_token])  # lambda = 0.5


def _exact_kl(p_logps, q_logps):
    """KL(p || q) summed over positions, by summing over the whole vocabulary."""
    return (p_logps.exp() * (p_logps - q_logps)).sum()


# Each estimator's expected gradient on the student's own samples, in the loss (derivation in the README):
# the default (k2) -> grad KL(pi || T) (reverse, what T_D names), k3 -> grad KL(T || pi) (forward), k1 -> 0.
EXPECTED_GRADIENT = {
    "default": lambda student, teacher: _exact_kl(student, teacher),
    "k3": lambda student, teacher: _exact_kl(teacher, student),
    "k1": lambda student, teacher: 0.0 * student.sum(),
}


@pytest.mark.parametrize("estimator", ["default", "k3", "k1"])
def test_kl_operator_gradient_is_the_exact_gradient_of_its_divergence(po_loss_batch, monkeypatch, estimator):
    """Vocabulary 4, two positions with their own logits (the parameters), a fixed teacher per position. Row v of the
    micro-batch samples token v at both positions; weighting each row's per-token penalty by pi(v) takes the
    expectation over the student's samples exactly (no sampling). Its gradient must be lambda times the exact
    gradient of the divergence, computed by summing over the vocabulary."""
    logits = torch.tensor([[0.3, -0.2, 1.1, 0.0], [-0.7, 0.4, 0.2, 0.9]], requires_grad=True)  # (position, vocab)
    teacher = torch.log_softmax(torch.tensor([[1.0, 0.5, -0.5, 0.2], [0.1, -1.0, 0.8, 0.3]]), dim=-1)
    student = torch.log_softmax(logits, dim=-1)
    tokens = torch.arange(4)
    options = _options() if estimator == "default" else _options(opd_kl_estimator=estimator)
    batch = po_loss_batch(rows=4, width=2, options=options, args=default_args())
    batch.mask = torch.ones(4, 2)
    batch.logps = student.T[tokens]  # (row v, position t): log pi_t(v)
    _fixed_teacher(monkeypatch, teacher.T[tokens])
    penalty = _component("opd-kl").po_token_penalty(batch)
    expected_penalty = (student.T.detach().exp() * penalty).sum()  # sum_t sum_v pi_t(v) penalty_t(v)
    method_grad, = torch.autograd.grad(expected_penalty, logits)
    exact_grad, = torch.autograd.grad(EXPECTED_GRADIENT[estimator](torch.log_softmax(logits, -1), teacher), logits,
                                      allow_unused=True, materialize_grads=True)
    assert torch.allclose(method_grad, 0.5 * exact_grad, atol=1e-6)  # lambda = 0.5
    if estimator == "default":  # and it is not the forward KL's gradient (the old default, k3)
        forward, = torch.autograd.grad(_exact_kl(teacher, torch.log_softmax(logits, -1)), logits)
        assert not torch.allclose(method_grad, 0.5 * forward, atol=1e-3)


def test_full_reverse_kl_in_chunks_equals_the_direct_sum(po_tiny_model_dir, po_loss_batch):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(po_tiny_model_dir)
    batch = po_loss_batch(rows=5, width=4, args=default_args())
    rows, mask = batch.inputs, batch.mask
    chunked = full_divergence(student, AuxiliaryModel(TEACHER_MODEL), rows, mask, temperature=1.0, chunk=2)
    chunked.backward()
    chunked_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], dim=1)
    attention = torch.cat([rows["prompt_mask"], rows["completion_mask"]], dim=1)
    prompt = rows["prompt_ids"].shape[1]
    student_logps = torch.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, prompt - 1:-1], -1)
    with torch.no_grad():
        teacher_logps = torch.log_softmax(TEACHER_MODEL(input_ids=ids, attention_mask=attention).logits[:, prompt - 1:-1], -1)
    per_token = (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)
    direct = (per_token * mask).sum()
    direct.backward()
    assert chunked.item() == pytest.approx(direct.item(), abs=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(chunked_grads, student.parameters()))


def test_lambda_schedules():
    options = {"opd_lambda": 1.0, "opd_lambda_end": 0.2, "opd_lambda_schedule": "linear"}
    assert [scheduled_lambda(options, s, 10) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    options["opd_lambda_schedule"] = "cosine"
    assert [scheduled_lambda(options, s, 10) for s in (0, 5, 10)] == pytest.approx([1.0, 0.6, 0.2])
    options["opd_lambda_schedule"] = "constant"
    assert scheduled_lambda(options, 7, 10) == 1.0


def test_teacher_with_another_vocabulary_is_refused(po_tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    student = AutoModelForCausalLM.from_pretrained(po_tiny_model_dir)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary of 80 tokens and the student 54"):
        load_teacher(str(tmp_path / "other"), student, char_tokenizer())


def test_teacher_with_another_tokenizer_is_refused(po_tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(po_tiny_model_dir)
    tiny_causal_lm(char_tokenizer(), seed=2).save_pretrained(tmp_path / "teacher")
    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    swapped = {**vocab, "a": vocab["b"], "b": vocab["a"]}  # same size, different ids
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(swapped, unk_token="<unk>")
                                                               if "<unk>" in swapped else models.WordLevel(swapped)))
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="different tokenizer"):
        load_teacher(str(tmp_path / "teacher"), student, tokenizer)


def test_teacher_is_frozen_on_the_students_device_and_dtype(po_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(po_tiny_model_dir, dtype=torch.float64)
    teacher = AuxiliaryModel(load_teacher(TEACHER_DIR, student, char_tokenizer())).model  # as po_setup registers it
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.float64


def test_no_teacher_path_needs_a_lora_student(po_trainer):
    with pytest.raises(Exception, match="opd_teacher is empty and the student is not a LoRA adapter"):
        po_trainer(["opd"])


def test_lora_student_distils_from_its_own_base_model(po_trainer):
    """No teacher path with a LoRA student: the base model (adapter off) is the teacher, so r_t measures how far
    the adapter moved the policy; at the start (LoRA B = 0) the signal is exactly 0."""
    from peft import LoraConfig

    from po_registry.trainer import rollout

    trainer = po_trainer(["opd"], peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = rollout(trainer, [trainer.train_dataset[0]] * 4 + [trainer.train_dataset[1]] * 4)
    assert out["advantages"].abs().max().item() < 1e-5


def test_couplings_are_warned():
    with pytest.warns(CouplingWarning, match="sequence-level importance ratio"):
        default_args(["opd-advantage"], OPTIONS, importance_sampling_level="sequence")
    with pytest.warns(CouplingWarning, match="z-scored per group"):
        default_args(["opd-reward"], OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CouplingWarning)
        default_args(["opd-reward"], OPTIONS, scale_rewards="batch")


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5, 0.2], ids=["reverse-kl", "forward-kl", "jsd", "jsd-0.2"])
def test_full_divergence_equals_trl_distillation_trainer(po_tiny_model_dir, po_tokenizer, tmp_path, beta):
    """Pure OPD with the full-vocabulary divergence: loss and gradients equal DistillationTrainer(beta)'s for the
    reverse KL, the forward KL and the generalized JSD."""
    from trl import DistillationConfig, DistillationTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer, micro_batch_loss, rollout

    dataset = get_task("addition").dataset(32)
    common = dict(use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8, max_completion_length=6,
                  temperature=1.0, max_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    ours = PolicyOptimizationTrainer(  # pure OPD ignores the reward, but TRL wants one
        model=po_tiny_model_dir, processing_class=po_tokenizer, train_dataset=dataset, reward_funcs=[partial_credit],
        args=PolicyOptimizationConfig(output_dir=str(tmp_path / "ours"), methods=["opd"], num_generations=4,
                                      method_options={"opd_teacher": TEACHER_DIR, "opd_divergence": "full",
                                                      "opd_beta": beta}, **common))
    stock = DistillationTrainer(model=po_tiny_model_dir, teacher_model=TEACHER_DIR, processing_class=po_tokenizer,
                                train_dataset=dataset,
                                args=DistillationConfig(output_dir=str(tmp_path / "stock"), beta=beta, **common))
    batch = rollout(ours, [dataset[0]] * 4 + [dataset[1]] * 4)
    ours.model.zero_grad()
    loss = micro_batch_loss(ours, dict(batch))
    loss.backward()
    stock.model.train()
    stock_loss = stock.compute_loss(stock.model, dict(batch))
    stock_loss.backward()
    assert loss.item() == pytest.approx(stock_loss.item(), abs=1e-6)
    assert loss.item() > 0
    for p, q in zip(ours.model.parameters(), stock.model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_weak_student_learns_from_a_stronger_teacher(po_trainer):
    """The teacher is the warm start trained further (>= 60% held-out greedy accuracy), the student the weak warm
    start (~30%): pure OPD on the student's own samples raises its accuracy."""
    from po_registry.embedded import embedded_model_dir
    from po_registry.tasks import greedy_accuracy
    from po_registry.registry import get_task

    task = get_task("addition")
    teacher = embedded_model_dir(task, target_accuracy=0.6)
    trainer = po_trainer(["opd"], {"opd_teacher": str(teacher)}, embedded=True, max_steps=40, learning_rate=3e-4,
                         per_device_train_batch_size=32, num_generations=4, max_completion_length=task.max_completion_length)
    problems = task.eval_problems(256)
    before = greedy_accuracy(trainer.model, trainer.processing_class, problems, task.max_completion_length)
    trainer.train()
    after = greedy_accuracy(trainer.model, trainer.processing_class, problems, task.max_completion_length)
    reverse_kl = [row["opd/reverse_kl"] for row in trainer.state.log_history if "opd/reverse_kl" in row]
    assert after >= before + 0.05, (before, after)
    assert sum(reverse_kl[-5:]) / 5 < sum(reverse_kl[:5]) / 5, reverse_kl


def test_reverse_kl_metric_is_the_mean_over_every_process(po_reward_batch, monkeypatch):
    """r = (log pi_T - log pi_old) on the loss tokens = [[-0.5, 1.0], [1.0, (masked)]]: this process's sum 1.5 over 3
    tokens; the other process (simulated by the gather) has sum -4.5 over 3, so the logged -mean r is
    -(1.5 - 4.5) / 6 = 0.5 (before: this process's -1.5 / 3 = -0.5 alone)."""
    _, batch = po_reward_batch(group_size=2, num_groups=1, width=2, options=_options(), args=default_args())
    batch.local["completion_mask"] = torch.tensor([[1, 1], [1, 0]])
    batch = dataclasses.replace(batch, policy_logps=lambda: torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    _fixed_teacher(monkeypatch, torch.tensor([[-1.5, -1.0], [-2.0, -9.0]]))
    batch = dataclasses.replace(batch, gather=lambda local: torch.cat([local, torch.tensor([[-4.5, 3.0]])]))
    logged = {}
    batch = dataclasses.replace(batch, log_metric=logged.__setitem__)
    rollout_signal(batch)
    assert logged["opd/reverse_kl"] == pytest.approx(0.5)


def test_teacher_signal_skips_environment_tokens(po_reward_batch, monkeypatch):
    """An environment reply inside a completion (tool mask 0) was not sampled by the student: no teacher signal there
    and no place in the logged mean. r = [[-0.5, (env), 1.0]] here, sum 0.5 over 2 loss tokens; the other process
    -4.5 over 3: logged -(0.5 - 4.5) / 5 = 0.8 (before: the environment token's 8.0 counted too)."""
    _, batch = po_reward_batch(group_size=1, num_groups=1, width=3, options=_options(), args=default_args())
    batch.local["completion_mask"], batch.local["tool_mask"] = torch.ones(1, 3), torch.tensor([[1, 0, 1]])
    batch = dataclasses.replace(batch, policy_logps=lambda: torch.tensor([[-1.0, -9.0, -2.0]]))
    _fixed_teacher(monkeypatch, torch.tensor([[-1.5, -1.0, -1.0]]))
    batch = dataclasses.replace(batch, gather=lambda local: torch.cat([local, torch.tensor([[-4.5, 3.0]])]))
    logged = {}
    batch = dataclasses.replace(batch, log_metric=logged.__setitem__)
    signal = rollout_signal(batch)
    assert logged["opd/reverse_kl"] == pytest.approx(0.8)
    assert torch.allclose(signal, torch.tensor([[-0.5, 0.0, 1.0]]))


def test_token_divergences_by_hand():
    """Two-token vocabulary, student (0.8, 0.2), teacher (0.5, 0.5): reverse KL 0.8 ln 1.6 + 0.2 ln 0.4, forward KL
    0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2); JSD(0.5) with the mixture (0.65, 0.35)."""
    from po_registry_opd import token_divergence

    student, teacher = torch.tensor([0.8, 0.2]).log(), torch.tensor([0.5, 0.5]).log()
    reverse = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)
    forward = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.5 / 0.35)) + \
        0.5 * (0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.2 / 0.35))
    for beta, expected in ((1.0, reverse), (0.0, forward), (0.5, jsd)):
        assert token_divergence(student, teacher, beta).item() == pytest.approx(expected, abs=1e-6)


def test_a_non_reverse_divergence_needs_the_full_vocabulary():
    with pytest.raises(OptionError, match="opd_beta=0.5 chooses a full-vocabulary divergence"):
        default_args(["opd"], {"opd_beta": 0.5})


# -- the teacher's top-k, several teachers ----------------------------------------------------------------------------

def test_top_k_divergences_by_hand():
    """Teacher (0.6, 0.3, 0.1), student (0.2, 0.5, 0.3). Top-1 with the tail: outcomes {token 0, rest}, teacher (0.6,
    0.4), student (0.2, 0.8): reverse KL 0.2 ln(0.2/0.6) + 0.8 ln(0.8/0.4). Top-2 renormalised: teacher (2/3, 1/3),
    student (2/7, 5/7): forward KL 2/3 ln(7/3) + 1/3 ln(7/15)."""
    from po_registry_opd import on_teacher_top_k, token_divergence

    teacher, student = torch.tensor([0.6, 0.3, 0.1]).log(), torch.tensor([0.2, 0.5, 0.3]).log()
    s, t = on_teacher_top_k(student, teacher, 1, tail=True)
    expected = 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)
    assert token_divergence(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    s, t = on_teacher_top_k(student, teacher, 2, tail=False)
    expected = 2 / 3 * math.log(7 / 3) + 1 / 3 * math.log(7 / 15)
    assert token_divergence(s, t, 0.0).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("tail", [True, False])
def test_top_k_forward_kl_equals_trl_server_distillation(tail):
    """TRL's server distillation (a teacher that sends its top-k log-probs) computes the forward KL on the teacher's
    top-k support, with a tail bucket (its default) or renormalised: the same per-token values from its own helpers."""
    from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence

    from po_registry_opd import on_teacher_top_k, token_divergence

    generator = torch.Generator().manual_seed(0)
    student = torch.log_softmax(2 * torch.randn(2, 3, 7, generator=generator), -1)
    teacher = torch.log_softmax(2 * torch.randn(2, 3, 7, generator=generator), -1)
    ours = token_divergence(*on_teacher_top_k(student, teacher, 3, tail), 0.0)
    teacher_top, tokens = teacher.topk(3, dim=-1)
    student_top, valid = student.gather(-1, tokens), torch.ones_like(teacher_top, dtype=torch.bool)
    if tail:
        student_sparse, support = _add_tail_bucket(student_top, valid)
        teacher_sparse, _ = _add_tail_bucket(teacher_top, valid)
    else:
        support = valid
        student_sparse = student_top - student_top.logsumexp(-1, keepdim=True)
        teacher_sparse = teacher_top - teacher_top.logsumexp(-1, keepdim=True)
    theirs = _jsd_divergence(student_sparse, teacher_sparse, beta=0.0, support_mask=support).sum(-1)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert ours.min() > 0


def test_top_k_over_the_whole_vocabulary_is_the_full_divergence():
    from po_registry_opd import on_teacher_top_k, token_divergence

    generator = torch.Generator().manual_seed(1)
    student = torch.log_softmax(torch.randn(4, 6, generator=generator), -1)
    teacher = torch.log_softmax(torch.randn(4, 6, generator=generator), -1)
    for beta in (1.0, 0.0, 0.5):
        full = token_divergence(student, teacher, beta)
        assert torch.allclose(token_divergence(*on_teacher_top_k(student, teacher, 6, True), beta), full, atol=1e-6)


SECOND_TEACHER_DIR = tempfile.mkdtemp(prefix="po-opd-teacher2-")
tiny_causal_lm(char_tokenizer(), seed=2).save_pretrained(SECOND_TEACHER_DIR)


def test_several_teachers_give_the_weighted_sum_of_their_signals(po_reward_batch):
    """r_t = 0.25 (log pi_A - log pi_old) + 0.75 (log pi_B - log pi_old), each teacher's log-probs from its own
    forward pass here."""
    from transformers import AutoModelForCausalLM

    second = AutoModelForCausalLM.from_pretrained(SECOND_TEACHER_DIR).eval()
    options = _options(opd_teacher=f"{TEACHER_DIR},{SECOND_TEACHER_DIR}", opd_teacher_weights="0.25,0.75")
    auxiliary = {"teacher": AuxiliaryModel(TEACHER_MODEL), "teacher_2": AuxiliaryModel(second)}
    _, batch = po_reward_batch(options=options, args=default_args(), auxiliary=auxiliary)
    behaviour = batch.policy_logps()
    signal = teacher_signal(batch.auxiliary, batch.local, behaviour, batch.local_mask, options, batch.args)
    first_logps = _teacher_logps(batch.local)
    ids = torch.cat([batch.local["prompt_ids"], batch.local["completion_ids"]], 1)
    with torch.no_grad():
        logits = second(input_ids=ids, attention_mask=torch.cat([batch.local["prompt_mask"],
                                                                 batch.local["completion_mask"]], 1)).logits
    width, prompt = batch.local["completion_ids"].shape[1], batch.local["prompt_ids"].shape[1]
    second_logps = torch.log_softmax(logits[:, prompt - 1: prompt - 1 + width], -1).gather(
        -1, batch.local["completion_ids"].unsqueeze(-1)).squeeze(-1)
    expected = (0.25 * (first_logps - behaviour) + 0.75 * (second_logps - behaviour)) * batch.local_mask
    assert torch.allclose(signal, expected, atol=1e-5)
    assert not torch.allclose(first_logps, second_logps, atol=1e-2)


def test_several_teachers_full_divergence_is_the_weighted_sum_of_trl_losses(po_tiny_model_dir, po_tokenizer, tmp_path):
    """Pure OPD, forward KL over the vocabulary, two teachers weighted 0.25 and 0.75: the loss and gradients equal
    0.25 and 0.75 of DistillationTrainer's with each teacher alone."""
    from trl import DistillationConfig, DistillationTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.trainer import PolicyOptimizationTrainer, micro_batch_loss, rollout

    dataset = get_task("addition").dataset(32)
    common = dict(use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=8, max_completion_length=6,
                  temperature=1.0, max_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    ours = PolicyOptimizationTrainer(
        model=po_tiny_model_dir, processing_class=po_tokenizer, train_dataset=dataset, reward_funcs=[partial_credit],
        args=PolicyOptimizationConfig(
            output_dir=str(tmp_path / "ours"), methods=["opd"], num_generations=4,
            method_options={"opd_teacher": f"{TEACHER_DIR},{SECOND_TEACHER_DIR}", "opd_teacher_weights": "0.25,0.75",
                            "opd_divergence": "full", "opd_beta": 0.0}, **common))
    batch = rollout(ours, [dataset[0]] * 4 + [dataset[1]] * 4)
    ours.model.zero_grad()
    loss = micro_batch_loss(ours, dict(batch))
    loss.backward()
    expected_loss, expected_grads = 0.0, None
    for weight, teacher in ((0.25, TEACHER_DIR), (0.75, SECOND_TEACHER_DIR)):
        stock = DistillationTrainer(model=po_tiny_model_dir, teacher_model=teacher, processing_class=po_tokenizer,
                                    train_dataset=dataset, args=DistillationConfig(
                                        output_dir=str(tmp_path / f"stock-{weight}"), beta=0.0, **common))
        stock.model.train()
        stock_loss = stock.compute_loss(stock.model, dict(batch))
        stock_loss.backward()
        expected_loss += weight * stock_loss.item()
        grads = [weight * p.grad for p in stock.model.parameters()]
        expected_grads = grads if expected_grads is None else [a + b for a, b in zip(expected_grads, grads)]
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    for p, g in zip(ours.model.parameters(), expected_grads):
        assert torch.allclose(p.grad, g, atol=1e-6)


@pytest.mark.parametrize("options, message", [
    ({"opd_teacher": "a,b", "opd_teacher_weights": "1"}, "1 weights for 2 teacher"),
    ({"opd_teacher": "a,b", "opd_teacher_weights": "1,0"}, "one weight > 0 per teacher"),
    ({"opd_teacher": "a", "opd_teacher_weights": "x"}, "'x' is not a comma-separated list"),
    ({"opd_top_k": 4}, "opd_top_k=4 restricts the full divergence"),
])
def test_bad_teacher_settings_are_refused_by_name(options, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        default_args(["opd"], options)


def test_trains_with_two_teachers_on_their_top_k(po_trainer):
    trainer = po_trainer(["opd-kl"], {"opd_teacher": f"{TEACHER_DIR},{SECOND_TEACHER_DIR}", "opd_divergence": "full",
                                      "opd_top_k": 3, "opd_beta": 0.5})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters()))
    assert all("opd/full_jsd" in row for row in trainer.state.log_history if "loss" in row)


# -- a teacher with another tokenizer ---------------------------------------------------------------------------------

def _pair_tokenizer():
    """The student's characters, specials in another order, and every two-digit pair as one token: "12+3=" is
    "12", "+", "3", "="."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from po_registry.embedded import CHARACTERS, SPECIAL_TOKENS

    pairs = [f"{a}{b}" for a in range(10) for b in range(10)]
    vocab = {token: i for i, token in enumerate(pairs + list(reversed(SPECIAL_TOKENS)) + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


PAIR_TEACHER_DIR = tempfile.mkdtemp(prefix="po-opd-pair-teacher-")
tiny_causal_lm(_pair_tokenizer(), seed=4).save_pretrained(PAIR_TEACHER_DIR)
_pair_tokenizer().save_pretrained(PAIR_TEACHER_DIR)


def test_chunk_log_ratios_by_hand():
    """Text "123": student "1", "2", "3" (ends 1, 2, 3), teacher "12", "3" (ends 2, 3): chunks "12" and "3"; the
    first chunk's ratio -2.5 - (-1 - 2) = 0.5 sits on "2", the second's -0.2 + 0.5 = 0.3 on "3". With an end-of-sequence
    token on both sides (zero width, at 3) it joins the last chunk: -0.2 - 0.3 - (-0.5 - 0.1) = 0.1 on the student's
    end token. Student "1", "23" against teacher "12", "3": one chunk, everything on "23"."""
    from po_registry_opd import chunk_log_ratios

    assert chunk_log_ratios([1, 2, 3], [-1.0, -2.0, -0.5], [2, 3], [-2.5, -0.2]) == pytest.approx([0.0, 0.5, 0.3])
    assert chunk_log_ratios([1, 2, 3, 3], [-1.0, -2.0, -0.5, -0.1], [2, 3, 3], [-2.5, -0.2, -0.3]) == \
        pytest.approx([0.0, 0.5, 0.0, 0.1])
    assert chunk_log_ratios([1, 3], [-1.0, -2.0], [2, 3], [-1.5, -0.5]) == pytest.approx([0.0, 1.0])


def test_a_teacher_with_the_students_own_tokenizer_gives_the_token_signal(po_reward_batch):
    """Through the text path with the student's own tokenizer every token is its own chunk: the signal is log pi_T -
    log pi_old token by token, as the same-tokenizer path computes it."""
    from po_registry_opd import TextAlignedTeacher

    _, batch = po_reward_batch(options=_options(), args=default_args())
    local = dict(batch.local, tool_mask=torch.ones_like(batch.local["completion_mask"]))
    behaviour = batch.policy_logps()
    mask = local["completion_mask"].float()
    aligned = TextAlignedTeacher(TEACHER_MODEL, char_tokenizer(), char_tokenizer())
    got = aligned.log_ratios(local, behaviour, mask, temperature=1.0)
    assert torch.allclose(got, (_teacher_logps(local) - behaviour) * mask, atol=1e-5)


def test_a_teacher_with_another_tokenizer_scores_the_text_in_its_own_tokens(po_tiny_model_dir, po_tokenizer):
    """Completion "12+3=" then end: the pair teacher reads "12", "+", "3", "=", end; the signal on the student's "2"
    is log pi_T("12") - log pi_old("1") - log pi_old("2"), on "1" nothing, "+" and "3" token by token, and the end
    token (zero width, where "=" ends) closes the chunk "=" + end on both sides."""
    from transformers import AutoModelForCausalLM

    from po_registry_opd import TextAlignedTeacher

    student, teacher_tokenizer = char_tokenizer(), _pair_tokenizer()
    teacher_model = AutoModelForCausalLM.from_pretrained(PAIR_TEACHER_DIR).eval()
    prompt, completion = student("3+9=")["input_ids"], student("12+3=")["input_ids"] + [student.eos_token_id]
    rows = {"prompt_ids": torch.tensor([prompt]), "prompt_mask": torch.ones(1, len(prompt), dtype=torch.long),
            "completion_ids": torch.tensor([completion]), "completion_mask": torch.ones(1, len(completion),
                                                                                      dtype=torch.long)}
    behaviour = -torch.rand(1, len(completion), generator=torch.Generator().manual_seed(0)) - 0.5
    got = TextAlignedTeacher(teacher_model, teacher_tokenizer, student).log_ratios(
        rows, behaviour, torch.ones(1, len(completion)), temperature=1.0)[0]
    teacher_ids = teacher_tokenizer("3+9=")["input_ids"] + teacher_tokenizer("12+3=")["input_ids"] + \
        [teacher_tokenizer.eos_token_id]
    assert teacher_tokenizer.convert_ids_to_tokens(teacher_ids[4:]) == ["12", "+", "3", "=", "<eos>"]
    with torch.no_grad():
        logps = torch.log_softmax(teacher_model(input_ids=torch.tensor([teacher_ids])).logits[0], -1)
    t = [logps[3 + j, teacher_ids[4 + j]].item() for j in range(5)]  # position p predicts token p + 1
    b = behaviour[0].tolist()
    expected = [0.0, t[0] - b[0] - b[1], t[1] - b[2], t[2] - b[3], 0.0, t[3] + t[4] - b[4] - b[5]]
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_cross_tokenizer_settings(po_trainer):
    with pytest.raises(Exception, match="shares the student's tokenizer, or opd_cross_tokenizer=true"):
        po_trainer(["opd"], {"opd_teacher": PAIR_TEACHER_DIR})
    with pytest.raises(OptionError, match="opd_cross_tokenizer: a teacher with another tokenizer"):
        default_args(["opd-kl"], {"opd_teacher": PAIR_TEACHER_DIR, "opd_cross_tokenizer": True})
    with pytest.raises(OptionError, match="opd_cross_tokenizer: a teacher with another tokenizer"):
        default_args(["opd"], {"opd_teacher": PAIR_TEACHER_DIR, "opd_cross_tokenizer": True, "opd_divergence": "full"})
    trainer = po_trainer(["opd-advantage"], {"opd_teacher": PAIR_TEACHER_DIR, "opd_cross_tokenizer": True})
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters()))
    assert all(row["opd/reverse_kl"] != 0 for row in trainer.state.log_history if "opd/reverse_kl" in row)
