"""Grünwald–Letnikov fractional-order gradient: a weighted memory of the last K gradients."""

from __future__ import annotations

import random
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._dtensor import replicate_like
from ..base import Bucket, HostStep, Leaf, transform, zeros_state
from ..hyperparams import Hyperparam

__all__ = ["fractional", "gl_coefficients", "gl_weights"]


def _order(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        return "must be a number in (0, 1]"
    return None


def gl_coefficients(q: float, n: int) -> list[float]:
    """The Grünwald–Letnikov coefficients of order ``q``: ``[c_0, ..., c_n]``, ``c_j = (-1)^j C(q, j)``.

    Recursion: ``c_0 = 1``, ``c_j = (1 - (q + 1)/j) c_{j-1}``. ``c_j`` weighs the sample ``j``
    steps back (``j = 0`` is the newest): the GL derivative of order ``q`` of a sequence ``x`` is
    ``sum_j c_j x_{t-j}`` (per unit step). ``q = 0`` gives ``[1, 0, 0, ...]`` (the identity),
    ``q = 1`` gives ``[1, -1, 0, ...]`` (a backward difference), and ``q`` in ``(-1, 0)`` (a
    fractional *integral* of order ``-q``) gives positive, decaying weights. Any real ``q``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid n={n!r}: must be an int >= 0")
    c = [1.0]
    for j in range(1, n + 1):
        c.append((1.0 - (q + 1.0) / j) * c[-1])
    return c


def gl_weights(alpha: float, history: int) -> list[float]:
    """The memory weights of :func:`fractional`: ``[w_0, ..., w_K]``, ``w_j = c_j(alpha - 1) / (j + 1)``.

    Recursion (FCGD_G-L's, as a third-party summary gives it): ``w_0 = 1``,
    ``w_j = (1 - (alpha + 1)/(j + 1)) w_{j-1}``. In terms of the Grünwald–Letnikov coefficients
    ``c_j(q) = (-1)^j C(q, j)`` (:func:`gl_coefficients`) this is
    ``w_j = c_j(alpha - 1) / (j + 1) = c_{j+1}(alpha) / c_1(alpha)``: the coefficients of order
    ``q = alpha - 1`` applied to the gradient history (``j = 0`` the newest gradient), damped by
    ``1/(j + 1)``. Positive and decaying for alpha in (0, 1); all zero beyond ``w_0`` for
    alpha = 1, since ``c(0) = [1, 0, 0, ...]``.
    """
    w = [1.0]
    for j in range(1, history + 1):
        w.append((1.0 - (alpha + 1.0) / (j + 1.0)) * w[-1])
    return w


def _mix(*parts: int) -> int:
    h = 0x345678
    for x in parts:
        h = (h * 1000003 ^ (x & 0xFFFFFFFFFFFF)) & 0x7FFFFFFFFFFFFFFF
    return h


def _drop_mask(full_shape: torch.Size, history: int, drop: int, seed: int) -> Tensor:
    """A (K, *full_shape) bool keep-mask on the CPU: each element drops its own ``drop`` random terms."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand((history, *full_shape), generator=gen, dtype=torch.float64)
    kth = r.kthvalue(drop, dim=0, keepdim=True).values
    return r > kth


def _like(mask: Tensor, u: Tensor) -> Tensor:
    """``mask`` (drawn over the full logical tensor) on ``u``'s device, sliced like ``u`` under FSDP2."""
    mask = mask.to(device=u.device, dtype=u.dtype)
    full = replicate_like(mask, u)
    return full if full is mask else full.redistribute(u.device_mesh, u.placements)


def fractional(
    alpha: float = 0.9,
    history: int = 10,
    drop: int = 1,
    *,
    per_element: bool = False,
    seed: int = 0,
    name: str = "fractional",
) -> Leaf:
    """Grünwald–Letnikov fractional gradient: the update plus a weighted memory of the last K updates.

    Rule: ``D_t = u_t + sum_{j=1..K} c_j w_j u_{t-j}`` with ``w_0 = 1``,
    ``w_j = (1 - (alpha+1)/(j+1)) w_{j-1}`` (:func:`gl_weights`; missing history counts as 0).

    Convention: alpha is the order of the fractional derivative of the *loss*. The gradient
    already carries one derivative, so the operator applied to the gradient history has order
    ``q = alpha - 1 <= 0`` (a fractional integral: memory with positive weights). In
    Grünwald–Letnikov form ``w_j = (-1)^j C(alpha - 1, j) / (j + 1)`` (:func:`gl_coefficients`,
    ``j = 0`` the newest gradient; the ``1/(j + 1)`` damping comes with the recursion). So alpha = 1
    is order 0 on the history, ``D_t = u_t``: plain SGD (plain Adam in ``fractional_adam``). The
    textbook coefficients of order alpha applied to the history would instead give
    ``g_t - g_{t-1}`` at alpha = 1.

    ``c`` drops ``drop`` of the K memory terms each step at random
    (the paper's "small disturbance"): with ``per_element=False`` one draw per step shared by all
    tensors, with ``per_element=True`` each element draws its own, over the full logical tensor
    (sliced under FSDP2). The draws come from ``seed``, the step and (per element) the param's name,
    so they are the same on every rank and after a resume. Group key ``frac_alpha``; K (``history``) is structural (K
    buffers of param size). On the fused path (``per_element=False``) it compiles with its chain:
    ``host_step`` gives the kernel this step's weights and the K buffers in order of age.
    Reference: Zhou, Zhao, Huang, "A Deep Learning Optimizer Based on
    Grünwald–Letnikov Fractional Order Definition", Mathematics 11(2):316, 2023 (FCGD_G-L). No peer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"invalid seed={seed!r}: must be an int")
    if isinstance(history, bool) or not isinstance(history, int) or history < 1:
        raise ValueError(f"invalid history={history!r}: must be an int >= 1")
    if isinstance(drop, bool) or not isinstance(drop, int) or not 0 <= drop <= history:
        raise ValueError(f"invalid drop={drop!r}: must be an int in [0, history={history}]")
    K = history
    # the keys as strings made here: in a kernel compiled with symbolic sizes (past the first few
    # param groups) an int of the closure may be traced as a symbol, and a key formatted from it fails
    ages = [f"age{j}" for j in range(1, K + 1)]

    def init(p: Tensor) -> dict:
        return {f"hist{j}": zeros_state(p) for j in range(K)}

    def ring(hp: Mapping, t: int) -> HostStep:
        # slot (t - 1 - j) % K holds g_{t-j}; slot (t - 1) % K, the oldest (age K), is overwritten
        w = gl_weights(float(hp["frac_alpha"]), K)
        keep = [1.0] * (K + 1)
        if drop and not per_element:
            for j in random.Random(_mix(seed, t)).sample(range(1, K + 1), drop):
                keep[j] = 0.0
        return HostStep({"weights": [w[j] * keep[j] for j in range(1, K + 1)]},
                        {f"age{j}": f"hist{(t - 1 - j) % K}" for j in range(1, K + 1)})

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        weights = [v["weights"] for v in ctx.host_values]
        masks = None
        if drop and per_element:
            masks = []
            for u, n, t in zip(updates, ctx.names, ctx.step_values):
                tag = zlib.crc32(n.encode()) if n is not None else 0
                masks.append(_drop_mask(u.shape, K, drop, _mix(seed, int(t), tag)))
        out = [u.clone() for u in updates]
        for j, age in enumerate(ages):
            coefs = [w[j] for w in weights]
            if all(isinstance(c, float) and c == 0.0 for c in coefs):
                continue  # a dropped term, or alpha = 1: nothing to add (and no pass over it)
            past = state[age]
            if masks is not None:
                past = torch._foreach_mul(past, [_like(m[j], u) for m, u in zip(masks, updates)])
            ops.axpy_(out, past, coefs)
        # g_t overwrites g_{t-K}; a loop because DTensor has no sharding rule for _foreach_copy_
        for h, u in zip(state[ages[-1]], updates):
            h.copy_(u)
        return out

    # per-element draws are full-size host tensors: only the shared draw compiles (elementwise)
    return transform(name, {"frac_alpha": Hyperparam(alpha, _order)}, init, update, host_step=ring,
                     elementwise=not per_element)
