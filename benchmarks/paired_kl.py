"""Held-out KL of layer masks block by block, and the paired difference of each mask from a reference mask.

    python -m benchmarks.paired_kl --model offline:gemma3-270m --held-out-text offline:britannica \
        --search-json docs/results/search_quality_gemma3_sciq_spread_h200.json --versus e3 --out paired_kl.json

``search_quality`` reports one mean KL per mask on the first ``--val-blocks`` of the held-out text; a 1% gap between
two masks there says nothing about whether it holds on more text. This script scores every mask of the given
``search_quality`` results (or ``--mask NAME=1,2,3``) on each block of the held-out text separately, then gives per
budget each mask's mean KL and its paired difference from ``--versus`` (mask minus reference, mean +- standard error
over blocks), on the blocks ``search_quality`` scored (``first``) and on the blocks after them (``rest``: text no
earlier run was scored on). Blocks are consecutive stretches of one text, so neighbouring blocks are not independent
samples: read the standard error as a floor on the uncertainty, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks._common import frozen_model, machine, text_blocks, write_json
from lit_prune.assets import resolve_pretrained, resolve_text_source
from lit_prune.components.gating import LayerGating
from lit_prune.components.scorers import output_kl, teacher_logits_for


def _named_mask(value: str) -> tuple[str, list[int]]:
    name, sep, layers = value.partition("=")
    try:
        drop = sorted({int(x) for x in layers.split(",") if x.strip()})
    except ValueError:
        drop = []
    if not sep or not name or not drop:
        raise argparse.ArgumentTypeError(f"--mask expects NAME=LAYER,LAYER,... (dropped layer indices), got {value!r}")
    return name, drop


def masks_from_search(paths: list[str]) -> dict[str, dict[str, list[int]]]:
    """``{budget: {method: dropped layers}}`` from ``search_quality`` result files (later files add methods)."""
    budgets: dict[str, dict[str, list[int]]] = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        if "ratios" not in results:
            raise SystemExit(f"{path}: not a benchmarks.search_quality result (no 'ratios' key).")
        for budget, entry in results["ratios"].items():
            for method, m in entry["methods"].items():
                budgets.setdefault(budget, {})[method] = sorted(m["drop"])
    return budgets


def paired(values: list[float], reference: list[float]) -> dict:
    """Mean and standard error of ``values - reference`` over blocks, and the difference relative to the reference."""
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    ref_mean = sum(reference) / n
    return {"n": n, "diff": mean, "stderr": stderr, "relative": mean / ref_mean if ref_mean else float("nan")}


def block_kls(model, gating, blocks: torch.Tensor, drops: list[list[int]], device: str) -> list[list[float]]:
    """``[mask][block]`` KL(dense || model without the mask's layers), one block at a time (dense logits once)."""
    keeps = [torch.tensor([i not in set(d) for i in range(gating.num_layers)]) for d in drops]
    out: list[list[float]] = [[] for _ in drops]
    for ids in blocks:
        batch = [ids[None].to(device)]
        teacher = teacher_logits_for(model, gating, batch)
        if device == "cuda":
            teacher = [t.to(device) for t in teacher]
        for values, keep in zip(out, keeps):
            values.append(output_kl(model, gating, batch, keep, teacher_logits=teacher))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--held-out-text", nargs="+", default=["offline:britannica"])
    parser.add_argument("--search-json", nargs="*", default=[], help="benchmarks.search_quality results: their masks.")
    parser.add_argument("--mask", nargs="*", type=_named_mask, default=[],
                        help="Extra masks, NAME=LAYER,LAYER,... (budget = the number of layers).")
    parser.add_argument("--versus", default="e3", help="The reference mask of every budget (a method name).")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--first-blocks", type=int, default=64,
                        help="How many leading blocks search_quality scored (its --val-blocks): reported apart.")
    parser.add_argument("--max-blocks", type=int, default=0, help="Score at most this many blocks (0 = all).")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    budgets = masks_from_search(args.search_json)
    for name, drop in args.mask:
        budgets.setdefault(f"{len(drop)}/?", {})[name] = drop
    if not budgets:
        parser.error("no masks: pass --search-json FILE(S) and/or --mask NAME=LAYER,LAYER,...")
    missing = [b for b, methods in budgets.items() if args.versus not in methods]
    if missing:
        parser.error(f"--versus {args.versus!r} is not a mask of budget(s) {missing}; "
                     f"their masks: {sorted({m for b in missing for m in budgets[b]})}")

    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    files = [f for name in args.held_out_text for f in resolve_text_source(name)]
    blocks, last = text_blocks(tokenizer, files, args.seq, val_fraction=0.0)
    blocks = torch.cat([blocks, last])  # the whole text: search_quality's held-out blocks are its first ones
    if args.max_blocks:
        blocks = blocks[: args.max_blocks]
    model = frozen_model(folder, args.dtype, device)
    gating = LayerGating(model)
    distinct = sorted({tuple(d) for methods in budgets.values() for d in methods.values()})
    start = time.perf_counter()
    per_block = dict(zip(distinct, block_kls(model, gating, blocks, [list(d) for d in distinct], device)))
    seconds = time.perf_counter() - start

    first = min(args.first_blocks, len(blocks))
    results = {"machine": machine(), "args": vars(args) | {"mask": [list(m) for m in args.mask]},
               "blocks": len(blocks), "seconds": seconds, "budgets": {}}
    rows = []
    for budget, methods in budgets.items():
        reference = per_block[tuple(methods[args.versus])]
        entry = results["budgets"][budget] = {}
        for method, drop in methods.items():
            values = per_block[tuple(drop)]
            entry[method] = {"drop": drop, "kl_per_block": values, "kl_all": sum(values) / len(values)}
            for part, lo, hi in (("first", 0, first), ("rest", first, len(values)), ("all", 0, len(values))):
                if hi - lo > 1:
                    entry[method][f"versus_{part}"] = paired(values[lo:hi], reference[lo:hi])
            rows.append((budget, method, drop, entry[method]))
    write_json(args.out, results)

    def cell(m, part):
        p = m.get(f"versus_{part}")
        return "-" if p is None else f"{p['diff']:+.4f} ± {p['stderr']:.4f} ({p['relative'] * 100:+.1f}%)"

    print(f"{results['machine']}; {len(blocks)} blocks of {args.seq} tokens; first = the first {first}; "
          f"{seconds:.0f} s")
    print(f"| budget | method | drops | KL, all blocks | minus {args.versus}: first | rest | all |")
    print("|---|---|---|---|---|---|---|")
    for budget, method, drop, m in rows:
        print(f"| {budget} | {method} | {drop} | {m['kl_all']:.4f} | {cell(m, 'first')} | {cell(m, 'rest')} | "
              f"{cell(m, 'all')} |")


if __name__ == "__main__":
    main()
