"""Make TensorBoard tell a run's story: headline cards first, a baseline line, and runs compared in the HParams tab.

- **Headline cards.** TensorBoard orders card groups by name, case-sensitively, so ``val/*`` comes after ``mask/*``
  (31 per-layer gate cards), ``schedule/*`` and ``train/*``. After every validation the headline metrics (``val/kl``
  and ``val/ppl`` by default) are repeated under ``Summary/`` (capital S: sorted before every lowercase group), so
  the first screen shows them.
- **HParams tab.** At fit start (rank 0) the run's hyperparameters that people sweep are written as an HParams
  session: the layer budget, gate, KL/KD settings, schedules, optimizer and learning rate, teacher cache. ``hp_metric``
  is the latest value of the run's headline metric, logged after every validation and at the end of training, so
  the HParams tab ranks finished and running runs alike.
- **Reference line** (opt-in, ``reference: window_scan``). Before the first step, every contiguous window of
  ``num_drop`` layers is scored on the validation blocks (the exact optimum of a single-segment search on them), and
  the best window's KL and perplexity go to a sibling run ``<version>/reference_window_scan`` under the same tags
  (``val/kl``, ``val/ppl`` and their ``Summary/`` copies): TensorBoard draws them as a flat line in the very charts of
  the search::

      val/kl  |  \\___ search (version_0)
              |  ------------------------ reference_window_scan (best contiguous window on these blocks)
              +------------------ step

What it reads from the module (each optional, documented here so other modules can offer the same):

- the attributes named in ``module_attrs`` that hold a number, string or bool (e.g. ``num_drop``, ``kd_share``);
- ``gate`` (its class name is logged), ``cache`` (a teacher cache: its ``k`` and format);
- for ``reference: window_scan``: ``model`` and ``gating`` (a ``LayerGating``), ``num_drop``, ``kl_direction``, and
  the gate's ``protect_first`` / ``protect_last``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks.step_schedule import StepSchedule

Reference = Literal["none", "window_scan"]
# Module attributes worth comparing across runs (missing ones are skipped). Old and new names of renamed settings
# are both listed so runs of either version compare.
MODULE_ATTRS = (
    "method", "num_layers", "num_drop", "kl_direction", "direction", "ce_weight", "kd_share", "kd_weight",
    "importance_init", "importance_scale", "refine", "loss", "weighting", "beta", "kd_temperature", "teacher_k",
    "cache_variant", "select_fraction",
    "train_scope", "lora_layers", "width", "r", "alpha", "dropout",
)
METRIC_ORDER = ("val/kl", "val/ppl", "train/loss")  # search, recovery, no validation
HEADLINE = ("val/kl", "val/ppl")
HEADLINE_GROUP = "Summary"  # capital: TensorBoard sorts it before every lowercase group
SCHEDULE_FIELDS = ("start", "end", "mode", "warmup_fraction")
REFERENCE_RUN = "reference_window_scan"


class RunSummary(L.Callback):
    """Write the run's sweepable hyperparameters and its ``hp_metric`` for TensorBoard's HParams tab.

    ``hp_metric`` is the latest value of ``metric``: by default ``val/kl`` (searches), else ``val/ppl`` (recovery),
    else ``train/loss`` (runs without validation). Use it with ``lit_prune.loggers.TensorBoardLogger``, which does
    not write Lightning's ``hp_metric = -1`` placeholder.

    Args:
        metric: Logged metric whose latest value becomes ``hp_metric``; ``auto`` picks the first logged of
            ``val/kl``, ``val/ppl``, ``train/loss``.
        reference: ``window_scan``: before training, find the best contiguous window of ``num_drop`` layers on the
            validation blocks and draw its ``val/kl`` and ``val/ppl`` as a flat reference line (costs one pass over
            the validation blocks per window; search stages only). ``none``: no reference.
        module_attrs: Module attributes logged as hyperparameters when present (numbers, strings, bools).
        headline: Metrics repeated under ``Summary/`` after every validation (those the run logs), so they lead the
            first screen; empty for none.
    """

    def __init__(
        self,
        metric: str = "auto",
        reference: Reference = "none",
        module_attrs: Sequence[str] = MODULE_ATTRS,
        headline: Sequence[str] = HEADLINE,
    ) -> None:
        if reference not in ("none", "window_scan"):
            raise ValueError(
                f"`RunSummary(reference=...)` must be 'none' or 'window_scan', got {reference!r}. Use window_scan "
                "on search stages to draw the best contiguous window as a reference line."
            )
        if not metric:
            raise ValueError("`RunSummary(metric=...)` must be a logged metric name such as 'val/kl', or 'auto'.")
        self.metric = metric
        self.reference = reference
        self.module_attrs = list(module_attrs)
        self.headline = list(headline)
        self.reference_values: dict[str, Any] | None = None
        self._metric_used: str | None = None

    # ----------------------------------------------------------------------------------------------- set-up
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.reference == "window_scan":
            missing = [a for a in ("model", "gating", "num_drop") if not hasattr(pl_module, a)]
            if missing:
                raise AttributeError(
                    f"`RunSummary(reference='window_scan')` needs `{type(pl_module).__name__}` to have "
                    f"{', '.join(f'`{a}`' for a in missing)} (a search stage such as MaskSearch). Use reference: none "
                    "for this stage."
                )
        for logger in _tensorboards(trainer):
            if getattr(logger, "_default_hp_metric", False):
                rank_zero_warn(
                    "`RunSummary` found a TensorBoardLogger that writes Lightning's `hp_metric = -1` placeholder. Use "
                    "`lit_prune.loggers.TensorBoardLogger` (or `default_hp_metric: false`) so the HParams tab shows "
                    "this run's hyperparameters and its real hp_metric."
                )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metric_used = None
        if not trainer.is_global_zero:
            return
        params = self.hyperparameters(trainer, pl_module)
        for logger in _tensorboards(trainer):
            _write_session(logger, params)

    def hyperparameters(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The flat ``{name: number | str | bool}`` written to the HParams session."""
        params: dict[str, Any] = {"stage": type(pl_module).__name__}
        for name in self.module_attrs:
            value = getattr(pl_module, name, None)
            if isinstance(value, bool | int | float | str):
                params[name] = value
        if isinstance(params.get("num_drop"), int) and isinstance(params.get("num_layers"), int):
            params["ratio"] = round(params["num_drop"] / params["num_layers"], 4)
        gate = getattr(pl_module, "gate", None)
        if isinstance(gate, torch.nn.Module):
            params["gate"] = type(gate).__name__
        for callback in trainer.callbacks:
            if isinstance(callback, StepSchedule):
                for field in SCHEDULE_FIELDS:
                    value = getattr(callback, field, None)
                    if isinstance(value, bool | int | float | str):
                        params[f"{callback.attr}/{field}"] = value
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params["optimizer"] = type(optimizer).__name__
            group = optimizer.param_groups[0]
            params["lr"] = float(group.get("initial_lr", group["lr"]))
        cache = getattr(pl_module, "cache", None)
        if cache is not None or getattr(pl_module, "teacher", None):
            params["teacher"] = "cache" if cache is not None else "online"
        if cache is not None:
            for field in ("k", "format", "variant", "version"):
                value = getattr(cache, field, None)
                if value is None:
                    value = (getattr(cache, "meta", None) or {}).get(field)
                if isinstance(value, bool | int | float | str):
                    params[f"cache/{field}"] = value
        datamodule = trainer.datamodule
        for field in ("batch_size", "max_length"):
            value = getattr(getattr(datamodule, "hparams", None), field, None)
            if isinstance(value, int):
                params[f"data/{field}"] = value
        params["max_steps"] = int(trainer.max_steps)
        return params

    # ------------------------------------------------------------------------------------------ reference line
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference != "window_scan" or self.reference_values is not None:
            return
        batches = _validation_batches(trainer, pl_module)
        if not batches:
            # A run without validation (limit_val_batches: 0, as the demo does) chose this: one info line, no warning.
            rank_zero_info("RunSummary: no validation batches in this run, so no window-scan reference line in val/kl.")
            return
        self.reference_values = window_scan_reference(pl_module, batches)
        if trainer.is_global_zero:
            horizon = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
            for logger in _tensorboards(trainer):
                _write_reference(logger, self.reference_values, horizon)

    # ----------------------------------------------------------------------------------------------- hp_metric
    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._log_hp_metric(trainer)
            values = {f"{HEADLINE_GROUP}/{m}": float(trainer.callback_metrics[m]) for m in self.headline
                      if m in trainer.callback_metrics}
            for logger in _tensorboards(trainer):
                if values:
                    logger.log_metrics(values, step=trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_hp_metric(trainer)

    def _log_hp_metric(self, trainer: L.Trainer) -> None:
        metrics = trainer.callback_metrics
        name = self.metric if self.metric != "auto" else next((m for m in METRIC_ORDER if m in metrics), None)
        if name is None or name not in metrics:
            return
        self._metric_used = name
        value = float(metrics[name])
        for logger in _tensorboards(trainer):
            logger.log_metrics({"hp_metric": value}, step=trainer.global_step)

    @property
    def metric_used(self) -> str | None:
        """The metric ``hp_metric`` was last taken from (None before the first value)."""
        return self._metric_used

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference_values": self.reference_values}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference_values = state_dict.get("reference_values")


def window_scan_reference(pl_module: L.LightningModule, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Best contiguous window of ``num_drop`` layers on ``batches``: its drop list, KL and perplexity.

    The KL is the mean token KL over every position, as ``MaskSearch`` logs ``val/kl``; the perplexity scores the
    batches' ``labels`` as ``val/ppl`` does.
    """
    from lit_prune.components.scorers import window_scan
    from lit_prune.metrics import shifted_token_nll

    model, gating = pl_module.model, pl_module.gating
    gate = getattr(pl_module, "gate", None)
    selection = window_scan(
        model, gating, [b["input_ids"] for b in batches], int(pl_module.num_drop),
        protect_first=int(getattr(gate, "protect_first", 0)), protect_last=int(getattr(gate, "protect_last", 0)),
        direction=getattr(pl_module, "kl_direction", "forward"),
    )
    keep = [i not in selection.drop for i in range(gating.num_layers)]
    saved, was_training = gating.values, model.training
    nll, tokens = 0.0, 0
    try:
        model.eval()
        gating.set_mask(keep)
        with torch.no_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], use_cache=False).logits
                batch_nll, count = shifted_token_nll(logits, batch["labels"])
                nll, tokens = nll + float(batch_nll), tokens + int(count)
    finally:
        gating.set(saved)
        model.train(was_training)
    return {
        "drop": list(selection.drop),
        "kl": float(selection.details["best_kl"]),
        "ppl": math.exp(nll / max(tokens, 1)),
        "blocks": sum(int(b["input_ids"].shape[0]) for b in batches),
    }


def _validation_batches(trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, torch.Tensor]]:
    """The batches the validation loop will see (``limit_val_batches`` applied), on the module's device."""
    limit = trainer.limit_val_batches
    if not limit:
        return []
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    loader = source.val_dataloader()
    if isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    if loader is None:
        return []
    try:
        total = len(loader)
    except TypeError:  # an iterable dataset: take what `limit` allows
        total = int(limit) if isinstance(limit, int) else 0
    count = min(total, int(limit)) if isinstance(limit, int) else max(1, int(total * float(limit)))
    batches = []
    for index, batch in enumerate(loader):
        if index >= count:
            break
        batches.append({k: v.to(pl_module.device) for k, v in batch.items() if k in ("input_ids", "labels")})
    return batches


def _tensorboards(trainer: L.Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _write_session(logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    """The HParams session start (the run's hyperparameters); the metric values come from the scalar tags.

    No experiment summary: without one, TensorBoard builds the table from every run's session, so runs with different
    settings (CLP and E3) share one table, the hyperparameters that differ between runs get the first (shown) columns,
    and the metric columns start with ``Summary/*`` and ``hp_metric`` (sorted by name).
    """
    from torch.utils.tensorboard.summary import hparams

    _, start, _ = hparams(params, {"hp_metric": math.nan})
    logger.experiment._get_file_writer().add_summary(start)
    logger.hparams.update(params)  # hparams.yaml in the run folder, for readers without TensorBoard


def _write_reference(logger: TensorBoardLogger, values: dict[str, Any], horizon: int) -> None:
    """A sibling run with a flat ``val/kl`` and ``val/ppl`` from step 0 to the last step."""
    from torch.utils.tensorboard import SummaryWriter

    segments = f"[{values['drop'][0]}, {values['drop'][-1] + 1})"
    writer = SummaryWriter(os.path.join(logger.log_dir, REFERENCE_RUN))
    try:
        for step in (0, max(horizon, 1)):
            for tag in ("val/kl", "val/ppl"):
                writer.add_scalar(tag, values[tag[4:]], step)
                writer.add_scalar(f"{HEADLINE_GROUP}/{tag}", values[tag[4:]], step)
        writer.add_text(
            "reference",
            f"window_scan: best contiguous window {segments} of {len(values['drop'])} layers on the "
            f"{values['blocks']} validation blocks: val/kl {values['kl']:.4f}, val/ppl {values['ppl']:.2f}",
            0,
        )
    finally:
        writer.close()
    logger.experiment.add_text(
        "reference/window_scan",
        f"drop {segments}: val/kl {values['kl']:.4f}, val/ppl {values['ppl']:.2f} "
        f"(best contiguous window on the validation blocks; drawn as run `{REFERENCE_RUN}`)",
        0,
    )
