"""Search and cached-teacher distillation steps at real scale on one GPU, each against a plain forward+backward.

    python -m benchmarks.scale --shape llama2-7b --seq 2048 --batch 2 --out docs/results/scale_h100.json

For each step (same model, same batch, same run) it reports seconds, tokens/s, model TFLOP/s, the ratio of its
throughput to the plain step's, and peak memory, without and with activation checkpointing; then the largest batch
(powers of two, then one bisection step) that fits in GPU memory.

- plain search baseline: forward+backward of the dense model with every weight trainable (fine-tuning one step);
- search: ``MaskSearch.training_step`` + backward (teacher forward without grad, gated forward, backward to the gate);
- plain distill baseline: the 25%-pruned student with LoRA on every kept layer, next-token CE forward+backward;
- distill: ``Distill.training_step`` + backward with the teacher's top-10 logits read from a real ``TopKCache``.

Model FLOPs count the matmuls a step must do, per token: forward 2*N (N = decoder block + LM head weights) plus
attention 4*L*s*d; a weight-gradient backward doubles both, an input-gradient-only backward (frozen weights) costs
one forward's matmuls plus twice the attention. Recomputation under activation checkpointing is not counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks._common import SHAPES, free_memory, machine, timed, write_json
from lit_prune.components.layers import decoder_layers


def matmul_and_attention_flops(model, seq: int) -> tuple[float, float]:
    """Per-token forward FLOPs of the weight matmuls and of attention scores/values."""
    layers = decoder_layers(model)
    block = sum(p.numel() for n, p in layers[0].named_parameters() if "lora_" not in n and p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    hidden = model.config.hidden_size
    return 2.0 * (len(layers) * block + head), 4.0 * len(layers) * seq * hidden


CUDA = torch.cuda.is_available()


def measure(step, tokens: int, flops_per_token: float, repeats: int) -> dict:
    free_memory()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, repeats=repeats, warmup=2)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": tokens * flops_per_token / seconds / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")}


def fits(make_step, batch: int) -> bool:
    free_memory()
    try:
        make_step(batch)()
        if CUDA:
            torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        free_memory()


def largest_batch(make_step, limit: int) -> int:
    """Largest power of two that runs one step, refined by one bisection towards the next power."""
    best, batch = 0, 1
    while batch <= limit and fits(make_step, batch):
        best, batch = batch, batch * 2
    if best and best * 2 <= limit and best >= 2:
        middle = best + best // 2
        if fits(make_step, middle):
            best = middle
    return best


def batch_of(vocab: int, batch: int, seq: int, device) -> dict:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ratio", type=float, default=0.25, help="layers the distillation student has lost")
    parser.add_argument("--max-batch", type=int, default=64, help="upper end of the largest-batch search")
    parser.add_argument("--kl-chunk", type=int, default=4096, help="MaskSearch kl_chunk_tokens for the chunked rows")
    parser.add_argument("--skip-largest", action="store_true")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (checks the script, not the GPU)")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="torch.compile the norm/MLP submodules of every layer, for plain and search alike")
    parser.add_argument("--only", choices=["search", "distill"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not CUDA and not args.allow_cpu:
        sys.exit("benchmarks/scale.py measures GPU memory and throughput: it needs CUDA (--allow-cpu: a smoke run).")

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lit_prune import ConcaveGate, Distill, MaskSearch
    from lit_prune.components.teacher_cache import write_topk_cache

    device = torch.device("cuda" if CUDA else "cpu")
    config = LlamaConfig(**SHAPES[args.shape])
    folder = Path(tempfile.mkdtemp())
    config.save_pretrained(folder)  # the stages read the config (no weights) to validate their settings
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if args.compile_blocks:
        from lit_prune.components.compile import compile_pointwise_blocks

        print("compiled modules:", compile_pointwise_blocks(model), flush=True)
    tokens = args.batch * args.seq
    mm, attn = matmul_and_attention_flops(model, args.seq)
    results: dict = {"machine": machine(), "args": vars(args), "rows": [], "largest_batch": {}}
    rows = results["rows"]

    def record(name: str, checkpointing: bool, flops: float, step, baseline: dict | None = None) -> dict:
        row = {"step": name, "checkpointing": checkpointing, **measure(step, tokens, flops, args.repeats)}
        row["vs_plain"] = row["tokens_per_s"] / baseline["tokens_per_s"] if baseline else 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    # ------------------------------------------------------------------ search
    def plain_dense_step(batch_size: int):
        batch = batch_of(config.vocab_size, batch_size, args.seq, device)

        def step():
            model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    def search_stage(checkpointing: bool, chunk: int | None) -> MaskSearch:
        stage = MaskSearch(str(folder), gate=ConcaveGate, ratio=0.25, gradient_checkpointing=checkpointing,
                           kl_chunk_tokens=chunk)
        stage.model = model
        stage.on_model_loaded()
        stage.gate.to(device)
        stage.train()
        return stage

    def search_step_for(stage: MaskSearch):
        def make(batch_size: int):
            batch = batch_of(config.vocab_size, batch_size, args.seq, device)

            def step():
                stage.training_step(batch, 0).backward()
                stage.gate.zero_grad(set_to_none=True)
            return step
        return make

    for checkpointing in (False, True) if args.only != "distill" else ():
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        plain = record("plain fwd+bwd (dense, all weights)", checkpointing, 3 * (mm + attn),
                       plain_dense_step(args.batch))
        model.zero_grad(set_to_none=True)
        for chunk in (None, args.kl_chunk):
            stage = search_stage(checkpointing, chunk)
            make_search = search_step_for(stage)
            label = "search clp (teacher fwd + gated fwd + bwd to gate)" + (f", KL in {chunk}-token chunks"
                                                                            if chunk else "")
            record(label, checkpointing, 2 * mm + 2 * attn + mm + 2 * attn, make_search(args.batch), plain)
            if not args.skip_largest:
                key = "search" + ("+ckpt" if checkpointing else "") + (f"+kl_chunk{chunk}" if chunk else "")
                results["largest_batch"][key] = largest_batch(make_search, args.max_batch)
                print("largest batch", results["largest_batch"], flush=True)
            stage.gating.remove()
    model.gradient_checkpointing_disable()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    # ------------------------------------------------------------------ distill with a cached teacher
    if args.only == "search":
        write_json(args.out, results)
        print_table(results, args)
        return
    num_drop = round(args.ratio * config.num_hidden_layers)
    start = (config.num_hidden_layers - num_drop) // 2
    mask = folder / "mask.json"
    mask.write_text(json.dumps({"model": str(folder), "num_layers": config.num_hidden_layers,
                                "drop": list(range(start, start + num_drop))}))
    blocks = torch.randint(0, config.vocab_size, (max(args.batch, 2) * 2, args.seq), device=device)
    cache_dir = folder / "teacher_cache"
    write_topk_cache(model, [{"input_ids": blocks[i:i + 1]} for i in range(len(blocks))], cache_dir, k=10,
                     model_id=str(folder))
    results["cache_bytes_per_token"] = sum(f.stat().st_size for f in cache_dir.iterdir()) / blocks.numel()
    model.to("cpu")  # the distillation rows hold only their student on the GPU
    free_memory()
    train_batch = {"input_ids": blocks[: args.batch], "labels": blocks[: args.batch]}

    for checkpointing in (False, True):
        stage = Distill(str(folder), mask=str(mask), teacher_cache=str(cache_dir), train="lora", lora_layers="all",
                        r=16, dtype="bfloat16", gradient_checkpointing=checkpointing, allow_model_mismatch=True)
        stage.model = copy.deepcopy(model)
        stage.build_student()
        if checkpointing:
            stage.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        stage.to(device).train()
        student = stage.model
        s_mm, s_attn = matmul_and_attention_flops(student, args.seq)
        lora = [p for p in student.parameters() if p.requires_grad]

        def plain_student_step():
            student(input_ids=train_batch["input_ids"], labels=train_batch["labels"], use_cache=False).loss.backward()
            for p in lora:
                p.grad = None

        def distill_step():
            stage.training_step(train_batch, 0).backward()
            for p in lora:
                p.grad = None

        plain = record("plain fwd+bwd (pruned student, LoRA, CE)", checkpointing, 2 * s_mm + 3 * s_attn,
                       plain_student_step)
        record("distill, cached top-10 teacher (LoRA)", checkpointing, 2 * s_mm + 3 * s_attn, distill_step, plain)
        if not args.skip_largest:
            def make_distill(batch_size: int, stage=stage, lora=lora):
                batch = batch_of(config.vocab_size, batch_size, args.seq, device)
                # Random blocks are not in the cache: time the KD loss on a top-10 teacher of the same shape.
                indices = torch.randint(0, config.vocab_size, (batch_size, args.seq, 10), device=device)
                values = torch.randn(batch_size, args.seq, 10, device=device, dtype=torch.float16)
                stage.teacher_outputs = lambda ids: (indices, values)

                def step():
                    stage.training_step(batch, 0).backward()
                    for p in lora:
                        p.grad = None
                return step
            results["largest_batch"][f"distill{'+ckpt' if checkpointing else ''}"] = largest_batch(
                make_distill, args.max_batch)
            print("largest distill batch", checkpointing, results["largest_batch"], flush=True)
        stage = student = lora = make_distill = None  # free this student before the next one is copied
        free_memory()

    write_json(args.out, results)
    print_table(results, args)


def print_table(results: dict, args) -> None:
    print(f"\nmachine: {results['machine']}; {args.shape} random weights, bf16, batch {args.batch} x {args.seq}"
          + (", norm/MLP submodules compiled" if args.compile_blocks else ""))
    print("| step | act. ckpt | seconds | tokens/s | TFLOP/s | vs plain | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        ckpt = "yes" if r["checkpointing"] else "no"
        print(f"| {r['step']} | {ckpt} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} "
              f"| {r['vs_plain']:.2f}x | {r['peak_gib']:.1f} |")
    print("largest batch (x", args.seq, "tokens):", results["largest_batch"])
    if "cache_bytes_per_token" in results:
        print(f"teacher cache: {results['cache_bytes_per_token']:.1f} bytes/token")


if __name__ == "__main__":
    main()
