import csv

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_prune.callbacks import MaskMonitor
from lit_prune.callbacks.mask_monitor import gate_heatmap

LAYER_TAGS = {f"mask/gate/layer_{i:02d}" for i in range(6)}


def _no_tb_warnings(records):
    return [r for r in records if "TensorBoardLogger" in str(r.message)]


def test_tensorboard_gets_scalars_image_histogram_and_text(make_stub, make_trainer):
    module = make_stub(k_target=3)
    monitor = MaskMonitor(every_n_steps=2)
    trainer = make_trainer(max_steps=5, callbacks=[monitor], tensorboard=True)
    trainer.fit(module)

    # start of training, every 2nd step, and the end of training
    assert monitor.logged_steps == [0, 2, 4, 5]

    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert LAYER_TAGS | {"mask/num_dropped"} <= set(tags["scalars"])
    assert "mask/heatmap" in tags["images"]
    assert "mask/gate_values" in tags["histograms"]
    assert "mask/segments/text_summary" in tags["tensors"]

    assert [e.step for e in events.Scalars("mask/gate/layer_05")] == [0, 2, 4, 5]
    assert [e.value for e in events.Scalars("mask/num_dropped")] == [3.0] * 4
    last = events.Scalars("mask/gate/layer_05")[-1].value
    assert last == pytest.approx(module.layer_gate_values()[5].item())
    assert last < events.Scalars("mask/gate/layer_05")[0].value  # the stub's loss closes gate 5

    image = events.Images("mask/heatmap")[-1]
    assert image.step == 5
    assert (image.height, image.width) == (6 * 8, 4 * 8 + 2 + 8)  # 6 layers x (4 logged steps, gap, drop strip)

    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("mask/segments/text_summary")]
    assert len(texts) == 4
    # The stub's loss pushes higher layers' gates down: the drop moves from the bottom run to the top run.
    assert "drop [0, 1, 2]" in texts[0] and "segments [[0, 3]]" in texts[0]
    assert module.current_drop() == [3, 4, 5]
    assert "drop [3, 4, 5]" in texts[-1] and "segments [[3, 6]]" in texts[-1]


def test_history_matches_module_and_dedupes_accumulation(make_stub, make_trainer):
    module = make_stub()
    initial = module.layer_gate_values().clone()
    calls = []
    gate_values = module.layer_gate_values
    module.layer_gate_values = lambda: calls.append(1) or gate_values()
    monitor = MaskMonitor(every_n_steps=1, image=False)
    make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[monitor]).fit(module)

    assert monitor.logged_steps == [0, 1, 2, 3]  # one entry per optimizer step, not per micro-batch
    assert len(calls) == 4  # the module is asked once per recorded step
    assert monitor.history.shape == (4, 6)
    torch.testing.assert_close(monitor.history[0], initial)
    torch.testing.assert_close(monitor.history[-1], module.layer_gate_values())
    assert monitor.state_dict()["drops"][-1] == module.current_drop()


def test_warns_once_without_tensorboard_and_scalars_reach_other_loggers(make_stub, make_trainer, tmp_path):
    monitor = MaskMonitor(every_n_steps=2)
    # pytest.warns records every repeat (recwarn's "default" filter would hide a second identical warning)
    with pytest.warns(UserWarning, match="no TensorBoardLogger") as record:
        for _ in range(2):  # a second fit with the same callback must not warn again
            make_trainer(max_steps=2, callbacks=[monitor], logger=CSVLogger(tmp_path, name="csv")).fit(make_stub())
    assert len(_no_tb_warnings(record)) == 1
    assert "heat map" in str(_no_tb_warnings(record)[0].message)

    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert LAYER_TAGS | {"mask/num_dropped"} <= set(rows[0])
    assert {row["step"] for row in rows if row["mask/num_dropped"]} == {"0", "2"}


def test_no_warning_when_images_are_off(make_stub, make_trainer, recwarn):
    make_trainer(max_steps=1, callbacks=[MaskMonitor(image=False)]).fit(make_stub())
    assert _no_tb_warnings(recwarn) == []


def test_missing_capability_names_the_methods(bare_module, make_trainer):
    with pytest.raises(AttributeError, match=r"NoCapabilities.*layer_gate_values\(\)`, `current_drop\(\)"):
        make_trainer(max_steps=1, callbacks=[MaskMonitor(image=False)]).fit(bare_module)


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable", "ignore:.*callbacks used to create the checkpoint")
def test_resume_keeps_the_history(make_stub, make_trainer, tmp_path):
    full_monitor = MaskMonitor(every_n_steps=2, image=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(max_steps=7, callbacks=[full_monitor, ckpt]).fit(make_stub())

    resumed_monitor = MaskMonitor(every_n_steps=2, image=False)
    make_trainer(max_steps=7, callbacks=[resumed_monitor]).fit(
        make_stub(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    )
    assert resumed_monitor.logged_steps == full_monitor.logged_steps == [0, 2, 4, 6, 7]
    torch.testing.assert_close(resumed_monitor.history, full_monitor.history)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"every_n_steps": 0}, "every_n_steps=0"), ({"scope": "Mask"}, "'Mask'")]
)
def test_init_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskMonitor(**kwargs)


def test_gate_heatmap_colours_and_strip():
    history = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, float("nan")]])  # 2 steps x 3 layers
    image = gate_heatmap(history, dropped=[0], cell=4)
    assert image.shape == (3, 3 * 4, 2 * 4 + 1 + 4)
    assert image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0

    def pixel(layer, col):
        return image[:, layer * 4 + 1, col]

    closed, opened = pixel(0, 0), pixel(1, 0)
    assert opened.sum() > closed.sum()  # open gates are brighter
    torch.testing.assert_close(pixel(2, 0), (closed + opened) / 2)  # linear two-colour map
    torch.testing.assert_close(pixel(2, 5), closed)  # nan renders as closed
    strip = image.shape[2] - 1
    assert pixel(0, strip)[0] > 0.8 and pixel(0, strip)[1] < 0.2  # dropped layer 0 is red
    assert not torch.equal(pixel(1, strip), pixel(0, strip))  # kept layers are not


def test_gate_heatmap_narrows_columns_and_validates():
    assert gate_heatmap(torch.rand(100, 2), dropped=[], cell=8, max_width=300).shape == (3, 16, 300 + 2 + 8)
    assert gate_heatmap(torch.rand(0, 2), dropped=[1], cell=8).shape == (3, 16, 2 + 8)
    with pytest.raises(ValueError, match="outside"):
        gate_heatmap(torch.rand(3, 4), dropped=[4])
    with pytest.raises(ValueError, match="steps, layers"):
        gate_heatmap(torch.rand(4), dropped=[])
