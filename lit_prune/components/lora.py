"""peft LoRA on chosen decoder layers, with the checks that run before any weight loads.

``layers`` are positions in the *current* (post-surgery) layer list: peft's ``layers_to_transform`` counts positions
in the ``ModuleList`` it finds, so they are computed after the cut, together with the architecture's layer-list
name as ``layers_pattern``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lit_prune.components.layers import LAYER_PATHS, decoder_layers, unwrap

# The attention and MLP projections of Llama-like models: the default LoRA targets.
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# LoraConfig fields the stage sets itself; `lora_options` may not repeat them.
DERIVED_LORA_KEYS = ("layers_to_transform", "layers_pattern")
OWN_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type")


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


def fused_parameter_targets(model: nn.Module, layers: list[int] | None, target_modules: list[str]) -> list[str]:
    """Parameters of ``layers`` that ``target_modules`` names but that belong to no Linear: fused MoE expert weights.

    peft wraps such parameters (``ParamWrapper``) instead of Linear modules, and refuses LoRA dropout on them.
    """
    stack = decoder_layers(model)
    chosen = list(range(len(stack))) if layers is None else layers
    found = []
    for index in chosen:
        for module_name, module in stack[index].named_modules():
            if isinstance(module, nn.Linear):
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                if any(name == t or name.endswith(f".{t}") for t in target_modules):
                    found.append(f"{index}.{name}")
    return found


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


def check_lora_hparams(r: int, alpha: float, dropout: float, prefix: str = "model.init_args.") -> None:
    """Range checks of the LoRA rank, alpha and dropout, in config keys."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`{prefix}r` (LoRA rank) must be an integer >= 1, got {r!r}.")
    if not alpha > 0:
        raise ValueError(f"`{prefix}alpha` (LoRA alpha) must be > 0, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`{prefix}dropout` (LoRA dropout) must be in [0, 1), got {dropout}.")


def add_lora(
    model: nn.Module,
    layers: list[int] | None,
    target_modules: list[str],
    r: int,
    alpha: float,
    dropout: float,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Wrap ``model`` with peft LoRA on ``target_modules`` of ``layers`` (None = every decoder layer)."""
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
    """True for a peft wrapper (something ``merge_and_unload`` can turn back into a plain model)."""
    return model is not None and callable(getattr(model, "merge_and_unload", None))
