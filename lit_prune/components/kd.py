"""Entropy-aware adaptive knowledge distillation (E3-Pruner's recovery loss, reconstructed in methods.md §2.5).

For every scored position ``t`` (one whose next-token label is not ``ignore_index``)::

    l_t = KL(p_T(t) || p_S(t))                 forward (default); reverse = KL(p_S(t) || p_T(t))
    H_t = entropy of the teacher at position t  (at temperature 1: the teacher's own uncertainty)
    w_t = (H_t + eps) / (mean_t' H_t' + eps)    weighting="normalized" (default): mean weight exactly 1
        = 1 + beta * H_t                        weighting="linear"
        = 1                                     weighting="none": plain KD
    loss = temperature**2 * sum_t w_t * l_t / N

High-entropy "forking" tokens, where the teacher hesitates between continuations, count more; confident tokens count
less. With ``normalized`` the mean weight is 1 over the scored tokens of the batch, so the loss keeps the scale of
plain KD and learning rates carry over; ``eps`` keeps a batch where the teacher is certain everywhere at weight 1 (plain
KD) instead of zero. Weights are detached: they steer the student, they are not trained.

The teacher comes in one of two forms:

- full logits ``[batch, seq, vocab]`` (an online teacher);
- a top-K pair ``(indices [batch, seq, K] long/int, logits [batch, seq, K])``, e.g. from a
  :class:`~lit_prune.components.teacher_cache.TopKCache`. The teacher distribution is the softmax over its K logits
  (renormalised), ``H_t`` is its entropy, and the student's log-probabilities come from its full-vocabulary
  ``log_softmax`` gathered at those K ids, so student mass outside the K ids is penalised in the forward direction.
  The reverse direction compares the student renormalised over the same K ids (the teacher's mass outside them is
  unknown). With K = vocab both are exactly the full-logit losses.

Defaults: ``direction="forward"``, ``weighting="normalized"``, ``beta=1.0`` (used by ``linear`` only),
``temperature=1.0``, ``eps=1e-6``, ``ignore_index=-100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_prune.components.checks import check_choice
from lit_prune.components.losses import IGNORE_INDEX, Direction, kl_from_log_probs, scored_positions, token_entropy

Weighting = Literal["normalized", "linear", "none"]
Teacher = Tensor | tuple[Tensor, Tensor]


@dataclass
class KDTerms:
    """Per-token pieces of the entropy-aware KD loss, all ``[batch, seq]`` float32.

    Args:
        kl: Per-token KL at the KD temperature (not yet scaled by ``temperature**2``).
        weights: Detached per-token weights.
        entropy: Teacher entropy per token (nats, temperature 1).
        mask: True where a position is scored.
        temperature: The KD temperature used.
    """

    kl: Tensor
    weights: Tensor
    entropy: Tensor
    mask: Tensor
    temperature: float

    def loss(self) -> Tensor:
        """Weighted mean over the scored tokens, times ``temperature**2``; 0 when nothing is scored."""
        mask = self.mask.to(self.kl.dtype)
        return (self.weights * self.kl * mask).sum() / mask.sum().clamp(min=1) * self.temperature**2

    def scored_mean(self, values: Tensor) -> Tensor:
        """Mean of ``values`` over the scored tokens (for logging)."""
        mask = self.mask.to(values.dtype)
        return (values * mask).sum() / mask.sum().clamp(min=1)


def weights_from_entropy(
    entropy: Tensor, mode: Weighting = "normalized", beta: float = 1.0, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """Per-token weights from per-token teacher entropy ``[batch, seq]`` (detached, float32).

    Args:
        entropy: Teacher entropy per token, ``[batch, seq]``.
        mode: ``normalized`` = (H + eps) / (mean H + eps) over the scored tokens; ``linear`` = 1 + beta * H;
            ``none`` = 1.
        beta: Slope of the ``linear`` mode.
        mask: Scored tokens (the mean of ``normalized`` runs over them); None scores every token.
        eps: Keeps the normalized weights finite (and 1) when the teacher is certain everywhere.
    """
    check_choice(mode, Weighting, "weighting")
    entropy = entropy.detach().float()
    if mode == "none":
        return torch.ones_like(entropy)
    if mode == "linear":
        return 1.0 + beta * entropy
    if mask is None:
        mean = entropy.mean()
    else:
        m = mask.to(entropy.dtype)
        mean = (entropy * m).sum() / m.sum().clamp(min=1)
    return (entropy + eps) / (mean + eps)


def entropy_weights(
    teacher_logits: Tensor,
    mode: Weighting = "normalized",
    beta: float = 1.0,
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Per-token weights from the teacher's token entropy.

    Args:
        teacher_logits: ``[batch, seq, vocab]`` logits or log-probabilities (``log_softmax`` is idempotent), or the
            ``[batch, seq, K]`` top-K logits (the entropy is then that of the renormalised top-K distribution).
        mode: ``normalized`` (mean weight 1), ``linear`` (1 + beta * H) or ``none`` (all ones).
        beta: Slope of the ``linear`` mode.
        mask: Bool ``[batch, seq]`` of scored tokens; None scores every token.
        eps: See :func:`weights_from_entropy`.

    Returns:
        ``[batch, seq]`` float32 weights, detached.
    """
    logp = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return weights_from_entropy(entropy, mode, beta, mask, eps)


def topk_teacher(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The K largest teacher logits per position, in the compact form a cache stores.

    Args:
        logits: ``[batch, seq, vocab]``.
        k: How many token ids to keep per position (1 <= k <= vocab).

    Returns:
        ``(indices, values)``: ``[batch, seq, k]`` int32 token ids and float16 logits, largest first.
    """
    vocab = logits.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"`k` must be in [1, {vocab}] (the vocabulary size), got {k}.")
    values, indices = logits.detach().float().topk(k, dim=-1)
    return indices.to(torch.int32), values.to(torch.float16)


def _teacher_form(student_logits: Tensor, teacher: Teacher) -> tuple[Tensor | None, Tensor]:
    """Split ``teacher`` into (indices or None, logits) and check the shapes against the student's."""
    batch_seq = tuple(student_logits.shape[:2])
    if isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(f"A top-K teacher is a pair (indices, logits), got {len(teacher)} tensors.")
        indices, logits = teacher
        if indices.shape != logits.shape or tuple(indices.shape[:2]) != batch_seq:
            raise ValueError(
                f"Top-K teacher indices {tuple(indices.shape)} and logits {tuple(logits.shape)} must both be "
                f"[batch, seq, K] with [batch, seq] = {list(batch_seq)} (the student's)."
            )
        if indices.dtype.is_floating_point:
            raise ValueError(f"Top-K teacher indices must be integer token ids, got dtype {indices.dtype}.")
        return indices.long(), logits
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"Teacher logits {tuple(teacher.shape)} and student logits {tuple(student_logits.shape)} differ. KD needs "
            "the same [batch, seq, vocab]: check that teacher and student share a tokenizer and vocabulary size."
        )
    return None, teacher


def entropy_aware_kd_terms(
    student_logits: Tensor,
    teacher: Teacher,
    labels: Tensor | None = None,
    direction: Direction = "forward",
    temperature: float = 1.0,
    weighting: Weighting = "normalized",
    beta: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    eps: float = 1e-6,
) -> KDTerms:
    """Per-token KL, weights and teacher entropy; :meth:`KDTerms.loss` reduces them.

    Arguments are those of :func:`entropy_aware_kd`.
    """
    check_choice(direction, Direction, "direction")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    indices, t_logits = _teacher_form(student_logits, teacher)
    mask = scored_positions(labels, student_logits.shape[:2], ignore_index, student_logits.device)
    t_logits = t_logits.detach().float()
    with torch.no_grad():
        entropy = token_entropy(t_logits)
    logp_t = F.log_softmax(t_logits / temperature, dim=-1)
    if indices is None:
        logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    else:
        logp_s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices)
        if direction == "reverse":
            logp_s = F.log_softmax(logp_s, dim=-1)  # the student renormalised over the teacher's K ids
    kl = kl_from_log_probs(logp_t, logp_s, direction)
    weights = weights_from_entropy(entropy, weighting, beta, mask, eps)
    return KDTerms(kl=kl, weights=weights, entropy=entropy, mask=mask, temperature=float(temperature))


def entropy_aware_kd(
    student_logits: Tensor,
    teacher: Teacher,
    labels: Tensor | None = None,
    direction: Direction = "forward",
    temperature: float = 1.0,
    weighting: Weighting = "normalized",
    beta: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    eps: float = 1e-6,
) -> Tensor:
    """Token-level KD loss weighted by the teacher's per-token entropy (see the module docstring).

    Args:
        student_logits: ``[batch, seq, vocab]``.
        teacher: Full teacher logits ``[batch, seq, vocab]``, or a top-K pair ``(indices, logits)`` of shape
            ``[batch, seq, K]`` each.
        labels: ``[batch, seq]`` next-token labels aligned with the inputs; positions whose next label is
            ``ignore_index`` are not scored. None scores every position.
        direction: ``forward`` = KL(teacher || student), ``reverse`` = KL(student || teacher).
        temperature: Softens both distributions (logits / temperature); the loss is scaled by ``temperature**2``.
        weighting: ``normalized`` (default), ``linear`` or ``none`` (plain KD).
        beta: Slope of the ``linear`` weighting.
        ignore_index: Label value of unscored tokens.
        eps: Stabiliser of the ``normalized`` weights.

    Returns:
        Scalar loss (float32); 0 when no position is scored.
    """
    return entropy_aware_kd_terms(
        student_logits, teacher, labels, direction, temperature, weighting, beta, ignore_index, eps
    ).loss()
