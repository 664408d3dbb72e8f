"""RLOO: the formula and the group-mean identity, equality with TRL's RLOOTrainer, conformance and training."""

import pytest
import torch
from po_registry_rloo import RLOO, leave_one_out

from po_registry.testing import PluginConformance


class TestConformance(PluginConformance):
    method = "rloo"


class TestConformanceNormalized(PluginConformance):
    method = "rloo"
    options = {"rloo_normalize_advantages": True}
    train_steps = 0


def test_leave_one_out_by_hand_and_with_unscorable_rows():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, float("nan"), 4.0, 6.0])
    advantages = leave_one_out(rewards, 4)
    assert torch.allclose(advantages[:4], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    assert torch.allclose(advantages[[4, 6, 7]], torch.tensor([2 - 5.0, 4 - 4.0, 6 - 3.0]))
    assert torch.isnan(advantages[5])


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_mean_identity(group_size):
    rewards = torch.rand(4 * group_size)
    mean_centred = rewards - rewards.view(-1, group_size).mean(1).repeat_interleave(group_size)
    assert torch.allclose(leave_one_out(rewards, group_size), group_size / (group_size - 1) * mean_centred, atol=1e-6)


def test_single_scorable_completion_gets_zero(po_reward_batch):
    rewards = torch.tensor([[1.0], [float("nan")], [0.0], [1.0]])
    _, batch = po_reward_batch(group_size=2, num_groups=2, rewards=rewards, options={"rloo_normalize_advantages": False})
    assert RLOO().po_compute_advantages(rewards, batch).tolist() == [0.0, 0.0, -1.0, 1.0]


@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_equal_trl_rloo_trainer(po_tokenizer, po_tiny_model_dir, tmp_path, normalize):
    from trl import RLOOConfig, RLOOTrainer

    from po_registry.config import PolicyOptimizationConfig
    from po_registry.registry import get_task
    from po_registry.testing import partial_credit as partial
    from po_registry.trainer import PolicyOptimizationTrainer, rollout

    common = dict(use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
                  per_device_train_batch_size=16, num_generations=4, max_completion_length=6, beta=0.0,
                  save_strategy="no", disable_tqdm=True)
    dataset = get_task("addition").dataset(64)
    stock = RLOOTrainer(model=po_tiny_model_dir, reward_funcs=[partial], processing_class=po_tokenizer,
                        train_dataset=dataset, args=RLOOConfig(output_dir=str(tmp_path / "a"),
                                                               normalize_advantages=normalize, **common))
    ours = PolicyOptimizationTrainer(
        model=po_tiny_model_dir, reward_funcs=[partial], processing_class=po_tokenizer, train_dataset=dataset,
        args=PolicyOptimizationConfig(output_dir=str(tmp_path / "b"), methods=["rloo"],
                                      method_options={"rloo_normalize_advantages": normalize}, **common))
    rows = [dict(dataset[i]) for i in range(4) for _ in range(4)]
    outputs = []
    for trainer in (stock, ours):
        torch.manual_seed(0)
        outputs.append(rollout(trainer, rows))
    assert torch.equal(outputs[0]["completion_ids"], outputs[1]["completion_ids"])
    assert outputs[0]["advantages"].abs().sum() > 0
    assert torch.allclose(outputs[0]["advantages"], outputs[1]["advantages"], atol=1e-6)
