"""Quantization via torchao (CPU) and bitsandbytes (CUDA): real low-bit weights, close logits, clean errors."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny import VOCAB, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM

from lit_prune.components import quantize as q
from lit_prune.components.checkpoint import export_from_mask
from lit_prune.components.mask_io import MaskArtifact

INT8 = "torchao-int8-weight"


@pytest.fixture(scope="module")
def pruned_folder(tiny_checkpoint, tmp_path_factory):
    mask = MaskArtifact.from_dict({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3], "method": "manual"})
    return export_from_mask(str(tiny_checkpoint), mask, tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A 2-layer Llama with hidden 256: rows long enough for per-row int8 scales to mean something."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _logits(model, seed=0):
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_torchao_int8_makes_every_decoder_linear_int8_and_keeps_logits_close(wide_folder):
    dense = AutoModelForCausalLM.from_pretrained(wide_folder, dtype=torch.float32).eval()
    quantized = q.load_quantized(str(wide_folder), INT8, device="cpu", dtype="float32")
    # 2 layers x 7 projections; the output head stays float (tied to the embedding in many models).
    assert q.quantized_linear_summary(quantized) == {"quantized_linear": 14, "float_linear": 1}
    weight = quantized.model.layers[0].mlp.down_proj.weight
    names, _ = weight.__tensor_flatten__()
    assert {getattr(weight, n).dtype for n in names} >= {torch.int8}
    ref, out = _logits(dense), _logits(quantized)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.04  # really quantized, and close (measured 0.02; a 4-bit grid gives several times that)
    # int8 weights take about a quarter of the fp32 bytes of the same Linear layers.
    linear = sum(m.weight.numel() for m in dense.model.layers.modules() if isinstance(m, torch.nn.Linear))
    saved = q.model_weight_bytes(dense) - q.model_weight_bytes(quantized)
    assert saved == pytest.approx(3 * linear, rel=0.05)


def test_quantize_checkpoint_writes_a_smaller_folder_that_reloads_with_plain_transformers(pruned_folder, tmp_path):
    out = tmp_path / "int8"
    report = q.quantize_checkpoint(str(pruned_folder), INT8, out, device="cpu")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "mask.json"}
    assert json.loads((out / "mask.json").read_text())["drop"] == [2, 3]
    assert report["quantized_linear"] == 4 * 7 and report["out"] == str(out)
    assert report["weight_bytes_on_disk"] == q.weight_files_bytes(out)
    assert report["weight_bytes_on_disk"] < 0.75 * report["source_weight_bytes_on_disk"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert q.saved_quantization(reloaded.config) == INT8
    assert q.quantized_linear_summary(reloaded)["quantized_linear"] == 28
    in_memory = q.load_quantized(str(pruned_folder), INT8, device="cpu")
    torch.testing.assert_close(_logits(reloaded), _logits(in_memory))
    # Loading the saved folder through our loader needs no method; naming one again is refused.
    assert q.quantized_linear_summary(q.load_quantized(str(out), None, device="cpu"))["quantized_linear"] == 28
    with pytest.raises(q.QuantizationError, match="already quantized"):
        q.load_quantized(str(out), INT8, device="cpu")


def _no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_bitsandbytes_on_cpu_is_refused_before_weights_load_and_writes_nothing(pruned_folder, tmp_path, monkeypatch,
                                                                               method):
    _no_weights(monkeypatch)
    out = tmp_path / "nf4"
    with pytest.raises(q.QuantizationError) as err:
        q.quantize_checkpoint(str(pruned_folder), method, out, device="cpu")
    message = str(err.value)
    assert f"`--method`='{method}'" in message and "cuda only" in message and "'torchao-int8-weight'" in message
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_library_names_the_extra_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(q.QuantizationError, match=r"pip install 'lit_prune\[quant\]'"):
        q.check_method(INT8, "cpu")
    if torch.cuda.is_available():
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
        with pytest.raises(q.QuantizationError, match=r"lit_prune\[quant-cuda\]"):
            q.check_method("bnb-nf4", "cuda")


def test_unknown_method_and_cuda_without_cuda(monkeypatch):
    with pytest.raises(q.QuantizationError, match=r"`--method`='int4'.*Allowed: torchao-int8-weight, bnb-int8, bnb"):
        q.check_method("int4", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(q.QuantizationError, match=r"torch.cuda.is_available\(\) is False.*use \'torchao-int8-weight\'"):
        q.check_method("bnb-nf4", "cuda")
    assert q.device_type(None) == "cpu"


def test_a_failed_write_leaves_nothing_on_disk(pruned_folder, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def half_write(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_write)
    with pytest.raises(OSError, match="disk full"):
        q.quantize_checkpoint(str(pruned_folder), INT8, tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("qconfig", "method"),
    [
        (None, None),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "bnb-nf4"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "bnb-fp4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bnb-int8"),
        ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int8WeightOnlyConfig"}}}, INT8),
    ],
)
def test_saved_quantization_reads_the_config(qconfig, method):
    config = type("Config", (), {"quantization_config": qconfig})()
    assert q.saved_quantization(config) == method
    if method is not None:
        assert q.requirements_of(method) in q.METHODS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes 4/8-bit needs CUDA")
@pytest.mark.parametrize(("method", "payload", "tolerance"), [("bnb-nf4", torch.uint8, 0.2), ("bnb-int8", torch.int8,
                                                                                              0.03)])
def test_bitsandbytes_on_cuda(wide_folder, method, payload, tolerance):
    dense = AutoModelForCausalLM.from_pretrained(wide_folder, dtype=torch.bfloat16).cuda().eval()
    quantized = q.load_quantized(str(wide_folder), method, device="cuda")
    assert q.quantized_linear_summary(quantized)["quantized_linear"] == 14
    assert quantized.model.layers[0].mlp.down_proj.weight.dtype == payload
    ids = torch.randint(3, VOCAB, (2, 24), device="cuda")
    with torch.no_grad():
        ref, out = dense(input_ids=ids).logits.float(), quantized(input_ids=ids).logits.float()
    assert 0 < float((out - ref).norm() / ref.norm()) < tolerance
    assert q.model_weight_bytes(quantized) < q.model_weight_bytes(dense)


def test_tensor_bytes_of_plain_tensors():
    assert q.tensor_bytes(torch.zeros(3, 4, dtype=torch.bfloat16)) == 24
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.model.embed_tokens.weight
    untied = tiny_model("llama")
    assert q.model_weight_bytes(untied) - q.model_weight_bytes(tied) == untied.lm_head.weight.numel() * 4
