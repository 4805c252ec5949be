r"""Training-free baselines that choose which decoder layers to drop from a few calibration batches.

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

The KL and perplexity selectors cost only what each mask changes. A removed layer is bypassed (its ``forward`` is
swapped for the identity), not computed and multiplied by 0; the dense state in front of a mask's first removed
layer is advanced one layer at a time and shared by every mask that starts later (windows, single-layer removals,
SLEB's candidates); the KL and cross-entropy run on the device in chunks of tokens. The values are those of gating
the layers to 0. Sharded (FSDP) models, whose layers cannot run on their own, fall back to gating.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_prune.components.bypass import can_replay as _can_replay
from lit_prune.components.bypass import fed as _fed
from lit_prune.components.bypass import forwards_replaced as _forwards_replaced
from lit_prune.components.bypass import pass_through as _pass_through
from lit_prune.components.bypass import returning as _returning
from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import decoder_layers, unwrap
from lit_prune.components.losses import Direction


@dataclass
class LayerSelection:
    """Which layers a baseline chose to drop, and why.

    Args:
        drop: Sorted 0-based indices of the layers to remove.
        scores: Per-layer importance, one value per layer (higher = more important = kept), or None where a
            per-layer score makes no sense (window methods, tail, random).
        method: Name of the selector (a key of :data:`SCORERS`).
        details: Method-specific diagnostics, e.g. the KL of every window.
    """

    drop: list[int]
    scores: list[float] | None
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def keep_mask(self, num_layers: int) -> list[bool]:
        """One bool per layer, True = keep (the input of ``LayerGating.set_mask``)."""
        dropped = set(self.drop)
        return [i not in dropped for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------------------------
# Validation and shared plumbing
# ---------------------------------------------------------------------------------------------------------------------


def candidate_layers(num_layers: int, num_drop: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Validate a drop budget against the protected layers; return the layers that may be dropped.

    Args:
        num_layers: Decoder layers of the model.
        num_drop: How many layers to drop.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.

    Raises:
        ValueError: Naming the offending argument, its value and the allowed range.
    """
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    candidates = list(range(protect_first, num_layers - protect_last))
    # At least one layer must remain, even with no protection.
    max_drop = min(len(candidates), num_layers - 1)
    if max_drop < 1:
        raise ValueError(
            f"`protect_first`={protect_first} and `protect_last`={protect_last} leave no droppable layer among the "
            f"{num_layers} decoder layers. Protect fewer layers."
        )
    if isinstance(num_drop, bool) or not isinstance(num_drop, int) or not 1 <= num_drop <= max_drop:
        raise ValueError(
            f"`num_drop` must be an integer in [1, {max_drop}] for {num_layers} decoder layers with "
            f"protect_first={protect_first} and protect_last={protect_last}, got {num_drop!r}."
        )
    return candidates


def _window_starts(num_layers: int, num_drop: int, protect_first: int, protect_last: int) -> list[int]:
    candidates = candidate_layers(num_layers, num_drop, protect_first, protect_last)
    return list(range(candidates[0], candidates[-1] - num_drop + 2))


def _check_batches(batches: Sequence[Tensor], min_seq: int = 1) -> list[Tensor]:
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty; pass at least one [batch, seq] tensor of input_ids.")
    for i, batch in enumerate(batches):
        if not torch.is_tensor(batch) or batch.dim() != 2 or batch.is_floating_point() or batch.dtype == torch.bool:
            shape = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
            raise ValueError(f"`batches[{i}]` must be a 2-D integer tensor of input_ids [batch, seq], got {shape}.")
        if batch.shape[1] < min_seq:
            raise ValueError(f"`batches[{i}]` has {batch.shape[1]} tokens per row; this method needs >= {min_seq}.")
    return batches


def _check_gating(model: nn.Module, gating: LayerGating) -> None:
    num_layers = len(decoder_layers(model))
    if gating.num_layers != num_layers:
        raise ValueError(
            f"`gating` has {gating.num_layers} gates but the model has {num_layers} decoder layers; "
            "build it with LayerGating(model) on this model."
        )


def _check_direction(direction: str) -> None:
    if direction not in ("forward", "reverse"):
        raise ValueError(f"`direction` must be 'forward' or 'reverse', got {direction!r}.")


def _model_device(model: nn.Module) -> torch.device:
    # With a device map the embedding (first parameter) is where input_ids must go.
    return next(model.parameters()).device


@contextmanager
def _scoring(model: nn.Module, gating: LayerGating | None = None) -> Iterator[None]:
    """no_grad + eval mode + gate values, all restored on exit (also on error)."""
    modes = [(module, module.training) for module in model.modules()]
    saved_gates = gating.values if gating is not None else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        # Per module, so a model that was partly in train mode comes back exactly as it was.
        for module, mode in modes:
            module.training = mode
        if gating is not None:
            gating.set(saved_gates)


def _logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    return model(input_ids=input_ids.to(_model_device(model)), use_cache=False).logits


def _run_for_hidden_states(model: nn.Module, input_ids: Tensor) -> None:
    kwargs: dict[str, Any] = {"use_cache": False}
    # Only the hooks matter here; skip the [batch, seq, vocab] LM-head output where the model allows it.
    if "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    model(input_ids=input_ids.to(_model_device(model)), **kwargs)


@contextmanager
def _layer_io(model: nn.Module, on_layer: Callable[[int, Tensor, Tensor], None]) -> Iterator[None]:
    """Call ``on_layer(index, layer_input, layer_output)`` for every decoder layer in every forward pass."""

    def hook(index: int, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        on_layer(index, hidden_in, hidden_out)
        # Returning None leaves the layer output untouched.

    handles = [
        layer.register_forward_hook(partial(hook, index), with_kwargs=True)
        for index, layer in enumerate(decoder_layers(model))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _opened(gating: LayerGating | None) -> AbstractContextManager:
    return gating.opened() if gating is not None else nullcontext()


def _lowest(scores: Sequence[float], candidates: Sequence[int], num_drop: int) -> list[int]:
    # Ties go to the earlier layer, so the result is deterministic.
    ranked = sorted(candidates, key=lambda layer: (scores[layer], layer))
    return sorted(ranked[:num_drop])


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(0, -2).float(), b.flatten(0, -2).float(), dim=-1)


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-token ``arccos(cos(a, b)) / pi`` in [0, 1], over the last dimension.

    Computed as ``2 * atan2(|u - v|, |u + v|)`` of the unit vectors, which equals the arccos form but stays exact
    near 0 (arccos of a cosine rounded to 1 - 6e-8 would already read 3e-4 rad).

    Args:
        a: Hidden states ``[..., hidden]``.
        b: Hidden states of the same shape.

    Returns:
        ``[tokens]`` float32 distances, the leading dimensions flattened.
    """
    u = F.normalize(a.flatten(0, -2).float(), dim=-1)
    v = F.normalize(b.flatten(0, -2).float(), dim=-1)
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


# ---------------------------------------------------------------------------------------------------------------------
# Replaying the decoder stack: skip removed layers, reuse the hidden states of a shared prefix
# ---------------------------------------------------------------------------------------------------------------------

# Logits elements per chunk of the KL / cross-entropy: 2^26 floats = 256 MiB of float32 per temporary.
_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // vocab)


def _kl_sum(student: Tensor, teacher: Tensor, direction: Direction) -> Tensor:
    """Sum over tokens of the token KL, a float64 scalar on the student's device.

    Both sides are normalised with the very same op (float32 ``log_softmax``), so equal logits give exactly 0. The
    work goes in chunks of tokens: no float32 copy of a whole ``[batch, seq, vocab]`` tensor, and a teacher held on
    the CPU travels to the device one chunk at a time.
    """
    if teacher.shape != student.shape:
        raise ValueError(
            f"`teacher_logits` entry of shape {tuple(teacher.shape)} does not match the model output "
            f"{tuple(student.shape)}; compute it with teacher_logits_for on the same batches."
        )
    vocab = student.shape[-1]
    student, teacher = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    rows = _chunk_rows(vocab)
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    for begin in range(0, student.shape[0], rows):
        log_q = F.log_softmax(student[begin : begin + rows].float(), dim=-1)
        log_p = F.log_softmax(teacher[begin : begin + rows].to(log_q.device, torch.float32), dim=-1)
        target, inputs = (log_p, log_q) if direction == "forward" else (log_q, log_p)
        # kl_div(input, target) = sum exp(target) * (target - input)
        total += F.kl_div(inputs, target, reduction="sum", log_target=True).double()
    return total


def _nll_sum(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy of ``[batch, seq, vocab]`` logits, a float64 scalar, in chunks of tokens."""
    targets = input_ids.to(logits.device)
    rows = _chunk_rows(logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        for begin in range(0, logits.shape[1] - 1, rows):
            end = min(begin + rows, logits.shape[1] - 1)
            chunk = logits[row, begin:end].float()
            total += F.cross_entropy(chunk, targets[row, begin + 1 : end + 1], reduction="sum").double()
    return total


class _Replay:
    """One calibration batch on one model: logits of any subset of the layers, from any hidden state.

    The model's own forward is used throughout (embeddings, masks, position embeddings, final norm, head, logit
    soft-capping stay the architecture's); layers are bypassed by swapping their ``forward`` for the identity. A
    recording pass keeps each layer's call arguments, so single layers can then be run directly to advance a prefix.

    Without replay (sharded models), ``logits`` gates the removed layers to 0 through ``gating`` and runs the full
    model, and ``layer`` does nothing: same values, today's cost.
    """

    def __init__(self, model: nn.Module, gating: LayerGating | None, input_ids: Tensor, replay: bool) -> None:
        self.model, self.gating, self.replay = model, gating, replay
        self.layers = decoder_layers(model)
        self.input_ids = input_ids.to(_model_device(model))
        self.calls: list[tuple[tuple, dict[str, Any], bool] | None] = [None] * len(self.layers)
        self.embedded: Tensor | None = None  # input of layer 0

    def _forward(self, **kwargs: Any) -> Tensor:
        return self.model(input_ids=self.input_ids, use_cache=False, **kwargs).logits

    @contextmanager
    def _recording(self) -> Iterator[None]:
        def hook(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
            if index == 0:
                self.embedded = args[0] if args else kwargs["hidden_states"]
            # The hidden state is left out: holding every layer's input would cost a whole activation per layer.
            rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            self.calls[index] = (tuple(args[1:]), rest, bool(args))

        handles = [
            layer.register_forward_pre_hook(partial(hook, index), with_kwargs=True)
            for index, layer in enumerate(self.layers)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def dense_logits(self) -> Tensor:
        """Logits of the dense model (gates open), recording the layers' call arguments on the way."""
        if not self.replay:
            return self._forward()
        with self._recording():
            return self._forward()

    def record(self) -> None:
        """Record the layers' call arguments with a pass that computes no layer (and, where possible, no head)."""
        if not self.replay:
            return
        kwargs: dict[str, Any] = {}
        if "logits_to_keep" in inspect.signature(unwrap(self.model).forward).parameters:
            kwargs["logits_to_keep"] = 1
        with self._recording(), _forwards_replaced(self.layers, dict.fromkeys(range(len(self.layers)), _pass_through)):
            self._forward(**kwargs)

    def layer(self, index: int, hidden: Tensor | None) -> Tensor | None:
        """Output of layer ``index`` for input ``hidden`` (after :meth:`record` or :meth:`dense_logits`)."""
        if not self.replay:
            return None
        args, kwargs, positional = self.calls[index]
        layer = self.layers[index]
        output = layer(hidden, *args, **kwargs) if positional else layer(*args, hidden_states=hidden, **kwargs)
        if not torch.is_tensor(output):
            raise TypeError(
                f"Decoder layer {index} ({type(layer).__name__}) returned {type(output).__name__}, not a tensor; "
                "the scorers replay layers of transformers >= 5, whose decoder layers return the hidden state."
            )
        return output

    def logits(self, skip: Iterable[int] = (), start: int = 0, hidden: Tensor | None = None) -> Tensor:
        """Logits with the layers in ``skip`` removed, where ``hidden`` is the state entering layer ``start``.

        Layers before ``start`` are not run (``hidden`` already holds their effect); ``hidden=None`` starts from
        the embeddings.
        """
        skip = set(skip)
        if not self.replay:
            self.gating.set_mask([i not in skip for i in range(len(self.layers))])
            try:
                return self._forward()
            finally:
                self.gating.set(None)
        forwards: dict[int, Callable[..., Any]] = {i: _pass_through for i in skip}
        if hidden is not None:
            first = next((i for i in range(start, len(self.layers)) if i not in skip), len(self.layers))
            forwards.update(dict.fromkeys(range(first), _pass_through))
            if first < len(self.layers):
                forwards[first] = _fed(self.layers[first].forward, hidden)
            else:  # every remaining layer is removed: the head reads `hidden`
                forwards[first - 1] = _returning(hidden)
        with _forwards_replaced(self.layers, forwards):
            return self._forward()


# ---------------------------------------------------------------------------------------------------------------------
# Output KL (the search objective) and the KL-based selectors
# ---------------------------------------------------------------------------------------------------------------------


def teacher_logits_for(model: nn.Module, gating: LayerGating, batches: Sequence[Tensor]) -> list[Tensor]:
    """Dense-model logits of every calibration batch, to reuse across many :func:`output_kl` calls.

    They are stored as float32 on the CPU, one ``[batch, seq, vocab]`` tensor per batch (``4 * tokens * vocab``
    bytes in all: 1 GiB for 5k tokens of a 50k vocabulary), so keep calibration sets small. Raw logits rather than
    log-probs, so that :func:`output_kl` normalises teacher and student with the very same op and open gates give
    a KL of exactly 0. The selectors below do not need them: they compute each batch's teacher on the device.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks; they are opened, so the teacher is the dense model.
        batches: Calibration input_ids, each ``[batch, seq]``.
    """
    batches = _check_batches(batches)
    _check_gating(model, gating)
    with _scoring(model, gating), gating.opened():
        return [_logits(model, ids).float().cpu() for ids in batches]


def _check_teacher(teacher_logits: list[Tensor] | None, batches: list[Tensor]) -> None:
    if teacher_logits is not None and len(teacher_logits) != len(batches):
        raise ValueError(f"`teacher_logits` has {len(teacher_logits)} entries for {len(batches)} batches.")


def _removed(keep_mask: Tensor | Sequence[bool], num_layers: int) -> set[int]:
    keep = torch.as_tensor(keep_mask)
    if tuple(keep.shape) != (num_layers,) or not bool(((keep == 0) | (keep == 1)).all()):
        raise ValueError(f"`keep_mask` must hold {num_layers} booleans (True = keep the layer), got {keep_mask!r}.")
    return {i for i, value in enumerate(keep.tolist()) if not value}


def output_kl(
    model: nn.Module,
    gating: LayerGating,
    batches: Sequence[Tensor],
    keep_mask: Tensor | Sequence[bool] | None,
    teacher_logits: list[Tensor] | None = None,
    direction: Direction = "forward",
) -> float:
    """Mean per-token KL between the dense model and the model with the layers of ``keep_mask`` removed.

    ``forward`` is ``KL(dense || masked)``, ``reverse`` is ``KL(masked || dense)``. The mean is over every token of
    every batch (batches weigh by their token count). Removed layers are bypassed, not computed; the same values
    as gating them to 0. Each batch is compared on its own, on the model's device, in chunks of tokens.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        keep_mask: One bool per layer (True = keep), or None for the dense model (KL 0).
        teacher_logits: Output of :func:`teacher_logits_for` for the same batches (computed per batch if None).
        direction: ``forward`` or ``reverse`` KL.

    Returns:
        The mean token KL in nats.
    """
    _check_direction(direction)
    batches = _check_batches(batches)
    _check_gating(model, gating)
    _check_teacher(teacher_logits, batches)
    removed = set() if keep_mask is None else _removed(keep_mask, gating.num_layers)
    replay = _can_replay(model)
    total, tokens = 0.0, 0
    with _scoring(model, gating):
        gating.set(None)
        for index, ids in enumerate(batches):
            run = _Replay(model, gating, ids, replay)
            teacher = run.dense_logits() if teacher_logits is None else teacher_logits[index]
            student = run.logits(removed) if removed or teacher_logits is not None else teacher
            total += _kl_sum(student, teacher, direction).item()
            tokens += student.shape[0] * student.shape[1]
    return total / tokens


def _mean_kl_per_mask(
    model: nn.Module,
    gating: LayerGating,
    batches: list[Tensor],
    removed_sets: Sequence[Sequence[int]],
    direction: Direction,
    teacher_logits: list[Tensor] | None,
) -> list[float]:
    """:func:`output_kl` of many masks, each a set of removed layers, sharing one pass over the batches.

    Per batch: one dense pass (the teacher, and each layer's call arguments), then the masks in order of their
    first removed layer. The dense prefix in front of that layer is advanced one layer at a time and reused, so a
    mask costs only the layers after its first removed one (and the head).
    """
    replay = _can_replay(model)
    order = sorted(range(len(removed_sets)), key=lambda m: min(removed_sets[m]))
    sums: list[list[Tensor]] = [[] for _ in removed_sets]
    tokens = 0
    with _scoring(model, gating):
        gating.set(None)
        for index, ids in enumerate(batches):
            run = _Replay(model, gating, ids, replay)
            if teacher_logits is None:
                teacher = run.dense_logits()
            else:
                teacher = teacher_logits[index]
                run.record()
            hidden, at = run.embedded, 0
            for mask in order:
                first = min(removed_sets[mask])
                while at < first:  # the dense state entering layer `first`
                    hidden, at = run.layer(at, hidden), at + 1
                student = run.logits(removed_sets[mask], start=first, hidden=hidden)
                sums[mask].append(_kl_sum(student, teacher, direction))
                del student
            tokens += ids.numel()
    # One host sync per mask, at the end; batches add up in order, as a sum of per-batch floats.
    return [sum(value.item() for value in per_batch) / tokens for per_batch in sums]


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

    This is the exact optimum of the single-segment search objective. Per batch it costs one dense pass plus, for
    the window starting at ``s``, only the layers after the window: the window is bypassed and the dense state
    entering ``s`` is reused from the previous window.

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        num_drop: Width of the window to drop.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
        direction: ``forward`` or ``reverse`` KL.
        teacher_logits: Precomputed :func:`teacher_logits_for` output (each batch's teacher is computed on the
            device if None).

    Returns:
        The best window; ``details["window_kl"]`` maps every start to its KL.
    """
    _check_direction(direction)
    _check_gating(model, gating)
    num_layers = gating.num_layers
    starts = _window_starts(num_layers, num_drop, protect_first, protect_last)
    batches = _check_batches(batches)
    _check_teacher(teacher_logits, batches)
    windows = [range(start, start + num_drop) for start in starts]
    values = _mean_kl_per_mask(model, gating, batches, windows, direction, teacher_logits)
    window_kl = dict(zip(starts, values))
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

    Layer ``l`` costs the layers after it (the dense prefix is shared, see :func:`window_scan`).

    Args:
        model: A causal LM of a supported architecture.
        gating: The model's gating hooks.
        batches: Calibration input_ids, each ``[batch, seq]``.
        direction: ``forward`` or ``reverse`` KL.
        teacher_logits: Precomputed :func:`teacher_logits_for` output (computed per batch on the device if None).

    Returns:
        One KL per layer (higher = more important).
    """
    _check_direction(direction)
    _check_gating(model, gating)
    batches = _check_batches(batches)
    _check_teacher(teacher_logits, batches)
    return _mean_kl_per_mask(model, gating, batches, [[layer] for layer in range(gating.num_layers)], direction,
                             teacher_logits)


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


def block_influence(
    model: nn.Module,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int = 0,
    gating: LayerGating | None = None,
) -> LayerSelection:
    """ShortGPT: drop the layers that change their hidden state least.

    ``BI_l = 1 - mean_t cos(h_l, h_{l+1})`` with ``h_l`` / ``h_{l+1}`` the raw input / output of layer ``l``
    (hooks, see the module docstring), averaged over every token of every batch.

    Args:
        model: A causal LM of a supported architecture.
        batches: Calibration input_ids, each ``[batch, seq]``.
        num_drop: How many layers to drop (the lowest BI, not necessarily contiguous).
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
        gating: Gating hooks attached to the model, if any; they are opened so the dense model is scored.

    Returns:
        The selection, with ``scores`` = BI per layer.
    """
    layers = decoder_layers(model)
    candidates = candidate_layers(len(layers), num_drop, protect_first, protect_last)
    batches = _check_batches(batches)
    totals: list[Tensor | float] = [0.0] * len(layers)
    tokens = 0

    def on_layer(index: int, hidden_in: Tensor, hidden_out: Tensor) -> None:
        totals[index] = totals[index] + (1 - _cosine(hidden_in, hidden_out)).double().sum()

    with _scoring(model, gating), _opened(gating), _layer_io(model, on_layer):
        for ids in batches:
            _run_for_hidden_states(model, ids)
            tokens += ids.numel()
    scores = [float(total) / tokens for total in totals]
    return LayerSelection(
        drop=_lowest(scores, candidates, num_drop),
        scores=scores,
        method="block_influence",
        details={"num_tokens": tokens},
    )


def angular_distance_window(
    model: nn.Module,
    batches: Sequence[Tensor],
    num_drop: int,
    protect_first: int = 0,
    protect_last: int = 0,
    gating: LayerGating | None = None,
) -> LayerSelection:
    """Gromov et al.: drop the contiguous window whose input and output are closest in angle.

    For window ``[s, s+n)``: ``d(s) = mean_t arccos(cos(x_s, y_{s+n-1})) / pi`` where ``x_s`` is the raw input of
    layer ``s`` and ``y_{s+n-1}`` the raw output of layer ``s+n-1`` (``hidden_states[s]`` and ``hidden_states[s+n]``
    without the final norm HF applies to the last entry). Only the inputs of the last ``n`` layers are held at a time.

    Args:
        model: A causal LM of a supported architecture.
        batches: Calibration input_ids, each ``[batch, seq]``.
        num_drop: Window width ``n``.
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
        gating: Gating hooks attached to the model, if any; they are opened so the dense model is scored.

    Returns:
        The window of smallest distance; ``details["window_distance"]`` maps every start to its distance.
    """
    num_layers = len(decoder_layers(model))
    starts = _window_starts(num_layers, num_drop, protect_first, protect_last)
    batches = _check_batches(batches)
    totals: dict[int, Tensor | float] = {start: 0.0 for start in starts}
    window_inputs: dict[int, Tensor] = {}
    tokens = 0

    def on_layer(index: int, hidden_in: Tensor, hidden_out: Tensor) -> None:
        if index in totals:
            window_inputs[index] = hidden_in
        start = index - num_drop + 1  # the window that ends at this layer
        if start in window_inputs:
            # Popped: no later window starts at `start`, and this frees the activation early.
            totals[start] = totals[start] + angular_distance(window_inputs.pop(start), hidden_out).double().sum()

    with _scoring(model, gating), _opened(gating), _layer_io(model, on_layer):
        for ids in batches:
            _run_for_hidden_states(model, ids)
            tokens += ids.numel()
    distance = {start: float(total) / tokens for start, total in totals.items()}
    best = min(starts, key=lambda s: (distance[s], s))
    return LayerSelection(
        drop=list(range(best, best + num_drop)),
        scores=None,
        method="angular",
        details={"window_distance": distance, "best_distance": distance[best]},
    )


# ---------------------------------------------------------------------------------------------------------------------
# SLEB (progressive perplexity)
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
            nll += _nll_sum(_logits(model, ids), ids).item()
            tokens += ids.shape[0] * (ids.shape[1] - 1)
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

    Step ``k`` evaluates every remaining unprotected layer. Removed layers are bypassed, and the candidates of a
    step are visited in layer order: the state entering candidate ``c`` (with the layers removed so far) is advanced
    one layer at a time and shared, so candidate ``c`` costs only the layers after it (and the head).

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
    replay = _can_replay(model)
    tokens = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    order: list[int] = []
    ppl_after: list[float] = []
    candidate_ppl: list[dict[int, float]] = []
    with _scoring(model, gating):
        gating.set(None)
        dense_ppl = calibration_ppl(model, batches)
        for _ in range(num_drop):
            removed = set(order)
            nll: dict[int, list[Tensor]] = {layer: [] for layer in candidates if layer not in removed}
            last = max(nll)
            for ids in batches:
                run = _Replay(model, gating, ids, replay)
                run.record()
                hidden = run.embedded
                for layer in range(last + 1):
                    if layer in nll:
                        logits = run.logits(removed | {layer}, start=layer, hidden=hidden)
                        nll[layer].append(_nll_sum(logits, run.input_ids))
                        del logits
                    if layer < last and layer not in removed:
                        hidden = run.layer(layer, hidden)
            step = {layer: math.exp(sum(v.item() for v in per_batch) / tokens) for layer, per_batch in nll.items()}
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


def drop_tail(num_layers: int, num_drop: int, protect_last: int = 1, protect_first: int = 0) -> LayerSelection:
    """Reverse-order baseline: the ``num_drop`` layers right before the ``protect_last`` final layer(s).

    Args:
        num_layers: Decoder layers of the model.
        num_drop: How many layers to drop.
        protect_last: Final layers kept (1 by default: the last layer writes the output distribution).
        protect_first: Leading layers that are never dropped.
    """
    candidate_layers(num_layers, num_drop, protect_first, protect_last)
    end = num_layers - protect_last
    return LayerSelection(
        drop=list(range(end - num_drop, end)), scores=None, method="tail", details={"protect_last": protect_last}
    )


def random_layers(
    num_layers: int, num_drop: int, seed: int = 0, protect_first: int = 0, protect_last: int = 0
) -> LayerSelection:
    """Uniformly random unprotected layers; the same seed always gives the same layers.

    Args:
        num_layers: Decoder layers of the model.
        num_drop: How many layers to drop.
        seed: Seed of a private generator (the global RNG is untouched).
        protect_first: Leading layers that are never dropped.
        protect_last: Trailing layers that are never dropped.
    """
    candidates = candidate_layers(num_layers, num_drop, protect_first, protect_last)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(candidates), generator=generator)[:num_drop].tolist()
    return LayerSelection(
        drop=sorted(candidates[i] for i in picks), scores=None, method="random", details={"seed": seed}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Uniform interface
# ---------------------------------------------------------------------------------------------------------------------

# (model, gating, batches, num_drop, protect_first, protect_last, seed) -> LayerSelection
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
