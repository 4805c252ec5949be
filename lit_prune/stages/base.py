"""PruneStage: what every lit_prune LightningModule shares.

- ``pretrained`` first (the CLI links it into ``data.tokenizer``); cheap checks with ``AutoConfig`` in ``__init__``,
  weights loaded in ``configure_model`` (after callbacks have validated the run, and lazily for sharded strategies);
- an injected optimizer factory (``OptimizerCallable``) over whatever the stage marks trainable;
- ``val/loss`` and ``val/ppl`` on the validation split, so ``validate`` reports perplexity for any stage.

Reusable callbacks rely on small capabilities (an attribute such as ``temperature`` or ``k``, a method such as
``mask_artifact()``), never on these classes; each callback checks the one it needs in ``setup``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_prune import hf
from lit_prune.data import CalibrationSampling, calibration_indices
from lit_prune.hf import Dtype
from lit_prune.metrics import TokenPerplexity, shifted_token_nll
from lit_prune.stages.distributed import (
    average_gradients_,
    check_run_settings,
    clip_fsdp_gradients,
    fsdp_strategy,
    prepare_fsdp_loading,
)


def num_drop_from(ratio: float | None, num_drop: int | None, num_layers: int, pretrained: str) -> int:
    """Resolve the layer budget from ``ratio`` or ``num_drop`` (exactly one), with errors in config keys."""
    if (ratio is None) == (num_drop is None):
        raise ValueError(
            "Set exactly one of `model.init_args.ratio` (fraction of decoder layers to drop) and "
            f"`model.init_args.num_drop` (a layer count); got ratio={ratio}, num_drop={num_drop}."
        )
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"`model.init_args.ratio` must be in (0, 1), got {ratio}. E.g. 0.25 drops a quarter.")
        num_drop = round(ratio * num_layers)
        if num_drop < 1:
            raise ValueError(
                f"`model.init_args.ratio`={ratio} drops round({ratio} * {num_layers}) = 0 layers of {pretrained!r}. "
                f"Use a ratio >= {0.5 / num_layers:.3f}."
            )
    if not 1 <= num_drop <= num_layers - 1:
        raise ValueError(
            f"`model.init_args.num_drop` must be in [1, {num_layers - 1}] for {pretrained!r} ({num_layers} decoder "
            f"layers), got {num_drop}."
        )
    return num_drop


def save_gated_as_pruned(stage: PruneStage, out_dir: str, overwrite: bool = False) -> None:
    """Remove a gated stage's hooks, drop the layers of its ``mask_artifact()`` and save a vanilla checkpoint.

    The stage holds the pruned model afterwards.
    """
    from lit_prune.components.checkpoint import save_pruned

    artifact = stage.mask_artifact()
    stage.gating.remove()
    save_pruned(stage.model, artifact, out_dir, tokenizer=hf.load_tokenizer(stage.pretrained), overwrite=overwrite)


def calibration_batches(
    trainer: L.Trainer, num_batches: int, sampling: CalibrationSampling, device: torch.device
) -> list[Tensor]:
    """``num_batches`` batches of training blocks picked by ``sampling`` (:func:`lit_prune.data.calibration_indices`)
    and collated as the training loader does; the same on every rank and resume (no RNG)."""
    loader = trainer.train_dataloader
    dataset, size = loader.dataset, loader.batch_size or 1
    rows = [dataset[i] for i in calibration_indices(len(dataset), num_batches * size, sampling)]
    return [loader.collate_fn(rows[i : i + size])["input_ids"].to(device) for i in range(0, len(rows), size)]


def strip_frozen_model(checkpoint: dict[str, Any]) -> None:
    """Keep gates and buffers in a Lightning checkpoint; the frozen model is reloaded from ``pretrained``."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}


class PruneStage(L.LightningModule):
    """Base of every lit_prune stage: loads one HF causal LM and reports validation perplexity.

    Args:
        pretrained: Hugging Face id, local folder, or ``offline:smollm2-135m``; also feeds ``data.tokenizer``.
        dtype: Dtype the weights are loaded in (``auto`` keeps the checkpoint's).
        optimizer: Optimizer factory applied to the trainable parameters.
        gradient_checkpointing: Recompute layer activations in the backward pass to save memory.
    """

    def __init__(
        self,
        pretrained: str,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.pretrained = pretrained
        self.dtype_name = dtype
        self.optimizer_factory = optimizer
        self.gradient_checkpointing = gradient_checkpointing
        self.config = hf.load_config(pretrained)
        self.model: nn.Module | None = None
        self.val_ppl = TokenPerplexity()
        self.weights_on_meta = False  # set under FSDP on ranks > 0: rank 0's weights arrive while sharding

    def replicated_modules(self) -> list[nn.Module]:
        """Small trainable modules kept whole on every rank (outside FSDP's flat parameters)."""
        return []

    def adds_lora(self) -> bool:
        """True when the stage wraps the model with (float32) LoRA adapters."""
        return False

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_run_settings(self, self.trainer, float32_trainables=bool(self.replicated_modules()),
                               float32_adapters=self.adds_lora())

    def is_sharded(self) -> bool:
        """True when a strategy (FSDP) holds this module's weights in shards."""
        return fsdp_strategy(self._trainer) is not None

    def load_weights(self, pretrained: str) -> nn.Module:
        """Load a model, or only its architecture on the meta device where FSDP will broadcast rank 0's weights."""
        if self.weights_on_meta:
            config = self.config if pretrained == self.pretrained else hf.load_config(pretrained)
            return hf.meta_model(config, self.dtype_name)
        return hf.load_causal_lm(pretrained, self.dtype_name)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.weights_on_meta = prepare_fsdp_loading(self._trainer, self.replicated_modules())
        self.model = self.load_weights(self.pretrained)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.on_model_loaded()

    def on_model_loaded(self) -> None:
        """Hook for subclasses: freeze, gate, cut or wrap the freshly loaded model."""

    def forward(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False, **kwargs).logits

    def eval_logits(self, input_ids: Tensor) -> Tensor:
        """Logits used for validation (subclasses evaluate their pruned view here)."""
        return self(input_ids)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.eval_logits(batch["input_ids"])
        nll, count = shifted_token_nll(logits, batch["labels"])
        loss = nll / count.clamp(min=1)
        self.val_ppl.update(logits, batch["labels"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)
        return loss

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.eval_logits(batch["input_ids"])
        nll, count = shifted_token_nll(logits, batch["labels"])
        self.log("test/loss", nll / count.clamp(min=1), sync_dist=True)
        return nll

    def on_after_backward(self) -> None:
        if self.is_sharded():
            # FSDP reduces what it shards; replicated modules are averaged here (DDP already reduces everything).
            average_gradients_([p for m in self.replicated_modules() for p in m.parameters() if p.requires_grad])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if gradient_clip_val and self.is_sharded() and gradient_clip_algorithm in (None, "norm"):
            clip_fsdp_gradients(self.trainer, float(gradient_clip_val))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{type(self).__name__} has no trainable parameters to optimize.")
        return self.optimizer_factory(params)

    def freeze_model(self) -> None:
        """Freeze every weight of the wrapped model (search stages train only their gates)."""
        for param in self.model.parameters():
            param.requires_grad_(False)
