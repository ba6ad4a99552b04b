"""The L2 norm of the updates across *all* buckets, for transforms that rescale by it.

Private helper shared by ``clip_by_global_norm`` and ``normalize(scope="global")``. It is a
cross-parameter reduction (docs/distributed.md): it stays in tensor ops, so under FSDP2 the
per-tensor norms are full-tensor DTensor reductions and nothing is read back to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._dtensor import plain, replicate_like
from ..base import Bucket
from ..hyperparams import Hyperparam
from ._declared import Declared

ScaleFn = Callable[[Tensor, Mapping[str, Any]], Tensor]


def global_norm(buckets: list[Bucket]) -> Tensor | None:
    """sqrt(sum of ||u||^2) over every tensor of every bucket: one 0-d tensor, or None if no tensors.

    Each bucket contributes one norm (a foreach norm per tensor, then one vector norm); the
    buckets' norms meet on the first bucket's device in the widest of their dtypes.
    """
    # plain tensors: the full value of a sharded bucket's norm meets a plain bucket's (FSDP2 with
    # ignored params)
    parts = [plain(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(b.updates)))) for b in buckets if len(b)]
    if not parts:
        return None
    dtype = parts[0].dtype
    for x in parts[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    device = parts[0].device
    return torch.linalg.vector_norm(torch.stack([x.to(device=device, dtype=dtype) for x in parts]))


class GlobalNormScale(Declared):
    """Multiply every bucket's updates by ``scale_fn(global_norm, hp)``, ``hp`` read per group."""

    def __init__(self, name: str, hyperparams: Mapping[str, Hyperparam], scale_fn: ScaleFn) -> None:
        self._declare(name, hyperparams)
        self._scale_fn = scale_fn

    def apply(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            b.materialize()
        total = global_norm(buckets)
        if total is None:
            return
        for b in buckets:
            if not len(b):
                continue
            s = self._scale_fn(total.to(device=b.updates[0].device, dtype=b.dtype), self.hp(b))
            b.updates = torch._foreach_mul(b.updates, replicate_like(s, b.updates[0]))
