"""Gradient Centralization: remove each output unit's mean from the gradient."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..base import Bucket, Leaf, transform

__all__ = ["centralize"]


def centralize(min_ndim: int = 2, *, name: str = "centralize") -> Leaf:
    """Subtract from each output unit's gradient its mean over dims 1.. (torch layout ``(out, in, *k)``).

    Rule: for a tensor with ``ndim >= min_ndim`` and more than one element per unit,
    ``G <- G - mean_{dims 1..}(G)`` (kept per slice of dim 0); other tensors (biases, norm
    gains, scalars, ``(n, 1)`` weights whose units would become identically 0) pass unchanged.
    ``min_ndim=4`` is the paper's GC-for-conv-only ("GCC") variant. Place it on the raw gradient,
    before momentum or Adam. Reference: Yong et al., "Gradient Centralization", arXiv:2004.01461.
    Peer: pytorch_optimizer ``centralize_gradient`` (same units); optax ``centralize`` keeps axis 0
    too, which for JAX's ``(in, out)`` kernels is per input row, not per neuron.
    """
    if not isinstance(min_ndim, int) or min_ndim < 2:
        raise ValueError(f"min_ndim={min_ndim!r} must be an int >= 2 (a unit needs dims beyond dim 0)")

    def centered(shape: tuple[int, ...]) -> bool:
        return len(shape) >= min_ndim and math.prod(shape[1:]) > 1

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        idx = [i for i, u in enumerate(updates) if centered(u.shape)]
        if not idx:
            return updates
        picked = [updates[i] for i in idx]
        means = [u.mean(dim=tuple(range(1, u.ndim)), keepdim=True) for u in picked]
        out = list(updates)
        for i, c in zip(idx, torch._foreach_sub(picked, means)):
            out[i] = c
        return out

    # the identity for the other shapes: the fused path compiles it into the kernel of the chain's
    # elementwise transforms, over a flat buffer of those params, and one large param at a time
    # for the shapes it centers (the row means and the rest of the chain in one kernel)
    # (and row by row: the eager step in pieces gives it blocks of whole rows of a large matrix)
    return transform(name, update=update, elementwise_for=lambda shape: not centered(shape), rowwise=True)
