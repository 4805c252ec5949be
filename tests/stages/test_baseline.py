"""Baseline stage: which training blocks calibrate it, and its refusal of a bad `calibration` before weights load."""

import lightning as L
import pytest
import torch

from lit_prune import PruneDataModule
from lit_prune.data import calibration_indices
from lit_prune.stages.baseline import Baseline


def _fit(tiny_checkpoint, tiny_text, tmp_path, **kwargs):
    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)
    stage = Baseline(str(tiny_checkpoint), method="window_scan", num_drop=2, ratio=None, calibration_batches=3,
                     **kwargs)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        limit_val_batches=0)
    trainer.fit(stage, datamodule=data)
    return stage, data


@pytest.mark.parametrize("calibration", ["spread", "first"])
def test_calibration_blocks_follow_the_mask_search_rule(tiny_checkpoint, tiny_text, tmp_path, calibration):
    stage, data = _fit(tiny_checkpoint, tiny_text, tmp_path, calibration=calibration)
    picked = calibration_indices(len(data.train_set), 3 * 2, calibration)
    expected = torch.stack([torch.as_tensor(data.train_set[i]["input_ids"]) for i in picked])
    assert torch.equal(torch.cat(stage.batches), expected)
    assert stage.trainer.global_step <= 1  # one step: the blocks are taken from the dataset, not the loader
    artifact = stage.mask_artifact()
    assert artifact.extra["calibration"] == calibration and artifact.extra["calibration_batches"] == 3


def test_shuffled_calibration_takes_the_loaders_first_batches(tiny_checkpoint, tiny_text, tmp_path):
    stage, data = _fit(tiny_checkpoint, tiny_text, tmp_path, calibration="shuffled")
    assert len(stage.batches) == 3
    spread = calibration_indices(len(data.train_set), 6, "spread")
    spread_blocks = torch.stack([torch.as_tensor(data.train_set[i]["input_ids"]) for i in spread])
    assert not torch.equal(torch.cat(stage.batches), spread_blocks)


def test_bad_calibration_is_refused_before_weights_load(tiny_checkpoint, monkeypatch):
    from lit_prune import hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights loaded"))
    allowed = r"`model.init_args.calibration` must be one of \[.spread., .first., .shuffled.\]"
    with pytest.raises(ValueError, match=allowed):
        Baseline(str(tiny_checkpoint), calibration="random")


def test_window_scan_baseline_and_clp_search_pick_the_same_window(tiny_checkpoint, tiny_text, tmp_path):
    # Same data, calibration_batches == importance_batches: the same calibration tokens, so the same exact optimum.
    from lit_prune import ConcaveGate, MaskSearch

    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)
    baseline = Baseline(str(tiny_checkpoint), method="window_scan", num_drop=2, ratio=None, calibration_batches=2)
    search = MaskSearch(str(tiny_checkpoint), gate=lambda n, k: ConcaveGate(n, k, protect_first=1, protect_last=1),
                        num_drop=2, ratio=None, importance_init="window_scan", importance_batches=2, refine="polish",
                        optimizer=lambda p: torch.optim.Adam(p, lr=2.0))
    for stage, steps in ((baseline, 10), (search, 4)):
        L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                  limit_val_batches=0).fit(stage, datamodule=data)
    assert search.current_drop() == baseline.current_drop()
    assert search.refine_report["calibration_kl"] == pytest.approx(baseline.selection.details["best_kl"], rel=1e-6)
