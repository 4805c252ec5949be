"""`python -m lit_prune quantize` and quantized variants in `python -m lit_prune evaluate`."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from lit_prune.cli import main
from lit_prune.components.checkpoint import export_from_mask
from lit_prune.components.mask_io import MaskArtifact
from lit_prune.components.quantize import QuantizationError
from lit_prune.evaluate_models import evaluate, split_quantization

INT8 = "torchao-int8-weight"


@pytest.fixture(scope="module")
def pruned_checkpoint(tiny_checkpoint, tmp_path_factory):
    mask = MaskArtifact.from_dict({"model": str(tiny_checkpoint), "num_layers": 6, "drop": [2, 3], "method": "manual"})
    return export_from_mask(str(tiny_checkpoint), mask, tmp_path_factory.mktemp("pruned") / "model")


def test_quantize_command_then_evaluate_dense_pruned_and_quantized_in_one_run(
    tiny_checkpoint, pruned_checkpoint, tiny_text, tmp_path, capsys
):
    int8 = tmp_path / "int8"
    main(["quantize", "--model", str(pruned_checkpoint), "--method", INT8, "--out", str(int8), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "28 Linear layers quantized" in printed and f"wrote {int8}" in printed
    out = tmp_path / "eval"
    main(["evaluate", "--models", f"dense={tiny_checkpoint}", f"pruned={pruned_checkpoint}", f"int8={int8}",
          f"fly={pruned_checkpoint}@{INT8}", "--text-files", str(tiny_text), "--max-length", "32", "--max-blocks", "8",
          "--device", "cpu", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())["models"]
    assert [results[n]["quantization"] for n in ("dense", "pruned", "int8", "fly")] == [None, None, INT8, INT8]
    assert results["int8"]["num_layers"] == results["pruned"]["num_layers"] == 4
    # Saved folder and on-the-fly quantization are the same model: same perplexity.
    assert results["int8"]["ppl"]["ppl"] == pytest.approx(results["fly"]["ppl"]["ppl"], rel=1e-5)
    # Quantized, not identical, but close to its float source.
    assert results["int8"]["ppl"]["ppl"] != results["pruned"]["ppl"]["ppl"]
    assert results["int8"]["ppl"]["ppl"] == pytest.approx(results["pruned"]["ppl"]["ppl"], rel=0.02)
    disk = {n: results[n]["weight_bytes_on_disk"] for n in results}
    assert disk["fly"] is None and disk["int8"] < disk["pruned"] < disk["dense"]
    assert results["fly"]["weight_bytes_in_memory"] < results["pruned"]["weight_bytes_in_memory"]
    assert all(r["ppl"]["tokens_per_s"] > 0 for r in results.values())
    md = (out / "results.md").read_text()
    assert f"| int8 | 4 | {INT8} |" in md and "forward tok/s" in md


def _no_weights(monkeypatch):
    import lit_prune.hf as hf

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded")

    monkeypatch.setattr(hf, "load_causal_lm", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_evaluate_refuses_bitsandbytes_on_cpu_before_any_weights_load(tiny_checkpoint, tiny_text, tmp_path,
                                                                      monkeypatch):
    _no_weights(monkeypatch)
    with pytest.raises(QuantizationError, match=r"`--models nf4=\.\.\.@bnb-nf4`='bnb-nf4' runs on cuda only.*"
                                                r"'torchao-int8-weight'"):
        evaluate({"dense": str(tiny_checkpoint), "nf4": f"{tiny_checkpoint}@bnb-nf4"}, text_files=[str(tiny_text)],
                 max_length=32, device="cpu")


def test_evaluate_refuses_a_saved_bitsandbytes_folder_on_cpu(tiny_checkpoint, tiny_text, tmp_path, monkeypatch):
    saved = tmp_path / "nf4"
    saved.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved / name).write_bytes((tiny_checkpoint / name).read_bytes())
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (saved / "config.json").write_text(json.dumps(config))
    _no_weights(monkeypatch)
    with pytest.raises(QuantizationError, match=r"saved as bnb-nf4.*cuda only"):
        evaluate({"dense": str(tiny_checkpoint), "nf4": str(saved)}, text_files=[str(tiny_text)], max_length=32,
                 device="cpu")


def test_model_spec_suffixes(tmp_path):
    assert split_quantization("runs/x@bnb-nf4") == ("runs/x", "bnb-nf4")
    assert split_quantization("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    odd = tmp_path / "model@v2"
    odd.mkdir()
    assert split_quantization(str(odd)) == (str(odd), None)  # an existing path is taken as it is
    with pytest.raises(QuantizationError, match=r"@'int4'.*Allowed after @: torchao-int8-weight, bnb-int8, bnb-nf4"):
        split_quantization("runs/x@int4")


def test_quantize_command_bad_inputs_name_the_flag(pruned_checkpoint, tmp_path, monkeypatch):
    _no_weights(monkeypatch)
    with pytest.raises(QuantizationError, match=r"`--method`='gptq' is not a quantization method. Allowed"):
        main(["quantize", "--model", str(pruned_checkpoint), "--method", "gptq", "--out", str(tmp_path / "o")])
    with pytest.raises(QuantizationError, match=r"`--model`='nowhere/at-all' is not a loadable model"):
        main(["quantize", "--model", "nowhere/at-all", "--method", INT8, "--out", str(tmp_path / "o"), "--device",
              "cpu"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="`--out`=.*not empty"):
        main(["quantize", "--model", str(pruned_checkpoint), "--method", INT8, "--out", str(tmp_path / "full")])
    assert not (tmp_path / "o").exists()
