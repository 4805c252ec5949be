"""Scale each decoder layer's residual update by a differentiable gate, without touching its weights.

For decoder layer ``l`` with input ``h`` and output ``F(h)``::

    h_out = h + g_l * (F(h) - h)          (computed as torch.lerp(h, F(h), g_l))

``g_l = 1`` is the original layer and ``g_l = 0`` is exactly "layer removed"; lerp is exact at both ends,
so open gates reproduce the original logits bit for bit. Gating uses forward hooks: no second copy of the model,
parameter names unchanged, and the same weights serve as the dense teacher when the gates are opened.

Two exact shortcuts for a training step, given the gate values on the host (``set(values, host)``):

- A layer whose gate is exactly 0 gets a detached input, so autograd builds no graph through it: its output enters
  with weight 0, the gate's gradient ``grad * (F(h) - h)`` is unchanged and so is every other gradient.
- :func:`shared_prefix` says how many leading layers give the same hidden state gated and open (a gate that is
  exactly 1 in the hidden dtype makes lerp return ``F(h)``), so a dense pass may start from the gated pass's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

from lit_prune.components.layers import decoder_layers


def shared_prefix(host: Tensor, dtype: torch.dtype) -> int:
    """How many leading layers have a gate that is exactly 1 once cast to ``dtype`` (the hidden states' dtype).

    The hook casts each gate to the hidden dtype before the lerp, and ``lerp(h, F, 1) == F`` bit for bit, so those
    layers hand the same hidden state to the next layer with the gates set and with the gates open.

    Args:
        host: Gate values ``[num_layers]`` on the host, in the dtype the gating holds them.
        dtype: Dtype of the hidden states the gates are cast to.
    """
    open_ = (host.to(dtype) == 1).tolist()
    return next((i for i, one in enumerate(open_) if not one), len(open_))


class LayerGating:
    """Attach per-layer residual gates to a causal LM through forward hooks.

    Args:
        model: A causal LM of a supported architecture (peft wrappers are looked through).
    """

    def __init__(self, model: nn.Module) -> None:
        self.num_layers = len(decoder_layers(model))
        self._values: Tensor | None = None
        self._cut: frozenset[int] = frozenset()  # layers whose gate is exactly 0: fed a detached input
        self._inputs: dict[int, Tensor] = {}  # their undetached input, from the pre-hook to the gate hook
        layers = decoder_layers(model)
        self._handles = [
            layer.register_forward_hook(partial(self._gate_hook, index), with_kwargs=True)
            for index, layer in enumerate(layers)
        ] + [
            layer.register_forward_pre_hook(partial(self._cut_hook, index), with_kwargs=True)
            for index, layer in enumerate(layers)
        ]

    @property
    def values(self) -> Tensor | None:
        """Current gate values ``[num_layers]``, or None when every gate is open."""
        return self._values

    @property
    def cut(self) -> frozenset[int]:
        """Layers that are fed a detached input while the gates are set (their gate is exactly 0)."""
        return self._cut

    def set(self, values: Tensor | None, host: Tensor | None = None) -> None:
        """Set gate values ``[num_layers]`` in [0, 1] (may require grad), or None to open every gate.

        Args:
            values: The gate values, or None.
            host: The same values on the host (``values.detach().cpu()``), or None. With them, layers whose gate is
                exactly 0 get a detached input: no graph is built through them, and every gradient stays the same.
                Leave it None for sharded (FSDP) models, whose layers' backward hooks expect a graph.
        """
        if values is not None and tuple(values.shape) != (self.num_layers,):
            raise ValueError(f"Gate values must have shape [{self.num_layers}], got {tuple(values.shape)}.")
        if host is not None and (values is None or tuple(host.shape) != (self.num_layers,)):
            raise ValueError(f"`host` must hold the {self.num_layers} gate values on the host, got {host!r}.")
        self._values = values
        self._cut = frozenset(torch.nonzero(host == 0).flatten().tolist()) if host is not None else frozenset()
        self._inputs.clear()  # nothing captured outlives the values it was captured for

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
        self.set(None)

    def _cut_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._values is None or index not in self._cut:
            return None
        if args:
            self._inputs[index] = args[0]
            return (args[0].detach(), *args[1:]), kwargs
        self._inputs[index] = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    def _gate_hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self._values is None:
            return None
        # A cut layer saw a detached copy; the residual path must keep the input that carries the graph.
        hidden_in = self._inputs.pop(index, None)
        if hidden_in is None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        gate = self._values[index].to(device=hidden_out.device, dtype=hidden_out.dtype)
        gated = torch.lerp(hidden_in, hidden_out, gate)
        if isinstance(output, tuple):
            return (gated, *output[1:])
        return gated
