"""Remove decoder layers for real: a smaller ModuleList, a re-indexed KV cache, and a config that matches.

Dropping layers touches three pieces of state that must stay consistent:

1. the decoder ``nn.ModuleList`` (rebuilt from the kept layers, in order);
2. every ``layer_idx`` inside the kept layers (the KV cache is indexed by it; stale indices point past the cache);
3. the config: ``num_hidden_layers`` and every per-layer list (``layer_types`` decides sliding vs full attention
   and the cache layout), so that ``save_pretrained`` output rebuilds the same model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from lit_prune.components.layers import layer_stack, unwrap

# Config attributes that hold one entry per decoder layer (sliced together with the layers).
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers", "mlp_layer_types", "sliding_window_layers")


def validate_drop(drop: Sequence[int], num_layers: int, key: str = "drop") -> list[int]:
    """Check a drop list against a layer count; return it as a sorted list of ints."""
    drop = list(drop)
    bad_type = [i for i in drop if isinstance(i, bool) or not isinstance(i, int)]
    if bad_type:
        raise ValueError(f"`{key}` must hold 0-based integer layer indices, got {bad_type!r}.")
    out_of_range = [i for i in drop if not 0 <= i < num_layers]
    if out_of_range:
        raise ValueError(
            f"`{key}` has indices {out_of_range} outside [0, {num_layers - 1}] for a model with {num_layers} decoder "
            "layers. Indices are 0-based; check that the mask was made for this model."
        )
    duplicates = sorted({i for i in drop if drop.count(i) > 1})
    if duplicates:
        raise ValueError(f"`{key}` lists layers {duplicates} more than once; list each dropped layer once.")
    if drop != sorted(drop):
        raise ValueError(f"`{key}` must be sorted in increasing order, got {drop}. Use {sorted(drop)}.")
    if len(drop) >= num_layers:
        raise ValueError(
            f"`{key}` drops all {num_layers} decoder layers; at least one must remain. Drop at most {num_layers - 1}."
        )
    return drop


def drop_layers(model: nn.Module, drop: Sequence[int]) -> nn.Module:
    """Remove decoder layers in place and fix everything that depends on the layer count.

    Args:
        model: A causal LM of a supported architecture (peft wrappers are looked through).
        drop: Sorted 0-based indices of the layers to remove.

    Returns:
        The same model object, now with ``num_layers - len(drop)`` decoder layers.
    """
    base = unwrap(model)
    stack = layer_stack(base)
    num_layers = len(stack.layers)
    drop = validate_drop(drop, num_layers)
    config = base.config
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 scales attention by 1/(layer_idx+1): re-indexing would change the math of every kept layer.
        raise ValueError(
            "config.scale_attn_by_inverse_layer_idx=True ties attention scaling to the layer index, so layers cannot "
            "be removed without changing the kept layers. Use a model with scale_attn_by_inverse_layer_idx=False."
        )
    dropped = set(drop)
    keep = [i for i in range(num_layers) if i not in dropped]
    stack.replace(nn.ModuleList(stack.layers[i] for i in keep))
    for new_index, layer in enumerate(stack.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(config, key, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return model


def endpoint_layers(num_layers: int, drop: Sequence[int], width: int = 1) -> list[int]:
    """Post-surgery indices of the kept layers next to each cut segment (``width`` on each side).

    Args:
        num_layers: Decoder layers before surgery.
        drop: Sorted 0-based indices that were removed.
        width: How many kept layers on each side of a cut count as endpoints.
    """
    drop = validate_drop(drop, num_layers)
    if width < 1:
        raise ValueError(f"`width` must be >= 1, got {width}.")
    dropped = set(drop)
    keep = [i for i in range(num_layers) if i not in dropped]
    new_index = {old: new for new, old in enumerate(keep)}
    chosen: set[int] = set()
    for start, end in contiguous_segments(drop):
        before = [i for i in keep if i < start][-width:]
        after = [i for i in keep if i >= end][:width]
        chosen.update(new_index[i] for i in before + after)
    return sorted(chosen)


def contiguous_segments(drop: Sequence[int]) -> list[tuple[int, int]]:
    """Group sorted indices into ``[start, end)`` runs: ``[3, 4, 5, 9] -> [(3, 6), (9, 10)]``."""
    segments: list[tuple[int, int]] = []
    for index in sorted(drop):
        if segments and segments[-1][1] == index:
            segments[-1] = (segments[-1][0], index + 1)
        else:
            segments.append((index, index + 1))
    return segments


def prepare_output_dir(out_dir: str | Path, overwrite: bool = False, key: str = "out") -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (checked before any work is done)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"`{key}`={str(out_dir)!r} exists and is not a folder. Choose another path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"`{key}`={str(out_dir)!r} is not empty. Choose an empty or new folder, or pass overwrite to replace it."
        )
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_atomically(out_dir: str | Path, write: callable, overwrite: bool = False) -> Path:
    """Run ``write(tmp_dir)`` into a temporary sibling folder, then move it into place.

    A crash or error mid-write leaves nothing at ``out_dir``.
    """
    out_dir = prepare_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tmp_dir.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; an export should read like any folder
        write(tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir
