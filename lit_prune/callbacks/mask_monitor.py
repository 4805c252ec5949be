"""Watch a layer mask while it is being learned: per-layer gate scalars, and a heat map in TensorBoard.

The heat map has one row per layer (layer 0 at the top) and one column per logged step, dark for a closed gate and
bright for an open one. A strip at the right edge marks the layers the hard mask would drop now::

    layer 00  ##########  |  .
    layer 01  ######....  |  X    <- dropped now
    layer 02  ##########  |  .
              steps ->
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_prune.components.surgery import contiguous_segments

# Two-colour map: closed gate (0) is dark blue, open gate (1) is yellow; dropped layers are marked red.
_LOW = (0.05, 0.05, 0.35)
_HIGH = (1.0, 0.85, 0.1)
_DROPPED = (0.9, 0.1, 0.1)
_KEPT = (0.8, 0.8, 0.8)
_GAP = (1.0, 1.0, 1.0)


def gate_heatmap(history: Tensor, dropped: Sequence[int], cell: int = 8, max_width: int = 1024) -> Tensor:
    """Render gate values over time as an RGB image, with the currently dropped layers marked at the right edge.

    Args:
        history: Gate values, ``[steps, layers]``, expected in [0, 1] (clamped; nan renders as closed).
        dropped: Layers the hard mask drops now; marked red in the right-edge strip.
        cell: Pixel height of a layer row and the maximum pixel width of a step column.
        max_width: Columns get narrower (down to 1 pixel) to keep the step area within this width.

    Returns:
        A float image ``[3, layers * cell, width]`` in [0, 1], ready for ``SummaryWriter.add_image``.
    """
    if history.dim() != 2:
        raise ValueError(f"`history` must be [steps, layers], got shape {tuple(history.shape)}.")
    if cell < 1:
        raise ValueError(f"`cell` must be >= 1, got {cell}.")
    num_steps, num_layers = history.shape
    bad = [i for i in dropped if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"`dropped` has layer indices outside [0, {num_layers}): {bad}.")

    def colour(rgb: tuple[float, float, float]) -> Tensor:
        return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)

    values = torch.nan_to_num(history.detach().float().cpu(), nan=0.0).clamp(0.0, 1.0).T  # [layers, steps]
    grid = colour(_LOW) * (1.0 - values) + colour(_HIGH) * values  # [3, layers, steps]
    col_w = max(1, min(cell, max_width // max(num_steps, 1)))
    grid = grid.repeat_interleave(cell, dim=1).repeat_interleave(col_w, dim=2)

    is_dropped = torch.zeros(num_layers, dtype=torch.bool)
    is_dropped[list(dropped)] = True
    strip = torch.where(is_dropped.view(1, -1, 1), colour(_DROPPED), colour(_KEPT))  # [3, layers, 1]
    strip = strip.repeat_interleave(cell, dim=1).expand(3, num_layers * cell, cell)
    gap = colour(_GAP).expand(3, num_layers * cell, max(1, cell // 4))
    return torch.cat([grid, gap, strip], dim=2).contiguous()


class MaskMonitor(L.Callback):
    """Log a layer mask as it is being learned.

    Every ``every_n_steps`` optimizer steps (and at the start and end of training) it logs
    ``<scope>/gate/layer_XX`` and ``<scope>/num_dropped`` to every logger, and keeps the values in a history that is
    saved with the checkpoint. With a ``TensorBoardLogger`` it also writes, on rank 0, a heat map of the history
    (``<scope>/heatmap``), a histogram of the gate values (``<scope>/gate_values``) and the drop list with its
    ``[start, end)`` segments (``<scope>/segments``).

    The module must provide ``layer_gate_values() -> Tensor`` (1-D, one value in [0, 1] per layer, a deterministic
    view) and ``current_drop() -> list[int]`` (the layers the hard mask would drop now).

    Args:
        every_n_steps: Log every this many optimizer steps.
        scope: Prefix of every logged name.
        image: Also write the TensorBoard heat map, histogram and segment text (needs a ``TensorBoardLogger``).
    """

    def __init__(self, every_n_steps: int = 50, scope: str = "mask", image: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"`MaskMonitor(every_n_steps=...)` must be >= 1, got every_n_steps={every_n_steps}.")
        if not scope or scope != scope.strip("/") or scope != scope.lower() or " " in scope:
            raise ValueError(
                f"`MaskMonitor(scope=...)` must be a lowercase name without spaces or outer '/', got {scope!r}."
            )
        self.every_n_steps = every_n_steps
        self.scope = scope
        self.image = image
        self._steps: list[int] = []
        self._gates: list[list[float]] = []
        self._drops: list[list[int]] = []
        self._warned_no_tensorboard = False
        self._fit_last_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(scope=self.scope)

    @property
    def history(self) -> Tensor:
        """Logged gate values, ``[logged_steps, layers]``."""
        return torch.tensor(self._gates, dtype=torch.float32) if self._gates else torch.empty(0, 0)

    @property
    def logged_steps(self) -> list[int]:
        """Global steps at which the history was recorded."""
        return list(self._steps)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(pl_module).__name__
        missing = [m for m in ("layer_gate_values", "current_drop") if not callable(getattr(pl_module, m, None))]
        if missing:
            raise AttributeError(
                f"`MaskMonitor` needs `{name}` to provide {', '.join(f'`{m}()`' for m in missing)}: "
                "`layer_gate_values() -> Tensor[num_layers]` with values in [0, 1] and "
                "`current_drop() -> list[int]` with the layers the hard mask would drop now."
            )
        if self.image and not self._warned_no_tensorboard and _tensorboard(trainer) is None:
            self._warned_no_tensorboard = True
            loggers = [type(lg).__name__ for lg in trainer.loggers]
            scalars = f"Scalars still go to {loggers}." if loggers else "With no logger, values stay in the history."
            rank_zero_warn(
                f"`MaskMonitor(image=True)` found no TensorBoardLogger among the trainer's loggers; the "
                f"`{self.scope}/` heat map, histogram and segment text are skipped. {scalars} "
                "Set `image=False` to silence this."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_last_step = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        # Gradient accumulation calls batch-end hooks several times per step; the first call wins.
        if self._fit_last_step == step:
            return
        self._fit_last_step = step
        with torch.no_grad():
            gates = pl_module.layer_gate_values().detach().float().cpu().flatten()
        drop = sorted({int(i) for i in pl_module.current_drop()})
        if self._gates and len(self._gates[-1]) != gates.numel():
            raise ValueError(
                f"`MaskMonitor` history has {len(self._gates[-1])} layers but `{type(pl_module).__name__}."
                f"layer_gate_values()` returned {gates.numel()}; was a checkpoint of another model restored?"
            )
        # Re-recording a step (a resume, or a new fit from step 0) replaces that part of the picture.
        while self._steps and self._steps[-1] >= step:
            del self._steps[-1], self._gates[-1], self._drops[-1]
        self._steps.append(step)
        self._gates.append(gates.tolist())
        self._drops.append(drop)

        metrics = {f"{self.scope}/gate/layer_{i:02d}": float(v) for i, v in enumerate(gates)}
        metrics[f"{self.scope}/num_dropped"] = float(len(drop))
        for logger in trainer.loggers:  # every logger's log_metrics is rank-zero only
            logger.log_metrics(metrics, step=step)
        if self.image and trainer.is_global_zero:
            self._write_tensorboard(trainer, gates, drop, step)

    def _write_tensorboard(self, trainer: L.Trainer, gates: Tensor, drop: list[int], step: int) -> None:
        logger = _tensorboard(trainer)
        if logger is None:
            return
        writer = logger.experiment
        writer.add_image(f"{self.scope}/heatmap", gate_heatmap(self.history, drop), step, dataformats="CHW")
        writer.add_histogram(f"{self.scope}/gate_values", gates, step)
        segments = [list(seg) for seg in contiguous_segments(drop)]  # printed as in mask.json
        writer.add_text(
            f"{self.scope}/segments",
            f"step {step}: drop {drop} (layers, 0-based); segments {segments} ([start, end), end-exclusive)",
            step,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self._steps),
            "gates": [list(g) for g in self._gates],
            "drops": [list(d) for d in self._drops],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = list(state_dict["steps"])
        self._gates = [list(g) for g in state_dict["gates"]]
        self._drops = [list(d) for d in state_dict["drops"]]


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
