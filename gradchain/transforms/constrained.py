"""CPR: constrained parameter regularization, an augmented-Lagrangian bound on each tensor's L2 norm."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import Bucket, Leaf, resolve_hyperparam, scalar_state, transform
from ..hyperparams import Hyperparam, nonnegative

__all__ = ["KAPPA_INITS", "cpr"]

KAPPA_INITS = ("uniform", "dependent", "warm_start", "inflection_point")


def _sq_norms(tensors: list[Tensor]) -> list[Tensor]:
    norms = torch._foreach_norm(tensors)
    return torch._foreach_mul(norms, norms)


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
    per-tensor state (``scalar_state``); all reductions and decisions on them are tensor ops.

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

    def detect_inflection(i: int, t: float, reg: Tensor, state: dict) -> None:
        # runs every `period` steps only, so a per-tensor loop costs nothing measurable
        ema = state["reg_ema"][i]
        ema.mul_(decay).add_(reg * (1.0 - decay))
        if t <= period:
            return
        slope = ema - state["prev_reg"][i]
        if t > 3 * period:
            kappa, active = state["kappa"][i], state["active"][i]
            fire = (state["prev_slope"][i] > slope) & (active == 0)
            kappa.copy_(torch.where(fire, reg, kappa))
            active.copy_(torch.where(fire, torch.ones_like(active), active))
        state["prev_reg"][i].copy_(ema)
        if t > 2 * period:
            state["prev_slope"][i].copy_(slope)

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        steps = ctx.step_values
        lagmul, kappa = state["lagmul"], state["kappa"]
        if kappa_init == "dependent":
            first = [i for i, t in enumerate(steps) if t == 1.0]
            if first:
                r0 = _sq_norms([ctx.params[i].to(ctx.dtype) for i in first])
                torch._foreach_mul_(r0, float(kappa_init_param))
                for i, r in zip(first, r0):  # a tensor's first step only
                    kappa[i].copy_(r)
        theta = torch._foreach_add(updates, ctx.params)
        reg = _sq_norms(theta)
        # dual ascent on the multiplier; gated off where the bound is not set yet
        gate = [1.0 if t > warm else 0.0 for t in steps]
        # an empty tensor has R = 0 and nothing to project: any finite step size will do
        step_size = [float(hp["kappa_update"]) * a / max(u.numel(), 1) for a, u in zip(gate, updates)]
        excess = torch._foreach_sub(reg, kappa)
        if inflection:
            torch._foreach_mul_(excess, state["active"])
        torch._foreach_mul_(excess, step_size)
        torch._foreach_add_(lagmul, excess)
        torch._foreach_clamp_min_(lagmul, 0.0)
        if kappa_init == "warm_start":
            for i in (i for i, t in enumerate(steps) if t == warm):  # the warm-start step only
                kappa[i].copy_(reg[i])
        if inflection:
            for i, t in enumerate(steps):
                if t % period == 0:
                    detect_inflection(i, t, reg[i], state)
        c = 1.0
        if reg_by_lr:
            if lr_key not in ctx.group:
                raise ValueError(f"cpr(reg_by_lr=True) reads the lr from the group key {lr_key!r}, which is absent")
            c = float(resolve_hyperparam(lr_key, Hyperparam(None), ctx.group[lr_key], ctx))
        torch._foreach_addcmul_(updates, theta, lagmul, value=-2.0 * c)
        return updates

    spec = {"kappa_update": Hyperparam(kappa_update, nonnegative)}
    return transform(name, spec, init, update, inplace=True)
