"""Scale each decoder layer's residual update by a differentiable gate, without touching its weights.

For decoder layer ``l`` with input ``h`` and output ``F(h)``::

    h_out = h + g_l * (F(h) - h)          (computed as torch.lerp(h, F(h), g_l))

``g_l = 1`` is the original layer and ``g_l = 0`` is exactly "layer removed"; lerp is exact at both ends,
so open gates reproduce the original logits bit for bit. Gating uses forward hooks: no second copy of the model,
parameter names unchanged, and the same weights serve as the dense teacher when the gates are opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from lit_prune.components.layers import decoder_layers


class LayerGating:
    """Attach per-layer residual gates to a causal LM through forward hooks.

    Args:
        model: A causal LM of a supported architecture (peft wrappers are looked through).
    """

    def __init__(self, model: nn.Module) -> None:
        self.num_layers = len(decoder_layers(model))
        self._values: Tensor | None = None
        self._handles = [
            layer.register_forward_hook(partial(self._gate_hook, index), with_kwargs=True)
            for index, layer in enumerate(decoder_layers(model))
        ]

    @property
    def values(self) -> Tensor | None:
        """Current gate values ``[num_layers]``, or None when every gate is open."""
        return self._values

    def set(self, values: Tensor | None) -> None:
        """Set gate values ``[num_layers]`` in [0, 1] (may require grad), or None to open every gate."""
        if values is not None and tuple(values.shape) != (self.num_layers,):
            raise ValueError(f"Gate values must have shape [{self.num_layers}], got {tuple(values.shape)}.")
        self._values = values

    def set_mask(self, keep: Tensor | list[bool]) -> None:
        """Set a hard 0/1 mask (True = keep the layer)."""
        self.set(torch.as_tensor(keep, dtype=torch.float32))

    @contextmanager
    def opened(self) -> Iterator[None]:
        """Open every gate for the duration of the block (the dense teacher view of the same weights)."""
        saved, self._values = self._values, None
        try:
            yield
        finally:
            self._values = saved

    def remove(self) -> None:
        """Detach the hooks; the model behaves exactly as before gating."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._values = None

    def _gate_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self._values is None:
            return None
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        gate = self._values[index].to(device=hidden_out.device, dtype=hidden_out.dtype)
        gated = torch.lerp(hidden_in, hidden_out, gate)
        if isinstance(output, tuple):
            return (gated, *output[1:])
        return gated
