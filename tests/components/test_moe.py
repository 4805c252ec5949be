"""Mixture-of-experts models: the dense/sparse layer pattern survives a cut, and gated == exported, exactly.

Each case cuts a tiny random model (tests/tiny.py) where the config places experts by index: through DeepSeek-V3's
dense prefix, through Qwen2-MoE's every-other-layer period, around Qwen3-MoE's mlp_only_layers. The gated model
with a hard 0/1 mask must give the logits of the exported, re-loaded smaller model: full forward, cached decoding
and ``generate``.
"""

import json

import pytest
import torch
from tiny import TINY_NUM_LAYERS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import attention_layer_indices, decoder_layers, router_outputs_off, sparse_layer_flags
from lit_prune.components.losses import kl_loss
from lit_prune.components.surgery import drop_layers, moe_layer_pattern, write_moe_layer_pattern

SLIDING, FULL = "sliding_attention", "full_attention"
# (model_type, drop, config keys expected after the cut)
CASES = [
    # tiny DeepSeek-V3: D D M M M M (first_k_dense_replace=2)
    ("deepseek_v3", [1, 2, 4], {"first_k_dense_replace": 1}),  # through the dense/MoE boundary
    ("deepseek_v3", [0, 1], {"first_k_dense_replace": 0}),  # every dense layer
    ("deepseek_v3", [3, 5], {"first_k_dense_replace": 2}),  # MoE layers only
    # tiny Qwen2-MoE: D M D M D M (decoder_sparse_step=2)
    ("qwen2_moe", [1], {"decoder_sparse_step": 1, "mlp_only_layers": [0, 1, 3]}),  # breaks the period
    ("qwen2_moe", [1, 2, 4], {"decoder_sparse_step": 1, "mlp_only_layers": [0]}),
    # tiny Qwen3-MoE: D M M M D M (mlp_only_layers=[0, 4])
    ("qwen3_moe", [1, 4], {"decoder_sparse_step": 1, "mlp_only_layers": [0]}),
    ("qwen3_moe", [0, 2], {"decoder_sparse_step": 1, "mlp_only_layers": [2]}),
    # experts in every layer; gpt-oss alternates sliding and full attention
    ("mixtral", [1, 2, 4], {}),
    ("gpt_oss", [1, 2, 4], {"layer_types": [SLIDING, FULL, FULL]}),
    ("gpt_oss", [0, 3], {"layer_types": [FULL, SLIDING, SLIDING, FULL]}),
]


def _inputs(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _cached_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Prefill half the sequence, then decode one token at a time through the KV cache."""
    split = input_ids.shape[1] // 2
    out = model(input_ids=input_ids[:, :split], use_cache=True)
    steps = [out.logits]
    for t in range(split, input_ids.shape[1]):
        out = model(input_ids=input_ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "gpt_oss"])
def test_config_rule_matches_the_modules(model_type):
    model = tiny_model(model_type)
    flags = sparse_layer_flags(model)
    pattern = moe_layer_pattern(model.config)
    if model_type in ("mixtral", "gpt_oss"):
        assert pattern is None and all(flags), "experts in every layer: no index rule to rewrite"
    else:
        assert pattern == flags and any(flags) and not all(flags), "the tiny config mixes dense and sparse layers"


@pytest.mark.parametrize(("model_type", "drop", "expected"), CASES,
                         ids=[f"{t}-drop{'_'.join(map(str, d))}" for t, d, _ in CASES])
def test_hard_mask_equals_exported_moe_model(model_type, drop, expected, tmp_path):
    model = tiny_model(model_type)
    flags_before = sparse_layer_flags(model)
    keep = [i not in drop for i in range(TINY_NUM_LAYERS)]
    input_ids = _inputs()
    prompt = _inputs(seed=1, batch=1, seq=5)
    gen_kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)

    gating = LayerGating(model)
    gating.set_mask(keep)
    with torch.no_grad():
        gated = model(input_ids=input_ids, use_cache=False).logits
        gated_cached = _cached_logits(model, input_ids)
        gated_tokens = model.generate(prompt, **gen_kwargs)
        with gating.opened():
            dense = model(input_ids=input_ids, use_cache=False).logits
    gating.remove()
    assert not torch.allclose(dense, gated, atol=1e-4), "the cut must change the output, or equality proves nothing"
    torch.testing.assert_close(gated_cached, gated, rtol=1e-4, atol=1e-4)

    drop_layers(model, drop)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in expected.items():
        assert saved[key] == value, key
    exported, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    exported.eval()
    # A stale dense/sparse rule would build the wrong MLP class: missing and unexpected weights, random init.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    kept = [i for i in range(TINY_NUM_LAYERS) if keep[i]]
    assert sparse_layer_flags(exported) == [flags_before[i] for i in kept]
    assert [attention_layer_indices(layer) for layer in decoder_layers(exported)] == [[i] for i in range(len(kept))]

    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=input_ids, use_cache=False).logits, gated, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_cached_logits(exported, input_ids), gated, rtol=1e-4, atol=1e-4)
        assert torch.equal(exported.generate(prompt, **gen_kwargs), gated_tokens)


def test_stale_moe_rule_would_rebuild_the_wrong_layers(tmp_path):
    # The control for the test above: keep DeepSeek's old first_k_dense_replace and the reload goes wrong.
    model = tiny_model("deepseek_v3")
    drop_layers(model, [1, 2, 4])
    model.config.first_k_dense_replace = 2
    model.save_pretrained(tmp_path)
    exported, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]
    assert sparse_layer_flags(exported) != sparse_layer_flags(model)


def test_write_moe_layer_pattern_refuses_a_pattern_the_config_cannot_express():
    config = tiny_config("deepseek_v3", num_layers=3)
    with pytest.raises(ValueError, match="dense prefix"):
        write_moe_layer_pattern(config, [False, True, False])


def test_deepseek_mtp_layers_are_not_exported(tmp_path):
    config = tiny_config("deepseek_v3")
    config.num_nextn_predict_layers = 1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        drop_layers(model, [2])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 0
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        layer_ids = {int(key.split(".")[2]) for key in f.keys() if key.startswith("model.layers.")}
    assert layer_ids == set(range(TINY_NUM_LAYERS - 1)), "only the kept decoder layers, nothing after them"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_router_outputs_off_removes_the_aux_loss(model_type):
    config = tiny_config(model_type)
    config.output_router_logits = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    input_ids = _inputs()
    assert model(input_ids=input_ids, labels=input_ids).aux_loss is not None
    router_outputs_off(model.config)
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.aux_loss is None and out.router_logits is None


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_search_step_trains_only_the_gates(model_type):
    """One search step as MaskSearch does it: frozen weights (experts, routers), KL to the open-gate teacher."""
    model = tiny_model(model_type)
    model.requires_grad_(False)
    gating = LayerGating(model)
    gates = torch.full((TINY_NUM_LAYERS,), 0.7, requires_grad=True)
    input_ids = _inputs()
    with torch.no_grad(), gating.opened():
        teacher = model(input_ids=input_ids, use_cache=False).logits
    gating.set(gates)
    student = model(input_ids=input_ids, use_cache=False).logits
    kl_loss(teacher, student, labels=None, direction="forward").backward()
    assert gates.grad is not None and bool((gates.grad.abs() > 0).all()), "every layer's gate gets a gradient"
    assert all(p.grad is None for p in model.parameters()), "frozen experts, routers and attention get none"


def test_loader_turns_router_outputs_off(tmp_path):
    from lit_prune.hf import load_causal_lm, load_config, meta_model

    config = tiny_config("mixtral")
    config.output_router_logits = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_causal_lm(str(tmp_path), "float32")
    assert model.config.output_router_logits is False
    assert model(input_ids=_inputs(), labels=_inputs()).aux_loss is None
    assert meta_model(load_config(str(tmp_path))).config.output_router_logits is False


FSDP_WRAP_CHECK = """
import importlib, sys, torch, torch.distributed as dist, yaml
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoModelForCausalLM
config, checkpoint, init_file = sys.argv[1:]
names = yaml.safe_load(open(config))["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
classes = {getattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in names}
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).requires_grad_(False)
wrapped = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(classes), device_id=torch.device("cpu"), use_orig_params=True)
print(tuple(wrapped(input_ids=torch.tensor([[5, 6, 7]])).logits.shape))
dist.destroy_process_group()
"""


def test_deepseek_config_wraps_the_float32_router_in_its_own_fsdp_unit(tmp_path):
    # In a bf16 DeepSeek-V3 the router weight stays float32 (transformers keeps it so); FSDP cannot flatten it with
    # the layer's bf16 weights. One process on the CPU (gloo) runs the same flattening as the multi-node job.
    import subprocess
    import sys
    from pathlib import Path

    model = tiny_model("deepseek_v3")
    model.save_pretrained(tmp_path / "model")
    config = Path(__file__).parents[2] / "configs" / "e3_deepseek_r1.yaml"
    run = subprocess.run([sys.executable, "-c", FSDP_WRAP_CHECK, str(config), str(tmp_path / "model"),
                          str(tmp_path / "pg")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("(1, 3, 103)")
