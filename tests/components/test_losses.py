"""kl_loss computed in checkpointed chunks equals the one-shot KL, in value and in gradient; the KD/CE mix."""

from __future__ import annotations

import pytest
import torch

from lit_prune.components.losses import kd_ce_mix, kl_loss


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_chunked_kl_matches_one_shot_value_and_gradient(direction, with_labels):
    torch.manual_seed(0)
    teacher = torch.randn(2, 7, 50) * 3
    student = (torch.randn(2, 7, 50) * 3).requires_grad_()
    labels = torch.randint(0, 50, (2, 7))
    if with_labels:
        labels[0, 3:] = -100  # unscored positions must be left out the same way
    labels = labels if with_labels else None

    full = kl_loss(teacher, student, labels, direction, temperature=2.0)
    (grad_full,) = torch.autograd.grad(full, student)
    chunked = kl_loss(teacher, student, labels, direction, temperature=2.0, chunk_tokens=3)  # 14 tokens: 3+3+3+3+2
    (grad_chunked,) = torch.autograd.grad(chunked, student)

    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)
    assert full > 0


def test_chunk_tokens_must_be_positive():
    with pytest.raises(ValueError, match="chunk_tokens"):
        kl_loss(torch.randn(1, 4, 5), torch.randn(1, 4, 5), chunk_tokens=0)


@pytest.mark.parametrize(("share", "expected"), [(0.0, 2.0), (0.25, 2.0 * 0.75 + 6.0 * 0.25), (1.0, 6.0)])
def test_kd_ce_mix_is_the_share_of_kd(share, expected):
    ce, kd = torch.tensor(2.0, requires_grad=True), torch.tensor(6.0, requires_grad=True)
    loss = kd_ce_mix(ce, kd, share)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert ce.grad == pytest.approx(1 - share) if share < 1 else ce.grad is None
    assert kd.grad == pytest.approx(share) if share > 0 else kd.grad is None


def test_kd_ce_mix_needs_no_teacher_at_share_zero():
    ce = torch.tensor(1.5)
    assert kd_ce_mix(ce, None, 0.0) is ce
    with pytest.raises(ValueError, match="kd_share`=0.5 weights a KD term"):
        kd_ce_mix(ce, None, 0.5)
