"""Prodigy: Adam whose step size d is estimated on the fly from how far the params have moved."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._dtensor import plain, replicate_like
from ..base import Bucket, RootDivisor, StateDict, Transform, apply_phases, resolve_hyperparam, zeros_state
from ..hyperparams import Hyperparam, betas_pair, nonnegative, positive, unit_interval
from ..hyperparams import betas as check_betas

__all__ = ["scale_by_prodigy"]

# hyperparameters that make the one d estimate: every param group must agree on them
_SHARED = ("betas", "beta3", "d_coef", "growth_rate")


def _beta3(value: Any) -> str | None:
    return None if value is None else unit_interval(value)


def _growth(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)) or (
            isinstance(value, Tensor) and value.numel() != 1):
        return "must be a number > 0 (inf: unbounded)"
    x = float(value)
    return None if x > 0 and not math.isnan(x) else "must be a number > 0 (inf: unbounded)"


_plain = plain

# mean elements per tensor from which pass 1 keeps a scratch buffer per tensor for pass 2 (256 KB in fp32)
_LARGE = 1 << 16


def _like(t: Tensor, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The plain 0-d ``t`` on ``like``'s device and in ``dtype``: a replicated DTensor if ``like`` is one."""
    return replicate_like(t.to(device=like.device, dtype=dtype), like)


def _sum_in_order(total: Tensor, terms: list[Tensor], coef: Tensor | None = None) -> Tensor:
    """``total + coef t_1 + coef t_2 + ...`` added one term at a time, in order, in ``total``'s dtype.

    The official optimizer adds each param's term to a float64 host number in turn; the estimate is
    a ratio of sums that cancel in the first steps, so the order of the additions is kept. A
    float64 ``cumsum`` on the CPU adds left to right (the same bits) in one call rather than two
    small ops per param; elsewhere (sharded terms, a trace: the fused path's one flat term) the
    terms are added one by one."""
    if not terms:
        return total
    if total.device.type != "cpu" or hasattr(terms[0], "device_mesh") or torch.compiler.is_compiling():
        for t in terms:
            t = _plain(t).to(device=total.device, dtype=total.dtype)
            total = total + (t if coef is None else coef * t)
        return total
    vec = torch.stack(terms).to(device=total.device, dtype=total.dtype)
    if coef is not None:
        vec = coef * vec
    return torch.cat([total.reshape(1), vec]).cumsum(0)[-1]


class Prodigy(Transform):
    """See :func:`scale_by_prodigy`."""

    momentum_state = ("exp_avg",)

    def __init__(
        self,
        specs: dict[str, Hyperparam],
        d0: float,
        decouple: bool,
        use_bias_correction: bool,
        safeguard_warmup: bool,
        slice_p: int,
        momentum: bool,
        name: str,
    ) -> None:
        if not name or "." in name:
            raise ValueError(f"transform name {name!r} must be non-empty and contain no '.'")
        if isinstance(d0, bool) or not isinstance(d0, (int, float)) or not (math.isfinite(d0) and d0 > 0):
            raise ValueError(f"invalid d0={d0!r}: must be a finite number > 0")
        if isinstance(slice_p, bool) or not isinstance(slice_p, int) or slice_p < 1:
            raise ValueError(f"invalid slice_p={slice_p!r}: must be an int >= 1")
        self.name, self._specs = name, specs
        self._keys = {k: k for k in specs}
        self.d0, self.decouple, self.slice_p, self.momentum = float(d0), bool(decouple), slice_p, momentum
        self.use_bias_correction, self.safeguard_warmup = bool(use_bias_correction), bool(safeguard_warmup)
        self.extra_defaults: dict[str, Any] = {}
        self.validate_group({k: s.default for k, s in self.hyperparams.items()})

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {self._keys[k]: s for k, s in self._specs.items()}

    def renamed(self, mapping: Mapping[str, str]) -> Prodigy:
        new = Prodigy.__new__(Prodigy)
        new.__dict__.update(self.__dict__)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    # -- state --------------------------------------------------------------------------------
    def _sliced(self, t: Tensor) -> Tensor:
        return t if self.slice_p == 1 else t.reshape(-1)[:: self.slice_p]

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        if self.slice_p > 1 and hasattr(param, "device_mesh"):
            raise ValueError("scale_by_prodigy(slice_p > 1) does not support sharded (DTensor) params; use slice_p=1")
        pre = self.name + "."
        p0 = zeros_state(param)
        p0.copy_(param.detach())
        st = {pre + "exp_avg_sq": zeros_state(param), pre + "s": zeros_state(self._sliced(p0)), pre + "p0": p0}
        if self.slice_p > 1:
            st[pre + "p0"] = self._sliced(p0).clone()
        if self.momentum:
            st[pre + "exp_avg"] = zeros_state(param)
        return st

    def init_global_state(self, device: torch.device) -> StateDict:
        """d, its running max, the numerator's EMA and the step count: float64, one per optimizer."""
        dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        full = lambda v: torch.full((), v, dtype=dtype, device=device)  # noqa: E731
        pre = self.name + "."
        return {pre + "d": full(self.d0), pre + "d_max": full(self.d0), pre + "d_numerator": full(0.0),
                pre + "k": full(0.0)}

    # -- the step -----------------------------------------------------------------------------
    def bucket_hyperparams(self, b: Bucket) -> dict[str, Any]:
        """This transform's hyperparameters in ``b``'s group (schedules evaluated), by local name."""
        return {k: resolve_hyperparam(g, self._specs[k], b.group[g], b) for k, g in self._keys.items()}

    def _shared_hp(self, hps: list[dict[str, Any]]) -> dict[str, Any]:
        first = hps[0]
        for key in _SHARED:
            values = {repr(h[key]) for h in hps}
            if len(values) > 1:
                raise ValueError(
                    f"{self.name}: Prodigy keeps one d estimate for the whole optimizer, but param groups set "
                    f"{self._keys[key]} to {sorted(values)}; give every group the same value"
                )
        lrs = sorted({float(h["lr"]) for h in hps})
        if len([x for x in lrs if x != 0.0]) > 1:
            raise ValueError(
                f"{self.name}: Prodigy's step size is one for the optimizer, but param groups set "
                f"{self._keys['lr']} to {lrs}; give every group the same lr (or 0 to freeze a group)"
            )
        b1 = float(first["betas"][0])
        if b1 > 0 and not self.momentum:
            raise ValueError(f"{self.name}: built with betas[0] = 0 (no first moment kept); a group sets betas[0]={b1}")
        return {**first, "lr": lrs[-1]}

    # -- the step: pass 1 per bucket, one estimate of d, pass 2 per bucket -----------------------
    # pass 2 is elementwise (its sums are all in pass 1): the eager pieces may run it on slices
    finish_elementwise = True

    @property
    def fused_phases(self) -> bool:
        """The fused path compiles ``accumulate`` and ``finish`` over each flat bucket (``reuse=False``,
        0-d tensor hyperparameters) and runs ``prepare`` and ``estimate`` once in between; not with
        ``slice_p > 1``, whose per-tensor strided slices a flat buffer does not hold."""
        return self.slice_p == 1

    def validate_groups(self, resolved: list[Mapping[str, Any]]) -> None:
        """The one-per-optimizer hyperparameters agree across groups (by group key, host values)."""
        self._shared_hp([{k: r[g] for k, g in self._keys.items()} for r in resolved])

    def prepare(self, hps: list[dict[str, Any]], gstate: StateDict) -> dict[str, Any] | None:
        """The coefficients of this step from every group's hyperparameters (host numbers) and the old
        d; None when every group is frozen (lr 0)."""
        if gstate is None:
            raise RuntimeError(f"{self.name}: Prodigy keeps optimizer-level state; run it in a ChainOptimizer")
        shared = self._shared_hp(hps)
        lr = float(shared["lr"])
        b1, b2 = (float(x) for x in shared["betas"])
        b3 = math.sqrt(b2) if shared["beta3"] is None else float(shared["beta3"])
        if lr == 0.0:  # every group frozen: nothing moves, not even the estimate
            return None
        d, k = gstate[self.name + ".d"], gstate[self.name + ".k"]
        if self.use_bias_correction:
            dlr = d * lr * ((1.0 - b2 ** (k + 1.0)).sqrt() / (1.0 - b1 ** (k + 1.0)))
        else:
            dlr = d * lr
        ratio = d / self.d0  # d / d0 keeps the numerator and s from becoming tiny
        num_coef = ratio * dlr
        return {"b1": b1, "b2": b2, "b3": b3, "use_m": b1 > 0, "d": d, "dlr": dlr, "num_coef": num_coef,
                "s_coef": ratio * d if self.safeguard_warmup else num_coef,
                "d_coef": float(shared["d_coef"]), "growth": float(shared["growth_rate"])}

    def bucket_flags(self, hp: dict[str, Any]) -> dict[str, bool]:
        """Host branches of one group: frozen (lr 0), and which form its weight decay takes."""
        wd = float(hp["weight_decay"])
        return {"frozen": float(hp["lr"]) == 0.0, "coupled_wd": wd != 0.0 and not self.decouple,
                "decoupled_wd": wd != 0.0 and self.decouple}

    def init_accumulators(self, c: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor]:
        """The sums of pass 1 before any bucket: the numerator's increment and ``|s|_1``, 0-d like d."""
        return torch.zeros_like(c["d"]), torch.zeros_like(c["d"])

    def _direction(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool]) -> tuple[list[Tensor], list[Tensor]]:
        g = b.materialize()
        params = [p if p.dtype == b.dtype else p.to(b.dtype) for p in b.params]
        if flags["coupled_wd"]:
            wd = hp["weight_decay"]
            g = ([torch.addcmul(x, p, wd) for x, p in zip(g, params, strict=True)] if isinstance(wd, Tensor)
                 else torch._foreach_add(g, params, alpha=float(wd)))
        return g, params

    def accumulate(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any],
                   acc: tuple[Tensor, Tensor], reuse: bool) -> tuple[tuple[Tensor, Tensor], Any]:
        """Pass 1 over one bucket: m, v and s with the old d; adds the bucket's terms of the
        numerator's increment and of ``|s|_1`` to ``acc``. Returns the new sums and what pass 2 may
        reuse (the direction and, with ``reuse``, scratch buffers)."""
        pre = self.name + "."
        g, params = self._direction(b, hp, flags)
        d = c["d"]
        p0, s, v = b.state[pre + "p0"], b.state[pre + "s"], b.state[pre + "exp_avg_sq"]
        p_sl, g_sl = [self._sliced(p) for p in params], [self._sliced(x) for x in g]
        diffs = torch._foreach_sub(p0, p_sl)
        # one scratch buffer per tensor, reused for every temporary of the step: each fresh
        # model-sized temporary costs page faults on CPU, and the results keep their bits. out= takes
        # plain tensors only (DTensor has no rule for it); with slice_p == 1 the scratch has the
        # params' shapes and serves pass 2 too. Small tensors (a temporary from the allocator's
        # free lists) take one list op rather than an op per tensor
        reuse = reuse and bool(params) and not hasattr(params[0], "device_mesh")
        full = reuse and self.slice_p == 1 and sum(map(Tensor.numel, v)) >= _LARGE * len(v)
        dot_sum, l1_sum = acc
        sharded = hasattr(params[0], "device_mesh") if params else False
        dots = [(x * y).sum() if sharded else torch.dot(x.reshape(-1), y.reshape(-1))
                for x, y in zip(g_sl, diffs, strict=True)]
        dot_sum = _sum_in_order(dot_sum, dots, c["num_coef"])
        like = params[0]
        n = len(g)
        b1, b2 = c["b1"], c["b2"]
        # on the CPU, eagerly, the official ops with the coefficients as numbers (a host read of a
        # CPU number costs nothing; one list op, no 0-d factor broadcast per tensor); elsewhere
        # addcmul with a 0-d coefficient, the fused multiply-add of the official add_(g, alpha=c):
        # the same bits, which matter because p0 - p is tiny in the first steps
        host = like.device.type == "cpu" and not sharded and not torch.compiler.is_compiling()

        def add_scaled(xs: list[Tensor], ys: list[Tensor], coef: Tensor) -> None:
            if host:
                torch._foreach_add_(xs, ys, alpha=float(coef))
            else:
                torch._foreach_addcmul_(xs, ys, [coef] * n)

        if self.momentum:
            m = b.state[pre + "exp_avg"]
            ops.mul_(m, b1)
            add_scaled(m, g, _like(d * (1.0 - b1), like, b.dtype))
        ops.mul_(v, b2)
        c2 = _like(d * d * (1.0 - b2), like, b.dtype)
        if full:
            for vi, gi, w in zip(v, g, diffs, strict=True):
                vi.addcmul_(torch.mul(gi, c2, out=w), gi)
        elif host:
            # the official addcmul_(g, g, value=d^2 (1 - b2)) as one list op: a host read of a CPU
            # number costs nothing, and (value g) g keeps the bits of the form below
            torch._foreach_addcmul_(v, g, g, c2.item())
        else:
            torch._foreach_addcmul_(v, torch._foreach_mul(g, c2), g)
        ops.mul_(s, c["b3"])
        add_scaled(s, g_sl, _like(c["s_coef"], like, b.dtype))
        if sharded or torch.compiler.is_compiling():
            # traced, an abs and a sum fuse into the kernel that updates s, where a list norm is an
            # opaque call that first writes s to a full-size buffer of its own
            norms = [x.abs().sum() for x in s]
        else:
            # s has the sliced shape; one call for the bucket, not an abs and a sum per tensor
            norms = list(torch._foreach_norm(s, 1))
        l1_sum = _sum_in_order(l1_sum, norms)
        return (dot_sum, l1_sum), (g, diffs if full else None)

    def estimate(self, c: dict[str, Any], acc: tuple[Tensor, Tensor], gstate: StateDict) -> dict[str, Any]:
        """d from the sums over every bucket: ``d_hat = d_coef N / |s|_1``, d only grows (at most by
        growth_rate). Updates the optimizer-level state; returns ``c`` with pass 2's step and new d."""
        pre = self.name + "."
        d, d_max, num, k = (gstate[pre + x] for x in ("d", "d_max", "d_numerator", "k"))
        dot_sum, l1_sum = acc
        new_num = num * c["b3"] + dot_sum
        d_hat = c["d_coef"] * new_num / l1_sum
        new_d = torch.where(d == self.d0, torch.maximum(d, d_hat), d)
        new_d_max = torch.maximum(d_max, d_hat)
        new_d = torch.minimum(new_d_max, new_d * c["growth"])
        # no gradient signal at all (|s|_1 = 0): the official optimizer returns before the step
        go = l1_sum > 0
        d_next = torch.where(go, new_d, d)
        step = torch.where(go, -c["dlr"], torch.zeros_like(c["dlr"]))
        # written through 1-element views: in a step traced by torch.compile (torch 2.13), an
        # in-place write to a 0-d float64 CPU tensor itself is dropped, d would never move
        for held, value in ((num, torch.where(go, new_num, num)), (d_max, torch.where(go, new_d_max, d_max)),
                            (k, k + go.to(d.dtype)), (d, d_next)):
            held.view(-1).copy_(value.view(-1))
        return {**c, "step": step, "d_next": d_next}

    def finish(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any], carry: Any) -> None:
        """Pass 2 over one bucket: the update, with the old d in the step size and the new d in eps."""
        pre = self.name + "."
        if carry is None:
            g, scratch = self._direction(b, hp, flags)[0], None
        else:
            g, scratch = carry
        params = [p if p.dtype == b.dtype else p.to(b.dtype) for p in b.params]
        like = params[0]
        step, d_next = c["step"], c["d_next"]
        v = b.state[pre + "exp_avg_sq"]
        eps = _like(d_next * hp["eps"], like, b.dtype)
        num = b.state[pre + "exp_avg"] if c["use_m"] else g
        scale = _like(step if c["use_m"] else step * d_next, like, b.dtype)
        if not flags["decoupled_wd"]:
            # the official p.addcdiv_(m, sqrt(v) + d eps, value=-dlr): left to the final write, which
            # forms the denominator from v there (one addcdiv; piece by piece on the eager path)
            b.updates = list(num)
            b.defer_scale(scale)
            b.defer_divide(RootDivisor(v, 1.0, eps))
            return
        denom = (torch._foreach_sqrt(v) if scratch is None
                 else [torch.sqrt(x, out=w) for x, w in zip(v, scratch, strict=True)])
        torch._foreach_add_(denom, eps)
        out = torch._foreach_mul(num, scale)
        torch._foreach_div_(out, denom)
        # the official optimizer decays p, then steps (two roundings): form that target and return
        # target - p, which the final write turns back into the target's bits
        decay = _like(step * hp["weight_decay"], like, b.dtype)
        target = torch._foreach_addcmul(params, params, [decay] * len(params))
        torch._foreach_add_(target, out)
        torch._foreach_sub_(target, params)
        b.updates = target

    def apply(self, buckets: list[Bucket]) -> None:
        apply_phases(self, buckets)


def scale_by_prodigy(
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    d_coef: float = 1.0,
    growth_rate: float = float("inf"),
    *,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: float = 1e-6,
    slice_p: int = 1,
    name: str = "prodigy",
) -> Prodigy:
    """Adam with Prodigy's step size: ``d`` grows from ``d0`` to an estimate of the distance to a solution.

    Rule (one ``d`` for all params; ``dlr = d lr`` times ``sqrt(1 - b2^k)/(1 - b1^k)`` with
    ``use_bias_correction``; ``r = d/d0``): for each param with ``g`` (plus ``wd p`` when
    ``decouple=False``): ``m = b1 m + d (1 - b1) g``, ``v = b2 v + d^2 (1 - b2) g^2``,
    ``s = b3 s + r dlr g`` (``r d g`` with ``safeguard_warmup``); over all params
    ``N = b3 N + r dlr sum <g, p0 - p>`` and ``d_hat = d_coef N / sum |s|_1``; if ``d == d0`` then
    ``d = max(d, d_hat)``; ``d_max = max(d_max, d_hat)``; ``d' = min(d_max, growth_rate d)``. The
    update is ``-dlr (m / (sqrt(v) + d' eps) + wd p)`` (decay only with ``decouple``); with
    ``betas[0] = 0`` it is ``-dlr d' g / (sqrt(v) + d' eps)``. ``b3 = sqrt(b2)`` when ``beta3`` is
    None. A step whose ``sum |s|_1`` is 0 (no gradient yet) leaves d, N and the params alone.

    The update contains the learning rate and ``d``: put this transform last. ``d`` is a reduction
    over every param of every group: the group keys ``lr`` (non-zero values must agree; 0 freezes a
    group), ``betas``, ``beta3``, ``d_coef`` and ``growth_rate`` are one per optimizer, ``eps`` and
    ``weight_decay`` may differ per group. The estimate stays on the device as 0-d tensors (no host
    read; the official code reads two numbers per param to the host each step); under FSDP2 the dot
    products and norms are DTensor reductions.

    State: per param ``exp_avg`` (not kept when built with ``betas[0] = 0``), ``exp_avg_sq``, ``s``
    and ``p0`` (the initial params): 4x the params (``s`` and ``p0`` 1/slice_p of it with
    ``slice_p``, taken on every slice_p-th element of the flattened param, an approximation). In
    ``ChainOptimizer.global_state`` (saved with the state dict): float64 ``"<name>.d"``, ``.d_max``,
    ``.d_numerator`` and ``.k`` (the step count of the bias correction). ``d0``, ``decouple``,
    ``use_bias_correction``, ``safeguard_warmup`` and ``slice_p`` are fixed when built.

    Reference: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
    arXiv:2306.06101. Peer: ``prodigyopt.Prodigy`` (same defaults). Differences: it keeps a zero
    param's ``p0`` as one 0-d zero (the same numbers, less memory); a group with lr 0 there still
    gets the decoupled decay and a step from its stale ``m``, here it is frozen; it reads the shared
    hyperparameters from the first group, here groups must agree.
    """
    specs = {
        "lr": Hyperparam(lr, nonnegative),
        "betas": Hyperparam(betas_pair(betas), check_betas),
        "beta3": Hyperparam(beta3, _beta3),
        "eps": Hyperparam(eps, positive),
        "weight_decay": Hyperparam(weight_decay, nonnegative),
        "d_coef": Hyperparam(d_coef, positive),
        "growth_rate": Hyperparam(growth_rate, _growth),
    }
    return Prodigy(specs, d0, decouple, use_bias_correction, safeguard_warmup, slice_p, float(betas[0]) > 0, name)
