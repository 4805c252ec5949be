"""MaskSearch: learn which decoder layers to drop, with the base weights frozen and only a gate trained.

One training step on a batch ``x``::

    g = gate()                   # [num_layers] in [0, 1]: ConcaveGate (CLP) notch or GumbelTopKGate (E3) k-hot
    gates = g:                   p_S = softmax(model(x))          # h_out = h + g_l (F_l(h) - h) per layer
    with no_grad, gates open:   p_T = softmax(model(x))          # dense teacher = the same weights, no copy
    loss = KL(p_T || p_S) [+ ce_weight * CE(p_S, x)]            # direction configurable

Two exact shortcuts (``exact_shortcuts``, on by default) make the step cheaper without changing a bit of it. If the
gates of layers ``0..p-1`` are exactly 1 in the hidden dtype, both passes hand the same state to layer ``p``
(``lerp(h, F, 1) == F``), so the teacher starts at layer ``p`` from the gated pass's state; for E3 ``p`` is the first
dropped layer, for CLP a few layers before the notch at T=1 and right at it when cold. A layer whose gate is exactly 0
(E3's k-hot forward) gets a detached input, so no graph and no backward run through it.

Validation evaluates the *hard* mask the gate would export now: ``val/kl`` against the dense model and ``val/ppl``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lit_prune.assets import canonical_model_id
from lit_prune.components.bypass import can_replay, fed, forwards_replaced, pass_through
from lit_prune.components.checks import check_choice
from lit_prune.components.gates import ConcaveGate, GumbelTopKGate, LayerGate, logits_from_importance
from lit_prune.components.gating import LayerGating, shared_prefix
from lit_prune.components.layers import decoder_layers
from lit_prune.components.losses import Direction, kl_loss, next_token_ce
from lit_prune.components.mask_io import MaskArtifact
from lit_prune.components.refine import (
    auto_swap_radius,
    best_of,
    greedy_importance,
    mask_kl_objective,
    shift_search,
    swap_search,
)
from lit_prune.components.scorers import _window_starts, candidate_layers
from lit_prune.data import CalibrationSampling
from lit_prune.hf import Dtype, meta_model
from lit_prune.metrics import TokenPerplexity
from lit_prune.stages.base import (
    PruneStage,
    calibration_batches,
    num_drop_from,
    save_gated_as_pruned,
    strip_frozen_model,
)
from lit_prune.stages.distributed import (
    average_across_ranks,
    broadcast_from_rank0_,
    checkpoints_activations,
    fsdp_strategy,
)

METHOD_NAMES = {ConcaveGate: "clp", GumbelTopKGate: "e3"}
Refine = Literal["none", "select", "polish"]


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
        importance_init: How the gate starts. ``kl`` initialises GumbelTopKGate logits from per-layer KL importance
            (skip one layer, measure the output KL) on ``importance_batches`` training batches; ``kl_greedy`` from a
            greedy removal with the same KL (each layer measured with the earlier picks already removed, as SLEB
            does), on the calibration batches (see ``calibration``); ``window_scan`` places ConcaveGate's single
            segment at the exact optimum of the window scan on those batches; ``none`` keeps the gate's own init.
        importance_batches: Calibration batches used by ``importance_init`` and ``refine``.
        calibration: Which training blocks form those batches, in dataset order (the same on every rank and
            resume). ``spread`` (default): evenly spaced over the whole training set, so a corpus of many files is
            represented by all of them; ``first``: the first blocks (the behaviour before 2026-12-02: with the plays,
            8k tokens of one play). See docs/mask_search.md.
        importance_scale: Scale of the standardized log-importance logits.
        refine: What happens to the learned mask when training ends, on the calibration batches, by the search's
            own KL. ``none``: keep the gate's hard mask. ``select``: the lowest-KL mask among the gate's hard mask,
            its initialisation and (E3) the last ``refine_samples`` distinct masks sampled at the full budget and the
            best contiguous window (a window scan of the same objective: L - n + 1 more mask evaluations).
            ``polish``: ``select``, then a
            local search from it (E3: swap a dropped and a kept layer at most ``refine_radius`` apart; CLP: move a
            segment by one layer) while the KL improves. The cost is reported in mask.json (``extra.refine``).
        refine_samples: How many of the last sampled full-budget masks ``refine`` considers (E3).
        refine_radius: Largest distance between the two layers of a swap in ``polish``; null: any pair; ``auto``
            (default): any pair while a round costs at most 256 mask evaluations (``n x (candidates - n)``; SmolLM2,
            Gemma 3, 8B models at a quarter of their layers), else 2. Any pair fitted the calibration domain's
            held-out text better at every budget measured; a radius of 2 keeps the refinement affordable on 64+
            layers (docs/mask_search.md).
        method: Name recorded in mask.json (default: ``clp`` for ConcaveGate, ``e3`` for GumbelTopKGate).
        kl_chunk_tokens: Compute the KL over this many tokens at a time, recomputed in backward: lowers peak memory
            at large batch x vocabulary (docs/scale.md); null computes it at once.
        compile_blocks: torch.compile each decoder layer's norm and MLP submodules (fuses their pointwise ops; the
            first steps pay the compile time). See docs/scale.md.
        exact_shortcuts: Skip work a training step provably does not need: the teacher pass starts from the gated
            pass's hidden state at the first layer whose gate is not exactly 1, and layers whose gate is exactly 0
            build no autograd graph. Teacher logits, loss and gate gradient stay bit for bit the same. Off for sharded
            (FSDP) models and with ``compile_blocks`` (compiled kernels may differ between grad and no-grad passes);
            false runs both full passes (for comparison).
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
        importance_init: Literal["none", "kl", "kl_greedy", "window_scan"] = "none",
        importance_batches: int = 2,
        calibration: CalibrationSampling = "spread",
        importance_scale: float = 1.0,
        refine: Refine = "none",
        refine_samples: int = 16,
        refine_radius: int | Literal["auto"] | None = "auto",
        method: str | None = None,
        kl_chunk_tokens: int | None = None,
        compile_blocks: bool = False,
        exact_shortcuts: bool = True,
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
        self.exact_shortcuts = exact_shortcuts
        self._shortcuts: bool | None = None  # decided at the first step, once any sharding is in place
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
        if importance_init in ("kl", "kl_greedy") and not hasattr(self.gate, "logits"):
            raise ValueError(
                f"`model.init_args.importance_init`={importance_init!r} sets per-layer logits, which "
                f"{type(self.gate).__name__} does not have. Use GumbelTopKGate, or importance_init: none "
                "(window_scan for ConcaveGate)."
            )
        if importance_init == "window_scan" and getattr(self.gate, "num_segments", None) != 1:
            raise ValueError(
                f"`model.init_args.importance_init`='window_scan' places one contiguous segment; "
                f"{type(self.gate).__name__} has num_segments={getattr(self.gate, 'num_segments', None)}. Use "
                "ConcaveGate with num_segments: 1, or importance_init: none."
            )
        check_choice(refine, Refine, "model.init_args.refine")
        check_choice(calibration, CalibrationSampling, "model.init_args.calibration")
        check_choice(kl_direction, Direction, "model.init_args.kl_direction")
        if isinstance(refine_samples, bool) or not isinstance(refine_samples, int) or refine_samples < 0:
            raise ValueError(f"`model.init_args.refine_samples` must be an integer >= 0, got {refine_samples!r}.")
        if refine_radius not in (None, "auto") and (
            isinstance(refine_radius, bool) or not isinstance(refine_radius, int) or refine_radius < 1
        ):
            raise ValueError(
                "`model.init_args.refine_radius` must be an integer >= 1, null (any pair) or auto, got "
                f"{refine_radius!r}."
            )
        self.refine = refine
        self.refine_samples = refine_samples
        self.refine_radius = refine_radius
        if refine != "none":
            # Resumable state of the refinement: the initial mask and the last sampled full-budget masks (a ring).
            self.register_buffer("init_keep", torch.ones(self.num_layers, dtype=torch.bool))
            self.register_buffer("sampled_keep", torch.ones(max(refine_samples, 1), self.num_layers, dtype=torch.bool))
            self.register_buffer("sampled_valid", torch.zeros(max(refine_samples, 1), dtype=torch.bool))
        self.refine_report: dict[str, Any] | None = None
        if isinstance(self.gate, GumbelTopKGate):
            # The sampling noise of step t comes from (noise_seed, t), not the global RNG: a resumed run draws the same
            # masks as the uninterrupted one (Lightning does not restore RNG states).
            self.register_buffer("noise_seed", torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
        self._noise_seed: int | None = None
        self.kl_direction = kl_direction
        self.ce_weight = ce_weight
        self.importance_init = importance_init
        self.importance_batches = importance_batches
        self.calibration = calibration
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
        if self.refine_report is not None:
            extra["refine"] = self.refine_report
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
        self._importance_pending = self.importance_init != "none" and not bool(self.importance_done)
        self._noise_seed = int(self.noise_seed) if hasattr(self, "noise_seed") else None

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
        self._remember_init()
        self.importance_done.fill_(True)
        self.print(f"KL importance per layer: {[round(v, 4) for v in importance]}")

    def _calibration_batches(self) -> list[Tensor]:
        """``importance_batches`` batches of training blocks chosen by ``calibration``."""
        return calibration_batches(self.trainer, self.importance_batches, self.calibration, self.device)

    def _candidates(self) -> list[int]:
        return candidate_layers(self.num_layers, self.num_drop, self.gate.protect_first, self.gate.protect_last)

    def _best_window(self, objective) -> tuple[tuple[int, ...], float]:
        """The window of ``num_drop`` contiguous layers with the lowest objective (an exact scan), and its value."""
        starts = _window_starts(self.num_layers, self.num_drop, self.gate.protect_first, self.gate.protect_last)
        return best_of(objective, [tuple(range(s, s + self.num_drop)) for s in starts])

    def _init_from_calibration(self) -> None:
        """``kl_greedy`` (E3 logits) or ``window_scan`` (CLP segment start) on the calibration batches."""
        objective = mask_kl_objective(self.model, self.gating, self._calibration_batches(), self.kl_direction)
        if self.importance_init == "kl_greedy":
            importance = greedy_importance(objective, self._candidates(), self.num_drop, self.num_layers)
            with torch.no_grad():
                logits = logits_from_importance(importance, self.importance_scale)
                self.gate.logits.copy_(logits.to(self.gate.logits))
            self.print(f"Greedy KL importance per layer: {[round(v, 4) for v in importance]}")
        else:
            drop, kl = self._best_window(objective)
            self.gate.set_starts_([drop[0]])
            self.print(f"Window scan start: layers [{drop[0]}, {drop[-1] + 1}) with calibration KL {kl:.4f}")
        self._remember_init()
        self.importance_done.fill_(True)

    def _remember_init(self) -> None:
        if self.refine != "none":
            self.init_keep.copy_(self.gate.hard_mask().to(self.init_keep.device))

    def on_train_end(self) -> None:
        if self.refine != "none" and self.refine_report is None:
            self._refine_mask()

    def _refine_mask(self) -> None:
        """Replace the gate's hard mask by the best candidate (and its local optimum) on the calibration batches."""
        start = time.perf_counter()
        objective = mask_kl_objective(self.model, self.gating, self._calibration_batches(), self.kl_direction)
        learned = tuple(self.gate.drop_indices())
        candidates = {"learned": learned}
        if self.importance_init != "none" and bool(self.importance_done):
            candidates["init"] = tuple(int(i) for i in torch.nonzero(~self.init_keep.cpu()).flatten())
        for keep in self.sampled_keep[self.sampled_valid].cpu():
            candidates.setdefault(f"sampled_{len(candidates)}", tuple(int(i) for i in torch.nonzero(~keep).flatten()))
        if not isinstance(self.gate, ConcaveGate):
            # A scan-seeded start: the best contiguous window of the same objective (L - n + 1 mask evaluations). The
            # Gumbel search can end far from it (Gemma 3 270M, 4 of 18: calibration KL 1.25 vs the window's 0.98).
            candidates["window"] = self._best_window(objective)[0]
        drop, kl = best_of(objective, candidates.values())
        chosen = next(name for name, value in candidates.items() if value == drop)
        rounds, radius = 0, None
        if isinstance(self.gate, ConcaveGate):
            widths = self.gate.widths
            starts = _segment_starts(drop, widths)
            if self.refine == "polish":
                high = self.num_layers - self.gate.protect_last
                starts, kl, rounds = shift_search(objective, starts, widths, self.gate.protect_first, high)
                drop = tuple(i for s, w in zip(starts, widths) for i in range(s, s + w))
            self.gate.set_starts_(starts)
        else:
            if self.refine == "polish":
                swappable = self._candidates()
                radius = self.refine_radius
                if radius == "auto":
                    radius = auto_swap_radius(len(drop), len(swappable))
                drop, kl, rounds = swap_search(objective, drop, swappable, radius=radius)
            self.gate.set_drop_(drop)
        self.refine_report = {
            "mode": self.refine, "chosen": chosen, "learned_drop": list(learned), "drop": list(drop),
            "calibration_kl": kl, "candidates": len(set(candidates.values())), "local_moves": rounds,
            "masks_evaluated": objective.evaluations, "seconds": round(time.perf_counter() - start, 3),
            "calibration": self.calibration,
        }
        if self.refine == "polish" and not isinstance(self.gate, ConcaveGate):
            self.refine_report["radius"] = radius  # the swap radius used (None: any pair)
        self.print(
            f"Refined mask ({self.refine}): drop {list(drop)} (from {chosen}; learned {list(learned)}), calibration KL "
            f"{kl:.4f}, {objective.evaluations} masks evaluated in {self.refine_report['seconds']:.1f} s"
        )

    # ------------------------------------------------------------ steps
    def _teacher_logits(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad(), self.gating.opened():
            return self.model(input_ids=input_ids, use_cache=False).logits

    def _gated_logits(self, input_ids: Tensor, gates: Tensor) -> Tensor:
        # The gates stay set after the forward: activation checkpointing re-runs the layers (and their gate hooks)
        # during backward, and must see the same values. The teacher pass opens them only inside its own block.
        self.gating.set(gates)
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _step_logits(self, input_ids: Tensor, gates: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher (no grad, gates open) and gated logits of one training step, with the exact shortcuts."""
        if self._shortcuts is None:
            self._shortcuts = self.exact_shortcuts and not self.compile_blocks and can_replay(self.model)
        if not self._shortcuts:
            return self._teacher_logits(input_ids), self._gated_logits(input_ids, gates)
        # Read before any forward is queued (the gate was computed first), so the sync does not idle the GPU.
        host = gates.detach().cpu()
        self.gating.set(gates, host)
        layers = decoder_layers(self.model)
        guess = self.model.get_input_embeddings().weight.dtype  # the residual stream's dtype, checked below
        start = min(shared_prefix(host, guess), len(layers) - 1)
        if start == 0:
            return self._teacher_logits(input_ids), self.model(input_ids=input_ids, use_cache=False).logits
        entering: list[Tensor] = []

        def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            entering.append(args[0] if args else kwargs["hidden_states"])

        # Removed right after the gated pass: a recomputation in backward must not capture again.
        handle = layers[start].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            student = self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()
        hidden = entering.pop().detach()
        if shared_prefix(host, hidden.dtype) < start:  # finer hidden dtype than guessed: no shared prefix
            return self._teacher_logits(input_ids), student
        forwards = dict.fromkeys(range(start), pass_through)
        forwards[start] = fed(layers[start].forward, hidden)
        with forwards_replaced(layers, forwards):
            return self._teacher_logits(input_ids), student

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._importance_pending:
            # Here, not in on_train_start: under FSDP the weights are gathered only inside the wrapped forward.
            if self.importance_init == "kl":
                self._init_from_kl_importance()
            else:
                self._init_from_calibration()
            self._importance_pending = False
        input_ids, labels = batch["input_ids"], batch["labels"]
        # Gate first: ConcaveGate's projection reads its few values on the host, and a sync here, before any
        # forward is queued, costs nothing, while one between the two forwards would idle the GPU.
        if self._noise_seed is not None:
            generator = torch.Generator(device=self.gate.logits.device)
            generator.manual_seed(self._noise_seed + 1_000_003 * self.trainer.global_step)
            gates = self.gate(generator=generator)
        else:
            gates = self.gate()
        if self.refine != "none" and self.refine_samples and getattr(self.gate, "k", None) == self.num_drop:
            # Remember the sampled full-budget masks (indexed by step, so a resumed run keeps the same ring).
            slot = self.trainer.global_step % self.refine_samples
            self.sampled_keep[slot] = gates.detach() > 0.5
            self.sampled_valid[slot] = True
        teacher, student = self._step_logits(input_ids, gates)
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


def _segment_starts(drop: tuple[int, ...], widths: list[int]) -> list[int]:
    """Starts of the consecutive runs of the given widths that make up a sorted drop list (ConcaveGate's order)."""
    return [drop[sum(widths[:k])] for k in range(len(widths))]
