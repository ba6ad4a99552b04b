"""List ops whose scalars may be Python numbers or 0-d tensors, and the moment rules built on them.

A transform's update runs on two paths with one body of math. On the eager path its scalars
(hyperparameters, bias corrections) are Python floats and these ops are ``torch._foreach_*`` calls.
On the fused path (``ChainOptimizer(fused=True)``) the scalars are 0-d tensors, so that a new
learning rate or step count does not recompile: the ops then use tensor-scalar forms that
``torch.compile`` fuses into one kernel. In an eager step traced by a user's ``torch.compile`` the
hyperparameters are numbers a scheduler may change: the ops then multiply by them as tensor
operands, one op per tensor, which keeps them symbolic (see ``_traced_number``).

A scalar argument may also be a list with one entry per tensor (per-tensor step counts).
:func:`reduce_dims` is a reduction of one tensor whose compiled form Adafactor and SM3 share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._dtensor import replicate_like

__all__ = [
    "add_",
    "addcdiv_",
    "addcmul_",
    "atan2_nonneg_",
    "atan2_nonneg_polynomial",
    "axpy_",
    "bias_correction",
    "div_",
    "lerp_",
    "mul_",
    "reduce_dims",
    "softplus_nonneg",
    "softplus_nonneg_polynomial",
    "norms",
    "sqrt",
    "update_moment",
    "update_moment_per_elem_norm",
    "widens",
]

Scalar = Any  # float | Tensor (0-d) | list of either, one per tensor


def widens(dtype: torch.dtype | None, like: torch.dtype) -> bool:
    """Whether a reduction of ``like`` tensors may accumulate in ``dtype`` (``dtype=`` of a norm): it
    must not narrow them (fp32 params under ``state_dtype=torch.bfloat16``: torch refuses that)."""
    return dtype is None or torch.promote_types(like, dtype) == dtype


def norms(xs: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """The L2 norm of each tensor in ``xs``, in ``dtype``: accumulated in it where it is at least as
    wide as the tensors (fp32 norms of bf16 params), else in their own dtype and then cast."""
    # a list holds one dtype, or two (a bucket's params, then its updates): its ends tell
    if not xs or (widens(dtype, xs[0].dtype) and widens(dtype, xs[-1].dtype)):
        return list(torch._foreach_norm(xs, 2, dtype=dtype))
    return [n.to(dtype) for n in torch._foreach_norm(xs, 2)]


def _is_tensor(s: Scalar) -> bool:
    return isinstance(s, Tensor) or (isinstance(s, list) and bool(s) and isinstance(s[0], Tensor))


def _each(s: Scalar, n: int) -> list:
    return s if isinstance(s, list) else [s] * n


def _traced_number(s: Scalar) -> bool:
    """Whether ``s`` is a number (or a list of numbers) in a step that ``torch.compile`` traces (the
    eager path inside a user's compiled training step). A number that changes from step to step
    (a scheduled lr) is then a symbolic float: a list op or a ``value=``/``alpha=``/``lerp`` weight
    specializes it to its value, so every new value recompiles, and with torch 2.13's FX graph
    cache a recompiled graph can be served the kernels of the previous value (AdamW's decay
    ``1 - lr wd`` of the step before). The ops then multiply by it as a tensor operand, which
    torch.compile keeps symbolic."""
    return not _is_tensor(s) and torch.compiler.is_compiling()


def _per_tensor(s: Scalar) -> bool:
    """Whether a list op with scalar ``s`` runs as one op per tensor: a list of 0-d tensors, or any
    scalar in a traced step (a list op there would fix a number, or a 0-d tensor's value, to what
    it is now; the compiler fuses the per-tensor ops as it fuses a list op)."""
    return (isinstance(s, list) and _is_tensor(s)) or torch.compiler.is_compiling()


def sqrt(s: Scalar) -> Scalar:
    """``sqrt`` of a scalar of any kind (float, 0-d tensor or a list of them)."""
    if isinstance(s, list):
        return [sqrt(x) for x in s]
    return s.sqrt() if isinstance(s, Tensor) else math.sqrt(s)


def bias_correction(beta: Scalar, step: Scalar) -> Scalar:
    """``1 - beta**step``: Adam's bias correction for an EMA with decay ``beta``."""
    if isinstance(step, list):
        return [bias_correction(beta, t) for t in step]
    if isinstance(step, Tensor) and _traced_number(beta):
        # a number to a tensor's power would fix a traced beta to its value (see _traced_number)
        return 1.0 - (torch.ones_like(step) * beta) ** step
    return 1.0 - beta**step


# dtypes whose multiplication by a Python number equals that by a 0-d tensor of their own dtype
# (fp16/bf16 multiply by the number in fp32)
_OWN_PRECISION_FACTOR = (torch.float32, torch.float64)


def mul_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x * s``."""
    if _per_tensor(s):
        for x, a in zip(xs, _each(s, len(xs))):
            x.mul_(a)
    else:
        torch._foreach_mul_(xs, _own_scalar(xs, s))


def _own_scalar(xs: list[Tensor], s: Scalar) -> Scalar:
    """``s`` as the factor or divisor of a list op over ``xs``: a number on plain CPU tensors as one
    0-d tensor of their dtype (the same bits: a foreach op there wraps a number into a tensor and
    converts it again for every tensor, about 1-3 us each, most of the op's time on a small
    tensor; an addition converts a 0-d tensor too: :func:`add_` passes a list of it)."""
    if isinstance(s, float) and _plain_cpu(xs):
        return torch.tensor(s, dtype=xs[0].dtype)
    if isinstance(s, Tensor) and hasattr(s, "device_mesh") and xs and not hasattr(xs[0], "device_mesh"):
        # a statistic over sharded and plain buckets alike (AdamS's mean, under FSDP2 with ignored
        # params) scaling a plain bucket: its full value, the same on every rank
        return s.full_tensor()
    if isinstance(s, Tensor) and xs and hasattr(xs[0], "device_mesh") and not hasattr(s, "device_mesh"):
        return replicate_like(s, xs[0])  # (a 0-d plain statistic, the same on every rank)
    return s


def _plain_cpu(xs: list[Tensor]) -> bool:
    """Plain CPU tensors of fp32/fp64, outside a trace (a DTensor takes no plain tensor as a factor)."""
    if not xs or torch.compiler.is_compiling():
        return False
    x = xs[0]
    return x.device.type == "cpu" and x.dtype in _OWN_PRECISION_FACTOR and not hasattr(x, "device_mesh")


def sums_nonneg(xs: list[Tensor]) -> list[Tensor]:
    """Each tensor's sum, for tensors without negative entries (so their L1 norms): on plain CPU
    tensors a sum each, half the time of torch's list L1 norm there; elsewhere that list norm (one
    launch on a GPU, a DTensor reduction under FSDP2)."""
    if _plain_cpu(xs):
        return [x.sum() for x in xs]
    return list(torch._foreach_norm(xs, 1))


def div_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x / s``."""
    if _per_tensor(s):
        for x, a in zip(xs, _each(s, len(xs))):
            x.div_(a)
    else:
        torch._foreach_div_(xs, _own_scalar(xs, s))


def add_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x + s`` (a scalar)."""
    if _per_tensor(s):
        for x, a in zip(xs, _each(s, len(xs))):
            x.add_(a)
    else:
        # the number's 0-d tensor as a list of it: the op over two lists of tensors converts nothing
        # per tensor (the op with one 0-d tensor converts it for each, as with a number)
        own = _own_scalar(xs, s)
        torch._foreach_add_(xs, s if own is s else [own] * len(xs))


def axpy_(xs: list[Tensor], ys: Sequence[Tensor], alpha: Scalar = 1.0) -> None:
    """``x <- x + alpha * y``."""
    if _is_tensor(alpha):
        for x, y, a in zip(xs, ys, _each(alpha, len(xs))):
            x.addcmul_(y, a)  # a 0-d factor broadcasts: no full-size temporary
    elif _traced_number(alpha):
        for x, y, a in zip(xs, ys, _each(alpha, len(xs))):
            x.add_(y * a)
    elif isinstance(alpha, list):
        torch._foreach_add_(xs, torch._foreach_mul(list(ys), alpha))
    else:
        torch._foreach_add_(xs, list(ys), alpha=alpha)


def copy_(xs: list[Tensor], ys: Sequence[Tensor]) -> None:
    """``x <- y``: one foreach call, or a copy per tensor for DTensors (FSDP2), which have no foreach copy."""
    if xs and hasattr(xs[0], "device_mesh"):
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)
    else:
        torch._foreach_copy_(xs, list(ys))


def lerp_(xs: list[Tensor], ys: Sequence[Tensor], w: Scalar) -> None:
    """``x <- x + w * (y - x)``."""
    if _is_tensor(w):
        # lerp takes a tensor weight only in the tensors' own dtype
        for x, y, a in zip(xs, ys, _each(w, len(xs))):
            x.lerp_(y, a.to(x.dtype))
    elif _traced_number(w):
        for x, y, a in zip(xs, ys, _each(w, len(xs))):
            x.add_((y - x) * a)
    elif isinstance(w, list):
        for x, y, a in zip(xs, ys, w):
            x.lerp_(y, a)
    else:
        torch._foreach_lerp_(xs, list(ys), w)


def addcmul_(xs: list[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], s: Scalar = 1.0) -> None:
    """``x <- x + s * a * b``."""
    if _is_tensor(s) or _traced_number(s):
        for x, ai, bi, si in zip(xs, a, b, _each(s, len(xs))):
            x.add_(ai * bi * si)
    else:
        torch._foreach_addcmul_(xs, list(a), list(b), s)


def addcdiv_(xs: list[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], s: Scalar = 1.0) -> None:
    """``x <- x + s * a / b``."""
    if isinstance(s, Tensor) and s.device.type == "cpu" and _plain_cpu(xs):
        # a host read of a CPU number costs nothing: one list op, not three ops per tensor
        torch._foreach_addcdiv_(xs, list(a), list(b), s.item())
    elif _is_tensor(s) or _traced_number(s):
        for x, ai, bi, si in zip(xs, a, b, _each(s, len(xs))):
            x.add_(ai / bi * si)
    else:
        torch._foreach_addcdiv_(xs, list(a), list(b), s)


def sigmoid_(xs: list[Tensor]) -> None:
    """``x <- sigmoid(x)``: one op per tensor while compiling, where the compiler has no foreach
    sigmoid (it would be a call of its own, with full-size buffers around it)."""
    if torch.compiler.is_compiling():
        for x in xs:
            x.sigmoid_()
    else:
        torch._foreach_sigmoid_(xs)


# atan(t) = t P(t^2) on [0, 1]: a least-squares fit of degree 9 in t^2, reweighted toward the
# least largest relative error (2.4e-9, a fiftieth of an fp32 ulp), done once in float64
_ATAN_COEFFS = (
    0.9999999976340453, -0.3333328366245579, 0.19998266409954066, -0.14261936071126866,
    0.10942043573005256, -0.08377348410082935, 0.0575526103207026, -0.030805062710695313,
    0.010727177187978212, -0.001753979288585606,
)
# pi/2 as an fp32 value and its remainder, so that the reflection adds no rounding of pi/2
_HALF_PI_HI, _HALF_PI_LO = 1.5707963705062866, -4.371139006309477e-08
# narrower floats are computed in float32 by the compiler, where the polynomials are as good
_POLYNOMIAL_ATAN2 = (torch.float32, torch.bfloat16, torch.float16)


def atan2_nonneg_polynomial(y: Tensor, x: Tensor) -> Tensor:
    """``atan2(y, x)`` for ``x >= 0`` from elementwise arithmetic: a polynomial in ``(min/max)^2``.

    ``x`` must not be negative (a denominator such as ``sqrt(v)``): for ``x < 0`` this returns
    ``atan2(y, |x|)``. Within 2 ulp of the exact value in float32 (``torch.atan2`` on a CPU: 1
    ulp); ``atan2(+-0, 0) = +-0``, and a NaN in either argument gives NaN; unlike ``atan2(inf, inf)
    = pi/4``, two infinite arguments give NaN too. A compiler fuses it into the surrounding kernel,
    where a CPU's vectorized ``atan2`` (full range reduction, division and reflections at full
    accuracy) makes an Adam-like step compute-bound at about twice its memory time.
    """
    ay = y.abs()
    big, small = torch.maximum(ay, x), torch.minimum(ay, x)
    t = torch.where(big == 0, torch.zeros_like(big), small / big)  # a NaN stays NaN
    s = t * t
    p = torch.full_like(s, _ATAN_COEFFS[-1])
    for c in _ATAN_COEFFS[-2::-1]:
        p = p * s + c
    r = p * t
    r = torch.where(ay > x, (_HALF_PI_HI - r) + _HALF_PI_LO, r)
    return torch.copysign(r, y)


def atan2_nonneg_(ys: Sequence[Tensor], xs: list[Tensor]) -> list[Tensor]:
    """``x <- atan2(y, x)`` in place for ``x >= 0``; returns ``xs``.

    While compiling, a tensor of float32 or narrower takes :func:`atan2_nonneg_polynomial`, which
    the compiler fuses at memory speed (within 2 ulp of ``torch.atan2``); float64 and the eager
    path keep ``torch.atan2``.
    """
    if torch.compiler.is_compiling() and xs and xs[0].dtype in _POLYNOMIAL_ATAN2:
        for y, x in zip(ys, xs, strict=True):
            x.copy_(atan2_nonneg_polynomial(y.float(), x.float()))
        return xs
    return [torch.atan2(y, x, out=x) for y, x in zip(ys, xs, strict=True)]


# log1p(z) = 2 atanh(s) = 2 s P(s^2) with s = z / (2 + z), s^2 in [0, 1/9] for z in [0, 1]: a
# least-squares fit of degree 4 in s^2 (largest relative error 4.1e-9), done once in float64
_ATANH_COEFFS = (1.0000000038619887, 0.33333160203203116, 0.2001232566689221, 0.13982172352762262,
                 0.14080726878163694)


def softplus_nonneg_polynomial(x: Tensor, beta: float, threshold: float = 20.0) -> Tensor:
    """``softplus(x, beta, threshold)`` for ``x >= 0`` with one ``exp`` and a polynomial for ``log1p``.

    ``softplus_b(x) = log(1 + exp(b x)) / b``, and ``x`` itself where ``b x > threshold`` (as
    ``torch.nn.functional.softplus``). For ``y = b x >= 0`` it is ``(y + log1p(exp(-y))) / b``,
    and ``log1p(z)`` for ``z = exp(-y)`` in ``(0, 1]`` is ``2 atanh(z / (2 + z))``, a short odd
    series. Within 4 ulp of the exact value in float32 (``torch.nn.functional.softplus`` in
    float32: 2 ulp); ``x`` must not be negative (a denominator such as ``sqrt(v)``). A compiler
    fuses it into the surrounding kernel, where a CPU's vectorized ``log1p`` and ``exp`` at full
    accuracy make an Adam-like step compute-bound.
    """
    y = x * beta
    z = torch.exp(-y)
    s = z / (z + 2.0)
    t = s * s
    p = torch.full_like(t, _ATANH_COEFFS[-1])
    for c in _ATANH_COEFFS[-2::-1]:
        p = p * t + c
    return torch.where(y > threshold, x, x + s * p * (2.0 / beta))


def softplus_nonneg(xs: list[Tensor], beta: float, threshold: float = 20.0) -> list[Tensor]:
    """``softplus(x, beta, threshold)`` of each tensor (``x >= 0``), as new tensors.

    While compiling, a tensor of float32 or narrower takes :func:`softplus_nonneg_polynomial`,
    which the compiler fuses at memory speed; float64 and the eager path keep
    ``torch.nn.functional.softplus``.
    """
    if torch.compiler.is_compiling() and xs and xs[0].dtype in _POLYNOMIAL_ATAN2:
        return [softplus_nonneg_polynomial(x.float(), beta, threshold).to(x.dtype) for x in xs]
    return [torch.nn.functional.softplus(x, beta=beta, threshold=threshold) for x in xs]


def update_moment(m: list[Tensor], u: Sequence[Tensor], decay: Scalar) -> None:
    """First-moment EMA in place: ``m <- decay * m + (1 - decay) * u``. Peer: optax ``update_moment``."""
    lerp_(m, u, 1.0 - decay)


def update_moment_per_elem_norm(v: list[Tensor], u: Sequence[Tensor], decay: Scalar) -> None:
    """Second-moment EMA in place: ``v <- decay * v + (1 - decay) * u^2``.

    Peer: optax ``update_moment_per_elem_norm`` (order 2).
    """
    mul_(v, decay)
    addcmul_(v, u, u, 1.0 - decay)


# rows per block of a compiled reduction down the columns (see reduce_dims)
COLUMN_BLOCK = 16


def reduce_dims(x: Tensor, dims: tuple[int, ...], op: str, blocked: bool = False) -> Tensor:
    """``x.sum`` (``op="sum"``) or ``x.amax`` over ``dims``, kept as size-1 dims.

    With ``blocked`` (a compiled per-tensor kernel), a reduction over all dims but the last (down
    the columns of a row-major matrix) runs over blocks of ``COLUMN_BLOCK`` rows, then over the
    blocks' results: the compiler otherwise emits a loop down each column, a strided walk over the
    whole tensor at several times the cost of a reduction along the rows. Summation order only.
    """
    n = x.dim()
    # a DTensor (FSDP2, a traced training step) keeps the plain form: its shards need not hold whole blocks
    if (not blocked or n < 2 or hasattr(x, "device_mesh")
            or tuple(sorted(d % n for d in dims)) != tuple(range(n - 1))):
        return getattr(x, op)(dim=dims, keepdim=True)
    y = x.reshape(-1, x.shape[-1])
    # whole blocks, then the rows left over (fewer than a block, maybe none) with the blocks' results:
    # no branch on the size, so a kernel with symbolic sizes takes any
    r0 = y.shape[0] // COLUMN_BLOCK * COLUMN_BLOCK
    head = getattr(y[:r0].view(-1, COLUMN_BLOCK, y.shape[-1]), op)(dim=1)
    out = getattr(torch.cat([head, y[r0:]]), op)(dim=0)
    return out.view((1,) * (n - 1) + (x.shape[-1],))
