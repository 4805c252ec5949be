"""Distribution-matching losses over next-token distributions, per token so callers can weight or mask them."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Direction = Literal["forward", "reverse"]
# Label of a token that is not scored (prompt tokens, padding); the value transformers and torch use.
IGNORE_INDEX = -100


def token_kl(
    teacher_logits: Tensor, student_logits: Tensor, direction: Direction = "forward", temperature: float = 1.0
) -> Tensor:
    """Per-token KL divergence between teacher and student next-token distributions.

    ``forward`` is KL(teacher || student) (mode-covering, the usual KD loss); ``reverse`` is KL(student || teacher).

    Args:
        teacher_logits: ``[batch, seq, vocab]``.
        student_logits: ``[batch, seq, vocab]``.
        direction: Which KL.
        temperature: Both distributions are softened by it (logits / temperature).

    Returns:
        ``[batch, seq]`` KL in nats, float32.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"`direction` must be 'forward' or 'reverse', got {direction!r}.")
    # Fewer full [tokens, vocab] float32 passes: no division at temperature 1, and kl_div's fused pointwise form.
    t = F.log_softmax(_soften(teacher_logits, temperature), dim=-1)
    s = F.log_softmax(_soften(student_logits, temperature), dim=-1)
    return kl_from_log_probs(t, s, direction)


def kl_from_log_probs(logp_teacher: Tensor, logp_student: Tensor, direction: Direction = "forward") -> Tensor:
    """KL over the last dimension between two log-probability tensors: KL(t || s) forward, KL(s || t) reverse."""
    if direction == "forward":
        return F.kl_div(logp_student, logp_teacher, reduction="none", log_target=True).sum(-1)
    return F.kl_div(logp_teacher, logp_student, reduction="none", log_target=True).sum(-1)


def _soften(logits: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-token entropy (nats) of ``softmax(logits / temperature)``: ``[batch, seq, vocab] -> [batch, seq]``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true (all of them when mask is None); 0 when nothing is selected."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def scored_positions(labels: Tensor | None, shape: torch.Size, ignore_index: int, device) -> Tensor:
    """Bool ``[batch, seq]``: position t predicts label t+1; the last position predicts nothing known."""
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def next_token_ce(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy (labels aligned with inputs; shifted here)."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=ignore_index
    )


def kl_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    labels: Tensor | None = None,
    direction: Direction = "forward",
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Mean token KL over the positions that predict a scored label (all positions when ``labels`` is None).

    Scaled by ``temperature**2`` so gradient magnitudes do not shrink as the temperature grows (Hinton et al.).
    ``chunk_tokens`` computes the KL over that many tokens at a time and recomputes each chunk in the backward pass,
    so the float32 ``[tokens, vocab]`` intermediates exist for one chunk only (same value and gradient).
    """
    shape = teacher_logits.shape[:2]
    mask = None if labels is None else scored_positions(labels, shape, ignore_index, teacher_logits.device)
    if chunk_tokens is None or chunk_tokens >= shape.numel():
        kl = token_kl(teacher_logits, student_logits, direction, temperature)
        return masked_mean(kl, mask) * temperature**2
    if chunk_tokens < 1:
        raise ValueError(f"`chunk_tokens` must be >= 1 or None, got {chunk_tokens}.")
    from torch.utils.checkpoint import checkpoint

    vocab = teacher_logits.size(-1)
    teacher, student = teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab)
    weights = torch.ones(shape.numel(), device=teacher.device) if mask is None else mask.reshape(-1).float()

    def chunk_sum(t: Tensor, s: Tensor, w: Tensor) -> Tensor:
        return (token_kl(t[None], s[None], direction, temperature)[0] * w).sum()

    total = sum(
        checkpoint(chunk_sum, teacher[i:i + chunk_tokens], student[i:i + chunk_tokens], weights[i:i + chunk_tokens],
                   use_reentrant=False)
        for i in range(0, teacher.size(0), chunk_tokens)
    )
    return total / weights.sum().clamp(min=1) * temperature**2


def kd_ce_mix(ce: Tensor, kd: Tensor | None, kd_share: float) -> Tensor:
    """The recovery objective ``(1 - kd_share) * CE + kd_share * KD``, with ``kd_share`` in [0, 1].

    At the ends a term is returned as it is: ``kd_share`` 1 is pure KD, 0 pure CE (``kd`` may then be None, so no
    teacher needs to run).
    """
    if kd_share == 0.0:
        return ce
    if kd is None:
        raise ValueError(f"`kd_share`={kd_share} weights a KD term, but none was computed.")
    if kd_share == 1.0:
        return kd
    return (1.0 - kd_share) * ce + kd_share * kd
