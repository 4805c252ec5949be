import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_prune import ConcaveGate, GumbelTopKGate, MaskSearch, PruneDataModule
from lit_prune.callbacks import ModelExport, TemperatureSchedule, TopKAnnealing

ROOT = Path(__file__).parents[2]


def _data(tiny_checkpoint, tiny_text):
    return PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)


def _search(tiny_checkpoint, gate=None, **kwargs):
    gate = gate or (lambda n, k: ConcaveGate(n, k, protect_first=1, protect_last=1))
    return MaskSearch(str(tiny_checkpoint), gate=gate, num_drop=2, ratio=None,
                      optimizer=lambda p: torch.optim.Adam(p, lr=0.2), **kwargs)


def _trainer(tmp_path, steps=4, callbacks=(), **kwargs):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     num_sanity_val_steps=0, limit_val_batches=2, callbacks=list(callbacks), **kwargs)


def test_only_the_gate_trains_and_mask_is_exported(tiny_checkpoint, tiny_text, tmp_path):
    module = _search(tiny_checkpoint)
    trainer = _trainer(tmp_path, callbacks=[ModelExport(what="both")])
    start = module.gate.starts.detach().clone()
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    assert all(not p.requires_grad for p in module.model.parameters())
    assert not torch.equal(start, module.gate.starts.detach()), "the gate received gradients and moved"
    mask = json.loads((tmp_path / "mask.json").read_text())
    assert mask["method"] == "clp" and mask["num_layers"] == 6 and len(mask["drop"]) == 2
    assert len(mask["segments"]) == 1 and mask["segments"][0][1] - mask["segments"][0][0] == 2
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_hidden_layers == 4


def test_validation_reports_hard_mask_kl_and_ppl(tiny_checkpoint, tiny_text, tmp_path):
    module = _search(tiny_checkpoint)
    trainer = _trainer(tmp_path)
    trainer.validate(module, datamodule=_data(tiny_checkpoint, tiny_text))
    metrics = trainer.callback_metrics
    assert metrics["val/kl"] > 0
    assert metrics["val/ppl"] != metrics["val/dense_ppl"]


def test_e3_with_kl_importance_and_topk_curriculum(tiny_checkpoint, tiny_text, tmp_path):
    module = _search(tiny_checkpoint, gate=lambda n, k: GumbelTopKGate(n, k), importance_init="kl",
                     importance_batches=1)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.k)

    trainer = _trainer(tmp_path, steps=6, callbacks=[TopKAnnealing(start=0, warmup_fraction=0.5), Spy()])
    logits_before = module.gate.logits.detach().clone()
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    assert bool(module.importance_done)
    assert not torch.equal(logits_before, module.gate.logits.detach())
    assert seen[0] == 0 and seen[-1] == module.k_target == 2
    assert module.mask_artifact().scores is not None


def test_checkpoint_keeps_only_the_gate_and_resume_matches(tiny_checkpoint, tiny_text, tmp_path):
    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                trainer.should_stop = True

    def run(stop=False, ckpt=None, save=None):
        L.seed_everything(7)
        module = _search(tiny_checkpoint)
        callbacks = [TemperatureSchedule(start=1.0, end=0.1)] + ([StopAt()] if stop else [])
        trainer = _trainer(tmp_path, steps=6, callbacks=callbacks)
        trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module

    full = run()
    run(stop=True, save=tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["state_dict"]
    assert set(state) == {"gate.starts", "importance_done"}
    resumed = run(ckpt=str(tmp_path / "mid.ckpt"))
    torch.testing.assert_close(resumed.gate.starts, full.gate.starts)
    assert resumed.current_drop() == full.current_drop()
    assert resumed.temperature == pytest.approx(full.temperature)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ratio=0.0, num_drop=None), r"ratio` must be in \(0, 1\)"),
        (dict(ratio=1.0, num_drop=None), r"ratio` must be in \(0, 1\)"),
        (dict(ratio=None, num_drop=6), r"num_drop` must be in \[1, 5\]"),
        (dict(ratio=None, num_drop=None), "exactly one of"),
        (dict(ratio=None, num_drop=5), "num_drop"),  # 5 of 6 with two protected layers cannot fit
        (dict(refine="best"), r"`model.init_args.refine` must be one of \['none', 'select', 'polish'\], got 'best'"),
        (dict(kl_direction="both"), r"`model.init_args.kl_direction` must be one of \['forward', 'reverse'\]"),
        (dict(calibration="random"), r"`model.init_args.calibration` must be one of \['spread', 'first'\]"),
    ],
)
def test_bad_budget_fails_before_weights_load(tiny_checkpoint, kwargs, message, monkeypatch):
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match=message):
        MaskSearch(str(tiny_checkpoint), gate=lambda n, k: ConcaveGate(n, k), **kwargs)


def test_topk_annealing_on_a_gate_without_budget_is_rejected(tiny_checkpoint, tiny_text, tmp_path):
    module = _search(tiny_checkpoint)
    with pytest.raises(Exception, match="k"):
        _trainer(tmp_path, callbacks=[TopKAnnealing()]).fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    assert module.model is None, "the capability check ran before the weights loaded"


def test_importance_init_needs_logits(tiny_checkpoint):
    with pytest.raises(ValueError, match="importance_init"):
        _search(tiny_checkpoint, importance_init="kl")


@pytest.mark.parametrize("gate", [lambda n, k: ConcaveGate(n, k), lambda n, k: GumbelTopKGate(n, k)])
def test_activation_checkpointing_gives_the_same_gate_gradient(tiny_checkpoint, gate):
    batch = {"input_ids": torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    grads = []
    for checkpointing in (False, True):
        module = _search(tiny_checkpoint, gate=gate, gradient_checkpointing=checkpointing)
        module.configure_model()
        module.train()
        torch.manual_seed(0)
        module.training_step(batch, 0).backward()
        grads.append(next(module.gate.parameters()).grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def _calibration_objective(module, data):
    from lit_prune.components.refine import mask_kl_objective
    from lit_prune.data import calibration_indices

    data.setup("fit")
    # importance_batches=2 batches of batch_size 2, picked by the module's `calibration` rule from dataset order
    rows = [data.train_set[i] for i in calibration_indices(len(data.train_set), 2 * 2, module.calibration)]
    batches = [torch.stack([torch.as_tensor(r["input_ids"]) for r in rows[i : i + 2]]) for i in (0, 2)]
    return mask_kl_objective(module.model, module.gating, batches)


def test_clp_window_scan_start_and_polish_give_the_exact_scan_optimum(tiny_checkpoint, tiny_text, tmp_path):
    # A large learning rate pushes the notch around; the refined mask is still the calibration optimum.
    module = MaskSearch(str(tiny_checkpoint), gate=lambda n, k: ConcaveGate(n, k, protect_first=1, protect_last=1),
                        num_drop=2, ratio=None, importance_init="window_scan", refine="polish",
                        optimizer=lambda p: torch.optim.Adam(p, lr=2.0))
    data = _data(tiny_checkpoint, tiny_text)
    _trainer(tmp_path, steps=4, callbacks=[ModelExport()]).fit(module, datamodule=data)
    objective = _calibration_objective(module, data)
    windows = [tuple(range(s, s + 2)) for s in range(1, 4)]
    best = min(windows, key=lambda w: (objective(w), w))
    assert tuple(module.current_drop()) == best
    mask = json.loads((tmp_path / "mask.json").read_text())
    assert tuple(mask["drop"]) == best and mask["extra"]["refine"]["mode"] == "polish"
    assert mask["extra"]["refine"]["calibration_kl"] == pytest.approx(objective(best))


def _e3(tiny_checkpoint, **kwargs):
    return MaskSearch(str(tiny_checkpoint), gate=lambda n, k: GumbelTopKGate(n, k, protect_first=1, protect_last=1),
                      num_drop=2, ratio=None, importance_init="kl_greedy", importance_batches=2, refine="polish",
                      refine_radius="auto", optimizer=lambda p: torch.optim.Adam(p, lr=0.5), **kwargs)


def test_e3_greedy_init_and_polish_reach_a_swap_local_optimum(tiny_checkpoint, tiny_text, tmp_path):
    import itertools

    module = _e3(tiny_checkpoint)
    data = _data(tiny_checkpoint, tiny_text)
    _trainer(tmp_path, steps=6, callbacks=[TopKAnnealing(start=0, warmup_fraction=0.3)]).fit(module, datamodule=data)
    report = module.refine_report
    objective = _calibration_objective(module, data)
    drop = tuple(module.current_drop())
    assert list(drop) == report["drop"] and objective(drop) == pytest.approx(report["calibration_kl"])
    # No single swap improves it, and it is no worse than the greedy start or the learned mask.
    for out, into in itertools.product(drop, [c for c in range(1, 5) if c not in drop]):
        assert objective(tuple(sorted({*drop} - {out} | {into}))) >= report["calibration_kl"] - 1e-9
    assert report["calibration_kl"] <= objective(tuple(report["learned_drop"])) + 1e-9
    init = tuple(int(i) for i in torch.nonzero(~module.init_keep).flatten())
    assert len(init) == 2 and report["calibration_kl"] <= objective(init) + 1e-9
    assert int(module.sampled_valid.sum()) >= 1


def test_e3_selection_considers_the_best_window(tiny_checkpoint, tiny_text, tmp_path):
    # The learned mask is pinned (lr 0) to a non-contiguous pair; selection must still see the best window.
    gate = lambda n, k: GumbelTopKGate(n, k, protect_first=1, protect_last=1, init_logits=[0, -5, 0, -5, 0, 0])  # noqa: E731
    module = MaskSearch(str(tiny_checkpoint), gate=gate, num_drop=2, ratio=None, importance_batches=2, refine="select",
                        refine_samples=0, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    data = _data(tiny_checkpoint, tiny_text)
    _trainer(tmp_path, steps=2).fit(module, datamodule=data)
    report = module.refine_report
    objective = _calibration_objective(module, data)
    window = min((tuple(range(s, s + 2)) for s in range(1, 4)), key=lambda w: (objective(w), w))
    assert report["learned_drop"] == [1, 3] and report["candidates"] == 2
    assert objective(window) < objective((1, 3))  # the case this test is about
    assert report["chosen"] == "window" and tuple(report["drop"]) == window
    assert report["calibration_kl"] == pytest.approx(objective(window))


def test_e3_same_seed_and_resume_give_the_same_refined_mask(tiny_checkpoint, tiny_text, tmp_path):
    class SaveAt(L.Callback):  # what a ModelCheckpoint does mid-run
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    def run(ckpt=None, save=False):
        L.seed_everything(11)
        module = _e3(tiny_checkpoint)
        callbacks = [TopKAnnealing(start=0, warmup_fraction=0.3), TemperatureSchedule(start=1.0, end=0.1)]
        trainer = _trainer(tmp_path, steps=8, callbacks=callbacks + ([SaveAt()] if save else []))
        trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text), ckpt_path=ckpt)
        return module

    full, again = run(save=True), run()
    assert full.current_drop() == again.current_drop()
    torch.testing.assert_close(full.gate.logits, again.gate.logits)
    resumed = run(ckpt=str(tmp_path / "mid.ckpt"))
    torch.testing.assert_close(resumed.gate.logits, full.gate.logits)
    assert resumed.current_drop() == full.current_drop()
    assert resumed.refine_report["learned_drop"] == full.refine_report["learned_drop"]
    assert full.refine_report["radius"] is None  # refine_radius auto: any pair on a 6-layer model
    assert full.refine_report["calibration"] == "spread"  # the default, recorded in mask.json
    torch.testing.assert_close(resumed.sampled_keep, full.sampled_keep)


def test_refine_options_are_checked_before_weights_load(tiny_checkpoint):
    with pytest.raises(ValueError, match="window_scan"):
        _search(tiny_checkpoint, gate=lambda n, k: GumbelTopKGate(n, k), importance_init="window_scan")
    with pytest.raises(ValueError, match="kl_greedy"):
        _search(tiny_checkpoint, importance_init="kl_greedy")
    with pytest.raises(ValueError, match="refine_radius"):
        _search(tiny_checkpoint, refine="polish", refine_radius=0)
    with pytest.raises(ValueError, match="refine_radius.*auto"):
        _search(tiny_checkpoint, refine="polish", refine_radius="wide")


def test_k_exists_only_for_gates_with_a_budget(tiny_checkpoint):
    concave = _search(tiny_checkpoint)
    assert not hasattr(concave, "k") and not hasattr(concave, "k_target")  # TopKAnnealing refuses such a module
    with pytest.raises(AttributeError, match="ConcaveGate has no layer budget `k`"):
        concave.k = 1
    topk = _search(tiny_checkpoint, gate=lambda n, k: GumbelTopKGate(n, k))
    assert topk.k == topk.gate.k and topk.k_target == topk.gate.k_target == 2
    topk.k = 1
    assert topk.gate.k == 1 and "k" not in vars(topk)
