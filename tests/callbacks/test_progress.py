"""StepProgressBar: steps against max_steps (also after a resume), no v_num, in both flavours."""

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from lit_prune.callbacks.progress import RichStepProgressBar, TQDMStepProgressBar


def _fit(bar, tmp_path, max_steps, ckpt_path=None):
    trainer = pl.Trainer(max_steps=max_steps, limit_train_batches=4, limit_val_batches=0, callbacks=[bar],
                         logger=CSVLogger(tmp_path), enable_model_summary=False, default_root_dir=tmp_path,
                         accelerator="cpu")
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer


def test_tqdm_bar_counts_steps_against_max_steps_across_epochs_and_a_resume(tmp_path):
    bar = TQDMStepProgressBar()
    trainer = _fit(bar, tmp_path, max_steps=6)  # 4 batches per epoch: crosses an epoch
    shown = bar.train_progress_bar
    assert shown.desc.startswith("Steps") and (shown.n, shown.total) == (6, 6)
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = TQDMStepProgressBar()
    _fit(resumed, tmp_path, max_steps=9, ckpt_path=ckpt)  # resumes mid-epoch (step 6 of batches of 4)
    assert (resumed.train_progress_bar.n, resumed.train_progress_bar.total) == (9, 9)


def test_rich_bar_counts_steps_against_max_steps(tmp_path):
    pytest.importorskip("rich")
    bar = RichStepProgressBar()
    trainer = _fit(bar, tmp_path, max_steps=6)
    task = bar.progress.tasks[bar.train_progress_bar_id] if bar.train_progress_bar_id is not None else None
    if task is None:  # the bar resets its ids at teardown; the last task is kept by rich
        task = bar.progress.tasks[0]
    assert (task.completed, task.total) == (6, 6) and "Steps" in task.description
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)


@pytest.mark.parametrize("flavour", ["tqdm", "rich"])
def test_bar_reads_logged_metrics_only_on_logging_steps(tmp_path, flavour):
    # Reading a logged tensor is a host sync: the bar does it when the loggers do, and on the last step.
    if flavour == "rich":
        pytest.importorskip("rich")
    base = RichStepProgressBar if flavour == "rich" else TQDMStepProgressBar
    read_at = []

    class Counting(base):
        def get_metrics(self, trainer, pl_module):
            read_at.append(trainer.global_step)
            return super().get_metrics(trainer, pl_module)

    class Logging(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/loss", out["loss"], prog_bar=True)
            return out

    trainer = pl.Trainer(max_steps=7, limit_train_batches=10, limit_val_batches=0, callbacks=[Counting()],
                         logger=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                         log_every_n_steps=3)
    trainer.fit(Logging())
    assert sorted(set(step for step in read_at if 0 < step)) == [3, 6, 7]
