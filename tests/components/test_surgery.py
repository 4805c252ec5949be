"""The surgery contract: a gated model with a hard 0/1 mask == the exported smaller model, on every architecture."""

import pytest
import torch
from tiny import TINY_CONFIGS, TINY_NUM_LAYERS, tiny_model

from lit_prune.components.gating import LayerGating
from lit_prune.components.layers import attention_layer_indices, decoder_layers
from lit_prune.components.surgery import contiguous_segments, drop_layers, endpoint_layers, validate_drop

ARCHS = sorted(TINY_CONFIGS)
DROP = [1, 2, 4]  # one contiguous segment and one single layer


def _inputs(seed: int = 0, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _gated_logits(model, keep, input_ids):
    gating = LayerGating(model)
    gating.set_mask(keep)
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=False).logits
    gating.remove()
    return logits


@pytest.mark.parametrize("model_type", ARCHS)
def test_open_gates_reproduce_original_logits_exactly(model_type):
    model = tiny_model(model_type)
    input_ids = _inputs()
    with torch.no_grad():
        reference = model(input_ids=input_ids).logits
        gating = LayerGating(model)
        gating.set(torch.ones(TINY_NUM_LAYERS))
        gated = model(input_ids=input_ids).logits
        with gating.opened():
            opened = model(input_ids=input_ids).logits
    assert torch.equal(gated, reference)
    assert torch.equal(opened, reference)


@pytest.mark.parametrize("model_type", ARCHS)
def test_hard_mask_equals_exported_model(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type)
    keep = [i not in DROP for i in range(TINY_NUM_LAYERS)]
    input_ids = _inputs()
    gated = _gated_logits(model, keep, input_ids)
    # Sanity: dropping layers must change the output, or the equality below proves nothing.
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids).logits, gated, atol=1e-4)

    drop_layers(model, DROP)
    kept = TINY_NUM_LAYERS - len(DROP)
    assert len(decoder_layers(model)) == kept == model.config.num_hidden_layers
    assert [attention_layer_indices(layer) for layer in decoder_layers(model)] == [[i] for i in range(kept)]
    model.save_pretrained(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == kept
    if getattr(exported.config, "layer_types", None) is not None:
        assert len(exported.config.layer_types) == kept

    with torch.no_grad():
        full = exported(input_ids=input_ids, use_cache=False).logits
        torch.testing.assert_close(full, gated, rtol=1e-5, atol=1e-5)

        # Cached decoding: prefill half, then one token at a time through the KV cache.
        split = input_ids.shape[1] // 2
        out = exported(input_ids=input_ids[:, :split], use_cache=True)
        past, steps = out.past_key_values, [out.logits]
        for t in range(split, input_ids.shape[1]):
            out = exported(input_ids=input_ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), gated, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2", "opt", "gpt_neox"])
def test_generate_matches_gated_model(model_type):
    model = tiny_model(model_type)
    keep = [i not in DROP for i in range(TINY_NUM_LAYERS)]
    prompt = _inputs(seed=1, batch=1, seq=5)
    gen_kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    gating = LayerGating(model)
    gating.set_mask(keep)
    with torch.no_grad():
        gated_tokens = model.generate(prompt, **gen_kwargs)
    gating.remove()
    drop_layers(model, DROP)
    with torch.no_grad():
        pruned_tokens = model.generate(prompt, **gen_kwargs)
    assert torch.equal(gated_tokens, pruned_tokens)


def test_gemma3_layer_types_follow_the_kept_layers():
    model = tiny_model("gemma3_text")
    before = list(model.config.layer_types)
    drop_layers(model, [1, 2])
    assert model.config.layer_types == [before[i] for i in (0, 3, 4, 5)]


def test_gate_gradient_reaches_gate_values():
    model = tiny_model("llama")
    gating = LayerGating(model)
    gates = torch.full((TINY_NUM_LAYERS,), 0.5, requires_grad=True)
    gating.set(gates)
    model(input_ids=_inputs()).logits.square().mean().backward()
    assert gates.grad is not None and gates.grad.abs().min() > 0


@pytest.mark.parametrize(
    ("drop", "message"),
    [([6], "outside"), ([-1], "outside"), ([2, 2], "more than once"), ([3, 1], "sorted"),
     (list(range(6)), "drops all"), ([1.5], "integer")],
)
def test_validate_drop_rejects_bad_lists(drop, message):
    with pytest.raises(ValueError, match=message):
        validate_drop(drop, 6)


@pytest.mark.parametrize(
    ("drop", "width", "expected"),
    [
        ([2, 3], 1, [1, 2]),  # kept layers 1 and 4 -> post-surgery 1 and 2
        ([0, 1], 1, [0]),  # cut at the start: only the layer after it
        ([4, 5], 1, [3]),  # cut at the end: only the layer before it
        ([1, 4], 1, [0, 1, 2, 3]),
        ([2, 3], 2, [0, 1, 2, 3]),
    ],
)
def test_endpoint_layers(drop, width, expected):
    assert endpoint_layers(6, drop, width) == expected


def test_contiguous_segments():
    assert contiguous_segments([3, 4, 5, 9]) == [(3, 6), (9, 10)]
    assert contiguous_segments([]) == []
