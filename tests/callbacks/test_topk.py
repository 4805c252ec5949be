import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_prune.callbacks import TemperatureSchedule, TopKAnnealing


def _ks(module):
    return [s["k"] for s in module.seen]


def test_end_read_from_target_then_held(make_stub, make_trainer):
    module = make_stub(k_target=3)
    topk = TopKAnnealing(start=0, warmup_fraction=0.5)
    trainer = make_trainer(max_steps=10, callbacks=[topk])
    trainer.fit(module)

    # warm-up covers steps 0..4 (half of 10): 3 * step / 4 rounded half up, then 3 is held
    assert _ks(module) == [0, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert all(isinstance(k, int) for k in _ks(module))
    assert topk.resolved_end == 3
    assert module.k == 3
    assert trainer.callback_metrics["schedule/k"].item() == 3.0


def test_counts_optimizer_steps_under_accumulation(make_stub, make_trainer):
    module = make_stub(k_target=2)
    topk = TopKAnnealing(start=0, warmup_fraction=1.0)
    # 16 batches, 4 per optimizer step -> a horizon of 4 steps from trainer.estimated_stepping_batches
    make_trainer(max_steps=-1, max_epochs=1, accumulate_grad_batches=4, callbacks=[topk]).fit(module)
    assert _ks(module) == [0] * 4 + [1] * 4 + [1] * 4 + [2] * 4  # 2 * step / 3 rounded half up, per micro-batch


def test_step_mode_plateaus(make_stub, make_trainer):
    module = make_stub(k_target=4)
    make_trainer(max_steps=9, callbacks=[TopKAnnealing(start=0, mode="step", steps=2, warmup_fraction=1.0)]).fit(module)
    assert _ks(module) == [0, 0, 0, 0, 2, 2, 2, 2, 4]


def test_cosine_can_shrink_the_budget(make_stub, make_trainer):
    module = make_stub(k_target=2)
    make_trainer(max_steps=6, callbacks=[TopKAnnealing(start=6, mode="cosine", warmup_fraction=1.0)]).fit(module)
    ks = _ks(module)
    assert ks[0] == 6
    assert ks[-1] == 2
    assert all(b <= a for a, b in zip(ks, ks[1:]))
    assert len(set(ks)) > 2  # it moves through intermediate budgets, not a single jump


def test_explicit_end_equal_to_target_is_fine(make_stub, make_trainer):
    module = make_stub(k_target=3)
    make_trainer(max_steps=4, callbacks=[TopKAnnealing(start=1, end=3, warmup_fraction=1.0)]).fit(module)
    assert _ks(module) == [1, 2, 2, 3]  # 1 + 2 * step / 3, rounded half up


def test_explicit_end_without_target(make_stub, make_trainer):
    module = make_stub(k_target=None)
    make_trainer(max_steps=3, callbacks=[TopKAnnealing(start=4, end=2, warmup_fraction=1.0)]).fit(module)
    assert _ks(module) == [4, 3, 2]


def test_end_off_target_raises(make_stub, make_trainer):
    module = make_stub(k_target=3)
    with pytest.raises(ValueError, match=r"ends off target.*StubModule\.k_target.* 3"):
        make_trainer(max_steps=2, callbacks=[TopKAnnealing(end=5)]).fit(module)
    assert module.seen == []  # failed in setup, before any step


def test_no_end_and_no_target_raises(make_stub, make_trainer):
    with pytest.raises(AttributeError, match=r"StubModule\.k_target"):
        make_trainer(max_steps=2, callbacks=[TopKAnnealing()]).fit(make_stub(k_target=None))


def test_missing_attribute_names_class_and_attribute(bare_module, make_trainer):
    with pytest.raises(AttributeError, match=r"NoCapabilities\.k\b"):
        make_trainer(max_steps=1, callbacks=[TopKAnnealing(end=2)]).fit(bare_module)


def test_state_key_differs_per_attr_and_from_temperature():
    keys = {
        TopKAnnealing(attr="k").state_key,
        TopKAnnealing(attr="num_drop").state_key,
        TemperatureSchedule().state_key,
    }
    assert len(keys) == 3


def test_state_dict_round_trip(make_stub, make_trainer):
    topk = TopKAnnealing(start=0, warmup_fraction=1.0)
    make_trainer(max_steps=4, callbacks=[topk]).fit(make_stub(k_target=3))
    state = topk.state_dict()
    assert state == {"horizon": 4, "end": 3, "last_value": 3, "last_step": 3}

    restored = TopKAnnealing(start=0, end=3, warmup_fraction=1.0)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert [restored.value_at(s) for s in range(4)] == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:.*dataloader is not resumable", "ignore:.*callbacks used to create the checkpoint")
def test_resume_from_mid_run_checkpoint_is_exact(make_stub, make_trainer, tmp_path):
    full = make_stub(k_target=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(max_steps=8, callbacks=[TopKAnnealing(mode="cosine", warmup_fraction=0.75), ckpt]).fit(full)
    mid = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"

    resumed = make_stub(k_target=5)
    make_trainer(max_steps=8, callbacks=[TopKAnnealing(mode="cosine", warmup_fraction=0.75)]).fit(
        resumed, ckpt_path=mid
    )

    assert [s["step"] for s in resumed.seen] == list(range(3, 8))
    assert resumed.seen == full.seen[3:]
    assert _ks(full)[0] == 0 and _ks(full)[-1] == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": -1}, r"start=-1"),
        ({"end": -2}, r"end=-2"),
        ({"warmup_fraction": 0.0}, r"warmup_fraction=0\.0"),
        ({"warmup_fraction": 1.5}, r"warmup_fraction=1\.5"),
        ({"mode": "exp"}, r"mode.*'exp'"),
        ({"steps": 0}, r"steps=0"),
        ({"total_steps": 0}, r"total_steps=0"),
    ],
)
def test_init_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKAnnealing(**kwargs)
