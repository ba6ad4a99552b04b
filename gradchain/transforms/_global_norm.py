"""The L2 norm of the updates across *all* buckets, for transforms that rescale by it.

Private helper shared by ``clip_by_global_norm`` and ``normalize(scope="global")``. It is a
cross-parameter reduction (DISTRIBUTED.md rule 1): it stays in tensor ops, so under FSDP2 the
per-tensor norms are full-tensor DTensor reductions and nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..base import Bucket, StateDict, Transform, resolve_hyperparam
from ..hyperparams import Hyperparam

ScaleFn = Callable[[Tensor, Mapping[str, Any]], Tensor]


def global_norm(buckets: list[Bucket]) -> Tensor | None:
    """sqrt(sum of ||u||^2) over every tensor of every bucket: one 0-d tensor, or None if no tensors.

    Each bucket contributes one norm (a foreach norm per tensor, then one vector norm); the
    buckets' norms meet on the first bucket's device in the widest of their dtypes.
    """
    parts = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(b.updates))) for b in buckets if len(b)]
    if not parts:
        return None
    dtype = parts[0].dtype
    for x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([x.to(device=device, dtype=dtype) for x in parts]))


class GlobalNormScale(Transform):
    """Multiply every bucket's updates by ``scale_fn(global_norm, hp)``, ``hp`` read per group."""

    def __init__(self, name: str, hyperparams: Mapping[str, Hyperparam], scale_fn: ScaleFn) -> None:
        if not name or "." in name:
            raise ValueError(f"transform name {name!r} must be non-empty and contain no '.'")
        self.name = name
        self._specs = dict(hyperparams)
        self._keys = {k: k for k in self._specs}
        self._scale_fn = scale_fn
        self.extra_defaults: dict[str, Any] = {}
        self.validate_group({k: s.default for k, s in self.hyperparams.items()})

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {self._keys[k]: s for k, s in self._specs.items()}

    def renamed(self, mapping: Mapping[str, str]) -> GlobalNormScale:
        new = GlobalNormScale.__new__(GlobalNormScale)
        new.__dict__.update(self.__dict__)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        return {}

    def apply(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            b.materialize()
        total = global_norm(buckets)
        if total is None:
            return
        for b in buckets:
            if not len(b):
                continue
            hp = {k: resolve_hyperparam(g, self._specs[k], b.group[g], b) for k, g in self._keys.items()}
            s = self._scale_fn(total.to(device=b.updates[0].device, dtype=b.dtype), hp)
            b.updates = torch._foreach_mul(b.updates, s)
