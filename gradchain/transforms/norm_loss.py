"""Norm Loss: a decoupled pull of every unit's weight norm toward 1."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import Bucket, Leaf, transform
from ..hyperparams import Hyperparam, nonnegative

__all__ = ["add_norm_loss"]


def _unit_norm(p: Tensor) -> Tensor:
    # a unit is a slice along dim 0 (torch layout (out, in, *k)); ndim <= 1 is one unit
    if p.ndim <= 1:
        return torch.linalg.vector_norm(p)
    return torch.linalg.vector_norm(p, dim=tuple(range(1, p.ndim)), keepdim=True)


def add_norm_loss(norm_loss_factor: float = 1e-4, eps: float = 1e-8, *, name: str = "norm_loss") -> Leaf:
    """Norm Loss: add the gradient of ``k * sum_units (||p_u|| - 1)^2`` as a decoupled term.

    Rule, per unit ``u`` (a slice along dim 0; a tensor with ndim <= 1 is one unit):
    ``upd_u <- upd_u + 2 k (1 - 1 / (||p_u|| + eps)) p_u``, ``k = norm_loss_factor``. Placed
    before ``scale_by_lr``: ``p_u <- p_u (1 - lr 2k (1 - 1/(||p_u|| + eps)))``, which shrinks
    units with norm above 1 and grows those below. A unit whose norm is exactly 0 is left
    alone (it has no direction to grow along). Reference: Georgiou et al., "Norm Loss: An
    efficient yet effective regularization method for deep neural networks", arXiv:2103.06583.
    Peer: pytorch_optimizer ``Ranger21(norm_loss_factor=1e-4)`` (whose ``unit_norm`` reduces
    3-d weights over dim 1 only; here every dim but 0 is reduced).
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        k, e = float(hp["norm_loss_factor"]), float(hp["norm_loss_eps"])
        params = ctx.params if ctx.params[0].dtype == ctx.dtype else [p.to(ctx.dtype) for p in ctx.params]
        # shape-dependent per-unit reductions: one norm per tensor, local under Shard(0)
        coefs = []
        for p in params:
            n = _unit_norm(p)
            coefs.append(torch.where(n > 0, 1.0 - 1.0 / (n + e), torch.zeros_like(n)))
        # coefs broadcast over each unit's row; foreach falls back per tensor for the broadcast
        torch._foreach_mul_(coefs, 2.0 * k)
        torch._foreach_addcmul_(updates, params, coefs)
        return updates

    spec = {
        "norm_loss_factor": Hyperparam(norm_loss_factor, nonnegative),
        "norm_loss_eps": Hyperparam(eps, nonnegative),
    }
    return transform(name, spec, None, update, inplace=True)
