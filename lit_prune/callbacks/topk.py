"""Anneal an integer budget of the LightningModule (e.g. how many layers a Gumbel-TopK gate drops now)."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks.step_schedule import StepSchedule
from lit_prune.components.checks import check_choice
from lit_prune.components.schedules import anneal_int, staircase

TopKMode = Literal["linear", "cosine", "step"]


class TopKAnnealing(StepSchedule):
    """Anneal the integer ``pl_module.<attr>`` from ``start`` to ``end``, then hold ``end`` (a top-k curriculum).

    The budget moves over the first ``warmup_fraction`` of the training steps and is set at the start of every
    training batch from ``trainer.global_step``, so resumed runs match uninterrupted ones. The module needs a settable
    integer attribute ``attr``. ``end`` defaults to the module's ``<attr>_target`` (e.g. ``k_target``), so the target
    is written once, in the module's config; an explicit ``end`` that disagrees with it is an error.

    Args:
        start: Budget at the first step.
        end: Budget reached at the end of the warm-up and held afterwards; default reads ``pl_module.<attr>_target``.
        warmup_fraction: Fraction of the training steps over which the budget moves; in (0, 1].
        mode: Curve from ``start`` to ``end``: ``linear``, ``cosine`` or ``step`` (``steps`` equal jumps).
        steps: Number of equal jumps from ``start`` to ``end`` in ``step`` mode.
        attr: Name of the module attribute to drive.
        total_steps: Steps the training spans; default reads ``trainer.estimated_stepping_batches`` at fit start.
        log: Log the budget as ``schedule/<attr>`` every step.
    """

    def __init__(
        self,
        start: int = 0,
        end: int | None = None,
        warmup_fraction: float = 0.5,
        mode: TopKMode = "linear",
        steps: int = 4,
        attr: str = "k",
        total_steps: int | None = None,
        log: bool = True,
    ) -> None:
        if start < 0:
            raise ValueError(f"`TopKAnnealing(start=...)` must be >= 0, got start={start}.")
        if end is not None and end < 0:
            raise ValueError(f"`TopKAnnealing(end=...)` must be >= 0 or None, got end={end}.")
        if not 0.0 < warmup_fraction <= 1.0:
            raise ValueError(
                f"`TopKAnnealing(warmup_fraction=...)` must be in (0, 1], got warmup_fraction={warmup_fraction}."
            )
        check_choice(mode, TopKMode, "TopKAnnealing(mode=...)")
        if steps < 1:
            raise ValueError(f"`TopKAnnealing(steps=...)` must be >= 1, got steps={steps}.")
        super().__init__(attr=attr, total_steps=total_steps, log=log)
        self.start = int(start)
        self.end = None if end is None else int(end)
        self.warmup_fraction = float(warmup_fraction)
        self.mode = mode
        self.steps = int(steps)
        self._end: int | None = self.end

    @property
    def target_attr(self) -> str:
        """Name of the module attribute that holds the final budget."""
        return f"{self.attr}_target"

    @property
    def resolved_end(self) -> int | None:
        """The budget the schedule ends on: ``end``, or the module's ``<attr>_target`` once set up."""
        return self._end

    def value_at(self, step: int) -> int:
        """Scheduled budget at optimizer step ``step`` (0-based)."""
        if self._horizon is None or self._end is None:
            raise RuntimeError("`TopKAnnealing.value_at` needs the horizon and the end, known from `on_fit_start` on.")
        # The warm-up covers steps 0 .. span; `end` is reached on step `span` and held afterwards.
        span = max(round(self.warmup_fraction * self._horizon) - 1, 1)
        progress = min(step / span, 1.0)
        if self.mode == "step":
            return anneal_int(self.start, self._end, staircase(progress, self.steps), "linear")
        return anneal_int(self.start, self._end, progress, self.mode)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(pl_module).__name__
        self.check_attribute(pl_module, "budget")
        target = getattr(pl_module, self.target_attr, None)
        if self.end is None:
            if target is None:
                raise AttributeError(
                    f"`TopKAnnealing(end=None)` reads the final budget from `{name}.{self.target_attr}`, which is "
                    f"missing or None. Give the module a `{self.target_attr}` or pass `end` explicitly."
                )
            self._end = int(target)
        elif target is not None and int(target) != self.end:
            raise ValueError(
                f"`TopKAnnealing(end={self.end})` ends off target: `{name}.{self.target_attr}` is {int(target)}. "
                f"Drop `end` to use the module's target, or make the two agree."
            )
        else:
            self._end = self.end

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "horizon": self._horizon,
            "end": self._end,
            "last_value": self._last_value,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if state_dict["end"] is not None and self._end is not None and state_dict["end"] != self._end:
            rank_zero_warn(
                f"`TopKAnnealing(attr={self.attr!r})` was saved ending on {state_dict['end']}, this run ends on "
                f"{self._end}; using {self._end}."
            )
