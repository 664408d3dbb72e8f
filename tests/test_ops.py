"""Shared tensor math against hand-computed values, including the degenerate cases."""

import math

import pytest
import torch

from po_registry.ops import (
    aggregate,
    clip_regions,
    clipped_surrogate,
    gae,
    group_mean,
    group_std,
    kl_estimate,
    masked_mean,
    nanstd,
    returns_to_go,
    sequence_log_ratio,
)


def test_masked_mean_per_row_and_fully_masked_row():
    """Row 3 has a hole: 50 is an environment token between the loss tokens 10 and 12, so its mean is
    (10 + 12) / 2 = 11, not (10 + 50 + 12) / 3 = 24."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 50.0, 12.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    assert masked_mean(x, mask, dim=1).tolist() == [1.5, 0.0, 9.0, 11.0]  # an empty row gives 0, not NaN
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 9 + 10 + 12) / 5)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_group_statistics_bessel_and_nan():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    assert group_mean(rewards, 4).tolist() == [2.5] * 4 + [5.0] * 4
    std = group_std(rewards, 4)
    assert std[0].item() == pytest.approx(math.sqrt(5 / 3))  # Bessel-corrected
    assert std[4:].tolist() == [0.0] * 4  # all-equal group
    with_nan = torch.tensor([1.0, float("nan"), 3.0, 5.0])
    assert group_mean(with_nan, 4)[0].item() == pytest.approx(3.0)
    assert group_std(with_nan, 4)[0].item() == pytest.approx(2.0)
    assert group_std(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]  # group of one: no spread
    assert torch.isnan(nanstd(torch.tensor([1.0, float("nan")])))  # a single value has no std


def test_group_of_size_two():
    rewards = torch.tensor([0.0, 1.0])
    assert group_mean(rewards, 2).tolist() == [0.5, 0.5]
    assert group_std(rewards, 2)[0].item() == pytest.approx(math.sqrt(0.5))


def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    log_rho = ref - logp
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -log_rho)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * log_rho**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), log_rho.exp() - 1 - log_rho)
    assert kl_estimate(logp, ref, "k3")[2].item() == 0.0  # identical policies
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_clipped_surrogate_at_and_beyond_the_boundaries():
    ratio = torch.tensor([0.7, 0.8, 1.0, 1.2, 1.3, 1.3, 0.7])
    adv = torch.tensor([-1.0, -1.0, 2.0, 1.0, 1.0, -1.0, 1.0])
    loss = clipped_surrogate(ratio, adv, 0.2, 0.2)
    # A < 0, r below 1 - eps: clipped at 0.8; exactly at the boundary both branches agree.
    # A > 0, r above 1 + eps: clipped at 1.2; A < 0 with r > 1 + eps is *not* clipped (pessimistic bound).
    expected = torch.tensor([0.8, 0.8, -2.0, -1.2, -1.2, 1.3, -0.7])
    assert torch.allclose(loss, expected)


def test_clipped_surrogate_gradient_vanishes_only_in_the_clipped_region():
    ratio = torch.tensor([0.7, 1.3, 1.2, 1.1], requires_grad=True)
    adv = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    clipped_surrogate(ratio, adv, 0.2, 0.2).sum().backward()
    # Clipped tokens carry no gradient; an unclipped token's gradient is -A.
    assert ratio.grad[0].item() == 0.0 and ratio.grad[1].item() == 0.0
    assert ratio.grad[3].item() == -1.0


def test_clip_higher_and_delta():
    ratio = torch.tensor([1.25, 1.3, 3.0])
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss = clipped_surrogate(ratio, adv, 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([-1.25, -1.28, 3.0]))
    bounded = clipped_surrogate(ratio, adv, 0.2, 0.28, delta=2.0)
    assert bounded[2].item() == pytest.approx(2.0)  # INTELLECT-2: negative advantages bounded at delta


def test_sequence_log_ratio_is_length_normalised():
    """Row 0: loss tokens 0.2 and 0.4 around an environment hole (9.0) and before padding (7.0): (0.2 + 0.4) / 2."""
    log_ratio = torch.tensor([[0.2, 9.0, 0.4, 7.0], [0.3, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(sequence_log_ratio(log_ratio, mask), torch.tensor([[0.3], [0.3]]))


# Row 0: loss tokens 1, 3, 5 with an environment hole (9) between 1 and 3; row 1: one token 4, then padding (7).
LOSS = torch.tensor([[1.0, 9.0, 3.0, 5.0], [4.0, 7.0, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("seq-mean-token-mean", ((1 + 3 + 5) / 3 + 4 / 1) / 2),
        ("token-mean", (1 + 3 + 5 + 4) / 4),
        ("seq-mean-token-sum-norm", (1 + 3 + 5 + 4) / (2 * 5)),
        ("global-token-mean", (1 + 3 + 5 + 4) / 8),
        ("seq-sum", (9 + 4) / 2),
    ],
)
def test_aggregation_modes(mode, expected):
    got = aggregate(LOSS, MASK, mode, max_completion_length=5, tokens_per_micro_batch=8.0)
    assert got.item() == pytest.approx(expected)


def test_aggregation_of_length_one_and_fully_masked_rows():
    loss = torch.tensor([[5.0], [7.0]])
    mask = torch.tensor([[1.0], [0.0]])
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.5)  # the empty row counts as 0
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(5.0)
    assert aggregate(loss, torch.zeros_like(mask), "token-mean").item() == 0.0


def test_global_token_mean_is_exact_over_accumulated_micro_batches():
    """Two micro-batches of one optimizer step sum to the token mean of the whole batch. Loss tokens (9 marks an
    environment hole, never counted): micro-batch 1 holds 1, 2, 3 and micro-batch 2 holds 4, 5, 6, 7, so 7 tokens
    in the step, 3.5 per micro-batch; each part divided by the 2 accumulation steps (as the pipeline does) is 6 / 7
    and 22 / 7, summing to 28 / 7 = 4 (a per-micro-batch token mean would give 2 + 5.5 = 7.5, halved: 3.75)."""
    full_loss = torch.tensor([[1.0, 9.0, 2.0], [3.0, 0.0, 0.0], [4.0, 5.0, 0.0], [6.0, 9.0, 7.0]])
    full_mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    parts = [aggregate(full_loss[i : i + 2], full_mask[i : i + 2], "global-token-mean", tokens_per_micro_batch=3.5) / 2
             for i in (0, 2)]
    assert [p.item() for p in parts] == pytest.approx([6 / 7, 22 / 7])
    assert sum(parts).item() == pytest.approx(4.0)


def test_aggregation_broadcasts_sequence_level_losses():
    loss = torch.tensor([[2.0], [4.0]])
    assert aggregate(loss, MASK, "token-mean").item() == pytest.approx((2 * 3 + 4) / 4)  # row 0 has 3 loss tokens
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate(loss, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(loss, MASK, "mean-of-everything")


def test_returns_to_go_discounted_and_not():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    assert returns_to_go(rewards).tolist() == [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]
    assert returns_to_go(rewards, gamma=0.5).tolist() == [[1 + 0.5 * (2 + 0.5 * 3), 2 + 1.5, 3.0], [6.5, 5.0, 0.0]]


def test_returns_to_go_skips_holes_as_gae_does():
    """rewards [1, 9, 2, 3] with a hole at position 1 (an environment token, reward 9 not read), gamma 0.5:
    G_3 = 3, G_2 = 2 + 0.5 * 3 = 3.5, G_1 = 0 (masked), G_0 = 1 + 0.5 * 3.5 = 2.75 (the hole is no discount step;
    counting it would give 1 + 0.25 * 3.5 = 1.875). gamma 1: G_0 = 1 + 2 + 3 = 6."""
    rewards, mask = torch.tensor([[1.0, 9.0, 2.0, 3.0]]), torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert returns_to_go(rewards, 0.5, mask).tolist() == [[2.75, 0.0, 3.5, 3.0]]
    assert returns_to_go(rewards, 1.0, mask).tolist() == [[6.0, 0.0, 5.0, 3.0]]
    # The same discounting as GAE with zero values and lambda 1 (its returns are the discounted returns).
    _, gae_returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=0.5, lam=1.0)
    assert gae_returns.tolist() == [[2.75, 0.0, 3.5, 3.0]]


def _gae_reference(rewards, values, gamma, lam):
    """A straightforward per-row loop over one unpadded sequence."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0)])
def test_gae_matches_a_reference_loop_on_random_rewards(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    lengths = [7, 1, 4, 0, 6]
    mask = (torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        expected = _gae_reference(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        assert advantages[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert (advantages[row, n:] == 0).all() and (returns[row, n:] == 0).all()
    assert torch.allclose(returns, (advantages + values) * mask)


def test_gae_with_lambda_one_is_the_monte_carlo_return_minus_the_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.ones(1, 3))
    assert torch.allclose(advantages, 1.0 - values)


def test_gae_flows_through_an_environment_hole_to_the_final_reward():
    """Two turns, environment tokens masked between them: gamma = lambda = 1, so every action token's advantage is
    the episode return minus its value, A_t = 1 - V_t: [1 - 0.1, 1 - 0.2, 1 - 0.5, 1 - 0.6]; its target is 1."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.9, 0.8, 0.0, 0.0, 0.5, 0.4])
    assert returns[0].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 1.0, 1.0])


def test_gae_skips_holes_by_hand_with_discount_and_lambda():
    """mask [1, 0, 1, 1], gamma 0.9, lambda 0.5 (gamma lambda = 0.45); the hole's reward 9 and value 7 are not read.
    Action tokens: r = [0.5, 0, 1], V = [0.2, 0.4, 0.5]; the hole is no step of the discount:
      delta_2 = 1 - 0.5 = 0.5                      A_2 = 0.5
      delta_1 = 0 + 0.9 * 0.5 - 0.4 = 0.05         A_1 = 0.05 + 0.45 * 0.5 = 0.275
      delta_0 = 0.5 + 0.9 * 0.4 - 0.2 = 0.66       A_0 = 0.66 + 0.45 * 0.275 = 0.78375
    returns A + V = [0.98375, 0, 0.675, 1.0]."""
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    advantages, returns = gae(torch.tensor([[0.5, 9.0, 0.0, 1.0]]), torch.tensor([[0.2, 7.0, 0.4, 0.5]]), mask,
                              gamma=0.9, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.78375, 0.0, 0.275, 0.5])
    assert returns[0].tolist() == pytest.approx([0.98375, 0.0, 0.675, 1.0])


HOLE_MASKS = torch.tensor([
    [1, 1, 0, 0, 1, 1, 0, 0],  # two turns, then padding
    [1, 0, 1, 0, 1, 0, 1, 0],  # a hole after every action token
    [0, 0, 1, 1, 1, 0, 1, 1],  # starts with environment tokens
    [0, 0, 0, 0, 0, 0, 0, 0],  # fully masked
    [1, 0, 0, 0, 0, 0, 0, 0],  # length 1
    [0, 0, 0, 0, 1, 0, 0, 0],  # one action token between holes
    [1, 1, 1, 1, 1, 1, 1, 1],  # no hole
], dtype=torch.float32)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (0.8, "per-row")])
def test_gae_with_holes_equals_textbook_gae_on_the_compacted_action_tokens(gamma, lam):
    generator = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(HOLE_MASKS.shape, generator=generator), torch.randn(HOLE_MASKS.shape,
                                                                                      generator=generator)
    row_lams = torch.linspace(0.0, 1.0, HOLE_MASKS.shape[0])
    advantages, returns = gae(rewards, values, HOLE_MASKS, gamma, row_lams if lam == "per-row" else lam)
    for row, row_mask in enumerate(HOLE_MASKS.bool()):
        kept = row_mask.nonzero().squeeze(1)
        row_lam = row_lams[row].item() if lam == "per-row" else lam
        expected = _gae_reference(rewards[row, kept].tolist(), values[row, kept].tolist(), gamma, row_lam)
        assert advantages[row, kept].tolist() == pytest.approx(expected, abs=1e-5)
        expected_returns = [a + v for a, v in zip(expected, values[row, kept].tolist())]
        assert returns[row, kept].tolist() == pytest.approx(expected_returns, abs=1e-5)
        assert (advantages[row][~row_mask] == 0).all() and (returns[row][~row_mask] == 0).all()


def test_gae_of_a_length_one_row_and_a_fully_masked_row():
    advantages, returns = gae(torch.tensor([[2.0, 5.0], [3.0, 4.0]]), torch.tensor([[0.5, 1.0], [1.0, 1.0]]),
                              torch.tensor([[1.0, 0.0], [0.0, 0.0]]), gamma=0.9, lam=0.5)
    assert advantages.tolist() == [[1.5, 0.0], [0.0, 0.0]]  # A = r - V = 2 - 0.5 with nothing after it
    assert returns.tolist() == [[2.0, 0.0], [0.0, 0.0]]


def test_clip_regions_are_where_the_clip_binds():
    ratio = torch.tensor([0.7, 0.8, 1.3, 1.3, 0.7])
    advantages = torch.tensor([-1.0, -1.0, 1.0, -1.0, 1.0])
    low, high = clip_regions(ratio, advantages, 0.2, 0.2)
    assert low.tolist() == [True, False, False, False, False]  # at the boundary the clip does not bind yet
    assert high.tolist() == [False, False, True, False, False]


def test_outcome_reward_sits_on_each_rows_last_token():
    from po_registry.ops import last_token_index, outcome_token_rewards

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert last_token_index(mask).tolist() == [1, 2, 0]
    dense = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.5], [1.0, 1.0, 1.0]])
    got = outcome_token_rewards(torch.tensor([1.0, -1.0, 2.0]), mask, dense)
    assert torch.allclose(got, torch.tensor([[0.1, 1.2, 0.0], [0.0, 0.0, -0.5], [0.0, 0.0, 0.0]]))
    assert torch.equal(dense[0], torch.tensor([0.1, 0.2, 0.3]))  # the input is not modified


def test_masked_whiten_and_clipped_value_loss():
    from po_registry.ops import clipped_value_loss, masked_whiten

    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    got = masked_whiten(x, mask)
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / torch.tensor([1.0, 2.0, 3.0, 4.0]).std(unbiased=False)
    assert torch.allclose(got[mask.bool()], expected, atol=1e-6) and (got[~mask.bool()] == 0).all()
    loss = clipped_value_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([3.0]), clip=0.5)
    assert loss.item() == pytest.approx(0.5 * (0.5 - 3.0) ** 2)  # the clipped prediction is further from G
