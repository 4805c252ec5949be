r"""Search step time vs a plain forward+backward of the same model on the same batch, in process and through the CLI.

    python -m benchmarks.search_overhead --shape llama2-7b llama3-8b --cli-shape llama2-7b \
        --out search_overhead_h200.json                                       # GPU, random bf16 weights, ~5 min
    python -m benchmarks.search_overhead --shape tiny --seq 64 --cli-shape tiny --cli-steps 6 --allow-cpu  # smoke
    python -m benchmarks.search_overhead --model offline:smollm2-135m --batch 2 --seq 256      # CPU, real model

In process, per shape (random weights built on the device; timing does not depend on weight values):

- plain  = one training forward+backward of the model (all weights trainable), the cost of fine-tuning one step;
- search = ``MaskSearch.training_step`` + backward (gated forward, teacher forward with gates open and no grad, KL,
  backward to the gate only), with ``exact_shortcuts`` off (``old``: both passes in full) and on (``new``: the
  teacher starts at the first gate that is not exactly 1; layers gated exactly 0 build no graph). Gates: CLP at T=1
  and T=0.05 with the notch at ConcaveGate's default place and at the deep window (layers 22-30 of 32, where
  Llama-2-7B-like models usually drop), and E3 at k = num_drop. ``same`` says whether old and new gave the very same
  loss and gate gradient on one step (torch.equal), ``teacher from`` the layer the new teacher starts at.

Through the CLI (``--cli-shape``): the shape's random model is saved with a character tokenizer, then one process per
path runs ``lit_prune.cli.main(["fit", "-c", "configs/clp_llama2_7b.yaml", ...])`` with ``pretrained`` swapped to it,
a generated text file for data, ``max_length``/``batch_size`` from the arguments, ``--cli-steps`` steps and no sanity
validation; everything else (window-scan start, polish refinement, callbacks, TensorBoard logger, progress bar) as
shipped. A callback synchronises CUDA at each batch start: a step's time is the interval between two batch starts
(whatever the host does between steps included), the median over the steps after ``--cli-warmup``. The ratio to
plain uses the in-process plain step of the same shape. Prints a table last; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks._common import SHAPES, char_tokenizer, machine, timed, write_json, write_text

ROOT = Path(__file__).resolve().parent.parent
CLI_CONFIG = "configs/clp_llama2_7b.yaml"
RESULT_TAG = "SEARCH_STEP_RESULT "
DEEP = (22, 30)  # the deep window of a 32-layer model, scaled to other depths


class StepClock(L.Callback):
    """Seconds between consecutive training batch starts (CUDA synchronised there); printed at the end of fit."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())
        steps = [b - a for a, b in zip(self.starts, self.starts[1:])]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        print(RESULT_TAG + json.dumps({"steps": steps, "peak_gib": peak}), flush=True)


def build(args, shape: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    if shape:
        config = LlamaConfig(**SHAPES[shape])
        folder = tempfile.mkdtemp()
        config.save_pretrained(folder)  # MaskSearch reads the config (no weights) to validate its budget
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return folder, model.eval(), device
    from lit_prune.assets import resolve_pretrained

    folder = resolve_pretrained(args.model)
    return folder, AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval(), device


def gates(num_layers: int):
    """(name, gate factory, temperature) of every search row."""
    from lit_prune import ConcaveGate, GumbelTopKGate

    deep = round(DEEP[0] * num_layers / 32)

    def clp(start, temperature):
        def factory(n, k):
            gate = ConcaveGate(n, k, temperature=temperature, protect_first=1, protect_last=1)
            return gate if start is None else gate.set_starts_([min(start, n - 1 - k)])

        return factory

    return [
        ("clp T=1 default", clp(None, 1.0)),
        (f"clp T=1 deep {deep}+", clp(deep, 1.0)),
        ("clp T=0.05 default", clp(None, 0.05)),
        (f"clp T=0.05 deep {deep}+", clp(deep, 0.05)),
        ("e3 k=num_drop", lambda n, k: GumbelTopKGate(n, k)),
    ]


def difference(reference: tuple, other: tuple) -> dict:
    """Relative differences of the loss and the gate gradient (max abs difference / max abs reference)."""
    (loss_a, grad_a, _), (loss_b, grad_b, _) = reference, other
    scale = grad_a.abs().max().clamp(min=1e-30)
    return {"loss_rel_diff": float((loss_a - loss_b).abs() / loss_a.abs().clamp(min=1e-30)),
            "grad_rel_diff": float((grad_a - grad_b).abs().max() / scale)}


def in_process(args, shape: str | None, model, folder: str, device: str, checkpointing: bool) -> list[dict]:
    from lit_prune import MaskSearch
    from lit_prune.components.gating import shared_prefix

    tokens = args.batch * args.seq
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device,
                              generator=torch.Generator(device).manual_seed(0))
    batch = {"input_ids": input_ids, "labels": input_ids}
    rows: list[dict] = []

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    def reset() -> None:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def plain_step():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    tag = " +ckpt" if checkpointing else ""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    reset()
    plain = timed(plain_step, repeats=args.repeats)
    rows.append(dict(step=f"plain fwd+bwd{tag}", path="", seconds=plain, peak_gib=peak()))
    model.zero_grad(set_to_none=True)
    for name, factory in gates(model.config.num_hidden_layers):
        results = {}
        for path, shortcuts in (("old", False), ("new", True)):
            stage = MaskSearch(folder, gate=factory, ratio=0.25, exact_shortcuts=shortcuts,
                               gradient_checkpointing=checkpointing)
            stage.model = model  # reuse the weights built on the device; the stage freezes and gates them
            stage.on_model_loaded()
            stage.gate.to(device)
            stage.train()
            gate_param = next(stage.gate.parameters())

            def search_step(stage=stage):
                loss = stage.training_step(batch, 0)
                loss.backward()
                stage.gate.zero_grad(set_to_none=True)

            # Seeded steps for the old/new comparison (E3 samples its mask from the global RNG); the old path twice,
            # so run-to-run noise of the GPU kernels (atomics in attention backward) shows beside old vs new.
            for repeat in range(2 if path == "old" else 1):
                torch.manual_seed(0)
                loss = stage.training_step(batch, 0)
                loss.backward()
                values = stage.gating.values.detach().cpu()
                results[path if repeat == 0 else "old_again"] = (loss.detach().clone(), gate_param.grad.clone(), values)
                stage.gate.zero_grad(set_to_none=True)
                del loss
            reset()
            torch.manual_seed(1)
            seconds = timed(search_step, repeats=args.repeats) if args.repeats else float("nan")
            hidden = model.get_input_embeddings().weight.dtype
            rows.append(dict(step=f"search {name}{tag}", path=path, seconds=seconds, peak_gib=peak(),
                             teacher_from=min(shared_prefix(values, hidden), len(values) - 1) if shortcuts else 0,
                             dropped_exactly=int((values == 0).sum())))
            stage.gating.remove()
            del stage
            reset()
        (old_loss, old_grad, _), (new_loss, new_grad, _) = results["old"], results["new"]
        rows[-1]["same"] = bool(torch.equal(old_loss, new_loss) and torch.equal(old_grad, new_grad))
        rows[-1].update(difference(results["old"], results["new"]))
        rows[-1].update({f"old_again_{k}": v for k, v in difference(results["old"], results["old_again"]).items()})
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_disable()
        model.eval()
    for row in rows:
        row.update(shape=shape or args.model, ratio_to_plain=row["seconds"] / plain,
                   tokens_per_s=tokens / row["seconds"])
    return rows


def cli_args(args, folder: Path, text: Path, run_dir: Path, shortcuts: bool) -> list[str]:
    return [
        "fit", "-c", str(ROOT / CLI_CONFIG),
        f"--model.init_args.pretrained={folder}",
        f"--model.init_args.exact_shortcuts={str(shortcuts).lower()}",
        "--data.dataset=null",
        f"--data.text_files=[{text}]",
        f"--data.max_length={args.seq}",
        f"--data.batch_size={args.batch}",
        f"--trainer.max_steps={args.cli_steps}",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.callbacks+=benchmarks.search_overhead.StepClock",
        *(["--trainer.accelerator=cpu", "--trainer.precision=32-true"] if not torch.cuda.is_available() else []),
    ]


def through_cli(args, shape: str, folder: Path, plain: float, work: Path) -> list[dict]:
    text = work / "train.txt"
    # Enough characters for every step's batch, the held-out fraction and some slack.
    write_text(text, int((args.cli_steps + 8) * args.batch * args.seq * 1.2))
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for path, shortcuts in (("old", False), ("new", True)):
        if path not in args.cli_paths:
            continue
        command = [sys.executable, "-m", "lit_prune",
                   *cli_args(args, folder, text, work / "runs" / f"{shape}-{path}", shortcuts)]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
        if done.returncode != 0 or not lines:
            print(f"CLI {shape} {path} failed, rc {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
                  flush=True)
            rows.append(dict(step=f"CLI {CLI_CONFIG}", path=path, shape=shape, error=done.stderr[-2000:]))
            continue
        result = json.loads(lines[-1][len(RESULT_TAG):])
        steps = result["steps"][args.cli_warmup:]
        seconds = statistics.median(steps)
        rows.append(dict(step=f"CLI {CLI_CONFIG}", path=path, shape=shape, seconds=seconds, peak_gib=result["peak_gib"],
                         ratio_to_plain=seconds / plain, tokens_per_s=args.batch * args.seq / seconds,
                         steps_timed=len(steps), wall_seconds=wall))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']}; batch {results['args']['batch']} x {results['args']['seq']} tokens, "
          f"{results['args']['dtype']}, eager")
    print("| shape | step | path | seconds | throughput vs plain | peak GiB | teacher from | bit-identical to old | "
          "grad rel. diff vs old | old vs old again |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        if "seconds" not in row:
            print(f"| {row['shape']} | {row['step']} | {row['path']} | failed | | | | | | |")
            continue
        mem = "" if row.get("peak_gib") is None else f"{row['peak_gib']:.1f}"
        diff = "" if "grad_rel_diff" not in row else f"{row['grad_rel_diff']:.1e}"
        again = "" if "old_again_grad_rel_diff" not in row else f"{row['old_again_grad_rel_diff']:.1e}"
        # The convention: plain step time / search step time (1.00x = as fast as plain fine-tuning).
        print(f"| {row['shape']} | {row['step']} | {row['path']} | {row['seconds']:.3f} | "
              f"{1 / row['ratio_to_plain']:.3f}x | {mem} | {row.get('teacher_from', '')} | {row.get('same', '')} | "
              f"{diff} | {again} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="*", choices=sorted(SHAPES), default=[])
    parser.add_argument("--model", default="offline:smollm2-135m", help="real model, when no --shape is given")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="also time with activation checkpointing")
    parser.add_argument("--cli-shape", nargs="*", choices=sorted(SHAPES), default=[],
                        help="shapes (also in --shape) whose search step is also timed through the CLI")
    parser.add_argument("--cli-paths", nargs="+", choices=["old", "new"], default=["old", "new"])
    parser.add_argument("--cli-steps", type=int, default=40)
    parser.add_argument("--cli-warmup", type=int, default=5, help="CLI steps left out of the median")
    parser.add_argument("--work", default=None, help="folder for the saved model, text and CLI runs (default: temp)")
    parser.add_argument("--allow-cpu", action="store_true", help="run the CLI part on the CPU (a smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not set(args.cli_shape) <= set(args.shape):
        sys.exit(f"--cli-shape {args.cli_shape} must be among --shape {args.shape}.")
    if args.cli_shape and not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("The CLI rows time GPU runs: they need CUDA (--allow-cpu: a smoke run).")

    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="search_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "args": vars(args), "rows": []}
    for shape in args.shape or [None]:
        folder, model, device = build(args, shape)
        rows = in_process(args, shape, model, folder, device, checkpointing=False)
        results["rows"] += rows
        if args.checkpointing:
            results["rows"] += in_process(args, shape, model, folder, device, checkpointing=True)
        write_json(args.out, results)
        if shape in args.cli_shape:
            saved = work / f"random-{shape}"
            begin = time.perf_counter()
            model.save_pretrained(saved)
            char_tokenizer().save_pretrained(saved)
            print(f"saved {shape} in {time.perf_counter() - begin:.1f} s", flush=True)
        del model  # the CLI process needs the GPU memory
        if device == "cuda":
            torch.cuda.empty_cache()
        if shape in args.cli_shape:
            results["rows"] += through_cli(args, shape, saved, rows[0]["seconds"], work)
            write_json(args.out, results)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, results)
    print_table(results)


if __name__ == "__main__":
    main()
