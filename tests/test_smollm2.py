"""The real offline SmolLM2-135M: export with layers removed, reload with vanilla transformers, generate English."""

import re

import pytest
import torch

from lit_prune.cli import main

pytestmark = pytest.mark.slow


def test_exported_smollm2_loads_and_generates_english(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mask = "configs/masks/smollm2_drop_13_19.json"
    out = tmp_path / "pruned"
    main(["export", "--model", "offline:smollm2-135m", "--mask", mask, "--out", str(out), "--dtype", "bfloat16"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 24 and len(model.model.layers) == 24
    assert "quantization_config" not in model.config.to_dict()

    prompt = "The history of England"
    with torch.no_grad():
        tokens = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)[len(prompt):]
    words = re.findall(r"[A-Za-z']+", text)
    common = {"the", "of", "and", "a", "in", "to", "is", "was", "with", "for", "as", "by", "that", "on"}
    assert len(words) >= 10, text
    assert sum(w.lower() in common for w in words) >= 2, text


def test_dense_and_pruned_perplexity_on_real_text(tmp_path):
    base = ["validate", "-c", "configs/eval_smollm2.yaml", "--trainer.logger=false", "--data.max_val_blocks=2",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.dtype=bfloat16"]
    dense = float(main(base).trainer.callback_metrics["val/ppl"])
    pruned = float(main([*base, "--model.init_args.mask=configs/masks/smollm2_drop_13_19.json"])
                   .trainer.callback_metrics["val/ppl"])
    # A real 135M model on encyclopedic prose: tens, not thousands; removing 6 middle layers costs but does not ruin.
    assert 10 < dense < 60
    assert dense < pruned < 10 * dense
