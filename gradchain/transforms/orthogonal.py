"""Orthogonalized updates (Muon's core): Newton–Schulz iteration and the shape scaling rules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._dtensor import gather
from ..base import Bucket, Leaf, transform
from ..hyperparams import Hyperparam, nonnegative

__all__ = ["newton_schulz", "orthogonalize", "scale_by_shape"]

# Keller Jordan's quintic coefficients, chosen to maximize the slope at zero (also torch.optim.Muon's)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _check_ns_steps(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 100:
        return "must be an int in [1, 99]"
    return None


def _check_coefficients(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return "must be three numbers (a, b, c)"
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in value):
        return "must be three finite numbers (a, b, c)"
    return None


def _check_adjust_lr_fn(value: Any) -> str | None:
    return None if value in ADJUST_LR_FNS else f"must be one of {ADJUST_LR_FNS}"


def newton_schulz(
    x: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalize a matrix (conv weights flattened to ``(out, in·k…)``): ``≈ U Vᵀ``.

    ``X = x / max(‖x‖_F, eps)`` (transposed when tall), then ``steps`` times
    ``A = X Xᵀ; X = a X + (b A + c A²) X``; the result has ``x``'s shape and ``dtype`` (``None``:
    ``x``'s dtype). The op sequence is torch.optim.Muon's, so in bf16 the rounding matches it.
    Singular values land in about [0.7, 1.2], not exactly 1 (the coefficients trade accuracy for speed).
    """
    a, b, c = coefficients
    shape = x.shape
    # math.prod, not -1: an empty matrix has no inferable width
    X = x.reshape(shape[0], math.prod(shape[1:])) if x.ndim > 2 else x
    X = X.to(dtype) if dtype is not None else X
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    if tall:
        X = X.T
    return X.reshape(shape)


def _orthogonalize_one(u: Tensor, steps: int, coeffs: tuple, eps: float, dtype: torch.dtype | None) -> Tensor:
    placements = getattr(u, "placements", None)
    if placements is None:
        return newton_schulz(u, steps, coeffs, eps, dtype).to(u.dtype)
    # a DTensor shard: gather the whole matrix (one all-gather), run the same math on every rank,
    # keep the local rows (Replicate -> Shard is a local slice). Never per-shard math.
    out = newton_schulz(gather(u), steps, coeffs, eps, dtype).to(u.dtype)
    return out.redistribute(u.device_mesh, placements)


def check_iteration_dtype(dtype: Any, key: str = "dtype") -> None:
    """Refuse a Newton–Schulz dtype that is neither None nor a floating torch.dtype (a string, say)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"invalid {key}={dtype!r}: must be a floating torch.dtype (torch.bfloat16, torch.float32, "
                         "...) or None for the update's own dtype")


def orthogonalize(
    ns_steps: int = 5,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    name: str = "orthogonalize",
) -> Leaf:
    """Replace each matrix update by its Newton–Schulz orthogonalization (Muon's core).

    Rule: ``u <- NS_{ns_steps}^{(a,b,c)}(u; eps)`` per tensor (see :func:`newton_schulz`); conv
    weights are flattened to ``(out, in·k…)``, tall matrices transposed. ``dtype`` is the
    iteration's precision: bf16 by default like torch.optim.Muon, ``torch.float32`` /
    ``torch.float64`` on request, ``None`` for the update's own dtype. Params with ndim < 2 are an
    error: route them elsewhere with ``partition``. Each result is written into its own update
    (``inplace``): one matrix's iteration at a time. Under FSDP2 the full matrix is gathered, so a
    sharded run equals a one-process run. Reference: Jordan et al., "Muon" (kellerjordan.github.io/
    posts/muon); Bernstein & Newhouse, arXiv:2409.20325. Peer: torch ``Muon``, optax ``contrib.muon``.
    """

    check_iteration_dtype(dtype)

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        steps, eps_ = int(hp["ns_steps"]), float(hp["eps"])
        coeffs = tuple(float(x) for x in hp["ns_coefficients"])
        for u, n in zip(updates, ctx.names):
            if u.ndim < 2:
                who = n if n is not None else f"of shape {tuple(u.shape)}"
                raise ValueError(
                    f"{name}(): param {who} has {u.ndim} dims; Newton–Schulz needs a matrix "
                    "(route 0-d/1-d params to another transform with partition())"
                )
        # each result into its own update (owned: inplace=True), so a step holds one matrix's
        # iteration at a time beside the updates, not a second set of model-sized updates
        for u in updates:
            u.copy_(_orthogonalize_one(u, steps, coeffs, eps_, dtype))
        return updates

    spec = {
        "ns_steps": Hyperparam(ns_steps, _check_ns_steps),
        "ns_coefficients": Hyperparam(tuple(ns_coefficients), _check_coefficients),
        "eps": Hyperparam(eps, nonnegative),
    }
    return transform(name, spec, None, update, inplace=True, per_tensor=True)


def shape_ratio(shape: torch.Size | tuple, adjust_lr_fn: str | None) -> float:
    """Muon's lr factor for an ``(A, B·k…)`` matrix.

    Keller's ``sqrt(max(1, A/B))`` (None / ``"original"``) or Moonlight's ``0.2 sqrt(max(A, B))``.
    """
    if len(shape) < 2:
        raise ValueError(f"scale_by_shape(): a param of shape {tuple(shape)} is not a matrix; use partition()")
    A, B = shape[0], math.prod(shape[1:])
    if not A or not B:
        return 1.0  # an empty matrix: nothing to scale
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, A / B))
    return 0.2 * math.sqrt(max(A, B))


def scale_by_shape(adjust_lr_fn: str | None = None, *, name: str = "shape_scale") -> Leaf:
    """Scale each orthogonalized update by a factor of its shape ``(A, B)`` (conv: ``B = in·k…``).

    Rule: ``u <- r u`` with ``r = sqrt(max(1, A/B))`` for ``adjust_lr_fn`` None / ``"original"``
    (Keller Jordan) or ``r = 0.2 sqrt(max(A, B))`` for ``"match_rms_adamw"`` (Moonlight: the update
    RMS matches AdamW's, so AdamW's lr and weight decay carry over). Fused into the final write.
    Reference: Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982. Peer: torch
    ``Muon(adjust_lr_fn=...)``.
    """
    spec = {"adjust_lr_fn": Hyperparam(adjust_lr_fn, _check_adjust_lr_fn)}
    return transform(
        name, spec, scale=lambda hp, ctx: [shape_ratio(p.shape, hp["adjust_lr_fn"]) for p in ctx.params],
        per_tensor=True,
    )
