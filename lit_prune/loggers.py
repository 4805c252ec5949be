"""A TensorBoard logger whose first screen shows the run, not Lightning's placeholders.

Lightning's ``TensorBoardLogger`` adds two cards that say nothing about a pruning run: ``hp_metric`` at -1 (written
when hyperparameters are logged without a metric) and ``epoch`` (added next to every metric logged without an
explicit step; our runs count steps, and most have one epoch). This logger drops both; ``RunSummary`` writes the real
``hp_metric``. Everything else is Lightning's logger, so ``class_path: lit_prune.loggers.TensorBoardLogger`` is a
drop-in replacement in a config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger without the ``hp_metric = -1`` placeholder and without the ``epoch`` scalar.

    Args:
        save_dir: Folder the ``name/version_N`` run folders are created in.
        name: Experiment name (sub-folder of ``save_dir``).
        version: Run version (``version_N`` folder); default: the next free number.
        log_graph: Also write the model graph.
        default_hp_metric: Write Lightning's ``hp_metric = -1`` placeholder when no metric is given (off here;
            ``RunSummary`` logs the real one).
        log_epoch: Keep Lightning's ``epoch`` scalar.
        prefix: Put this string before every metric name.
        sub_dir: Sub-folder of the run folder the event files go to.
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        log_epoch: bool = False,
        prefix: str = "",
        sub_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir, name=name, version=version, log_graph=log_graph, default_hp_metric=default_hp_metric,
            prefix=prefix, sub_dir=sub_dir, **kwargs,
        )
        self.log_epoch = log_epoch

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.log_epoch:
            metrics = {key: value for key, value in metrics.items() if key != "epoch"}
        if metrics:
            super().log_metrics(metrics, step)
