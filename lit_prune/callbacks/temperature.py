"""Anneal a float attribute of the LightningModule (a gate or KD temperature) over the training steps."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_prune.components.schedules import anneal

TemperatureMode = Literal["linear", "cosine", "exp"]


class TemperatureSchedule(L.Callback):
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
        if mode not in get_args(TemperatureMode):
            raise ValueError(
                f"`TemperatureSchedule(mode=...)` must be one of {get_args(TemperatureMode)}, got {mode!r}."
            )
        if not attr.isidentifier():
            raise ValueError(f"`TemperatureSchedule(attr=...)` must be an attribute name, got {attr!r}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(
                f"`TemperatureSchedule(warmup_fraction=...)` must be in [0, 1), got warmup_fraction={warmup_fraction}."
            )
        if total_steps is not None and total_steps < 1:
            raise ValueError(
                f"`TemperatureSchedule(total_steps=...)` must be >= 1 or None, got total_steps={total_steps}."
            )
        self.start = float(start)
        self.end = float(end)
        self.mode = mode
        self.attr = attr
        self.warmup_fraction = float(warmup_fraction)
        self.total_steps = total_steps
        self.log = log
        self._horizon: int | None = None
        self._last_value: float | None = None
        self._last_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attr=self.attr)

    @property
    def horizon(self) -> int | None:
        """Number of optimizer steps the schedule spans, known from fit start on."""
        return self._horizon

    @property
    def last_value(self) -> float | None:
        """The value most recently set on the module."""
        return self._last_value

    def value_at(self, step: int) -> float:
        """Scheduled value at optimizer step ``step`` (0-based); the last step ``horizon - 1`` gives ``end``."""
        if self._horizon is None:
            raise RuntimeError("`TemperatureSchedule.value_at` needs the horizon, known from `on_fit_start` on.")
        hold = round(self.warmup_fraction * self._horizon)
        span = max(self._horizon - 1 - hold, 1)
        return anneal(self.start, self.end, (step - hold) / span, self.mode)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, self.attr):
            raise AttributeError(
                f"`TemperatureSchedule(attr={self.attr!r})` drives `{type(pl_module).__name__}.{self.attr}`, but "
                f"{type(pl_module).__name__} has no attribute {self.attr!r}. Add it to the module or set `attr` to "
                f"the name of its temperature attribute."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        horizon = self.total_steps if self.total_steps is not None else _trainer_horizon(trainer, "TemperatureSchedule")
        if self._horizon is not None and self._horizon != horizon:
            rank_zero_warn(
                f"`TemperatureSchedule(attr={self.attr!r})` was restored with a horizon of {self._horizon} steps, "
                f"this run has {horizon}; from here on it follows the new horizon (the value may jump)."
            )
        self._horizon = horizon
        # Restored state runs before the loops (and global_step) are restored: put the checkpoint's value back so
        # anything before the first batch (e.g. the sanity check) sees it.
        value = self._last_value if self._last_value is not None else self.value_at(trainer.global_step)
        setattr(pl_module, self.attr, value)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        value = self.value_at(step)
        setattr(pl_module, self.attr, value)
        self._last_value, self._last_step = value, step
        if self.log:
            pl_module.log(f"schedule/{self.attr}", value, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"horizon": self._horizon, "last_value": self._last_value, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._horizon = state_dict["horizon"]
        self._last_value = state_dict["last_value"]
        self._last_step = state_dict["last_step"]


def _trainer_horizon(trainer: L.Trainer, who: str) -> int:
    """Number of optimizer steps of this fit, from the Trainer (the one source of truth)."""
    steps = trainer.estimated_stepping_batches
    if math.isinf(steps):
        raise ValueError(
            f"`{who}` reads its horizon from `trainer.estimated_stepping_batches`, which is infinite here. Set "
            f"`trainer.max_steps` or `trainer.max_epochs`, or pass `total_steps` to the callback."
        )
    return max(int(steps), 1)
