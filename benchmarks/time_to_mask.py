r"""Time to a mask: each training-free baseline through the real CLI on a model of real shape with random weights.

    python -m benchmarks.time_to_mask --shape llama3-8b --reference window_scan \
        --out docs/results/time_to_mask_h200.json
    python -m benchmarks.time_to_mask --shape tiny --allow-cpu --batches 2 --seq 64   # smoke run of the script

A Llama-3-8B-shaped model with random bf16 weights is built directly on the GPU and saved once (with a character
tokenizer, whose ids are as good as any for timing), next to a generated text file. Then, per method, one process runs
``lit_prune.cli.main(["fit", "-c", "configs/baseline_<method>_smollm2.yaml", ...])`` with ``pretrained`` swapped to
that folder, ``max_length``/``batch_size``/``calibration_batches`` set from the arguments: the command a user runs.
Two times per method:

- ``seconds``: Lightning's fit loop (``_FitLoop.run``): the calibration batches and the scorer, weights already loaded;
- ``wall_seconds``: the whole command (interpreter start, imports, weight loading, the fit loop, export).

``--reference`` also runs the given methods with the scorers of ``tests/reference_scorers.py`` (the implementation
before prefix reuse: every removed layer gated, every window re-running its prefix, a float32 CPU teacher), within
``--budget-s``. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from benchmarks._common import SHAPES, char_tokenizer, machine, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent

METHODS = ["block_influence", "angular", "window_scan", "sleb", "kl_importance"]
NAMES = {"block_influence": "block influence", "angular": "angular", "window_scan": "window scan", "sleb": "SLEB",
         "kl_importance": "KL importance"}
TARGETS = {"window_scan": 20.0, "sleb": 120.0}  # seconds of fit loop at the 8B shape on one H200
RESULT_TAG = "TIME_TO_MASK_RESULT "


def build(args, work: Path) -> Path:
    """Random weights of the shape, made on the accelerator and saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = work / f"random-{args.shape}"
    config = LlamaConfig(**SHAPES[args.shape])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"built and saved {args.shape} in {time.perf_counter() - start:.1f} s: {folder}", flush=True)
    return folder


def cli_args(args, method: str, folder: Path, text: Path, run_dir: Path) -> list[str]:
    return [
        "fit", "-c", str(ROOT / f"configs/baseline_{method}_smollm2.yaml"),
        f"--model.init_args.pretrained={folder}",
        f"--model.init_args.calibration_batches={args.batches}",
        f"--data.text_files=[{text}]",
        f"--data.max_length={args.seq}",
        f"--data.batch_size={args.batch}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run_dir}",
        *(["--trainer.accelerator=cpu"] if not torch.cuda.is_available() else []),
    ]


def worker(args) -> None:
    """One CLI run in this process; prints one result line."""
    from lightning.pytorch.loops.fit_loop import _FitLoop

    from lit_prune.components import scorers

    if args.worker_reference:
        # The scorers before prefix reuse, for the before/after rows.
        sys.path.insert(0, str(ROOT / "tests"))
        import reference_scorers

        scorers.SCORERS[args.method] = reference_scorers.SCORERS[args.method]

    timing: dict[str, float] = {}
    run = _FitLoop.run

    def timed_run(self):
        start = time.perf_counter()
        try:
            return run(self)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timing["fit_loop"] = time.perf_counter() - start

    _FitLoop.run = timed_run
    from lit_prune.cli import main

    cli = main(json.loads(args.worker))
    selection = cli.model.selection
    details = selection.details
    best = details.get("best_kl", details.get("best_distance", (details.get("ppl") or [None])[-1]))
    result = {
        "fit_loop_seconds": timing["fit_loop"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "drop": selection.drop,
        "best_value": best,
        "calibration_tokens": sum(int(batch.numel()) for batch in cli.model.batches),
        "scorer_module": scorers.SCORERS[args.method].__module__,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_method(args, method: str, folder: Path, text: Path, work: Path, reference: bool) -> dict:
    run_dir = work / "runs" / (method + ("_reference" if reference else ""))
    command = [sys.executable, "-m", "benchmarks.time_to_mask", "--method", method,
               "--worker", json.dumps(cli_args(args, method, folder, text, run_dir)),
               *(["--worker-reference"] if reference else [])]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        print(f"{method} ({'reference' if reference else 'new'}) failed, rc {done.returncode}:\n"
              f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}", flush=True)
        return {"method": method, "path": "reference" if reference else "new", "error": done.stderr[-2000:]}
    result = json.loads(lines[-1][len(RESULT_TAG):])
    row = {
        "method": method,
        "seconds": round(result["fit_loop_seconds"], 2),
        "model": f"{args.shape} shape, random bf16 weights",
        "calibration_tokens": result["calibration_tokens"],
        "wall_seconds": round(wall, 2),
        "peak_gib": None if result["peak_gib"] is None else round(result["peak_gib"], 2),
        "drop": result["drop"],
        "best_value": result["best_value"],
        "path": "reference" if reference else "new",
        "scorer_module": result["scorer_module"],
    }
    print(json.dumps(row), flush=True)
    return row


def print_table(results: dict) -> None:
    reference = {row["method"]: row for row in results["reference_entries"] if "seconds" in row}
    print(f"\nTime to a mask, {results['model']}, {results['calibration_tokens']} calibration tokens "
          f"({results['machine']}):\n")
    print("| method | fit loop (s) | whole command (s) | peak GiB | target | before: fit loop (s) | same mask |")
    print("|---|---|---|---|---|---|---|")
    for row in results["entries"]:
        if "seconds" not in row:
            print(f"| {NAMES[row['method']]} | failed | | | | | |")
            continue
        target = TARGETS.get(row["method"]) if results["args"]["shape"] == "llama3-8b" else None
        target_text = "" if target is None else f"<= {target:.0f} s: {'met' if row['seconds'] <= target else 'NOT met'}"
        old = reference.get(row["method"])
        before = "" if old is None else f"{old['seconds']:.1f} (peak {old['peak_gib']} GiB)"
        same = "" if old is None else str(old["drop"] == row["drop"])
        print(f"| {NAMES[row['method']]} | {row['seconds']:.1f} | {row['wall_seconds']:.1f} | {row['peak_gib']} | "
              f"{target_text} | {before} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--reference", nargs="*", choices=METHODS, default=[],
                        help="also time these methods with the old scorers (tests/reference_scorers.py)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no reference run once the script has run this long")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--work", default=None, help="folder for the random model, text and runs (default: temp)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (checks the script, not the speed)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("benchmarks.time_to_mask times GPU runs: it needs CUDA (--allow-cpu: a smoke run).")
    if isinstance(args.reference, list) and args.reference and not set(args.reference) <= set(args.methods):
        sys.exit(f"--reference {args.reference} must be a subset of --methods {args.methods}.")

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="time_to_mask_"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "calibration.txt"
    # Enough characters for the calibration blocks, the held-out tenth and some slack.
    write_text(text, int(args.batches * args.batch * args.seq * 1.5) + 4 * args.seq)
    folder = build(args, work)
    results: dict = {
        "machine": machine(), "date": date.today().isoformat(),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "method", "worker_reference")},
        "model": f"{args.shape} shape, random bf16 weights",
        "calibration_tokens": args.batches * args.batch * args.seq,
        "entries": [], "reference_entries": [],
    }
    for method in args.methods:
        results["entries"].append(run_method(args, method, folder, text, work, reference=False))
        write_json(args.out, results)
    for method in args.reference:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"skipping the reference run of {method}: past --budget-s {args.budget_s}", flush=True)
            continue
        results["reference_entries"].append(run_method(args, method, folder, text, work, reference=True))
        write_json(args.out, results)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, results)
    print_table(results)


if __name__ == "__main__":
    main()
