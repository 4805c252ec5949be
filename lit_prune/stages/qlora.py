"""The QLoRA path of EndpointLoRA (``quantize_base: nf4``): a bitsandbytes 4-bit NF4 base under float32 LoRA.

Three steps differ from plain LoRA, and live here: the early check (CUDA and bitsandbytes, before anything is read),
loading (bitsandbytes places the 4-bit weights while it loads them, straight onto the training GPU, then
``peft.prepare_model_for_kbit_training``), and the export (the adapter, and the NF4 base dequantized with the LoRA
merged in: merging into NF4 would round most of the update away).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lit_prune import hf
from lit_prune.io import prepare_output_dir, save_checkpoint_folder

if TYPE_CHECKING:
    from lit_prune.stages.recovery import RecoveryStage

BaseQuantization = Literal["none", "nf4"]


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


def compute_dtype(dtype: hf.Dtype) -> torch.dtype:
    """Dtype of the 4-bit layers' matmuls (bfloat16 unless float16 is asked for)."""
    return torch.float16 if dtype == "float16" else torch.bfloat16


def load_nf4_base(stage: RecoveryStage) -> nn.Module:
    """The stage's ``pretrained`` with 4-bit NF4 weights on the training GPU, prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training

    from lit_prune.components.quantize import load_quantized

    if stage.is_sharded():
        raise ValueError(
            "`model.init_args.quantize_base`='nf4' is not supported with a sharding `trainer.strategy` (FSDP): "
            "the 4-bit base would need its own flattening. Train on one GPU (`trainer.strategy: auto`) or set "
            "`model.init_args.quantize_base: none`."
        )
    device = stage.trainer.strategy.root_device if stage._trainer is not None else torch.device("cuda")
    check_base_quantization(device)
    model = load_quantized(stage.pretrained, "bnb-nf4", device=str(device), dtype=compute_dtype(stage.dtype_name))
    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=stage.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def save_nf4_merged(stage: RecoveryStage, out_dir: str, overwrite: bool = False) -> None:
    """Write the adapter and the dequantized base with the LoRA merged in (rank 0; the stage holds the result)."""
    from lit_prune.components.quantize import merge_lora_dequantized

    prepare_output_dir(out_dir, overwrite)
    artifact = stage.mask_artifact()
    tokenizer = hf.load_tokenizer(stage.pretrained)
    # Lightning's teardown moves the module to the CPU before on_fit_end; bitsandbytes dequantizes on CUDA.
    stage.model.to(torch.device("cuda", torch.cuda.current_device()))

    def merged(folder: Path) -> nn.Module:
        stage.model.save_pretrained(folder / "adapter")
        stage.model = merge_lora_dequantized(stage.model, compute_dtype(stage.dtype_name))
        return stage.model

    save_checkpoint_folder(out_dir, merged, tokenizer, artifact.to_json(), overwrite)
