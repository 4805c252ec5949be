"""StepSchedule: the base of callbacks that set one module attribute from ``trainer.global_step`` every batch."""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override


class StepSchedule(L.Callback):
    """Drive ``pl_module.<attr>`` with ``value_at(trainer.global_step)`` at the start of every training batch.

    Setting the value from the global step (not from a running counter) makes a resumed run see exactly the values of
    an uninterrupted one. Subclasses define ``value_at`` and validate their own arguments.

    Args:
        attr: Name of the module attribute to drive.
        total_steps: Steps the schedule spans; default reads ``trainer.estimated_stepping_batches`` at fit start.
        log: Log the value as ``schedule/<attr>`` every step.
    """

    def __init__(self, attr: str, total_steps: int | None = None, log: bool = True) -> None:
        name = type(self).__name__
        if not attr.isidentifier():
            raise ValueError(f"`{name}(attr=...)` must be an attribute name, got {attr!r}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"`{name}(total_steps=...)` must be >= 1 or None, got total_steps={total_steps}.")
        self.attr = attr
        self.total_steps = total_steps
        self.log = log
        self._horizon: int | None = None
        self._last_value: Any = None
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
    def last_value(self) -> Any:
        """The value most recently set on the module."""
        return self._last_value

    @abstractmethod
    def value_at(self, step: int) -> Any:
        """Scheduled value at optimizer step ``step`` (0-based)."""

    def check_attribute(self, pl_module: L.LightningModule, what: str) -> None:
        """Raise a clear error when the module lacks the attribute this schedule drives."""
        module = type(pl_module).__name__
        if not hasattr(pl_module, self.attr):
            raise AttributeError(
                f"`{type(self).__name__}(attr={self.attr!r})` drives `{module}.{self.attr}`, but {module} has no "
                f"attribute {self.attr!r}. Add it to the module or set `attr` to the name of its {what} attribute."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = type(self).__name__
        horizon = self.total_steps if self.total_steps is not None else _trainer_horizon(trainer, name)
        if self._horizon is not None and self._horizon != horizon:
            rank_zero_warn(
                f"`{name}(attr={self.attr!r})` was restored with a horizon of {self._horizon} steps, this run has "
                f"{horizon}; from here on it follows the new horizon (the value may jump)."
            )
        self._horizon = horizon
        # Restored state arrives before the loops (and global_step) are restored: put the checkpoint's value back so
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
            pl_module.log(f"schedule/{self.attr}", float(value), on_step=True, on_epoch=False)

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
