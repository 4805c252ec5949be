"""Watch a layer mask while it is being learned: per-layer gate scalars, and a labelled heat map in TensorBoard.

The heat map is a matplotlib figure (drawn with the Agg backend, no GUI, only every ``every_n_steps`` steps on rank 0):
one row per layer (layer 0 at the top), one column per logged step, a colour bar for the gate value, a strip at the
right that marks the layers the hard mask drops now, the dropped segments in the title and, for modules with an
annealed budget ``k`` (E3's Gumbel-TopK), the budget over the steps in a panel below::

    step 40: drop 8/30 layers, segments [12, 20)
    layer 00  ##########  | .
    layer 12  ######....  | X    <- dropped now (red strip, red label)      colour bar: gate value
    k         ___/‾‾‾‾‾‾
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

# TensorBoard shrinks an image to its card (about 350 pixels wide) until it is clicked: a wide figure with large
# fonts stays readable there, and shows every detail at its actual size (900 pixels wide).
IMAGE_WIDTH_IN = 9.0
FONT_SCALE = 1.8


def heatmap_size(num_layers: int, with_budget: bool) -> tuple[float, float]:
    """Figure size in inches (100 dpi) of the TensorBoard heat map; the same for any number of layers and steps."""
    return IMAGE_WIDTH_IN, 5.0 + (1.6 if with_budget else 0.0)


def gate_heatmap(
    history: Tensor,
    steps: Sequence[int],
    dropped: Sequence[int],
    budget: Sequence[float] | None = None,
    title: str = "",
) -> Any:
    """Render gate values over time as a labelled RGB image (layers x steps, colour bar, dropped layers in red).

    Args:
        history: Gate values, ``[steps, layers]``, expected in [0, 1] (nan renders blank).
        steps: Global step of each history row.
        dropped: Layers the hard mask drops now; marked red in the strip at the right and in the row labels.
        budget: The module's budget ``k`` at each history row (E3), drawn in a panel below; None for no panel.
        title: Figure title.

    Returns:
        A ``uint8`` array ``[height, width, 3]`` for ``SummaryWriter.add_image(..., dataformats="HWC")``; its size
        is :func:`heatmap_size` at 100 dpi.
    """
    from lit_prune.reports import figure_rgb, gate_heatmap_figure

    if history.dim() != 2:
        raise ValueError(f"`history` must be [steps, layers], got shape {tuple(history.shape)}.")
    if history.shape[0] != len(steps):
        raise ValueError(f"`history` has {history.shape[0]} rows for {len(steps)} steps.")
    values = history.detach().float().cpu().T.tolist()  # [layers][steps]
    size = heatmap_size(history.shape[1], budget is not None)
    fig = gate_heatmap_figure(
        steps, values, dropped, budget, title=title, size=size, drop_label="now", font_scale=FONT_SCALE
    )
    return figure_rgb(fig)


def heatmap_title(step: int, drop: Sequence[int], num_layers: int, budget: float | None = None) -> str:
    """``step 40: drop 8/30 layers, segments [12, 20)`` (+ ``, k = 8`` when the module has a budget)."""
    segments = ", ".join(f"[{a}, {b})" for a, b in contiguous_segments(drop)) or "none"
    text = f"step {step}: drop {len(drop)}/{num_layers} layers, segments {segments}"
    return text if budget is None else f"{text}, k = {budget:g}"


class MaskMonitor(L.Callback):
    """Log a layer mask as it is being learned.

    Every ``every_n_steps`` optimizer steps (and at the start and end of training) it logs
    ``<scope>/gate/layer_XX`` and ``<scope>/num_dropped`` to every logger, and keeps the values in a history that is
    saved with the checkpoint. With a ``TensorBoardLogger`` it also writes, on rank 0, a labelled heat map of the
    history (``<scope>/heatmap``, see the module docstring), a histogram of the gate values (``<scope>/gate_values``)
    and the drop list with its ``[start, end)`` segments (``<scope>/segments``).

    The module must provide ``layer_gate_values() -> Tensor`` (1-D, one value in [0, 1] per layer, a deterministic
    view) and ``current_drop() -> list[int]`` (the layers the hard mask would drop now). A module with an integer
    budget ``k`` (E3's ``GumbelTopKGate``, driven by ``TopKAnnealing``) also gets ``k`` drawn under the heat map.

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
        self._budgets: list[float | None] = []
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
            del self._steps[-1], self._gates[-1], self._drops[-1], self._budgets[-1]
        budget = getattr(pl_module, "k", None)
        self._steps.append(step)
        self._gates.append(gates.tolist())
        self._drops.append(drop)
        self._budgets.append(float(budget) if isinstance(budget, int | float) else None)

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
        budgets = None if any(b is None for b in self._budgets) else self._budgets
        title = heatmap_title(step, drop, gates.numel(), budgets[-1] if budgets else None)
        image = gate_heatmap(self.history, self._steps, drop, budgets, title)
        writer.add_image(f"{self.scope}/heatmap", image, step, dataformats="HWC")
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
            "budgets": list(self._budgets),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps = list(state_dict["steps"])
        self._gates = [list(g) for g in state_dict["gates"]]
        self._drops = [list(d) for d in state_dict["drops"]]
        # Checkpoints written before budgets were recorded have none.
        self._budgets = list(state_dict.get("budgets", [None] * len(self._steps)))


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
