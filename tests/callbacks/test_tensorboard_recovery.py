"""A recovery run in TensorBoard: the KD/CE split, the entropy weights' spread, the teacher's tail mass, HParams."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from lit_prune.callbacks import RunSummary
from lit_prune.data import PruneDataModule
from lit_prune.loggers import TensorBoardLogger
from lit_prune.stages.distill import Distill


@pytest.fixture(scope="module")
def distill_run(tiny_checkpoint, tiny_text, tmp_path_factory) -> tuple[Path, L.Trainer]:
    tmp = tmp_path_factory.mktemp("distill")
    mask = tmp / "mask.json"
    mask.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    # An online teacher cut to its top-4 ids with the tail bucket: the form a v2 cache carries.
    module = Distill(str(tiny_checkpoint), mask=str(mask), teacher=str(tiny_checkpoint), teacher_k=4,
                     cache_variant="tail", weighting="normalized", kd_share=0.5, r=4, alpha=8.0, dropout=0.0,
                     optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)
    logger = TensorBoardLogger(tmp, name="distill", version=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=logger, callbacks=[RunSummary()], log_every_n_steps=1,
                        val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp))
    trainer.fit(module, datamodule=data)
    return Path(logger.log_dir), trainer


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_recovery_logs_the_kd_ce_split_weight_spread_and_tail_mass(distill_run):
    run_dir, trainer = distill_run
    scalars = set(_events(run_dir).Tags()["scalars"])
    assert {"train/kd", "train/ce", "train/loss", "train/entropy_weight_std", "train/teacher_tail_mass"} <= scalars
    assert "epoch" not in scalars
    metrics = trainer.callback_metrics
    # kd_share 0.5: the loss is the even mix of the two logged terms
    assert metrics["train/loss"].item() == pytest.approx(0.5 * (metrics["train/kd"] + metrics["train/ce"]).item())
    assert metrics["train/entropy_weight_std"].item() > 0  # normalized weights differ between tokens
    assert 0.0 < metrics["train/teacher_tail_mass"].item() < 1.0


def test_recovery_hp_metric_is_val_ppl_and_hparams_name_the_kd_settings(distill_run):
    run_dir, _ = distill_run
    events = _events(run_dir)
    val_ppl = events.Scalars("val/ppl")
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(val_ppl[-1].value)
    assert [e.value for e in events.Scalars("Summary/val/ppl")] == pytest.approx([e.value for e in val_ppl])
    content = events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["stage"].string_value == "Distill"
    assert hparams["kd_share"].number_value == 0.5
    assert hparams["weighting"].string_value == "normalized"
    assert hparams["cache_variant"].string_value == "tail"
    assert hparams["teacher"].string_value == "online"
    assert hparams["teacher_k"].number_value == 4
