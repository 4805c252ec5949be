"""Recovery stages with `compensate: linear`: the map is fitted on the first training blocks, then the cut is healed."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny import tiny_config

from lit_prune import EndpointLoRA
from lit_prune.components.compensate import CompensationError, compensate_linear
from lit_prune.data import PruneDataModule


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


def test_endpoint_lora_compensates_before_the_cut(tiny_checkpoint, tiny_mask, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    data = PruneDataModule(tokenizer=str(tiny_checkpoint), text_files=[str(tiny_text)], max_length=32, batch_size=2,
                           val_fraction=0.2)
    module = EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), r=4, alpha=8.0, dropout=0.0,
                          compensate="linear", compensate_tokens=64, optimizer=lambda p: torch.optim.Adam(p, lr=0.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)

    expected = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    plain = expected.model.layers[1].mlp.down_proj.weight.detach().clone()
    blocks = torch.stack([torch.as_tensor(data.train_set[i]["input_ids"]) for i in range(2)])  # 64 tokens
    compensate_linear(expected, [2, 3], blocks.split(4))
    weights = {n: p for n, p in module.model.named_parameters() if "layers.1.mlp.down_proj" in n and "lora_" not in n}
    (got,) = weights.values()
    torch.testing.assert_close(got, expected.model.layers[1].mlp.down_proj.weight)
    assert not torch.allclose(got, plain)
    # mask.json says what was fitted, as `export --compensate linear` does
    record = module.mask_artifact().extra["recovery"]["compensation"]
    assert record["calib_tokens"] == 64 and record["ridge"] == 0.0
    ((segment),) = record["segments"]
    assert segment["segment"] == [2, 4] and segment["folded_into_layer"] == 1
    before, after = segment["calib_relative_error"]
    assert after < before


def test_compensate_is_checked_before_weights_load(tiny_checkpoint, tiny_mask, tmp_path, monkeypatch):
    import lit_prune.hf as hf

    monkeypatch.setattr(hf, "load_causal_lm", lambda *a, **k: pytest.fail("no weights may load"))
    with pytest.raises(CompensationError, match="model.init_args.compensate_tokens"):
        EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), compensate="linear", compensate_tokens=0)
    with pytest.raises(CompensationError, match="model.init_args.compensate`"):
        EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), compensate="quadratic")
    gemma = tmp_path / "gemma3"
    tiny_config("gemma3_text").save_pretrained(gemma)
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(gemma), "num_layers": 6, "drop": [2, 3]}))
    with pytest.raises(CompensationError, match="post_feedforward_layernorm"):
        EndpointLoRA(str(gemma), mask=str(mask), compensate="linear", target_modules=["down_proj"])
