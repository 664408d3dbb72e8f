"""Test kit for plugin authors, loaded by pytest as a plugin (entry point ``pytest11``).

Fixtures: ``po_tokenizer``, ``po_tiny_model``, ``po_reward_batch`` and ``po_loss_batch`` (factories of synthetic
batches), ``po_trainer`` (a factory of ready trainers on a tiny model). The conformance suite runs with one
line in a plugin's tests::

    from po_registry.testing import PluginConformance

    class TestConformance(PluginConformance):
        method = "my-method"

It checks the method's assembled pipeline: documented shapes, dtypes, devices and finite values on every stage;
gradients where they must flow and none at masked positions; masked positions without effect on the loss;
degenerate groups (all-equal rewards, groups of two, fully masked rows, length-1 completions); determinism under a
seed; options that reject bad values with a message naming them; the gradient oracle (the mean gradient of the loss
on an enumerable policy against the exact gradient of the objective the method declares); and a short end-to-end
training run.

Heavy libraries are imported inside the fixtures, so that loading this plugin costs pytest nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

__all__ = ["PluginConformance", "char_tokenizer", "free_port", "loss_batch", "partial_credit", "reward_batch",
           "tiny_causal_lm", "trl_parity"]


def char_tokenizer():
    """The embedded character-level tokenizer (54 tokens)."""
    from .embedded import char_tokenizer as build

    return build()


def tiny_causal_lm(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Llama small enough for unit tests (about 30k parameters by default)."""
    from .embedded import llama

    return llama(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers, tie=False)


def free_port() -> int:
    """A TCP port free on this machine now, for a multi-process test's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def partial_credit(completions, answer, **kwargs) -> list[float]:
    """Exact match plus 0.1 per digit: an untrained tiny model still gets reward spread within its groups."""
    from .tasks import exact_match

    return [e + 0.1 * sum(ch.isdigit() for ch in text) for e, text in zip(exact_match(completions, answer), completions)]


def default_args(methods=("grpo",), options=None, **fields):
    """A CPU ``PolicyOptimizationConfig`` for synthetic batches (no output is written)."""
    import tempfile

    from .config import PolicyOptimizationConfig

    fields = {"use_cpu": True, "bf16": False, "report_to": "none", "max_completion_length": 8, **fields}
    return PolicyOptimizationConfig(output_dir=tempfile.gettempdir(), methods=list(methods),
                                    method_options=dict(options or {}), **fields)


def _completion_and_tool_masks(lengths, width: int, hole_row: int):
    """(completion mask, tool mask), (N, T) float: completions of ``lengths`` (right-padded); row ``hole_row``, when
    there is one and ``width`` >= 3, spans the width with an environment token at position 1 (tool mask 0)."""
    import torch

    if len(lengths) > hole_row and width >= 3:
        lengths[hole_row] = width
    completion = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).float()
    tool = torch.ones_like(completion)
    if len(lengths) > hole_row and width >= 3:
        tool[hole_row, 1] = 0.0
    return completion, tool


def reward_batch(group_size: int = 4, num_groups: int = 3, num_rewards: int = 1, width: int = 6, seed: int = 0,
                 rewards=None, args=None, options=None, auxiliary=None, **fields):
    """(rewards (N, K), RewardBatch) of a synthetic global batch: random 0/1 rewards unless given, ragged
    completion lengths (one of length 1), the last row truncated, and row 2 (of full width, when the batch has
    one and ``width`` >= 3) a multi-turn episode with an environment token at position 1: a hole in the loss mask
    (``completion_mask``), inside the completion of ``local`` (its ``tool_mask`` is 0 there). ``fields``: other
    RewardBatch fields, replacing the synthetic ones (``completion_lengths=torch.tensor([2, 4])``)."""
    import torch

    from .batches import RewardBatch

    generator = torch.Generator().manual_seed(seed)
    n = group_size * num_groups
    if rewards is None:
        rewards = torch.randint(0, 2, (n, num_rewards), generator=generator).float()
    lengths = torch.randint(1, width + 1, (n,), generator=generator)
    lengths[0], lengths[-1] = 1, width
    completion, tool = _completion_and_tool_masks(lengths, width, hole_row=2)
    mask = completion * tool
    truncated = torch.zeros(n, dtype=torch.bool)
    truncated[-1] = True
    args = args or default_args()
    policy_logps = -torch.rand(n, width, generator=generator) * 3
    # a collision probability sum_v pi_v^2 is at least pi_y^2 (the sampled token's) and at most 1
    collision = policy_logps.exp().square() + (1 - policy_logps.exp().square()) * torch.rand(n, width, generator=generator)
    local = {"completion_ids": torch.randint(4, 20, (n, width), generator=generator) * completion.long(),
             "completion_mask": completion.long(), "tool_mask": tool.long(),
             "prompt_ids": torch.randint(4, 20, (n, 3), generator=generator),
             "prompt_mask": torch.ones(n, 3, dtype=torch.long),
             "ref_per_token_logps": policy_logps + 0.1 * torch.randn(n, width, generator=generator)}
    greedy = torch.randint(0, 2, (num_groups,), generator=generator).float().repeat_interleave(group_size)
    batch = RewardBatch(
        reward_names=[f"reward_{k}" for k in range(rewards.shape[1])],
        reward_weights=torch.ones(rewards.shape[1]),
        group_size=group_size,
        completion_lengths=lengths,
        truncated=truncated,
        max_completion_length=width,
        options=dict(options or {}),
        args=args,
        completion_mask=mask,
        local=local,
        policy_logps=lambda: policy_logps,
        policy_collision_probs=lambda: collision,
        processing_class=char_tokenizer(),
        tokenize_prompts=lambda prompts: [char_tokenizer()(prompt)["input_ids"] for prompt in prompts],
        greedy_rewards=lambda: greedy,
        auxiliary=auxiliary if auxiliary is not None else {},
    )
    return rewards, dataclasses.replace(batch, **fields)


def loss_batch(rows: int = 6, width: int = 5, seed: int = 0, per_token_advantages: bool = False,
               off_policy: float = 0.3, args=None, options=None, auxiliary=None):
    """A synthetic LossBatch: ``logps`` is a leaf tensor with ``requires_grad``; row 0 is fully masked, row 1
    has one token, row 2 (of full width, when ``rows`` > 2 and ``width`` >= 3) has an environment token at
    position 1 (a hole in ``mask``; ``inputs`` carry its ``tool_mask``); behaviour log-probs differ from the
    policy's by ``off_policy`` noise so ratios leave 1. It does not end an optimizer step (a controller, such as
    an adaptive coefficient, keeps its value across such batches; set ``ends_optimizer_step`` to move it)."""
    import torch

    from .batches import LossBatch

    generator = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(rows, width, generator=generator) * 3).requires_grad_()
    lengths = torch.randint(2, width + 1, (rows,), generator=generator)
    lengths[0] = 0
    if rows > 1:
        lengths[1] = 1
    completion, tool = _completion_and_tool_masks(lengths, width, hole_row=2)
    mask = completion * tool
    shape = (rows, width) if per_token_advantages else (rows, 1)
    advantages = torch.randn(shape, generator=generator)
    old = logps.detach() + off_policy * torch.randn(rows, width, generator=generator)
    args = args or default_args()
    return LossBatch(
        logps=logps,
        old_logps=old,
        advantages=advantages,
        mask=mask,
        entropies=torch.rand(rows, width, generator=generator) * 2,
        ref_logps=logps.detach() + 0.1 * torch.randn(rows, width, generator=generator),
        sampling_logps=None,
        importance_sampling_ratio=None,
        num_items_in_batch=mask.sum(),
        accumulation_steps=1,
        steps_per_generation=1,
        num_processes=1,
        max_completion_length=width,
        options=dict(options or {}),
        args=args,
        inputs={"prompt_ids": torch.randint(4, 20, (rows, 3), generator=generator),
                "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
                "completion_ids": torch.randint(4, 20, (rows, width), generator=generator) * completion.long(),
                "completion_mask": completion.long(), "tool_mask": tool.long()},
        rewards=torch.randint(0, 2, (rows,), generator=generator).float(),
        auxiliary=auxiliary if auxiliary is not None else {},
        ends_optimizer_step=False,
    )


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def po_tokenizer():
    return char_tokenizer()


@pytest.fixture
def po_tiny_model(po_tokenizer):
    return tiny_causal_lm(po_tokenizer)


@pytest.fixture
def po_reward_batch():
    """Factory: ``po_reward_batch(group_size=4, num_groups=3, ...)`` -> (rewards, RewardBatch)."""
    return reward_batch


@pytest.fixture
def po_loss_batch():
    """Factory: ``po_loss_batch(rows=6, width=5, ...)`` -> LossBatch."""
    return loss_batch


@pytest.fixture
def po_trainer(tmp_path, po_tokenizer):
    """Factory of a PolicyOptimizationTrainer on addition prompts, with a tiny random model or, with
    ``embedded=True``, the embedded warm-started model (built on first use, then cached):
    ``po_trainer(methods=["grpo"], method_options={}, max_steps=2, embedded=False, peft_config=None,
    rollout_func=None, task="addition", **config_fields)``."""

    def build(methods=("grpo",), method_options=None, reward_funcs=None, embedded=False, peft_config=None,
              rollout_func=None, task="addition", **fields):
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from .config import PolicyOptimizationConfig
        from .registry import get_task
        from .trainer import PolicyOptimizationTrainer

        config = dict(output_dir=str(tmp_path / "trainer"), use_cpu=True, bf16=False, report_to="none",
                      gradient_checkpointing=False, per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no",
                      disable_tqdm=True, seed=0, methods=list(methods), method_options=dict(method_options or {}))
        config.update(fields)
        model_dir = tmp_path / "tiny-model"  # a path, so TRL can reload the reference model when beta > 0
        tokenizer = po_tokenizer
        if embedded:
            from transformers import AutoTokenizer

            from .embedded import embedded_model_dir

            model_dir = embedded_model_dir(get_task(task))
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        elif not model_dir.exists():
            tiny_causal_lm(po_tokenizer).save_pretrained(model_dir)
        return PolicyOptimizationTrainer(
            model=str(model_dir), processing_class=tokenizer,
            reward_funcs=reward_funcs or [partial_credit], args=PolicyOptimizationConfig(**config),
            train_dataset=get_task(task).dataset(64), peft_config=peft_config, rollout_func=rollout_func,
        )

    return build


def trains_on_task(po_trainer, methods, task: str, steps: int = 2, **fields):
    """Train ``steps`` steps of ``methods`` on an embedded task's prompts with its reward and, for a multi-turn task,
    its rollout function (``po_trainer`` is the fixture); assert the weights moved. Returns the trainer."""
    from .registry import get_task

    spec = get_task(task)
    trainer = po_trainer(list(methods), task=task, rollout_func=spec.rollout_function(),
                         reward_funcs=[spec.reward_function()], max_completion_length=spec.max_completion_length,
                         max_steps=steps, **fields)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters())), \
        f"{methods} left the weights unchanged in {steps} steps on {task}"
    return trainer


# -- the conformance suite --------------------------------------------------------------------------------------


class PluginConformance:
    """Subclass with ``method = "name"``; optionally ``options`` (plugin options) and ``config`` (GRPOConfig
    fields) to check a particular configuration, ``train_steps`` for the end-to-end run on the embedded model
    (0 skips it) and ``metrics`` it must log."""

    method: str = ""
    options: dict[str, Any] = {}
    config: dict[str, Any] = {}
    train_steps: int = 2
    metrics: tuple[str, ...] = ()  # metrics the method must log during training

    def prepare_reward_batch(self, batch):
        """Override to add what the method's reward side reads beyond the synthetic batch (``batch.rows`` of a
        multi-turn rollout): return the batch to use (batches are frozen: ``dataclasses.replace(batch, rows=...)``)."""
        return batch

    def prepare_auxiliary(self, auxiliary: dict) -> None:
        """Override to give the synthetic batches the auxiliary models the method's stages read (``auxiliary[name] =
        AuxiliaryModel(model)``, what its po_setup registers in a trainer)."""

    def prepare_loss_batch(self, batch) -> None:
        """Override to add what the method's reward side carries to the loss side (``RewardBatch.carry``) to the
        synthetic micro-batch's ``inputs``."""

    # -- helpers --

    def _args(self):
        return default_args([self.method], self.options, **self.config)

    def _pipeline(self):
        from .pipeline import Pipeline

        args = self._args()
        pipeline = Pipeline(args.resolve())
        self.prepare_auxiliary(pipeline.auxiliary)
        return pipeline, args

    def _loss(self, pipeline, args, **kwargs):
        import torch

        torch.manual_seed(0)
        batch = loss_batch(args=args, options=pipeline.options, auxiliary=pipeline.auxiliary, **kwargs)
        self.prepare_loss_batch(batch)
        loss = pipeline.loss(batch)
        return loss, batch

    def _advantages(self, pipeline, args, **kwargs):
        rewards, batch = reward_batch(args=args, options=pipeline.options, auxiliary=pipeline.auxiliary, **kwargs)
        batch = self.prepare_reward_batch(batch)
        scored = pipeline.score(pipeline.shape_rewards(rewards, batch), batch)
        return scored.advantages, scored.keep_groups, batch

    # -- checks --

    def test_method_assembles_with_its_components(self):
        from .registry import get_registry

        assert self.method, "set `method` on the conformance class"
        pipeline, _ = self._pipeline()
        method = get_registry().method(self.method)
        for component in method.components:
            assert component in pipeline.assembly.components, f"component {component!r} is not in the pipeline"

    @pytest.mark.parametrize("group_size", [2, 4])
    def test_advantages_have_documented_shape_and_are_finite(self, group_size):
        import torch

        pipeline, args = self._pipeline()
        advantages, keep, batch = self._advantages(pipeline, args, group_size=group_size)
        assert advantages.shape in ((batch.num_rows,), tuple(batch.completion_mask.shape))
        assert advantages.dtype.is_floating_point and torch.isfinite(advantages).all()
        if keep is not None:
            assert keep.shape == (batch.num_groups,) and keep.dtype == torch.bool

    def test_degenerate_groups_give_finite_advantages(self):
        import torch

        pipeline, args = self._pipeline()
        equal = torch.ones(12, 1)
        advantages, _, _ = self._advantages(pipeline, args, rewards=equal)
        assert torch.isfinite(advantages).all()
        unscorable = torch.rand(12, 1)
        unscorable[:4] = float("nan")  # a reward function returned None for a whole group
        advantages, _, _ = self._advantages(pipeline, args, rewards=unscorable)
        assert torch.isfinite(advantages).all()

    @pytest.mark.parametrize("per_token_advantages", [False, True])
    def test_loss_is_a_finite_scalar_with_gradient(self, per_token_advantages):
        import torch

        pipeline, args = self._pipeline()
        loss, batch = self._loss(pipeline, args, per_token_advantages=per_token_advantages)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        grad = batch.logps.grad
        assert grad is not None and torch.isfinite(grad).all()
        assert grad[batch.mask.bool()].abs().sum() > 0, "no gradient reaches the unmasked tokens"
        assert (grad[~batch.mask.bool()] == 0).all(), "masked tokens received gradient"

    def test_masked_positions_have_no_effect(self):
        import torch

        pipeline, args = self._pipeline()
        loss, batch = self._loss(pipeline, args, per_token_advantages=True)
        loss.backward()
        masked = ~batch.mask.bool()
        torch.manual_seed(0)
        other = loss_batch(args=args, options=pipeline.options, per_token_advantages=True,
                           auxiliary=pipeline.auxiliary)
        self.prepare_loss_batch(other)
        noise = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name in ("logps", "old_logps", "ref_logps", "entropies", "advantages"):
                tensor = getattr(other, name)
                junk = -5 * torch.rand(tensor.shape, generator=noise)
                tensor[masked] = junk[masked]
        changed = pipeline.loss(other)
        changed.backward()
        assert torch.allclose(loss, changed, atol=1e-6), "values at masked positions changed the loss"
        assert torch.allclose(batch.logps.grad[~masked], other.logps.grad[~masked], atol=1e-6)

    def test_gradient_follows_its_declared_objective(self):
        """The first-principles oracle (:mod:`po_registry.oracle`): on a policy small enough to enumerate, the mean
        gradient of this pipeline's loss over sampled batches matches the exact expectation that the method's
        declared objective and biases imply, on each set-up it declares (holes in the mask, empty rows, equal
        rewards; two-turn episodes for the multi-turn methods)."""
        from .oracle import check_method, method_setups

        setups = method_setups(self.method, self.options, self.config)  # the multi-turn methods: the turns set-up
        results = [check_method(self.method, self.options, self.config, setup=setup) for setup in setups]
        failed = [result.describe() for result in results if result.passed is False]
        assert not failed, "the loss does not follow its declared objective:\n" + "\n".join(failed)
        if all(result.passed is None for result in results):
            pytest.skip(f"oracle: {results[0].note or results[0].declared_bias}")

    def test_deterministic_under_a_seed(self):
        import torch

        pipeline, args = self._pipeline()
        first, _ = self._loss(pipeline, args, per_token_advantages=True)
        second, _ = self._loss(pipeline, args, per_token_advantages=True)
        assert torch.equal(first, second)
        a, _, _ = self._advantages(pipeline, args)
        b, _, _ = self._advantages(pipeline, args)
        assert torch.equal(a, b)

    def test_options_reject_bad_values_by_name(self):
        from .errors import OptionError
        from .pipeline import assemble
        from .registry import get_registry

        registry = get_registry()
        pipeline, _ = self._pipeline()
        for name, option in registry.options.items():
            if option.plugin not in pipeline.assembly.components:
                continue
            if option.choices is not None:
                bad = "__not_a_choice__"
            elif option.type in (int, float, bool):
                bad = "not-a-value"
            else:
                continue
            with pytest.raises(OptionError, match=name):
                assemble([self.method], {**self.options, name: bad})

    def test_trains_end_to_end(self, po_trainer):
        import torch

        if not self.train_steps:
            pytest.skip("train_steps = 0")
        trainer = po_trainer([self.method], self.options, max_steps=self.train_steps, embedded=True,
                             learning_rate=1e-4, **self.config)
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        assert len(losses) == self.train_steps and all(torch.isfinite(torch.tensor(losses)))
        assert any(not p.equal(q) for p, q in zip(before, trainer.model.parameters())), "no parameter changed"
        for metric in self.metrics:
            assert any(metric in row for row in trainer.state.log_history), f"metric {metric!r} was not logged"


# -- parity with TRL's own implementation -----------------------------------------------------------------------


def trl_parity(model_dir, tokenizer, methods, trl_flags: dict, options: dict | None = None,
               shared_flags: dict | None = None, off_policy: float = 0.3, seed: int = 0,
               stock_classes: tuple | None = None) -> dict:
    """Loss and gradients of our trainer with ``methods`` against TRL's ``GRPOTrainer`` (or the
    ``(trainer, config)`` classes in ``stock_classes``) with ``trl_flags``, on one identical off-policy
    micro-batch (behaviour log-probs shifted by ``off_policy`` noise so that ratios leave 1 and clipping acts).
    Returns {"stock_loss", "ours_loss", "max_grad_diff", "advantages_diff", "completions_equal", "metrics"}."""
    import os

    import torch
    from trl import GRPOConfig, GRPOTrainer

    from .config import PolicyOptimizationConfig
    from .registry import get_task
    from .trainer import PolicyOptimizationTrainer, micro_batch_loss, rollout, sampled_token_logps, train_metrics

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    common = dict(use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
                  per_device_train_batch_size=16, num_generations=4, max_completion_length=6, learning_rate=1e-2,
                  max_steps=1, save_strategy="no", disable_tqdm=True, seed=seed, gradient_accumulation_steps=2,
                  **(shared_flags or {}))
    dataset = get_task("addition").dataset(64)
    import tempfile

    out = tempfile.mkdtemp(prefix="po-parity-")
    stock_trainer, stock_config = stock_classes or (GRPOTrainer, GRPOConfig)
    stock = stock_trainer(model=model_dir, reward_funcs=[partial_credit], processing_class=tokenizer,
                          train_dataset=dataset, args=stock_config(output_dir=out, **common, **trl_flags))
    ours = PolicyOptimizationTrainer(
        model=model_dir, reward_funcs=[partial_credit], processing_class=tokenizer, train_dataset=dataset,
        args=PolicyOptimizationConfig(output_dir=out, methods=list(methods), method_options=dict(options or {}),
                                      **common))
    rows = [dict(dataset[i]) for i in range(4) for _ in range(4)]
    results = {}
    for name, trainer in (("stock", stock), ("ours", ours)):
        torch.manual_seed(seed)
        results[name] = rollout(trainer, rows)
    logps = sampled_token_logps(stock, results["stock"])
    noise = torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads, losses = {}, {}
    for name, trainer in (("stock", stock), ("ours", ours)):
        batch = dict(results[name])
        batch["old_per_token_logps"] = logps + off_policy * noise
        trainer.model.zero_grad()
        loss = micro_batch_loss(trainer, batch, accumulation_steps=2)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    assert len(grads["stock"]) == len(grads["ours"]) > 0, "gradients reach different parameters"
    return {
        "stock_loss": losses["stock"],
        "ours_loss": losses["ours"],
        "max_grad_diff": max((a - b).abs().max().item() for a, b in zip(grads["stock"], grads["ours"])),
        "advantages_diff": (results["stock"]["advantages"] - results["ours"]["advantages"]).abs().max().item(),
        "completions_equal": torch.equal(results["stock"]["completion_ids"], results["ours"]["completion_ids"]),
        "metrics": {"stock": dict(train_metrics(stock)), "ours": dict(train_metrics(ours))},
    }


@pytest.fixture(scope="session")
def po_tiny_model_dir(tmp_path_factory, po_tokenizer):
    """A tiny random Llama saved to a directory (TRL reloads references from a path)."""
    path = tmp_path_factory.mktemp("po-tiny-model")
    tiny_causal_lm(po_tokenizer).save_pretrained(path)
    return str(path)


@pytest.fixture
def po_trl_parity(po_tiny_model_dir, po_tokenizer):
    """``po_trl_parity(methods, trl_flags, options=None, shared_flags=None)`` -> see :func:`trl_parity`."""

    def compare(methods, trl_flags, options=None, shared_flags=None, **kwargs):
        return trl_parity(po_tiny_model_dir, po_tokenizer, methods, trl_flags, options, shared_flags, **kwargs)

    return compare
