"""Schedule-free optimization: train at an interpolation y, evaluate at the running average x."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, Leaf, zeros_state
from ..hyperparams import Hyperparam, betas_pair, nonnegative, number, unit_interval
from ..hyperparams import betas as check_betas

__all__ = ["schedule_free", "scale_by_rms"]


def _open_unit_interval(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        return "must be a number in (0, 1)"
    x = float(value)
    if not 0.0 < x < 1.0:
        return "must be a number in (0, 1): the evaluation point divides by it"
    return None


def _betas_positive_b1(value: Any) -> str | None:
    problem = check_betas(value)
    if problem is None and not float(value[0]) > 0.0:
        return f"beta1={value[0]!r} must be > 0: the evaluation point divides by it"
    return problem


def _host_scalar(value: float) -> Tensor:
    # float64 on the host, like the official optimizer's Python floats: a float32 running sum of
    # k similar terms would lose about k * 2**-24 of its value to rounding
    return torch.full((), value, dtype=torch.float64)


def _on_host(xs: list[Tensor]) -> list[Tensor]:
    """The host scalars, moved back to the CPU in place if a checkpoint load put them on a device."""
    for i, t in enumerate(xs):
        if not t.is_cpu:
            xs[i] = t.cpu()
    return xs


# host vectors a transform keeps (one per piece of a bucket): past this many, stale ones (from pieces
# a changed bucket no longer cuts) are dropped, all at once; live ones are made again at their next step
_MAX_VECTORS = 4096


class _HostScalars:
    """Per-param ``lr_max`` and ``weight_sum`` of a list of params as 0-d views of one float64 host
    vector ``[lr_max..., weight_sum...]``: reading and writing them is then one op, not a small op
    per param (what dominates a step over many small tensors). The state tensors are rebound to
    those views the first time a list is seen; a list whose tensors are no longer the views (a load,
    another cut of the bucket) is made again. The optimizer's state keeps 0-d float64 host tensors,
    so checkpoints are unchanged."""

    def __init__(self) -> None:
        # id of the first view -> (vector, its views): the views are kept, so the id stays theirs
        self._made: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def vector(self, lr_max: list[Tensor], weight_sum: list[Tensor]) -> Tensor:
        """The vector behind ``lr_max + weight_sum``, rebinding the lists' entries to its views if needed."""
        both = lr_max + weight_sum
        made = self._made.get(id(both[0]))
        if made is not None and len(made[1]) == len(both) and all(map(operator.is_, made[1], both)):
            return made[0]
        self._made.pop(id(both[0]), None)
        vec = torch.stack(_on_host(both))
        views = list(vec.unbind())
        n = len(lr_max)
        lr_max[:], weight_sum[:] = views[:n], views[n:]
        if len(self._made) >= _MAX_VECTORS:
            self._made.clear()
        self._made[id(views[0])] = (vec, views)
        return vec


class ScheduleFree(Leaf):
    """See :func:`schedule_free`. Declares evaluation weights: the average ``x`` (``eval_weight``)."""

    last_in_chain = ("its update holds the learning rate and the move of y toward z, which a transform after it "
                     "would rescale too. Put decay, clipping and masks before it")

    beta_key: str
    beta_index: int | None
    # state keys of the step counts this leaf's rules may see, innermost first: accumulate() adds its
    # "<name>.step" (its real steps), which the beta schedule was evaluated at, not the optimizer's
    # "step" (which counts micro-steps); a tuple, as renamed() copies share it
    step_keys: tuple[str, ...] = ()

    def renamed(self, mapping: Mapping[str, str]) -> ScheduleFree:
        new = super().renamed(mapping)
        new.__class__ = type(self)
        new.beta_key = mapping.get(self.beta_key, self.beta_key)
        return new  # type: ignore[return-value]

    def beta(self, group: Mapping[str, Any], step: float) -> float:
        """The interpolation coefficient (``momentum`` or ``betas[0]``) of ``group`` at ``step``."""
        value = group[self.beta_key]
        if callable(value) and not isinstance(value, Tensor):
            value = value(int(step))
        if self.beta_index is not None:
            value = value[self.beta_index]
        return float(value)

    def rule_step(self, state: Mapping[str, Tensor]) -> float:
        """The step count this leaf's rules last saw: the innermost enclosing accumulate's, else ``"step"``."""
        for key in self.step_keys:
            if key in state:
                return float(state[key])
        return float(state["step"])

    def eval_weight(self, param: Tensor, state: Mapping[str, Tensor], group: Mapping[str, Any]) -> Tensor | None:
        """The evaluation point ``x = y + (1 - 1/beta) (z - y)`` of ``param`` (``y``), or None before its first step."""
        z = state.get(f"{self.name}.z")
        if z is None:
            return None
        y = param.detach()
        if y.dtype != z.dtype:
            y = y.to(z.dtype)
        # the same lerp as the official optimizer's eval(), so the two agree bit for bit
        return torch.lerp(y, z.to(y.device), 1.0 - 1.0 / self.beta(group, self.rule_step(state)))


def schedule_free(
    lr: float = 1.0,
    momentum: float = 0.9,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    betas: tuple[float, float] | None = None,
    name: str = "schedule_free",
) -> ScheduleFree:
    """Schedule-free averaging: take the step at ``z``, train at ``y``, evaluate at the average ``x``.

    Rule (``g`` the incoming update, e.g. the gradient or a preconditioned one; ``t`` the param's
    step; ``beta`` = ``momentum``): ``lr_t = lr min(1, t / warmup_steps)``, ``lr_max = max(lr_max,
    lr_t)``, ``w_t = t^r lr_max^weight_lr_power``, ``c_t = w_t / sum_{i<=t} w_i``, then
    ``y <- (1 - c_t) y + c_t z + lr_t (beta (1 - c_t) - 1) g`` and ``z <- z - lr_t g``. The params hold
    ``y``; ``x = (y - (1 - beta) z) / beta`` (the average of the ``z`` iterates, weighted by ``w``) is
    what to evaluate: :func:`gradchain.eval_params` swaps it in. The update already contains the
    learning rate: put this transform last (a chain refuses a transform after it). ``z_0 = y_0``.

    ``betas=(b1, b2)`` instead of ``momentum`` declares the group key ``betas`` and uses ``b1``, so
    that a second-moment transform before it (:func:`scale_by_rms`) shares the key, as in
    ``AdamWScheduleFree``. Group keys: ``lr``, ``momentum`` (or ``betas``), ``warmup_steps``, ``r``,
    ``weight_lr_power``. State: ``z`` (1x the params) and two float64 host scalars per param,
    ``lr_max`` and ``weight_sum`` (checkpointed, so a resumed run is bit-exact; one vector per bucket
    on the fused path, which compiles the whole rule, and 0-d views of one host vector per piece on
    the eager path, so that they are read and written by one op). They count per
    param, as the step count does: a param whose grad is None on a step skips it, where the
    official optimizer advances its group's sums anyway.

    Reference: Defazio et al., "The Road Less Scheduled", arXiv:2405.15682. Peer: ``schedulefree``
    ``SGDScheduleFree`` / ``AdamWScheduleFree`` (train mode), whose ``k``, ``lr_max`` and
    ``weight_sum`` are per group.
    """
    beta_key, beta_index = ("momentum", None) if betas is None else ("betas", 0)
    specs: dict[str, Hyperparam] = {"lr": Hyperparam(lr, nonnegative)}
    if betas is None:
        specs["momentum"] = Hyperparam(momentum, _open_unit_interval)
    else:
        specs["betas"] = Hyperparam(betas_pair(betas), _betas_positive_b1)
    specs.update(
        warmup_steps=Hyperparam(warmup_steps, nonnegative),
        r=Hyperparam(r, number),
        weight_lr_power=Hyperparam(weight_lr_power, number),
    )

    def init(p: Tensor) -> dict:
        z = zeros_state(p)
        z.copy_(p.detach())
        return {"z": z, "lr_max": _host_scalar(-1.0), "weight_sum": _host_scalar(0.0)}

    def update_tensors(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        # the same rule with the per-param sums as one vector and every scalar a tensor: the fused
        # path's compiled kernel (and traced steps), where no host value exists
        beta = hp["betas"][0] if betas is not None else hp["momentum"]
        lr, warmup, r_, power = hp["lr"], hp["warmup_steps"], hp["r"], hp["weight_lr_power"]
        lr_max_v, wsum_v = ctx.state_vector(state["lr_max"]), ctx.state_vector(state["weight_sum"])
        t = torch.as_tensor(ctx.per_step_vector(lambda s: s, lr_max_v), dtype=torch.float64, device=lr_max_v.device)
        lr_t = lr * torch.where(t - 1 < warmup, t / warmup, torch.ones_like(t))
        lr_max_v = torch.maximum(lr_max_v, lr_t)
        weight = t**r_ * lr_max_v**power
        wsum_v = wsum_v + weight
        ckp1 = torch.where(wsum_v != 0, weight / wsum_v, torch.zeros_like(wsum_v))
        alpha = lr_t * (beta * (1.0 - ckp1) - 1.0)
        ctx.store_state_vector(state["lr_max"], lr_max_v)
        ctx.store_state_vector(state["weight_sum"], wsum_v)
        z = state["z"]
        params = [p if p.dtype == ctx.dtype else p.to(ctx.dtype) for p in ctx.params]
        dev, dtype = z[0].device, z[0].dtype
        out = torch._foreach_mul(updates, ctx.per_tensor(alpha.to(dev, dtype)))
        torch._foreach_add_(out, torch._foreach_mul(torch._foreach_sub(z, params), ctx.per_tensor(ckp1.to(dev, dtype))))
        torch._foreach_sub_(z, torch._foreach_mul(updates, ctx.per_tensor(lr_t.expand_as(ckp1).to(dev, dtype))))
        return out

    scalars = _HostScalars()

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        if ctx.tensor_scalars or ctx.segments is not None:
            return update_tensors(updates, state, hp, ctx)
        beta = float(hp["betas"][0]) if betas is not None else float(hp["momentum"])
        base_lr, warmup = float(hp["lr"]), float(hp["warmup_steps"])
        r_, power = float(hp["r"]), float(hp["weight_lr_power"])

        def advance(t: float, old_lr_max: float, old_wsum: float) -> tuple[float, float, float, float]:
            """``(lr_max, weight_sum, lr_t, c_t)`` after step ``t``."""
            lr_t = base_lr * (t / warmup if t - 1 < warmup else 1.0)
            lr_max = max(lr_t, old_lr_max)
            weight = t**r_ * lr_max**power
            wsum = old_wsum + weight
            return lr_max, wsum, lr_t, weight / wsum if wsum != 0.0 else 0.0

        n = len(updates)
        vec = scalars.vector(state["lr_max"], state["weight_sum"])
        old = vec.tolist()  # a host vector: no device sync
        if ctx.step is not None and len(set(old[:n])) == 1 and len(set(old[n:])) == 1:
            # every tensor at one step with one history (the usual case): the numbers once
            lr_max, wsum, lr_t, ckp1 = advance(ctx.step, old[0], old[n])
            vec[:n].fill_(lr_max)
            vec[n:].fill_(wsum)
            return _uniform_step(updates, state["z"], ctx, lr_t, ckp1, beta)
        new = [advance(t, old[i], old[n + i]) for i, t in enumerate(ctx.step_values)]
        vec.copy_(torch.tensor([x[0] for x in new] + [x[1] for x in new], dtype=torch.float64))
        lrs, ckps = [x[2] for x in new], [x[3] for x in new]
        if len(set(zip(lrs, ckps, strict=True))) == 1:
            return _uniform_step(updates, state["z"], ctx, lrs[0], ckps[0], beta)
        alphas = [lr_t * (beta * (1.0 - c) - 1.0) for lr_t, c in zip(lrs, ckps, strict=True)]
        z = state["z"]
        params = [p if p.dtype == ctx.dtype else p.to(ctx.dtype) for p in ctx.params]
        out = torch._foreach_mul(updates, alphas)
        torch._foreach_add_(out, torch._foreach_mul(torch._foreach_sub(z, params), ckps))
        torch._foreach_sub_(z, torch._foreach_mul(updates, lrs))
        return out

    sf = ScheduleFree(name, specs, init, update, segmented=True, step_scalars=True)
    sf.beta_key, sf.beta_index = beta_key, beta_index
    return sf


def _uniform_step(updates: list, z: list, ctx: Bucket, lr_t: float, ckp1: float, beta: float) -> list:
    """``y <- (1 - c) y + c z + alpha g``, ``z <- z - lr_t g`` with one ``c``, ``alpha`` and ``lr_t``.

    As the official optimizer's in-place ``lerp_`` and ``add_``, and no new buffer: ``z`` moves
    first, and the final write interpolates toward the new ``z`` (``defer_lerp``) and adds
    ``(alpha + c lr_t) g = -lr_t (1 - beta) (1 - c) g``, the same step. Three passes with ``z``'s.
    """
    torch._foreach_sub_(z, updates, alpha=lr_t)
    ctx.defer_scale(-lr_t * (1.0 - beta) * (1.0 - ckp1))
    if ckp1 != 0.0:
        ctx.defer_lerp(z, ckp1)
    return updates


def scale_by_rms(
    beta2: float = 0.999, eps: float = 1e-8, *, betas: tuple[float, float] | None = None, name: str = "rms"
) -> Leaf:
    """Divide by the root of Adam's bias-corrected second moment (Adam without its first moment).

    Rule: ``v = beta2 v + (1 - beta2) g^2``, ``u = g / (sqrt(v / (1 - beta2^t)) + eps)`` (``eps``
    outside the root, as torch's Adam). ``betas=(b1, b2)`` instead of ``beta2`` declares the group
    key ``betas`` and uses ``b2``, to share it with :func:`schedule_free` in the schedule-free AdamW.
    State: ``exp_avg_sq`` (1x). Reference: Kingma & Ba, arXiv:1412.6980 (the second moment);
    Defazio et al., arXiv:2405.15682 (its use in schedule-free AdamW). Peer: the preconditioner of
    ``schedulefree.AdamWScheduleFree``; optax ``scale_by_rms`` differs (eps inside the root, no bias
    correction).
    """
    key = "beta2" if betas is None else "betas"
    if betas is None:
        beta_spec = Hyperparam(beta2, unit_interval)
    else:
        beta_spec = Hyperparam(betas_pair(betas), check_betas)
    specs = {key: beta_spec, "eps": Hyperparam(eps, nonnegative)}

    def init(p: Tensor) -> dict:
        return {"exp_avg_sq": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        # floats on the eager path, 0-d tensors on the fused one (no host read: see gradchain.ops)
        b2 = hp["betas"][1] if betas is not None else hp["beta2"]
        v = state["exp_avg_sq"]
        ops.update_moment_per_elem_norm(v, updates, b2)
        denom = torch._foreach_div(v, ctx.per_step(lambda t: ops.bias_correction(b2, t)))
        torch._foreach_sqrt_(denom)
        ops.add_(denom, hp["eps"])
        ctx.defer_divide(denom)
        return updates

    return Leaf(name, specs, init, update, elementwise=True)
