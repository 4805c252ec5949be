"""Anneal an integer budget of the LightningModule (e.g. how many layers a Gumbel-TopK gate drops now)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks.temperature import _trainer_horizon
from lit_prune.components.schedules import anneal_int, staircase

TopKMode = Literal["linear", "cosine", "step"]


class TopKAnnealing(L.Callback):
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
        if mode not in get_args(TopKMode):
            raise ValueError(f"`TopKAnnealing(mode=...)` must be one of {get_args(TopKMode)}, got {mode!r}.")
        if steps < 1:
            raise ValueError(f"`TopKAnnealing(steps=...)` must be >= 1, got steps={steps}.")
        if not attr.isidentifier():
            raise ValueError(f"`TopKAnnealing(attr=...)` must be an attribute name, got {attr!r}.")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"`TopKAnnealing(total_steps=...)` must be >= 1 or None, got total_steps={total_steps}.")
        self.start = int(start)
        self.end = None if end is None else int(end)
        self.warmup_fraction = float(warmup_fraction)
        self.mode = mode
        self.steps = int(steps)
        self.attr = attr
        self.total_steps = total_steps
        self.log = log
        self._end: int | None = self.end
        self._horizon: int | None = None
        self._last_value: int | None = None
        self._last_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(attr=self.attr)

    @property
    def target_attr(self) -> str:
        """Name of the module attribute that holds the final budget."""
        return f"{self.attr}_target"

    @property
    def resolved_end(self) -> int | None:
        """The budget the schedule ends on: ``end``, or the module's ``<attr>_target`` once set up."""
        return self._end

    @property
    def last_value(self) -> int | None:
        """The budget most recently set on the module."""
        return self._last_value

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
        if not hasattr(pl_module, self.attr):
            raise AttributeError(
                f"`TopKAnnealing(attr={self.attr!r})` drives `{name}.{self.attr}`, but {name} has no attribute "
                f"{self.attr!r}. Add it to the module or set `attr` to the name of its budget attribute."
            )
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
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        horizon = self.total_steps if self.total_steps is not None else _trainer_horizon(trainer, "TopKAnnealing")
        if self._horizon is not None and self._horizon != horizon:
            rank_zero_warn(
                f"`TopKAnnealing(attr={self.attr!r})` was restored with a horizon of {self._horizon} steps, this run "
                f"has {horizon}; from here on it follows the new horizon (the budget may jump)."
            )
        self._horizon = horizon
        # Loops (and global_step) are restored after this hook: put the checkpoint's value back for pre-train hooks.
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
        return {
            "horizon": self._horizon,
            "end": self._end,
            "last_value": self._last_value,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._horizon = state_dict["horizon"]
        self._last_value = state_dict["last_value"]
        self._last_step = state_dict["last_step"]
        if state_dict["end"] is not None and self._end is not None and state_dict["end"] != self._end:
            rank_zero_warn(
                f"`TopKAnnealing(attr={self.attr!r})` was saved ending on {state_dict['end']}, this run ends on "
                f"{self._end}; using {self._end}."
            )
