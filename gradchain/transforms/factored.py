"""Adafactor: the factored second moment and its step-size pieces (clipping, relative step, param scale)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._dtensor import on_whole, settle, some_shard_empty
from ..base import Bucket, Leaf, RowBlockDivisor, row_blocks, transform, zeros_state
from ..hyperparams import Hyperparam, nonnegative, number, positive

__all__ = [
    "add_lr_scaled_wd",
    "clip_by_block_rms",
    "factored_dims",
    "scale_by_factored_rms",
    "scale_by_param_rms",
    "scale_by_relative_step",
]

_RULES = ("two_largest", "last_two", "unit")


def _mean(x: Tensor, dims: tuple[int, ...], blocked: bool = False) -> Tensor:
    # sum / count, not .mean(): DTensor's Partial(avg) is wrong on uneven shards
    # max(., 1): the mean over no entries (an empty param) is 0, not 0/0
    count = max(math.prod([x.shape[d] for d in dims]), 1)
    return settle(ops.reduce_dims(x, dims, "sum", blocked) / count)


def factored_dims(
    shape: tuple[int, ...] | torch.Size, rule: str = "two_largest", min_dim_size_to_factor: int = 128
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (row dims, column dims) a tensor of ``shape`` is factored over, or None (unfactored).

    ``two_largest`` (optax): the second-largest dim against the largest (ties: the later dim
    counts as larger), other dims kept as a batch; ``last_two`` (HF, fairseq, torch): dims -2 and
    -1; ``unit``: dim 0 (output units) against all the others, i.e. a conv weight as
    (O, I*k...). Unfactored when ndim < 2 or a factored side is smaller than the minimum.
    """
    if rule not in _RULES:
        raise ValueError(f"invalid factored_dims rule {rule!r}: must be one of {_RULES}")
    n = len(shape)
    if n < 2:
        return None
    if rule == "two_largest":
        # by explicit comparisons, not sorted(): traceable when the sizes are symbolic
        largest, second = 0, None
        for d in range(1, n):
            if shape[d] >= shape[largest]:
                largest, second = d, largest
            elif second is None or shape[d] >= shape[second]:
                second = d
        rows, cols = (second,), (largest,)
    elif rule == "last_two":
        rows, cols = (n - 2,), (n - 1,)
    else:
        rows, cols = (0,), tuple(range(1, n))
    if min(math.prod([shape[d] for d in rows]), math.prod([shape[d] for d in cols])) < min_dim_size_to_factor:
        return None
    return rows, cols


def _check_beta2_decay(value: Any) -> str | None:
    if number(value) is not None or float(value) > 0:
        return "must be a finite number <= 0 (beta2_t = 1 - t**beta2_decay)"
    return None


def _eps_pair(value: Any) -> str | None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be torch.optim.Adafactor's pair (eps1 or None, eps2)"
    if value[0] is not None and nonnegative(value[0]) is not None:
        return f"eps1={value[0]!r} must be None or a number >= 0"
    if nonnegative(value[1]) is not None:
        return f"eps2={value[1]!r} must be a number >= 0"
    return None


def _eps_check(default: Any) -> Any:
    # built with torch's pair, the key holds a pair for good (one key shared by two transforms)
    return _eps_pair if isinstance(default, (tuple, list)) else nonnegative


def _pick(value: Any, index: int) -> Any:
    """One entry of torch.optim.Adafactor's ``eps=(eps1, eps2)`` pair, or the value itself."""
    return value[index] if isinstance(value, (tuple, list)) else value


def scale_by_factored_rms(
    beta2_decay: float = -0.8,
    eps: Any = 1e-30,
    *,
    factored: str = "two_largest",
    min_dim_size_to_factor: int = 128,
    torch_compat: bool = False,
    name: str = "factored",
) -> Leaf:
    """Scale by Adafactor's factored second moment (sublinear memory).

    Rule (default, HF/fairseq/optax form): ``w_t = t**beta2_decay`` (so ``beta2_t = 1 - w_t`` is 0
    at t=1: built-in bias correction); ``Q = g^2 + eps``; for a factored tensor
    ``R <- lerp(R, mean_cols(Q), w_t)``, ``C <- lerp(C, mean_rows(Q), w_t)`` and
    ``u = g * rsqrt(R / mean(R)) * rsqrt(C)`` (one rsqrt per factor: never forms ``R*C`` or its
    reciprocal, so a dead row crossing a dead column stays finite; see docs/families/factored.md);
    otherwise ``v <- lerp(v, Q, w_t)`` and ``u = g * rsqrt(v)``. Eagerly on a CPU the roots are one
    pending divisor, ``u = g / (sqrt(R / mean(R)) sqrt(C))``, formed by the final write a block of
    rows at a time, and the statistics are summed a block at a time: nothing model-sized is made.
    Dims per ``factored`` (:func:`factored_dims`). ``beta2_decay`` is torch's name; optax's
    ``decay_rate=0.8`` is ``-beta2_decay``. ``eps`` may be torch's pair ``(eps1, eps2)``: its first
    entry is used, None meaning 1e-30.

    ``torch_compat=True`` reproduces ``torch.optim.Adafactor``: last-two-dims factoring of every
    tensor with ndim >= 2, ``g^2`` without eps, ``V = R C / max(mean(R), eps1)`` and
    ``u = g * rsqrt(max(V, eps1^2))`` with ``eps1=None`` meaning the param dtype's machine eps.

    Reference: Shazeer & Stern, arXiv:1804.04235. Peer: optax ``scale_by_factored_rms``,
    HF ``Adafactor``; ``torch.optim.Adafactor`` with ``torch_compat``.
    """
    if isinstance(min_dim_size_to_factor, bool) or not isinstance(min_dim_size_to_factor, int) \
            or min_dim_size_to_factor < 0:
        raise ValueError(f"invalid min_dim_size_to_factor={min_dim_size_to_factor!r}: must be an int >= 0")
    if torch_compat:
        factored, min_dim_size_to_factor = "last_two", 0
    factored_dims((1, 1), factored, 0)  # validates the rule name now

    def dims_of(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        return factored_dims(shape, factored, min_dim_size_to_factor)

    def dims(p: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        return dims_of(tuple(p.shape))

    def init(p: Tensor) -> dict:
        fd = dims(p)
        if fd is None:
            return {"v": zeros_state(p)}
        rows, cols = fd
        z = zeros_state(p)
        # derived from the param: a stat reduced over dim 0 is replicated, the other keeps Shard(0)
        return {"row": settle(z.sum(dim=cols, keepdim=True)), "col": settle(z.sum(dim=rows, keepdim=True))}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        decay = hp["beta2_decay"]
        eps1 = _pick(hp["eps"], 0)
        if eps1 is None:
            eps1 = torch.finfo(ctx.params[0].dtype).eps if torch_compat else 1e-30
        if ctx.tensor_scalars:
            # compiled: over a flat buffer of unfactored params (elementwise_for), or one large
            # factored param at a time
            # (also a whole training step under torch.compile: a list of both kinds)
            w = ctx.per_step(lambda t: t**decay)
            out_t = []
            for i, g in enumerate(updates):
                wi = w[i] if isinstance(w, list) else w
                v = state["v"][i] if "v" in state else None
                if v is not None:
                    out_t.append(_unfactored_traced(g, v, wi, eps1, torch_compat))
                else:
                    out_t.append(_factored(g, state["row"][i], state["col"][i], dims(ctx.params[i]), wi, eps1,
                                           torch_compat, blocked=True))  # type: ignore[arg-type]
            return out_t
        decay, eps1 = float(decay), float(eps1)
        weights = ctx.step_values
        out: list[Tensor | None] = [None] * len(updates)
        vs = state.get("v", [None] * len(updates))
        flat = [i for i, v in enumerate(vs) if v is not None]
        if flat:
            g = [updates[i] for i in flat]
            v = [vs[i] for i in flat]
            w = ctx.per_step(lambda t: t**decay)
            w = [w[i] for i in flat] if isinstance(w, list) else w
            q = torch._foreach_mul(g, g)
            if not torch_compat and g[0].is_cpu and not hasattr(g[0], "device_mesh"):
                # on CPU a list op runs tensor by tensor and would wrap a Python number anew for each:
                # one 0-d tensor is cheaper, same result (alpha= selects that overload, as torch.optim does)
                torch._foreach_add_(q, torch.tensor(eps1, dtype=torch.float64), alpha=1.0)
            elif not torch_compat:
                torch._foreach_add_(q, eps1)
            torch._foreach_lerp_(v, q, w)
            # freed before the next full-size buffers are made, which then reuse its memory: with q
            # still alive they would grow the heap, and each step would page-fault it in anew
            del q
        factored_here = any(v is None and g.numel() for v, g in zip(vs, updates, strict=True))
        if factored_here and not torch_compat and updates[0].is_cpu and not hasattr(updates[0], "device_mesh"):
            # the divisor sqrt(V^) is left to the final write, which forms a large tensor's a block of
            # rows at a time; the statistics are summed a block at a time too: g^2 is never model-sized.
            # (A bucket of unfactored tensors only keeps the list ops below: its divisor would be
            # formed twice, for the clip's norms and for the write, at a per-op cost per tensor.)
            factors: list[Any] = [None] * len(updates)
            for i, g in enumerate(updates):
                if vs[i] is not None:
                    factors[i] = vs[i]
                elif g.numel():
                    factors[i] = _factored_in_blocks(g, state["row"][i], state["col"][i], dims(ctx.params[i]),
                                                     weights[i] ** decay, eps1)
                else:  # nothing to divide; the statistics still decay toward the empty mean (0)
                    _factored(g, state["row"][i], state["col"][i], dims(ctx.params[i]), weights[i] ** decay, eps1,
                              False)  # type: ignore[arg-type]
            ctx.defer_divide(_FactoredDivisor(list(updates), factors))
            return list(updates)
        if flat:
            if torch_compat:
                r = torch._foreach_clamp_min(v, eps1 * eps1)
                torch._foreach_rsqrt_(r)
            else:
                r = torch._foreach_rsqrt(v)
            torch._foreach_mul_(r, g)
            for i, u in zip(flat, r, strict=True):
                out[i] = u
        for i, g in enumerate(updates):
            if out[i] is None:
                args = (dims(ctx.params[i]), weights[i] ** decay, eps1, torch_compat)
                row, col = state["row"][i], state["col"][i]
                if some_shard_empty(g):  # (FSDP2, fewer rows than ranks: on the whole tensor)
                    out[i] = on_whole(lambda g, r, c, args=args: _factored(g, r, c, *args), [g, row, col], (1, 2), g)
                else:
                    out[i] = _factored(g, row, col, *args)  # type: ignore[arg-type]
        return out

    spec = {
        "beta2_decay": Hyperparam(beta2_decay, _check_beta2_decay),
        "eps": Hyperparam(eps, _eps_check(eps)),
    }
    return transform(name, spec, init, update, elementwise_for=lambda shape: dims_of(shape) is None)


def _weight(w: Any, x: Tensor) -> Any:
    # lerp takes a tensor weight only in the tensor's own dtype
    return w.to(x.dtype) if isinstance(w, Tensor) else w


def _unfactored_traced(g: Tensor, v: Tensor, w: Any, eps1: Any, torch_compat: bool) -> Tensor:
    """The unfactored rule with tensor scalars (the fused path's flat buffer): ``v <- lerp(v, g^2 + eps1, w)``,
    ``u = g rsqrt(v)`` (torch's form: ``v <- lerp(v, g^2, w)``, ``u = g rsqrt(max(v, eps1^2))``)."""
    q = g * g if torch_compat else torch.addcmul(torch.as_tensor(eps1, dtype=g.dtype), g, g)
    v.lerp_(q, _weight(w, v))
    r = torch.clamp_min(v, eps1 * eps1) if torch_compat else v
    return torch.rsqrt(r) * g


def _factored(g: Tensor, row: Tensor, col: Tensor, dims: tuple, w: Any, eps1: Any, torch_compat: bool,
              blocked: bool = False) -> Tensor:
    """The factored rule for one param (scalars numbers eagerly, 0-d tensors traced): the row and
    column statistics, then ``u``, written into ``g^2``'s buffer (one full-size buffer, not three)."""
    rows, cols = dims
    # g^2 + eps1 in one pass (one rounding, not two: equal but where eps1 is within an ulp of g^2)
    eps = eps1.to(g.dtype) if isinstance(eps1, Tensor) else g.new_full((), eps1)
    q = g * g if torch_compat else torch.addcmul(eps, g, g)
    row.lerp_(_mean(q, cols, blocked), _weight(w, row))
    col.lerp_(_mean(q, rows, blocked), _weight(w, col))
    if torch_compat:
        torch.mul(row, col, out=q)
        q.div_(_mean(row, rows).clamp_(min=eps1))
        return q.clamp_(min=eps1 * eps1).rsqrt_().mul_(g)
    return torch.mul(g, torch.rsqrt(row / _mean(row, rows)), out=q).mul_(torch.rsqrt(col))


def _factored_in_blocks(g: Tensor, row: Tensor, col: Tensor, dims: tuple, w: float, eps1: float
                        ) -> tuple[Tensor, Tensor]:
    """The factored statistics updated from ``g^2 + eps1`` formed a block of rows (dim 0) at a time,
    in cache; returns the divisor's two factors ``sqrt(R / mean(R))`` and ``sqrt(C)``."""
    rows, cols = dims
    eps = g.new_full((), eps1)
    sums = [torch.zeros_like(row), torch.zeros_like(col)]
    for start, stop in row_blocks(g):
        q = torch.addcmul(eps, g[start:stop], g[start:stop])
        for total, over in zip(sums, (cols, rows), strict=True):
            part = q.sum(dim=over, keepdim=True)
            if 0 in over:  # dim 0 is summed: the blocks add up
                total.add_(part)
            else:  # dim 0 is kept: these rows are final
                total[start:stop] = part
    for stat, total, over in ((row, sums[0], cols), (col, sums[1], rows)):
        stat.lerp_(total / max(math.prod([g.shape[d] for d in over]), 1), _weight(w, stat))
    return torch.sqrt(row / _mean(row, rows)), torch.sqrt(col)


class _FactoredDivisor(RowBlockDivisor):
    """Adafactor's ``sqrt(V^)``, formed when the final write needs it: ``sqrt(v)`` for an unfactored
    tensor, ``sqrt(R / mean(R)) * sqrt(C)`` (a product of roots, never of ``R`` and ``C``: a dead
    row crossing a dead column stays finite) for a factored one, a block of rows at a time."""

    __slots__ = ("factors",)

    def __init__(self, g: list[Tensor], factors: list[Any]) -> None:
        # factors[i]: v (unfactored), the pair of roots (factored), or None (an empty tensor)
        self.g, self.factors = g, factors

    def rows(self, i: int, start: int, stop: int) -> Tensor:
        f = self.factors[i]
        if isinstance(f, Tensor):
            return torch.sqrt(f[start:stop])
        n0 = self.g[i].shape[0]
        a, b = (x[start:stop] if x.dim() and x.shape[0] == n0 else x for x in f)
        return a * b

    def listed(self) -> dict[int, Tensor]:
        flat = [i for i, f in enumerate(self.factors) if isinstance(f, Tensor)]  # unfactored: sqrt(v)
        if not flat:
            return {}
        return dict(zip(flat, torch._foreach_sqrt([self.factors[i] for i in flat]), strict=True))

    def subset(self, indices: Sequence[int], views: Sequence[Tensor] | None = None) -> _FactoredDivisor:
        if views is not None:
            raise ValueError("Adafactor's divisor is formed from whole tensors, not slices")
        return _FactoredDivisor([self.g[i] for i in indices], [self.factors[i] for i in indices])


def _rms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))


class _AtLeast:
    """A check: a finite number >= ``bound`` (a class, not a closure, so a chain pickles)."""

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def __call__(self, value: Any) -> str | None:
        if positive(value) is not None or float(value) < self.bound:
            return f"must be a finite number >= {self.bound:g}"
        return None


def _threshold(min_d: float | None) -> Any:
    return positive if min_d is None else _AtLeast(min_d)


def _clamped_ratios(norms: list[Tensor], divisors: list[float], low: float) -> list[Tensor]:
    """``max(norm_i / divisor_i, low)`` per tensor: one vector op, not one op per tensor."""
    if not norms or hasattr(norms[0], "device_mesh"):  # FSDP2: DTensor norms stay per tensor
        return [torch.clamp(n / c, min=low) for n, c in zip(norms, divisors, strict=True)]
    # each divisor rounds once to the norms' dtype, as the Python number did in n / c
    return list((torch.stack(norms) / norms[0].new_tensor(divisors)).clamp_(min=low).unbind(0))


def _per_tensor_factor(ctx: Bucket, factors: list[Tensor], divide: bool) -> list[Tensor]:
    """Divide (or multiply) each update by its factor, eagerly: left for the final write while a
    divisor is pending (Adafactor's, formed there a block of rows at a time, so the update is never
    made), else in place in one list op (a list of scales would make the write a loop per tensor)."""
    if ctx.divisor is not None:
        ctx.defer_scale([1.0 / f for f in factors] if divide else factors)
        return ctx.updates
    ctx.materialize()
    updates = ctx.ensure_owned()
    (torch._foreach_div_ if divide else torch._foreach_mul_)(updates, factors)
    return updates


def clip_by_block_rms(d: float = 1.0, *, min_d: float | None = None, name: str = "clip_rms") -> Leaf:
    """Clip each tensor's update by its RMS: ``u <- u / max(1, RMS(u) / d)``.

    ``d`` must be > 0, and at least ``min_d`` when given (the ``adafactor`` recipe passes 1, the
    bound ``torch.optim.Adafactor`` enforces). Reference: Adafactor's update clipping, Shazeer &
    Stern, arXiv:1804.04235 (``d`` is torch's name). Peer: optax ``clip_by_block_rms``,
    ``torch.optim.Adafactor(d=...)``.
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        if ctx.tensor_scalars:  # the fused path: segment reductions of a flat buffer, or traced per tensor
            rms = ctx.tensor_norms(updates) / ctx.tensor_numels(updates).clamp(min=1.0).sqrt()
            torch._foreach_div_(updates, ctx.per_tensor((rms / hp["d"]).clamp(min=1.0)))
            return updates
        d = float(hp["d"])
        norms = ctx.update_norms()  # the pending forms included: Adafactor's divisor stays pending
        limits = [math.sqrt(max(u.numel(), 1)) * d for u in updates]
        return _per_tensor_factor(ctx, _clamped_ratios(norms, limits, 1.0), divide=True)

    # in place: the bucket hands over updates it owns (a gradient or state buffer is copied first)
    return transform(name, {"d": Hyperparam(d, _threshold(min_d))}, None, update, inplace=True, segmented=True,
                     reads_pending=True)


def scale_by_relative_step(lr: float = 1e-2, *, warmup_init: bool = False, name: str = "relative_step") -> Leaf:
    """Adafactor's relative step size: ``u <- rho_t * u`` with ``rho_t = min(lr, 1/sqrt(t))``.

    With ``warmup_init``: ``rho_t = min(lr, 1e-6 t, 1/sqrt(t))`` (the paper's warmup; with the
    default ``lr=1e-2`` identical to HF's ``min(1e-6 t, 1/sqrt(t))``). Positive: end the chain
    with ``scale(-1)``. ``lr`` is torch's name for the cap (schedulers act on it).
    Reference: Shazeer & Stern, arXiv:1804.04235. Peer: HF ``Adafactor(relative_step=True)``,
    ``torch.optim.Adafactor(lr=...)``.
    """

    def rho(hp: Mapping, ctx: Bucket) -> Any:
        cap = hp["lr"]
        if ctx.tensor_scalars:  # 0-d step counts (and lr) on the fused path: no host value, no recompile
            def traced(t: Tensor) -> Tensor:
                t = t.to(torch.float64)
                # the cap as a tensor operand: a clamp bound would fix a number cap (a scheduled lr in
                # a user's torch.compile of the eager step) to its value
                r = torch.minimum(1.0 / t.sqrt(), torch.ones_like(t) * cap)
                return torch.minimum(r, 1e-6 * t) if warmup_init else r

            return ctx.per_step(traced)
        cap = float(cap)
        if warmup_init:
            return ctx.per_step(lambda t: min(cap, 1e-6 * t, 1.0 / math.sqrt(t)))
        return ctx.per_step(lambda t: min(cap, 1.0 / math.sqrt(t)))

    return transform(name, {"lr": Hyperparam(lr, nonnegative)}, scale=rho, elementwise=True)


def scale_by_param_rms(eps: Any = 1e-3, *, name: str = "param_rms") -> Leaf:
    """Scale by the parameter's RMS: ``u <- max(eps, RMS(theta_{t-1})) * u``.

    ``eps`` is Adafactor's eps2 (zero-initialised params still move); it may be torch's pair
    ``(eps1, eps2)``, of which the second entry is used. Reference: Shazeer & Stern,
    arXiv:1804.04235 (parameter scaling). Peer: optax ``scale_by_param_block_rms``, HF
    ``Adafactor(scale_parameter=True)``, ``torch.optim.Adafactor``'s alpha_t.
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        if ctx.tensor_scalars:  # the fused path: segment reductions of a flat buffer, or traced per tensor
            rms = ctx.tensor_norms(ctx.params, ctx.dtype) / ctx.tensor_numels(updates).clamp(min=1.0).sqrt()
            torch._foreach_mul_(updates, ctx.per_tensor(rms.clamp(min=_pick(hp["eps"], 1))))
            return updates
        eps2 = float(_pick(hp["eps"], 1))
        norms = ops.norms(ctx.params, ctx.dtype)
        roots = [math.sqrt(max(p.numel(), 1)) for p in ctx.params]
        return _per_tensor_factor(ctx, _clamped_ratios(norms, roots, eps2), divide=False)

    return transform(name, {"eps": Hyperparam(eps, _eps_check(eps))}, None, update, inplace=True, segmented=True,
                     reads_pending=True)


def _lr_times_wd(hp: Mapping, ctx: Bucket) -> Any:
    if ctx.tensor_scalars:  # 0-d tensors on the fused path: a new lr does not recompile
        return hp["lr"] * hp["weight_decay"]
    return float(hp["lr"]) * float(hp["weight_decay"])


def add_lr_scaled_wd(weight_decay: float = 0.0, lr: float = 1e-2, *, name: str = "wd") -> Leaf:
    """Decoupled weight decay scaled by the group's ``lr``: ``u <- u + lr * weight_decay * theta``.

    For chains whose step size is not ``lr`` (Adafactor's relative step): placed before the final
    ``scale(-1)`` it gives ``theta <- theta (1 - lr wd) - step``, torch.optim.Adafactor's decay.
    Reference: Loshchilov & Hutter, arXiv:1711.05101. Peer: ``torch.optim.Adafactor(weight_decay)``.
    """
    spec = {"weight_decay": Hyperparam(weight_decay, nonnegative), "lr": Hyperparam(lr, nonnegative)}
    return transform(name, spec, param_term=_lr_times_wd, elementwise=True)
