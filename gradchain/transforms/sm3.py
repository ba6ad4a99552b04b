"""SM3: a second moment with one accumulator per axis (cover sets of rows, columns, ...)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import ops
from .._dtensor import settle
from ..base import Bucket, Leaf, transform, zeros_state
from ..hyperparams import Hyperparam, closed_unit_interval, nonnegative

__all__ = ["scale_by_sm3"]


def _others(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != axis)


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
    running max when its beta > 0, which is not the paper's rule and not done here.
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
        eps_positive = eps >= torch.finfo(updates[0].dtype).tiny
        denoms: list[Tensor | None] = [None] * len(updates)
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
            nu = torch._foreach_add(acc, eps)
            torch._foreach_sqrt_(nu)
            for i, a, d in zip(flat, acc, nu, strict=True):
                denoms[i] = d if eps_positive else torch.where(a == 0, float("inf"), d)
        for i, g in enumerate(updates):
            if denoms[i] is not None:
                continue
            if not g.numel():  # an empty tensor has nothing to scale (and amax has no value)
                denoms[i] = g
                continue
            n = g.dim()
            accs = [state[f"acc_{a}"][i] for a in range(n)]
            # nu lives in one fresh buffer, later turned into the divisor in place: on a memory-bound
            # step each further full-size temporary costs more than the arithmetic
            low = accs[0]
            for acc in accs[1:-1]:
                low = torch.minimum(low, acc)  # smaller than the param: the last axis is still 1
            nu = torch.minimum(low, accs[-1])
            if b2 == 1.0:
                nu.addcmul_(g, g)
            else:
                nu.lerp_(g * g, 1.0 - b2)
            for a, acc in enumerate(accs):
                acc.copy_(settle(ops.reduce_dims(nu, _others(n, a), "amax", ctx.tensor_scalars)))
            if eps_positive:
                denoms[i] = nu.add_(eps).sqrt_()
            else:
                # == 0, not > 0: a NaN nu must reach the update, or the NaN stays in the accumulators unseen
                denoms[i] = torch.where(nu == 0, float("inf"), nu.add_(eps).sqrt_())
        # u = g / sqrt(nu + eps), left for the final write to fuse into one addcdiv
        ctx.defer_divide(denoms)
        return list(updates)

    spec = {"b2": Hyperparam(b2, closed_unit_interval), "eps": Hyperparam(eps, nonnegative)}
    # vectors keep one accumulator shaped like the param (Adagrad): elementwise, compiled on the
    # fused path; b2 and eps choose the code in Python
    return transform(name, spec, init, update, elementwise_for=lambda shape: len(shape) <= 1, static=("b2", "eps"))
