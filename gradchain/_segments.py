"""Per-tensor norms of a flat buffer, as one opaque op for the fused path's compiled graphs.

Left to the compiler, a norm per segment of a long flat buffer is ``segment_reduce(x * x)``: the
squares become a full-size buffer of their own. This op reads ``x`` itself, once, with
``torch._foreach_norm`` over its per-tensor views (as the eager path does).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("gradchain::segment_norms", mutates_args=())
def segment_norms(x: Tensor, numels: list[int]) -> Tensor:
    """The L2 norm of each consecutive piece of ``x`` of ``numels[i]`` elements, as one vector."""
    return torch.stack(torch._foreach_norm(list(x.split(numels)), 2))


@segment_norms.register_fake
def _(x: Tensor, numels: list[int]) -> Tensor:
    return x.new_empty(len(numels))
