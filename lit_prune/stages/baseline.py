"""Baseline: training-free layer selection in the same harness as the searches (same data, same mask.json).

``fit`` takes ``calibration_batches`` batches of training blocks (by default spread over the whole training set by
the rule ``MaskSearch`` calibrates with: with ``calibration_batches`` equal to the search's ``importance_batches``
both see the same tokens), then the chosen scorer selects the layers to drop when training ends, and
``ModelExport`` writes the mask exactly as it does for CLP and E3. Scorers (pure torch) live in
``lit_prune.components.scorers``:

=================  =========================================================================================
block_influence    ShortGPT: drop the layers whose output is most similar to their input (lowest BI)
angular            Gromov et al.: the contiguous window with the smallest angular distance input -> output
sleb               SLEB: remove, one at a time, the layer whose removal hurts calibration perplexity least
tail               drop the last layers before the protected final layer(s)
random             a seeded random choice
window_scan        every contiguous window scored with the search objective (KL to the dense model): the
                   exact optimum of a single-segment CLP search on the same batches
kl_importance      drop the layers whose individual removal changes the output least (E3's init, one-shot)
=================  =========================================================================================
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_prune.assets import canonical_model_id
from lit_prune.components.checks import check_choice
from lit_prune.components.gating import LayerGating
from lit_prune.components.mask_io import MaskArtifact
from lit_prune.components.scorers import SCORERS, LayerSelection, candidate_layers, score
from lit_prune.data import CalibrationSampling
from lit_prune.hf import Dtype
from lit_prune.stages.base import (
    PruneStage,
    calibration_batches,
    num_drop_from,
    save_gated_as_pruned,
    strip_frozen_model,
)

BaselineMethod = Literal["block_influence", "angular", "sleb", "tail", "random", "window_scan", "kl_importance"]
BaselineCalibration = Literal[CalibrationSampling, "shuffled"]  # MaskSearch's rules, plus the loader's own order


class Baseline(PruneStage):
    """Select layers to drop with a training-free baseline on calibration batches.

    Args:
        pretrained: Hugging Face id, local folder, or ``offline:smollm2-135m``; also feeds ``data.tokenizer``.
        method: Which baseline scores the layers.
        ratio: Fraction of decoder layers to drop (``round(ratio * num_layers)``); or set ``num_drop``.
        num_drop: Number of decoder layers to drop; overrides ``ratio``.
        calibration_batches: Training batches the scorer sees.
        calibration: Which training blocks form them: ``spread`` (default; evenly spaced over the training set in
            dataset order, the blocks ``MaskSearch(calibration="spread")`` calibrates on), ``first`` (the first
            blocks) or ``shuffled`` (the first batches of the shuffled training loader, as before 2026-12-02).
        protect_first: Never drop this many first layers.
        protect_last: Never drop this many last layers.
        seed: Seed of the ``random`` baseline.
        dtype: Dtype the weights are loaded in.
        optimizer: Unused (nothing trains); kept so every stage shares one signature.
    """

    def __init__(
        self,
        pretrained: str,
        method: BaselineMethod = "block_influence",
        ratio: float | None = 0.25,
        num_drop: int | None = None,
        calibration_batches: int = 4,
        calibration: BaselineCalibration = "spread",
        protect_first: int = 1,
        protect_last: int = 1,
        seed: int = 0,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
    ) -> None:
        super().__init__(pretrained, dtype=dtype, optimizer=optimizer)
        check_choice(method, sorted(SCORERS), "model.init_args.method")
        if num_drop is not None and ratio is not None:
            ratio = None
        self.num_drop = num_drop_from(ratio, num_drop, self.num_layers, pretrained)
        candidate_layers(self.num_layers, self.num_drop, protect_first, protect_last)  # raises before weights load
        if calibration_batches < 1:
            raise ValueError(f"`model.init_args.calibration_batches` must be >= 1, got {calibration_batches}.")
        check_choice(calibration, BaselineCalibration, "model.init_args.calibration")
        self.method = method
        self.calibration_batches = calibration_batches
        self.calibration = calibration
        self.protect_first, self.protect_last, self.seed = protect_first, protect_last, seed
        self.automatic_optimization = False
        self.batches: list[Tensor] = []
        self.selection: LayerSelection | None = None
        self.gating: LayerGating | None = None
        self.strict_loading = False

    def on_model_loaded(self) -> None:
        self.freeze_model()
        self.gating = LayerGating(self.model)

    def configure_optimizers(self) -> None:
        return None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.calibration == "shuffled":
            self.batches.append(batch["input_ids"])
            self.trainer.should_stop = len(self.batches) >= self.calibration_batches
        else:  # one step: the blocks come from the dataset in its own order, not from the loader
            self.batches = calibration_batches(self.trainer, self.calibration_batches, self.calibration, self.device)
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        self.selection = score(
            self.method, self.model, self.gating, self.batches, self.num_drop,
            protect_first=self.protect_first, protect_last=self.protect_last, seed=self.seed,
        )
        self.print(f"{self.method}: drop {self.selection.drop}")

    def eval_logits(self, input_ids: Tensor) -> Tensor:
        if self.selection is None:
            return self(input_ids)
        self.gating.set_mask(self.selection.keep_mask(self.num_layers))
        try:
            return self(input_ids)
        finally:
            self.gating.set(None)

    # capabilities used by ModelExport / MaskMonitor
    def current_drop(self) -> list[int]:
        return list(self.selection.drop) if self.selection else []

    def mask_artifact(self) -> MaskArtifact:
        if self.selection is None:
            raise RuntimeError("Baseline has not selected layers yet: run `fit` so it sees calibration batches.")
        extra: dict[str, Any] = {"calibration_batches": len(self.batches), "calibration": self.calibration,
                                 "details": _jsonable(self.selection.details)}
        return MaskArtifact(
            model=canonical_model_id(self.pretrained), num_layers=self.num_layers, drop=self.selection.drop,
            method=self.method, scores=self.selection.scores, extra=extra,
        )

    def save_pruned_model(self, out_dir: str, overwrite: bool = False) -> None:
        save_gated_as_pruned(self, out_dir, overwrite)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        strip_frozen_model(checkpoint)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)
