"""SM3: a second moment with one accumulator per axis (cover sets of rows, columns, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from .._dtensor import on_whole, settle, some_shard_empty
from ..base import Bucket, Leaf, RowBlockDivisor, row_blocks, transform, zeros_state
from ..hyperparams import Hyperparam, closed_unit_interval, nonnegative

__all__ = ["scale_by_sm3"]


def _others(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != axis)


def _nu(g: Tensor, accs: list[Tensor], b2: float) -> Tensor:
    """``min_a acc_a + g^2`` (the accumulators broadcast to ``g``'s shape), or with ``b2 < 1``
    ``lerp(min_a acc_a, g^2, 1 - b2)``: a new tensor."""
    low = accs[0]
    for acc in accs[1:-1]:
        low = torch.minimum(low, acc)  # smaller than the param: the last axis is still 1
    nu = torch.minimum(low, accs[-1])
    if b2 == 1.0:
        return nu.addcmul_(g, g)
    return nu.lerp_(g * g, 1.0 - b2)


def _root(nu: Tensor, eps: float, exact_zero: bool) -> Tensor:
    """``sqrt(nu + eps)`` in ``nu``'s buffer; inf where ``nu = 0`` with ``exact_zero`` (an eps too
    small to keep 0/0 away: the update is then 0 there). ``== 0``, not ``> 0``: a NaN nu must reach
    the update, or the NaN stays in the accumulators unseen."""
    if exact_zero:
        return torch.where(nu == 0, float("inf"), nu.add_(eps).sqrt_())
    return nu.add_(eps).sqrt_()


def _step_tensor(g: Tensor, accs: list[Tensor], b2: float, eps: float, exact_zero: bool,
                 blocked: bool = False) -> Tensor:
    """One tensor's accumulators updated from ``g`` (each the max of ``nu`` over the other dims), and
    its divisor ``sqrt(nu + eps)``."""
    # nu lives in one fresh buffer, later turned into the divisor in place: on a memory-bound
    # step each further full-size temporary costs more than the arithmetic
    nu = _nu(g, accs, b2)
    for a, acc in enumerate(accs):
        acc.copy_(settle(ops.reduce_dims(nu, _others(g.dim(), a), "amax", blocked)))
    return _root(nu, eps, exact_zero)


def _accumulate_in_blocks(g: Tensor, accs: list[Tensor], b2: float) -> list[Tensor]:
    """The accumulators' new values (``max`` of ``nu`` over all axes but theirs), with ``nu`` formed
    a block of rows at a time (it stays in cache: nothing model-sized is made). Returns copies of
    the accumulators as they were, which the divisor reads (``_SM3Divisor``)."""
    n = g.dim()
    old = [acc.clone() for acc in accs]
    running: list[Tensor | None] = [None] * n
    for start, stop in row_blocks(g):
        nu = _nu(g[start:stop], [old[0][start:stop], *old[1:]], b2)
        # the block holds whole rows: their maxima are final; the other axes' maxima run over the blocks
        accs[0][start:stop].copy_(nu.amax(dim=_others(n, 0), keepdim=True))
        for a in range(1, n):
            m = nu.amax(dim=_others(n, a), keepdim=True)
            running[a] = m if running[a] is None else torch.maximum(running[a], m, out=running[a])
    for a in range(1, n):
        accs[a].copy_(running[a])
    return old


class _SM3Divisor(RowBlockDivisor):
    """SM3's ``sqrt(nu + eps)``, formed when the final write needs it: for a vector from its
    accumulator (``nu`` itself), for a larger tensor ``nu`` again from the gradient and the
    accumulators as they were before this step (kept: they are small), one block of rows at a time."""

    __slots__ = ("accs", "b2", "eps", "exact_zero")

    def __init__(self, g: list[Tensor], accs: list[list[Tensor] | None], b2: float, eps: float,
                 exact_zero: bool) -> None:
        # accs[i]: [the accumulator] of a vector, the old accumulators of a larger tensor, None if empty
        self.g, self.accs, self.b2, self.eps, self.exact_zero = g, accs, b2, eps, exact_zero

    def rows(self, i: int, start: int, stop: int) -> Tensor:
        accs = self.accs[i]
        if self.g[i].dim() <= 1:
            return _root(accs[0][start:stop].clone(), self.eps, self.exact_zero)
        return _root(_nu(self.g[i][start:stop], [accs[0][start:stop], *accs[1:]], self.b2), self.eps,
                     self.exact_zero)

    def listed(self) -> dict[int, Tensor]:
        flat = [i for i, g in enumerate(self.g) if g.dim() <= 1]  # vectors: nu is their accumulator
        if not flat:
            return {}
        acc = [self.accs[i][0] for i in flat]
        d = torch._foreach_add(acc, self.eps)
        torch._foreach_sqrt_(d)
        return {i: torch.where(a == 0, float("inf"), di) if self.exact_zero else di
                for i, a, di in zip(flat, acc, d, strict=True)}

    def subset(self, indices: Sequence[int], views: Sequence[Tensor] | None = None) -> _SM3Divisor:
        if views is not None:
            raise ValueError("SM3's divisor is formed from whole tensors, not slices")
        return _SM3Divisor([self.g[i] for i in indices], [self.accs[i] for i in indices], self.b2, self.eps,
                           self.exact_zero)


def scale_by_sm3(b2: float = 1.0, eps: float = 1e-8, *, name: str = "sm3") -> Leaf:
    """Scale by SM3-II's second-moment estimate: one accumulator per axis.

    Rule, for a tensor with axes a = 0..k-1 and accumulators ``mu_a`` (kept broadcastable, size
    ``n_a`` along axis a): ``nu = min_a mu_a + g^2`` (with ``b2 < 1``:
    ``nu = b2 min_a mu_a + (1 - b2) g^2``, the EMA variant); ``mu_a <- max of nu over all axes
    but a``; ``u = g / sqrt(nu + eps)``, and 0 where ``nu = 0`` (there ``g = 0``; with ``eps = 0``
    the formula would give 0/0). A NaN or inf gradient entry makes its ``u`` non-finite, so
    ``apply_if_finite`` skips the step before the accumulators keep it. Tensors with ndim <= 1 keep one
    full accumulator (Adagrad). Memory: sum of the dims (~0x). Momentum is not included: chain
    ``ema(b1)`` after it (the paper uses b1 = 0.9).
    Reference: Anil, Gupta, Koren & Singer, arXiv:1901.11150 (SM3-II). Peer: optax
    ``scale_by_sm3`` (same eps placement); pytorch_optimizer ``SM3``, whose ``beta=0`` is
    ``b2=1`` here and whose eps is 1e-30 (with ``eps=1e-30`` the two match in float64), keeps a
    running max when its beta > 0, which is not the paper's rule and not done here. ``b2`` and
    ``eps`` choose the code in Python: on the fused path a new value of either compiles again.
    """

    def init(p: Tensor) -> dict:
        z = zeros_state(p)
        if p.dim() <= 1:
            return {"acc_0": z}
        # the axis-0 cover keeps the param's Shard(0); the others are replicated. A sum of zeros
        # (not amax, which has no value on an empty tensor) so zero-size params work too
        return {f"acc_{a}": settle(z.sum(dim=_others(p.dim(), a), keepdim=True)) for a in range(p.dim())}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b2, eps = float(hp["b2"]), float(hp["eps"])
        # nu >= 0, so with eps > 0 the divisor is > 0 and nu = 0 (where g = 0) gives 0 with no test
        exact_zero = eps < torch.finfo(updates[0].dtype).tiny
        # ndim <= 1 (Adagrad): the accumulator is nu itself, so all of them take list ops in place;
        # many small tensors are bound by per-op overhead, not by the arithmetic
        flat = [i for i, g in enumerate(updates) if g.dim() <= 1]
        if flat:
            g = [updates[i] for i in flat]
            acc = [state["acc_0"][i] for i in flat]
            if b2 == 1.0:
                torch._foreach_addcmul_(acc, g, g)
            else:
                torch._foreach_lerp_(acc, torch._foreach_mul(g, g), 1.0 - b2)
        # per tensor, the accumulators (None: an empty tensor, which has nothing to scale)
        accs = [[state["acc_0"][i]] if g.dim() <= 1 else
                [state[f"acc_{a}"][i] for a in range(g.dim())] if g.numel() else None
                for i, g in enumerate(updates)]
        if not ctx.tensor_scalars and updates[0].is_cpu and not hasattr(updates[0], "device_mesh"):
            # nu a block of rows at a time, here for the accumulators and again in the final write
            # for the divisor: twice the arithmetic, but no model-sized buffer, nor the page faults
            # of a fresh one on every step
            for i, g in enumerate(updates):
                if g.dim() > 1 and accs[i] is not None:
                    accs[i] = _accumulate_in_blocks(g, accs[i], b2)
            ctx.defer_divide(_SM3Divisor(list(updates), accs, b2, eps, exact_zero))
            return list(updates)
        denoms = dict(zip(flat, _SM3Divisor([updates[i] for i in flat], [accs[i] for i in flat], b2, eps,
                                            exact_zero).tensors(), strict=True))
        for i, g in enumerate(updates):
            if i in denoms:
                continue
            if accs[i] is None:
                denoms[i] = g
                continue
            if some_shard_empty(g):  # (FSDP2, fewer rows than ranks: on the whole tensor)
                denoms[i] = on_whole(lambda g, *accs: _step_tensor(g, list(accs), b2, eps, exact_zero), [g, *accs[i]],
                                     range(1, len(accs[i]) + 1), g)
                continue
            denoms[i] = _step_tensor(g, accs[i], b2, eps, exact_zero, ctx.tensor_scalars)
        # u = g / sqrt(nu + eps), left for the final write to fuse into one addcdiv
        ctx.defer_divide([denoms[i] for i in range(len(updates))])
        return list(updates)

    spec = {"b2": Hyperparam(b2, closed_unit_interval), "eps": Hyperparam(eps, nonnegative)}
    # vectors keep one accumulator shaped like the param (Adagrad): elementwise, compiled on the
    # fused path; b2 and eps choose the code in Python
    return transform(name, spec, init, update, elementwise_for=lambda shape: len(shape) <= 1, static=("b2", "eps"))
