"""Annealing curves: the one place where schedule math lives.

Every curve maps ``progress`` in [0, 1] to a value between ``start`` and ``end``, is monotone, and returns exactly
``start`` at progress 0 and exactly ``end`` at progress 1 (``constant`` excepted, which holds ``start``)::

    value
    start *--..
          |     ``-._            cosine: slow - fast - slow
          |          ``-.        linear: straight line
          |              `-._    exp:    geometric, equal ratios per step (temperatures)
    end   +-------------------*
          0                   1  progress

Pure Python; callbacks turn ``trainer.global_step`` into ``progress`` and call these.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from lit_prune.components.checks import check_choice

AnnealMode = Literal["linear", "cosine", "exp", "constant"]
ANNEAL_MODES: tuple[str, ...] = get_args(AnnealMode)


def _clamp_progress(progress: float) -> float:
    progress = float(progress)
    if math.isnan(progress):
        raise ValueError("`progress` must be a number in [0, 1], got nan.")
    return min(max(progress, 0.0), 1.0)


def anneal(start: float, end: float, progress: float, mode: AnnealMode) -> float:
    """Value of an annealing curve from ``start`` to ``end`` at ``progress``.

    Args:
        start: Value at progress 0.
        end: Value at progress 1.
        progress: Fraction of the schedule done; clamped to [0, 1].
        mode: Curve shape: ``linear``, ``cosine`` (half cosine), ``exp`` (geometric, needs ``start, end > 0``) or
            ``constant`` (always ``start``; turns a schedule off without removing it).

    Returns:
        The annealed value.

    Raises:
        ValueError: On an unknown ``mode``, a nan ``progress``, or ``exp`` with a non-positive ``start``/``end``.
    """
    check_choice(mode, ANNEAL_MODES, "mode")
    if mode == "exp" and (start <= 0 or end <= 0):
        raise ValueError(
            f"`mode='exp'` interpolates geometrically and needs `start > 0` and `end > 0`, got start={start}, "
            f"end={end}. Use mode='linear' or 'cosine' for values that reach 0."
        )
    p = _clamp_progress(progress)
    if mode == "constant":
        return float(start)
    # Exact end points, so `value == end` holds at the last step despite float rounding inside the curves.
    if p == 0.0:
        return float(start)
    if p == 1.0:
        return float(end)
    if mode == "linear":
        return start + (end - start) * p
    if mode == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
    return start * (end / start) ** p


def anneal_int(start: int, end: int, progress: float, mode: AnnealMode = "linear") -> int:
    """Integer version of :func:`anneal`, e.g. for a top-k budget.

    The float curve is rounded half up, so the result is monotone in ``progress`` and equals ``end`` exactly at
    progress 1 (``start`` at progress 0).

    Args:
        start: Value at progress 0.
        end: Value at progress 1.
        progress: Fraction of the schedule done; clamped to [0, 1].
        mode: Curve shape, as in :func:`anneal`.

    Returns:
        The annealed integer.
    """
    return int(math.floor(anneal(float(start), float(end), progress, mode) + 0.5))


def staircase(progress: float, steps: int) -> float:
    """Quantise ``progress`` into ``steps`` equal jumps, for step-wise schedules.

    ``staircase(p, 4)`` is 0 on [0, 0.25), 0.25 on [0.25, 0.5), ..., 0.75 on [0.75, 1) and 1 at 1, so a schedule fed
    with it changes value ``steps`` times and reaches its end only at progress 1.

    Args:
        progress: Fraction of the schedule done; clamped to [0, 1].
        steps: Number of jumps; at least 1.

    Returns:
        The quantised progress in [0, 1].
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}.")
    p = _clamp_progress(progress)
    return math.floor(p * steps) / steps
