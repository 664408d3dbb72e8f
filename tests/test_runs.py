"""Each trainer is its own run: its own component instances and auxiliary models, so two trainers in one process
(a sweep, a notebook) never share state."""

import pytest
import torch

from po_registry.testing import char_tokenizer, tiny_causal_lm


def _weights(auxiliary):
    return [p.detach().clone() for p in auxiliary.model.parameters()]


def _moved(before, auxiliary):
    return any(not p.equal(q) for p, q in zip(before, auxiliary.model.parameters()))


def test_trainers_in_one_process_keep_their_own_components_and_models(po_trainer, tmp_path):
    """Two PPO runs with different critics and an OPD run are built before any trains, then trained alternately.
    Each keeps its own critic (before, the critic lived on the process-wide plugin object, so building the second
    trainer replaced the first one's and both trained one critic) and the OPD run its own teacher."""
    pytest.importorskip("po_registry_ppo")
    pytest.importorskip("po_registry_opd")
    teacher_dir = tmp_path / "teacher"
    tiny_causal_lm(char_tokenizer(), seed=1).save_pretrained(teacher_dir)
    common = dict(max_steps=1, learning_rate=1e-3)
    first = po_trainer(["ppo"], {"ppo_critic_lr": 1e-3}, output_dir=str(tmp_path / "first"), **common)
    second = po_trainer(["ppo"], {"ppo_critic_lr": 1e-4, "ppo_critic_lora_r": 4}, output_dir=str(tmp_path / "second"),
                        **common)
    distil = po_trainer(["opd"], {"opd_teacher": str(teacher_dir)}, output_dir=str(tmp_path / "distil"), **common)

    critic_one, critic_two = (t.po_pipeline.auxiliary["critic"] for t in (first, second))
    assert critic_one is not critic_two and critic_one.model is not critic_two.model
    assert first.po_pipeline.components["ppo-critic"] is not second.po_pipeline.components["ppo-critic"]
    assert [c.optimizer.defaults["lr"] for c in (critic_one, critic_two)] == [1e-3, 1e-4]
    assert critic_two.model.peft_config and not hasattr(critic_one.model, "peft_config")  # each its own settings
    assert set(distil.po_pipeline.auxiliary) == {"teacher"}

    one, two = _weights(critic_one), _weights(critic_two)
    first.train()
    assert _moved(one, critic_one) and not _moved(two, critic_two)
    one = _weights(critic_one)
    second.train()
    assert _moved(two, critic_two) and not _moved(one, critic_one)
    teacher = distil.po_pipeline.auxiliary["teacher"]
    frozen = _weights(teacher)
    distil.train()
    assert not _moved(frozen, teacher) and _moved(one, critic_one) is False
    first.train()  # the first run again, after the others: still its own critic, stepping on its own schedule
    assert _moved(one, critic_one) and critic_one.scheduler is not None
    assert all(torch.isfinite(torch.tensor(row["loss"])) for t in (first, second, distil)
               for row in t.state.log_history if "loss" in row)


def test_a_frozen_auxiliary_model_runs_without_gradient_and_computes_a_batch_once():
    from po_registry.context import AuxiliaryModel

    model = torch.nn.Linear(3, 2)
    frozen = AuxiliaryModel(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters()) and not frozen.trainable
    out = frozen(torch.ones(1, 3))
    assert not out.requires_grad
    calls = []
    key, other = torch.zeros(2), torch.zeros(2)

    def compute():
        calls.append(1)
        return torch.tensor(float(len(calls)))

    assert frozen.outputs(key, compute).item() == 1.0 and frozen.outputs(key, compute).item() == 1.0
    assert frozen.outputs(other, compute).item() == 2.0  # an equal tensor that is another batch's: computed again
    trained = AuxiliaryModel(torch.nn.Linear(3, 2), learning_rate=0.1)
    assert trained.trainable and trained(torch.ones(1, 3)).requires_grad and len(trained.parameters) == 2
