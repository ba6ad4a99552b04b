"""List ops whose scalars may be Python numbers or 0-d tensors, and the moment rules built on them.

A transform's update runs on two paths with one body of math. On the eager path its scalars
(hyperparameters, bias corrections) are Python floats and these ops are ``torch._foreach_*`` calls.
On the fused path (``ChainOptimizer(fused=True)``, or a step traced by ``torch.compile``) the
scalars are 0-d tensors, so that a new learning rate or step count does not recompile: the ops
then use tensor-scalar forms that ``torch.compile`` fuses into one kernel.

A scalar argument may also be a list with one entry per tensor (per-tensor step counts).
:func:`reduce_dims` is a reduction of one tensor whose compiled form Adafactor and SM3 share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "add_",
    "addcdiv_",
    "addcmul_",
    "axpy_",
    "bias_correction",
    "div_",
    "lerp_",
    "mul_",
    "reduce_dims",
    "sqrt",
    "update_moment",
    "update_moment_per_elem_norm",
]

Scalar = Any  # float | Tensor (0-d) | list of either, one per tensor


def _is_tensor(s: Scalar) -> bool:
    return isinstance(s, Tensor) or (isinstance(s, list) and bool(s) and isinstance(s[0], Tensor))


def _each(s: Scalar, n: int) -> list:
    return s if isinstance(s, list) else [s] * n


def sqrt(s: Scalar) -> Scalar:
    """``sqrt`` of a scalar of any kind (float, 0-d tensor or a list of them)."""
    if isinstance(s, list):
        return [sqrt(x) for x in s]
    return s.sqrt() if isinstance(s, Tensor) else math.sqrt(s)


def bias_correction(beta: Scalar, step: Scalar) -> Scalar:
    """``1 - beta**step``: Adam's bias correction for an EMA with decay ``beta``."""
    if isinstance(step, list):
        return [bias_correction(beta, t) for t in step]
    return 1.0 - beta**step


# dtypes whose multiplication by a Python number equals that by a 0-d tensor of their own dtype
# (fp16/bf16 multiply by the number in fp32)
_OWN_PRECISION_FACTOR = (torch.float32, torch.float64)


def mul_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x * s``."""
    if isinstance(s, list) and _is_tensor(s):
        for x, a in zip(xs, s):
            x.mul_(a)
    elif isinstance(s, float) and _plain_cpu(xs):
        # the same bits: on CPU a foreach op wraps a number into a tensor again for every tensor
        # (about 1 us, most of the op's time on a small tensor); one 0-d tensor is made once
        torch._foreach_mul_(xs, torch.tensor(s, dtype=xs[0].dtype))
    else:
        torch._foreach_mul_(xs, s)


def _plain_cpu(xs: list[Tensor]) -> bool:
    """Plain CPU tensors of fp32/fp64, outside a trace (a DTensor takes no plain tensor as a factor)."""
    if not xs or torch.compiler.is_compiling():
        return False
    x = xs[0]
    return x.device.type == "cpu" and x.dtype in _OWN_PRECISION_FACTOR and not hasattr(x, "device_mesh")


def div_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x / s``."""
    if isinstance(s, list) and _is_tensor(s):
        for x, a in zip(xs, s):
            x.div_(a)
    else:
        torch._foreach_div_(xs, s)


def add_(xs: list[Tensor], s: Scalar) -> None:
    """``x <- x + s`` (a scalar)."""
    if isinstance(s, list) and _is_tensor(s):
        for x, a in zip(xs, s):
            x.add_(a)
    else:
        torch._foreach_add_(xs, s)


def axpy_(xs: list[Tensor], ys: Sequence[Tensor], alpha: Scalar = 1.0) -> None:
    """``x <- x + alpha * y``."""
    if _is_tensor(alpha):
        for x, y, a in zip(xs, ys, _each(alpha, len(xs))):
            x.addcmul_(y, a)  # a 0-d factor broadcasts: no full-size temporary
    elif isinstance(alpha, list):
        torch._foreach_add_(xs, torch._foreach_mul(list(ys), alpha))
    else:
        torch._foreach_add_(xs, list(ys), alpha=alpha)


def lerp_(xs: list[Tensor], ys: Sequence[Tensor], w: Scalar) -> None:
    """``x <- x + w * (y - x)``."""
    if _is_tensor(w):
        # lerp takes a tensor weight only in the tensors' own dtype
        for x, y, a in zip(xs, ys, _each(w, len(xs))):
            x.lerp_(y, a.to(x.dtype))
    elif isinstance(w, list):
        for x, y, a in zip(xs, ys, w):
            x.lerp_(y, a)
    else:
        torch._foreach_lerp_(xs, list(ys), w)


def addcmul_(xs: list[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], s: Scalar = 1.0) -> None:
    """``x <- x + s * a * b``."""
    if _is_tensor(s):
        for x, ai, bi, si in zip(xs, a, b, _each(s, len(xs))):
            x.add_(ai * bi * si)
    else:
        torch._foreach_addcmul_(xs, list(a), list(b), s)


def addcdiv_(xs: list[Tensor], a: Sequence[Tensor], b: Sequence[Tensor], s: Scalar = 1.0) -> None:
    """``x <- x + s * a / b``."""
    if isinstance(s, Tensor) and s.device.type == "cpu" and _plain_cpu(xs):
        # a host read of a CPU number costs nothing: one list op, not three ops per tensor
        torch._foreach_addcdiv_(xs, list(a), list(b), s.item())
    elif _is_tensor(s):
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
