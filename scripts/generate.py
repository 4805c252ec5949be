"""Greedy continuation from a saved checkpoint with plain transformers: `python scripts/generate.py DIR "prompt"`."""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_prune._warnings import quiet_third_party

quiet_third_party()  # only torchao's import-time noise (it comes in with transformers); the load below is plain

folder, prompt = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "The history of England"
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    tokens = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=30, do_sample=False)
print(f"{model.config.num_hidden_layers} layers: {tokenizer.decode(tokens[0], skip_special_tokens=True)!r}")
