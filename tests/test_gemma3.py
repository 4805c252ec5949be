"""The real offline Gemma 3 270M (a second architecture): export with layers removed, reload, generate English.

Runs only where `python -m lit_prune assets --model gemma3-270m` has prepared the model (tests never download it).
"""

import re

import pytest
import torch

from lit_prune.assets import cache_root
from lit_prune.cli import main

pytestmark = pytest.mark.slow


def test_exported_gemma3_keeps_layer_types_and_generates_english(tmp_path):
    if not (cache_root() / "models" / "gemma-3-270m" / "config.json").is_file():
        pytest.skip("offline:gemma3-270m not prepared (python -m lit_prune assets --model gemma3-270m)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dense = AutoConfig.from_pretrained(cache_root() / "models" / "gemma-3-270m")
    mask = tmp_path / "mask.json"
    drop = [9, 10, 11, 12]  # 4 of 18, one of them a full-attention layer (11)
    mask.write_text(f'{{"model": "google/gemma-3-270m", "num_layers": 18, "drop": {drop}, "method": "manual"}}')
    out = tmp_path / "pruned"
    main(["export", "--model", "offline:gemma3-270m", "--mask", str(mask), "--out", str(out), "--dtype", "bfloat16"])
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 14 and len(model.model.layers) == 14
    assert model.config.layer_types == [t for i, t in enumerate(dense.layer_types) if i not in drop]

    prompt = "The history of England"
    with torch.no_grad():
        tokens = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)[len(prompt):]
    words = re.findall(r"[A-Za-z']+", text)
    assert len(words) >= 5, text  # 4 middle layers gone and no recovery: English-like, not good English
    sentence = ("Shakespeare, William, English poet, player and playwright, was baptized in the parish church of "
                "Stratford-upon-Avon in Warwickshire.")
    ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    # A broken surgery (wrong layer types, rotary bases or caches) scores near the 262k vocabulary; this is far below.
    assert ppl < 2000, ppl
