"""Training-free linear compensation: exact on a linear case, folding == applying the map, refusals before loading."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import VOCAB, char_tokenizer, tiny_config, tiny_model
from torch import nn

from lit_prune.components.compensate import (
    CompensationError,
    calibration_blocks,
    check_compensable,
    collect_statistics,
    compensate_linear,
    down_projection,
    fold_into_projection,
    solve_map,
)
from lit_prune.components.layers import decoder_layers
from lit_prune.components.surgery import drop_layers


def random_batches(num: int = 8, batch: int = 2, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq), generator=generator) for _ in range(num)]


def test_solve_map_recovers_a_linear_map_and_validates_ridge():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, dtype=torch.float64, generator=generator)
    a = torch.randn(8, 8, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(solve_map(x.T @ x, x.T @ (x @ a)), a)
    # A singular X^T X (one direction never seen) still gives the minimum-norm solution, not an error.
    x[:, 0] = 0
    t = solve_map(x.T @ x, x.T @ (x @ a))
    torch.testing.assert_close(x @ t, x @ a)
    shrunk = solve_map(x.T @ x, x.T @ (x @ a), ridge=10.0)
    assert shrunk.norm() < t.norm()
    with pytest.raises(CompensationError, match="ridge"):
        solve_map(x.T @ x, x.T @ x, ridge=-1.0)


class LinearEcho(nn.Module):
    """A stand-in decoder layer that adds ``x @ a``, with ``x`` the MLP output of an earlier layer."""

    def __init__(self, stash: dict, a: torch.Tensor) -> None:
        super().__init__()
        self.stash, self.a = stash, a

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.stash["x"] @ self.a


def test_map_is_exact_when_the_removed_layers_add_a_linear_function_of_the_mlp_output():
    model = tiny_model("llama")
    layers = decoder_layers(model)
    stash: dict = {}
    down_projection(layers[2], "llama").register_forward_hook(lambda m, a, out: stash.__setitem__("x", out))
    generator = torch.Generator().manual_seed(1)
    maps = [0.3 * torch.randn(32, 32, generator=generator) for _ in range(2)]
    layers[3], layers[4] = LinearEcho(stash, maps[0]), LinearEcho(stash, maps[1])
    ids = random_batches(1, seed=5)[0]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        plain = drop_layers(copy.deepcopy(model), [3, 4])(input_ids=ids).logits

    fits = compensate_linear(model, [3, 4], random_batches())
    assert [(f.start, f.end, f.layer, f.tokens) for f in fits] == [(3, 5, 2, 8 * 2 * 16)]
    torch.testing.assert_close(fits[0].transform.float(), torch.eye(32) + maps[0] + maps[1], atol=1e-4, rtol=1e-4)
    assert fits[0].relative_error() > 1e-2 > 1e-8 > fits[0].relative_error(fits[0].transform)
    drop_layers(model, [3, 4])
    with torch.no_grad():
        compensated = model(input_ids=ids).logits
    torch.testing.assert_close(compensated, reference, atol=1e-4, rtol=1e-4)
    assert (plain - reference).abs().max() > 1e-2  # without the map the cut does change the output


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "opt", "phi3", "qwen2"])
def test_folded_weights_give_the_same_outputs_as_applying_the_map(model_type):
    folded = tiny_model(model_type)
    hooked = copy.deepcopy(folded)
    t = torch.eye(32) + 0.2 * torch.randn(32, 32, generator=torch.Generator().manual_seed(2))
    proj = down_projection(decoder_layers(folded)[1], model_type)
    shapes = {k: v.shape for k, v in folded.state_dict().items()}
    if getattr(proj, "bias", None) is not None:  # make the bias part of the check
        with torch.no_grad():
            proj.bias.normal_()
            down_projection(decoder_layers(hooked)[1], model_type).bias.copy_(proj.bias)
    fold_into_projection(proj, t)
    down_projection(decoder_layers(hooked)[1], model_type).register_forward_hook(lambda m, a, out: out @ t)
    ids = random_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids).logits, hooked(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert (folded(input_ids=ids).logits - tiny_model(model_type)(input_ids=ids).logits).abs().max() > 1e-3
    assert {k: v.shape for k, v in folded.state_dict().items()} == shapes


def test_compensation_lowers_the_error_of_a_real_cut_and_keeps_shapes():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    fits = compensate_linear(model, [2, 4], random_batches())  # two segments: [2, 3) after layer 1, [4, 5) after 3
    assert [(f.start, f.end, f.layer) for f in fits] == [(2, 3, 1), (4, 5, 3)]
    for fit in fits:
        assert fit.relative_error(fit.transform) < fit.relative_error()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, dense.get_parameter(name))]
    assert changed == ["model.layers.1.mlp.down_proj.weight", "model.layers.3.mlp.down_proj.weight"]


def test_attention_mask_leaves_padding_out_of_the_statistics():
    model = tiny_model("llama")
    ids = random_batches(1, batch=2, seq=12)[0]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    masked = collect_statistics(model, [3], [{"input_ids": ids, "attention_mask": mask}])[0]
    assert masked.tokens == 12 + 8
    rows = collect_statistics(model, [3], [ids[:1], ids[1:, :8]])[0]
    torch.testing.assert_close(masked.xtx, rows.xtx)
    torch.testing.assert_close(masked.xty, rows.xty)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_gemma2_and_gemma3_are_refused_from_the_config(model_type):
    with pytest.raises(CompensationError, match="post_feedforward_layernorm"):
        check_compensable(tiny_config(model_type), [2, 3])


def test_other_refusals_name_the_problem():
    with pytest.raises(CompensationError, match="starts at layer 0"):
        check_compensable(tiny_config("llama"), [0, 1])
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    with pytest.raises(CompensationError, match="do_layer_norm_before"):
        check_compensable(config, [2])
    config = tiny_config("llama")
    config.model_type = "qwen3_moe"
    with pytest.raises(CompensationError, match="supports model types"):
        check_compensable(config, [2])
    assert check_compensable(tiny_config("llama"), [1, 2, 4]) == [(1, 3), (4, 5)]


def test_calibration_blocks_never_read_the_held_out_tail(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("".join(chr(33 + i % 90) for i in range(1000)))
    tokenizer = char_tokenizer()
    everything = calibration_blocks(tokenizer, [text], 10_000, max_length=100, val_fraction=0.0)
    train = calibration_blocks(tokenizer, [text], 10_000, max_length=100, val_fraction=0.1)
    assert len(everything) == 10 and len(train) == 9  # 1000 chars + EOS -> 10 blocks, the last one held out
    torch.testing.assert_close(train, everything[:9])
    assert calibration_blocks(tokenizer, [text], 150, max_length=100).shape == (2, 100)  # rounded up to blocks
    with pytest.raises(CompensationError, match="calib_tokens"):
        calibration_blocks(tokenizer, [text], 0)


def test_compensated_export_reloads_with_the_same_shapes_and_outputs(tiny_checkpoint, tiny_text, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lit_prune.cli import main
    from lit_prune.components.checkpoint import export_from_mask
    from lit_prune.components.compensate import compensate_from_text
    from lit_prune.components.mask_io import MaskArtifact, load_mask, save_mask

    artifact = MaskArtifact(model=str(tiny_checkpoint), num_layers=6, drop=[2, 3])
    plain = export_from_mask(str(tiny_checkpoint), artifact, tmp_path / "plain")
    save_mask(tmp_path / "mask.json", artifact)
    main(["export", "--model", str(tiny_checkpoint), "--mask", str(tmp_path / "mask.json"), "--out",
          str(tmp_path / "comp"), "--compensate", "linear", "--calib-text", str(tiny_text), "--calib-tokens", "512"])
    assert "map folded into layer 1" in capsys.readouterr().out
    report = load_mask(tmp_path / "comp" / "mask.json").extra["compensation"]
    assert report["calib_tokens"] == 512 and report["segments"][0]["segment"] == [2, 4]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "comp")
    plain_model = AutoModelForCausalLM.from_pretrained(plain)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {
        k: v.shape for k, v in plain_model.state_dict().items()}
    assert reloaded.config.num_hidden_layers == 4
    expected = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    compensate_from_text(expected, char_tokenizer(), [2, 3], [tiny_text], 512)
    drop_layers(expected, [2, 3])
    ids = random_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits)
        assert not torch.allclose(reloaded(input_ids=ids).logits, plain_model(input_ids=ids).logits)


def test_export_refuses_gemma3_before_any_weights_load(tmp_path, tiny_text):
    from lit_prune.components.checkpoint import export_from_mask
    from lit_prune.components.mask_io import MaskArtifact

    folder = tmp_path / "gemma3-config-only"  # no weights: loading them would fail with another error
    tiny_config("gemma3_text").save_pretrained(folder)
    artifact = MaskArtifact(model=str(folder), num_layers=6, drop=[2, 3])
    with pytest.raises(CompensationError, match="gemma3_text.*post_feedforward_layernorm"):
        export_from_mask(str(folder), artifact, tmp_path / "out", compensate="linear", calib_text=(str(tiny_text),))
    llama = tmp_path / "llama-config-only"
    tiny_config("llama").save_pretrained(llama)
    artifact = MaskArtifact(model=str(llama), num_layers=6, drop=[2, 3])
    with pytest.raises(CompensationError, match="calib-text.*nope.txt"):
        export_from_mask(str(llama), artifact, tmp_path / "out", compensate="linear", calib_text=("nope.txt",))
    with pytest.raises(CompensationError, match="calib-tokens"):
        export_from_mask(str(llama), artifact, tmp_path / "out", compensate="linear", calib_text=(str(tiny_text),),
                         calib_tokens=0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_too_few_calibration_tokens_warn():
    with pytest.warns(UserWarning, match="overfit"):
        compensate_linear(tiny_model("llama"), [3], random_batches(num=2))  # 64 tokens for a 32 x 32 map
