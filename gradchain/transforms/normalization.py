"""Normalization of the update to unit L2 norm, per tensor or over all params."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..base import Bucket, Transform, transform
from ..hyperparams import Hyperparam, positive
from ._global_norm import GlobalNormScale

__all__ = ["normalize"]

_SCOPES = ("tensor", "global")


def _global_scale(n: Tensor, hp: Mapping) -> Tensor:
    return 1.0 / (n + float(hp["normalize_eps"]))


def normalize(eps: float = 1e-8, *, scope: str = "tensor", name: str = "normalize") -> Transform:
    """Divide the update by its L2 norm: per tensor, or by the norm over every param (``scope="global"``).

    Rule: ``u <- u / (||u|| + eps)`` with ``||u||`` the tensor's norm (``scope="tensor"``: each
    tensor's step then has norm ~1 whatever its size, so the per-element step is ~1/sqrt(numel))
    or the norm over all tensors of all groups (``scope="global"``). A zero update stays zero
    (``eps > 0``). Placement: after momentum for normalized-momentum SGD (nSGDA); before Adam it
    is nearly a no-op, since Adam is scale-invariant apart from its eps. Group key:
    ``normalize_eps``. Reference: the article's gradient normalization; nSGDA, Jelassi et al.,
    arXiv:2210.04319. Peer: heavyball ``utils.l2_normalization_`` (per tensor); optax
    ``normalize_by_update_norm`` (global scope, with a scale factor).
    """
    if scope not in _SCOPES:
        raise ValueError(f"scope={scope!r} must be one of {_SCOPES}")
    spec = {"normalize_eps": Hyperparam(eps, positive)}
    if scope == "global":
        return GlobalNormScale(name, spec, _global_scale)

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        n = ctx.tensor_norms(updates)  # one vector: one reduction under FSDP2
        return torch._foreach_div(updates, ctx.per_tensor(n + hp["normalize_eps"]))

    return transform(name, spec, update=update, segmented=True)
