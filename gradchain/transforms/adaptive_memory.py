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
from .._dtensor import plain
from ..base import (
    Bucket,
    Leaf,
    StateDict,
    Transform,
    apply_phases,
    resolve_hyperparam,
    scalar_state,
    transform,
    zeros_state,
)
from ..hyperparams import Hyperparam, nonnegative, positive, unit_interval, validate

__all__ = ["adaptive_memory_momentum", "scale_by_am_adamw"]


def _check_beta_range(hp: Mapping[str, Any]) -> None:
    lo, hi = float(hp["beta_min"]), float(hp["beta_max"])
    if lo > hi:
        raise ValueError(f"invalid hyperparameters beta_min={lo!r}, beta_max={hi!r}: need beta_min <= beta_max")


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype of AM-SGD's two sums: float64 (mps has none)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _squared_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor | None:
    """``||t||^2`` of each non-empty tensor, as one vector in ``dtype``; None if all are empty (a
    bucket without elements adds no term)."""
    live = [t for t in tensors if t.numel()]
    if not live:
        return None
    # the norms computed in ``dtype``: squares of fp32 values under about 1e-19 (or over 1e19)
    # leave the fp32 range, and beta_t is a ratio of two such sums
    n = torch.stack(torch._foreach_norm(live, 2, dtype=dtype))
    return n * n


def _add_in_order(total: Tensor | None, terms: Tensor) -> Tensor:
    """``total + t_1 + t_2 + ...`` for the vector ``terms`` (``total`` None: no term yet).

    The eager pieces run pass 1 over parts of a bucket: added one term at a time, in order, their
    sums keep the bits of the whole bucket's. A float64 ``cumsum`` on the CPU adds left to right in
    one call (pieces run on the CPU only); elsewhere (sharded terms, a trace, another device) the
    bucket's terms are summed first."""
    # full values: a sharded bucket's terms meet a plain bucket's (FSDP2 with ignored params)
    terms = plain(terms)
    if total is not None:
        terms = terms.to(device=total.device)  # buckets on several devices: the first one's
    if terms.device.type == "cpu" and terms.dtype == torch.float64 and not hasattr(terms, "device_mesh") \
            and not torch.compiler.is_compiling():
        if total is not None:
            terms = torch.cat([total.reshape(1), terms])
        return terms.cumsum(0)[-1]
    s = terms.sum()
    return s if total is None else total + s


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

    # -- one beta for every group ---------------------------------------------------------------
    def _shared_hp(self, hps: list[Mapping[str, Any]]) -> dict[str, float]:
        """The hyperparameters of the one ``beta_t`` (host numbers, by local name), which every
        group must agree on."""
        values = [{k: float(h[k]) for k in self._specs} for h in hps]
        for k in self._specs:
            if any(v[k] != values[0][k] for v in values):
                raise ValueError(
                    f"{self.name}: beta_t is one for all params, but param groups set {self._keys[k]} to "
                    f"{sorted({v[k] for v in values})}"
                )
        _check_beta_range(values[0])
        return values[0]

    def validate_groups(self, resolved: list[Mapping[str, Any]]) -> None:
        """Every group's resolved values (by group key) agree, checked before any state moves."""
        self._shared_hp([{k: r[g] for k, g in self._keys.items()} for r in resolved])

    # -- the step: pass 1 per bucket (d_0 = g_0, the sums), one beta_t, pass 2 per bucket --------
    # (the fused path runs accumulate and finish compiled over each flat bucket: ``fused_phases``)
    fused_phases = True
    # pass 2 is a lerp per element (its sums are all in pass 1): the eager pieces may run it on slices
    finish_elementwise = True

    def bucket_hyperparams(self, b: Bucket) -> dict[str, Any]:
        """This transform's hyperparameters in ``b``'s group (schedules evaluated), by local name."""
        return {k: resolve_hyperparam(g, self._specs[k], b.group[g], b) for k, g in self._keys.items()}

    def prepare(self, hps: list[dict[str, Any]], gstate: Mapping[str, Tensor] | None) -> dict[str, float]:
        """``lam``, ``beta_min`` and ``beta_max`` of this step (host numbers), once every group is
        found to agree on them."""
        shared = self._shared_hp(hps)
        return {"lam": shared["am_lambda"], "lo": shared["beta_min"], "hi": shared["beta_max"]}

    def bucket_flags(self, hp: dict[str, Any]) -> dict[str, bool]:
        return {"frozen": False}  # every group counts in beta_t (an lr of 0 stops it later)

    def init_accumulators(self, c: dict[str, Any], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """``sum ||g||^2`` and ``sum ||d - g||^2``: none yet (the first bucket's terms start them,
        DTensors under FSDP2)."""
        return None, None

    def _memory(self, b: Bucket, g: list[Tensor]) -> list[Tensor]:
        """``d`` with ``d_0 = g_0``: a tensor's first step is its plain gradient, whatever beta.

        With host step numbers, ``d`` is written where a tensor takes its first step (rarely). With
        tensor step numbers (the fused path's flat bucket, one step for all its params) the rule is a
        ``where`` and ``d`` is left alone: pass 2 applies the same ``where`` before its lerp, which
        compiles into the one write of ``d`` per step."""
        d = b.state[f"{self.name}.memory"]
        if b.tensor_scalars:
            return [torch.where(t == 1, y, x) for x, y, t in zip(d, g, b.step_values, strict=True)]
        for x, y, t in zip(d, g, b.step_values, strict=True):
            if t == 1.0:
                x.copy_(y)
        return d

    def accumulate(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any],
                   acc: tuple[Tensor | None, Tensor | None],
                   reuse: bool = False) -> tuple[tuple[Tensor | None, Tensor | None], None]:
        """Pass 1 over one bucket: ``d_0 = g_0``, then adds the bucket's ``||g||^2`` and
        ``||d - g||^2`` to the sums. Hands nothing to pass 2, which reads ``g`` and ``d`` again."""
        gg, dd = acc
        g = b.materialize()
        diff = torch._foreach_sub(self._memory(b, g), g)
        dtype = _sum_dtype(g[0].device)
        if b.segments is not None:
            # the fused path's flat buffer: per-param sums, which leave out the gaps between params
            if not any(b.segments[2]):
                return acc, None  # no element: no term (as a bucket of empty tensors on a list)
            g64, d64 = g[0].to(dtype), diff[0].to(dtype)  # squares in float64, as the eager norms
            sg = b.tensor_sums([g64 * g64]).sum()
            sd = b.tensor_sums([d64 * d64]).sum()
            if gg is None or dd is None:
                return (sg, sd), None
            return (gg + sg.to(device=gg.device), dd + sd.to(device=dd.device)), None
        sg, sd = _squared_norms(g, dtype), _squared_norms(diff, dtype)
        if sg is None or sd is None:
            return acc, None
        return (_add_in_order(gg, sg), _add_in_order(dd, sd)), None

    def estimate(self, c: dict[str, Any], acc: tuple[Tensor | None, Tensor | None],
                 gstate: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """``beta_t`` from the sums over every bucket, and the weight of pass 2's lerp."""
        G, B = acc
        lam, lo, hi = c["lam"], c["lo"], c["hi"]
        if G is None or B is None:  # no element anywhere: d is the same for any beta
            beta = torch.zeros((), dtype=torch.float64)
        else:
            # first-order two-plane solution: ((1+lam) <g,d> - <d-g, g+lam d>) / ||d-g||^2,
            # which simplifies to (1+lam) ||g||^2 / ||d-g||^2 - lam; where d = g it grows without
            # bound (the memory plane lies above: the proximal solution is beta = 1), so beta_max
            beta = torch.where(B > 0, (1.0 + lam) * G / B - lam, hi).clamp(min=lo, max=hi)
        # d <- ((beta + lam) d + (1 - beta) g) / (1 + lam) = lerp(d, g, (1 - beta)/(1 + lam))
        return {"beta": beta, "w": (1.0 - beta) / (1.0 + lam)}

    def finish(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any], carry: Any) -> None:
        """Pass 2 over one bucket: the new ``d`` (the update) and the last ``beta``."""
        g = b.materialize()
        d = b.state[f"{self.name}.memory"]
        if b.tensor_scalars:  # pass 1 left d alone (see _memory)
            for x, y, t in zip(d, g, b.step_values, strict=True):
                x.copy_(torch.where(t == 1, y, x))
        device = b.params[0].device
        beta, w = (c[k].to(device=device, dtype=b.dtype) for k in ("beta", "w"))
        if b.tensor_scalars:
            # traced: a lerp per tensor fuses into the kernel, where a foreach lerp with tensor
            # weights stays an opaque call (a pass of its own over d and g)
            for x, y in zip(d, g, strict=True):
                x.lerp_(y, w)
        else:
            torch._foreach_lerp_(d, g, [w] * len(d))
        betas = b.state[f"{self.name}.beta"]
        if b.segments is None and not hasattr(betas[0], "device_mesh"):
            torch._foreach_copy_(betas, [beta] * len(betas))
        else:
            # the flat bucket's one vector of betas (a broadcast), or DTensors (no foreach copy rule)
            for s in betas:
                s.copy_(beta)
        b.updates = b.lend(list(d))

    def apply(self, buckets: list[Bucket]) -> None:
        apply_phases(self, buckets)


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

    and the update is ``d_{t+1}`` (put ``scale_by_lr`` after it). The inner products run over every
    element of every param of every group at once: one ``beta_t`` per step, one global reduction,
    its two sums in float64, squares included (fp32 grads under about 1e-19 or over 1e19 keep their
    ratio; no host sync; under FSDP2 each sum is a DTensor reduction). On the
    fused path (``fused_phases``) ``d_0 = g_0`` and the two sums are compiled per flat bucket, and
    the ``d`` update, the elementwise transforms after it (``scale_by_lr``) and the write are one
    compiled pass per bucket; ``apply`` states the rule once for both paths. ``beta_t`` is the
    maximiser over ``[0, 1]`` of the dual of the two-plane proximal problem described in this
    module's docstring (see the module), capped at ``beta_max``; with the first-order estimate of
    the memory plane's offset it does not depend on ``lr``. ``lam`` (group key ``am_lambda``) also
    pulls the new direction toward the old one. Where ``d = g`` the ratio is unbounded and
    ``beta_t = beta_max`` (the proximal solution there is ``beta = 1``; ``d`` is the same for any
    ``beta``).
    State: ``memory`` (1x) and the last ``beta`` (a 0-d tensor per param, the same for all: for
    logging). All groups must share ``am_lambda``, ``beta_min`` and ``beta_max``.

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
        validate("am_lambda", Hyperparam(None, nonnegative), am_lambda)  # before it sets beta_max's default
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
        # at most P, q and one scratch list alive at once (a large tensor's step holds three
        # temporaries of its size): each scratch is dropped before the next is made
        scratch = torch._foreach_mul(updates, updates)
        torch._foreach_div_(scratch, P)
        sum_gg = ctx.tensor_sums(scratch)
        del scratch
        q = torch._foreach_mul(P, lam)
        torch._foreach_add_(q, 1.0)
        scratch = torch._foreach_sub(d, updates)
        torch._foreach_mul_(scratch, scratch)
        torch._foreach_div_(scratch, q)
        num = sum_gg - lam * ctx.tensor_sums(scratch)
        torch._foreach_div_(scratch, P)
        den_b = ctx.tensor_sums(scratch)
        del scratch
        beta = torch.where(den_b > 0, num / den_b, hi).clamp(min=lo, max=hi)
        coef = torch._foreach_mul(P, lam)
        torch._foreach_add_(coef, ctx.per_tensor(beta))
        torch._foreach_mul_(d, coef)
        del coef
        torch._foreach_addcmul_(d, updates, ctx.per_tensor(1.0 - beta))
        torch._foreach_div_(d, q)
        del q
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
