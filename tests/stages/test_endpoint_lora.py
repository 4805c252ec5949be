"""EndpointLoRA: LoRA only next to the cuts, merged vanilla export, checks before any weight loads."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_prune.callbacks import ModelExport
from lit_prune.components.checkpoint import export_from_mask
from lit_prune.data import PruneDataModule
from lit_prune.stages.endpoint_lora import EndpointLoRA

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


def _stage(tiny_checkpoint, tiny_mask, **kwargs):
    kwargs.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=0.05))
    return EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), r=4, alpha=8.0, dropout=0.0, **kwargs)


def _trainer(tmp_path, steps=3, callbacks=()):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                     num_sanity_val_steps=0, limit_val_batches=1, callbacks=list(callbacks))


def _data(tiny_checkpoint, tiny_text):
    return PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)


def _layer_of(name: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", name).group(1))


def test_only_endpoint_layers_carry_lora(tiny_checkpoint, tiny_mask):
    # Dropping [2, 3] of 6 keeps [0, 1, 4, 5]: the endpoints are old 1 and old 4 = post-surgery 1 and 2.
    module = _stage(tiny_checkpoint, tiny_mask, target_modules=["q_proj", "down_proj"], train_norm=True)
    assert module.endpoints == [1, 2]
    module.configure_model()
    lora = [n for n, _ in module.named_parameters() if "lora_" in n]
    assert {_layer_of(n) for n in lora} == {1, 2}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "down_proj"}
    trainable = module.trainable_parameter_names()
    assert set(trainable) - set(lora), "train_norm adds the endpoint norms"
    assert all("lora_" in n or "layernorm" in n for n in trainable)
    assert {_layer_of(n) for n in trainable} == {1, 2}
    assert module.model.get_base_model().config.num_hidden_layers == 4


def test_fit_trains_lora_checkpoint_keeps_it_and_merged_export_matches(tiny_checkpoint, tiny_mask, tiny_text,
                                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    module = _stage(tiny_checkpoint, tiny_mask, save_adapter=True)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at 0 and must have moved"
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), "frozen weights are not in the checkpoint"

    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        peft_logits = module(ids)
    module.save_pruned_model(str(tmp_path / "pruned"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert exported.config.num_hidden_layers == 4
    assert not any("lora" in k for k in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, peft_logits, rtol=1e-4, atol=1e-4)
    mask = json.loads((tmp_path / "pruned" / "mask.json").read_text())
    assert mask["drop"] == [2, 3] and mask["extra"]["recovery"]["endpoints"] == [1, 2]
    assert (tmp_path / "pruned" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()


def test_model_export_callback_writes_the_merged_model(tiny_checkpoint, tiny_mask, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    module = _stage(tiny_checkpoint, tiny_mask, loss="mix", kd_share=0.5)
    trainer = _trainer(tmp_path, steps=2, callbacks=[ModelExport(what="model")])
    trainer.fit(module, datamodule=_data(tiny_checkpoint, tiny_text))
    assert all(not p.requires_grad for p in module.teacher_model.parameters())
    assert module.teacher_model.config.num_hidden_layers == 6
    assert torch.isfinite(trainer.callback_metrics["train/kd"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").config.num_hidden_layers == 4


def test_already_pruned_folder_uses_its_mask_json(tiny_checkpoint, tiny_mask, tmp_path):
    pruned = export_from_mask(str(tiny_checkpoint), str(tiny_mask), tmp_path / "pruned")
    module = EndpointLoRA(str(pruned), mask=None)
    assert module.endpoints == [1, 2] and module.drop_now == []
    assert module.mask_artifact().drop == [2, 3]
    (pruned / "mask.json").unlink()
    with pytest.raises(ValueError, match="endpoint_layers_override"):
        EndpointLoRA(str(pruned), mask=None)
    assert EndpointLoRA(str(pruned), endpoint_layers_override=[0, 3]).endpoints == [0, 3]
    with pytest.raises(ValueError, match=r"endpoint_layers_override.*\[0, 3\]"):
        EndpointLoRA(str(pruned), endpoint_layers_override=[4])
    with pytest.raises(ValueError, match="model.init_args.teacher"):
        EndpointLoRA(str(pruned), endpoint_layers_override=[1], loss="kd")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(target_modules=["c_attn"]), r"target_modules` entries \['c_attn'\] match no module.*self_attn\.q_proj"),
        (dict(mask=str(ROOT / "configs/masks/smollm2_drop_13_19.json")), r"model.init_args.mask`=.*30 decoder layers"),
        (dict(width=0), "width` must be an integer >= 1"),
        (dict(lora_options={"layers_to_transform": [0]}), "derives from the mask"),
        (dict(lora_options={"use_dora_typo": True}), "unknown peft.LoraConfig fields"),
        (dict(loss="kl"), r"loss` must be one of \['ce', 'kd', 'mix'\]"),
        (dict(teacher="x"), "only used by `loss: kd`"),
        (dict(r=0), "LoRA rank"),
    ],
)
def test_bad_settings_fail_before_weights_load(tiny_checkpoint, tiny_mask, kwargs, message, monkeypatch):
    import lit_prune.hf as hf

    def no_weights(*args, **kwargs):
        pytest.fail("weights were loaded")

    monkeypatch.setattr(hf, "load_causal_lm", no_weights)
    kwargs = {"mask": str(tiny_mask), **kwargs}
    with pytest.raises(ValueError, match=message):
        EndpointLoRA(str(tiny_checkpoint), **kwargs)


def test_resume_restores_the_lora_weights_from_a_stripped_checkpoint(tiny_checkpoint, tiny_mask, tiny_text, tmp_path):
    def lora_state(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}

    first = _stage(tiny_checkpoint, tiny_mask)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(first, datamodule=_data(tiny_checkpoint, tiny_text))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = _stage(tiny_checkpoint, tiny_mask)
    _trainer(tmp_path, steps=2).fit(resumed, datamodule=_data(tiny_checkpoint, tiny_text),
                                    ckpt_path=str(tmp_path / "mid.ckpt"))
    want, got = lora_state(first), lora_state(resumed)
    assert want.keys() == got.keys() and any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_kd_weight_is_the_deprecated_name_of_kd_share(tiny_checkpoint, tiny_mask):
    with pytest.deprecated_call(match=r"`model.init_args.kd_weight` is deprecated.*`kd_share: 0.3`"):
        assert _stage(tiny_checkpoint, tiny_mask, loss="mix", kd_weight=0.3).kd_share == 0.3
    with pytest.raises(ValueError, match=r"`model.init_args.kd_weight` must be in \[0, 1\], got 2"):
        _stage(tiny_checkpoint, tiny_mask, loss="mix", kd_weight=2)
    with pytest.raises(ValueError, match=r"`model.init_args.kd_share` must be in \[0, 1\], got -0.1"):
        _stage(tiny_checkpoint, tiny_mask, loss="mix", kd_share=-0.1)


def test_shared_recovery_settings_are_declared_once():
    import inspect

    from lit_prune.stages.distill import Distill
    from lit_prune.stages.recovery import RecoveryStage

    shared = {"teacher", "kd_temperature", "width", "endpoint_layers_override", "target_modules", "r", "alpha",
              "dropout", "lora_options", "allow_model_mismatch", "save_adapter", "dtype", "optimizer",
              "gradient_checkpointing"}
    assert shared <= set(inspect.signature(RecoveryStage).parameters)
    for stage in (EndpointLoRA, Distill):
        assert not set(inspect.signature(stage).parameters) & shared, f"{stage.__name__} redeclares shared settings"


def test_lora_dropout_on_fused_moe_experts_is_refused_before_weights_load(tmp_path, monkeypatch):
    from tiny import char_tokenizer, tiny_model

    import lit_prune.hf as hf

    # DeepSeek-V3: `down_proj` names the shared expert's Linear and, for peft, the experts' fused weight too.
    folder = tmp_path / "deepseek_v3"
    tiny_model("deepseek_v3").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("weights were loaded"))
    last = 5
    with pytest.raises(ValueError, match=r"dropout`=0.05 .*fused expert weights .*mlp\.experts\.down_proj"):
        EndpointLoRA(str(folder), endpoint_layers_override=[last], target_modules=["q_a_proj", "down_proj"])
    # Attention-only targets, or no dropout, are accepted.
    EndpointLoRA(str(folder), endpoint_layers_override=[last], target_modules=["q_a_proj", "o_proj"])
    EndpointLoRA(str(folder), endpoint_layers_override=[last], target_modules=["q_a_proj", "down_proj"], dropout=0.0)
