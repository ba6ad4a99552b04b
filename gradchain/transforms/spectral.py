"""A warmup-free bound on each weight matrix's step, relative to its spectral norm (AdamW^2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._dtensor import gather
from ..base import Bucket, Leaf, compute_dtype, transform
from ..hyperparams import Hyperparam, positive

__all__ = ["spectral_lr_bound"]


def _as_matrix(t: Tensor) -> Tensor:
    """A weight as a matrix ``(out, in * kernel...)``: conv kernels are flattened as Muon does."""
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


# every placement Replicate when a DTensor (a pending reduction is done once here)
_replicated = gather


def power_iteration(matrix: Tensor, v: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """The top singular value of ``matrix`` and the refined right singular vector, from a start ``v``.

    ``iters`` rounds of ``v <- M^T M v / ||M^T M v||`` (``v`` kept where that is 0), then
    ``sigma = ||M v||``. With ``||v|| = 1`` the estimate never exceeds the true ``sigma_1`` and
    converges to it at the rate ``(sigma_2/sigma_1)^(2 iters)``; a vector kept from the last step
    makes a few rounds enough when the matrix changes slowly. Works on DTensors (sharded rows, a
    replicated ``v``): matrix-vector products and norms only, the result is replicated.
    """
    # traced (the fused path), each product is a one-column matrix product: torch.compile turns
    # ``M @ v`` into a reduction of its own that recomputes M from its inputs on every pass (the
    # whole Adam step, when M is the update) and reads M^T down its columns; ``mm`` is a BLAS call
    # on M stored once (the sums of ``M @ v``, bit for bit with MKL on a CPU)
    mv = _mm_vec if torch.compiler.is_compiling() else torch.matmul
    for _ in range(iters):
        w = _replicated(mv(matrix.T, mv(matrix, v)))
        n = torch.linalg.vector_norm(w)
        v = torch.where(n > 0, w / n, v)
    return torch.linalg.vector_norm(mv(matrix, v)), v


def _mm_vec(matrix: Tensor, v: Tensor) -> Tensor:
    return torch.mm(matrix, v.unsqueeze(1)).squeeze(1)


def _start_vector(param: Tensor) -> Tensor:
    """A fixed pseudo-random unit vector of length ``in * kernel``: the same on every rank and every run."""
    n = math.prod(param.shape[1:])
    gen = torch.Generator().manual_seed(0x5EC7 + n)
    v = torch.randn(n, generator=gen, dtype=torch.float64)
    v = v / v.norm() if n else v  # a zero-length vector for an (out, 0) matrix
    v = v.to(dtype=compute_dtype(param.dtype), device=param.device)
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate

        v = DTensor.from_local(v, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return v


def _unbounded(shape: tuple[int, ...]) -> bool:
    """Whether the bound leaves a param of this shape alone (0-d and 1-d params): the fused path's
    ``elementwise_for`` test, under which the transform is the identity."""
    return len(shape) < 2


def _check_power_iters(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid power_iters={value!r}: must be an int >= 1")


def spectral_lr_bound(tau: float = 0.02, power_iters: int = 2, *, name: str = "spectral") -> Leaf:
    """Cap each weight matrix's step so that ``sigma_1(step) <= tau sigma_1(W)`` (warmup-free training).

    Rule, for every param with ``ndim >= 2`` (conv kernels as ``(out, in * kernel)``):
    ``u <- u min(1, tau sigma_1(W) / sigma_1(u))``, with ``W`` the param before the step; ``u`` is
    left as it is where ``sigma_1(W) = 0`` (a zero-initialised matrix would otherwise never move)
    or ``sigma_1(u) = 0``. 0-d and 1-d params (biases, norm gains) are not bounded. By Weyl's
    inequality the top singular value then changes by at most a fraction ``tau`` per step.

    Place it **last**, after ``scale_by_lr``: it then bounds the step itself, ``p_new - p``
    (weight decay included), which equals the paper's rule ``lr_t = min(lr, tau sigma_1(W) /
    sigma_1(U))`` for the optimizer's direction ``U`` when there is no decay; it needs no lr.
    Placed before ``scale_by_lr`` it would bound the direction instead, and ``tau`` would have to
    absorb the lr.

    ``sigma_1`` comes from ``power_iters`` rounds of power iteration per step for each of ``W``
    and ``u``, warm-started from the right singular vectors kept in the state (``param_vector``,
    ``update_vector``: two vectors of length ``in * kernel`` per matrix, ~0x memory), initialised
    to a fixed pseudo-random unit vector so that every run and every rank starts alike. Power
    iteration underestimates ``sigma_1``, so the bound holds to its accuracy. Under FSDP2 the
    vectors are replicated and the products are DTensor ops: no host sync, the same result as one
    process.

    On the fused path (``ChainOptimizer(fused=True)``) the transform is elementwise for 0-d and
    1-d params (the identity): those compile with the rest of the chain over one flat buffer. A
    matrix of at least ``fused.runner.PER_TENSOR_MIN_NUMEL`` elements compiles one at a time, the
    whole chain in one graph (AdamW's step, the power iterations as BLAS matrix-vector products,
    the capped write; ``tau`` a tensor, so a new value does not recompile); smaller ones run the
    bound eagerly. The numbers and the state are the eager path's: checkpoints cross the paths.

    ``tau`` (group key ``spectral_tau``) has **no published universal default**: the paper tunes
    this threshold per architecture. The default 0.02 (the top singular value may change by at
    most 2% per step) is this library's choice: it leaves ordinary late-training steps alone and
    caps the large early ones that warmup usually absorbs; tune it. Reference: Qi et al., "Taming
    Transformer Without Using Learning Rate Warmup" (AdamW^2), arXiv:2505.21910, ICLR 2025. The
    rule's form is from the paper; power iteration with two rounds follows a secondary account of
    it. No peer.
    """
    _check_power_iters(power_iters)

    def init(p: Tensor) -> dict:
        if p.ndim < 2:
            return {}
        return {"param_vector": _start_vector(p), "update_vector": _start_vector(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        tau = hp["spectral_tau"]  # a number, or a 0-d float64 tensor on the fused path
        out = list(updates)
        pv, uv = state.get("param_vector"), state.get("update_vector")
        for i, (u, p) in enumerate(zip(updates, ctx.params)):
            if u.ndim < 2 or not u.numel():  # left alone (the fused path's flat buffer of them too)
                continue
            w = _as_matrix(p).to(ctx.dtype)
            s_w, v_w = power_iteration(w, pv[i], power_iters)
            s_u, v_u = power_iteration(_as_matrix(u), uv[i], power_iters)
            pv[i].copy_(v_w)
            uv[i].copy_(v_u)
            # a tensor tau (fused) in the norms' dtype, as a number is applied: the eager path's ratio
            t = tau.to(s_w.dtype) if isinstance(tau, Tensor) else tau
            ratio = torch.where((s_w > 0) & (s_u > 0), (t * s_w / s_u).clamp(max=1.0), 1.0)
            # in place: a fresh model-sized buffer each step costs page faults on a CPU (more than its pass)
            out[i] = u.mul_(ratio)
        return out

    return transform(name, {"spectral_tau": Hyperparam(tau, positive)}, init, update, inplace=True,
                     elementwise_for=_unbounded)
