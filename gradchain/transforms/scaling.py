"""Scaling by the learning rate or a constant: fused into the optimizer's final write."""

from __future__ import annotations

from typing import Any

from ..base import Leaf, transform
from ..hyperparams import Hyperparam, nonnegative, number

__all__ = ["scale", "scale_by_lr"]


def scale_by_lr(lr: Any = 1e-3, *, name: str = "lr") -> Leaf:
    """Multiply the update by ``-lr`` (descent), with ``lr`` read from the param group every step.

    Rule: ``u <- -lr * u``. LR schedulers act on the group's ``"lr"``; a callable ``lr`` is a
    schedule of the step. The multiplication is fused into the final ``p += u``.
    Peer: optax ``scale_by_learning_rate``.
    """
    return transform(name, {"lr": Hyperparam(lr, nonnegative)}, scale=lambda hp, ctx: -hp["lr"], elementwise=True)


def scale(factor: float, *, name: str = "scale") -> Leaf:
    """Multiply the update by a constant ``factor`` (``u <- factor * u``). Peer: optax ``scale``."""
    problem = number(factor)
    if problem is not None:
        raise ValueError(f"invalid factor={factor!r}: {problem}")
    return transform(name, scale=lambda hp, ctx: float(factor), elementwise=True)
