"""StepProgressBar: the fit bar counts optimizer steps against ``trainer.max_steps``, also after a resume.

Lightning's default bar counts batches of the current epoch against ``max_epochs - 1``, which reads "Epoch 0/-2" for
step-based runs (``max_epochs`` is -1 there) and "10/3" after a mid-epoch resume; it also shows the logger's ``v_num``.
This bar shows "Steps" with ``global_step / max_steps`` when ``max_steps`` is set, the epoch bar otherwise, and no
``v_num``. ``step_progress_bar()`` returns the Rich flavour when ``rich`` is installed (Lightning's own default then),
else the tqdm one. ``LitPruneCLI`` adds it unless a config brings its own progress bar.

With ``max_steps`` set, the bar's metrics (the logged loss) refresh on logging steps (``log_every_n_steps``) and the
last step: reading a logged GPU tensor waits for the GPU, and doing it every step would keep the host from queueing
the next step while the GPU finishes this one. The step count still moves every step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

DESCRIPTION = "Steps"


def _max_steps(trainer: pl.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None


def _metrics_due(trainer: pl.Trainer) -> bool:
    step = trainer.global_step
    return step % max(1, trainer.log_every_n_steps) == 0 or step == _max_steps(trainer)


class _NoVersion:
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)  # the run folder is printed by the stages; a float version number says nothing
        return items


class RichStepProgressBar(_NoVersion, RichProgressBar):
    """Rich flavour of the step bar."""

    def _get_train_description(self, current_epoch: int) -> str:
        if _max_steps(self.trainer) is None:
            return super()._get_train_description(current_epoch)
        return f"{DESCRIPTION:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        total = _max_steps(trainer)
        if total is not None and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.reset(self.train_progress_bar_id, total=total, completed=trainer.global_step,
                                description=self._get_train_description(trainer.current_epoch), visible=True)

    def _initialize_train_progress_bar_id(self) -> None:
        super()._initialize_train_progress_bar_id()
        total = _max_steps(self.trainer)
        if total is not None and self.progress is not None:
            self.progress.update(self.train_progress_bar_id, total=total, completed=self.trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if _max_steps(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        if _metrics_due(trainer):
            self._update_metrics(trainer, pl_module)
        self.refresh()


class TQDMStepProgressBar(_NoVersion, TQDMProgressBar):
    """tqdm flavour of the step bar."""

    def _to_steps(self, trainer: pl.Trainer, total: int) -> None:
        bar = self.train_progress_bar
        if bar.total != total or not bar.desc.startswith(DESCRIPTION):  # also on a mid-epoch resume (no epoch start)
            bar.reset(total)
            bar.set_description(DESCRIPTION)
        bar.n = trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        total = _max_steps(trainer)
        if total is not None:
            self._to_steps(trainer, total)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = _max_steps(trainer)
        if total is None or self.train_progress_bar is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(trainer.global_step, total):
            self._to_steps(trainer, total)
            if _metrics_due(trainer):
                self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()


def step_progress_bar() -> ProgressBar:
    """The step bar in the flavour Lightning would pick by default."""
    return RichStepProgressBar() if _RICH_AVAILABLE else TQDMStepProgressBar()
