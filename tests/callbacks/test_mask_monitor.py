import csv

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_prune.callbacks import MaskMonitor
from lit_prune.callbacks.mask_monitor import gate_heatmap, heatmap_size, heatmap_title

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
    width, height = heatmap_size(6, with_budget=True)  # the stub has a budget `k`: a panel under the heat map
    assert (image.width, image.height) == (round(width * 100), round(height * 100))

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


RED = (0xD6, 0x27, 0x28)  # lit_prune.reports.DROPPED_COLOR


def _red_pixels(image) -> int:
    return int((abs(image.astype(int) - RED).max(axis=-1) < 10).sum())


def test_gate_heatmap_is_a_labelled_figure_with_the_drop_marked():
    history = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, float("nan")]])  # 2 steps x 3 layers
    marked = gate_heatmap(history, [0, 10], dropped=[0], title=heatmap_title(10, [0], 3))
    unmarked = gate_heatmap(history, [0, 10], dropped=[])
    with_budget = gate_heatmap(history, [0, 10], dropped=[0], budget=[0.0, 1.0])

    width, height = heatmap_size(3, with_budget=False)
    assert marked.shape == unmarked.shape == (round(height * 100), round(width * 100), 3)
    assert marked.dtype.name == "uint8"
    assert with_budget.shape[0] > marked.shape[0]  # the k panel adds height, not width
    assert with_budget.shape[1] == marked.shape[1]
    assert _red_pixels(marked) > 100  # strip cell and the red label of layer 00
    assert _red_pixels(unmarked) == 0


def test_heatmap_title_names_the_segments():
    assert heatmap_title(40, [12, 13, 14, 20], 30) == "step 40: drop 4/30 layers, segments [12, 15), [20, 21)"
    assert heatmap_title(0, [], 30, budget=0) == "step 0: drop 0/30 layers, segments none, k = 0"


def test_gate_heatmap_validates():
    with pytest.raises(ValueError, match="outside"):
        gate_heatmap(torch.rand(3, 4), [0, 1, 2], dropped=[4])
    with pytest.raises(ValueError, match="steps, layers"):
        gate_heatmap(torch.rand(4), [0], dropped=[])
    with pytest.raises(ValueError, match="3 rows for 2 steps"):
        gate_heatmap(torch.rand(3, 4), [0, 1], dropped=[])
