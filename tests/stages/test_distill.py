"""Distill: entropy-aware KD from an online or cached teacher into the pruned student."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import tiny_model

from lit_prune.callbacks import ModelExport, TemperatureSchedule
from lit_prune.components.losses import next_token_ce
from lit_prune.components.teacher_cache import write_topk_cache
from lit_prune.data import PruneDataModule, collate_blocks
from lit_prune.stages.distill import Distill


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


def _data(tiny_checkpoint, tiny_text, max_length=32):
    return PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=max_length,
                           batch_size=2, val_fraction=0.2)


@pytest.fixture(scope="module")
def tiny_cache(tiny_checkpoint, tiny_text, tmp_path_factory) -> Path:
    data = _data(tiny_checkpoint, tiny_text)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=8, collate_fn=collate_blocks)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    return write_topk_cache(teacher, loader, tmp_path_factory.mktemp("cache") / "k4", k=4,
                            model_id=str(tiny_checkpoint))


def _stage(tiny_checkpoint, tiny_mask, **kwargs):
    kwargs.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=0.01))
    if "teacher_cache" not in kwargs:
        kwargs.setdefault("teacher", str(tiny_checkpoint))
    return Distill(str(tiny_checkpoint), mask=str(tiny_mask), r=4, alpha=8.0, dropout=0.0, **kwargs)


def _trainer(tmp_path, steps=3, callbacks=()):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     num_sanity_val_steps=0, limit_val_batches=1, callbacks=list(callbacks))


def _batch(tiny_checkpoint, tiny_text):
    data = _data(tiny_checkpoint, tiny_text)
    data.setup("fit")
    return collate_blocks([data.train_set[i] for i in (0, 3)])


def test_kd_share_zero_is_plain_cross_entropy(tiny_checkpoint, tiny_mask, tiny_text):
    module = _stage(tiny_checkpoint, tiny_mask, kd_share=0.0)
    module.configure_model()
    batch = _batch(tiny_checkpoint, tiny_text)
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, next_token_ce(module(batch["input_ids"]), batch["labels"]))
    mixed = _stage(tiny_checkpoint, tiny_mask, kd_share=0.5)
    mixed.configure_model()
    assert not torch.isclose(mixed.training_step(batch, 0), loss)


def test_teacher_is_frozen_outside_the_optimizer_and_the_checkpoint(tiny_checkpoint, tiny_mask, tiny_text, tmp_path):
    module = _stage(tiny_checkpoint, tiny_mask, train="all")
    trainer = _trainer(tmp_path, steps=2)
    teacher_before = None

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal teacher_before
            teacher_before = {k: v.clone() for k, v in pl_module.teacher_model.state_dict().items()}

    trainer.callbacks.append(Grab())
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    teacher = module.teacher_model
    assert not teacher.training and module.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert in_optimizer == {id(p) for p in module.model.parameters()}, "train: all updates every student weight"
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher_model.") for k in state)


def test_cached_teacher_equals_online_topk_teacher(tiny_checkpoint, tiny_mask, tiny_text, tiny_cache, monkeypatch):
    batch = _batch(tiny_checkpoint, tiny_text)
    online = _stage(tiny_checkpoint, tiny_mask, teacher_k=4, kd_temperature=1.5)
    online.configure_model()
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("a cached run loads no teacher"))
    cached = _stage(tiny_checkpoint, tiny_mask, teacher_cache=str(tiny_cache), kd_temperature=1.5,
                    cache_variant="renormalized")
    cached.model = online.model  # the same student, so only the teacher's source differs
    torch.testing.assert_close(cached.training_step(batch, 0), online.training_step(batch, 0))
    assert cached.teacher_model is None


def test_cached_teacher_training_lowers_the_loss(tiny_checkpoint, tiny_mask, tiny_text, tiny_cache, tmp_path):
    module = _stage(tiny_checkpoint, tiny_mask, teacher_cache=str(tiny_cache), train="endpoints",
                    cache_variant="renormalized", optimizer=lambda p: torch.optim.Adam(p, lr=0.003))
    module.configure_model()
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert {n.split(".")[2] for n in trainable} == {"1", "2"}, "train: endpoints updates the layers next to the cut"
    assert all(n.startswith("model.layers.") for n in trainable)
    optimizer = module.configure_optimizers()
    batch = _batch(tiny_checkpoint, tiny_text)
    losses = []
    for _ in range(6):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(after < before for before, after in zip(losses, losses[1:])), losses


def test_fit_with_cache_schedule_and_export(tiny_checkpoint, tiny_mask, tiny_text, tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    module = _stage(tiny_checkpoint, tiny_mask, teacher_cache=str(tiny_cache), lora_layers="endpoints")
    callbacks = [TemperatureSchedule(start=3.0, end=1.0, mode="linear"), ModelExport(what="model")]
    trainer = _trainer(tmp_path, steps=3, callbacks=callbacks)
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    metrics = trainer.callback_metrics
    for key in ("train/kd", "train/ce", "train/loss", "train/entropy_weight_mean", "train/teacher_entropy"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["train/entropy_weight_mean"].item() == pytest.approx(1.0, abs=1e-4)
    assert module.temperature == pytest.approx(1.0) and module.kd_temperature == pytest.approx(1.0)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert exported.config.num_hidden_layers == 4


def test_cache_from_other_block_length_fails_before_weights_load(tiny_checkpoint, tiny_mask, tiny_text, tiny_cache,
                                                                 tmp_path):
    module = _stage(tiny_checkpoint, tiny_mask, teacher_cache=str(tiny_cache))
    with pytest.raises(ValueError, match=r"holds blocks of 32 tokens, but `data.max_length`=16"):
        _trainer(tmp_path).fit(module, datamodule=_data(tiny_checkpoint, tiny_text, max_length=16))
    assert module.model is None


def test_teacher_with_another_vocabulary_is_refused(tiny_checkpoint, tiny_mask, tmp_path, monkeypatch):
    other = tiny_model("llama")
    other.resize_token_embeddings(120)
    other.save_pretrained(tmp_path / "other")
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=r"`model.init_args.teacher`=.*vocab_size 120.*has 103"):
        _stage(tiny_checkpoint, tiny_mask, teacher=str(tmp_path / "other"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(teacher=None), "exactly one of `model.init_args.teacher`"),
        (dict(teacher_cache="CACHE"), "exactly one of"),
        (dict(teacher=None, teacher_cache="CACHE", teacher_k=10), r"top-4 logits per token, `model.init_args.teach"),
        (dict(teacher=None, teacher_cache="/nowhere"), r"teacher_cache`='/nowhere'.*meta.json is missing"),
        (dict(kd_share=1.5), r"kd_share` must be in \[0, 1\]"),
        (dict(weighting="entropy"), r"weighting` must be one of \['normalized', 'linear', 'none', 'student_sel"),
        (dict(weighting="student_selective", select_fraction=0.0), r"select_fraction` must be in \(0, 1\]"),
        (dict(train="head"), r"train` must be one of"),
        (dict(target_modules=["qkv"]), "match no module"),
    ],
)
def test_bad_settings_fail_before_weights_load(tiny_checkpoint, tiny_mask, tiny_cache, kwargs, message, monkeypatch):
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    kwargs = {k: (str(tiny_cache) if v == "CACHE" else v) for k, v in kwargs.items()}
    kwargs.setdefault("teacher", str(tiny_checkpoint))
    with pytest.raises(ValueError, match=message):
        Distill(str(tiny_checkpoint), mask=str(tiny_mask), **kwargs)


def test_renamed_keys_still_work_for_one_release(tiny_checkpoint, tiny_mask, tiny_text):
    with pytest.deprecated_call(match=r"`model.init_args.ce_weight` is deprecated.*`kd_share: 0.75`"):
        old = _stage(tiny_checkpoint, tiny_mask, ce_weight=0.25)
    assert old.kd_share == 0.75
    with pytest.deprecated_call(match=r"`model.init_args.direction` is deprecated.*`kl_direction: 'reverse'`"):
        assert _stage(tiny_checkpoint, tiny_mask, direction="reverse").kl_direction == "reverse"
    # The old share of CE trains exactly what the new share of KD does.
    batch = _batch(tiny_checkpoint, tiny_text)
    new = _stage(tiny_checkpoint, tiny_mask, kd_share=0.75)
    old.configure_model()
    new.configure_model()
    new.model.load_state_dict(old.model.state_dict())
    torch.testing.assert_close(old.training_step(batch, 0), new.training_step(batch, 0))
    with pytest.raises(ValueError, match=r"`model.init_args.ce_weight`=0.25 \(deprecated\) and `model.init_args.kd_"):
        _stage(tiny_checkpoint, tiny_mask, ce_weight=0.25, kd_share=0.5)
    with pytest.raises(ValueError, match=r"`model.init_args.ce_weight` must be in \[0, 1\], got 1.5"):
        _stage(tiny_checkpoint, tiny_mask, ce_weight=1.5)
    with pytest.raises(ValueError, match=r"`model.init_args.direction` must be one of \['forward', 'reverse'\]"):
        _stage(tiny_checkpoint, tiny_mask, direction="sideways")
