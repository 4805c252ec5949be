"""A BoringModel-style stand-in with the capabilities the callbacks drive; no lit_prune stage involved."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

NUM_LAYERS = 6


class StubModule(L.LightningModule):
    """One Linear layer plus a learnable per-layer gate; records what every training step sees."""

    def __init__(self, k_target: int | None = 3) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.gate_logits = nn.Parameter(torch.linspace(-1.0, 1.0, NUM_LAYERS))
        self.temperature = 123.0  # deliberately off-schedule: the callback must overwrite it
        self.kd_temperature = 456.0
        self.k = -1
        self.k_target = k_target
        self.seen: list[dict[str, float]] = []

    def layer_gate_values(self) -> Tensor:
        return torch.sigmoid(self.gate_logits).detach()

    def current_drop(self) -> list[int]:
        num = self.k_target or 0
        return sorted(torch.argsort(self.gate_logits)[:num].tolist())

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.seen.append(
            {
                "step": self.global_step,
                "temperature": self.temperature,
                "kd_temperature": self.kd_temperature,
                "k": self.k,
            }
        )
        x, y = batch
        # The gate term makes gate values move, so the monitor's history changes over steps.
        return nn.functional.mse_loss(self.layer(x), y) + (self.gate_logits * torch.arange(NUM_LAYERS)).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
        return DataLoader(data, batch_size=4)


class NoCapabilities(L.LightningModule):
    """A module with none of the capabilities, to check the callbacks' error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


@pytest.fixture
def make_stub() -> type[StubModule]:
    """The stand-in module class; call it (optionally with ``k_target=``) for a fresh module."""
    return StubModule


@pytest.fixture
def bare_module() -> NoCapabilities:
    return NoCapabilities()


@pytest.fixture
def make_trainer(tmp_path: Path):
    """Tiny CPU trainer factory; checkpointing only with a ModelCheckpoint; TensorBoard on request, or any `logger=`."""

    def factory(max_steps: int, callbacks: list[L.Callback], tensorboard: bool = False, **kwargs) -> L.Trainer:
        kwargs.setdefault("logger", TensorBoardLogger(tmp_path, name="tb") if tensorboard else False)
        return L.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            callbacks=callbacks,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            default_root_dir=tmp_path,
            **kwargs,
        )

    return factory
