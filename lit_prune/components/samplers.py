"""Top-k sampling primitives behind the layer gates: Gumbel noise, hard k-hot masks and their relaxations.

All functions work on the last dimension, so ``[num_layers]`` and batched ``[..., num_layers]`` inputs both work.
Randomness only comes from torch's global RNG or an explicit ``torch.Generator``, so ``torch.manual_seed``
makes every draw repeatable.

The straight-through estimator combines an exact forward with a smooth backward::

    forward : hard k-hot   1 1 0 1 0 1     (exactly `keep` ones)
    backward: d/dz sigmoid(z - c(z))       (c chosen so the soft values sum to `keep`)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_TINY = 1e-10  # keeps log(-log(u)) finite at u = 0 or 1


def _check_keep(keep: int, size: int) -> None:
    if not 0 <= keep <= size:
        raise ValueError(f"`keep` must be in [0, {size}] for {size} elements, got {keep}.")


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw i.i.d. standard Gumbel(0, 1) noise with the shape, dtype and device of ``like``.

    Args:
        like: Tensor whose shape, dtype and device the noise copies; its values are ignored.
        generator: Optional generator; the global RNG is used when None.

    Returns:
        Noise tensor, same shape as ``like``, never attached to the autograd graph.
    """
    dtype = like.dtype if like.dtype.is_floating_point else torch.float32
    u = torch.rand(like.shape, generator=generator, dtype=dtype, device=like.device)
    return -torch.log(-torch.log(u.clamp(_TINY, 1.0 - _TINY)))


def hard_topk_mask(scores: Tensor, keep: int) -> Tensor:
    """Return a 0/1 mask with ones at the ``keep`` largest scores of the last dimension.

    Args:
        scores: Scores ``[..., n]``; larger means more likely to be kept.
        keep: Number of ones per row, in [0, n].

    Returns:
        Float mask ``[..., n]`` with exactly ``keep`` ones per row (ties broken by ``torch.topk``).
    """
    _check_keep(keep, scores.shape[-1])
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.float32
    mask = torch.zeros(scores.shape, dtype=dtype, device=scores.device)
    if keep == 0:
        return mask
    return mask.scatter_(-1, scores.detach().topk(keep, dim=-1).indices, 1.0)


def _saturated(z: Tensor, value: float) -> Tensor:
    # Constant result that stays on the autograd graph (zero gradient): a loss built only from it can still
    # call backward(), e.g. while a top-k curriculum keeps every layer.
    return z * 0.0 + value


@torch.no_grad()
def _topk_threshold(z: Tensor, keep: int, iters: int) -> Tensor:
    """Bisection for c with ``sum(sigmoid(z - c), -1) == keep``; float64, fixed iteration count (no host sync)."""
    z64 = z.detach().to(torch.float64)
    n = z64.shape[-1]
    # sum(sigmoid(z - c)) is decreasing in c; at these bounds it is > n - 1 and < 1, which brackets any keep.
    margin = math.log(n) + 2.0
    lo = z64.amin(dim=-1, keepdim=True) - margin
    hi = z64.amax(dim=-1, keepdim=True) + margin
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_many = torch.sigmoid(z64 - mid).sum(dim=-1, keepdim=True) > keep
        lo = torch.where(too_many, mid, lo)
        hi = torch.where(too_many, hi, mid)
    return ((lo + hi) / 2).to(z.dtype)


def relaxed_topk(z: Tensor, keep: int, iters: int = 50) -> Tensor:
    """Soft top-k: ``sigmoid(z - c)`` with the threshold ``c`` set so that each row sums to ``keep``.

    ``c`` is found by bisection without autograd (no graph through the iterations); its exact derivative
    ``dc/dz_j = w_j / sum(w)``, ``w = soft * (1 - soft)`` (implicit function theorem on ``sum(soft) = keep``) is then
    attached in one step, so the gradient flows through ``z`` only. This keeps the gradient of the row sum at zero:
    raising one score must lower the others. Treating ``c`` as a plain constant instead adds a common-mode term
    that pushes every score the same way, which per-parameter optimizers such as Adam amplify until the ranking
    signal is lost. Divide ``z`` by a temperature beforehand to sharpen the relaxation.

    Args:
        z: Scores ``[..., n]``; larger means more likely to be kept.
        keep: Target row sum, in [0, n]; 0 and n give exact zeros and ones.
        iters: Bisection steps; 50 resolves ``c`` far below float32 precision.

    Returns:
        Keep-probabilities ``[..., n]`` in [0, 1] summing to ``keep`` along the last dimension.
    """
    n = z.shape[-1]
    _check_keep(keep, n)
    if iters < 1:
        raise ValueError(f"`iters` must be >= 1, got {iters}.")
    if keep == 0:
        return _saturated(z, 0.0)
    if keep == n:
        return _saturated(z, 1.0)
    c = _topk_threshold(z, keep, iters)
    with torch.no_grad():
        soft = torch.sigmoid(z - c)
        w = soft * (1 - soft)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    # Forward value stays c; backward gets dc/dz = w (the detached weights are constants).
    c = c + (w * (z - z.detach())).sum(dim=-1, keepdim=True)
    return torch.sigmoid(z - c)


def straight_through_topk(z: Tensor, keep: int) -> Tensor:
    """Exact k-hot forward, :func:`relaxed_topk` gradient backward (straight-through estimator).

    Args:
        z: Scores ``[..., n]`` (e.g. ``(logits + gumbel) / temperature``); larger means more likely to be kept.
        keep: Number of ones per row, in [0, n].

    Returns:
        Float mask ``[..., n]`` whose values are exactly the hard k-hot mask and whose gradient is that of
        ``relaxed_topk(z, keep)``.
    """
    hard = hard_topk_mask(z, keep)
    soft = relaxed_topk(z, keep)
    # (soft - soft.detach()) is exactly 0 in the forward pass, so the result is bit-exact 0/1.
    return hard + (soft - soft.detach())
