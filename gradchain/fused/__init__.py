"""The fused path: flat buffers per bucket and a compiled kernel per run of elementwise transforms.

A second way to run the same chain, never a second copy of its math: see
:class:`~gradchain.fused.runner.FusedChain` and :class:`~gradchain.fused.flat.FlatBucket`.
"""

from .flat import FlatBucket
from .runner import FusedChain, FusedRoutes, fused_chain, step_scales

__all__ = ["FlatBucket", "FusedChain", "FusedRoutes", "fused_chain", "step_scales"]
