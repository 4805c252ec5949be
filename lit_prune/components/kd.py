"""Entropy-aware adaptive knowledge distillation (E3-Pruner's recovery loss, reconstructed in methods.md §2.5).

For every scored position ``t`` (one whose next-token label is not ``ignore_index``)::

    l_t = KL(p_T(t) || p_S(t))                 forward (default); reverse = KL(p_S(t) || p_T(t))
    H_t = entropy of the teacher at position t  (at temperature 1: the teacher's own uncertainty)
    w_t = (H_t + eps) / (mean_t' H_t' + eps)    weighting="normalized" (default): mean weight exactly 1
        = 1 + beta * H_t                        weighting="linear"
        = 1                                     weighting="none": plain KD
        = n_b / m_b if t is among the m_b        weighting="student_selective" (SE-KD, see below)
          highest-student-entropy scored
          tokens of its row b, else 0
    loss = temperature**2 * sum_t w_t * l_t / N

High-entropy "forking" tokens, where the teacher hesitates between continuations, count more; confident tokens count
less. With ``normalized`` the mean weight is 1 over the scored tokens of the batch, so the loss keeps the scale of
plain KD and learning rates carry over; ``eps`` keeps a batch where the teacher is certain everywhere at weight 1 (plain
KD) instead of zero. Weights are detached: they steer the student, they are not trained.

``student_selective`` is student-entropy-guided position selection (SE-KD, Tavor et al. 2026, "Rethinking Selective
Knowledge Distillation", arXiv 2602.01395): distil only where the *student* is uncertain. The student's entropy
(temperature 1, detached) ranks the scored tokens of each row (sequence) of the batch; the top
``m_b = ceil(select_fraction * n_b)`` of its ``n_b`` scored tokens get weight ``n_b / m_b``, the rest 0, so each row's
mean weight is exactly 1 and the loss is the mean KL over the selected tokens (the scale of plain KD, as with
``normalized``). The paper keeps the top 20% (``select_fraction=0.2``, our default); ranking within each row rather
than over the whole batch is our choice (a batch of one long dull sequence and one hard one still trains on both).
``select_fraction=1`` is plain KD. It works with every teacher form (full, top-K, sparse): only the student's
logits are ranked.

The teacher comes in one of two forms:

- full logits ``[batch, seq, vocab]`` (an online teacher);
- a top-K pair ``(indices [batch, seq, K] long/int, logits [batch, seq, K])``, e.g. from a
  :class:`~lit_prune.components.teacher_cache.TopKCache`. The teacher distribution is the softmax over its K logits
  (renormalised), ``H_t`` is its entropy, and the student's log-probabilities come from its full-vocabulary
  ``log_softmax`` gathered at those K ids, so student mass outside the K ids is penalised in the forward direction.
  The reverse direction compares the student renormalised over the same K ids (the teacher's mass outside them is
  unknown). With K = vocab both are exactly the full-logit losses.

A third form, :class:`SparseTeacher` (teacher cache v2), carries teacher log-probabilities normalised over the
*full* vocabulary, so no renormalisation is needed:

- ``tail`` set (``variant="tail"``): the top-K ids plus one bucket for the teacher's remaining mass. The KL is taken
  between the K+1-bucket teacher and the student's own K+1 buckets (its probabilities at the K ids, and its mass
  outside them). It equals the full KL when the K ids cover the teacher's support, and is never larger otherwise.
  ``H_t`` is the entropy of the K+1 buckets (a lower bound on the full entropy).
- ``counts`` set (``variant="sampled"``, random-sampling KD after Anshumann et al. 2025, arXiv 2503.16870): ids drawn
  with replacement from the teacher's distribution, with counts ``c`` out of ``N`` draws.
  ``sum c/N (log p_T - log p_S)`` over the drawn ids is an unbiased estimate of the full forward KL (and its
  gradient of the full gradient); ``H_t = -sum c/N log p_T`` is an unbiased estimate of the entropy.

``sampled`` needs temperature 1 and the forward direction (the draws are from the teacher at temperature 1, and the
reverse KL needs the student's expectation, which they do not give). ``tail`` at temperature ``T`` softens the K+1
buckets of both sides, each bucket as one token.

Defaults: ``direction="forward"``, ``weighting="normalized"``, ``beta=1.0`` (used by ``linear`` only),
``select_fraction=0.2`` (used by ``student_selective`` only), ``temperature=1.0``, ``eps=1e-6``, ``ignore_index=-100``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_prune.components.checks import check_choice
from lit_prune.components.losses import IGNORE_INDEX, Direction, kl_from_log_probs, scored_positions, token_entropy

Weighting = Literal["normalized", "linear", "none", "student_selective"]


@dataclass
class SparseTeacher:
    """A teacher distribution kept at a few ids per token (teacher cache v2; see the module docstring).

    Args:
        indices: ``[batch, seq, K]`` token ids (long).
        logprobs: ``[batch, seq, K]`` teacher log-probabilities at those ids, normalised over the full vocabulary.
        tail: ``[batch, seq]`` log of the teacher's mass outside ``indices`` (top-K + tail form), or None.
        counts: ``[batch, seq, K]`` draws per id out of ``counts.sum(-1)`` (sampled form; 0 marks an empty slot).
    """

    indices: Tensor
    logprobs: Tensor
    tail: Tensor | None = None
    counts: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.tail is None) == (self.counts is None):
            raise ValueError("A SparseTeacher has exactly one of `tail` (top-K + tail) and `counts` (sampled ids).")
        if self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"SparseTeacher indices {tuple(self.indices.shape)} and logprobs {tuple(self.logprobs.shape)} differ."
            )

    def to(self, device) -> SparseTeacher:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseTeacher(move(self.indices), move(self.logprobs), move(self.tail), move(self.counts))


Teacher = Tensor | tuple[Tensor, Tensor] | SparseTeacher


def _log_one_minus_exp(log_x: Tensor) -> Tensor:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate at both ends (Maechler's two branches)."""
    a = log_x.clamp(max=-1e-30)  # a student with all its mass on the K ids has an empty tail
    return torch.where(a > -0.6931, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def sparse_kd_terms(
    student_logits: Tensor, teacher: SparseTeacher, direction: Direction = "forward", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-token KL and teacher entropy (temperature 1) ``[batch, seq]`` from a :class:`SparseTeacher`.

    With ``temperature != 1`` (top-K + tail only) both sides' K+1 buckets are softened as if each were one token,
    ``softmax(log p / T)``: exact for the full distribution when the K ids cover the teacher's support.
    """
    logp_s_all = F.log_softmax(student_logits.float(), dim=-1)
    logp_s = logp_s_all.gather(-1, teacher.indices.long())
    logp_t = teacher.logprobs.detach().float()
    if teacher.counts is not None:
        if temperature != 1.0:
            raise ValueError(
                f"Sampled teacher ids are draws at temperature 1; got `kd_temperature`={temperature}. Use 1.0, or a "
                "top-K cache (`tail` or `renormalized`) to distil at another temperature."
            )
        if direction != "forward":
            raise ValueError(
                "A sampled teacher cache gives an unbiased estimate of the forward KL only; use "
                "`kl_direction: forward`, or a top-K cache for the reverse direction."
            )
        share = teacher.counts.float() / teacher.counts.float().sum(-1, keepdim=True).clamp(min=1)
        logp_t = torch.where(share > 0, logp_t, torch.zeros_like(logp_t))  # empty slots: no term, no nan
        kl = (share * (logp_t - logp_s)).sum(-1)
        with torch.no_grad():
            entropy = -(share * logp_t).sum(-1)
        return kl, entropy
    tail_t = teacher.tail.detach().float()
    if temperature == 1.0:
        tail_s = _log_one_minus_exp(torch.logsumexp(logp_s, dim=-1))
    else:  # softening lifts a rounding-noise tail (1e-7 -> 1e-3 at T = 2.5): sum the complement exactly instead
        tail_s = torch.logsumexp(logp_s_all.scatter(-1, teacher.indices.long(), float("-inf")), dim=-1)
    buckets_t = torch.cat([logp_t, tail_t.unsqueeze(-1)], dim=-1)
    buckets_s = torch.cat([logp_s, tail_s.unsqueeze(-1)], dim=-1)
    with torch.no_grad():
        p_1 = buckets_t.exp()
        entropy = -torch.where(p_1 > 0, p_1 * buckets_t, torch.zeros_like(p_1)).sum(-1)
    if temperature != 1.0:
        buckets_t = F.log_softmax(buckets_t / temperature, dim=-1)
        buckets_s = F.log_softmax(buckets_s / temperature, dim=-1)
    p_t = buckets_t.exp()
    if direction == "forward":  # terms of a zero teacher bucket are 0 (not 0 * inf)
        kl = torch.where(p_t > 0, p_t * (buckets_t - buckets_s), torch.zeros_like(p_t)).sum(-1)
    else:
        # An empty teacher bucket would make any student mass there infinitely costly; 1e-12 bounds it.
        buckets_s = buckets_s.clamp(min=-1e4)  # an empty student bucket: 0 * finite, so no nan in the gradient
        kl = (buckets_s.exp() * (buckets_s - buckets_t.clamp(min=-27.6))).sum(-1)
    return kl, entropy


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
    if mode == "student_selective":
        raise ValueError("`weighting: student_selective` ranks the student's entropy, not the teacher's: use "
                         "`student_selective_weights` (or `entropy_aware_kd_terms`, which picks it).")
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


def check_select_fraction(select_fraction: float, key: str = "select_fraction") -> float:
    """``select_fraction`` as a float in (0, 1]; a clear error otherwise."""
    if isinstance(select_fraction, bool) or not 0 < select_fraction <= 1:
        raise ValueError(f"`{key}` must be in (0, 1] (the share of scored tokens distilled), got {select_fraction!r}.")
    return float(select_fraction)


def student_selective_weights(student_entropy: Tensor, mask: Tensor | None = None, select_fraction: float = 0.2
                              ) -> Tensor:
    """SE-KD weights: per row, ``n / m`` on the ``m = ceil(select_fraction * n)`` scored tokens of highest student
    entropy, 0 elsewhere (``n`` = the row's scored tokens), so each row's mean weight over its scored tokens is 1.

    Args:
        student_entropy: ``[batch, seq]`` student entropy per token (detached here).
        mask: Bool ``[batch, seq]`` of scored tokens; None scores every token. Unscored tokens get weight 0.
        select_fraction: Share of each row's scored tokens that is distilled, in (0, 1]; 1 = plain KD.

    Returns:
        ``[batch, seq]`` float32 weights, detached. Ties are broken by position (the earlier token first).
    """
    select_fraction = check_select_fraction(select_fraction)
    entropy = student_entropy.detach().float()
    mask = torch.ones_like(entropy, dtype=torch.bool) if mask is None else mask.to(entropy.device, torch.bool)
    # Unscored tokens rank last; a stable descending sort makes ties deterministic.
    keys = torch.where(mask, entropy, torch.full_like(entropy, float("-inf")))
    order = keys.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.size(-1), device=order.device)
                                            .expand_as(order).contiguous())
    scored = mask.sum(-1, keepdim=True)
    # ceil with a small slack so 0.2 * 10 is 2, not 3, despite float rounding
    chosen = torch.ceil(scored.double() * select_fraction - 1e-9).clamp(min=1).to(scored.dtype)
    selected = (rank < chosen) & mask
    return torch.where(selected, scored.float() / chosen.float(), torch.zeros_like(entropy))


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


def _token_weights(student_logits: Tensor, teacher_entropy: Tensor, weighting: Weighting, beta: float, mask: Tensor,
                   eps: float, select_fraction: float) -> Tensor:
    """The per-token weights of ``weighting``: from the teacher's entropy, or (SE-KD) from the student's."""
    if weighting != "student_selective":
        return weights_from_entropy(teacher_entropy, weighting, beta, mask, eps)
    with torch.no_grad():
        student_entropy = token_entropy(student_logits.detach().float())
    return student_selective_weights(student_entropy, mask, select_fraction)


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
    select_fraction: float = 0.2,
) -> KDTerms:
    """Per-token KL, weights and teacher entropy; :meth:`KDTerms.loss` reduces them.

    Arguments are those of :func:`entropy_aware_kd`.
    """
    check_choice(direction, Direction, "direction")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    mask = scored_positions(labels, student_logits.shape[:2], ignore_index, student_logits.device)
    if isinstance(teacher, SparseTeacher):
        if tuple(teacher.indices.shape[:2]) != tuple(student_logits.shape[:2]):
            raise ValueError(
                f"Sparse teacher {tuple(teacher.indices.shape)} does not match the student's [batch, seq] "
                f"{list(student_logits.shape[:2])}."
            )
        kl, entropy = sparse_kd_terms(student_logits, teacher, direction, temperature)
        weights = _token_weights(student_logits, entropy, weighting, beta, mask, eps, select_fraction)
        return KDTerms(kl=kl, weights=weights, entropy=entropy, mask=mask, temperature=float(temperature))
    indices, t_logits = _teacher_form(student_logits, teacher)
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
    weights = _token_weights(student_logits, entropy, weighting, beta, mask, eps, select_fraction)
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
    select_fraction: float = 0.2,
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
        weighting: ``normalized`` (default), ``linear``, ``none`` (plain KD) or ``student_selective`` (SE-KD: only
            the ``select_fraction`` of each row's scored tokens where the student's entropy is highest).
        beta: Slope of the ``linear`` weighting.
        ignore_index: Label value of unscored tokens.
        eps: Stabiliser of the ``normalized`` weights.
        select_fraction: Share of tokens ``student_selective`` distils, in (0, 1]; 1 is plain KD.

    Returns:
        Scalar loss (float32); 0 when no position is scored.
    """
    return entropy_aware_kd_terms(
        student_logits, teacher, labels, direction, temperature, weighting, beta, ignore_index, eps, select_fraction
    ).loss()


def sample_teacher(
    logits: Tensor, draws: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``draws`` ids per position from ``softmax(logits)`` (with replacement), merged into distinct ids + counts.

    Args:
        logits: ``[batch, seq, vocab]`` teacher logits (temperature 1).
        draws: Samples per position (1..255, counts are stored as uint8).
        generator: Seeded generator for reproducible caches.

    Returns:
        ``(indices, logprobs, counts)``, each ``[batch, seq, draws]``: distinct ids left-aligned, the teacher's
        log-probability at each, and how often it was drawn; unused slots have count 0, id 0 and log-prob 0.
    """
    if not 1 <= draws <= 255:
        raise ValueError(f"`draws` must be in [1, 255] (counts are stored as uint8), got {draws}.")
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    flat = logp.reshape(-1, logp.size(-1))
    # Inverse-CDF draws on the logits' device from uniforms of ``generator``'s device: a CPU generator gives the same
    # ids on any device (up to float rounding at bucket edges) without copying [tokens, vocab] probabilities to the CPU.
    uniform_device = generator.device if generator is not None else flat.device
    uniform = torch.rand(flat.size(0), draws, generator=generator, device=uniform_device)
    cdf = flat.exp().cumsum_(-1)
    drawn = torch.searchsorted(cdf, uniform.to(flat.device) * cdf[:, -1:], right=True).clamp_(max=flat.size(-1) - 1)
    drawn, _ = drawn.sort(dim=-1)
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(-1) - 1  # slot of each draw's distinct id
    counts = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    indices = torch.zeros_like(drawn).scatter_(1, slot, drawn)
    used = counts > 0
    indices = torch.where(used, indices, torch.zeros_like(indices))
    logprobs = torch.where(used, flat.gather(1, indices), torch.zeros_like(flat[:, :draws]))
    shape = (*logits.shape[:-1], draws)
    return indices.view(shape), logprobs.view(shape), counts.view(shape)


def topk_with_tail(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K most likely ids, their log-probabilities over the full vocabulary, and the log of the rest's mass.

    Returns:
        ``(indices [.., k] long, logprobs [.., k] float32, tail [..] float32)``; ``tail`` is ``-inf`` when the K ids
        hold all the mass.
    """
    vocab = logits.size(-1)
    if not 1 <= k <= vocab:
        raise ValueError(f"`k` must be in [1, {vocab}] (the vocabulary size), got {k}.")
    logp = F.log_softmax(logits.detach().float(), dim=-1)
    top, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, float("-inf"))
    return indices, top, torch.logsumexp(rest, dim=-1)
