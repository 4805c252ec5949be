import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_prune.callbacks import TemperatureSchedule


def _values(module, attr="temperature"):
    return [s[attr] for s in module.seen]


@pytest.mark.parametrize("mode", ["exp", "linear", "cosine"])
def test_first_last_and_monotone(mode, make_stub, make_trainer):
    module = make_stub()
    schedule = TemperatureSchedule(start=1.0, end=0.05, mode=mode)
    make_trainer(max_steps=6, callbacks=[schedule]).fit(module)

    values = _values(module)
    assert len(values) == 6
    assert values[0] == 1.0
    assert values[-1] == 0.05
    assert all(b < a for a, b in zip(values, values[1:]))
    assert schedule.horizon == 6
    assert module.temperature == 0.05


def test_exp_is_geometric(make_stub, make_trainer):
    module = make_stub()
    make_trainer(max_steps=5, callbacks=[TemperatureSchedule(start=16.0, end=1.0, mode="exp")]).fit(module)
    assert _values(module) == pytest.approx([16.0, 8.0, 4.0, 2.0, 1.0])


def test_warmup_holds_start(make_stub, make_trainer):
    module = make_stub()
    make_trainer(
        max_steps=8, callbacks=[TemperatureSchedule(start=2.0, end=1.0, mode="linear", warmup_fraction=0.5)]
    ).fit(module)
    # holds 2.0 on steps 0..3 (half of 8), then anneals 2.0 -> 1.0 over steps 4..7
    assert _values(module) == pytest.approx([2.0, 2.0, 2.0, 2.0, 2.0, 5 / 3, 4 / 3, 1.0])


def test_explicit_total_steps_then_holds_end(make_stub, make_trainer):
    module = make_stub()
    make_trainer(max_steps=5, callbacks=[TemperatureSchedule(start=1.0, end=0.5, mode="linear", total_steps=3)]).fit(
        module
    )
    assert _values(module) == pytest.approx([1.0, 0.75, 0.5, 0.5, 0.5])


def test_horizon_counts_optimizer_steps_under_accumulation(make_stub, make_trainer):
    module = make_stub()
    schedule = TemperatureSchedule(start=1.0, end=0.1, mode="linear")
    # 16 batches, 2 per optimizer step -> 8 steps; the horizon comes from trainer.estimated_stepping_batches.
    make_trainer(max_steps=-1, max_epochs=1, accumulate_grad_batches=2, callbacks=[schedule]).fit(module)
    assert schedule.horizon == 8
    values = _values(module)
    assert len(values) == 16
    assert values[0] == values[1] == 1.0  # both micro-batches of step 0
    assert values[-1] == values[-2] == 0.1


def test_two_instances_coexist_and_log(make_stub, make_trainer, tmp_path):
    module = make_stub()
    gate = TemperatureSchedule(start=2.0, end=0.5, mode="linear")
    kd = TemperatureSchedule(start=4.0, end=1.0, mode="cosine", attr="kd_temperature")
    assert gate.state_key != kd.state_key
    trainer = make_trainer(max_steps=4, callbacks=[gate, kd], tensorboard=True)
    trainer.fit(module)

    assert _values(module, "temperature") == pytest.approx([2.0, 1.5, 1.0, 0.5])
    assert _values(module, "kd_temperature") == pytest.approx([4.0, 3.25, 1.75, 1.0])
    assert trainer.callback_metrics["schedule/kd_temperature"].item() == pytest.approx(1.0)

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert {"schedule/temperature", "schedule/kd_temperature"} <= set(events.Tags()["scalars"])
    logged = [e.value for e in events.Scalars("schedule/temperature")]
    assert logged == pytest.approx([2.0, 1.5, 1.0, 0.5])


def test_state_dict_round_trip(make_stub, make_trainer):
    module = make_stub()
    schedule = TemperatureSchedule(start=1.0, end=0.25, mode="exp", attr="kd_temperature")
    make_trainer(max_steps=3, callbacks=[schedule]).fit(module)
    state = schedule.state_dict()
    assert state == {"horizon": 3, "last_value": 0.25, "last_step": 2}

    restored = TemperatureSchedule(start=1.0, end=0.25, mode="exp", attr="kd_temperature")
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.horizon == 3
    assert restored.value_at(1) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable", "ignore:.*callbacks used to create the checkpoint")
def test_resume_from_mid_run_checkpoint_is_exact(make_stub, make_trainer, tmp_path):
    def callbacks():
        return [
            TemperatureSchedule(start=1.0, end=0.05, mode="exp"),
            TemperatureSchedule(start=3.0, end=1.0, mode="cosine", attr="kd_temperature", warmup_fraction=0.25),
        ]

    full = make_stub()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(max_steps=8, callbacks=[*callbacks(), ckpt]).fit(full)
    mid = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert mid.exists()
    saved = torch.load(mid, weights_only=False)["callbacks"]
    assert {
        TemperatureSchedule(attr="temperature").state_key,
        TemperatureSchedule(attr="kd_temperature").state_key,
    } <= set(saved)

    resumed = make_stub()
    seen_at_train_start = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen_at_train_start.update(temperature=pl_module.temperature, kd_temperature=pl_module.kd_temperature)

    make_trainer(max_steps=8, callbacks=[*callbacks(), Probe()]).fit(resumed, ckpt_path=mid)

    assert resumed.seen == full.seen[4:]  # same steps, bit-identical values
    assert resumed.seen[-1]["temperature"] == 0.05
    # The checkpoint's values are back before the first resumed batch (not the module's init values).
    assert seen_at_train_start == {k: full.seen[3][k] for k in ("temperature", "kd_temperature")}


def test_missing_attribute_names_class_and_attribute(bare_module, make_trainer):
    with pytest.raises(AttributeError, match=r"NoCapabilities\.temperature"):
        make_trainer(max_steps=1, callbacks=[TemperatureSchedule()]).fit(bare_module)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": 0.0}, r"start.*start=0\.0"),
        ({"end": -1.0}, r"end.*end=-1\.0"),
        ({"warmup_fraction": 1.0}, r"warmup_fraction=1\.0"),
        ({"warmup_fraction": -0.1}, r"warmup_fraction=-0\.1"),
        ({"mode": "step"}, r"mode.*'step'"),
        ({"total_steps": 0}, r"total_steps=0"),
        ({"attr": "gate.tau"}, r"attr.*'gate\.tau'"),
    ],
)
def test_init_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TemperatureSchedule(**kwargs)
