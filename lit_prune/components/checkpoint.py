"""Write a pruned model as a vanilla Hugging Face checkpoint (no remote code, no peft), atomically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from lit_prune import hf
from lit_prune.components import compensate as compensation
from lit_prune.components.layers import num_decoder_layers, unwrap
from lit_prune.components.mask_io import MaskArtifact, load_mask
from lit_prune.components.surgery import drop_layers
from lit_prune.io import prepare_output_dir, save_checkpoint_folder


def save_pruned(
    model: nn.Module,
    artifact: MaskArtifact,
    out_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Drop ``artifact.drop`` from ``model`` (in place) and save it with its tokenizer and ``mask.json``.

    Args:
        model: The dense model the mask was made for.
        artifact: Which layers to drop.
        out_dir: Destination folder; must be empty or new unless ``overwrite``.
        tokenizer: Saved next to the weights so the folder is self-contained.
        overwrite: Replace a non-empty ``out_dir``.
    """
    prepare_output_dir(out_dir, overwrite)
    model = unwrap(model)
    artifact.check_fits(num_decoder_layers(model))
    drop_layers(model, artifact.drop)
    return save_checkpoint_folder(out_dir, model, tokenizer, artifact.to_json(), overwrite)


def export_from_mask(
    pretrained: str,
    mask: str | Path | MaskArtifact,
    out_dir: str | Path,
    overwrite: bool = False,
    dtype: hf.Dtype = "auto",
    allow_model_mismatch: bool = False,
    compensate: str | None = None,
    calib_text: tuple[str, ...] = ("offline:britannica",),
    calib_tokens: int = 16384,
    ridge: float = 0.0,
) -> Path:
    """Apply a mask artifact to a model id or folder and write the smaller checkpoint.

    Everything that can be checked without weights (output folder, mask file, layer count, model id) is checked first,
    so a bad input loads nothing and writes nothing. ``compensate="linear"`` first folds a least-squares map into the
    layer before each cut (``components/compensate.py``), calibrated on the training part of ``calib_text``.
    """
    prepare_output_dir(out_dir, overwrite)
    artifact = mask if isinstance(mask, MaskArtifact) else load_mask(mask)
    config = hf.load_config(pretrained, key="--model")
    artifact.check_fits(int(config.num_hidden_layers), pretrained, allow_model_mismatch)
    if compensate is not None:
        files = compensation.check_options(config, artifact.drop, compensate, calib_text, calib_tokens, ridge)
    model = hf.load_causal_lm(pretrained, dtype)
    tokenizer = hf.load_tokenizer(pretrained)
    if compensate is not None:
        report = compensation.compensate_from_text(model, tokenizer, artifact.drop, files, calib_tokens, ridge)
        artifact = replace(artifact, extra={**artifact.extra, "compensation": report})
    return save_pruned(model, artifact, out_dir, tokenizer=tokenizer, overwrite=overwrite)
