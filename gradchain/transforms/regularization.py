"""Weight decay: coupled L2 (before the moments), decoupled decay (after the preconditioner), its
schedule-only coupling, and cautious decay."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import ops
from ..base import Bucket, Leaf, resolve_hyperparam, transform
from ..hyperparams import Hyperparam, flag, nonnegative

__all__ = ["add_cautious_wd", "add_decoupled_wd", "add_l2", "add_scheduled_wd", "add_switched_wd"]


def _add_weights(name: str, weight_decay: float) -> Leaf:
    spec = {"weight_decay": Hyperparam(weight_decay, nonnegative)}
    return transform(name, spec, param_term=lambda hp, ctx: hp["weight_decay"], elementwise=True)


class _SwitchedDecay:
    """``weight_decay`` when the group's ``decoupled_weight_decay`` equals ``decoupled``, else 0."""

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def __call__(self, hp: Mapping, ctx: Bucket) -> Any:
        return hp["weight_decay"] if hp["decoupled_weight_decay"] == self.decoupled else 0.0


def add_switched_wd(
    weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *, placement: str, name: str
) -> Leaf:
    """Weight decay that a param group switches between coupled L2 and decoupled, as torch's Adam.

    Rule: ``u <- u + weight_decay * p`` when the group's ``decoupled_weight_decay`` matches this
    transform's ``placement`` (``"coupled"``: put it before the preconditioner, as :func:`add_l2`;
    ``"decoupled"``: after it, as :func:`add_decoupled_wd`), else nothing. A chain holds one of
    each, sharing the keys ``weight_decay`` and ``decoupled_weight_decay``, so every group picks its
    form (``torch.optim.Adam(decoupled_weight_decay=)`` / ``NAdam``). Peer: torch ``Adam``, ``NAdam``.
    """
    if placement not in ("coupled", "decoupled"):
        raise ValueError(f"placement={placement!r} must be 'coupled' or 'decoupled'")
    spec = {
        "weight_decay": Hyperparam(weight_decay, nonnegative),
        "decoupled_weight_decay": Hyperparam(bool(decoupled_weight_decay), flag),
    }
    return transform(name, spec, param_term=_SwitchedDecay(placement == "decoupled"), elementwise=True,
                     static=("decoupled_weight_decay",))


def add_l2(weight_decay: float = 0.0, *, name: str = "l2") -> Leaf:
    """Coupled L2 regularization: ``u <- u + weight_decay * p``, placed before the moments.

    This is torch.optim's ``weight_decay`` for SGD and Adam: the decay is then preconditioned
    together with the gradient. Peer: torch ``SGD``/``Adam`` weight_decay, optax ``add_decayed_weights``
    placed first.
    """
    return _add_weights(name, weight_decay)


def add_decoupled_wd(weight_decay: float = 1e-2, *, name: str = "wd") -> Leaf:
    """Decoupled weight decay (AdamW): ``u <- u + weight_decay * p`` after the preconditioner.

    Placed before ``scale_by_lr`` it gives torch semantics, ``p <- p * (1 - lr * wd) - lr * u``.
    Reference: Loshchilov & Hutter, arXiv:1711.05101. Peer: torch ``AdamW``, optax ``add_decayed_weights``.
    """
    return _add_weights(name, weight_decay)


def _group_value(ctx: Bucket, key: str, default: Any = None) -> float:
    value = ctx.group.get(key, default)
    if value is None:
        raise ValueError(f"add_scheduled_wd: the param group has no {key!r}; pass lr_key= or schedule=")
    return float(resolve_hyperparam(key, Hyperparam(None), value, ctx))


def _schedule_multiplier(ctx: Bucket, lr_key: str, base_key: str, schedule: Callable[[int], float] | None) -> float:
    if schedule is not None:
        return float(schedule(ctx.group_step))
    lr = _group_value(ctx, lr_key)
    base = _group_value(ctx, base_key, lr)
    # a group whose base lr is 0 is frozen: nothing to decay
    return lr / base if base != 0.0 else 0.0


def add_scheduled_wd(
    weight_decay: float = 1e-2,
    schedule: Callable[[int], float] | None = None,
    *,
    corrected: bool = False,
    lr_key: str = "lr",
    base_key: str = "initial_lr",
    name: str = "wd",
) -> Leaf:
    """Decoupled weight decay coupled to the schedule multiplier only (the AdamW paper's form).

    Rule: ``p <- p - s_t * weight_decay * p - lr_t * u``, where ``s_t = lr_t / lr_max`` is the
    schedule multiplier, so the decay does not grow with the base lr. Place it AFTER
    ``scale_by_lr`` (before it, the ``-lr`` scale would multiply the decay too and give torch's
    ``add_decoupled_wd`` semantics). ``s_t`` is ``schedule(step)`` when given, else the group's
    ``lr_key`` over its ``base_key``: every torch LR scheduler stores the base lr in
    ``"initial_lr"`` (for ``OneCycleLR`` pass ``base_key="max_lr"``); without a scheduler
    ``s_t = 1``. ``corrected=True`` gives timm's corrected decay ``weight_decay * lr_t^2 / lr_max``
    per step instead. Reference: Loshchilov & Hutter, arXiv:1711.05101 (Alg. 2, ``eta_t``);
    timm ``corrected_weight_decay``.
    """

    def coef(hp: Mapping, ctx: Bucket) -> float:
        decay = float(hp["weight_decay"]) * _schedule_multiplier(ctx, lr_key, base_key, schedule)
        if corrected:
            decay *= _group_value(ctx, lr_key)
        # after scale_by_lr nothing rescales this term: it is the decay itself, with its sign
        return -decay

    spec = {"weight_decay": Hyperparam(weight_decay, nonnegative)}
    return transform(name, spec, param_term=coef)


def add_cautious_wd(weight_decay: float = 1e-2, *, strict: bool = False, name: str = "wd") -> Leaf:
    """Cautious weight decay: decay only the coordinates where the update already shrinks ``|p|``.

    Rule: ``u <- u + weight_decay * 1[u * p >= 0] * p`` (``1[u * p > 0]`` with ``strict=True``,
    the article's ``clamp(sign(p u), 0)`` and adam-atan2-pytorch's form). The mask is taken on the
    update this transform receives, so place it after the preconditioner and after any cautious
    mask or clipping, and before ``scale_by_lr`` (torch lr coupling, as ``add_decoupled_wd``).
    Reference: Chen et al., "Cautious Weight Decay", arXiv:2510.12402, Algorithm 1 (which uses
    ``>=``). Peer: heavyball ``cautious_weight_decay=True`` (sign bits: zeros count as positive).
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        mask = torch._foreach_mul(updates, ctx.params)
        torch._foreach_sign_(mask)
        if strict:
            torch._foreach_clamp_min_(mask, 0.0)
        else:
            # {-1, 0, 1} -> {0, 1, 1}
            torch._foreach_add_(mask, 1.0)
            torch._foreach_clamp_max_(mask, 1.0)
        ops.addcmul_(updates, mask, ctx.params, hp["weight_decay"])
        return updates

    spec = {"weight_decay": Hyperparam(weight_decay, nonnegative)}
    return transform(name, spec, None, update, inplace=True, elementwise=True)
