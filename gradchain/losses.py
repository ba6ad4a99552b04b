"""Robust reductions of per-sample losses for long-tailed data: a soft median and a trimmed mean.

Both take the per-sample losses (``reduction="none"``) and return one differentiable scalar to call
``backward()`` on, in place of ``losses.mean()``. They act on the loss, before the optimizer: no
state, nothing to configure in the chain. Neither is decomposable over micro-batches (the median
of a union is not a function of the micro-batch medians), so under gradient accumulation each
micro-batch is reduced on its own.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["soft_median", "trimmed_mean"]


def _flat_losses(losses: Tensor, who: str) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"{who}: losses must be a tensor of per-sample losses, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"{who}: losses must be a floating-point tensor, got {losses.dtype}")
    if losses.numel() == 0:
        raise ValueError(f"{who}: losses is empty; there is no median or mean of zero samples")
    return losses.reshape(-1)


def _number(value: Any, who: str, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{who}: {name} must be one real number, got a tensor of shape {tuple(value.shape)}")
        value = float(value.detach())  # a constant: never a path for gradients
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def soft_median(losses: Tensor, tau_ranks: float) -> Tensor:
    """A differentiable median: a softmax-weighted mean of the sorted losses, peaked at the middle rank.

    Rule: sort the ``n`` losses (all elements of ``losses``, flattened) to ``L_(0) <= ... <= L_(n-1)``;
    ``c = (n - 1)/2`` is the median position (for even ``n`` halfway between the two middle ranks);
    ``w_k = softmax_k(-|k - c| / tau_ranks)``; return ``sum_k w_k L_(k)``.

    The temperature is in **rank units**: a loss's weight falls by a factor ``e`` for every
    ``tau_ranks`` ranks it sits away from the middle, whatever the scale of the losses. As ``tau_ranks -> 0`` the result
    is the median (for even ``n`` the mean of the two middle values, as ``torch.quantile(x, 0.5)``;
    ``torch.median`` would return the lower one), and as ``tau_ranks -> inf`` the mean. To scale with
    the batch, pass a fraction of it (``tau_ranks=0.05 * n``). The weights depend on the ranks only:
    the temperature is a constant (a tensor is read as a number, never differentiated), so the
    gradient of the result with respect to each loss is its weight, and the gradients sum to 1.
    No padding: an even count is not extended with a zero. ``ValueError`` for empty losses or a
    ``tau_ranks`` that is not a finite number > 0.

    This is the article's "soft median" with its biases removed (see the losses page of the docs);
    it has no paper. Peer: none.
    """
    x = _flat_losses(losses, "soft_median")
    tau = _number(tau_ranks, "soft_median", "tau_ranks")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"soft_median: tau_ranks={tau!r} must be a finite number > 0 (a temperature in ranks)")
    n = x.numel()
    ranks = torch.arange(n, device=x.device, dtype=torch.float64)
    w = torch.softmax(-(ranks - (n - 1) / 2.0).abs() / tau, dim=0).to(x.dtype)
    return (torch.sort(x).values * w).sum()


def trimmed_mean(losses: Tensor, q: float) -> Tensor:
    """The mean of the losses with the top and bottom fraction ``q`` dropped ("Olympic scoring").

    Rule: sort the ``n`` losses (all elements, flattened); drop ``k = floor(q n)`` from each end;
    return the mean of the ``n - 2k`` left. ``q = 0`` is the mean; ``q`` close to 0.5 approaches
    the median. The gradient is ``1/(n - 2k)`` for every kept loss and 0 for a dropped one. ``q``
    must be in ``[0, 0.5)`` (``ValueError`` otherwise, and for empty losses). Peer:
    ``scipy.stats.trim_mean`` (the same cut, ``floor(q n)`` from each end), without gradients.
    """
    x = _flat_losses(losses, "trimmed_mean")
    q = _number(q, "trimmed_mean", "q")
    if not (math.isfinite(q) and 0.0 <= q < 0.5):
        raise ValueError(f"trimmed_mean: q={q!r} must be a number in [0, 0.5) (the fraction cut at each end)")
    n = x.numel()
    k = math.floor(q * n)
    return torch.sort(x).values[k : n - k].mean()
