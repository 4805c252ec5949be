"""Entropy-aware KD (lit_prune.components.kd) against references written with torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from lit_prune.components.kd import (
    SparseTeacher,
    entropy_aware_kd,
    entropy_aware_kd_terms,
    entropy_weights,
    sample_teacher,
    student_selective_weights,
    topk_teacher,
    topk_with_tail,
    weights_from_entropy,
)
from lit_prune.components.losses import token_entropy

B, T, V = 3, 7, 11


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * scale


def _labels() -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    labels[0, :3] = -100  # a masked prompt
    labels[2, 5] = -100
    return labels


def _scored(labels: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _reference_kl(student, teacher, mask, temperature, direction):
    s = F.log_softmax(student / temperature, -1)
    t = F.log_softmax(teacher / temperature, -1)
    # F.kl_div(input, target) = KL(target || input) with log-space inputs.
    per_token = F.kl_div(s, t, log_target=True, reduction="none").sum(-1) if direction == "forward" else \
        F.kl_div(t, s, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() / mask.sum() * temperature**2


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_unweighted_kd_matches_f_kl_div(direction, temperature):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    got = entropy_aware_kd(student, teacher, labels, direction=direction, temperature=temperature, weighting="none")
    want = _reference_kl(student, teacher, _scored(labels), temperature, direction)
    torch.testing.assert_close(got, want)


def test_reverse_differs_from_forward():
    student, teacher = _logits(0), _logits(1)
    forward = entropy_aware_kd(student, teacher, weighting="none", direction="forward")
    reverse = entropy_aware_kd(student, teacher, weighting="none", direction="reverse")
    assert not torch.isclose(forward, reverse)


def test_normalized_weights_have_mean_one_over_scored_tokens_and_follow_entropy():
    teacher, labels = _logits(1, scale=torch.linspace(0.1, 5.0, T).view(1, T, 1)), _labels()
    mask = _scored(labels)
    weights = entropy_weights(teacher, "normalized", mask=mask)
    assert weights[mask].mean().item() == pytest.approx(1.0, abs=1e-5)
    entropy = token_entropy(teacher)
    # Higher entropy -> higher weight, token by token.
    order = entropy.flatten().argsort()
    assert torch.all(weights.flatten()[order].diff() >= -1e-6)
    assert weights.std() > 0.1


def test_linear_and_none_weights():
    teacher = _logits(1)
    entropy = token_entropy(teacher)
    torch.testing.assert_close(entropy_weights(teacher, "linear", beta=0.5), 1 + 0.5 * entropy)
    torch.testing.assert_close(entropy_weights(teacher, "none"), torch.ones(B, T))
    # Log-probabilities give the same weights as logits (log_softmax is idempotent).
    from_logprobs = entropy_weights(F.log_softmax(teacher, -1), "linear")
    torch.testing.assert_close(from_logprobs, entropy_weights(teacher, "linear"))


def test_normalized_weights_of_a_certain_teacher_are_one():
    weights = weights_from_entropy(torch.zeros(B, T), "normalized")
    torch.testing.assert_close(weights, torch.ones(B, T))


def test_weighted_loss_is_the_weighted_token_mean():
    student, teacher, labels = _logits(0), _logits(1), _labels()
    mask = _scored(labels)
    t = F.log_softmax(teacher, -1)
    per_token = (t.exp() * (t - F.log_softmax(student, -1))).sum(-1)
    entropy = token_entropy(teacher)
    w = entropy / (entropy[mask].mean() + 1e-6)  # methods.md §2.5
    want = (w * per_token * mask).sum() / mask.sum()
    torch.testing.assert_close(entropy_aware_kd(student, teacher, labels), want, rtol=1e-4, atol=1e-6)


def test_ignored_positions_do_not_count_and_all_ignored_is_zero():
    student, teacher, labels = _logits(0), _logits(1), _labels()
    base = entropy_aware_kd(student, teacher, labels)
    changed = student.clone()
    changed[0, :2] += 10 * torch.randn(2, V)  # positions 0, 1 of row 0 predict ignored labels 1, 2
    changed[:, -1] += 10.0 * torch.randn(B, V)  # the last position predicts nothing
    torch.testing.assert_close(entropy_aware_kd(changed, teacher, labels), base)
    changed[1, 0] += 10 * torch.randn(V)  # a scored position
    assert not torch.isclose(entropy_aware_kd(changed, teacher, labels), base)
    assert entropy_aware_kd(student, teacher, torch.full((B, T), -100)) == 0


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("weighting", ["normalized", "linear", "none"])
def test_topk_with_k_equal_vocab_equals_full_logits(direction, weighting):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))  # any order of the K ids must work
    indices = perm.expand(B, T, V)
    full = entropy_aware_kd(student, teacher, labels, direction, 1.5, weighting, beta=0.3)
    topk = entropy_aware_kd(student, (indices, teacher.gather(-1, indices)), labels, direction, 1.5, weighting, 0.3)
    torch.testing.assert_close(topk, full)


def test_topk_forward_matches_methods_reference_and_penalises_mass_outside_k():
    student, teacher, labels = _logits(0), _logits(1), _labels()
    idx, vals = topk_teacher(teacher, 3)
    mask = _scored(labels)
    logp_s = F.log_softmax(student, -1).gather(-1, idx.long())
    logp_t = F.log_softmax(vals.float(), -1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    entropy = -(logp_t.exp() * logp_t).sum(-1)
    w = entropy / (entropy[mask].mean() + 1e-6)
    want = (w * kl * mask).sum() / mask.sum()
    torch.testing.assert_close(entropy_aware_kd(student, (idx, vals), labels), want, rtol=1e-4, atol=1e-6)
    # A student that matches the top-3 ratios but keeps mass elsewhere still pays in the forward direction.
    matched = torch.full_like(student, 0.0).scatter(-1, idx.long(), vals.float())
    assert entropy_aware_kd(matched, (idx, vals), weighting="none") > 1e-3


def test_gradient_reaches_the_student_only():
    student = _logits(0).requires_grad_(True)
    teacher = _logits(1).requires_grad_(True)
    terms = entropy_aware_kd_terms(student, teacher, _labels())
    assert not terms.weights.requires_grad
    terms.loss().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_topk_teacher_storage_form_and_errors():
    teacher = _logits(1)
    idx, vals = topk_teacher(teacher, 4)
    assert idx.dtype == torch.int32 and vals.dtype == torch.float16 and idx.shape == (B, T, 4)
    torch.testing.assert_close(vals.float(), teacher.topk(4, -1).values, atol=1e-2, rtol=1e-3)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 11\]"):
        topk_teacher(teacher, V + 1)
    with pytest.raises(ValueError, match="share a tokenizer"):
        entropy_aware_kd(_logits(0), teacher[..., :-1])
    with pytest.raises(ValueError, match="weighting"):
        entropy_aware_kd(_logits(0), teacher, weighting="entropy")
    with pytest.raises(ValueError, match="integer token ids"):
        entropy_aware_kd(_logits(0), (idx.float(), vals))


# ---------------------------------------------------------------- cache v2 forms: top-K + tail, sampled ids


def _full_forward_kl(student, teacher):
    t, s = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
    return (t.exp() * (t - s)).sum(-1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_tail_is_exact_when_k_covers_the_teacher_support(direction):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    full = entropy_aware_kd(student, teacher, labels, direction, weighting="none")
    idx, logp, tail = topk_with_tail(teacher, V)  # K = vocabulary: the tail is empty
    assert torch.isinf(tail).all()
    got = entropy_aware_kd(student, SparseTeacher(idx, logp, tail=tail), labels, direction, weighting="none")
    torch.testing.assert_close(got, full)
    student.requires_grad_(True)
    hot = entropy_aware_kd(student, SparseTeacher(idx, logp, tail=tail), labels, direction, 2.5, weighting="none")
    torch.testing.assert_close(hot, entropy_aware_kd(student, teacher, labels, direction, 2.5, weighting="none"))
    assert torch.isfinite(torch.autograd.grad(hot, student)[0]).all()  # an empty tail gives no nan gradient
    student = student.detach()
    # Support of 4 ids (the rest has probability 0): top-4 + an empty tail is still exact.
    sparse = teacher.clone()
    sparse[..., 4:] = float("-inf")
    idx, logp, tail = topk_with_tail(sparse, 4)
    got = entropy_aware_kd(student, SparseTeacher(idx, logp, tail=tail), labels, "forward", weighting="none")
    want = (_full_forward_kl(student, sparse.clamp(min=-1e4)) * _scored(labels)).sum() / _scored(labels).sum()
    torch.testing.assert_close(got, want)


def test_topk_tail_kl_is_the_kl_of_k_plus_one_buckets_and_never_above_the_full_kl():
    student, teacher = _logits(0), _logits(1)
    idx, logp, tail = topk_with_tail(teacher, 3)
    terms = entropy_aware_kd_terms(student, SparseTeacher(idx, logp, tail=tail), weighting="none")
    s = F.log_softmax(student, -1)
    s_k = s.gather(-1, idx)
    s_tail = torch.log1p(-s_k.exp().sum(-1))
    p = torch.cat([logp, tail[..., None]], -1)
    q = torch.cat([s_k, s_tail[..., None]], -1)
    torch.testing.assert_close(terms.kl, (p.exp() * (p - q)).sum(-1), rtol=1e-4, atol=1e-6)
    full = _full_forward_kl(student, teacher)
    assert (terms.kl <= full + 1e-6).all() and (terms.kl > 0).all()
    # The student's mass outside the K ids is what the tail bucket compares; renormalised top-K ignores its split.
    entropy_k1 = -(p.exp() * p).sum(-1)
    torch.testing.assert_close(terms.entropy, entropy_k1)
    assert (terms.entropy <= token_entropy(teacher) + 1e-5).all()


def test_sampled_kd_is_an_unbiased_estimate_of_the_full_kl_and_its_gradient():
    student = _logits(0, scale=1.0).requires_grad_(True)
    teacher = _logits(1, scale=1.0)
    full = _full_forward_kl(student, teacher).mean()
    (full_grad,) = torch.autograd.grad(full, student)
    generator = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(400):
        idx, logp, counts = sample_teacher(teacher, 4, generator)
        loss = entropy_aware_kd(student, SparseTeacher(idx, logp, counts=counts), weighting="none")
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, student)[0])
    values = torch.stack(values)
    assert abs(values.mean() - full.detach()) < 4 * values.std() / 400**0.5
    torch.testing.assert_close(torch.stack(grads).mean(0), full_grad, atol=4e-3, rtol=0)
    assert values.std() > 1e-3  # it is an estimate: single draws do vary


def test_sparse_teacher_refusals():
    idx, logp, counts = sample_teacher(_logits(1), 4)
    sampled = SparseTeacher(idx, logp, counts=counts)
    with pytest.raises(ValueError, match="forward KL only"):
        entropy_aware_kd(_logits(0), sampled, direction="reverse")
    with pytest.raises(ValueError, match="temperature 1.*top-K cache"):
        entropy_aware_kd(_logits(0), sampled, temperature=2.0)
    with pytest.raises(ValueError, match="exactly one of `tail`"):
        SparseTeacher(idx, logp)
    with pytest.raises(ValueError, match="draws"):
        sample_teacher(_logits(1), 0)


def test_student_selective_weights_pick_each_rows_most_uncertain_scored_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 1.0],
                            [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    mask = torch.ones_like(entropy, dtype=torch.bool)
    mask[1, :2] = False  # row 1's two most uncertain tokens are not scored: they must not be picked
    weights = student_selective_weights(entropy, mask, select_fraction=0.25)
    # row 0: 10 scored -> ceil(2.5) = 3 picked (1.0, 0.9, 0.8) at weight 10/3; row 1: 8 scored -> 2 picked at 4
    assert weights[0].nonzero().flatten().tolist() == [1, 6, 9]
    assert weights[1].nonzero().flatten().tolist() == [2, 3]
    torch.testing.assert_close(weights[0, [1, 6, 9]], torch.full((3,), 10 / 3))
    torch.testing.assert_close(weights[1, [2, 3]], torch.full((2,), 4.0))
    for row in range(2):  # mean weight 1 over each row's scored tokens
        assert weights[row][mask[row]].mean().item() == pytest.approx(1.0)
    assert student_selective_weights(entropy, None, 0.2)[0].nonzero().flatten().tolist() == [1, 9]
    with pytest.raises(ValueError, match=r"select_fraction` must be in \(0, 1\]"):
        student_selective_weights(entropy, mask, 1.5)
    with pytest.raises(ValueError, match="student's entropy"):
        weights_from_entropy(entropy, "student_selective")


def test_student_selective_kd_is_the_mean_kl_over_the_students_uncertain_tokens():
    student, teacher, labels = _logits(0, scale=torch.linspace(0.2, 4.0, V)), _logits(1), _labels()
    mask = _scored(labels)
    terms = entropy_aware_kd_terms(student, teacher, labels, weighting="student_selective", select_fraction=0.5)
    picked = terms.weights > 0
    assert picked.any() and not torch.equal(picked, mask) and not (picked & ~mask).any()
    # The picked tokens are those where the *student* is uncertain, not the teacher.
    s_entropy = token_entropy(student)
    for row in range(B):
        chosen, rest = s_entropy[row][picked[row]], s_entropy[row][mask[row] & ~picked[row]]
        assert chosen.min() >= rest.max()
    # Each row contributes the mean KL over its picked tokens, weighted by its scored-token count.
    want = sum(terms.kl[r][picked[r]].mean() * mask[r].sum() for r in range(B)) / mask.sum()
    torch.testing.assert_close(terms.loss(), want)


@pytest.mark.parametrize("form", ["full", "tail", "sampled"])
def test_student_selective_with_fraction_one_is_plain_kd_for_every_teacher_form(form):
    student, teacher, labels = _logits(0), _logits(1), _labels()
    if form == "tail":
        idx, logp, tail = topk_with_tail(teacher, 4)
        teacher = SparseTeacher(idx, logp, tail=tail)
    elif form == "sampled":
        idx, logp, counts = sample_teacher(teacher, 6, torch.Generator().manual_seed(0))
        teacher = SparseTeacher(idx, logp, counts=counts)
    plain = entropy_aware_kd(student, teacher, labels, weighting="none")
    torch.testing.assert_close(
        entropy_aware_kd(student, teacher, labels, weighting="student_selective", select_fraction=1.0), plain)
    half = entropy_aware_kd(student, teacher, labels, weighting="student_selective", select_fraction=0.5)
    assert not torch.isclose(half, plain)
