"""Where a search step's time goes, next to a plain forward+backward: CUDA kernel time by operator.

    python -m benchmarks.profile_search --shape llama2-7b --batch 2 --seq 2048

Prints, for each step, the GPU time of the top operators over a few profiled steps, the total GPU busy time and the
wall time per step (the difference is time the GPU waited for the host).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from benchmarks._common import SHAPES


def profile(name: str, step, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3 / steps
    print(f"\n== {name}: wall {wall * 1e3:.1f} ms/step (profiled), GPU busy {busy:.1f} ms/step")
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/profile_search.py profiles CUDA kernels: it needs CUDA.")

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lit_prune import ConcaveGate, MaskSearch

    config = LlamaConfig(**SHAPES[args.shape])
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids}

    def plain():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    profile("plain fwd+bwd", plain, args.steps, args.top)
    for p in model.parameters():
        p.requires_grad_(False)
    stage = MaskSearch(folder, gate=ConcaveGate, ratio=0.25)
    stage.model = model
    stage.on_model_loaded()
    stage.gate.cuda()
    stage.train()

    def search():
        stage.training_step(batch, 0).backward()
        stage.gate.zero_grad(set_to_none=True)

    profile("search clp", search, args.steps, args.top)


if __name__ == "__main__":
    main()
