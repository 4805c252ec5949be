"""FSDP through Lightning's FSDPStrategy on one CUDA GPU (skipped without CUDA; Lightning's FSDP needs a GPU).

One rank exercises what the stages add for FSDP: the float32 gate left out of the bfloat16 flat parameters, activation
checkpointing by the strategy, gradient clipping by FSDP's global norm, and rank-0 export of the mask and of the
gathered weights. Run with ``pytest -m gpu tests/test_fsdp_gpu.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA")]


def blocks_loader(vocab: int, seq: int = 64, count: int = 8, batch: int = 2, seed: int = 0):
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, seq), generator=generator)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    return ids, DataLoader(rows, batch_size=batch,
                           collate_fn=lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]})


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from tiny import char_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("fsdp-llama")
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=103, max_position_embeddings=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def fsdp_trainer(tmp_path, export, checkpoint_dir=None, state_dict_type="sharded", activation_checkpointing=True):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type=state_dict_type,
                            activation_checkpointing_policy={LlamaDecoderLayer} if activation_checkpointing else None)
    callbacks = [export] + ([ModelCheckpoint(dirpath=checkpoint_dir)] if checkpoint_dir else [])
    return L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=4,
                     gradient_clip_val=1.0, logger=False, enable_checkpointing=bool(checkpoint_dir),
                     enable_progress_bar=False, limit_val_batches=1, default_root_dir=str(tmp_path),
                     callbacks=callbacks)


ONE_GPU_CHECKPOINT = pytest.mark.xfail(
    reason="On one GPU torch's FSDP switches to NO_SHARD, whose state_dict misses frozen weights left as unsharded "
    "views after a no-grad forward (AssertionError 'FSDP assumes ... is in the state_dict'). Multi-GPU FULL_SHARD "
    "checkpoints are not verified here.", strict=False)


@pytest.mark.parametrize(("state_dict_type", "activation_checkpointing", "method"),
                         [pytest.param("sharded", True, "clp", marks=ONE_GPU_CHECKPOINT), (None, True, "clp"),
                          (None, False, "clp"), (None, True, "e3")])
def test_fsdp_mask_search_keeps_a_float32_gate_and_exports_on_rank0(llama_folder, tmp_path, state_dict_type,
                                                                     activation_checkpointing, method):
    from functools import partial

    from transformers import AutoModelForCausalLM

    from lit_prune import ConcaveGate, GumbelTopKGate, MaskSearch
    from lit_prune.callbacks import ModelExport
    from lit_prune.components.surgery import drop_layers

    gate = ConcaveGate if method == "clp" else GumbelTopKGate
    # E3 also runs its KL-importance init inside the first step, where FSDP has the weights gathered.
    stage = MaskSearch(str(llama_folder), gate=partial(gate, protect_first=1, protect_last=1), num_drop=2,
                       ratio=None, dtype="bfloat16", optimizer=partial(torch.optim.Adam, lr=0.1),
                       importance_init="kl" if method == "e3" else "none")
    before = [p.detach().clone() for p in stage.gate.parameters()]
    _, loader = blocks_loader(103)
    trainer = fsdp_trainer(tmp_path, ModelExport(what="both", dirpath=str(tmp_path / "export")),
                           tmp_path / "ckpt" if state_dict_type else None, state_dict_type or "sharded",
                           activation_checkpointing)
    trainer.fit(stage, loader, loader)

    assert all(p.dtype == torch.float32 and p.is_cuda for p in stage.gate.parameters())
    assert method == "clp" or bool(stage.importance_done)
    assert any(not torch.equal(a.cpu(), b.detach().cpu()) for a, b in zip(before, stage.gate.parameters())), \
        "the gate trained under FSDP"
    mask = json.loads((tmp_path / "export" / "mask.json").read_text())
    assert mask["drop"] == stage.current_drop() and len(mask["drop"]) == 2
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "pruned")
    expected = drop_layers(AutoModelForCausalLM.from_pretrained(llama_folder), mask["drop"])
    for (name, got), (_, want) in zip(pruned.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(got, want, msg=name)

    if state_dict_type is None:
        return
    (saved,) = (tmp_path / "ckpt").iterdir()
    if state_dict_type == "full":
        keys = list(torch.load(saved, weights_only=False)["state_dict"])
    else:
        from torch.distributed.checkpoint import FileSystemReader

        keys = list(FileSystemReader(str(saved)).read_metadata().state_dict_metadata)
    assert any("gate" in k for k in keys), keys
    assert not any("layers" in k for k in keys), "the sharded checkpoint holds the gate, not the frozen weights"


def test_fsdp_distill_gathers_merged_lora_weights_on_rank0(llama_folder, tmp_path):
    from functools import partial

    from transformers import AutoModelForCausalLM

    from lit_prune import Distill, write_topk_cache
    from lit_prune.callbacks import ModelExport
    from lit_prune.components.surgery import drop_layers
    from lit_prune.stages.distributed import full_state_dict_on_rank0

    ids, loader = blocks_loader(103)
    teacher = AutoModelForCausalLM.from_pretrained(llama_folder).cuda()
    cache = write_topk_cache(teacher, [{"input_ids": ids[i:i + 2]} for i in range(0, len(ids), 2)],
                             tmp_path / "cache", k=5, model_id=str(llama_folder))
    del teacher
    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"model": str(llama_folder), "num_layers": 6, "drop": [2, 3]}))
    stage = Distill(str(llama_folder), mask=str(mask), teacher_cache=str(cache), train="lora", lora_layers="all",
                    r=4, dtype="float32", optimizer=partial(torch.optim.AdamW, lr=1e-2))
    trainer = fsdp_trainer(tmp_path, ModelExport(what="model", dirpath=str(tmp_path / "export")))
    trainer.fit(stage, loader, loader)

    state = full_state_dict_on_rank0(trainer)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "pruned")
    assert exported.config.num_hidden_layers == 4
    base = drop_layers(AutoModelForCausalLM.from_pretrained(llama_folder), [2, 3])
    prefix = "model.base_model.model.model.layers.1.self_attn.q_proj."
    lora_a = state[prefix + "lora_A.default.weight"].float().cpu()
    lora_b = state[prefix + "lora_B.default.weight"].float().cpu()
    assert lora_b.abs().sum() > 0, "LoRA B moved away from its zero init"
    merged = base.model.layers[1].self_attn.q_proj.weight.float() + (lora_b @ lora_a) * (32.0 / 4)
    torch.testing.assert_close(exported.model.layers[1].self_attn.q_proj.weight.float(), merged, atol=2e-2, rtol=2e-2)
    # Trained from float32 shards (LoRA under FSDP needs one dtype per layer); the frozen embedding is unchanged.
    torch.testing.assert_close(exported.model.embed_tokens.weight, base.model.embed_tokens.weight.float())
