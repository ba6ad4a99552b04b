"""SMMF: square-matricized rank-1 NNMF of both moments, with the momentum's signs bit-packed."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .._dtensor import gather, replicate_like
from ..base import Bucket, Leaf, compute_dtype, transform
from ..hyperparams import Hyperparam, closed_unit_interval, nonnegative, number, unit_interval
from ._smmf_steps import TensorStep, step_eager, step_traced

__all__ = ["pack_signs", "scale_by_smmf", "square_shape", "unpack_signs"]


def square_shape(numel: int) -> tuple[int, int]:
    """The most square (rows, cols) with rows * cols = numel: cols is the largest divisor <= sqrt(numel)."""
    for c in range(max(math.isqrt(numel), 1), 0, -1):
        if numel % c == 0:
            return numel // c, c
    return 1, 1


def pack_signs(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, 8 elements per byte (element 8k+j is bit j of byte k)."""
    flat = mask.reshape(-1).view(torch.uint8)  # a bool is one byte holding 0 or 1: no copy
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_signs`: the first ``numel`` bits as a flat bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1)
    return bits.view(torch.bool).reshape(-1)[:numel]


# -- the transform --------------------------------------------------------------------------------
def _local(t: Tensor) -> Tensor:
    # a replicated DTensor's local tensor is its whole value (a view: in-place writes reach it)
    return t.to_local() if hasattr(t, "to_local") else t


def _zeros(p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    # small factors of the whole (square-matricized) tensor: replicated under FSDP2
    return replicate_like(torch.zeros(shape, dtype=dtype, device=p.device), p)


def _like_param(u: Tensor, p: Tensor) -> Tensor:
    placements = getattr(p, "placements", None)
    return u if placements is None else u.redistribute(placements=p.placements)


def _never_elementwise(shape: tuple[int, ...]) -> bool:
    """SMMF's ``elementwise_for``: no shape (the square reshape mixes every element of a tensor), so
    the fused path compiles it one large param at a time and runs it eagerly over the others."""
    return False


@functools.lru_cache(maxsize=1024)  # called per param and step: the divisor search once per shape
def _square_view(shape: tuple[int, ...]) -> tuple[int, ...]:
    """SMMF's ``tensor_view``: the square matrix it works on (:func:`square_shape`)."""
    return square_shape(math.prod(shape))


def scale_by_smmf(
    beta: float = 0.9,
    growth_rate: float = 0.999,
    decay_rate: float = -0.5,
    eps: float = 1e-8,
    *,
    name: str = "smmf",
) -> Leaf:
    """SMMF: Adam-like scaling with both moments stored as rank-1 factors of a square matrix.

    Rule, per tensor reshaped to the most square (r, c) (:func:`square_shape`, whatever its
    ndim): decompress ``M = sign * (m_r m_c^T)``, ``V = v_r v_c^T``;
    ``b1 = beta growth_rate^(t-1)``, ``M <- b1 M + (1 - b1) G``; ``b2 = 1 - t^decay_rate``,
    ``V <- b2 V + (1 - b2) G^2``; ``u = M / (sqrt(V) + eps)`` from the uncompressed M, V; then
    compress: ``sign = M > 0`` (bit-packed, 1 bit per element, uint8) and rank-1 NNMF of |M| and
    V (row sums; column sums over the total). No bias correction of M (u_1 ~ 0.1 sign(g)).
    Memory per tensor: 2(r + c) floats + numel/8 bytes (~0.04x of fp32 params).
    Eagerly a large tensor is stepped a block of rows at a time (nothing but the update is
    model-sized); on the fused path each large param is compiled alone (``elementwise_for``: no
    shape), the smaller ones run eagerly.
    Under FSDP2 the gradient is gathered (the square reshape mixes shards) and the small state is
    replicated. Reference: Park & Lee, arXiv:2412.08894 (AAAI 2025); official eai-lab/SMMF
    (bool signs, 1 byte per element; ``vector_reshape=True`` behaviour). Peer: none installed.
    """

    def init(p: Tensor) -> dict:
        r, c = square_shape(p.numel())
        dt = compute_dtype(p.dtype)
        return {
            "m_row": _zeros(p, (r,), dt),
            "m_col": _zeros(p, (c,), dt),
            "sign": _zeros(p, ((p.numel() + 7) // 8,), torch.uint8),
            "v_row": _zeros(p, (r,), dt),
            "v_col": _zeros(p, (c,), dt),
        }

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        traced = ctx.tensor_scalars
        beta, growth, decay, eps = (hp[k] if traced else float(hp[k])
                                    for k in ("beta", "growth_rate", "decay_rate", "eps"))
        us: list[Tensor] = []
        ts: list[TensorStep] = []
        for i, g in enumerate(updates):
            t = ctx.step_values[i]
            b1 = beta * growth ** (t - 1.0)
            b2 = 1.0 - t**decay
            sign, m_row, m_col, v_row, v_col = (
                _local(state[k][i]) for k in ("sign", "m_row", "m_col", "v_row", "v_col"))
            # the math runs on plain tensors: under FSDP2 the gathered gradient and the state are
            # replicated, so each rank holds their whole value. (r, c) from the state, not from
            # square_shape (a search over divisors would guard on a symbolic size); flat first, as
            # a reshape between two shapes guards on how their sizes relate
            gm = _local(gather(g)).reshape(-1).view(m_row.shape[0], m_col.shape[0])
            if traced:
                us.append(step_traced(gm, sign, m_row, m_col, v_row, v_col, b1, b2, eps))
            else:
                ts.append(TensorStep(gm, (sign, m_row, m_col, v_row, v_col), b1, b2))
        if ts:
            step_eager(ts, eps)
            us = [t.u for t in ts]
        return [_like_param(replicate_like(u.reshape(g.shape), g), g) for u, g in zip(us, updates, strict=True)]

    spec = {
        "beta": Hyperparam(beta, unit_interval),
        "growth_rate": Hyperparam(growth_rate, closed_unit_interval),
        "decay_rate": Hyperparam(decay_rate, _check_decay_rate),
        "eps": Hyperparam(eps, nonnegative),
    }
    return transform(name, spec, init, update, elementwise_for=_never_elementwise, tensor_view=_square_view)


def _check_decay_rate(value: object) -> str | None:
    if number(value) is not None or not -1.0 <= float(value) <= 0.0:  # type: ignore[arg-type]
        return "must be a number in [-1, 0] (beta2_t = 1 - t**decay_rate)"
    return None
