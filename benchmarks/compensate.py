"""Training-free linear compensation (ReplaceMe-style): held-out KL(dense || pruned) and perplexity, plain vs fitted.

    python -m benchmarks.compensate --model offline:smollm2-135m --mask configs/masks/smollm2_drop_12_20.json \
        --calib britannica=offline:britannica plays=offline:shakespeare --calib-tokens 16384 --ridge 0 \
        --out results/compensate.json

Held-out text: the last `--val-fraction` of the blocks of `--eval-text` (the tail `PruneDataModule` holds out).
Calibration: for each `NAME=SOURCE`, the training part of that text (`calibration_blocks`: its own tail held out too,
so the Britannica calibration never reads the evaluation tail). KL is the mean over held-out tokens of
sum_v p_dense(v) (log p_dense(v) - log p_pruned(v)), every position. Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from benchmarks._common import machine, text_blocks, write_json
from lit_prune.assets import resolve_pretrained, resolve_text_source
from lit_prune.components.compensate import calibration_blocks, compensate_linear, describe_fits
from lit_prune.components.mask_io import load_mask
from lit_prune.components.surgery import drop_layers
from lit_prune.metrics import shifted_token_nll


@torch.no_grad()
def held_out_scores(dense, variants: dict, blocks: torch.Tensor, batch: int) -> dict[str, dict[str, float]]:
    """KL(dense || variant) per token and perplexity of every model, one held-out batch at a time."""
    sums = {name: {"kl": 0.0, "nll": 0.0} for name in ["dense", *variants]}
    tokens, scored = 0, 0
    for chunk in blocks.split(batch):
        logits = dense(input_ids=chunk, use_cache=False).logits.float()
        dense_logp = F.log_softmax(logits, dim=-1)
        nll, count = shifted_token_nll(logits, chunk)
        sums["dense"]["nll"] += float(nll)
        for name, model in variants.items():
            out = model(input_ids=chunk, use_cache=False).logits.float()
            logp = F.log_softmax(out, dim=-1)
            sums[name]["kl"] += float((dense_logp.exp() * (dense_logp - logp)).sum())
            sums[name]["nll"] += float(shifted_token_nll(out, chunk)[0])
        tokens += chunk.numel()
        scored += int(count)
    return {name: {"kl": s["kl"] / tokens, "ppl": math.exp(s["nll"] / scored)} for name, s in sums.items()}


def heal(args, folder: str, tokenizer, mask, variants: dict, eval_files: list[str]) -> None:
    """Endpoint LoRA (CE) on the plain and the first compensated export, same batches; adds two variants."""
    import tempfile
    from pathlib import Path

    import lightning as L

    from benchmarks._common import fit_seconds
    from lit_prune import EndpointLoRA
    from lit_prune.components.lora import LLAMA_PROJECTIONS

    train, _ = text_blocks(tokenizer, eval_files, args.seq, val_fraction=args.val_fraction)
    root = Path(tempfile.mkdtemp())
    compensated = next(name for name in variants if name.startswith("compensated"))
    for name in ("pruned", compensated):
        out = root / name.split(" ")[0]
        # The variants are already cut: save them with the mask so the stage reads them as pruned folders.
        model = variants[name]
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "mask.json").write_text(mask.to_json())
        L.seed_everything(1337, verbose=False)
        stage = EndpointLoRA(str(out), mask=None, loss="ce", dtype="float32", target_modules=LLAMA_PROJECTIONS,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=args.heal_lr, weight_decay=0.0))
        seconds = fit_seconds(stage, train, args.heal_batch, args.heal_steps)
        label = f"{name.split(' ')[0]} + endpoint LoRA ({args.heal_steps} x {args.heal_batch} x {args.seq} tok)"
        variants[label] = stage.model.eval()
        print(f"{label}: {seconds:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--mask", default="configs/masks/smollm2_drop_12_20.json")
    parser.add_argument("--eval-text", nargs="+", default=["offline:britannica"])
    parser.add_argument("--calib", nargs="+", default=["britannica=offline:britannica", "plays=offline:shakespeare"],
                        help="NAME=SOURCE[,SOURCE...] calibration texts (their training part is used).")
    parser.add_argument("--calib-tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--ridge", type=float, nargs="+", default=[0.0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--val-blocks", type=int, default=None, help="Cap on held-out blocks (default: all).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="Then heal the plain export and the first compensated one with endpoint LoRA (CE) for "
                        "this many steps on the training part of --eval-text (0: no healing).")
    parser.add_argument("--heal-batch", type=int, default=4)
    parser.add_argument("--heal-lr", type=float, default=5e-4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eval_files = [f for n in args.eval_text for f in resolve_text_source(n)]
    _, val = text_blocks(tokenizer, eval_files, args.seq, val_fraction=args.val_fraction)
    val = val[: args.val_blocks] if args.val_blocks else val
    mask = load_mask(args.mask)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).eval()

    variants = {"pruned": drop_layers(copy.deepcopy(dense), mask.drop)}
    fits_out = {}
    for spec in args.calib:
        name, _, sources = spec.partition("=")
        files = [f for s in sources.split(",") for f in resolve_text_source(s)]
        for num_tokens in args.calib_tokens:
            calib = calibration_blocks(tokenizer, files, num_tokens, args.seq, val_fraction=args.val_fraction)
            for ridge in args.ridge:
                label = f"compensated ({name}, {calib.numel()} tok, ridge {ridge:g})"
                model = copy.deepcopy(dense)
                start, cpu_start = time.perf_counter(), time.process_time()
                fits = compensate_linear(model, mask.drop, calib.split(args.batch), ridge=ridge)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                drop_layers(model, mask.drop)
                variants[label] = model
                print(f"{label}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU\n{describe_fits(fits)}", flush=True)
                fits_out[label] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "calib_files": len(files),
                                   "calib_tokens": calib.numel(), "ridge": ridge, "segments": [
                                       {"segment": [f.start, f.end], "tokens": f.tokens,
                                        "calib_rel_error_plain": f.relative_error(),
                                        "calib_rel_error_fitted": f.relative_error(f.transform)} for f in fits]}
    if args.heal_steps:
        heal(args, folder, tokenizer, mask, variants, eval_files)
    scores = held_out_scores(dense, variants, val, args.batch)
    plain_kl = scores["pruned"]["kl"]
    rows = ["| model | held-out KL(dense ‖ model) | KL vs plain export | held-out ppl | compensation: wall s / CPU s |",
            "|---|---|---|---|---|"]
    for name, s in scores.items():
        kl = "" if name == "dense" else f"{s['kl']:.4f}"
        rel = f"{(s['kl'] / plain_kl - 1) * 100:+.1f}%" if name.startswith("compensated") else ""
        secs = f"{fits_out[name]['seconds']:.1f} / {fits_out[name]['cpu_seconds']:.1f}" if name in fits_out else ""
        rows.append(f"| {name} | {kl} | {rel} | {s['ppl']:.2f} | {secs} |")
    write_json(args.out, {"machine": machine(), "args": vars(args), "val_blocks": len(val),
                          "val_tokens": val.numel(), "scores": scores, "fits": fits_out})
    print(f"\n{machine()}; held-out: last {len(val)} x {args.seq} tokens of {', '.join(args.eval_text)}; "
          f"mask drop {mask.drop}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
