"""Remove decoder layers for real: a smaller ModuleList, a re-indexed KV cache, and a config that matches.

Dropping layers touches three pieces of state that must stay consistent:

1. the decoder ``nn.ModuleList`` (rebuilt from the kept layers, in order);
2. every ``layer_idx`` inside the kept layers (the KV cache is indexed by it; stale indices point past the cache);
3. the config: ``num_hidden_layers`` and every per-layer list (``layer_types`` decides sliding vs full attention
   and the cache layout), so that ``save_pretrained`` output rebuilds the same model.

Mixture-of-experts configs also place dense and sparse (expert) layers by index, so a cut shifts what they mean::

    DeepSeek-V3/R1   layer i is MoE  iff  i >= first_k_dense_replace           (a dense prefix)
    Qwen2/3-MoE      layer i is MoE  iff  i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0

    first_k_dense_replace=2, drop [1, 2]:  D D M M M M  ->  D M M M    first_k_dense_replace=1
    decoder_sparse_step=2,   drop [1]:     D M D M D M  ->  D D M D M  decoder_sparse_step=1, mlp_only_layers=[0, 1, 3]
                                           (the old rule, step 2, would rebuild D M D M D: the wrong layers get experts)

The kept pattern is written back exactly and checked by re-applying transformers' rule to the new config.
DeepSeek's multi-token-prediction (MTP) layers are not part of the transformers model and are not exported:
``num_nextn_predict_layers`` becomes 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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
    sparse = moe_layer_pattern(config, num_layers)
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
    if sparse is not None:
        write_moe_layer_pattern(config, [sparse[i] for i in keep])
    _drop_mtp_layers(config)
    return model


def moe_layer_pattern(config, num_layers: int | None = None) -> list[bool] | None:
    """Which layers ``config`` builds with routed experts, by transformers' index rule; None if no rule applies.

    Only configs that mix dense and sparse layers by index have a rule (DeepSeek-V3, Qwen2/3-MoE). Mixtral and
    gpt-oss put experts in every layer, dense models in none: nothing to rewrite after a cut.
    """
    n = int(config.num_hidden_layers if num_layers is None else num_layers)
    if getattr(config, "first_k_dense_replace", None) is not None:
        first_k = int(config.first_k_dense_replace)
        return [i >= first_k for i in range(n)]
    if getattr(config, "decoder_sparse_step", None) is not None:
        step = int(config.decoder_sparse_step)
        mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
        has_experts = int(getattr(config, "num_experts", 0) or 0) > 0
        return [has_experts and i not in mlp_only and (i + 1) % step == 0 for i in range(n)]
    return None


def write_moe_layer_pattern(config, sparse: Sequence[bool]) -> None:
    """Express the kept dense/sparse pattern exactly in ``config`` (``len(sparse)`` layers, True = experts)."""
    sparse = [bool(s) for s in sparse]
    if getattr(config, "first_k_dense_replace", None) is not None:
        first_k = sparse.index(True) if True in sparse else len(sparse)
        if any(not s for s in sparse[first_k:]):
            raise ValueError(
                f"config.first_k_dense_replace can only describe a dense prefix, but the kept layers are {sparse} "
                "(True = experts). This cannot come from cutting a model whose dense layers form a prefix."
            )
        config.first_k_dense_replace = first_k
    elif getattr(config, "decoder_sparse_step", None) is not None:
        # A cut rarely keeps the period: step 1 makes every layer sparse except the ones listed.
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [i for i, s in enumerate(sparse) if not s]
    rebuilt = moe_layer_pattern(config, len(sparse))
    if rebuilt != sparse:
        raise RuntimeError(
            f"The rewritten config would rebuild the dense/sparse layers as {rebuilt}, not the kept {sparse}. "
            f"{type(config).__name__} places experts by a rule lit_prune does not know; please report it."
        )


def _drop_mtp_layers(config) -> None:
    # DeepSeek checkpoints store MTP layers after the last decoder layer; transformers does not load them into the
    # causal LM, and they were trained on the full stack's last hidden state, so a cut model ships without them.
    mtp = getattr(config, "num_nextn_predict_layers", None)
    if mtp:
        warnings.warn(
            f"config.num_nextn_predict_layers={mtp}: the multi-token-prediction layers are not part of the pruned "
            "model (transformers does not load them, and they predict from the uncut model's last layer). The "
            "pruned config says num_nextn_predict_layers=0 and the export holds no MTP weights.",
            stacklevel=3,
        )
        config.num_nextn_predict_layers = 0


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
