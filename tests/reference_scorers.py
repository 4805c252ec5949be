r"""Frozen copy of ``lit_prune/components/scorers.py`` before the replaying fast path (commit d3e8a5c), for tests.

Every mask is gated (a removed layer is computed, then multiplied by 0), every window re-runs its prefix, and the
teacher is a float32 CPU copy moved to the device per window. Tests compare the library against it: identical masks,
values within 1e-4. Do not edit except to follow renamed imports. The helpers and the
hidden-state scorers (block influence, angular) were not changed by the rewrite: they are imported, not copied.

Training-free baselines that choose which decoder layers to drop from a few calibration batches.

Every selector returns a :class:`LayerSelection` (sorted ``drop``, optional per-layer ``scores`` where higher means
more important, the ``method`` name and method-specific ``details``). All of them run under ``torch.no_grad()``, put
the model in eval mode for the duration of the call and restore every module's previous mode, and leave a
:class:`~lit_prune.components.gating.LayerGating` exactly as they found it. ``protect_first`` / ``protect_last``
layers are never dropped.

Selectors (``SCORERS`` name: rule)::

    block_influence  ShortGPT: BI_l = 1 - E_t cos(h_l, h_{l+1}); drop the lowest-BI layers (any positions)
    angular          Gromov et al.: the window [s, s+n) of smallest E_t arccos(cos(h_s, h_{s+n})) / pi
    sleb             SLEB: greedily remove the layer whose extra removal gives the lowest calibration ppl
    tail             reverse-order: the last num_drop layers before the protected final layer(s)
    random           uniform over the unprotected layers, seeded
    window_scan      exact optimum of the single-window objective: min output KL(dense || pruned)
    kl_importance    per-layer KL(dense || dense without l); drop the lowest (any positions)

Hidden states are captured with forward hooks on the decoder layers (raw layer input and output), not taken from
``output_hidden_states=True``: Hugging Face replaces the last entry of ``hidden_states`` with the *final-normed*
output for most architectures (Llama, GPT-2, OPT, Gemma, NeoX, ...), and the norm's per-channel weight (and, for
LayerNorm, centring and bias) changes the direction, so the last layer and every window ending there would be
mis-measured::

    output_hidden_states=True:  h_0     h_1     ...  h_{L-1}     norm(h_L)
    hooks (used here):          in_0    in_1    ...  in_{L-1}    out_{L-1} = h_L
                                (in_{l+1} = out_l: decoder layers are chained directly)

If gates of a :class:`LayerGating` are attached to the model, pass the gating object to the hidden-state scorers:
they open its gates so that the dense model is scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import decoder_layers
from lit_prune.components.losses import Direction
from lit_prune.components.scorers import (  # unchanged by the rewrite: shared, not copied
    LayerSelection,
    _check_batches,
    _check_direction,
    _check_gating,
    _logits,
    _lowest,
    _scoring,
    _window_starts,
    angular_distance_window,
    block_influence,
    candidate_layers,
    drop_tail,
    random_layers,
)


def teacher_logits_for(model: nn.Module, gating: LayerGating, batches: Sequence[Tensor]) -> list[Tensor]:
    """Dense-model logits of every calibration batch, to reuse across many :func:`output_kl` calls.

    They are stored as float32 on the CPU, one ``[batch, seq, vocab]`` tensor per batch (``4 * tokens * vocab``
    bytes in all: 1 GiB for 5k tokens of a 50k vocabulary), so keep calibration sets small. Raw logits rather than
    log-probs, so that :func:`output_kl` normalises teacher and student with the very same op and open gates give
    a KL of exactly 0.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks; they are opened, so the teacher is the dense model.
        batches: Calibration input_ids, each ``[batch, seq]``.
    """
    batches = _check_batches(batches)
    _check_gating(model, gating)
    with _scoring(model, gating), gating.opened():
        return [_logits(model, ids).float().cpu() for ids in batches]


def output_kl(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    keep_mask: Tensor | Sequence[bool] | None,
    teacher_logits: list[Tensor] | None = None,
    direction: Direction = "forward",
) -> float:
    """Mean per-token KL between the dense model and the model with ``keep_mask`` applied through the gates.

    ``forward`` is ``KL(dense || masked)``, ``reverse`` is ``KL(masked || dense)``. The mean is over every token of
    every batch (batches weigh by their token count). Each batch is compared on its own, so peak memory is one
    batch of logits.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        keep_mask: One bool per layer (True = keep), or None for the dense model (KL 0).
        teacher_logits: Output of :func:`teacher_logits_for` for the same batches (computed here if None).
        direction: ``forward`` or ``reverse`` KL.

    Returns:
        The mean token KL in nats.
    """
    _check_direction(direction)
    batches = _check_batches(batches)
    _check_gating(model, gating)
    if teacher_logits is None:
        teacher_logits = teacher_logits_for(model, gating, batches)
    if len(teacher_logits) != len(batches):
        raise ValueError(f"`teacher_logits` has {len(teacher_logits)} entries for {len(batches)} batches.")
    total, tokens = 0.0, 0
    with _scoring(model, gating):
        if keep_mask is None:
            gating.set(None)
        else:
            gating.set_mask(keep_mask)
        for ids, teacher in zip(batches, teacher_logits):
            student = F.log_softmax(_logits(model, ids).float(), dim=-1)
            if teacher.shape != student.shape:
                raise ValueError(
                    f"`teacher_logits` entry of shape {tuple(teacher.shape)} does not match the model output "
                    f"{tuple(student.shape)}; compute it with teacher_logits_for on the same batches."
                )
            teacher = F.log_softmax(teacher.to(student.device, torch.float32), dim=-1)
            target, inputs = (teacher, student) if direction == "forward" else (student, teacher)
            # kl_div(input, target) = sum exp(target) * (target - input)
            total += F.kl_div(inputs, target, reduction="sum", log_target=True).item()
            tokens += student.shape[0] * student.shape[1]
    return total / tokens


def window_scan(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int = 0,
    direction: Direction = "forward",
    teacher_logits: list[Tensor] | None = None,
) -> LayerSelection:
    """Evaluate :func:`output_kl` for every contiguous window of ``num_drop`` layers and keep the best.

    This is the exact optimum of the single-segment search objective (at the cost of one pass over the
    calibration batches per window).

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        num_drop: Width of the window to drop.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
        direction: ``forward`` or ``reverse`` KL.
        teacher_logits: Precomputed :func:`teacher_logits_for` output (computed here if None).

    Returns:
        The best window; ``details["window_kl"]`` maps every start to its KL.
    """
    _check_direction(direction)
    _check_gating(model, gating)
    num_layers = gating.num_layers
    starts = _window_starts(num_layers, num_drop, protect_first, protect_last)
    batches = _check_batches(batches)
    if teacher_logits is None:
        teacher_logits = teacher_logits_for(model, gating, batches)
    window_kl: dict[int, float] = {}
    for start in starts:
        keep = [not start <= i < start + num_drop for i in range(num_layers)]
        window_kl[start] = output_kl(model, gating, batches, keep, teacher_logits, direction)
    best = min(starts, key=lambda s: (window_kl[s], s))
    return LayerSelection(
        drop=list(range(best, best + num_drop)),
        scores=None,
        method="window_scan",
        details={"window_kl": window_kl, "best_kl": window_kl[best], "direction": direction},
    )


def kl_importance(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    direction: Direction = "forward",
    teacher_logits: list[Tensor] | None = None,
) -> list[float]:
    """Per-layer importance: the output KL of the dense model against the dense model without that one layer.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        direction: ``forward`` or ``reverse`` KL.
        teacher_logits: Precomputed :func:`teacher_logits_for` output (computed here if None).

    Returns:
        One KL per layer (higher = more important).
    """
    _check_direction(direction)
    _check_gating(model, gating)
    batches = _check_batches(batches)
    if teacher_logits is None:
        teacher_logits = teacher_logits_for(model, gating, batches)
    num_layers = gating.num_layers
    return [
        output_kl(model, gating, batches, [i != layer for i in range(num_layers)], teacher_logits, direction)
        for layer in range(num_layers)
    ]


def kl_importance_selection(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int = 0,
    direction: Direction = "forward",
    teacher_logits: list[Tensor] | None = None,
) -> LayerSelection:
    """Drop the ``num_drop`` unprotected layers of lowest :func:`kl_importance` (one-shot, non-contiguous).

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        num_drop: How many layers to drop.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
        direction: ``forward`` or ``reverse`` KL.
        teacher_logits: Precomputed :func:`teacher_logits_for` output (computed here if None).
    """
    _check_gating(model, gating)
    candidates = candidate_layers(gating.num_layers, num_drop, protect_first, protect_last)
    scores = kl_importance(model, gating, batches, direction, teacher_logits)
    return LayerSelection(
        drop=_lowest(scores, candidates, num_drop),
        scores=scores,
        method="kl_importance",
        details={"direction": direction},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Hidden-state selectors (ShortGPT, Gromov et al.)
# ---------------------------------------------------------------------------------------------------------------------


def calibration_ppl(model: nn.Module, batches: Sequence[Tensor]) -> float:
    """Perplexity of next-token prediction over every token of every batch, in the model's current (gated) state.

    Args:
        model: A causal LM.
        batches: Calibration input_ids, each ``[batch, seq]`` with ``seq >= 2``.
    """
    batches = _check_batches(batches, min_seq=2)
    nll, tokens = 0.0, 0
    with _scoring(model):
        for ids in batches:
            logits = _logits(model, ids)[:, :-1].float()
            targets = ids[:, 1:].to(logits.device)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            tokens += targets.numel()
    return math.exp(nll / tokens)


def sleb(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int = 0,
) -> LayerSelection:
    """SLEB: remove layers one at a time, each time the one whose extra removal keeps calibration ppl lowest.

    Removed layers are gated to 0; step ``k`` evaluates every remaining unprotected layer (``O(num_drop * L)``
    passes over the calibration batches).

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]`` with ``seq >= 2``.
        num_drop: How many layers to remove.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.

    Returns:
        The selection. ``details`` holds ``order`` (removal order), ``ppl`` (after each removal), ``dense_ppl`` and
        ``candidate_ppl`` (per step, layer -> ppl). ``scores`` encode only the order: the layer removed at step
        ``k`` scores ``k - num_drop`` (first removed is lowest), kept layers score 0.
    """
    _check_gating(model, gating)
    num_layers = gating.num_layers
    candidates = candidate_layers(num_layers, num_drop, protect_first, protect_last)
    batches = _check_batches(batches, min_seq=2)
    order: list[int] = []
    ppl_after: list[float] = []
    candidate_ppl: list[dict[int, float]] = []
    with _scoring(model, gating):
        gating.set(None)
        dense_ppl = calibration_ppl(model, batches)
        for _ in range(num_drop):
            step: dict[int, float] = {}
            for layer in candidates:
                if layer in order:
                    continue
                removed = {*order, layer}
                gating.set_mask([i not in removed for i in range(num_layers)])
                step[layer] = calibration_ppl(model, batches)
            chosen = min(step, key=lambda layer: (step[layer], layer))
            order.append(chosen)
            ppl_after.append(step[chosen])
            candidate_ppl.append(step)
    scores = [0.0] * num_layers
    for k, layer in enumerate(order):
        scores[layer] = float(k - num_drop)
    return LayerSelection(
        drop=sorted(order),
        scores=scores,
        method="sleb",
        details={"order": order, "ppl": ppl_after, "dense_ppl": dense_ppl, "candidate_ppl": candidate_ppl},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Data-free selectors
# ---------------------------------------------------------------------------------------------------------------------


Scorer = Callable[[nn.Module, LayerGating, Sequence[Tensor], int, int, int, int], LayerSelection]


def _score_block_influence(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return block_influence(model, batches, num_drop, protect_first, protect_last, gating=gating)


def _score_angular(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return angular_distance_window(model, batches, num_drop, protect_first, protect_last, gating=gating)


def _score_sleb(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return sleb(model, gating, batches, num_drop, protect_first, protect_last)


def _score_tail(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return drop_tail(len(decoder_layers(model)), num_drop, protect_last=protect_last, protect_first=protect_first)


def _score_random(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return random_layers(len(decoder_layers(model)), num_drop, seed, protect_first, protect_last)


def _score_window_scan(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return window_scan(model, gating, batches, num_drop, protect_first, protect_last)


def _score_kl_importance(model, gating, batches, num_drop, protect_first, protect_last, seed):
    return kl_importance_selection(model, gating, batches, num_drop, protect_first, protect_last)


SCORERS: dict[str, Scorer] = {
    "block_influence": _score_block_influence,
    "angular": _score_angular,
    "sleb": _score_sleb,
    "tail": _score_tail,
    "random": _score_random,
    "window_scan": _score_window_scan,
    "kl_importance": _score_kl_importance,
}

# Used when `score(protect_last=None)`: the reverse-order baseline keeps the final layer.
DEFAULT_PROTECT_LAST: dict[str, int] = {"tail": 1}


def score(
    name: str,
    model: nn.Module,
    gating: LayerGating | None,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int | None = None,
    seed: int = 0,
) -> LayerSelection:
    """Run the baseline ``name`` through one signature (what a config or CLI calls).

    Args:
        name: A key of :data:`SCORERS`.
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks, or None to attach temporary ones (removed afterwards) where needed.
        batches: Calibration input_ids, each ``[batch, seq]`` (ignored by ``tail`` and ``random``).
        num_drop: How many layers to drop.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped; None = the method's default (1 for ``tail``, else 0).
        seed: Seed for ``random`` (ignored by the deterministic methods).
    """
    if name not in SCORERS:
        raise ValueError(f"Unknown scorer {name!r}. Choose one of: {', '.join(SCORERS)}.")
    if protect_last is None:
        protect_last = DEFAULT_PROTECT_LAST.get(name, 0)
    temporary = gating is None and name in ("sleb", "window_scan", "kl_importance")
    if temporary:
        gating = LayerGating(model)
    try:
        return SCORERS[name](model, gating, batches, num_drop, protect_first, protect_last, seed)
    finally:
        if temporary:
            gating.remove()
