"""What a user sees in TensorBoard, read back from the event files of tiny real runs.

A 6-step CLP search on the tiny checkpoint through the CLI, with lit_prune's TensorBoardLogger, MaskMonitor and
RunSummary(reference=window_scan); plus stub runs for the logger and hp_metric fallbacks.
"""

import json
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from lit_prune.callbacks import MaskMonitor, RunSummary
from lit_prune.callbacks.mask_monitor import heatmap_size
from lit_prune.cli import main as cli_main
from lit_prune.loggers import TensorBoardLogger

ROOT = Path(__file__).parents[2]
STEPS = 6
LAYERS = 6


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _session_hparams(events: EventAccumulator) -> dict:
    content = events.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


@pytest.fixture(scope="module")
def search_run(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("tb")
    callbacks = [
        {"class_path": "lit_prune.callbacks.TemperatureSchedule", "init_args": {"start": 1.0, "end": 0.05}},
        {"class_path": "lit_prune.callbacks.MaskMonitor", "init_args": {"every_n_steps": 2}},
        {"class_path": "lit_prune.callbacks.RunSummary", "init_args": {"reference": "window_scan"}},
    ]
    logger = {"class_path": "lit_prune.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(save_dir), "name": "clp", "version": "tiny"}}
    cli = cli_main([
        "fit", "-c", str(ROOT / "configs/clp_smollm2.yaml"),
        f"--model.init_args.pretrained={tiny_checkpoint}", "--model.init_args.dtype=float32",
        "--model.init_args.ratio=null", "--model.init_args.num_drop=2",
        f"--data.text_files=[{tiny_text}]", "--data.max_length=32", "--data.max_val_blocks=4",
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={save_dir}", f"--trainer.max_steps={STEPS}", "--trainer.val_check_interval=3",
        "--trainer.log_every_n_steps=1", f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
    ])
    return Path(cli.trainer.log_dir)


def test_search_run_tags_have_no_placeholders(search_run):
    tags = _events(search_run).Tags()
    scalars = set(tags["scalars"])
    assert {"val/kl", "val/ppl", "train/loss", "hp_metric", "schedule/temperature", "mask/num_dropped"} <= scalars
    assert "epoch" not in scalars
    # TensorBoard sorts groups case-sensitively: the capitalised headline group leads the first screen.
    groups = sorted({tag.split("/")[0] for tag in scalars})
    assert groups[0] == "Summary" and {"Summary/val/kl", "Summary/val/ppl"} <= scalars
    assert tags["images"] == ["mask/heatmap"]
    assert "reference/window_scan/text_summary" in tags["tensors"]


def test_heatmap_image_has_the_figure_size(search_run):
    images = _events(search_run).Images("mask/heatmap")
    assert [image.step for image in images] == [0, 2, 4, 6]
    width, height = heatmap_size(LAYERS, with_budget=False)  # CLP has no budget k
    assert {(image.width, image.height) for image in images} == {(round(width * 100), round(height * 100))}


def test_hp_metric_is_the_latest_val_kl(search_run):
    events = _events(search_run)
    val_kl = events.Scalars("val/kl")
    hp_metric = events.Scalars("hp_metric")
    assert len(val_kl) == 2  # validation after steps 3 and 6 (Lightning logs them at its own step count, 2 and 5)
    assert all(e.value >= 0 for e in hp_metric)  # no -1 placeholder
    # after each validation (global steps 3 and 6) and at the end of training (step 6 again)
    assert [e.step for e in hp_metric] == [3, STEPS, STEPS]
    assert [e.value for e in hp_metric] == pytest.approx([val_kl[0].value, val_kl[1].value, val_kl[1].value])
    headline = events.Scalars("Summary/val/kl")
    assert [e.step for e in headline] == [3, STEPS]
    assert [e.value for e in headline] == pytest.approx([e.value for e in val_kl])


def test_hparams_are_the_sweepable_settings(search_run):
    params = _session_hparams(_events(search_run))
    assert params["stage"] == "MaskSearch"
    assert params["gate"] == "ConcaveGate"
    assert params["num_drop"] == 2 and params["num_layers"] == LAYERS
    assert params["ratio"] == pytest.approx(2 / LAYERS, abs=1e-4)
    assert params["temperature/start"] == 1.0 and params["temperature/end"] == 0.05
    assert params["temperature/mode"] == "exp"
    assert params["optimizer"] == "Adam" and params["lr"] == pytest.approx(0.1)  # the config's optimizer
    assert params["kl_direction"] == "forward"
    # No experiment summary: TensorBoard then builds the columns from all runs' sessions (differing settings first).
    written = _events(search_run).summary_metadata  # tag -> metadata of every summary in the run
    assert hparams_metadata.SESSION_START_INFO_TAG in written and hparams_metadata.EXPERIMENT_TAG not in written


def test_window_scan_reference_is_a_flat_line_at_the_best_window(search_run):
    reference = _events(search_run / "reference_window_scan")
    kl = reference.Scalars("val/kl")
    assert [e.step for e in kl] == [0, STEPS]
    assert [e.value for e in reference.Scalars("Summary/val/kl")] == [e.value for e in kl]
    assert kl[0].value == kl[1].value > 0
    ppl = reference.Scalars("val/ppl")
    assert len(ppl) == 2 and ppl[0].value == ppl[1].value > 1
    # The scan is the exact optimum of one contiguous segment on these very blocks: a single-segment search on the
    # same blocks cannot do better.
    search_kl = _events(search_run).Scalars("val/kl")
    assert kl[0].value <= min(e.value for e in search_kl) + 1e-4


# ------------------------------------------------------------------------------------------------ stub runs


def test_logger_drops_epoch_and_placeholder_and_hp_metric_falls_back_to_train_loss(make_stub, tmp_path):
    import lightning as L

    class Logged(make_stub):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train/loss", loss)
            return loss

    logger = TensorBoardLogger(tmp_path, name="stub", version=0)
    summary = RunSummary()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=logger, callbacks=[summary], log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Logged())

    events = _events(Path(logger.log_dir))
    scalars = set(events.Tags()["scalars"])
    assert "epoch" not in scalars and "train/loss" in scalars
    assert summary.metric_used == "train/loss"
    assert [e.value for e in events.Scalars("hp_metric")] == [pytest.approx(events.Scalars("train/loss")[-1].value)]
    params = _session_hparams(events)
    assert params["stage"] == "Logged" and params["optimizer"] == "SGD" and params["lr"] == pytest.approx(0.5)


def test_plain_lightning_logger_keeps_epoch_and_gets_a_warning(make_stub, make_trainer, tmp_path):
    logger = LightningTensorBoardLogger(tmp_path, name="plain", version=0)
    with pytest.warns(UserWarning, match="placeholder"):
        make_trainer(max_steps=1, callbacks=[RunSummary(), MaskMonitor(image=False)], logger=logger).fit(make_stub())


def test_reference_needs_a_search_stage(bare_module, make_trainer):
    with pytest.raises(AttributeError, match="`model`, `gating`, `num_drop`.*reference: none"):
        make_trainer(max_steps=1, callbacks=[RunSummary(reference="window_scan")]).fit(bare_module)


def test_init_validation():
    with pytest.raises(ValueError, match="'none' or 'window_scan'"):
        RunSummary(reference="sleb")
    with pytest.raises(ValueError, match="logged metric name"):
        RunSummary(metric="")
