"""Dense vs pruned speed: prefill latency, static-KV-cache decode throughput, peak memory, parameter counts.

    python -m benchmarks.speed --shape llama2-7b llama3-8b --ratios 0.2 0.25            # GPU, random weights
    python -m benchmarks.speed --model offline:smollm2-135m --ratios 0.25 --prefill 1x256 --decode-batch 1

Pruned models come from the dense one through `lit_prune.drop_layers` (the surgery the export path applies), with the
contiguous middle block removed (speed does not depend on which layers go). The ideal ratio counts parameters that
run per token: (L * block + head) / (L_kept * block + head); "vs ideal" = measured speedup / ideal. Decode uses a
static KV cache and greedy steps of one token; `--compile` also times a torch.compile'd decode step.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from benchmarks._common import SHAPES, machine, timed, write_json
from benchmarks._common import static_cache_decode_tokens_per_s as decode_tokens_per_s
from lit_prune.components.layers import decoder_layers
from lit_prune.components.surgery import drop_layers


def build(args, shape: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if shape:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype).eval(), device
    from lit_prune.assets import resolve_pretrained

    return AutoModelForCausalLM.from_pretrained(resolve_pretrained(args.model), dtype=dtype).to(device).eval(), device


def block_and_head_params(model) -> tuple[int, int]:
    layers = decoder_layers(model)
    block = sum(p.numel() for p in layers[0].parameters())
    head = model.get_output_embeddings().weight.numel()
    return block, head


def measure(model, args, device: str) -> dict:
    result: dict = {"layers": len(decoder_layers(model)), "params": sum(p.numel() for p in model.parameters())}
    for spec in args.prefill:
        batch, seq = (int(x) for x in spec.split("x"))
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            seconds = timed(lambda: model(input_ids=input_ids, use_cache=False), repeats=args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        result[f"prefill_{spec}"] = {"seconds": seconds, "tokens_per_s": batch * seq / seconds, "peak_gib": peak}
    for batch in args.decode_batch:
        result[f"decode_b{batch}"] = decode_tokens_per_s(model, batch, args.decode_prompt, args.decode_new, device)
        if args.compile and device == "cuda":
            try:
                result[f"decode_b{batch}_compiled"] = decode_tokens_per_s(
                    model, batch, args.decode_prompt, args.decode_new, device, compiled=True
                )
            except Exception as err:  # a compile failure must not lose the eager numbers
                print(f"compiled decode failed: {type(err).__name__}: {str(err)[:200]}")
                args.compile = False
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs="*", default=[], choices=sorted(SHAPES))
    parser.add_argument("--model", default="offline:smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.25])
    parser.add_argument("--prefill", nargs="+", default=["1x2048", "4x2048"])
    parser.add_argument("--decode-batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--decode-prompt", type=int, default=128)
    parser.add_argument("--decode-new", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time a compiled decode step (slow to warm up)")
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--markdown", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--plot", default=None, help="also draw measured vs ideal speed-up to this PNG")
    parser.add_argument("--replot", default=None, help="re-render the table/plot of a saved --out JSON (no timing)")
    args = parser.parse_args()

    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        report(results, args.markdown, args.plot)
        return
    results = {"machine": machine(), "args": vars(args), "models": {}}
    for shape in args.shape or [None]:
        name = shape or args.model
        dense, device = build(args, shape)
        block, head = block_and_head_params(dense)
        num_layers = len(decoder_layers(dense))
        dense_result = measure(dense, args, device)
        entry = {"dense": dense_result, "pruned": {}}
        for ratio in args.ratios:
            num_drop = round(ratio * num_layers)
            start = (num_layers - num_drop) // 2
            pruned = drop_layers(copy.deepcopy(dense), list(range(start, start + num_drop)))
            ideal = (num_layers * block + head) / ((num_layers - num_drop) * block + head)
            result = measure(pruned, args, device)
            result["ideal"] = ideal
            entry["pruned"][str(ratio)] = result
            del pruned
        results["models"][name] = entry
        del dense
        if device == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, results)
    report(results, args.markdown, args.plot)


def speed_rows(results: dict) -> list[tuple]:
    """(model, ratio, measure, dense tok/s, pruned tok/s, speedup, ideal, pruned peak GiB) per measurement."""
    rows = []
    for name, entry in results["models"].items():
        dense = entry["dense"]
        for ratio, result in entry["pruned"].items():
            for key, value in result.items():
                if key.startswith("prefill_"):
                    rows.append((name, float(ratio), key, dense[key]["tokens_per_s"], value["tokens_per_s"],
                                 dense[key]["seconds"] / value["seconds"], result["ideal"], value["peak_gib"]))
                elif key.startswith("decode_"):
                    rows.append((name, float(ratio), key, dense[key], value, value / dense[key], result["ideal"],
                                 float("nan")))
    return rows


def report(results: dict, markdown: str | None, plot: str | None) -> None:
    args = results["args"]
    rows = speed_rows(results)
    lines = [
        f"machine: {results['machine']}; dtype {args['dtype']}; decode: prompt {args['decode_prompt']}, "
        f"{args['decode_new']} new tokens, static cache",
        "",
        "| model | removed | measure | dense tok/s | pruned tok/s | speedup | ideal | vs ideal | pruned peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ratio, key, d, p, s, ideal, mem in rows:
        lines.append(f"| {name} | {ratio:.0%} | {key} | {d:,.0f} | {p:,.0f} | {s:.3f}x | {ideal:.3f}x "
                     f"| {s / ideal:.3f} | {mem:.1f} |")
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text("\n".join(lines) + "\n")
    if plot:
        from lit_prune.reports import speedup_png

        speedup_png([{"label": f"{name} {ratio:.0%} {key}", "speedup": s, "ideal": ideal}
                     for name, ratio, key, _, _, s, ideal, _ in rows], plot)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
