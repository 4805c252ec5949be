"""EndpointLoRA: CLP's cutoff endpoint tuning, with peft LoRA on the kept layers next to each cut.

Also home of :class:`RecoveryStage`, what every recovery stage (EndpointLoRA, Distill) shares: the student is the
hard-pruned model (dense ``pretrained`` + ``mask``, or an already pruned folder), an optional frozen dense teacher,
LoRA placement, the merged vanilla export and checkpoints that hold only what trains::

    dense (30 layers) --drop_layers(mask.drop)--> student (24 layers, re-indexed)
                                                   layers ... 11 | 12 ... 23        mask drops [12, 18)
                                                             ^^   ^^                endpoints (width=1), post-surgery
                                                  LoRA on q,k,v,o,gate,up,down of layers [11, 12] only
    fit end: merge_and_unload() -> save_pretrained (vanilla HF) + tokenizer + mask.json [+ adapter/]

Memory: ``loss: kd`` / ``mix`` load a second, frozen copy of the dense model as the teacher (dense weights + the
student's pruned copy, e.g. about 1.8x the dense model in the same dtype); ``loss: ce`` loads only the student.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_prune import hf
from lit_prune.assets import canonical_model_id, resolve_pretrained
from lit_prune.components.checks import check_choice
from lit_prune.components.layers import LAYER_PATHS, decoder_layers, unwrap
from lit_prune.components.losses import kl_loss, next_token_ce
from lit_prune.components.mask_io import MaskArtifact, MaskError, load_mask
from lit_prune.components.surgery import drop_layers, endpoint_layers
from lit_prune.hf import Dtype
from lit_prune.io import prepare_output_dir, save_checkpoint_folder
from lit_prune.stages.base import PruneStage

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoraConfig fields the stage sets itself; `lora_options` may not repeat them.
DERIVED_LORA_KEYS = ("layers_to_transform", "layers_pattern")
OWN_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type")
RecoveryLoss = Literal["ce", "kd", "mix"]
BaseQuantization = Literal["none", "nf4"]


def linear_module_names(layers: list[nn.Module]) -> list[str]:
    """Relative names (``self_attn.q_proj``) of the Linear-like leaves LoRA can wrap, over the given layers."""
    names: set[str] = set()
    for layer in layers:
        for name, module in layer.named_modules():
            if name and (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                names.add(name)
    return sorted(names)


def check_target_modules(
    model: nn.Module, layers: list[int] | None, target_modules: list[str], key: str = "model.init_args.target_modules"
) -> None:
    """Raise if an entry of ``target_modules`` matches no Linear module of ``layers`` (peft's suffix rule)."""
    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else layers
    names = linear_module_names([stack[i] for i in chosen])
    unmatched = [t for t in target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        where = "any decoder layer" if layers is None else f"decoder layers {chosen} (post-surgery indices)"
        raise ValueError(
            f"`{key}` entries {unmatched} match no module in {where}. Modules there: {names}. Use names from that "
            "list (the last part is enough, e.g. q_proj)."
        )


def check_lora_options(options: dict[str, Any] | None, key: str = "model.init_args.lora_options") -> dict[str, Any]:
    """Validate extra ``peft.LoraConfig`` kwargs against the dataclass, refusing derived and duplicate keys."""
    from peft import LoraConfig

    options = dict(options or {})
    derived = [k for k in options if k in DERIVED_LORA_KEYS]
    if derived:
        raise ValueError(
            f"`{key}` sets {derived}, which the stage derives from the mask (post-surgery endpoint indices). Remove "
            "them; choose layers with `width` or `endpoint_layers_override` instead."
        )
    own = [k for k in options if k in OWN_LORA_KEYS]
    if own:
        raise ValueError(
            f"`{key}` sets {own}, which have their own arguments (r, alpha, dropout, target_modules). Use those."
        )
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"`{key}` has unknown peft.LoraConfig fields {unknown}. Allowed: {sorted(fields)}.")
    return options


def add_lora(
    model: nn.Module,
    layers: list[int] | None,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Wrap ``model`` with peft LoRA on ``target_modules`` of ``layers`` (None = every decoder layer).

    ``layers`` are positions in the current (post-surgery) layer list, passed as ``layers_to_transform`` together
    with the architecture's layer-list name as ``layers_pattern``.
    """
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, layers, target_modules)
    base = unwrap(model)
    pattern = LAYER_PATHS[base.config.model_type].rsplit(".", 1)[-1]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM",
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern=pattern if layers is not None else None, **(options or {}),
    )
    return get_peft_model(model, config)


def is_peft(model: nn.Module | None) -> bool:
    return model is not None and callable(getattr(model, "merge_and_unload", None))


class RecoveryStage(PruneStage):
    """Shared base of the recovery stages: a hard-pruned student, an optional frozen teacher, a merged export.

    Subclasses call :meth:`prepare_student` in ``on_model_loaded`` and set ``kd_temperature``.

    Args:
        pretrained: Dense model (with ``mask``) or an already pruned folder (``mask`` null); also feeds
            ``data.tokenizer``.
        mask: ``mask.json`` of the layers to drop from ``pretrained``; null when ``pretrained`` is already pruned.
        width: Kept layers on each side of every cut that count as endpoints.
        endpoint_layers_override: Post-surgery indices of the endpoint layers, replacing those derived from the mask
            (needed when ``pretrained`` is pruned and has no mask.json).
        allow_model_mismatch: Accept a mask (or cache) whose model id differs from ``pretrained``.
        save_adapter: Also write the LoRA adapter (peft format, for the pruned model) to ``<export>/adapter``.
        dtype: Dtype the weights (student and teacher) are loaded in.
        optimizer: Optimizer factory applied to the trainable parameters.
        gradient_checkpointing: Recompute layer activations in the backward pass to save memory.
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        width: int = 1,
        endpoint_layers_override: list[int] | None = None,
        allow_model_mismatch: bool = False,
        save_adapter: bool = False,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(pretrained, dtype=dtype, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(
                f"`model.init_args.width` must be an integer >= 1 (kept layers on each side of a cut), got {width!r}."
            )
        self.width = width
        self.allow_model_mismatch = allow_model_mismatch
        self.save_adapter = save_adapter
        self.mask, self.drop_now = self._resolve_mask(mask)
        self.num_kept = self.num_layers - len(self.drop_now)
        self.endpoints = self._resolve_endpoints(endpoint_layers_override)
        self.teacher_model: nn.Module | None = None
        self.kd_temperature = 1.0
        # Frozen weights are reloaded from `pretrained` (and the teacher's id); checkpoints keep what trains.
        self.strict_loading = False

    # ------------------------------------------------------------ validation before any weight loads
    def _resolve_mask(self, mask: str | None) -> tuple[MaskArtifact | None, list[int]]:
        """(the mask of the student's pruning, the layers still to drop from ``pretrained``)."""
        folder_mask = Path(resolve_pretrained(self.pretrained)) / "mask.json"
        if mask is None:
            if not folder_mask.is_file():
                return None, []
            try:
                artifact = load_mask(folder_mask)
            except MaskError as err:
                raise ValueError(
                    f"`model.init_args.pretrained`={self.pretrained!r} has a bad mask.json: {err}"
                ) from None
            kept = artifact.num_layers - len(artifact.drop)
            if kept != self.num_layers:
                raise ValueError(
                    f"`model.init_args.pretrained`={self.pretrained!r} has {self.num_layers} decoder layers, but its "
                    f"mask.json keeps {kept} of {artifact.num_layers}. The folder's mask.json is not the one it was "
                    "pruned with: replace it, or delete it and set `model.init_args.endpoint_layers_override`."
                )
            return artifact, []
        try:
            artifact = load_mask(mask)
            artifact.check_fits(self.num_layers, self.pretrained, self.allow_model_mismatch)
        except MaskError as err:
            hint = ""
            if folder_mask.is_file():
                hint = (
                    f" `model.init_args.pretrained` is already pruned (it has {folder_mask}): set "
                    "`model.init_args.mask: null`."
                )
            raise ValueError(f"`model.init_args.mask`={mask!r}: {err}{hint}") from None
        if not artifact.drop:
            raise ValueError(
                f"`model.init_args.mask`={mask!r} drops no layers: there is no cut to heal. Use the mask.json of a "
                "search run."
            )
        return artifact, list(artifact.drop)

    def _resolve_endpoints(self, override: list[int] | None) -> list[int] | None:
        if override is not None:
            bad = [i for i in override if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_kept]
            if bad or not override or len(set(override)) != len(override):
                raise ValueError(
                    f"`model.init_args.endpoint_layers_override`={override!r} must list distinct post-surgery layer "
                    f"indices in [0, {self.num_kept - 1}] (the pruned model has {self.num_kept} layers)."
                )
            return sorted(override)
        if self.mask is not None and self.mask.drop:
            return endpoint_layers(self.mask.num_layers, self.mask.drop, self.width)
        return None

    def require_endpoints(self, why: str) -> list[int]:
        if self.endpoints is None:
            raise ValueError(
                f"{why} needs the endpoint layers, but `model.init_args.pretrained`={self.pretrained!r} has no "
                "mask.json and `model.init_args.mask` is null. Pass the dense model with `mask`, or list the "
                "post-surgery endpoints in `model.init_args.endpoint_layers_override`."
            )
        return self.endpoints

    def check_teacher(self, teacher: str, key: str = "model.init_args.teacher"):
        """Config-level teacher check: loadable and the same vocabulary as the student."""
        config = hf.load_config(teacher, key=key)
        if int(config.vocab_size) != int(self.config.vocab_size):
            raise ValueError(
                f"`{key}`={teacher!r} has vocab_size {config.vocab_size}, but the student "
                f"`model.init_args.pretrained`={self.pretrained!r} has {self.config.vocab_size}. KD compares "
                "next-token distributions id by id: use a teacher with the student's tokenizer."
            )
        return config

    def check_targets_early(self, layers: list[int] | None, target_modules: list[str]) -> None:
        """Check ``target_modules`` on a weightless copy of the pruned structure (skipped if it cannot be built)."""
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(
                f"`model.init_args.target_modules` must be a non-empty list of module names, got {target_modules!r}."
            )
        try:
            skeleton = hf.meta_model(self.config)
            drop_layers(skeleton, self.drop_now)
        except Exception:  # an exotic config; the same check runs again once the weights are loaded
            return
        check_target_modules(skeleton, layers, target_modules)

    # ------------------------------------------------------------ model
    def build_student(self) -> None:
        """Turn the freshly loaded ``self.model`` into the student: cut, freeze, mark or wrap what trains."""
        raise NotImplementedError

    def prepare_student(self) -> None:
        """Hard-prune the freshly loaded ``pretrained`` (when a mask is given) and freeze it."""
        if self.drop_now:
            drop_layers(self.model, self.drop_now)
        self.freeze_model()

    def load_teacher(self, teacher: str) -> None:
        """Load a frozen dense teacher in the student's dtype (a registered submodule, stripped from checkpoints)."""
        model = self.load_weights(teacher)
        for param in model.parameters():
            param.requires_grad_(False)
        self.teacher_model = model.eval()

    def teacher_logits(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher_model(input_ids=input_ids, use_cache=False).logits

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()  # the teacher never uses dropout
        return self

    @property
    def temperature(self) -> float:
        """KD softmax temperature (a TemperatureSchedule may drive it)."""
        return self.kd_temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.kd_temperature = float(value)

    # ------------------------------------------------------------ capabilities for ModelExport
    def mask_artifact(self) -> MaskArtifact:
        """The mask the student was pruned with (plus the recovery settings under ``extra``)."""
        recovery: dict[str, Any] = {"stage": type(self).__name__, "endpoints": self.endpoints}
        if self._trainer is not None:
            recovery["global_step"] = int(self.trainer.global_step)
        if self.mask is None:
            # Already pruned, origin unknown: nothing more is dropped here.
            return MaskArtifact(
                model=canonical_model_id(self.pretrained), num_layers=self.num_layers, drop=[], method="unknown",
                extra={"recovery": recovery, "note": "pretrained was already pruned; its original mask is unknown"},
            )
        return dataclasses.replace(self.mask, extra={**self.mask.extra, "recovery": recovery})

    def save_pruned_model(self, out_dir: str, overwrite: bool = False) -> None:
        """Merge LoRA into the weights and save a vanilla HF checkpoint + tokenizer + mask.json, atomically.

        Call it on every rank; rank 0 writes. On one process the module holds the merged model afterwards (no peft
        wrapper; outputs unchanged). Under FSDP the full weights are gathered to rank 0's CPU and written from a
        CPU copy of the student; the sharded model stays as it is.
        """
        if self.is_sharded():
            self._save_gathered(out_dir, overwrite)
            return
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        self._save_in_memory(out_dir, overwrite)

    def _save_gathered(self, out_dir: str, overwrite: bool) -> None:
        from lit_prune.stages.distributed import full_state_dict_on_rank0

        state = full_state_dict_on_rank0(self.trainer)  # a collective: every rank takes part
        if state is None:
            return
        prefix = "model."
        sharded, self.model = self.model, hf.load_causal_lm(self.pretrained, self.dtype_name)
        try:
            self.build_student()
            self.model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            self._save_in_memory(out_dir, overwrite)
        finally:
            self.model = sharded

    def _save_in_memory(self, out_dir: str, overwrite: bool) -> None:
        prepare_output_dir(out_dir, overwrite)
        artifact = self.mask_artifact()

        def merged(folder: Path) -> nn.Module:
            if self.save_adapter and is_peft(self.model):
                self.model.save_pretrained(folder / "adapter")
            if is_peft(self.model):
                self.model = self.model.merge_and_unload()
            return self.model

        save_checkpoint_folder(out_dir, merged, hf.load_tokenizer(self.pretrained), artifact.to_json(), overwrite)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen student weights and the teacher are reloaded from their ids; keep only what trains.
        trainable = {name for name, param in self.named_parameters() if param.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class EndpointLoRA(RecoveryStage):
    """Heal a cut with LoRA on the kept layers next to it (CLP's cutoff endpoint tuning); everything else is frozen.

    Args:
        pretrained: Dense model (with ``mask``) or an already pruned folder (``mask`` null); also feeds
            ``data.tokenizer``.
        mask: ``mask.json`` of the layers to drop from ``pretrained``; null when ``pretrained`` is already pruned
            (its mask.json, or ``endpoint_layers_override``, then says where the cuts are).
        width: Kept layers on each side of every cut that get LoRA.
        endpoint_layers_override: Post-surgery indices of the layers to tune, replacing those derived from the mask.
        target_modules: Module names (suffixes) inside those layers that get LoRA; default: the attention and MLP
            projections of Llama-like models.
        r: LoRA rank.
        alpha: LoRA scaling numerator (``lora_alpha``; the update is scaled by alpha / r).
        dropout: Dropout on the LoRA input.
        lora_options: Extra ``peft.LoraConfig`` fields (e.g. ``use_rslora: true``); ``layers_to_transform`` and
            ``layers_pattern`` are derived from the mask and may not be set.
        train_norm: Also train the normalisation weights of the endpoint layers.
        train_lm_head: Also train the output head (tied to the input embedding in many small models).
        loss: ``ce`` next-token cross-entropy; ``kd`` KL to the dense teacher; ``mix`` both.
        kd_weight: Share of the KD term under ``mix``: ``(1 - kd_weight) * CE + kd_weight * KD``.
        kd_temperature: KD softmax temperature (``temperature`` for TemperatureSchedule).
        teacher: Dense teacher for ``kd``/``mix``; default ``pretrained`` (needed when ``pretrained`` is pruned).
        allow_model_mismatch: Accept a mask whose model id differs from ``pretrained`` (same layer count).
        save_adapter: Also write the LoRA adapter (peft format, for the pruned model) to ``<export>/adapter``.
        quantize_base: ``none``, or ``nf4`` for QLoRA: the frozen base is loaded in bitsandbytes 4-bit NF4 (CUDA
            only, ``lit_prune[quant-cuda]``) and prepared with ``peft.prepare_model_for_kbit_training``; LoRA stays
            in float32. The export always writes the adapter to ``<export>/adapter``, and as the model the NF4 base
            dequantized (the values the adapter was trained against) with the LoRA merged in.
        dtype: Dtype the weights are loaded in (LoRA weights follow it); with ``quantize_base: nf4``, the compute
            dtype of the 4-bit layers (float16 if asked for, otherwise bfloat16).
        optimizer: Optimizer factory for the LoRA (and optional norm/head) parameters.
        gradient_checkpointing: Recompute layer activations in the backward pass to save memory.
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        width: int = 1,
        endpoint_layers_override: list[int] | None = None,
        target_modules: list[str] | None = None,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        lora_options: dict[str, Any] | None = None,
        train_norm: bool = False,
        train_lm_head: bool = False,
        loss: RecoveryLoss = "ce",
        kd_weight: float = 0.5,
        kd_temperature: float = 1.0,
        teacher: str | None = None,
        allow_model_mismatch: bool = False,
        save_adapter: bool = False,
        quantize_base: BaseQuantization = "none",
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        gradient_checkpointing: bool = False,
    ) -> None:
        check_choice(quantize_base, BaseQuantization, "model.init_args.quantize_base")
        if quantize_base == "nf4":
            check_base_quantization()  # first: nothing is read or loaded on a machine that cannot run it
        super().__init__(
            pretrained, mask=mask, width=width, endpoint_layers_override=endpoint_layers_override,
            allow_model_mismatch=allow_model_mismatch, save_adapter=save_adapter, dtype=dtype, optimizer=optimizer,
            gradient_checkpointing=gradient_checkpointing,
        )
        check_choice(loss, RecoveryLoss, "model.init_args.loss")
        check_lora_hparams(r, alpha, dropout)
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"`model.init_args.kd_weight` must be in [0, 1], got {kd_weight}.")
        if not kd_temperature > 0:
            raise ValueError(f"`model.init_args.kd_temperature` must be > 0, got {kd_temperature}.")
        self.target_modules = list(target_modules) if target_modules is not None else list(LLAMA_PROJECTIONS)
        self.lora_options = check_lora_options(lora_options)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.train_norm, self.train_lm_head = train_norm, train_lm_head
        self.loss, self.kd_weight, self.kd_temperature = loss, kd_weight, float(kd_temperature)
        self.quantize_base = quantize_base
        self.require_endpoints("EndpointLoRA")
        self.check_targets_early(self.endpoints, self.target_modules)
        if loss == "ce":
            if teacher is not None:
                raise ValueError(
                    f"`model.init_args.teacher`={teacher!r} is only used by `loss: kd` or `loss: mix`; the loss is "
                    "'ce'. Remove the teacher or change the loss."
                )
            self.teacher = None
        else:
            self.teacher = teacher or (pretrained if self.drop_now else None)
            if self.teacher is None:
                raise ValueError(
                    f"`model.init_args.loss`={loss!r} needs the dense teacher, but `model.init_args.pretrained`="
                    f"{pretrained!r} is already pruned. Set `model.init_args.teacher` to the dense model."
                )
            self.check_teacher(self.teacher)

    def adds_lora(self) -> bool:
        return True

    def on_model_loaded(self) -> None:
        self.build_student()
        if self.teacher is not None:
            self.load_teacher(self.teacher)
        self.train(self.training)  # from_pretrained returns eval mode; LoRA dropout needs train mode (teacher: eval)

    def build_student(self) -> None:
        self.prepare_student()
        self.model = add_lora(
            self.model, self.endpoints, self.target_modules, self.r, self.alpha, self.dropout, self.lora_options
        )
        layers = decoder_layers(self.model)
        if self.train_norm:
            for index in self.endpoints:
                for module in layers[index].modules():
                    if "norm" in type(module).__name__.lower():
                        for param in module.parameters(recurse=False):
                            param.requires_grad_(True)
        if self.train_lm_head:
            unwrap(self.model).get_output_embeddings().weight.requires_grad_(True)

    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to the module) of every parameter the optimizer updates."""
        return [name for name, param in self.named_parameters() if param.requires_grad]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self(input_ids)
        ce = next_token_ce(logits, labels)
        logs = {"train/ce": ce}
        loss = ce
        if self.loss != "ce":
            kd = kl_loss(self.teacher_logits(input_ids), logits, labels, temperature=self.kd_temperature)
            logs["train/kd"] = kd
            loss = kd if self.loss == "kd" else (1.0 - self.kd_weight) * ce + self.kd_weight * kd
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        return loss

    # ------------------------------------------------------------ QLoRA (quantize_base: nf4)
    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the 4-bit layers' matmuls under ``quantize_base: nf4`` (bf16 unless float16 is asked for)."""
        return torch.float16 if self.dtype_name == "float16" else torch.bfloat16

    def configure_model(self) -> None:
        if self.quantize_base == "none" or self.model is not None:
            return super().configure_model()
        from peft import prepare_model_for_kbit_training

        from lit_prune.components.quantize import load_quantized

        if self.is_sharded():
            raise ValueError(
                "`model.init_args.quantize_base`='nf4' is not supported with a sharding `trainer.strategy` (FSDP): "
                "the 4-bit base would need its own flattening. Train on one GPU (`trainer.strategy: auto`) or set "
                "`model.init_args.quantize_base: none`."
            )
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cuda")
        check_base_quantization(device)
        # bitsandbytes places the 4-bit weights while loading, straight onto the training GPU.
        model = load_quantized(self.pretrained, "bnb-nf4", device=str(device), dtype=self.compute_dtype)
        self.model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        self.on_model_loaded()

    def save_pruned_model(self, out_dir: str, overwrite: bool = False) -> None:
        """As :meth:`RecoveryStage.save_pruned_model`; under ``quantize_base: nf4`` it writes the adapter and the
        dequantized base with the LoRA merged in (merging into NF4 would round most of the update away)."""
        if self.quantize_base == "none" or not is_peft(self.model):
            return super().save_pruned_model(out_dir, overwrite)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        from lit_prune.components.quantize import merge_lora_dequantized

        prepare_output_dir(out_dir, overwrite)
        artifact = self.mask_artifact()
        tokenizer = hf.load_tokenizer(self.pretrained)
        # Lightning's teardown moves the module to the CPU before on_fit_end; bitsandbytes dequantizes on CUDA.
        self.model.to(torch.device("cuda", torch.cuda.current_device()))

        def merged(folder: Path) -> nn.Module:
            self.model.save_pretrained(folder / "adapter")
            self.model = merge_lora_dequantized(self.model, self.compute_dtype)
            return self.model

        save_checkpoint_folder(out_dir, merged, tokenizer, artifact.to_json(), overwrite)
        return None


def check_base_quantization(device: torch.device | str | None = None) -> None:
    """``quantize_base: nf4`` needs CUDA (the training device) and bitsandbytes; say which option to use otherwise."""
    from lit_prune.components.quantize import QuantizationError, check_method

    try:
        if device is not None and torch.device(device).type != "cuda":
            raise QuantizationError(f"the trainer's device is {str(device)!r}")
        check_method("bnb-nf4", "cuda", key="model.init_args.quantize_base")
    except QuantizationError as err:
        raise ValueError(
            f"`model.init_args.quantize_base`='nf4' loads the base in bitsandbytes 4-bit, which trains on a CUDA GPU "
            f"only ({err}). Allowed: none, nf4. Fix: on CPU set `model.init_args.quantize_base: none`; for nf4 run "
            "with `trainer.accelerator: gpu` on a CUDA machine and `pip install 'lit_prune[quant-cuda]'`."
        ) from None


def check_lora_hparams(r: int, alpha: float, dropout: float) -> None:
    """Range checks of the LoRA rank, alpha and dropout, in config keys."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`model.init_args.r` (LoRA rank) must be an integer >= 1, got {r!r}.")
    if not alpha > 0:
        raise ValueError(f"`model.init_args.alpha` (LoRA alpha) must be > 0, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`model.init_args.dropout` (LoRA dropout) must be in [0, 1), got {dropout}.")
