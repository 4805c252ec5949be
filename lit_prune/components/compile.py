"""Fuse the pointwise work of decoder layers with torch.compile, leaving matmuls, attention and gate hooks alone.

A gated search runs every layer's pointwise ops (RMSNorm in float32, SiLU x up, casts) in two forwards and one
backward, so it gains more from fusing them than plain fine-tuning does (docs/scale.md). Only small, hook-free
submodules are compiled: the layer gate's forward hook stays in eager mode, and one compiled graph serves every
instance of a class (modules are inlined, their weights are graph inputs).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_prune.components.layers import decoder_layers

POINTWISE_SUFFIXES = ("RMSNorm", "MLP")


def pointwise_blocks(model: nn.Module, suffixes: tuple[str, ...] = POINTWISE_SUFFIXES) -> list[nn.Module]:
    """Submodules of the decoder layers whose class name ends with one of ``suffixes`` (works on a meta model)."""
    return [
        module for layer in decoder_layers(model) for module in layer.modules()
        if module is not layer and type(module).__name__.endswith(suffixes)
    ]


def compile_pointwise_blocks(
    model: nn.Module, suffixes: tuple[str, ...] = POINTWISE_SUFFIXES, **compile_kwargs: Any
) -> int:
    """Compile, in place, every :func:`pointwise_blocks` module (``compile_kwargs`` go to ``torch.compile``).

    Returns:
        How many modules were compiled (0 when the architecture names them otherwise).
    """
    modules = pointwise_blocks(model, suffixes)
    for module in modules:
        module.compile(**compile_kwargs)
    return len(modules)
