"""A callback the distributed test passes by class path: each rank records what it saw and its final gate."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.first_tokens: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.first_tokens.append(batch["input_ids"][:, :8].tolist())

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "world_size": trainer.world_size,
            "gate": [p.detach().cpu().flatten().tolist() for p in pl_module.gate.parameters()],
            "drop": pl_module.current_drop(),
            "first_tokens": self.first_tokens,
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
