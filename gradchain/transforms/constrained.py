"""CPR: constrained parameter regularization, an augmented-Lagrangian bound on each tensor's L2 norm."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._dtensor import replicate_like
from ..base import Bucket, HostStep, Leaf, resolve_hyperparam, scalar_state, transform
from ..hyperparams import Hyperparam, nonnegative

__all__ = ["KAPPA_INITS", "cpr"]

KAPPA_INITS = ("uniform", "dependent", "warm_start", "inflection_point")


def _select(flag: Tensor | bool, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``flag`` (True: everywhere, without an op), else ``old``."""
    return new if flag is True else torch.where(flag, new, old)


def cpr(
    kappa_init: str = "inflection_point",
    kappa_init_param: float = 1000.0,
    kappa_update: float = 1.0,
    reg_step_size: int = 200,
    reg_ema_decay: float = 0.9,
    *,
    reg_by_lr: bool = False,
    lr_key: str = "lr",
    name: str = "cpr",
) -> Leaf:
    """CPR: keep ``R(p) = ||p||^2`` of each tensor under a bound ``kappa`` by dual ascent.

    Rule, per tensor, after the base step ``p' = p + u`` (so place it LAST, after ``scale_by_lr``):
    ``R = ||p'||^2``; ``lam <- max(0, lam + mu (R - kappa))`` with ``mu = kappa_update / numel``;
    ``p'' = p' - 2 c lam p'`` (``c = lr`` with ``reg_by_lr``, else 1). The projection is folded
    into the update: this returns ``u - 2 c lam p'``, i.e. ``p'' - p``. ``lam`` and ``kappa`` are
    per-tensor state (``scalar_state``); all reductions and decisions on them are tensor ops, and
    what the step count decides comes as flags from ``host_step``: on the fused path the whole
    rule compiles (``segmented``: per-tensor sums over the flat buffer, the scalars as vectors).

    ``kappa_init`` (``kappa_init_param`` is its parameter):

    - ``"uniform"``: ``kappa = kappa_init_param``; regularised from step 1.
    - ``"dependent"``: ``kappa = kappa_init_param * R(p_0)``, ``p_0`` the tensor before its first
      step; regularised from step 1.
    - ``"warm_start"``: at step ``s = int(kappa_init_param)`` set ``kappa = R(p')``; regularised
      from step ``s + 1``.
    - ``"inflection_point"`` (``kappa_init_param`` unused): not regularised until ``kappa`` is set.
      Every ``reg_step_size`` steps (``t % D == 0``): ``e <- d e + (1 - d) R`` (``d =
      reg_ema_decay``, ``e_0 = 0``); for ``t > D`` the slope is ``e - e_prev``; for ``t > 3D``,
      if the previous slope exceeds this one (growth of ``R`` slows down) set ``kappa = R(p')``;
      ``e_prev <- e``; for ``t > 2D`` the previous slope is kept. So the earliest bound is set at
      ``t = 4D``. A separate ``active`` flag marks a set bound (no sentinel value for kappa).

    Reference: Franke et al., "Improving Deep Learning Optimization through Constrained Parameter
    Regularization", arXiv:2311.09058; official ``pytorch-cpr`` ``AdamCPR`` (defaults taken from
    it; its foreach path regularises against the sentinel ``kappa = 1000`` before the inflection
    point is found and feeds the EMA an already-modified value, and its single-tensor path never
    stores the EMA: neither is copied). Only the L2 regulariser is implemented.
    """
    if kappa_init not in KAPPA_INITS:
        raise ValueError(f"invalid kappa_init={kappa_init!r}: must be one of {KAPPA_INITS}")
    if kappa_init in ("uniform", "dependent") and not kappa_init_param >= 0:
        raise ValueError(f"invalid kappa_init_param={kappa_init_param!r}: must be >= 0 for {kappa_init!r}")
    warm = int(kappa_init_param) if kappa_init == "warm_start" else 0
    if kappa_init == "warm_start" and warm < 1:
        raise ValueError(f"invalid kappa_init_param={kappa_init_param!r}: warm_start needs a step >= 1")
    if int(reg_step_size) != reg_step_size or reg_step_size < 1:
        raise ValueError(f"invalid reg_step_size={reg_step_size!r}: must be an integer >= 1")
    if not 0.0 <= reg_ema_decay < 1.0:
        raise ValueError(f"invalid reg_ema_decay={reg_ema_decay!r}: must be in [0, 1)")
    period, decay = int(reg_step_size), float(reg_ema_decay)
    inflection = kappa_init == "inflection_point"

    def init(p: Tensor) -> dict:
        kappa0 = float(kappa_init_param) if kappa_init == "uniform" else 0.0
        st = {"lagmul": scalar_state(p), "kappa": scalar_state(p, kappa0)}
        if inflection:
            st.update({k: scalar_state(p) for k in ("reg_ema", "prev_reg", "prev_slope", "active")})
        return st

    def schedule(hp: Mapping, t: int) -> HostStep:
        # what the step decides, as flags (1.0 / 0.0) the update applies with where(): no branch
        # on a tensor's step inside the update, so the fused path compiles it once
        detect = inflection and t % period == 0
        return HostStep({
            "first": float(kappa_init == "dependent" and t == 1),
            "gate": float(t > warm),
            "warm_set": float(kappa_init == "warm_start" and t == warm),
            "ema": float(detect),
            "slope": float(detect and t > period),
            "fire": float(detect and t > 3 * period),
            "keep_slope": float(detect and t > 2 * period),
        })

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        # per-tensor values as vectors, one entry per param (the fused path's flat buffer too)
        lagmul, kappa = ctx.state_vector(state["lagmul"]), ctx.state_vector(state["kappa"])

        def flag(key: str) -> Tensor | bool | None:
            """A host_step flag per param: a bool tensor (the fused path's 0-d one, or one entry per
            param), True where every param has it and None where none has it (eager: what no
            tensor needs this step is skipped, and a flag all share costs no op)."""
            vals = [v[key] for v in ctx.host_values]
            if isinstance(vals[0], Tensor):
                return vals[0] > 0
            if not any(vals):
                return None
            if all(vals):
                return True
            return replicate_like(torch.tensor(vals, device=lagmul.device) > 0, lagmul)

        first = flag("first")
        if first is not None:
            r0 = ctx.tensor_norms([p.to(ctx.dtype) for p in ctx.params])
            kappa = _select(first, r0 * r0 * float(kappa_init_param), kappa)
        theta = torch._foreach_add(updates, ctx.params)
        norms = ctx.tensor_norms(theta)
        reg = norms * norms
        # dual ascent on the multiplier; gated off where the bound is not set yet. An empty tensor
        # has R = 0 and nothing to project: any finite step size will do
        excess = reg - kappa
        if inflection:
            excess = excess * ctx.state_vector(state["active"])
        gate = flag("gate")
        step_size = replicate_like(hp["kappa_update"] / ctx.tensor_numels(updates).clamp(min=1), lagmul)
        if gate is not None:  # (None: no tensor's bound is in force yet)
            lagmul = _select(gate, (lagmul + excess * step_size).clamp(min=0), lagmul)
        warm_set = flag("warm_set")
        if warm_set is not None:
            kappa = _select(warm_set, reg, kappa)
        if inflection and flag("ema") is not None:
            kappa = detect_inflection(reg, kappa, state, flag, ctx)
        ctx.store_state_vector(state["lagmul"], lagmul)
        ctx.store_state_vector(state["kappa"], kappa)
        c: Any = 1.0
        if reg_by_lr:
            if ctx.resolved is not None and lr_key in ctx.resolved:
                c = ctx.resolved[lr_key]
            elif lr_key in ctx.group:
                c = float(resolve_hyperparam(lr_key, Hyperparam(None), ctx.group[lr_key], ctx))
            else:
                raise ValueError(f"cpr(reg_by_lr=True) reads the lr from the group key {lr_key!r}, which is absent")
        torch._foreach_addcmul_(updates, theta, ctx.per_tensor(lagmul * (-2.0 * c)))
        return updates

    def detect_inflection(reg: Tensor, kappa: Tensor, state: dict, flag: Callable, ctx: Bucket) -> Tensor:
        """Every ``period`` steps: the EMA of R, its slope, and the bound set where growth slows."""
        ema, prev_reg = ctx.state_vector(state["reg_ema"]), ctx.state_vector(state["prev_reg"])
        prev_slope, active = ctx.state_vector(state["prev_slope"]), ctx.state_vector(state["active"])
        ema = _select(flag("ema"), ema * decay + reg * (1.0 - decay), ema)
        slope = ema - prev_reg
        fire_on, slope_on, keep_on = flag("fire"), flag("slope"), flag("keep_slope")
        if fire_on is not None:
            fire = (prev_slope > slope) & (active == 0)
            fire = fire if fire_on is True else fire & fire_on
            kappa = torch.where(fire, reg, kappa)
            ctx.store_state_vector(state["active"], torch.where(fire, torch.ones_like(active), active))
        if slope_on is not None:
            ctx.store_state_vector(state["prev_reg"], _select(slope_on, ema, prev_reg))
        if keep_on is not None:
            ctx.store_state_vector(state["prev_slope"], _select(keep_on, slope, prev_slope))
        ctx.store_state_vector(state["reg_ema"], ema)
        return kappa

    spec = {"kappa_update": Hyperparam(kappa_update, nonnegative)}
    return transform(name, spec, init, update, inplace=True, segmented=True, host_step=schedule)
