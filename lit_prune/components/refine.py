"""Discrete refinement of a layer mask on calibration data: greedy removal, candidate selection, local search.

A learned gate ends in one hard mask, but the objective over masks is multimodal and the gradient only sees a
relaxation of it. These helpers work on the discrete objective itself: ``objective(drop) -> float`` maps a set of
dropped layers to a loss (the calibration KL of that mask, lower is better). They are pure Python over that callable,
so they are cheap to test with synthetic objectives; :func:`mask_kl_objective` builds the real one from a gated model.

- :func:`greedy_removal` removes layers one at a time, each time the one whose extra removal hurts least (SLEB's
  recipe with the search's own KL objective); it initialises E3's logits with layer interactions taken into account.
- :func:`best_of` picks the lowest-loss mask among candidates (the learned mask, its initialisation, masks sampled in
  the last steps).
- :func:`swap_search` (any masks) and :func:`shift_search` (contiguous segments of fixed widths) move to the best
  neighbouring mask while the loss improves.

Every function is deterministic: ties go to the lexicographically smallest drop list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from lit_prune.components.gating import LayerGating
from lit_prune.components.losses import Direction
from lit_prune.components.scorers import _mean_kl_per_mask

Drop = tuple[int, ...]

# ``refine_radius: auto`` swaps any pair while one round costs at most this many mask evaluations (SmolLM2 8 of 30:
# 160; Gemma 3 5 of 18: 55; a 32-layer 8B model at 8: 192), else keeps swaps within ``AUTO_FALLBACK_RADIUS`` layers
# (a 64-layer 32B model at 16 of 64: 736 pairs, 128 with the radius). A cost cap, not a tuned quality setting.
AUTO_MAX_ANY_PAIR_SWAPS = 256
AUTO_FALLBACK_RADIUS = 2


def auto_swap_radius(num_drop: int, num_candidates: int) -> int | None:
    """The swap radius of ``refine_radius: auto``: ``None`` (any pair) when a round is affordable, else 2."""
    any_pair = num_drop * max(num_candidates - num_drop, 0)
    return None if any_pair <= AUTO_MAX_ANY_PAIR_SWAPS else AUTO_FALLBACK_RADIUS


class MemoObjective:
    """Cache an objective over drop sets; counts the distinct masks evaluated (the cost of a refinement).

    Args:
        objective: Loss of one drop set.
        many: Optional loss of several drop sets in one call (e.g. sharing the dense prefix between masks); used by
            :meth:`many` for the masks not yet cached.
    """

    def __init__(
        self,
        objective: Callable[[Drop], float] | None = None,
        many: Callable[[list[Drop]], list[float]] | None = None,
    ) -> None:
        if objective is None and many is None:
            raise ValueError("Give `objective`, `many`, or both.")
        self._objective = objective if objective is not None else (lambda drop: many([drop])[0])
        self._many = many
        self._values: dict[Drop, float] = {}

    @staticmethod
    def _key(drop: Iterable[int]) -> Drop:
        return tuple(sorted(int(i) for i in drop))

    def __call__(self, drop: Iterable[int]) -> float:
        key = self._key(drop)
        if key not in self._values:
            self._values[key] = float(self._objective(key))
        return self._values[key]

    def many(self, drops: Iterable[Iterable[int]]) -> list[float]:
        """Losses of several drop sets; the uncached ones are evaluated together."""
        keys = [self._key(d) for d in drops]
        todo = list(dict.fromkeys(k for k in keys if k not in self._values))
        if todo:
            values = self._many(todo) if self._many is not None else [self._objective(k) for k in todo]
            self._values.update(zip(todo, (float(v) for v in values)))
        return [self._values[k] for k in keys]

    @property
    def evaluations(self) -> int:
        """Number of distinct masks evaluated so far."""
        return len(self._values)


def _values(objective: Callable[[Drop], float], drops: list[Drop]) -> list[float]:
    # One call for the whole list when the objective can share work between masks.
    return objective.many(drops) if isinstance(objective, MemoObjective) else [objective(d) for d in drops]


def _best(objective: Callable[[Drop], float], drops: Iterable[Drop]) -> tuple[Drop, float]:
    unique = sorted({tuple(sorted(d)) for d in drops})
    if not unique:
        raise ValueError("No candidate mask to choose from.")
    value, drop = min(zip(_values(objective, unique), unique))
    return drop, value


def best_of(objective: Callable[[Drop], float], candidates: Iterable[Sequence[int]]) -> tuple[Drop, float]:
    """The candidate drop list with the lowest objective (ties: smallest list), and its value."""
    return _best(objective, (tuple(sorted(int(i) for i in c)) for c in candidates))


def greedy_removal(
    objective: Callable[[Drop], float], candidates: Sequence[int], num_drop: int
) -> tuple[list[int], list[float]]:
    """Remove ``num_drop`` of ``candidates`` one at a time, each step the layer whose removal keeps the loss lowest.

    Costs about ``num_drop * len(candidates)`` objective evaluations.

    Returns:
        ``(order, loss_after)``: the layers in removal order and the loss after each removal.
    """
    if not 1 <= num_drop <= len(candidates):
        raise ValueError(f"`num_drop` must be in [1, {len(candidates)}] (the candidate layers), got {num_drop}.")
    order: list[int] = []
    losses: list[float] = []
    for _ in range(num_drop):
        options = [(*order, layer) for layer in candidates if layer not in order]
        drop, value = _best(objective, options)
        order.append(next(layer for layer in drop if layer not in order))
        losses.append(value)
    return order, losses


def greedy_importance(
    objective: Callable[[Drop], float], candidates: Sequence[int], num_drop: int, num_layers: int
) -> list[float]:
    """Per-layer importance from :func:`greedy_removal` (higher = keep), consistent with its removal order.

    A removed layer scores the loss right after its removal (increasing with the order); every other candidate scores
    the loss of removing it on top of all ``num_drop`` removed ones, which is at least the last removal's loss, so the
    ``num_drop`` lowest importances are exactly the greedy mask. Non-candidates (protected layers) score the maximum.
    """
    order, losses = greedy_removal(objective, candidates, num_drop)
    importance = [0.0] * num_layers
    for layer, loss in zip(order, losses):
        importance[layer] = loss
    rest = [layer for layer in candidates if layer not in order]
    for layer, loss in zip(rest, _values(objective, [(*order, layer) for layer in rest])):
        importance[layer] = max(loss, losses[-1])
    top = max(importance)
    for layer in range(num_layers):
        if layer not in candidates:
            importance[layer] = top
    return importance


def swap_search(
    objective: Callable[[Drop], float],
    drop: Sequence[int],
    candidates: Sequence[int],
    radius: int | None = None,
    max_rounds: int = 10,
) -> tuple[Drop, float, int]:
    """Best-improvement local search: swap one dropped with one kept candidate while the loss goes down.

    Args:
        objective: Loss of a drop set (lower is better); wrap it in :class:`MemoObjective` to avoid re-evaluation.
        drop: Starting drop list (its size is kept).
        candidates: Layers that may be dropped (protected layers excluded).
        radius: Only swap layers at most this far apart (``None``: any pair). A small radius keeps a round at about
            ``2 * radius * len(drop)`` evaluations.
        max_rounds: Upper bound on improving moves.

    Returns:
        ``(drop, loss, rounds)``: the local optimum, its loss and the number of improving moves taken.
    """
    current = tuple(sorted(int(i) for i in drop))
    if not set(current) <= set(candidates):
        raise ValueError(f"Drop list {list(current)} contains layers outside the candidates {list(candidates)}.")
    value = objective(current)
    for rounds in range(max_rounds):
        kept = [c for c in candidates if c not in current]
        moves = [
            tuple(sorted((*(d for d in current if d != out), into)))
            for out in current
            for into in kept
            if radius is None or abs(out - into) <= radius
        ]
        if not moves:
            return current, value, rounds
        best, best_value = _best(objective, moves)
        if not best_value < value:
            return current, value, rounds
        current, value = best, best_value
    return current, value, max_rounds


def shift_search(
    objective: Callable[[Drop], float],
    starts: Sequence[int],
    widths: Sequence[int],
    low: int,
    high: int,
    max_rounds: int = 10,
) -> tuple[list[int], float, int]:
    """Local search over contiguous segments of fixed widths: move one segment start by one layer while it helps.

    Segments stay ordered, non-overlapping and inside ``[low, high)``.

    Returns:
        ``(starts, loss, rounds)``.
    """

    def drop_of(s: Sequence[int]) -> Drop:
        return tuple(sorted(i for start, width in zip(s, widths) for i in range(start, start + width)))

    def feasible(s: Sequence[int]) -> bool:
        ends = [a + w for a, w in zip(s, widths)]
        return s[0] >= low and ends[-1] <= high and all(e <= b for e, b in zip(ends, s[1:]))

    current = [int(s) for s in starts]
    if not feasible(current):
        raise ValueError(f"Segment starts {current} with widths {list(widths)} do not fit in [{low}, {high}).")
    value = objective(drop_of(current))
    for rounds in range(max_rounds):
        moves = []
        for k in range(len(current)):
            for step in (-1, 1):
                moved = list(current)
                moved[k] += step
                if feasible(moved):
                    moves.append(moved)
        if not moves:
            return current, value, rounds
        by_drop = {drop_of(m): m for m in moves}
        best_drop, best_value = _best(objective, by_drop)
        best = by_drop[best_drop]
        if not best_value < value:
            return current, value, rounds
        current, value = best, best_value
    return current, value, max_rounds


def mask_kl_objective(
    model: nn.Module, gating: LayerGating, batches: Sequence[torch.Tensor], direction: Direction = "forward"
) -> MemoObjective:
    """The search's own objective on fixed calibration batches: mean token KL(dense || model without ``drop``).

    Masks asked for together share one pass over ``batches`` (the dense prefix in front of each mask's first removed
    layer is computed once); removed layers are skipped, not computed.
    """

    def many(drops: list[Drop]) -> list[float]:
        values = [0.0] * len(drops)
        todo = [i for i, d in enumerate(drops) if d]
        if todo:
            kls = _mean_kl_per_mask(model, gating, list(batches), [drops[i] for i in todo], direction, None)
            for i, kl in zip(todo, kls):
                values[i] = kl
        return values

    return MemoObjective(many=many)
