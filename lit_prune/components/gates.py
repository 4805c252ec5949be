r"""Learnable per-layer gates that decide which decoder layers to remove.

A gate owns only its own parameters and returns values ``g`` of shape ``[num_layers]`` in [0, 1]
(1 = keep the layer, 0 = layer removed); the mask-search stage scales each layer's residual update by ``g_l``.

``ConcaveGate`` (CLP) learns where a contiguous block of ``num_drop`` layers sits. Each segment k is a soft notch
with a learnable start ``s_k`` and a fixed width ``n_k``::

    notch_k(l) = (1 - exp(-n_k / T)) * sigmoid((c_l - s_k) / T) * sigmoid((s_k + n_k - c_l) / T),   c_l = l + 0.5
               = sigmoid((c_l - s_k) / T) - sigmoid((c_l - s_k - n_k) / T)
    g_l        = 1 - sum_k notch_k(l)

      g
     1 _____________                        _____________   T -> 0: vertical edges (the hard mask)
                    \                      /                larger T: edges spread over a few layers,
     0               \____________________/                 which is where the gradient w.r.t. s_k lives
       0 1 ...      s_k                s_k + n_k       L-1   layer l (centre c_l = l + 0.5)
       |<-protect_first|   segments live here   |protect_last->|

The notch is the product-of-sigmoids notch of the CLP reconstruction rescaled by ``1 - exp(-n_k / T)`` (a constant,
1 in the ``T -> 0`` limit). The rescaling makes the notch a difference of two shifted sigmoids, whose sum over all
integer layers telescopes to exactly ``n_k``: with fixed widths ``sum_l (1 - g_l) = num_drop`` at *every* temperature
(up to notch mass leaking past layer 0 or L-1 when ``T`` is comparable to the distance to the ends), so no rate penalty
is needed. The plain product form overshoots by ``n_k * exp(-n_k / T)`` per segment (+0.3 layers for ``n_k = 2`` at
``T = 1``). Segments are kept ordered and non-overlapping, so ``sum_k notch_k <= 1`` and summing them (instead of
multiplying per-segment gates) adds no cross terms; two touching segments are exactly one notch of the summed width.

``GumbelTopKGate`` (E3-Pruner) learns one logit per layer. Training draws a Gumbel-TopK sample: the forward pass is
an exact k-hot mask of ``(logits + gumbel) / T``, the backward pass is the gradient of a soft top-k
(straight-through). ``k`` (layers dropped now) is raised from 0 to ``num_drop`` by a curriculum callback.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_prune.components.samplers import gumbel_noise, hard_topk_mask, relaxed_topk, straight_through_topk


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    # Forward is exactly `hard`; backward is the gradient of `soft`.
    return hard + (soft - soft.detach())


def _check_protected(num_layers: int, num_drop: int, protect_first: int, protect_last: int) -> None:
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0, got {value}.")
    if protect_first + num_drop + protect_last > num_layers:
        raise ValueError(
            f"`protect_first` ({protect_first}) + `num_drop` ({num_drop}) + `protect_last` ({protect_last}) = "
            f"{protect_first + num_drop + protect_last} exceeds the {num_layers} decoder layers. "
            "Lower num_drop or the number of protected layers."
        )


class LayerGate(nn.Module, ABC):
    """Common interface of the per-layer gates used by the mask-search stage and the callbacks.

    Args:
        num_layers: Number of decoder layers of the model being pruned.
        num_drop: How many decoder layers the final mask removes.
        temperature: Initial relaxation temperature (> 0); a schedule callback usually drives it during fit.
    """

    def __init__(self, num_layers: int, num_drop: int, temperature: float = 1.0) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
            raise ValueError(
                f"`num_layers` must be an integer >= 2 (one layer is dropped, one kept), got {num_layers}."
            )
        if isinstance(num_drop, bool) or not isinstance(num_drop, int) or not 1 <= num_drop <= num_layers - 1:
            raise ValueError(
                f"`num_drop` must be in [1, {num_layers - 1}] for a model with {num_layers} decoder layers, "
                f"got {num_drop}. Lower the pruning ratio or num_drop."
            )
        self.num_layers = num_layers
        self.num_drop = num_drop
        self._temperature = self._check_temperature(temperature)

    @staticmethod
    def _check_temperature(value: float) -> float:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {value}.")
        return value

    @property
    def temperature(self) -> float:
        """Relaxation temperature (> 0); smaller values give sharper, more binary gates."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = self._check_temperature(value)

    @abstractmethod
    def forward(self) -> Tensor:
        """Gate values ``[num_layers]`` in [0, 1]; differentiable w.r.t. the gate's parameters.

        Train mode gives the soft or stochastic training gate, eval mode a deterministic one.
        """

    @abstractmethod
    def hard_mask(self) -> Tensor:
        """Final binarised decision, bool ``[num_layers]`` (True = keep), with exactly ``num_drop`` False values."""

    @abstractmethod
    def keep_probabilities(self) -> Tensor:
        """Detached, deterministic float ``[num_layers]`` in [0, 1] for monitoring (e.g. heat-maps)."""

    def drop_indices(self) -> list[int]:
        """Sorted 0-based indices of the layers the hard mask removes."""
        return [int(i) for i in torch.nonzero(~self.hard_mask()).flatten().tolist()]

    def scores(self) -> list[float] | None:
        """Per-layer importance (higher = more important), or None when the method has no such ranking."""
        return None

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, num_drop={self.num_drop}, temperature={self.temperature:g}"


class ConcaveGate(LayerGate):
    """CLP's differentiable concave gate: learn where contiguous block(s) of layers are cut.

    Segment widths are fixed (``num_drop`` split as evenly as possible, larger widths first), so only the starts are
    learned. Segments stay inside ``[protect_first, num_layers - protect_last]`` and keep their order; they may touch
    (then they act as one longer block) but never overlap. Call ``clamp_()`` after each optimizer step to project the
    starts back onto that feasible set (Euclidean projection: with one segment a clamp, with several an isotonic fit
    of the slack between segments, so colliding segments are pushed apart symmetrically); ``forward`` applies the same
    projection, so it is always within bounds.

    In train mode ``forward`` returns the soft notch at the current temperature. In eval mode it returns the hard
    mask (the ``T -> 0`` limit, with the starts rounded) while keeping the soft notch's gradient (straight-through).

    Args:
        num_layers: Number of decoder layers of the model being pruned.
        num_drop: How many decoder layers the final mask removes (the summed segment width).
        temperature: Initial edge softness in layers (> 0); anneal it towards ~0.05 during the search.
        num_segments: Number of contiguous segments to cut; each drops at least one layer.
        protect_first: Leading layers that are never cut.
        protect_last: Trailing layers that are never cut.
        init_starts: Initial segment starts (in layers, ascending); default spreads the segments evenly.
    """

    def __init__(
        self,
        num_layers: int,
        num_drop: int,
        temperature: float = 1.0,
        num_segments: int = 1,
        protect_first: int = 1,
        protect_last: int = 1,
        init_starts: Sequence[float] | None = None,
    ) -> None:
        super().__init__(num_layers, num_drop, temperature)
        _check_protected(num_layers, num_drop, protect_first, protect_last)
        if isinstance(num_segments, bool) or not isinstance(num_segments, int) or not 1 <= num_segments <= num_drop:
            raise ValueError(
                f"`num_segments` must be in [1, {num_drop}] (each segment drops at least one of the num_drop="
                f"{num_drop} layers), got {num_segments}."
            )
        self.num_segments = num_segments
        self.protect_first = protect_first
        self.protect_last = protect_last
        base, extra = divmod(num_drop, num_segments)
        self.widths: list[int] = [base + (1 if k < extra else 0) for k in range(num_segments)]
        # Offsets map starts s_k to slack coordinates u_k = s_k - offset_k, in which the constraints read
        # 0 <= u_0 <= u_1 <= ... <= u_{K-1} <= free (ordered, non-overlapping, inside the allowed range).
        offsets = [protect_first + sum(self.widths[:k]) for k in range(num_segments)]
        self._free = num_layers - protect_last - protect_first - num_drop
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=torch.float32), persistent=False)
        self.register_buffer("_widths", torch.tensor(self.widths, dtype=torch.float32), persistent=False)
        self.register_buffer("_centers", torch.arange(num_layers, dtype=torch.float32) + 0.5, persistent=False)

        if init_starts is None:
            slack = [self._free * (k + 1) / (num_segments + 1) for k in range(num_segments)]
            starts = [u + o for u, o in zip(slack, offsets)]
        else:
            starts = self._check_init_starts(init_starts, offsets)
        self.starts = nn.Parameter(torch.tensor(starts, dtype=torch.float32))

    def _check_init_starts(self, init_starts: Sequence[float], offsets: list[int]) -> list[float]:
        starts = [float(s) for s in init_starts]
        if len(starts) != self.num_segments:
            raise ValueError(
                f"`init_starts` must have num_segments={self.num_segments} values, got {len(starts)}: {starts}."
            )
        slack = [s - o for s, o in zip(starts, offsets)]
        ordered = all(a <= b for a, b in zip(slack, slack[1:]))
        if not all(math.isfinite(s) for s in starts) or not ordered or slack[0] < 0 or slack[-1] > self._free:
            ranges = ", ".join(f"[{o}, {o + self._free}]" for o in offsets)
            raise ValueError(
                f"`init_starts` {starts} do not fit: segment starts must lie in {ranges} (widths {self.widths}, "
                f"protect_first={self.protect_first}, protect_last={self.protect_last}) and each segment must start "
                "at or after the end of the previous one."
            )
        return starts

    def _project(self, starts: Tensor) -> Tensor:
        """Euclidean projection of the starts onto the feasible set (differentiable where it is the identity)."""
        u = starts - self._offsets
        if self.num_segments > 1:
            u = _isotonic(u)
        return u.clamp(0.0, float(self._free)) + self._offsets

    @torch.no_grad()
    def clamp_(self) -> ConcaveGate:
        """Project the starts in place onto the feasible set; call after each optimizer step."""
        self.starts.copy_(self._project(self.starts))
        return self

    def _soft(self) -> Tensor:
        s = self._project(self.starts)[:, None]  # [num_segments, 1]
        c = self._centers[None, :]  # [1, num_layers]
        t = self.temperature
        n = self._widths[:, None]
        # Product form of sigmoid(a) - sigmoid(a - n / t): same value, no cancellation when both saturate.
        notch = -torch.expm1(-n / t) * torch.sigmoid((c - s) / t) * torch.sigmoid((s + n - c) / t)
        # The sum is <= 1 for ordered, non-overlapping segments; clamp only absorbs float rounding.
        return (1.0 - notch.sum(dim=0)).clamp(0.0, 1.0)

    def _rounded_starts(self) -> list[int]:
        # Rounding is monotone and the slack bound `free` is an integer, so rounded starts stay feasible.
        return [math.floor(s + 0.5) for s in self._project(self.starts.detach()).tolist()]

    def segments(self) -> list[tuple[int, int]]:
        """Hard segments as ``[start, end)`` pairs in layer indices, one per segment, in ascending order."""
        return [(s, s + n) for s, n in zip(self._rounded_starts(), self.widths)]

    def hard_mask(self) -> Tensor:
        """Keep mask bool ``[num_layers]``: layers ``[round(s_k), round(s_k) + n_k)`` are False."""
        mask = torch.ones(self.num_layers, dtype=torch.bool, device=self.starts.device)
        for start, end in self.segments():
            mask[start:end] = False
        return mask

    @torch.no_grad()
    def set_starts_(self, starts: Sequence[int]) -> ConcaveGate:
        """Place the segments at integer ``starts`` (e.g. a window scan's optimum, or a refined mask)."""
        offsets = [int(o) for o in self._offsets.tolist()]
        self.starts.copy_(torch.tensor(self._check_init_starts(starts, offsets), dtype=self.starts.dtype))
        return self

    def forward(self) -> Tensor:
        """Gate values ``[num_layers]``: soft notch in train mode, hard notch (straight-through) in eval mode."""
        soft = self._soft()
        if self.training:
            return soft
        return _straight_through(self.hard_mask().to(soft.dtype), soft)

    @torch.no_grad()
    def keep_probabilities(self) -> Tensor:
        """Soft notch at the current temperature, detached, ``[num_layers]``."""
        return self._soft().detach()

    def scores(self) -> None:
        """None: a notch position is not a per-layer importance ranking (see ``keep_probabilities``)."""
        return None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_segments={self.num_segments}, widths={self.widths}, "
            f"protect_first={self.protect_first}, protect_last={self.protect_last}"
        )


def _isotonic(u: Tensor) -> Tensor:
    """Non-decreasing least-squares fit of a 1-D tensor (pool adjacent violators), differentiable in ``u``.

    The pooling pattern is computed on host values (the vectors are tiny); the pooled means keep the graph, so
    colliding segments share their gradient and move together.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for value in u.detach().tolist():
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    if len(blocks) == u.numel():
        return u
    group = torch.tensor([g for g, (_, count) in enumerate(blocks) for _ in range(int(count))], device=u.device)
    sums = torch.zeros(len(blocks), dtype=u.dtype, device=u.device).index_add(0, group, u)
    counts = torch.tensor([count for _, count in blocks], dtype=u.dtype, device=u.device)
    return (sums / counts)[group]


def logits_from_importance(importance: Sequence[float], scale: float = 1.0, eps: float = 1e-8) -> Tensor:
    """Map per-layer importances (e.g. the output KL when a layer is skipped) to initial keep-logits.

    ``logits = scale * standardize(log(importance + eps))``: a log scale because importances span orders of
    magnitude, standardised so that ``scale`` alone sets how strongly the initial ranking resists the unit-scale
    Gumbel noise.

    Args:
        importance: Non-negative importance per layer ``[num_layers]``; higher = more important (keep).
        scale: Standard deviation of the resulting logits.
        eps: Added before the log so that zero importances stay finite.

    Returns:
        Float32 logits ``[num_layers]`` with mean 0 and standard deviation ``scale`` (all zeros if constant).
    """
    values = torch.as_tensor(list(importance), dtype=torch.float64)
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"`importance` must be a non-empty 1-D sequence, got shape {tuple(values.shape)}.")
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"`importance` must be finite and >= 0, got {values.tolist()}.")
    if eps <= 0:
        raise ValueError(f"`eps` must be > 0, got {eps}.")
    logs = torch.log(values + eps)
    std = logs.std(unbiased=False)
    centred = logs - logs.mean()
    standardized = centred / std if std > 0 else torch.zeros_like(centred)
    return (scale * standardized).to(torch.float32)


class GumbelTopKGate(LayerGate):
    """E3-Pruner's Gumbel-TopK layer mask with a straight-through backward.

    One logit per layer (larger = keep). In train mode ``forward`` samples an exact k-hot keep mask of
    ``(logits + gumbel) / temperature`` that drops ``k`` layers, with the gradient of a soft top-k. In eval mode it
    drops the ``k`` lowest logits without noise (same straight-through gradient). ``hard_mask`` always drops
    ``num_drop`` layers. Protected layers are excluded from the ranking: they are always kept and do not count
    against ``k`` (equivalent to giving them +inf logits, without inf arithmetic).

    ``init_logits`` expects logits, not raw importances. To start from KL importances ``I_l`` use
    ``GumbelTopKGate(L, n, init_logits=logits_from_importance(I, scale=2.0).tolist())``.

    Args:
        num_layers: Number of decoder layers of the model being pruned.
        num_drop: How many decoder layers the final mask removes; the curriculum target for ``k``.
        temperature: Initial temperature dividing ``logits + gumbel`` (> 0); anneal it during the search.
        init_logits: Initial keep-logits ``[num_layers]``; zeros (uniform sampling) when omitted.
        init_scale: Multiplier applied to ``init_logits``; larger makes the initial ranking harder to overturn.
        protect_first: Leading layers that are always kept.
        protect_last: Trailing layers that are always kept.
    """

    logits_from_importance = staticmethod(logits_from_importance)

    def __init__(
        self,
        num_layers: int,
        num_drop: int,
        temperature: float = 1.0,
        init_logits: Sequence[float] | None = None,
        init_scale: float = 1.0,
        protect_first: int = 0,
        protect_last: int = 0,
    ) -> None:
        super().__init__(num_layers, num_drop, temperature)
        _check_protected(num_layers, num_drop, protect_first, protect_last)
        if not math.isfinite(init_scale):
            raise ValueError(f"`init_scale` must be finite, got {init_scale}.")
        if init_logits is None:
            logits = torch.zeros(num_layers)
        else:
            logits = torch.as_tensor(list(init_logits), dtype=torch.float32)
            if tuple(logits.shape) != (num_layers,) or not torch.isfinite(logits).all():
                raise ValueError(
                    f"`init_logits` must be {num_layers} finite values (one per decoder layer), "
                    f"got {logits.numel()}: {logits.tolist()}. Map importances with logits_from_importance()."
                )
        self.protect_first = protect_first
        self.protect_last = protect_last
        self.logits = nn.Parameter(init_scale * logits)
        self._k = num_drop

    @property
    def k(self) -> int:
        """How many layers the training gate drops now, in [0, num_drop]; raised by a curriculum callback."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or not 0 <= value <= self.num_drop:
            raise ValueError(f"`k` must be an integer in [0, num_drop={self.num_drop}], got {value}.")
        self._k = int(value)

    @property
    def k_target(self) -> int:
        """Final number of dropped layers (``num_drop``)."""
        return self.num_drop

    @property
    def _free(self) -> slice:
        return slice(self.protect_first, self.num_layers - self.protect_last)

    def _with_protected(self, free_values: Tensor) -> Tensor:
        """Embed values of the unprotected layers into ``[num_layers]``, with 1 (keep) for protected ones."""
        ones_first = free_values.new_ones(self.protect_first)
        ones_last = free_values.new_ones(self.protect_last)
        return torch.cat([ones_first, free_values, ones_last])

    def _num_free(self) -> int:
        return self.num_layers - self.protect_first - self.protect_last

    def forward(self, generator: torch.Generator | None = None) -> Tensor:
        """Keep mask ``[num_layers]`` with exactly ``k`` zeros and a straight-through gradient to the logits.

        Args:
            generator: Optional generator for the Gumbel noise (train mode); the global RNG is used when None.
        """
        logits = self.logits[self._free]
        if self.training:
            logits = logits + gumbel_noise(logits, generator=generator)
        z = logits / self.temperature
        return self._with_protected(straight_through_topk(z, self._num_free() - self.k))

    def hard_mask(self) -> Tensor:
        """Keep mask bool ``[num_layers]``: the ``num_drop`` lowest unprotected logits are False (no noise)."""
        keep = hard_topk_mask(self.logits.detach()[self._free], self._num_free() - self.num_drop)
        return self._with_protected(keep).bool()

    @torch.no_grad()
    def keep_probabilities(self) -> Tensor:
        """Soft top-k of ``logits / temperature`` at the current ``k`` (no noise), detached, ``[num_layers]``."""
        z = self.logits.detach()[self._free] / self.temperature
        return self._with_protected(relaxed_topk(z, self._num_free() - self.k))

    @torch.no_grad()
    def set_drop_(self, drop: Sequence[int], margin: float = 1e-3) -> GumbelTopKGate:
        """Move the fewest logits so that ``hard_mask`` drops exactly ``drop`` (e.g. a refined mask).

        Dropped layers whose logit is not already below every kept logit are lowered to just below the smallest kept
        one, so the ranking among the other layers, and the learned logits of agreeing layers, stay as they were.
        """
        drop = sorted(int(i) for i in drop)
        free = range(self.protect_first, self.num_layers - self.protect_last)
        if len(drop) != self.num_drop or not set(drop) <= set(free):
            raise ValueError(
                f"`drop` must list num_drop={self.num_drop} distinct unprotected layers in [{free.start}, "
                f"{free.stop}), got {drop}."
            )
        kept = [i for i in free if i not in drop]
        floor = self.logits[kept].min() if kept else self.logits.new_tensor(0.0)
        for layer in drop:
            if self.logits[layer] >= floor:
                self.logits[layer] = floor - margin * (1 + abs(float(floor)))
        return self

    def scores(self) -> list[float]:
        """The keep-logits as a list (higher = more important)."""
        return [float(x) for x in self.logits.detach().tolist()]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, k={self.k}, protect_first={self.protect_first}, protect_last={self.protect_last}"
        )
