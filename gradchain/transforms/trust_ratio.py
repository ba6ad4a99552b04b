"""The layer-wise trust ratio of LAMB / LARS: scale each tensor's update to the size of its weight."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..base import Bucket, Leaf, transform
from ..hyperparams import Hyperparam, positive

__all__ = ["scale_by_trust_ratio"]


def _none_or_positive(value: Any) -> str | None:
    if value is None:
        return None
    problem = positive(value)
    return None if problem is None else "must be None (no clamp) or a finite number > 0"


def scale_by_trust_ratio(max_weight_norm: float | None = None, *, name: str = "trust_ratio") -> Leaf:
    """Multiply each tensor's update by ``phi(||p||) / ||u||``, or by 1 where either norm is 0.

    Rule, per tensor: ``r = phi(||p||) / ||u||`` if ``||p|| > 0`` and ``||u|| > 0`` else ``r = 1``;
    ``u <- r u``, with ``phi(x) = min(x, max_weight_norm)`` (identity when None). Each tensor then
    moves by ``lr * phi(||p||)``: a step relative to its size; a zero-initialised tensor gets the
    plain update. Group key: ``max_weight_norm``. Reference: You et al., "Large Batch Optimization
    for Deep Learning: Training BERT in 76 minutes" (LAMB), arXiv:1904.00962. Peer: optax
    ``scale_by_trust_ratio`` (phi identity, its defaults); pytorch_optimizer ``Lamb`` clamps
    ``||p||`` at 10 (``max_weight_norm=10``), adds its eps to ``||u||``, and (at its default
    ``adam_debias=False``) multiplies the step by Adam's first-moment correction ``1/(1 - b1^t)``
    after the ratio, where the ratio does not cancel it.
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        n = len(ctx.params) if ctx.segments is None else len(ctx.segments[0])
        # both norms in one vector, reduced once under FSDP2 (the no-op clamp makes that happen
        # here, rather than again at every use of a still-pending reduction)
        wq = torch.cat([ctx.tensor_norms(ctx.params, ctx.dtype), ctx.tensor_norms(updates)]).clamp(min=0.0)
        w, q = wq[:n], wq[n:]
        c = hp["max_weight_norm"]
        phi = w if c is None else w.clamp(max=c)
        # where, not a host branch: the zero cases stay right under FSDP2 and torch.compile
        ratio = torch.where((w > 0) & (q > 0), phi / q, 1.0)
        # pending, not applied: the final write multiplies, with no full-size product of its own
        ctx.defer_scale(ctx.per_tensor(ratio))
        return updates

    spec = {"max_weight_norm": Hyperparam(max_weight_norm, _none_or_positive)}
    return transform(name, spec, update=update, segmented=True)
