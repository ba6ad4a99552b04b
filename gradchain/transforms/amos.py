"""Amos: Adam-like scaling with adaptive weight decay toward a model-oriented scale; contains its own lr."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .._dtensor import settle
from ..base import Bucket, Leaf, scalar_state, transform, zeros_state
from ..hyperparams import Hyperparam, nonnegative, positive, unit_interval

__all__ = ["amos_default_eta", "scale_by_amos"]

EtaFn = Callable[[str | None, tuple[int, ...]], float]
ShapeFn = Callable[[tuple[int, ...]], tuple[int, ...]]


def amos_default_eta(name: str | None, shape: tuple[int, ...]) -> float:
    """Target scale eta: 0.5 for ndim <= 1, else ``sqrt(2 / fan_in)`` with ``fan_in = prod(shape[1:])``.

    pytorch_optimizer's Amos uses the same for 2-D weights but ``sqrt(1 / in_channels)`` for
    conv weights (ignoring the kernel); the fan-in here includes the kernel. Pass your own
    ``eta_fn`` where the model knows better (jestimator requires one per variable).
    """
    if len(shape) <= 1:
        return 0.5
    return math.sqrt(2.0 / max(math.prod(shape[1:]), 1))


def scale_by_amos(
    lr: float = 1e-3,
    beta: float = 0.999,
    zeta: float = 0.25,
    finetune_rate: float = 1.0,
    eps: float = 2.0**-125,
    *,
    eta_fn: EtaFn = amos_default_eta,
    shape_fn: ShapeFn | None = None,
    name: str = "amos",
) -> Leaf:
    """Amos: the whole step (it contains the learning rate ``lr`` = xi); reads theta.

    Rule (jestimator's ``scale_by_amos``), per tensor with ``g2 = mean(g^2)`` over the axes that
    ``v`` reduces, ``v <- beta v + (1 - beta) g2``, ``r = (1 - beta^t) / max(v, eps)``,
    ``gamma = sqrt(fr) (1 + zeta sqrt(xi) b)^(-1/2) xi^2 r g2``, ``l = xi eta(name, shape)``,
    ``u = fr (1 + zeta sqrt(l) b)^(-1) (-l sqrt(r) g - gamma theta / 2)`` and
    ``b <- b + gamma (fr + b)`` (``b`` starts at 0). ``v`` and ``b`` are one scalar per tensor
    by default (O(1) memory); ``shape_fn(shape)`` gives a broadcastable shape instead (jestimator's
    ``shape_fn``, without the name; jestimator's default is the full shape: ``shape_fn=lambda s: s``).
    The update is final: no ``scale_by_lr`` after it; optional momentum is an ``ema`` after it.
    Reference: Tian & Parikh, arXiv:2210.11693; google-research/jestimator ``amos.py``.
    Peer: pytorch_optimizer ``Amos`` (hard-coded eta, scalar v).
    """

    def v_shape(p: Tensor) -> tuple[int, ...]:
        if shape_fn is None:
            return ()
        shp = tuple(shape_fn(tuple(p.shape)))
        if len(shp) not in (0, p.dim()) or any(s not in (1, n) for s, n in zip(shp, p.shape, strict=False)):
            raise ValueError(f"shape_fn returned {shp} for a param of shape {tuple(p.shape)}: not broadcastable")
        return shp

    def init(p: Tensor) -> dict:
        shp = v_shape(p)
        if not shp:
            z = scalar_state(p)
            return {"v": z, "b": z.clone()}
        z = zeros_state(p)
        dims = tuple(d for d, s in enumerate(shp) if s < p.shape[d])
        base = settle(z.sum(dim=dims, keepdim=True)) if dims else z
        return {"v": base, "b": base.clone()}

    def advance(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> tuple[Tensor, Tensor]:
        # one scalar v and b per tensor, as vectors over the bucket, every scalar a float or a
        # 0-d tensor: the same code eagerly (stacked 0-d state) and on the fused path (one state
        # vector per bucket, reductions fused into the kernel). Advances v and b; returns the
        # factors (a, c) of the update u = a g + c theta, one entry per tensor
        xi, beta, zeta, fr, eps = (hp[k] for k in ("lr", "beta", "zeta", "finetune_rate", "eps"))
        v, b = ctx.state_vector(state["v"]), ctx.state_vector(state["b"])
        t = torch.as_tensor(ctx.per_step_vector(lambda t: t, v)).to(device=v.device, dtype=v.dtype)
        # a norm, not mean(g * g): no model-sized square of g (max(n, 1): an empty tensor's mean is 0)
        g2 = ctx.tensor_norms(updates, v.dtype) ** 2 / ctx.tensor_numels(updates).to(v.dtype).clamp(min=1.0)
        v_new = v * beta + g2 * (1.0 - beta)
        r = v_new.clamp(min=eps).reciprocal() * (1.0 - beta**t)
        gamma = fr**0.5 * torch.rsqrt(1.0 + zeta * xi**0.5 * b) * (xi * xi) * r * g2
        init_lr = xi * v.new_tensor([eta_fn(n, s) for n, s in ctx.tensor_info()])
        damp = fr / (1.0 + zeta * init_lr.sqrt() * b)
        ctx.store_state_vector(state["v"], v_new)
        ctx.store_state_vector(state["b"], b + gamma * (fr + b))
        return r.sqrt() * -init_lr * damp, -0.5 * gamma * damp

    def update_vectors(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        a, c = advance(updates, state, hp, ctx)
        dev, dtype = updates[0].device, updates[0].dtype
        theta = [p if p.dtype == dtype else p.to(dtype) for p in ctx.params]
        # one new buffer per tensor and no other (eagerly a fresh model-sized temporary costs page
        # faults on a CPU); compiled, one loop over g and theta
        out = torch._foreach_mul(updates, ctx.per_tensor(a.to(dev, dtype)))
        torch._foreach_addcmul_(out, theta, ctx.per_tensor(c.to(dev, dtype)))
        return out

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        if shape_fn is None and (ctx.tensor_scalars or not hasattr(ctx.params[0], "device_mesh")):
            return update_vectors(updates, state, hp, ctx)
        # v and b of another shape (shape_fn), or DTensor params (FSDP2): tensor by tensor
        xi, beta, zeta = float(hp["lr"]), float(hp["beta"]), float(hp["zeta"])
        fr, eps = float(hp["finetune_rate"]), float(hp["eps"])
        out = []
        for i, g in enumerate(updates):
            p, pname = ctx.params[i], ctx.names[i]
            v, b = state["v"][i], state["b"][i]
            dims = tuple(d for d in range(g.dim()) if not v.dim() or v.shape[d] < g.shape[d])
            g2 = g * g
            if dims:
                # max(., 1): the mean over an empty tensor is 0, not 0/0
                g2 = settle(g2.sum(dim=dims, keepdim=bool(v.dim())) / max(math.prod(g.shape[d] for d in dims), 1))
            v.mul_(beta).add_(g2, alpha=1.0 - beta)
            r = torch.clamp(v, min=eps).reciprocal_().mul_(1.0 - beta ** ctx.step_values[i])
            gamma = math.sqrt(fr) * torch.rsqrt(1.0 + zeta * math.sqrt(xi) * b) * (xi * xi) * r * g2
            init_lr = xi * eta_fn(pname, tuple(p.shape))
            theta = p.to(g.dtype) if p.dtype != g.dtype else p
            step = g * (torch.sqrt(r) * -init_lr) - theta * (0.5 * gamma)
            out.append(step * (fr / (1.0 + zeta * math.sqrt(init_lr) * b)))
            b.add_(gamma * (fr + b))
        return out

    spec = {
        "lr": Hyperparam(lr, nonnegative),
        "beta": Hyperparam(beta, unit_interval),
        "zeta": Hyperparam(zeta, nonnegative),
        "finetune_rate": Hyperparam(finetune_rate, nonnegative),
        "eps": Hyperparam(eps, positive),
    }
    # with one v per tensor (the default) the rule needs only per-tensor sums: it compiles
    return transform(name, spec, init, update, segmented=shape_fn is None)
