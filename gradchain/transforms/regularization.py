"""Weight decay: coupled L2 (before the moments) and decoupled decay (after the preconditioner)."""

from __future__ import annotations

from ..base import Leaf, transform
from ..hyperparams import Hyperparam, nonnegative

__all__ = ["add_decoupled_wd", "add_l2"]


def _add_weights(name: str, weight_decay: float) -> Leaf:
    spec = {"weight_decay": Hyperparam(weight_decay, nonnegative)}
    return transform(name, spec, param_term=lambda hp, ctx: float(hp["weight_decay"]))


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
