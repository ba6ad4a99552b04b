"""Adaptive memory momentum (AM-SGD, AM-AdamW): a momentum coefficient chosen each step by a two-plane model.

Both transforms keep a memory direction ``d`` and pick this step's momentum ``beta_t`` by solving a
small proximal problem. The loss near the current point ``x_t`` is modelled by the larger of two
planes: the gradient plane ``f(x_t) + <g_t, x - x_t>`` and the memory plane, of slope ``d_t``,
whose value at ``x_t`` is the loss at the previous point ``f(x_{t-1})``. A proximal term keeps the
step near zero and, with weight ``lambda``, near the heavy-ball step. The dual of that problem
is a concave quadratic in the plane weight ``beta``; its maximiser, clipped, is ``beta_t``, and
the minimiser is the new direction ``d_{t+1}``.

Neither transform evaluates the loss twice: the memory plane's offset is estimated to first order,
``f(x_{t-1}) - f(x_t) ~ lr <g_t, d_t>`` (in the preconditioned metric for AM-AdamW), which
removes ``lr`` from the formulas. The exact offset would need ``f(x_{t-1})`` on the *current*
mini-batch (one more forward pass at the previous weights); the previous step's loss is on another
mini-batch, so its difference to this step's loss is dominated by batch-to-batch noise. There is
therefore no loss-aware variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, Leaf, StateDict, Transform, resolve_hyperparam, scalar_state, transform, zeros_state
from ..hyperparams import Hyperparam, nonnegative, positive, unit_interval

__all__ = ["adaptive_memory_momentum", "scale_by_am_adamw"]


def _check_beta_range(hp: Mapping[str, Any]) -> None:
    lo, hi = float(hp["beta_min"]), float(hp["beta_max"])
    if lo > hi:
        raise ValueError(f"invalid hyperparameters beta_min={lo!r}, beta_max={hi!r}: need beta_min <= beta_max")


def _total(parts: list[Tensor]) -> Tensor:
    """The sum of 0-d tensors from several buckets, on the first one's device, in the widest dtype."""
    dtype = parts[0].dtype
    for x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    device = parts[0].device
    return torch.stack([x.to(device=device, dtype=dtype) for x in parts]).sum()


def _squared_norms(tensors: list[Tensor]) -> Tensor | None:
    """sum of ||t||^2 over the non-empty tensors (empty ones add nothing and must not change the order)."""
    live = [t for t in tensors if t.numel()]
    if not live:
        return None
    n = torch.stack(torch._foreach_norm(live))
    return (n * n).sum()


class _AdaptiveMemory(Transform):
    """See :func:`adaptive_memory_momentum`."""

    def __init__(self, specs: dict[str, Hyperparam], name: str) -> None:
        if not name or "." in name:
            raise ValueError(f"transform name {name!r} must be non-empty and contain no '.'")
        self.name = name
        self._specs = specs
        self._keys = {k: k for k in specs}
        self.extra_defaults: dict[str, Any] = {}
        self.validate_group({k: s.default for k, s in self.hyperparams.items()})

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {self._keys[k]: s for k, s in self._specs.items()}

    def renamed(self, mapping: Mapping[str, str]) -> _AdaptiveMemory:
        new = _AdaptiveMemory.__new__(_AdaptiveMemory)
        new.__dict__.update(self.__dict__)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    def validate_group(self, group: Mapping[str, Any]) -> None:
        super().validate_group(group)
        local = {k: group[g] for k, g in self._keys.items() if g in group}
        if len(local) == len(self._keys) and not any(callable(v) and not isinstance(v, Tensor) for v in local.values()):
            _check_beta_range(local)

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        return {f"{self.name}.memory": zeros_state(param), f"{self.name}.beta": scalar_state(param)}

    def _hp(self, b: Bucket) -> dict[str, float]:
        return {k: float(resolve_hyperparam(g, self._specs[k], b.group[g], b)) for k, g in self._keys.items()}

    def apply(self, buckets: list[Bucket]) -> None:
        live = [b for b in buckets if len(b)]
        if not live:
            return
        hps = [self._hp(b) for b in live]
        for k in self._specs:
            if any(h[k] != hps[0][k] for h in hps):
                raise ValueError(
                    f"{self.name}: beta_t is one for all params, but param groups set {self._keys[k]} to "
                    f"{sorted({h[k] for h in hps})}"
                )
        _check_beta_range(hps[0])
        lam, lo, hi = hps[0]["am_lambda"], hps[0]["beta_min"], hps[0]["beta_max"]
        gg, dd = [], []
        for b in live:
            g = b.materialize()
            d = b.state[f"{self.name}.memory"]
            for i, t in enumerate(b.step_values):
                if t == 1.0:  # d_0 = g_0: a tensor's first step is its plain gradient, whatever beta
                    d[i].copy_(g[i])
            sg = _squared_norms(g)
            sd = _squared_norms(torch._foreach_sub(d, g))
            if sg is not None and sd is not None:
                gg.append(sg)
                dd.append(sd)
        if not gg:
            beta = torch.zeros((), dtype=live[0].dtype, device=live[0].params[0].device)
        else:
            G, B = _total(gg), _total(dd)
            # first-order two-plane solution: ((1+lam) <g,d> - <d-g, g+lam d>) / ||d-g||^2,
            # which simplifies to (1+lam) ||g||^2 / ||d-g||^2 - lam; where d = g it grows without
            # bound (the memory plane lies above: the proximal solution is beta = 1), so beta_max
            beta = torch.where(B > 0, (1.0 + lam) * G / B - lam, hi).clamp(min=lo, max=hi)
        for b in live:
            p0 = b.params[0]
            beta_b = beta.to(device=p0.device, dtype=b.dtype)
            # d <- ((beta + lam) d + (1 - beta) g) / (1 + lam) = lerp(d, g, (1 - beta)/(1 + lam))
            w = (1.0 - beta_b) / (1.0 + lam)
            d = b.state[f"{self.name}.memory"]
            torch._foreach_lerp_(d, b.updates, [w] * len(d))
            for s in b.state[f"{self.name}.beta"]:
                s.copy_(beta_b)
            b.updates = b.lend(list(d))


def adaptive_memory_momentum(
    am_lambda: float = 0.1,
    beta_max: float = 0.9,
    beta_min: float = 0.0,
    *,
    name: str = "am",
) -> Transform:
    """Adaptive memory momentum (AM-SGD): heavy-ball momentum with ``beta_t`` from a two-plane model.

    Rule (``g`` the incoming update, ``d`` the memory, ``d_0 = g_0`` per tensor)::

        beta_t  = clip(((1+lam) <g,d> - <d-g, g+lam d>) / ||d-g||^2, beta_min, beta_max)
                = clip((1+lam) ||g||^2 / ||d-g||^2 - lam, beta_min, beta_max)
        d_{t+1} = ((beta_t + lam) d_t + (1 - beta_t) g_t) / (1 + lam)

    and the update is ``d_{t+1}`` (put ``scale_by_lr`` after it). The inner products run over
    every element of every param of every group at once: one ``beta_t`` per step, one global
    reduction (no host sync; under FSDP2 each sum is a DTensor reduction). ``beta_t`` is the
    maximiser over ``[0, 1]`` of the dual of the two-plane proximal problem described in this
    module's docstring (see the module), capped at ``beta_max``; with the first-order estimate of
    the memory plane's offset it does not depend on ``lr``. ``lam`` (group key ``am_lambda``)
    also pulls the new direction toward the old one. Where ``d = g`` the ratio is unbounded and
    ``beta_t = beta_max`` (the proximal solution there is ``beta = 1``; ``d`` is the same for any
    ``beta``). State: ``memory`` (1x) and the last ``beta`` (a 0-d tensor per param, the same for
    all: for logging). All groups must share ``am_lambda``, ``beta_min`` and ``beta_max``.

    Sources: from the paper itself (Topollai & Choromanska, "Adaptive Memory Momentum via a
    Model-Based Framework for Deep Learning Optimization", arXiv:2510.04988) only the idea was
    read: two planes, a proximal step, an adaptive ``beta``, SGD and AdamW variants. The ``d``
    update is quoted from a summary of the paper; the ``beta_t`` formula, the inner products over
    all params, ``d_0 = g_0`` and the defaults ``lam = 0.1``, ``beta_max = 0.9`` come from a
    third-party re-implementation (which sets ``beta_t = 0`` where ``d = g``). Here ``beta_t``
    is derived again from the proximal problem, and the tests solve that problem numerically.
    No peer.
    """
    specs = {
        "am_lambda": Hyperparam(am_lambda, nonnegative),
        "beta_max": Hyperparam(beta_max, unit_interval),
        "beta_min": Hyperparam(beta_min, unit_interval),
    }
    return _AdaptiveMemory(specs, name)


def scale_by_am_adamw(
    am_lambda: float = 0.1,
    beta_max: float | None = None,
    beta_min: float = 0.0,
    beta2: float = 0.999,
    eps: float = 1e-8,
    *,
    name: str = "am_adamw",
) -> Leaf:
    """AM-AdamW's direction: Adam's second moment as the metric, ``beta_t`` per tensor in that metric.

    Rule, per tensor (elementwise products and divisions; ``g`` the incoming update)::

        v_t     = beta2 v + (1 - beta2) g^2
        P_t     = (1 - beta_max prod_{i<t} beta_i) (sqrt(v_t / (1 - beta2^t)) + eps)
        beta_t  = clip((sum g^2/P - lam sum (d-g)^2/(1+lam P)) / sum (d-g)^2/(P (1+lam P)),
                       beta_min, beta_max)
        d_{t+1} = ((1 - beta_t) g + (lam P + beta_t) d) / (1 + lam P)

    and the update is ``d_{t+1} / P_t`` (``d_0 = 0``); with ``add_decoupled_wd`` and ``scale_by_lr``
    after it: ``p <- p (1 - lr wd) - lr d_{t+1}/P_t``. ``beta_t`` maximises, over ``[0, 1]``, the dual
    of the two-plane problem with the proximal term ``(1/2lr) <x, P x> + (lam/2lr) ||P x + lr d||^2``
    (the metric in which that ``d`` update is the minimiser) and the memory plane's offset
    estimated as ``lr <g, d/P>``. ``P`` needs the bias correction before ``beta_t`` is known, so it
    uses ``beta_max`` for the current step. With ``lam = 0`` and ``beta_min = beta_max = b1`` it
    is exactly Adam's direction with betas ``(b1, beta2)`` (tested against ``torch.optim.AdamW``).

    Group keys ``am_lambda``, ``beta_max`` (default ``0.9 - 0.1 lam``), ``beta_min``, ``beta2``,
    ``eps`` (``> 0``: ``P`` divides sums). State: ``memory`` and ``exp_avg_sq`` (2x), the running
    product ``beta_prod`` and the last ``beta`` (0-d each).

    Where ``d = g`` the ratio is unbounded and ``beta_t = beta_max`` (the proximal solution): a
    tensor whose gradient is still all zero then keeps Adam's bias correction.

    Sources: the two-plane idea and an AdamW variant are the paper's (Topollai & Choromanska,
    arXiv:2510.04988; only its abstract was read). The metric ``P``, its bias-correction factor,
    the ``d`` update in that metric, per-tensor ``beta_t`` and the default
    ``beta_max = 0.9 - 0.1 lam`` come from a third-party re-implementation; the ``beta_t``
    formula is derived here from the proximal problem whose minimiser is that ``d`` update, and the
    tests solve that problem numerically. No peer.
    """
    if beta_max is None:
        beta_max = 0.9 - 0.1 * am_lambda  # 0.89 at the default lam = 0.1

    def init(p: Tensor) -> dict:
        return {
            "memory": zeros_state(p),
            "exp_avg_sq": zeros_state(p),
            "beta_prod": scalar_state(p, 1.0),
            "beta": scalar_state(p),
        }

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        lam, hi, lo = hp["am_lambda"], hp["beta_max"], hp["beta_min"]
        b2 = hp["beta2"]
        d, v, prod, last = state["memory"], state["exp_avg_sq"], state["beta_prod"], state["beta"]
        ops.update_moment_per_elem_norm(v, updates, b2)
        P = torch._foreach_sqrt(v)
        ops.div_(P, ctx.per_step(lambda t: ops.sqrt(ops.bias_correction(b2, t))))
        ops.add_(P, hp["eps"])
        # each tensor has its own beta_t: per-tensor sums, and per-tensor factors as vectors
        pv = ctx.state_vector(prod)
        torch._foreach_mul_(P, ctx.per_tensor(1.0 - hi * pv))
        q = torch._foreach_mul(P, lam)
        torch._foreach_add_(q, 1.0)
        dq = torch._foreach_sub(d, updates)
        torch._foreach_mul_(dq, dq)
        torch._foreach_div_(dq, q)
        gg = torch._foreach_mul(updates, updates)
        torch._foreach_div_(gg, P)
        num = ctx.tensor_sums(gg) - lam * ctx.tensor_sums(dq)
        torch._foreach_div_(dq, P)
        den_b = ctx.tensor_sums(dq)
        beta = torch.where(den_b > 0, num / den_b, hi).clamp(min=lo, max=hi)
        coef = torch._foreach_mul(P, lam)
        torch._foreach_add_(coef, ctx.per_tensor(beta))
        torch._foreach_mul_(d, coef)
        torch._foreach_addcmul_(d, updates, ctx.per_tensor(1.0 - beta))
        torch._foreach_div_(d, q)
        ctx.store_state_vector(prod, pv * beta)
        ctx.store_state_vector(last, beta)
        return torch._foreach_div(d, P)

    spec = {
        "am_lambda": Hyperparam(am_lambda, nonnegative),
        "beta_max": Hyperparam(beta_max, unit_interval),
        "beta_min": Hyperparam(beta_min, unit_interval),
        "beta2": Hyperparam(beta2, unit_interval),
        "eps": Hyperparam(eps, positive),
    }
    return transform(name, spec, init, update, segmented=True, check=_check_beta_range)
