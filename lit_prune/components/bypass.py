"""Run a decoder stack with some layers bypassed or fed a given hidden state, inside the model's own forward.

A layer's ``forward`` is swapped for the duration of one model call: the identity (a removed layer, nothing
computed), or the real layer run on a hidden state computed earlier (a prefix shared with another pass). Embeddings,
attention masks, position embeddings, the final norm, the head and every hook stay the architecture's own. Sharded
(FSDP) models cannot run their layers like this (:func:`can_replay`); callers fall back to gating.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn


def pass_through(*args: Any, **kwargs: Any) -> Tensor:
    """A bypassed layer: its input is its output, nothing is computed."""
    return args[0] if args else kwargs["hidden_states"]


def fed(forward: Callable[..., Any], hidden: Tensor) -> Callable[..., Any]:
    """The real layer ``forward``, run on ``hidden`` instead of whatever reaches it."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return forward(*args, **kwargs)

    return run


def returning(hidden: Tensor) -> Callable[..., Tensor]:
    """A layer that outputs ``hidden`` whatever it is given."""
    return lambda *args, **kwargs: hidden


@contextmanager
def forwards_replaced(layers: nn.ModuleList, forwards: dict[int, Callable[..., Any]]) -> Iterator[None]:
    """Swap the ``forward`` of some layers for the duration of one model call (their hooks keep running)."""
    missing = object()
    saved: dict[int, Any] = {}
    try:
        for index, forward in forwards.items():
            saved[index] = layers[index].__dict__.get("forward", missing)
            layers[index].forward = forward
        yield
    finally:
        for index, previous in saved.items():
            if previous is missing:
                del layers[index].forward
            else:
                layers[index].forward = previous


def can_replay(model: nn.Module) -> bool:
    """False for sharded (FSDP) models: their layers must run inside the model's own forward, so masks are gated."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch build without distributed support cannot shard either
        return True
    return not any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())
