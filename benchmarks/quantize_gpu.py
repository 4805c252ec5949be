"""Pruning composed with quantization on one GPU: a Llama-2-7B-shaped model (random weights), 32 -> 24 layers.

    python -m benchmarks.quantize_gpu --out results/quantize_llama2_7b_gpu.json

Timing and memory do not depend on weight values, so random weights of the real shape stand in for the checkpoint
(perplexity is not measured here). Steps:
1. Build the dense model in bf16 on the GPU; measure it; drop 8 middle layers ``[12, 20)`` with
   ``lit_prune.drop_layers`` (the export's surgery); measure again; save the pruned model (+ mask.json).
2. Load the pruned folder as bf16, bnb-nf4, bnb-int8 and torchao-int8-weight (``load_quantized``, the code behind
   ``python -m lit_prune quantize``/``evaluate``); for each: weight memory, weight files on disk, prefill latency
   (b1 x 2048, no cache, median of 3) with its peak memory, eager decode tokens/s (batch 1, 128-token prompt,
   32 warm-up steps, then the median of 3 runs of 128 greedy steps with the HF cache; launch-bound: no static cache,
   no compile).
3. One endpoint-LoRA training step (forward + backward, b1 x 2048) through ``EndpointLoRA`` with
   ``quantize_base: nf4`` (QLoRA) and with the bf16 base: step time and peak memory.
Results are written after every measurement, so a run cut short keeps what it measured. Prints a table last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks._common import SHAPES, free_memory, machine, write_json
from lit_prune.components.mask_io import MaskArtifact, save_mask
from lit_prune.components.quantize import load_quantized, model_weight_bytes, weight_files_bytes
from lit_prune.components.surgery import drop_layers

GB = 1024**3
DROP = list(range(12, 20))


@torch.no_grad()
def speed(model, vocab: int, prefill: int, prompt: int, steps: int) -> dict:
    """Prefill latency and peak memory (b1 x prefill), eager decode tokens/s (b1)."""
    from transformers import DynamicCache

    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill), device="cuda", generator=gen)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    out = {"prefill_ms": 1000 * sorted(times)[1], "prefill_tokens_per_s": prefill / sorted(times)[1],
           "prefill_peak_gib": peak / GB, "prefill_activation_gib": (peak - before) / GB}
    cache = DynamicCache()
    logits = model(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1:].argmax(-1)

    def decode(n: int) -> None:
        nonlocal token
        for _ in range(n):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    decode(32)  # warm-up
    rates = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decode(steps)
        torch.cuda.synchronize()
        rates.append(steps / (time.perf_counter() - start))
    out["decode_tokens_per_s"] = sorted(rates)[1]
    out["decode_tokens_per_s_runs"] = rates
    return out


def train_step(folder: Path, quantize_base: str, seq: int, vocab: int) -> dict:
    """One EndpointLoRA step (LoRA next to the cut) on the pruned folder: seconds and peak memory."""
    from lit_prune.components.losses import next_token_ce
    from lit_prune.stages.endpoint_lora import EndpointLoRA

    free_memory()
    stage = EndpointLoRA(str(folder), quantize_base=quantize_base, dtype="bfloat16")
    stage.configure_model()
    if quantize_base == "none":
        stage.to("cuda")  # the nf4 base was loaded onto the GPU by bitsandbytes
    weights = torch.cuda.memory_allocated()
    trainable = sum(p.numel() for p in stage.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (1, seq), device="cuda")
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # the first step builds optimizer state and warms kernels
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = next_token_ce(stage(ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {"quantize_base": quantize_base, "endpoints": stage.endpoints, "trainable_params": trainable,
           "weights_gib": weights / GB, "step_seconds": min(times[1:]), "peak_gib": torch.cuda.max_memory_allocated()
           / GB, "loss": loss.item()}
    del stage, optimizer
    free_memory()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--methods", nargs="*", default=["bnb-nf4", "bnb-int8", "torchao-int8-weight"])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument("--work", default=None, help="Folder for the checkpoints (default: a temp folder).")
    parser.add_argument("--out", default=None, help="JSON results file.")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    work = Path(args.work or tempfile.mkdtemp())
    results: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                     "shape": args.shape, "drop": DROP, "variants": {}, "training": {}, "errors": {}}
    save = lambda: write_json(args.out, results)  # noqa: E731
    config = LlamaConfig(**SHAPES[args.shape])
    vocab = config.vocab_size
    free_memory()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    speed(model, vocab, 256, 16, 8)  # warm-up of the process (kernels, allocator) before the first measurement
    free_memory()
    entry = {"layers": config.num_hidden_layers, "weights_gib": torch.cuda.memory_allocated() / GB,
             "weight_bytes": model_weight_bytes(model)}
    results["variants"]["dense bf16"] = {**entry, **speed(model, vocab, args.prefill, args.prompt, args.decode_steps)}
    drop_layers(model, DROP)
    free_memory()
    entry = {"layers": model.config.num_hidden_layers, "weights_gib": torch.cuda.memory_allocated() / GB,
             "weight_bytes": model_weight_bytes(model)}
    results["variants"]["pruned bf16"] = {**entry, **speed(model, vocab, args.prefill, args.prompt,
                                                           args.decode_steps)}
    save()
    folder = work / "pruned"
    start = time.perf_counter()
    model.save_pretrained(folder)
    save_mask(folder / "mask.json", MaskArtifact.from_dict(
        {"model": f"random-{args.shape}", "num_layers": 32, "drop": DROP, "method": "manual"}))
    results["variants"]["pruned bf16"]["disk_bytes"] = weight_files_bytes(folder)
    results["save_seconds"] = time.perf_counter() - start
    del model
    free_memory()
    save()
    for method in args.methods:
        name = f"pruned {method}"
        try:
            free_memory()
            start = time.perf_counter()
            model = load_quantized(str(folder), method, device="cuda", dtype="bfloat16")
            entry = {"layers": model.config.num_hidden_layers, "load_seconds": time.perf_counter() - start,
                     "weights_gib": torch.cuda.memory_allocated() / GB, "weight_bytes": model_weight_bytes(model)}
            results["variants"][name] = {**entry, **speed(model, vocab, args.prefill, args.prompt,
                                                          args.decode_steps)}
            save()
            saved = work / method
            model.save_pretrained(saved)
            results["variants"][name]["disk_bytes"] = weight_files_bytes(saved)
            del model
        except Exception:  # record and go on: one library's failure must not cost the other measurements
            results["errors"][name] = traceback.format_exc()[-2000:]
        save()
    for base in ("nf4", "none"):
        try:
            results["training"][base] = train_step(folder, base, args.prefill, vocab)
        except Exception:
            results["errors"][f"train {base}"] = traceback.format_exc()[-2000:]
        save()

    print(f"\n{results['machine']}; {args.shape} shape, random weights; prefill b1 x {args.prefill}, decode b1 "
          f"(prompt {args.prompt}, {args.decode_steps} eager steps)\n")
    print("| variant | layers | weights in GPU memory GiB | weight files GB | prefill ms | prefill peak GiB | "
          "decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, v in results["variants"].items():
        disk = f"{v['disk_bytes'] / 1e9:.2f}" if "disk_bytes" in v else "-"
        print(f"| {name} | {v['layers']} | {v['weights_gib']:.2f} | {disk} | {v['prefill_ms']:.1f} | "
              f"{v['prefill_peak_gib']:.2f} | {v['decode_tokens_per_s']:.1f} |")
    print(f"\n| endpoint-LoRA step (b1 x {args.prefill}) | trainable params | weights GiB | peak GiB | step s |")
    print("|---|---|---|---|---|")
    for base, t in results["training"].items():
        print(f"| base {'nf4 (QLoRA)' if base == 'nf4' else 'bf16'} | {t['trainable_params']:,} | "
              f"{t['weights_gib']:.2f} | {t['peak_gib']:.2f} | {t['step_seconds']:.3f} |")
    for name, err in results["errors"].items():
        print(f"\nERROR {name}:\n{err}")


if __name__ == "__main__":
    main()
