"""EndpointLoRA: CLP's cutoff endpoint tuning, with peft LoRA on the kept layers next to each cut.

::

    dense (30 layers) --drop_layers(mask.drop)--> student (24 layers, re-indexed)
                                                   layers ... 11 | 12 ... 23        mask drops [12, 18)
                                                             ^^   ^^                endpoints (width=1), post-surgery
                                                  LoRA on q,k,v,o,gate,up,down of layers [11, 12] only
    fit end: merge_and_unload() -> save_pretrained (vanilla HF) + tokenizer + mask.json [+ adapter/]

What it shares with Distill (student, teacher, endpoints, LoRA settings, export) is :class:`RecoveryStage`; the
``quantize_base: nf4`` (QLoRA) path is in :mod:`lit_prune.stages.qlora`.

Memory: ``loss: kd`` / ``mix`` load a second, frozen copy of the dense model as the teacher (dense weights + the
student's pruned copy, e.g. about 1.8x the dense model in the same dtype); ``loss: ce`` loads only the student.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lit_prune.components.checks import check_choice
from lit_prune.components.layers import decoder_layers, unwrap
from lit_prune.components.lora import is_peft
from lit_prune.components.losses import kd_ce_mix, kl_loss, next_token_ce
from lit_prune.deprecation import renamed_key
from lit_prune.stages.qlora import BaseQuantization, check_base_quantization, load_nf4_base, save_nf4_merged
from lit_prune.stages.recovery import RecoveryStage, check_share

RecoveryLoss = Literal["ce", "kd", "mix"]


class EndpointLoRA(RecoveryStage):
    """Heal a cut with LoRA on the kept layers next to it (CLP's cutoff endpoint tuning); everything else is frozen.

    The student, teacher, endpoint and LoRA settings (``teacher``, ``kd_temperature``, ``width``,
    ``endpoint_layers_override``, ``target_modules``, ``r``, ``alpha``, ``dropout``, ``lora_options``, ...) are
    those of :class:`~lit_prune.stages.recovery.RecoveryStage`.

    Args:
        pretrained: Dense model (with ``mask``) or an already pruned folder (``mask`` null); also feeds
            ``data.tokenizer``.
        mask: ``mask.json`` of the layers to drop from ``pretrained``; null when ``pretrained`` is already pruned
            (its mask.json, or ``endpoint_layers_override``, then says where the cuts are).
        loss: ``ce`` next-token cross-entropy; ``kd`` KL to the dense teacher; ``mix`` both.
        kd_share: Share of the KD term under ``mix``: ``(1 - kd_share) * CE + kd_share * KD``.
        train_norm: Also train the normalisation weights of the endpoint layers.
        train_lm_head: Also train the output head (tied to the input embedding in many small models).
        quantize_base: ``none``, or ``nf4`` for QLoRA: the frozen base is loaded in bitsandbytes 4-bit NF4 (CUDA
            only, ``lit_prune[quant-cuda]``) and prepared with ``peft.prepare_model_for_kbit_training``; LoRA stays
            in float32. The export always writes the adapter to ``<export>/adapter``, and as the model the NF4 base
            dequantized (the values the adapter was trained against) with the LoRA merged in. With ``nf4``,
            ``dtype`` is the compute dtype of the 4-bit layers (float16 if asked for, otherwise bfloat16).
        kd_weight: Deprecated name of ``kd_share`` (same meaning); accepted for one release.
    """

    def __init__(
        self,
        pretrained: str,
        mask: str | None = None,
        *,
        loss: RecoveryLoss = "ce",
        kd_share: float = 0.5,
        train_norm: bool = False,
        train_lm_head: bool = False,
        quantize_base: BaseQuantization = "none",
        kd_weight: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice(quantize_base, BaseQuantization, "model.init_args.quantize_base")
        if quantize_base == "nf4":
            check_base_quantization()  # first: nothing is read or loaded on a machine that cannot run it
        if kd_weight is not None:
            check_share(kd_weight, "model.init_args.kd_weight")
        kd_share = renamed_key("kd_weight", kd_weight, "kd_share", kd_share, 0.5, kd_weight)
        super().__init__(pretrained, mask, **kwargs)
        check_choice(loss, RecoveryLoss, "model.init_args.loss")
        self.kd_share = check_share(kd_share, "model.init_args.kd_share")
        self.loss = loss
        self.train_norm, self.train_lm_head = train_norm, train_lm_head
        self.quantize_base = quantize_base
        self.require_endpoints("EndpointLoRA")
        self.check_lora(self.endpoints)
        if loss == "ce":
            if self.teacher is not None:
                raise ValueError(
                    f"`model.init_args.teacher`={self.teacher!r} is only used by `loss: kd` or `loss: mix`; the loss "
                    "is 'ce'. Remove the teacher or change the loss."
                )
        else:
            self.teacher = self.teacher or (pretrained if self.drop_now else None)
            if self.teacher is None:
                raise ValueError(
                    f"`model.init_args.loss`={loss!r} needs the dense teacher, but `model.init_args.pretrained`="
                    f"{pretrained!r} is already pruned. Set `model.init_args.teacher` to the dense model."
                )
            self.check_teacher(self.teacher)

    def adds_lora(self) -> bool:
        return True

    def configure_model(self) -> None:
        if self.quantize_base == "none" or self.model is not None:
            return super().configure_model()
        self.model = load_nf4_base(self)
        self.on_model_loaded()

    def on_model_loaded(self) -> None:
        self.build_student()
        if self.teacher is not None:
            self.load_teacher(self.teacher)
        self.train(self.training)  # from_pretrained returns eval mode; LoRA dropout needs train mode (teacher: eval)

    def build_student(self) -> None:
        self.prepare_student()
        self.wrap_lora(self.endpoints)
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
        kd = None
        if self.loss != "ce":
            kd = kl_loss(self.teacher_logits(input_ids), logits, labels, temperature=self.kd_temperature)
            logs["train/kd"] = kd
        loss = kd_ce_mix(ce, kd, {"ce": 0.0, "kd": 1.0, "mix": self.kd_share}[self.loss])
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        return loss

    def save_pruned_model(self, out_dir: str, overwrite: bool = False) -> None:
        """As :meth:`RecoveryStage.save_pruned_model`; under ``quantize_base: nf4`` it writes the adapter and the
        dequantized base with the LoRA merged in (merging into NF4 would round most of the update away)."""
        if self.quantize_base == "none" or not is_peft(self.model):
            return super().save_pruned_model(out_dir, overwrite)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return None
        save_nf4_merged(self, out_dir, overwrite)
        return None
