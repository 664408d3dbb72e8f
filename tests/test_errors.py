"""Bad input gets one clear error naming the culprit, before training where possible."""

from __future__ import annotations

import pytest
import torch
from helpers import base_config, build

from po_registry import HookError, OptionError, hookimpl
from po_registry.config import PolicyOptimizationConfig
from po_registry.trainer import PolicyOptimizationTrainer


class _Advantage:
    """Advantages that misbehave in a chosen way."""

    def __init__(self, name, make):
        self.name, self.make = name, make

    @hookimpl
    def po_register_methods(self, register):
        register(self.name, components=[self.name])

    @hookimpl
    def po_compute_advantages(self, rewards, batch):
        return self.make(rewards, batch)


class _Objective:
    def __init__(self, name, make):
        self.name, self.make = name, make

    @hookimpl
    def po_register_methods(self, register):
        register(self.name, components=[self.name])

    @hookimpl
    def po_policy_objective(self, batch, log_weights):
        return self.make(batch, log_weights)


def _fail(rewards, batch):
    raise ZeroDivisionError("group of one")


BAD_ADVANTAGES = {
    "raises": (_fail, r"plugin 'bad-adv', hook po_compute_advantages at step 0: raised ZeroDivisionError: group of one"),
    "wrong-shape": (lambda r, b: torch.zeros(r.shape[0] + 1), r"'bad-adv'.*returned shape \(5,\), expected \(4,\) or \(4, \d+\)"),
    "nan": (lambda r, b: torch.full((r.shape[0],), float("nan")), r"'bad-adv'.*returned NaN values"),
    "inf": (lambda r, b: torch.full((r.shape[0],), float("inf")), r"'bad-adv'.*returned inf values"),
    "integer": (lambda r, b: torch.zeros(r.shape[0], dtype=torch.long), r"'bad-adv'.*floating-point.*torch.int64"),
    "wrong-device": (lambda r, b: torch.zeros(r.shape[0], device="meta"), r"'bad-adv'.*on meta, expected cpu"),
    "not-a-tensor": (lambda r, b: [0.0] * r.shape[0], r"'bad-adv'.*must return a tensor, got list"),
}


@pytest.mark.parametrize("make, message", BAD_ADVANTAGES.values(), ids=BAD_ADVANTAGES.keys())
def test_bad_advantage_hook_names_the_plugin(plugins, tiny_model_dir, tokenizer, prompt_dataset, tmp_path, make,
                                             message):
    plugins("bad-adv", _Advantage("bad-adv", make))
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=["bad-adv"])
    with pytest.raises(HookError, match=message):
        trainer.train()


def test_bad_objective_shape_names_the_plugin_and_step(plugins, tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    plugins("bad-obj", _Objective("bad-obj", lambda batch, lw: batch.logps.sum(0)))
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=["bad-obj"])
    with pytest.raises(HookError, match=r"plugin 'bad-obj', hook po_policy_objective at step 0: returned shape"):
        trainer.train()


def test_invalid_baseline_flag_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(OptionError, match="plugin 'clip-objective': loss_type='cispo' is not a clipped-surrogate.*"
                                          "the method 'cispo' \\(--method cispo\\)"):
        PolicyOptimizationConfig(**base_config(tmp_path, loss_type="cispo"))
    with pytest.raises(OptionError, match="plugin 'policy-ratio': importance_sampling_level must be"):
        PolicyOptimizationConfig(**base_config(tmp_path, importance_sampling_level="turn"))
    with pytest.raises(OptionError, match="plugin 'entropy-bonus': use_adaptive_entropy needs 0 <= entropy_coef_min "
                                          "<= entropy_coef_max, got 0.5 and 0.1"):
        PolicyOptimizationConfig(**base_config(tmp_path, use_adaptive_entropy=True, entropy_coef_min=0.5,
                                               entropy_coef_max=0.1))
    PolicyOptimizationConfig(**base_config(tmp_path, use_adaptive_entropy=True))  # accepted (TRL's controller)


def test_unknown_method_and_option_fail_when_the_config_is_built(tmp_path):
    from po_registry import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="Did you mean 'grpo'"):
        PolicyOptimizationConfig(**base_config(tmp_path, methods=["grpoo"]))
    with pytest.raises(OptionError, match="unknown option 'clip'"):
        PolicyOptimizationConfig(**base_config(tmp_path, method_options={"clip": 0.1}))
    with pytest.raises(OptionError, match="method_options is not valid JSON"):
        PolicyOptimizationConfig(**base_config(tmp_path, method_options="{clip: 0.1"))


def test_config_defaults_work_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU default")
    config = PolicyOptimizationConfig(output_dir=str(tmp_path))
    assert config.bf16 is False and config.methods == ["grpo"] and config.method_options == {}


def test_config_loads_from_yaml_and_command_line(tmp_path, plugins):
    from trl import TrlParser

    plugins("yaml-adv", _Advantage("yaml-adv", lambda r, b: torch.zeros(r.shape[0])))
    path = tmp_path / "config.yaml"
    path.write_text(f"output_dir: {tmp_path}\nmethods: [yaml-adv]\nloss_type: bnpo\nbeta: 0.02\nuse_cpu: true\n")
    (config,) = TrlParser((PolicyOptimizationConfig,)).parse_args_and_config(
        ["--config", str(path), "--beta", "0.03", "--method_options", "{}"]
    )
    assert config.methods == ["yaml-adv"] and config.loss_type == "bnpo" and config.beta == 0.03


def test_hook_that_raises_in_the_loss_names_the_step(plugins, tiny_model_dir, tokenizer, prompt_dataset, tmp_path):
    calls = []

    def make(batch, log_weights):
        calls.append(batch.step)
        if len(calls) == 2:
            raise RuntimeError("exploded")
        return -batch.advantages * torch.exp(log_weights)

    plugins("late-fail", _Objective("late-fail", make))
    trainer = build(PolicyOptimizationTrainer, PolicyOptimizationConfig, tiny_model_dir, tokenizer, prompt_dataset,
                    tmp_path, methods=["late-fail"], max_steps=3)
    with pytest.raises(HookError, match=r"'late-fail', hook po_policy_objective at step 1: raised RuntimeError"):
        trainer.train()
