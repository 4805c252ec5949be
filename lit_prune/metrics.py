"""Token-level perplexity as a torchmetrics Metric (summed NLL and token count, synced across ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lit_prune.components.losses import IGNORE_INDEX


def shifted_token_nll(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL and the number of scored tokens.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs.
        labels: ``[batch, seq]`` token ids aligned with the inputs (shifted here), ``ignore_index`` is skipped.
    """
    logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    targets = labels[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return nll, (targets != ignore_index).sum()


class TokenPerplexity(Metric):
    """exp(mean next-token NLL) over every scored token seen since the last reset."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        nll, count = shifted_token_nll(logits, labels, self.ignore_index)
        self.nll_sum += nll.double()
        self.count += count

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1)).float()
