"""RecoveryStage: what the recovery stages (EndpointLoRA, Distill) share.

The student is the hard-pruned model (dense ``pretrained`` + ``mask``, or an already pruned folder); an optional
frozen dense teacher; LoRA placement on post-surgery layer indices; the merged vanilla export; checkpoints that hold
only what trains::

    dense (30 layers) --drop_layers(mask.drop)--> student (24 layers, re-indexed)
                                                   layers ... 11 | 12 ... 23        mask drops [12, 18)
                                                             ^^   ^^                endpoints (width=1), post-surgery
    fit end: merge_and_unload() -> save_pretrained (vanilla HF) + tokenizer + mask.json [+ adapter/]

The recovery objective mixes the two terms with one share: ``(1 - kd_share) * CE + kd_share * KD``
(:func:`~lit_prune.components.losses.kd_ce_mix`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lit_prune import hf
from lit_prune.assets import canonical_model_id, resolve_pretrained
from lit_prune.components import compensate as compensation
from lit_prune.components.lora import (
    LLAMA_PROJECTIONS,
    add_lora,
    check_lora_hparams,
    check_lora_options,
    check_target_modules,
    fused_parameter_targets,
    is_peft,
)
from lit_prune.components.mask_io import MaskArtifact, MaskError, load_mask
from lit_prune.components.surgery import drop_layers, endpoint_layers
from lit_prune.hf import Dtype
from lit_prune.io import prepare_output_dir, save_checkpoint_folder
from lit_prune.stages.base import PruneStage


def check_share(value: float, key: str) -> float:
    """A mixing share must be a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{key}` must be in [0, 1], got {value!r}.")
    return float(value)


class RecoveryStage(PruneStage):
    """Shared base of the recovery stages: a hard-pruned student, an optional frozen teacher, LoRA, a merged export.

    The settings both recovery stages have (student source, teacher, KD temperature, endpoints, LoRA) are declared,
    documented and checked here once; :class:`~lit_prune.stages.endpoint_lora.EndpointLoRA` and
    :class:`~lit_prune.stages.distill.Distill` add their own and pass the rest through. Subclasses call
    :meth:`prepare_student` (cut + freeze) when the weights are loaded and :meth:`check_lora` / :meth:`wrap_lora` when
    they train LoRA adapters.

    Args:
        pretrained: Dense model (with ``mask``) or an already pruned folder (``mask`` null); also feeds
            ``data.tokenizer``.
        mask: ``mask.json`` of the layers to drop from ``pretrained``; null when ``pretrained`` is already pruned
            (its mask.json, or ``endpoint_layers_override``, then says where the cuts are).
        teacher: Dense teacher id or folder, run online and frozen, for the KD term (EndpointLoRA: ``loss: kd|mix``,
            default ``pretrained`` when a mask is given; Distill: set this or ``teacher_cache``).
        kd_temperature: KD softmax temperature (``temperature`` for TemperatureSchedule).
        width: Kept layers on each side of every cut that count as endpoints.
        endpoint_layers_override: Post-surgery indices of the endpoint layers, replacing those derived from the mask
            (needed when ``pretrained`` is pruned and has no mask.json).
        target_modules: Module names (suffixes) inside the chosen layers that get LoRA; default: the attention and MLP
            projections of Llama-like models.
        r: LoRA rank.
        alpha: LoRA scaling numerator (``lora_alpha``; the update is scaled by alpha / r).
        dropout: Dropout on the LoRA input.
        lora_options: Extra ``peft.LoraConfig`` fields (e.g. ``use_rslora: true``); ``layers_to_transform`` and
            ``layers_pattern`` are derived from the mask and may not be set.
        allow_model_mismatch: Accept a mask (or cache) whose model id differs from ``pretrained``.
        save_adapter: Also write the LoRA adapter (peft format, for the pruned model) to ``<export>/adapter``.
        dtype: Dtype the weights (student and teacher) are loaded in.
        optimizer: Optimizer factory applied to the trainable parameters.
        gradient_checkpointing: Recompute layer activations in the backward pass to save memory.
        compensate: ``linear``: before the cut, fold a least-squares map into the layer before each cut segment
            (training-free, ``components/compensate.py``), then heal; null: plain cut. Needs ``mask``.
        compensate_tokens: Calibration tokens for ``compensate``: the first training blocks, unshuffled.
        compensate_ridge: Relative ridge of the least squares (0 = none).
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        teacher: str | None = None,
        kd_temperature: float = 1.0,
        width: int = 1,
        endpoint_layers_override: list[int] | None = None,
        target_modules: list[str] | None = None,
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        lora_options: dict[str, Any] | None = None,
        allow_model_mismatch: bool = False,
        save_adapter: bool = False,
        dtype: Dtype = "auto",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        gradient_checkpointing: bool = False,
        compensate: str | None = None,
        compensate_tokens: int = 16384,
        compensate_ridge: float = 0.0,
    ) -> None:
        super().__init__(pretrained, dtype=dtype, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(
                f"`model.init_args.width` must be an integer >= 1 (kept layers on each side of a cut), got {width!r}."
            )
        if not kd_temperature > 0:
            raise ValueError(f"`model.init_args.kd_temperature` must be > 0, got {kd_temperature}.")
        self.width = width
        self.allow_model_mismatch = allow_model_mismatch
        self.save_adapter = save_adapter
        self.mask, self.drop_now = self._resolve_mask(mask)
        self.compensate, self.compensate_tokens, self.compensate_ridge = compensate, compensate_tokens, compensate_ridge
        self.compensation: dict | None = None  # what compensate_cut fitted, recorded in mask.json
        if compensate is not None:  # training-free map before the cut (components/compensate.py), checked here
            if not self.drop_now:
                raise ValueError(
                    "`model.init_args.compensate` fits its map on the dense model before the cut: pass the dense "
                    "`pretrained` with `mask` (or export with `python -m lit_prune export --compensate linear`)."
                )
            compensation.check_options(self.config, self.drop_now, compensate, None, compensate_tokens,
                                       compensate_ridge, keys=tuple(f"model.init_args.{k}" for k in (
                                           "compensate", "compensate_tokens", "compensate_ridge")))
        self.num_kept = self.num_layers - len(self.drop_now)
        self.endpoints = self._resolve_endpoints(endpoint_layers_override)
        self.teacher = teacher  # subclasses resolve it (default, or refused) for their loss
        self.kd_temperature = float(kd_temperature)
        self.target_modules = list(target_modules) if target_modules is not None else list(LLAMA_PROJECTIONS)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.lora_options_given = lora_options
        self.lora_options: dict[str, Any] = {}  # set by check_lora
        self.teacher_model: nn.Module | None = None
        # Frozen weights are reloaded from `pretrained` (and the teacher's id); checkpoints keep what trains.
        self.strict_loading = False

    def check_lora(self, layers: list[int] | None) -> None:
        """Check the LoRA settings before any weight loads: ranges, extra LoraConfig fields, targets in ``layers``."""
        check_lora_hparams(self.r, self.alpha, self.dropout)
        self.lora_options = check_lora_options(self.lora_options_given)
        self.check_targets_early(layers, self.target_modules)

    def wrap_lora(self, layers: list[int] | None) -> None:
        """Wrap the student with LoRA on ``target_modules`` of ``layers`` (post-surgery; None = every layer)."""
        self.model = add_lora(self.model, layers, self.target_modules, self.r, self.alpha, self.dropout,
                              self.lora_options)

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
        fused = fused_parameter_targets(skeleton, layers, target_modules)
        if fused and self.dropout:
            shown = ", ".join(fused[:3]) + (", ..." if len(fused) > 3 else "")
            raise ValueError(
                f"`model.init_args.dropout`={self.dropout} with `target_modules` {target_modules}: on this mixture-of-"
                f"experts model they also name fused expert weights ({shown}), "
                "which peft adapts without LoRA dropout. Set `dropout: 0`, or target only attention projections "
                "(e.g. [q_proj, k_proj, v_proj, o_proj])."
            )

    # ------------------------------------------------------------ model
    def build_student(self) -> None:
        """Turn the freshly loaded ``self.model`` into the student: cut, freeze, mark or wrap what trains."""
        raise NotImplementedError

    def prepare_student(self) -> None:
        """Hard-prune the freshly loaded ``pretrained`` (when a mask is given) and freeze it."""
        if self.drop_now:
            if self.compensate is not None:
                self.compensate_cut()
            drop_layers(self.model, self.drop_now)
        self.freeze_model()

    def compensate_cut(self) -> None:
        """Fold the least-squares map into the layer before each cut, calibrated on the first training blocks."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None or len(train_set) == 0 or self.weights_on_meta:
            raise ValueError(
                "`model.init_args.compensate` calibrates on the DataModule's training blocks with the full weights "
                "loaded (not FSDP's meta loading): run it with a PruneDataModule, or export with `python -m "
                "lit_prune export --compensate linear` and heal that folder."
            )
        seq = len(train_set[0]["input_ids"])
        count = min(len(train_set), -(-self.compensate_tokens // seq))  # unshuffled: a resumed run refits the same map
        blocks = torch.stack([torch.as_tensor(train_set[i]["input_ids"]) for i in range(count)])
        fits = compensation.compensate_linear(self.model, self.drop_now, blocks.split(4), self.compensate_ridge)
        self.compensation = compensation.fits_report(
            fits, calib="first training blocks", calib_tokens=int(blocks.numel()), ridge=self.compensate_ridge
        )
        self.print(compensation.describe_fits(fits))

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
        if self.compensation is not None:
            recovery["compensation"] = self.compensation
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
