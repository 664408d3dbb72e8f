"""DAPO: each component against its formula or TRL, dynamic sampling end to end, conformance and training."""

import dataclasses

import pytest
import torch
from po_registry_dapo import ClipHigher, DynamicSampling, soft_overlong_penalty

from po_registry.pipeline import assemble
from po_registry.testing import PluginConformance
from po_registry.trainer import rollout, train_metrics


class TestDAPOConformance(PluginConformance):
    method = "dapo"
    metrics = ("dapo/clip_ratio_high", "overlong/penalty_mean")


class TestDynamicSamplingConformance(PluginConformance):
    method = "dynamic-sampling"


def test_clip_higher_boundaries(po_loss_batch):
    batch = po_loss_batch(rows=2, width=3, options={"dapo_epsilon_low": 0.2, "dapo_epsilon_high": 0.28})
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    ratio = torch.tensor([[1.2, 1.28, 1.5], [0.9, 0.8, 0.5]])
    loss = ClipHigher().po_policy_objective(batch, ratio.log())
    assert torch.allclose(loss, torch.tensor([[-1.2, -1.28, -1.28], [0.9, 0.8, 0.8]]))


def test_soft_overlong_penalty_matches_trl():
    from trl.rewards import get_soft_overlong_punishment

    lengths = torch.tensor([1, 12, 16, 17, 19, 20])
    ours = soft_overlong_penalty(lengths, max_length=20, cache=4)
    trl_reward = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=4)
    theirs = trl_reward(completion_ids=[[7] * int(n) for n in lengths])
    assert torch.allclose(ours, torch.tensor(theirs))
    assert ours.tolist() == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.75, -1.0])


def test_overlong_reward_changes_the_weighted_total_by_the_penalty(po_reward_batch):
    from po_registry_dapo import OverlongReward

    rewards, batch = po_reward_batch(group_size=2, num_groups=2, num_rewards=2, width=10,
                                     options={"overlong_cache_fraction": 0.5})
    batch = dataclasses.replace(batch,
                                reward_weights=torch.tensor([1.0, 3.0]),
                                completion_lengths=torch.tensor([2, 6, 8, 10]))
    shaped = OverlongReward().po_shape_rewards(rewards, batch)
    delta = batch.weighted_reward(shaped) - batch.weighted_reward(rewards)
    assert torch.allclose(delta, torch.tensor([0.0, -0.2, -0.6, -1.0]))


@pytest.mark.parametrize("weights, totals", [
    # R = nansum_k w_k r_k + R_len, TRL's sum with the soft punishment as one more reward function (weight 1).
    # L_max 10, L_cache 5: R_len(10) = -1, R_len(8) = (5 - 8) / 5 = -0.6, R_len(5) = 0, R_len(9) = -0.8.
    ([1.0, 1.0], [0.5 - 1.0, 0.0 - 0.6, 0.5 + 0.25 + 0.0, 1.0 - 0.8]),  # before: 0.0, NaN (unscored), 0.75, 0.6
    ([1.0, 3.0], [0.5 - 1.0, 0.0 - 0.6, 0.5 + 0.75 + 0.0, 3.0 - 0.8]),
])
def test_overlong_penalty_survives_a_missing_reward(po_reward_batch, weights, totals):
    from po_registry_dapo import OverlongReward
    from trl.rewards import get_soft_overlong_punishment

    nan = float("nan")
    rewards = torch.tensor([[0.5, nan], [nan, nan], [0.5, 0.25], [nan, 1.0]])  # None -> NaN, TRL's convention
    _, batch = po_reward_batch(group_size=2, num_groups=2, num_rewards=2, width=10, rewards=rewards,
                               options={"overlong_cache_fraction": 0.5})
    batch = dataclasses.replace(batch,
                                reward_weights=torch.tensor(weights),
                                completion_lengths=torch.tensor([10, 8, 5, 9]))
    shaped = OverlongReward().po_shape_rewards(rewards, batch)
    assert torch.allclose(batch.weighted_reward(shaped), torch.tensor(totals), atol=1e-6)
    assert torch.isnan(shaped[0, 1]) and torch.isnan(shaped[3, 0])  # a column that scored nothing stays unscored
    punishment = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=5)
    trl_columns = torch.cat([rewards * torch.tensor(weights),
                             torch.tensor(punishment(completion_ids=[[7] * n for n in (10, 8, 5, 9)])).unsqueeze(1)],
                            dim=1)
    assert torch.allclose(batch.weighted_reward(shaped), trl_columns.nansum(dim=1), atol=1e-6)


def test_all_zero_reward_weights_are_refused_with_overlong_reward():
    from po_registry.errors import OptionError
    from po_registry.testing import default_args

    with pytest.raises(OptionError, match="overlong-reward.*reward_weights"):
        default_args(["overlong-reward"], reward_weights=[0.0]).resolve()


def test_dynamic_sampling_keeps_groups_with_signal(po_reward_batch):
    rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0], [float("nan")], [1.0]])
    _, batch = po_reward_batch(group_size=2, num_groups=4, rewards=rewards)
    assert DynamicSampling().po_select_groups(rewards, batch).tolist() == [False, True, False, False]


def test_clip_higher_and_overlong_filter_equal_trl_dapo(po_trl_parity):
    result = po_trl_parity(["clip-higher", "overlong-filter"],
                           {"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "mask_truncated_completions": True},
                           off_policy=0.4)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6


def sparse_reward(completions, **kwargs):
    """Rarely non-zero on an untrained model, so most groups have all-equal rewards."""
    return [float(text[:1].isdigit() and text[:1] in "123") for text in completions]


def test_dynamic_sampling_refills_the_batch(po_trainer):
    trainer = po_trainer(["dynamic-sampling"], {"dynamic_sampling_max_rounds": 6}, reward_funcs=[sparse_reward],
                         per_device_train_batch_size=16, max_steps=3)
    rows = [dict(trainer.train_dataset[i]) for i in range(4) for _ in range(4)]
    torch.manual_seed(0)
    out = rollout(trainer, rows)
    assert out["completion_ids"].shape[0] == 16  # the batch size is constant
    metrics = train_metrics(trainer)
    assert metrics["dynamic_sampling/extra_rounds"][0] >= 1 and metrics["dynamic_sampling/dropped_groups"][0] >= 1
    # Every group that carries loss has reward spread, so a non-zero advantage somewhere.
    advantages = out["advantages"].view(4, 4)
    live = out["completion_mask"].view(4, 4, -1).sum((1, 2)) > 0
    assert (advantages[live].abs().sum(1) > 0).all()
    assert out["num_items_in_batch"] == out["completion_mask"].sum()
    trainer.train()
    logged = [row for row in trainer.state.log_history if "dynamic_sampling/extra_rounds" in row]
    assert len(logged) == 3 and all(row["grad_norm"] > 0 for row in logged)


def test_dapo_composes_four_components():
    assembly = assemble(["dapo"])
    assert assembly.owners["po_policy_objective"] == ["clip-higher"]
    assert assembly.owners["po_select_samples"] == ["overlong-filter"]
    assert assembly.owners["po_shape_rewards"] == ["overlong-reward"]
    assert assembly.owners["po_refill_rounds"] == ["dynamic-sampling"]


def test_dynamic_sampling_on_two_processes_does_not_hang(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("dynamic_sampling_two_processes.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    from po_registry.testing import free_port

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and len(result["logged"]) == 3
    assert all(row["grad_norm"] > 0 for row in result["logged"])
