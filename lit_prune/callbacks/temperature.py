"""Anneal a float attribute of the LightningModule (a gate or KD temperature) over the training steps."""

from __future__ import annotations

from typing import Literal

import lightning as L
from typing_extensions import override

from lit_prune.callbacks.step_schedule import StepSchedule
from lit_prune.components.checks import check_choice
from lit_prune.components.schedules import anneal

TemperatureMode = Literal["linear", "cosine", "exp"]


class TemperatureSchedule(StepSchedule):
    """Anneal ``pl_module.<attr>`` from ``start`` to ``end`` over the training steps.

    The value is set at the start of every training batch from ``trainer.global_step``, so a resumed run sees exactly
    the values of an uninterrupted one. The first optimizer step sees ``start`` and the last one sees ``end``. The
    module only needs a settable attribute (a plain attribute or a property) named ``attr``; two instances with
    different ``attr`` can run side by side (e.g. a gate temperature and a KD temperature).

    Args:
        start: Value at the first step; must be > 0.
        end: Value at the last step; must be > 0.
        mode: Curve between ``start`` and ``end``: ``exp`` (geometric), ``linear`` or ``cosine``.
        attr: Name of the module attribute to drive.
        warmup_fraction: Fraction of the steps that hold ``start`` before annealing begins; in [0, 1).
        total_steps: Steps the schedule spans; default reads ``trainer.estimated_stepping_batches`` at fit start.
        log: Log the value as ``schedule/<attr>`` every step.
    """

    def __init__(
        self,
        start: float = 1.0,
        end: float = 0.05,
        mode: TemperatureMode = "exp",
        attr: str = "temperature",
        warmup_fraction: float = 0.0,
        total_steps: int | None = None,
        log: bool = True,
    ) -> None:
        if not start > 0:
            raise ValueError(f"`TemperatureSchedule(start=...)` must be > 0, got start={start}.")
        if not end > 0:
            raise ValueError(f"`TemperatureSchedule(end=...)` must be > 0, got end={end}.")
        check_choice(mode, TemperatureMode, "TemperatureSchedule(mode=...)")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"`TemperatureSchedule(warmup_fraction=...)` must be in [0, 1), got warmup_fraction={warmup_fraction}."
            )
        super().__init__(attr=attr, total_steps=total_steps, log=log)
        self.start = float(start)
        self.end = float(end)
        self.mode = mode
        self.warmup_fraction = float(warmup_fraction)

    def value_at(self, step: int) -> float:
        """Scheduled value at optimizer step ``step`` (0-based); the last step ``horizon - 1`` gives ``end``."""
        if self._horizon is None:
            raise RuntimeError("`TemperatureSchedule.value_at` needs the horizon, known from `on_fit_start` on.")
        hold = round(self.warmup_fraction * self._horizon)
        span = max(self._horizon - 1 - hold, 1)
        return anneal(self.start, self.end, (step - hold) / span, self.mode)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_attribute(pl_module, "temperature")
