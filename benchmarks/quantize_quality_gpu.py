"""Quality of pruned + quantized SmolLM2 on CUDA: bitsandbytes NF4 / LLM.int8() and torchao int8, and QLoRA recovery.

    python -m benchmarks.quantize_quality_gpu --model offline:smollm2-135m --text offline:britannica \
        --mask configs/masks/smollm2_drop_12_20.json --steps 300 --out results/quantize_quality_gpu.json

Held-out perplexity (the tail of `--text`, the protocol of benchmarks/recovery.py) of: dense bf16; the pruned export;
the pruned export loaded as bnb-nf4, bnb-int8 and torchao-int8-weight; endpoint LoRA recovery on a bf16 base and on
an NF4 base (QLoRA, `quantize_base: nf4`) with the same batches, each exported merged; and those exports as NF4.
Needs CUDA, bitsandbytes and torchao. Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

from benchmarks._common import fit_seconds, machine, perplexity, text_blocks, write_json
from lit_prune import EndpointLoRA
from lit_prune.assets import resolve_pretrained, resolve_text_source
from lit_prune.components.checkpoint import export_from_mask
from lit_prune.components.lora import LLAMA_PROJECTIONS
from lit_prune.components.mask_io import load_mask
from lit_prune.components.quantize import load_quantized, model_weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--text", nargs="+", default=["offline:britannica"])
    parser.add_argument("--mask", required=True)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--val-blocks", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--methods", nargs="+", default=["bnb-nf4", "bnb-int8", "torchao-int8-weight"])
    parser.add_argument("--bases", nargs="+", default=["none", "nf4"], help="recovery base: none (bf16) or nf4")
    parser.add_argument("--serve-as", default="bnb-nf4", help="quantization applied to each recovered export")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and ({"nf4"} & set(args.bases) or any(m.startswith("bnb") for m in args.methods + [
            args.serve_as])):
        sys.exit("bitsandbytes methods and QLoRA need CUDA; on the CPU pass --methods torchao-int8-weight "
                 "--bases none --serve-as torchao-int8-weight.")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, val = text_blocks(tokenizer, [f for n in args.text for f in resolve_text_source(n)], args.seq)
    val = val[: args.val_blocks]
    work = Path(tempfile.mkdtemp())
    mask = load_mask(args.mask)
    rows: list[tuple[str, float, float]] = []
    results: dict = {"machine": machine(), "args": vars(args), "mask": mask.describe(), "rows": {}}

    def record(name: str, model) -> None:
        ppl = perplexity(model, val, args.batch, device)
        gib = model_weight_bytes(model) / 2**30
        rows.append((name, ppl, gib))
        results["rows"][name] = {"ppl": ppl, "weights_gib": gib}
        print(f"{name}: ppl {ppl:.2f}, weights {gib:.3f} GiB", flush=True)

    record("dense bf16", AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16))
    pruned = export_from_mask(folder, mask, str(work / "pruned"), dtype="bfloat16", allow_model_mismatch=True)
    record("pruned bf16", AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.bfloat16))
    for method in args.methods:
        record(f"pruned {method}", load_quantized(str(pruned), method, device=device))

    optimizer = lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.0)  # noqa: E731
    for base in args.bases:
        L.seed_everything(1337, verbose=False)
        stage = EndpointLoRA(folder, mask=args.mask, dtype="bfloat16", optimizer=optimizer, allow_model_mismatch=True,
                             target_modules=LLAMA_PROJECTIONS, loss="ce", quantize_base=base)
        seconds = fit_seconds(stage, train, args.batch, args.steps)
        out = work / f"recovered_{base}"
        stage.save_pruned_model(str(out))
        label = "LoRA on bf16 base" if base == "none" else "QLoRA (NF4 base)"
        results["rows"][f"recovery {base}"] = {"seconds": seconds}
        record(f"pruned + recovered ({label}), merged bf16", AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.bfloat16))
        record(f"pruned + recovered ({label}) as {args.serve_as}",
               load_quantized(str(out), args.serve_as, device=device))
        del stage
        if device == "cuda":
            torch.cuda.empty_cache()

    write_json(args.out, results)
    tokens = args.steps * args.batch * args.seq
    print(f"\nmachine: {results['machine']}; mask: {results['mask']}; recovery: {args.steps} steps x {args.batch} x "
          f"{args.seq} = {tokens:,} tokens, CE, lr {args.lr}; held-out {len(val)} x {args.seq}")
    print("| variant | held-out ppl | weights GiB |")
    print("|---|---|---|")
    for name, ppl, gib in rows:
        print(f"| {name} | {ppl:.2f} | {gib:.3f} |")


if __name__ == "__main__":
    main()
