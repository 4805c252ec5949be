import math

import pytest
import torch

from lit_prune.components.samplers import gumbel_noise, hard_topk_mask, relaxed_topk, straight_through_topk

EULER_GAMMA = 0.5772156649


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_gumbel_noise_shape_dtype_and_moments():
    like = torch.empty(200_000, dtype=torch.float64)
    torch.manual_seed(0)
    noise = gumbel_noise(like)
    assert noise.shape == like.shape and noise.dtype == torch.float64
    assert torch.isfinite(noise).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni constant, variance = pi^2 / 6.
    assert noise.mean().item() == pytest.approx(EULER_GAMMA, abs=0.02)
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, rel=0.03)


def test_gumbel_noise_is_repeatable_with_seed_and_generator():
    like = torch.zeros(16)
    torch.manual_seed(3)
    a = gumbel_noise(like)
    torch.manual_seed(3)
    b = gumbel_noise(like)
    assert torch.equal(a, b)
    assert not torch.equal(a, gumbel_noise(like))
    c = gumbel_noise(like, generator=torch.Generator().manual_seed(7))
    d = gumbel_noise(like, generator=torch.Generator().manual_seed(7))
    assert torch.equal(c, d)


def test_gumbel_top1_samples_softmax():
    # Gumbel-max trick: argmax(logits + gumbel) ~ softmax(logits); checks the noise and the k-hot mask together.
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    torch.manual_seed(0)
    draws = 20_000
    z = logits + gumbel_noise(logits.expand(draws, -1))
    freq = hard_topk_mask(z, keep=1).mean(dim=0)
    torch.testing.assert_close(freq, torch.softmax(logits, dim=0), atol=0.015, rtol=0)


@pytest.mark.parametrize(("n", "keep"), [(1, 0), (1, 1), (5, 0), (5, 2), (5, 5), (30, 23)])
def test_hard_topk_mask_is_exact_k_hot_on_the_largest(n, keep):
    scores = torch.randperm(n).float()
    mask = hard_topk_mask(scores, keep)
    assert mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum().item() == keep
    if 0 < keep < n:
        assert scores[mask.bool()].min() > scores[~mask.bool()].max()


def test_hard_topk_mask_batched_rows():
    scores = torch.randn(7, 9)
    mask = hard_topk_mask(scores, 4)
    assert torch.equal(mask.sum(dim=-1), torch.full((7,), 4.0))


@pytest.mark.parametrize("fn", [hard_topk_mask, relaxed_topk, straight_through_topk])
@pytest.mark.parametrize("keep", [-1, 6])
def test_keep_out_of_range_raises(fn, keep):
    with pytest.raises(ValueError, match=r"`keep` must be in \[0, 5\]"):
        fn(torch.randn(5), keep)


@pytest.mark.parametrize(("n", "keep", "scale"), [(6, 1, 1.0), (6, 5, 1.0), (12, 4, 0.1), (12, 8, 20.0), (80, 64, 3.0)])
def test_relaxed_topk_sums_to_keep(n, keep, scale):
    z = scale * torch.randn(n)
    soft = relaxed_topk(z, keep)
    assert ((soft >= 0) & (soft <= 1)).all()
    assert soft.sum().item() == pytest.approx(keep, abs=1e-4)
    # Order preserving: a larger score never gets a smaller keep-probability.
    order = z.argsort()
    assert (soft[order].diff() >= 0).all()


def test_relaxed_topk_batched_rows_each_sum_to_keep():
    soft = relaxed_topk(torch.randn(4, 10) * 5, keep=3)
    torch.testing.assert_close(soft.sum(dim=-1), torch.full((4,), 3.0), atol=1e-4, rtol=0)


def test_relaxed_topk_gradient_includes_the_threshold():
    # Implicit derivative of sum(soft) = keep: J = diag(w) - w w^T / sum(w), w = soft * (1 - soft).
    z = torch.randn(6, dtype=torch.float64)
    soft = relaxed_topk(z, 2)
    w = soft * (1 - soft)
    jac = torch.autograd.functional.jacobian(lambda x: relaxed_topk(x, 2), z)
    torch.testing.assert_close(jac, torch.diag(w) - torch.outer(w, w) / w.sum())
    # Matches finite differences of the full function (threshold re-solved).
    eps = 1e-6
    for j in range(6):
        dz = torch.zeros(6, dtype=torch.float64)
        dz[j] = eps
        fd = (relaxed_topk(z + dz, 2) - relaxed_topk(z - dz, 2)) / (2 * eps)
        torch.testing.assert_close(jac[:, j], fd, atol=1e-6, rtol=1e-4)


def test_relaxed_topk_shifting_all_scores_has_zero_gradient():
    z = torch.randn(9, requires_grad=True)
    (relaxed_topk(z, 4) * torch.randn(9)).sum().backward()
    assert z.grad.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert z.grad.abs().sum() > 0


def test_relaxed_topk_low_temperature_approaches_hard():
    z = torch.randn(10)
    soft = relaxed_topk(z / 1e-3, 4)
    torch.testing.assert_close(soft, hard_topk_mask(z, 4), atol=1e-3, rtol=0)


@pytest.mark.parametrize(("keep", "value"), [(0, 0.0), (5, 1.0)])
def test_relaxed_topk_edge_cases_are_exact_and_backpropagate(keep, value):
    z = torch.randn(5, requires_grad=True)
    soft = relaxed_topk(z, keep)
    assert torch.equal(soft.detach(), torch.full((5,), value))
    soft.sum().backward()  # must not raise although the result is constant
    assert torch.equal(z.grad, torch.zeros(5))


@pytest.mark.parametrize(("n", "keep"), [(8, 1), (8, 5), (8, 7), (32, 24)])
def test_straight_through_forward_exact_backward_soft(n, keep):
    z = (torch.randn(n) * 2).requires_grad_()
    weights = torch.randn(n)
    out = straight_through_topk(z, keep)
    assert torch.equal(out.detach(), hard_topk_mask(z.detach(), keep))  # bit-exact k-hot
    (out * weights).sum().backward()
    z_soft = z.detach().clone().requires_grad_()
    (relaxed_topk(z_soft, keep) * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_soft.grad)
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("keep", [0, 6])
def test_straight_through_edge_cases(keep):
    z = torch.randn(6, requires_grad=True)
    out = straight_through_topk(z, keep)
    assert out.sum().item() == keep
    out.sum().backward()
    assert torch.equal(z.grad, torch.zeros(6))
