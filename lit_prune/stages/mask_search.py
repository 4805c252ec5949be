"""MaskSearch: learn which decoder layers to drop, with the base weights frozen and only a gate trained.

One training step on a batch ``x``::

    with no_grad, gates open:   p_T = softmax(model(x))          # dense teacher = the same weights, no copy
    g = gate()                   # [num_layers] in [0, 1]: ConcaveGate (CLP) notch or GumbelTopKGate (E3) k-hot
    gates = g:                   p_S = softmax(model(x))          # h_out = h + g_l (F_l(h) - h) per layer
    loss = KL(p_T || p_S) [+ ce_weight * CE(p_S, x)]            # direction configurable

Validation evaluates the *hard* mask the gate would export now: ``val/kl`` against the dense model and ``val/ppl``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_prune.assets import canonical_model_id
from lit_prune.components.gates import ConcaveGate, GumbelTopKGate, LayerGate, logits_from_importance
from lit_prune.components.gating import LayerGating
from lit_prune.components.losses import Direction, kl_loss, next_token_ce
from lit_prune.components.mask_io import MaskArtifact
from lit_prune.hf import Dtype, meta_model
from lit_prune.metrics import TokenPerplexity
from lit_prune.stages.base import PruneStage, num_drop_from, save_gated_as_pruned, strip_frozen_model
from lit_prune.stages.distributed import (
    average_across_ranks,
    broadcast_from_rank0_,
    checkpoints_activations,
    fsdp_strategy,
)

METHOD_NAMES = {ConcaveGate: "clp", GumbelTopKGate: "e3"}


class MaskSearch(PruneStage):
    """Learn which decoder layers to drop with a differentiable per-layer gate; the model's weights stay frozen.

    Args:
        pretrained: Hugging Face id, local folder, or ``offline:smollm2-135m``; also feeds ``data.tokenizer``.
        gate: Gate factory, called with ``(num_layers, num_drop)``: ``lit_prune.ConcaveGate`` (CLP) or
            ``lit_prune.GumbelTopKGate`` (E3).
        ratio: Fraction of decoder layers to drop (``round(ratio * num_layers)``); or set ``num_drop``.
        num_drop: Number of decoder layers to drop; overrides ``ratio`` when ``ratio`` is null.
        kl_direction: ``forward`` = KL(dense || gated), ``reverse`` = KL(gated || dense).
        ce_weight: Weight of an extra next-token cross-entropy term on the gated model (0 = pure KL).
        importance_init: ``kl`` initialises GumbelTopKGate logits from per-layer KL importance (skip one layer,
            measure the output KL) on ``importance_batches`` training batches; ``none`` keeps the gate's own init.
        importance_batches: Calibration batches used by ``importance_init``.
        importance_scale: Scale of the standardized log-importance logits.
        method: Name recorded in mask.json (default: ``clp`` for ConcaveGate, ``e3`` for GumbelTopKGate).
        kl_chunk_tokens: Compute the KL over this many tokens at a time, recomputed in backward: lowers peak memory
            at large batch x vocabulary (docs/scale.md); null computes it at once.
        compile_blocks: torch.compile each decoder layer's norm and MLP submodules (fuses their pointwise ops; the
            first steps pay the compile time). See docs/scale.md.
        dtype: Dtype the frozen weights are loaded in (bfloat16 halves memory; the gate stays float32).
        optimizer: Optimizer factory for the gate parameters.
        gradient_checkpointing: Recompute layer activations in the backward pass to save memory.
    """

    def __init__(
        self,
        pretrained: str,
        gate: Callable[[int, int], LayerGate],
        ratio: float | None = 0.25,
        num_drop: int | None = None,
        kl_direction: Direction = "forward",
        ce_weight: float = 0.0,
        importance_init: Literal["none", "kl"] = "none",
        importance_batches: int = 2,
        importance_scale: float = 1.0,
        method: str | None = None,
        kl_chunk_tokens: int | None = None,
        compile_blocks: bool = False,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(pretrained, dtype=dtype, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing)
        if num_drop is not None and ratio is not None:
            ratio = None  # an explicit count wins over the default ratio
        self.num_drop = num_drop_from(ratio, num_drop, self.num_layers, pretrained)
        if ce_weight < 0:
            raise ValueError(f"`model.init_args.ce_weight` must be >= 0, got {ce_weight}.")
        if kl_chunk_tokens is not None and (isinstance(kl_chunk_tokens, bool) or kl_chunk_tokens < 1):
            raise ValueError(f"`model.init_args.kl_chunk_tokens` must be >= 1 or null, got {kl_chunk_tokens!r}.")
        self.kl_chunk_tokens = kl_chunk_tokens
        self.compile_blocks = compile_blocks
        if compile_blocks:
            if gradient_checkpointing:
                raise ValueError(
                    "`model.init_args.compile_blocks: true` cannot be combined with `gradient_checkpointing: true`: "
                    "the recomputed compiled blocks save different tensors (torch CheckpointError). Use one of the "
                    "two."
                )
            self._check_compilable()
        if importance_batches < 1:
            raise ValueError(f"`model.init_args.importance_batches` must be >= 1, got {importance_batches}.")
        # The gate is tiny: building it here validates protected layers and segments before any weight loads.
        self.gate = gate(self.num_layers, self.num_drop)
        if importance_init == "kl" and not hasattr(self.gate, "logits"):
            raise ValueError(
                f"`model.init_args.importance_init`='kl' sets per-layer logits, which {type(self.gate).__name__} "
                "does not have. Use GumbelTopKGate, or importance_init: none."
            )
        self.kl_direction = kl_direction
        self.ce_weight = ce_weight
        self.importance_init = importance_init
        self.importance_batches = importance_batches
        self.importance_scale = importance_scale
        self.method = method or METHOD_NAMES.get(type(self.gate), type(self.gate).__name__.lower())
        self.register_buffer("importance_done", torch.tensor(False))
        self._importance_pending = False  # set in on_train_start
        self.gating: LayerGating | None = None
        self.val_dense_ppl = TokenPerplexity()
        # Frozen weights are reloaded from `pretrained`; checkpoints keep only what trains.
        self.strict_loading = False

    # ------------------------------------------------------------ capabilities for reusable callbacks
    @property
    def temperature(self) -> float:
        return self.gate.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.gate.temperature = value

    def _budgeted_gate(self, name: str) -> LayerGate:
        gate = self._modules.get("gate")
        if gate is None or not hasattr(gate, name):
            # AttributeError, so hasattr(module, "k") is False for gates without a budget (TopKAnnealing checks it).
            raise AttributeError(f"{type(gate).__name__} has no layer budget `{name}` (GumbelTopKGate has one).")
        return gate

    @property
    def k(self) -> int:
        """Layers the budgeted gate (GumbelTopKGate) drops now; TopKAnnealing drives it. Absent for other gates."""
        return self._budgeted_gate("k").k

    @k.setter
    def k(self, value: int) -> None:
        self._budgeted_gate("k").k = value

    @property
    def k_target(self) -> int:
        """The budget ``k`` ends on (``num_drop``), read by TopKAnnealing; absent for gates without a budget."""
        return self._budgeted_gate("k_target").k_target

    def layer_gate_values(self) -> Tensor:
        """Deterministic gate view ``[num_layers]`` in [0, 1] for monitoring."""
        return self.gate.keep_probabilities().detach().float().cpu()

    def current_drop(self) -> list[int]:
        """Layers the hard mask drops right now."""
        return self.gate.drop_indices()

    def mask_artifact(self) -> MaskArtifact:
        """The search result as the mask.json contract."""
        extra: dict[str, Any] = {"gate": type(self.gate).__name__, "kl_direction": self.kl_direction}
        if self._trainer is not None:
            extra["global_step"] = int(self.trainer.global_step)
        return MaskArtifact(
            model=canonical_model_id(self.pretrained), num_layers=self.num_layers, drop=self.gate.drop_indices(),
            method=self.method, scores=self.gate.scores(), extra=extra,
        )

    def save_pruned_model(self, out_dir: str, overwrite: bool = False) -> None:
        """Hard-prune the searched model and save it; call it on every rank, rank 0 writes.

        On one process the module holds the pruned model afterwards. Across processes (DDP, FSDP) rank 0 reloads
        ``pretrained`` on the CPU and cuts it: the weights are frozen, so this equals the gathered model, and nothing
        is gathered onto a GPU.
        """
        if not self.is_sharded() and (self._trainer is None or self.trainer.world_size == 1):
            save_gated_as_pruned(self, out_dir, overwrite)
            return
        if self.trainer.is_global_zero:
            from lit_prune.components.checkpoint import export_from_mask

            export_from_mask(self.pretrained, self.mask_artifact(), out_dir, overwrite, self.dtype_name)

    # ------------------------------------------------------------ model
    def replicated_modules(self):
        return [self.gate]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = fsdp_strategy(self._trainer)
        if self.compile_blocks and strategy is not None and checkpoints_activations(strategy):
            raise ValueError(
                "`model.init_args.compile_blocks: true` cannot be combined with the FSDP strategy's "
                "`activation_checkpointing_policy` (torch CheckpointError on recomputation). Drop one of the two."
            )

    def on_model_loaded(self) -> None:
        self.freeze_model()
        self.gating = LayerGating(self.model)
        if self.compile_blocks:
            from lit_prune.components.compile import compile_pointwise_blocks

            compile_pointwise_blocks(self.model)

    def _check_compilable(self) -> None:
        """Before any weight loads: the architecture must have norm/MLP submodules to compile."""
        from lit_prune.components.compile import POINTWISE_SUFFIXES, pointwise_blocks

        if not pointwise_blocks(meta_model(self.config)):
            raise ValueError(
                f"`model.init_args.compile_blocks: true` found no submodule named *{' or *'.join(POINTWISE_SUFFIXES)} "
                f"in the decoder layers of {self.pretrained!r} ({self.config.model_type}). Set it to false for this "
                "architecture."
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.model is not None and not self.gradient_checkpointing:
            # The frozen LM is evaluated, not trained: no dropout. (HF checkpointing needs train mode.)
            self.model.eval()
        return self

    def on_train_start(self) -> None:
        broadcast_from_rank0_(list(self.gate.parameters()))  # one gate on every rank, whatever each rank initialised
        # Read once, after any checkpoint restore: a tensor test in every training step would sync with the GPU.
        self._importance_pending = self.importance_init == "kl" and not bool(self.importance_done)

    def _init_from_kl_importance(self) -> None:
        from lit_prune.components.scorers import kl_importance

        batches = []
        for batch in self.trainer.train_dataloader:
            batches.append(batch["input_ids"].to(self.device))
            if len(batches) == self.importance_batches:
                break
        importance = kl_importance(self.model, self.gating, batches)
        # Each rank measured its own batches: average, so every rank starts from the same logits.
        importance = average_across_ranks(torch.tensor(importance, device=self.device)).tolist()
        with torch.no_grad():
            self.gate.logits.copy_(logits_from_importance(importance, self.importance_scale).to(self.gate.logits))
        self.importance_done.fill_(True)
        self.print(f"KL importance per layer: {[round(v, 4) for v in importance]}")

    # ------------------------------------------------------------ steps
    def _teacher_logits(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad(), self.gating.opened():
            return self.model(input_ids=input_ids, use_cache=False).logits

    def _gated_logits(self, input_ids: Tensor, gates: Tensor) -> Tensor:
        # The gates stay set after the forward: activation checkpointing re-runs the layers (and their gate hooks)
        # during backward, and must see the same values. The teacher pass opens them only inside its own block.
        self.gating.set(gates)
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._importance_pending:
            # Here, not in on_train_start: under FSDP the weights are gathered only inside the wrapped forward.
            self._init_from_kl_importance()
            self._importance_pending = False
        input_ids, labels = batch["input_ids"], batch["labels"]
        # Gate first: ConcaveGate's projection reads its few values on the host, and a sync here, before any
        # forward is queued, costs nothing, while one between the two forwards would idle the GPU.
        gates = self.gate()
        teacher = self._teacher_logits(input_ids)
        student = self._gated_logits(input_ids, gates)
        kl = kl_loss(teacher, student, labels=None, direction=self.kl_direction, chunk_tokens=self.kl_chunk_tokens)
        loss = kl
        logs = {"train/kl": kl}
        if self.ce_weight > 0:
            ce = next_token_ce(student, labels)
            loss = loss + self.ce_weight * ce
            logs["train/ce"] = ce
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if hasattr(self.gate, "clamp_"):
            self.gate.clamp_()  # keep segment starts feasible after the optimizer step

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        teacher = self._teacher_logits(input_ids)
        with torch.no_grad():
            hard = self.gate.hard_mask().to(device=input_ids.device, dtype=torch.float32)
            student = self._gated_logits(input_ids, hard)
        kl = kl_loss(teacher, student, labels=None, direction=self.kl_direction, chunk_tokens=self.kl_chunk_tokens)
        self.val_ppl.update(student, labels)
        self.val_dense_ppl.update(teacher, labels)
        self.log("val/kl", kl, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)
        self.log("val/dense_ppl", self.val_dense_ppl)
        return kl

    def eval_logits(self, input_ids: Tensor) -> Tensor:
        hard = self.gate.hard_mask().to(device=input_ids.device, dtype=torch.float32)
        return self._gated_logits(input_ids, hard)

    def configure_optimizers(self):
        return self.optimizer_factory(self.gate.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        strip_frozen_model(checkpoint)  # a 70B checkpoint would otherwise be 140 GB
