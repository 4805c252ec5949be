"""Helpers shared by the benchmark scripts (no `datasets` needed, so they also run on bare GPU images)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu} x{torch.get_num_threads()} threads (torch {torch.__version__})"


def text_blocks(
    tokenizer, text_files: list[str], seq: int, val_fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize files (one document each, EOS after each), cut into [n, seq] blocks; the tail is held out."""
    ids: list[int] = []
    for path in text_files:
        ids += tokenizer(Path(path).read_text())["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    num_val = max(1, round(len(blocks) * val_fraction))
    return blocks[:-num_val], blocks[-num_val:]


def timed(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=1))
