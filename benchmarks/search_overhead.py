"""Search step time vs a plain forward+backward of the same model on the same batch.

    python -m benchmarks.search_overhead --shape llama2-7b --batch 2 --seq 2048          # GPU, random weights
    python -m benchmarks.search_overhead --model offline:smollm2-135m --batch 2 --seq 256  # CPU, real model

plain  = one training forward+backward of the model (all weights trainable), the cost of fine-tuning one step.
search = MaskSearch.training_step + backward: teacher forward (gates open, no grad) + gated forward + backward to the
         gate only (weights frozen), for ConcaveGate (CLP) and GumbelTopKGate (E3).
Random-weight models of real shapes are built directly on the GPU; timing does not depend on weight values.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks._common import SHAPES, machine, timed, write_json


def build(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if args.shape:
        config = LlamaConfig(**SHAPES[args.shape])
        folder = tempfile.mkdtemp()
        config.save_pretrained(folder)  # MaskSearch reads the config (no weights) to validate its budget
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return folder, model.eval(), device
    from lit_prune.assets import resolve_pretrained

    folder = resolve_pretrained(args.model)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval(), device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="also time with activation checkpointing")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from lit_prune import ConcaveGate, GumbelTopKGate, MaskSearch

    folder, model, device = build(args)
    tokens = args.batch * args.seq
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    batch = {"input_ids": input_ids, "labels": input_ids}
    rows, results = [], {"machine": machine(), "args": vars(args)}

    def plain_step():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    modes = [False, True] if args.checkpointing else [False]
    for checkpointing in modes:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        plain = timed(plain_step, repeats=args.repeats)
        plain_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        model.zero_grad(set_to_none=True)
        tag = " +ckpt" if checkpointing else ""
        rows.append((f"plain fwd+bwd{tag}", plain, 1.0, plain_mem))
        for name, factory in (("clp", lambda n, k: ConcaveGate(n, k)), ("e3", lambda n, k: GumbelTopKGate(n, k))):
            stage = MaskSearch(folder, gate=factory, ratio=0.25, gradient_checkpointing=checkpointing)
            stage.model = model  # reuse the weights built on the device; the stage freezes and gates them
            stage.on_model_loaded()
            stage.gate.to(device)
            stage.train()

            def search_step():
                loss = stage.training_step(batch, 0)
                loss.backward()
                stage.gate.zero_grad(set_to_none=True)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(search_step, repeats=args.repeats)
            mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append((f"search {name}{tag}", seconds, seconds / plain, mem))
            stage.gating.remove()
    results["rows"] = [dict(step=r[0], seconds=r[1], ratio_to_plain=r[2], peak_gib=r[3], tokens_per_s=tokens / r[1])
                       for r in rows]
    write_json(args.out, results)
    shape = args.shape or args.model
    print(f"\nmachine: {results['machine']}; model: {shape}; batch {args.batch} x {args.seq} tokens, {args.dtype}")
    print("| step | seconds | tokens/s | vs plain | peak GiB |")
    print("|---|---|---|---|---|")
    for name, sec, ratio, mem in rows:
        print(f"| {name} | {sec:.3f} | {tokens / sec:,.0f} | {ratio:.2f}x | {mem:.1f} |")


if __name__ == "__main__":
    main()
