"""EndpointLoRA with ``quantize_base: nf4`` (QLoRA): refused clearly without CUDA; trains and exports on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_prune.stages.endpoint_lora import EndpointLoRA


@pytest.fixture(scope="module")
def tiny_mask(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mask") / "mask.json"
    path.write_text(json.dumps({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3]}))
    return path


def test_nf4_without_cuda_is_refused_before_the_model_is_read(tiny_checkpoint, tiny_mask, monkeypatch):
    import lit_prune.hf as hf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hf, "load_config", lambda *a, **k: pytest.fail("the model was read"))
    with pytest.raises(ValueError) as err:
        EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), quantize_base="nf4")
    message = str(err.value)
    for part in ("`model.init_args.quantize_base`='nf4'", "CUDA", "Allowed: none, nf4",
                 "`model.init_args.quantize_base: none`", "lit_prune[quant-cuda]"):
        assert part in message


def test_quantize_base_must_be_a_listed_value(tiny_checkpoint, tiny_mask):
    with pytest.raises(ValueError, match=r"`model.init_args.quantize_base` must be one of \['none', 'nf4'\]"):
        EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), quantize_base="int4")
    assert EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask)).quantize_base == "none"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes 4-bit) needs CUDA")
def test_qlora_trains_lora_on_a_4bit_base_and_exports_a_float_merged_model(tiny_checkpoint, tiny_mask, tmp_path):
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    stage = EndpointLoRA(str(tiny_checkpoint), mask=str(tiny_mask), quantize_base="nf4", r=4, alpha=8.0, dropout=0.0,
                         optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    # Plain random blocks: this test runs on GPU images that lack `datasets`.
    blocks = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (8, 32))]
    data = DataLoader(blocks, batch_size=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(stage, train_dataloaders=data)
    stage.model.to("cuda")  # fit's teardown left the module on the CPU
    base_layer = stage.model.base_model.model.model.layers[1].mlp.down_proj.base_layer
    assert base_layer.weight.dtype == torch.uint8  # the 4-bit payload
    assert all("lora_" in n for n, p in stage.model.named_parameters() if p.requires_grad)
    ids = torch.randint(3, 100, (2, 16), device="cuda")
    with torch.no_grad():
        trained = stage.model(input_ids=ids).logits.float()
    stage.save_pruned_model(str(tmp_path / "export"))
    export = tmp_path / "export"
    assert (export / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).cuda().eval()
    assert getattr(merged.config, "quantization_config", None) is None and merged.config.num_hidden_layers == 4
    with torch.no_grad():
        out = merged(input_ids=ids).logits.float()
    # The merged float model reproduces the trained 4-bit + LoRA model up to bf16 rounding.
    assert float((out - trained).norm() / trained.norm()) < 0.02
