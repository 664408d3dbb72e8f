"""80/20 tokens, Clip-Cov and KL-Cov: formulas, TRL parity for the entropy mask, conformance and training."""

import pytest
import torch
from po_registry_entropy import ClipCov, HighEntropyTokens, KLCov, token_covariance

from po_registry.testing import PluginConformance, default_args


class TestHighEntropyConformance(PluginConformance):
    method = "high-entropy-tokens"
    metrics = ("entropy/kept_fraction",)


class TestClipCovConformance(PluginConformance):
    method = "clip-cov"
    options = {"clip_cov_fraction": 0.05, "clip_cov_lower": 0.0}
    metrics = ("clip_cov/clipped_fraction",)


class TestKLCovConformance(PluginConformance):
    method = "kl-cov"
    options = {"kl_cov_fraction": 0.05}
    config = {"num_iterations": 2}
    metrics = ("kl_cov/penalised_fraction",)


def test_covariance_formula(po_loss_batch):
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -9.0]])
    advantages = torch.tensor([[1.0], [-1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    cov = token_covariance(logps, advantages, mask)
    # mean log pi over loss tokens = -2, mean A = 1/3
    expected = torch.tensor([[1.0 * (2 / 3), -1.0 * (2 / 3)], [0.0 * (-4 / 3), 0.0]])
    assert torch.allclose(cov, expected)


def test_high_entropy_mask_keeps_the_top_quantile(po_loss_batch):
    """8 loss tokens, entropies sorted 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9: the 0.5 quantile is (0.3 + 0.5) / 2
    = 0.4, so the top half 0.9, 0.5, 0.8, 0.7 is kept. The environment holes (entropies 5.0 and 4.0, between loss
    tokens) must not count: with them the quantile would be (0.5 + 0.7) / 2 = 0.6 and 0.5 would be dropped."""
    batch = po_loss_batch(rows=2, width=5, options={"entropy_top_quantile": 0.5})
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0, 1.0]])
    batch.entropies = torch.tensor([[0.1, 5.0, 0.9, 0.5, 0.2], [0.8, 0.3, 4.0, 0.7, 0.05]])
    keep = HighEntropyTokens().po_token_mask(batch)
    assert keep.tolist() == [[0, 0, 1, 1, 0], [1, 0, 0, 1, 0]]


def test_clip_cov_draws_only_from_tokens_the_clip_leaves_free(po_loss_batch):
    """eps 0.2: row 0 (A = +1) has ratios 1.5, 1, 1.3 and row 1 (A = -1) 0.5, 1, 1.1; the clip binds on 1.5 and
    1.3 (A > 0, r > 1.2) and on 0.5 (A < 0, r < 0.8). Budget: int(0.5 * 6 tokens) = 3 = the three free tokens, so
    all three are removed whatever the draw, and the clipped ones keep their clipped value: -1.2, -1.2, +0.8.
    Before, the draw was over all six tokens, so part of the budget went to tokens the clip had already removed."""
    batch = po_loss_batch(rows=2, width=3, args=default_args(["clip-cov"], epsilon=0.2), options={
        "clip_cov_fraction": 0.5, "clip_cov_lower": -100.0, "clip_cov_upper": 100.0})
    batch.mask = torch.ones(2, 3)
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    batch.old_logps = torch.full((2, 3), -2.0)
    log_ratio = torch.tensor([[1.5, 1.0, 1.3], [0.5, 1.0, 1.1]]).log()
    batch.logps = (batch.old_logps + log_ratio).requires_grad_()
    loss = ClipCov().po_policy_objective(batch, batch.logps - batch.old_logps)
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.0, -1.2], [0.8, 0.0, 0.0]]))
    loss.sum().backward()
    assert torch.equal(batch.logps.grad, torch.zeros(2, 3))  # clipped or removed: no token keeps a gradient


def test_clip_cov_keeps_the_gradient_outside_its_draw(po_loss_batch):
    """Covariance window (1, 5) strictly, as in the paper's code. Loss tokens (0, 0) and (1, 0), the second column
    is padding (junk values that must not count): log pi = -1 and -5, A = 4 and -4, so mean log pi = -3, mean A = 0
    and Cov = (2)(4) = 8 and (-2)(-4) = 8: none eligible. The loss is the clipped surrogate -r A = [-4, 4] at r = 1,
    with gradient -A = [-4, 4]."""
    batch = po_loss_batch(rows=2, width=2, args=default_args(["clip-cov"]), options={
        "clip_cov_fraction": 0.5, "clip_cov_lower": 1.0, "clip_cov_upper": 5.0})
    batch.mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    batch.advantages = torch.tensor([[4.0], [-4.0]])
    batch.logps = torch.tensor([[-1.0, -0.1], [-5.0, -9.0]], requires_grad=True)
    batch.old_logps = batch.logps.detach().clone()
    loss = ClipCov().po_policy_objective(batch, batch.logps - batch.old_logps)
    assert torch.allclose(loss[:, 0], torch.tensor([-4.0, 4.0]))
    (loss * batch.mask).sum().backward()
    assert torch.allclose(batch.logps.grad, torch.tensor([[-4.0, 0.0], [4.0, 0.0]]))


def test_kl_cov_is_the_unclipped_objective_plus_kl_on_the_top_covariance_tokens(po_loss_batch):
    """log pi = [[-1, -3], [-2, -0.5]], log pi_old = [[-1.5, -3], [-2, -1]], A = [1, -1]: mean log pi = -1.625,
    mean A = 0, Cov = [[0.625, -1.375], [0.375, -1.125]]; k = max(1, int(0.3 * 4)) = 1 token, (0, 0).
    Loss = -r A everywhere (r = e^0.5 = 1.648721 at (0, 0) and (1, 1)) + 2 * |0.5| at (0, 0):
    [[-1.648721 + 1, -1], [1, 1.648721]]. Before, the penalty sat on the clipped objective: (0, 0) gave
    -1.2 + 1 = -0.2 (the clip had removed its policy gradient)."""
    batch = po_loss_batch(rows=2, width=2, args=default_args(["kl-cov"]), options={
        "kl_cov_fraction": 0.3, "kl_cov_coef": 2.0})
    batch.mask = torch.ones(2, 2)
    batch.logps = torch.tensor([[-1.0, -3.0], [-2.0, -0.5]], requires_grad=True)
    batch.old_logps = torch.tensor([[-1.5, -3.0], [-2.0, -1.0]])
    batch.advantages = torch.tensor([[1.0], [-1.0]])
    loss = KLCov().po_policy_objective(batch, batch.logps - batch.old_logps)
    assert torch.allclose(loss, torch.tensor([[-0.648721, -1.0], [1.0, 1.648721]]), atol=1e-6)


@pytest.mark.parametrize("method", ["clip-cov", "kl-cov"])
@pytest.mark.parametrize("flags, culprit", [({"loss_type": "cispo"}, "loss_type='cispo'"),
                                            ({"delta": 1.5}, "delta")])
def test_covariance_methods_refuse_flags_of_another_objective(method, flags, culprit):
    from po_registry.errors import OptionError

    with pytest.raises(OptionError, match=f"{method}.*{culprit}"):
        default_args([method], **flags).resolve()


def test_covariance_methods_own_the_objective_so_they_do_not_stack_on_clip_higher():
    from po_registry.errors import CompositionError
    from po_registry.pipeline import assemble

    with pytest.raises(CompositionError, match="po_policy_objective.*clip-higher.*clip-cov"):
        assemble(["clip-higher", "clip-cov"])


def _entropy_batch(po_loss_batch, args, options=None):
    """7 loss tokens (row 0's second token is an environment hole between loss tokens, its entropy 3.0 must not
    count); their entropies sorted: 0.05, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, so the 0.5 quantile is 0.5 and the top half
    kept is 0.5, 0.9 (row 0) and 0.8, 0.7 (row 1)."""
    batch = po_loss_batch(rows=2, width=4, args=args, options=options or {})
    batch.mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    batch.entropies = torch.tensor([[0.1, 3.0, 0.5, 0.9], [0.8, 0.3, 0.7, 0.05]], requires_grad=True)
    return batch


def test_entropy_bonus_acts_on_the_tokens_the_entropy_mask_keeps(po_loss_batch):
    """TRL 1.16: bonus = -coef * sum(H * mask * entropy_mask) / sum(mask * entropy_mask) = -0.1 * 2.9 / 4 = -0.0725
    (before: the mean over all 7 loss tokens, -0.1 * 3.35 / 7 = -0.047857)."""
    from po_registry.builtin.grpo import EntropyBonus

    for args, options in [(default_args(top_entropy_quantile=0.5, entropy_coef=0.1), {}),
                          (default_args(["high-entropy-tokens"], {"entropy_top_quantile": 0.5}, entropy_coef=0.1),
                           {"entropy_top_quantile": 0.5})]:
        batch = _entropy_batch(po_loss_batch, args, options)
        bonus = EntropyBonus().po_loss_penalty(batch)
        assert bonus.item() == pytest.approx(-0.0725, abs=1e-7)
        bonus.backward()  # d/dH = -0.1 / 4 on each kept token, 0 elsewhere
        kept = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
        assert torch.allclose(batch.entropies.grad, -0.025 * kept)


def test_entropy_bonus_without_a_mask_uses_every_loss_token(po_loss_batch):
    from po_registry.builtin.grpo import EntropyBonus

    batch = _entropy_batch(po_loss_batch, default_args(entropy_coef=0.1))
    assert EntropyBonus().po_loss_penalty(batch).item() == pytest.approx(-0.1 * 3.35 / 7, abs=1e-7)


def test_high_entropy_tokens_with_an_entropy_bonus_equal_trl(po_trl_parity):
    result = po_trl_parity(["high-entropy-tokens"], {"top_entropy_quantile": 0.2},
                           shared_flags={"entropy_coef": 0.5}, off_policy=0.3)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6


def test_high_entropy_tokens_equal_trl_top_entropy_quantile(po_trl_parity):
    result = po_trl_parity(["high-entropy-tokens"], {"top_entropy_quantile": 0.2}, off_policy=0.3)
    assert result["completions_equal"]
    assert result["ours_loss"] == pytest.approx(result["stock_loss"], abs=1e-6)
    assert result["max_grad_diff"] <= 1e-6
