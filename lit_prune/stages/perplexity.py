"""Perplexity: ``val/ppl`` of a model as it is, or with a mask applied, for ``python -m lit_prune validate``.

(Named ``Evaluate`` before; ``lit_prune.Evaluate`` still resolves to it for one release. The ``evaluate`` command is a
different tool: several models side by side, ``lit_prune.evaluate_models``.)
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_prune.components.gating import LayerGating
from lit_prune.components.mask_io import MaskArtifact, load_mask
from lit_prune.components.surgery import drop_layers
from lit_prune.hf import Dtype
from lit_prune.stages.base import PruneStage


class Perplexity(PruneStage):
    """Report ``val/ppl`` of a dense model, or of the same model with a mask applied.

    Args:
        pretrained: Hugging Face id, local folder, or ``offline:smollm2-135m``.
        mask: Optional ``mask.json`` to apply before evaluating.
        mask_mode: ``drop`` removes the layers (real surgery); ``gate`` keeps them and zeroes their residual update.
        allow_model_mismatch: Apply a mask whose ``model`` id differs from ``pretrained`` (same layer count).
        dtype: Dtype the weights are loaded in.
        optimizer: Unused by evaluation; kept so every stage shares one signature.
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        mask_mode: Literal["drop", "gate"] = "drop",
        allow_model_mismatch: bool = False,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__(pretrained, dtype=dtype, optimizer=optimizer)
        self.mask: MaskArtifact | None = load_mask(mask) if mask else None
        if self.mask is not None:
            self.mask.check_fits(self.num_layers, pretrained, allow_model_mismatch)
        self.mask_mode = mask_mode
        self.gating: LayerGating | None = None

    def on_model_loaded(self) -> None:
        self.freeze_model()
        if self.mask is None:
            return
        if self.mask_mode == "drop":
            drop_layers(self.model, self.mask.drop)
        else:
            self.gating = LayerGating(self.model)
            self.gating.set_mask(self.mask.keep_mask())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        raise RuntimeError("Perplexity only validates: run `python -m lit_prune validate -c ...`, not `fit`.")
