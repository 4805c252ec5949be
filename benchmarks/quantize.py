"""Pruning composed with quantization on the CPU: dense / pruned / recovered, each in bf16 and torchao int8.

    python -m benchmarks.quantize --model offline:smollm2-135m --mask configs/masks/smollm2_drop_12_20.json \
        --recovery-steps 100 --work runs/quantize_bench --out docs/results/quantize_smollm2_cpu.json

Pipeline (the package's own commands and functions):
1. dense: the model saved once in bf16 (so every size below compares bf16 with int8).
2. pruned: ``export_from_mask`` (``python -m lit_prune export``) in bf16.
3. recovered: ``python -m lit_prune fit -c configs/clp_endpoint_smollm2.yaml`` (endpoint LoRA, bf16, merged export)
   with the mask and ``--recovery-steps`` steps.
4. int8: ``quantize_checkpoint`` (``python -m lit_prune quantize --method torchao-int8-weight``) of each of them.
5. ``evaluate`` (``python -m lit_prune evaluate``): held-out perplexity on offline:britannica (16 x 256 tokens, the
   protocol of configs/eval_smollm2.yaml, in bf16), weight bytes on disk and in memory, forward tokens/s (4 x 256).
6. Decode tokens/s: greedy ``generate``, batch 1, a 32-token prompt, ``--decode-new`` new tokens (median of 3).
Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import generate_tokens_per_s, machine, write_json
from lit_prune.assets import resolve_pretrained
from lit_prune.components.checkpoint import export_from_mask
from lit_prune.components.mask_io import load_mask
from lit_prune.components.quantize import load_quantized, quantize_checkpoint
from lit_prune.evaluate_models import evaluate

ROOT = Path(__file__).parents[1]
INT8 = "torchao-int8-weight"


def save_dense_bf16(model: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out.is_dir():
        return
    path = resolve_pretrained(model)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def recover(model: str, mask: str, steps: int, work: Path) -> tuple[Path, float]:
    """Endpoint-LoRA recovery through the CLI (as scripts/demo.sh); returns the merged export and the seconds."""
    out = work / "runs" / "clp_endpoint_smollm2" / "bench" / "pruned"
    if out.is_dir():
        return out, float("nan")
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lit_prune", "fit", "-c", str(ROOT / "configs/clp_endpoint_smollm2.yaml"),
         f"--model.init_args.pretrained={model}", f"--model.init_args.mask={mask}", f"--trainer.max_steps={steps}",
         "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
         f"--trainer.logger.init_args.save_dir={work / 'runs'}", "--trainer.logger.init_args.version=bench"],
        check=True, cwd=ROOT,
    )
    return out, time.perf_counter() - start


def decode_tokens_per_s(folder: Path, new_tokens: int, quantized: bool) -> float:
    """Greedy ``generate`` at batch 1 from a 32-token prompt (median of 3), of the bf16 or int8 checkpoint."""
    from transformers import AutoModelForCausalLM

    model = (load_quantized(str(folder), None, device="cpu") if quantized
             else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval())
    return generate_tokens_per_s(model, new_tokens, prompt_tokens=32, repeats=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--mask", default=str(ROOT / "configs/masks/smollm2_drop_12_20.json"))
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--text-files", nargs="+", default=["offline:britannica"])
    parser.add_argument("--decode-new", type=int, default=32)
    parser.add_argument("--work", default="runs/quantize_bench", help="Folder for the checkpoints (reused if there).")
    parser.add_argument("--out", default=None, help="JSON results file.")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    folders = {"dense": work / "dense", "pruned": work / "pruned"}
    save_dense_bf16(args.model, folders["dense"])
    if not folders["pruned"].is_dir():
        export_from_mask(args.model, load_mask(args.mask), folders["pruned"], dtype="bfloat16")
    folders["recovered"], recovery_seconds = recover(args.model, args.mask, args.recovery_steps, work)
    for name in ("dense", "pruned", "recovered"):
        target = work / f"{name}-int8"
        if not target.is_dir():
            quantize_checkpoint(str(folders[name]), INT8, target, device="cpu")
        folders[f"{name}+int8"] = target
    order = ["dense", "dense+int8", "pruned", "pruned+int8", "recovered", "recovered+int8"]
    results = evaluate(
        {name: str(folders[name]) for name in order}, out=work / "eval", overwrite=True, text_files=args.text_files,
        max_length=256, val_fraction=0.1, max_blocks=16, batch_size=4, device="cpu",
    )
    rows = []
    for name in order:
        entry = results["models"][name]
        entry["decode_tokens_per_s"] = decode_tokens_per_s(folders[name], args.decode_new, "int8" in name)
        rows.append((name, entry))
        print(f"{name}: ppl {entry['ppl']['ppl']:.2f}, decode {entry['decode_tokens_per_s']:.1f} tok/s", flush=True)
    payload = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
        "model": args.model, "mask": load_mask(args.mask).to_dict(), "recovery_steps": args.recovery_steps,
        "recovery_seconds": recovery_seconds, "method": INT8, "decode": {"batch": 1, "prompt": 32,
                                                                        "new_tokens": args.decode_new},
        "evaluate": results,
    }
    write_json(args.out, payload)
    dense = results["models"]["dense"]
    print(f"\n{machine()}; held-out ppl on {args.text_files} (16 x 256 tokens, bf16 compute)\n")
    print("| variant | layers | weights | ppl | ppl vs dense | weight files MB | forward tok/s (4x256) | "
          "decode tok/s (b1) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, entry in rows:
        print(f"| {name} | {entry['num_layers']} | {entry['quantization'] or 'bf16'} | {entry['ppl']['ppl']:.2f} | "
              f"{entry['ppl']['ppl'] / dense['ppl']['ppl']:.3f}x | {entry['weight_bytes_on_disk'] / 1e6:.1f} | "
              f"{entry['ppl']['tokens_per_s']:.0f} | {entry['decode_tokens_per_s']:.1f} |")


if __name__ == "__main__":
    main()
