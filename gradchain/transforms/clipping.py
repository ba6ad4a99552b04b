"""Gradient clipping: per unit against the weight (AGC, soft clip), per tensor, and global.

Layout: torch weights are ``(out, in, *kernel)``; a *unit* is a slice along dim 0 (one output
neuron or filter) and per-unit norms reduce over dims 1.. . A tensor with ndim <= 1 is one unit.
Every scale is computed in tensor ops (no host read-back), so it is exact under FSDP2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, Leaf, transform
from ..hyperparams import Hyperparam, positive
from ._global_norm import GlobalNormScale

__all__ = ["adaptive_grad_clip", "clip_by_global_norm", "clip_by_norm", "soft_clip"]

_NORMS = ("l2", "rms")


def _unit_dims(x: Tensor, unit_dim: int, name: str) -> tuple[int, ...]:
    """The dims a per-unit norm of a tensor with ndim > 1 reduces over: all but ``unit_dim``."""
    if not -x.ndim <= unit_dim < x.ndim:
        # a wrapped index would clip along another axis than the one asked for, silently
        raise ValueError(f"{name}: unit_dim={unit_dim} is out of range for a param of shape {tuple(x.shape)} "
                         f"(ndim {x.ndim}: unit_dim must be in [{-x.ndim}, {x.ndim})); give the params whose "
                         "units lie along another axis a transform of their own (gradchain.partition)")
    keep = unit_dim % x.ndim
    return tuple(d for d in range(x.ndim) if d != keep)


def _unit_norm(x: Tensor, dims: tuple[int, ...], rms: bool, dtype: torch.dtype) -> Tensor:
    n = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=dtype if ops.widens(dtype, x.dtype) else None)
    n = n.to(dtype)
    return n / math.sqrt(math.prod([x.shape[d] for d in dims])) if rms else n  # a list: traceable


def _stacked_norms(xs: list[Tensor], ys: list[Tensor], rms: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The norms (or RMS) of whole tensors as two vectors, reduced together (once under FSDP2)."""
    norms = ops.norms([*xs, *ys], dtype)
    if rms:
        norms = torch._foreach_div(norms, [math.sqrt(max(x.numel(), 1)) for x in (*xs, *ys)])
    # the no-op clamp completes a pending FSDP2 reduction here, once, not at each later use
    both = torch.stack(norms).clamp(min=0.0)
    return both[: len(xs)], both[len(xs) :]


def _unitwise_clip(
    name: str, spec: Mapping[str, Hyperparam], norm: str, unit_dim: int, fixed_clip: float | None
) -> Leaf:
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r} must be one of {_NORMS}")
    if isinstance(unit_dim, bool) or not isinstance(unit_dim, int):
        raise TypeError(f"{name}: unit_dim={unit_dim!r} must be an int (the axis of a param's units)")
    rms = norm == "rms"
    eps_key = next(k for k in spec if k.endswith("eps"))

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        # numbers on the eager path, 0-d tensors on the fused one
        clip = fixed_clip if fixed_clip is not None else hp["clip_factor"]
        eps = hp[eps_key]

        def scale(w: Tensor, g: Tensor) -> Tensor:
            # max(||W||, eps) keeps zero-initialised units trainable (NFNets' reason for eps = 1e-3);
            # limit / max(||G||, limit) is exactly 1 where ||G|| <= limit and limit/||G|| elsewhere,
            # and limit > 0 (clip > 0, eps > 0): no zero division, no branch on a value
            limit = w.clamp(min=eps) * clip
            return limit / torch.maximum(g, limit)

        if ctx.segments is not None:
            # the fused path's flat buffer of the vectors (the shapes elementwise_for passes): one
            # unit per param, its norms as segment sums fused into the kernel
            w, g = ctx.tensor_norms([ctx.params[0]], ctx.dtype), ctx.tensor_norms(updates, ctx.dtype)
            if rms:
                count = ctx.tensor_numels(updates).sqrt()
                w, g = w / count, g / count
            return torch._foreach_mul(updates, ctx.per_tensor(scale(w, g)))
        scales: list = [None] * len(updates)
        whole = [i for i, u in enumerate(updates) if u.ndim <= 1]
        if whole:
            # the single-unit tensors' norms in one stack: under FSDP2 one reduction for all of
            # them instead of one per tensor
            w, g = _stacked_norms([ctx.params[i] for i in whole], [updates[i] for i in whole], rms, ctx.dtype)
            for i, s in zip(whole, scale(w, g).unbind(0)):
                scales[i] = s
        for i, u in enumerate(updates):
            if u.ndim > 1:
                dims = _unit_dims(u, unit_dim, name)
                scales[i] = scale(_unit_norm(ctx.params[i], dims, rms, ctx.dtype), _unit_norm(u, dims, rms, ctx.dtype))
        return torch._foreach_mul(updates, scales)

    # a vector is one unit, reduced as a segment of a flat buffer: the fused path compiles the clip
    # with the chain over the vectors' flat buffer, and for one large matrix at a time (its rows
    # reduced in the kernel); smaller matrices clip eagerly. Units along dim 0 are rows: the eager
    # step in pieces gives a large matrix to it in blocks of whole rows
    return transform(name, spec, update=update, elementwise_for=lambda shape: len(shape) <= 1,
                     rowwise=unit_dim == 0)


def adaptive_grad_clip(
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    norm: str = "l2",
    unit_dim: int = 0,
    name: str = "agc",
) -> Leaf:
    """Adaptive gradient clipping: clip each unit's gradient norm to ``clip_factor`` times its weight norm.

    Rule, per unit i (slice ``unit_dim`` of the tensor; the whole tensor when ndim <= 1), with
    ``W*_i = max(||W_i||, eps)``: if ``||G_i|| > clip_factor * W*_i`` then
    ``G_i <- clip_factor * W*_i * G_i / ||G_i||``, else ``G_i`` is unchanged. ``norm="rms"`` uses
    the RMS (norm / sqrt(count)) of both, which only changes where ``eps`` acts. ``unit_dim``
    moves the unit axis of tensors with ndim > 1 that are not stored output-first; a step refuses a
    param with ndim > 1 for which it is out of range (no wrap-around, as torch's dims). Place it
    first in the chain (on the raw gradient); NFNets does not clip the final classifier (use
    ``masked``).
    Group keys: ``clip_factor``, ``agc_eps`` (not ``eps``: that is Adam's). Reference: Brock et al.,
    "High-Performance Large-Scale Image Recognition Without Normalization", arXiv:2102.06171.
    Peer: timm ``adaptive_clip_grad`` (same units for torch layouts); optax ``adaptive_grad_clip``
    reduces JAX (input-first) axes instead.
    """
    spec = {"clip_factor": Hyperparam(clip_factor, positive), "agc_eps": Hyperparam(eps, positive)}
    return _unitwise_clip(name, spec, norm, unit_dim, None)


def soft_clip(eps: float = 1e-3, *, unit_dim: int = 0, name: str = "soft_clip") -> Leaf:
    """The article's soft clip: clip each unit's gradient RMS to its weight's RMS (AGC, lambda = 1, RMS form).

    Rule, per unit: ``rms_w = max(RMS(W_u), eps)``, ``rms_g = max(RMS(G_u), eps)``,
    ``G_u <- G_u * min(rms_g, rms_w) / rms_g``; since both RMS are over the same count this is
    ``adaptive_grad_clip(1.0, eps, norm="rms")``. Default ``eps = 1e-3``, not the article's 1e-12:
    a zero-initialised unit (bias, zero-init gain, LoRA-B) has ``RMS(W) = 0``, so with 1e-12 its
    gradient RMS is clipped to 1e-12 and it never trains under SGD (and crawls under Adam); the
    floor of 1e-3 is AGC's, chosen for exactly this. Group key: ``soft_clip_eps``.
    ``unit_dim`` as in :func:`adaptive_grad_clip`.
    Reference: the article's ``soft_clip``; equals AGC (Brock et al., arXiv:2102.06171) with lambda 1.
    Peer: timm ``adaptive_clip_grad(clip_factor=1)`` up to where eps acts.
    """
    return _unitwise_clip(name, {"soft_clip_eps": Hyperparam(eps, positive)}, "rms", unit_dim, 1.0)


def clip_by_norm(max_norm: float = 1.0, *, name: str = "clip_norm") -> Leaf:
    """Clip each tensor's update to an L2 norm of at most ``max_norm``.

    Rule, per tensor: ``u <- u * max_norm / max(||u||, max_norm)`` (exact: no eps, so a clipped
    tensor has norm ``max_norm``). Group key: ``max_norm``. Reference: Pascanu et al., "On the
    difficulty of training recurrent neural networks", arXiv:1211.5063 (norm clipping). Peer: optax
    ``clip_by_block_rms`` (the RMS form); torch none per tensor.
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        c = float(hp["max_norm"])
        n = torch.stack(torch._foreach_norm(updates))  # one vector: one reduction under FSDP2
        return torch._foreach_mul(updates, list((c / n.clamp(min=c)).unbind(0)))

    return transform(name, {"max_norm": Hyperparam(max_norm, positive)}, update=update)


def _global_clip_scale(n: Tensor, hp: Mapping) -> Tensor:
    c = float(hp["max_norm"])
    return c / n.clamp(min=c)


def clip_by_global_norm(max_norm: float = 1.0, *, name: str = "clip_global_norm") -> GlobalNormScale:
    """Clip the update so its L2 norm over *all* params (every group, device and dtype) is at most ``max_norm``.

    Rule: ``n = sqrt(sum_i ||u_i||^2)`` over every tensor the optimizer steps; each update
    ``u <- u * max_norm / max(n, max_norm)``, where ``max_norm`` is the tensor's group value.
    One global reduction per step, in tensor ops (no ``.item()``): under FSDP2 it is the full
    model's norm. Inside ``masked``/``partition`` it is the norm over the params routed to it.
    Under ZeroRedundancyOptimizer it would be per partition: unsupported there.
    Group key: ``max_norm``. Reference: Pascanu et al., arXiv:1211.5063. Peer: optax
    ``clip_by_global_norm`` (the same rule); torch ``nn.utils.clip_grad_norm_`` divides by
    ``n + 1e-6`` instead of ``n`` (a relative difference of about 1e-6 / n).
    """
    return GlobalNormScale(name, {"max_norm": Hyperparam(max_norm, positive)}, _global_clip_scale)
