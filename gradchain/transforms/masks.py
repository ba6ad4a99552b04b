"""Cautious masks: keep only the coordinates where the update agrees with the current gradient."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, Leaf, transform

__all__ = ["CAUTIOUS_RESCALINGS", "cautious_mask"]

# name -> per-tensor factor s(kept, numel) that multiplies the kept coordinates
CAUTIOUS_RESCALINGS = ("c_optim", "timm", "heavyball", "none")


def _factors(mask: list[Tensor], rescale: str, ctx: Bucket) -> list[Tensor] | None:
    if rescale == "none":
        return None
    if ctx.segments is not None:
        # the fused path's flat buffer: the same factors from segment sums, one per param
        kept, numel = ctx.tensor_sums(mask), ctx.tensor_numels(mask)
        if rescale == "c_optim":
            return ctx.per_tensor(numel / (kept + 1.0))
        if rescale == "timm":
            return ctx.per_tensor(1.0 / torch.clamp_min(kept / numel, 1e-3))
        return ctx.per_tensor(numel / torch.clamp_min(kept, 1.0))
    # mask entries are 0/1, so the sum is the number kept; a reduction that stays a DTensor op.
    # Out-of-place ops on these 0-d results: under FSDP2 they are partial until the first one.
    kept = ops.sums_nonneg(mask)
    numel = [float(m.numel()) for m in mask]
    if rescale == "c_optim":
        # numel / (kept + 1): finite when nothing is kept
        kept = torch._foreach_reciprocal(torch._foreach_add(kept, 1.0))
        kept = torch._foreach_mul(kept, numel)
    elif rescale == "timm":
        # 1 / max(kept / numel, 1e-3)
        kept = torch._foreach_clamp_min(torch._foreach_div(kept, numel), 1e-3)
        kept = torch._foreach_reciprocal(kept)
    else:  # heavyball: numel / max(kept, 1)
        kept = torch._foreach_reciprocal(torch._foreach_clamp_min(kept, 1.0))
        kept = torch._foreach_mul(kept, numel)
    return kept


def cautious_mask(rescale: str = "c_optim", *, name: str = "cautious") -> Leaf:
    """Cautious optimizers: zero the update where it disagrees with the raw gradient, then rescale.

    Rule, per tensor: ``phi = 1[u * g > 0]`` (``g`` the raw gradient of this step, ``ctx.grads``;
    zero products are masked out, so a zero gradient masks its coordinate), ``u <- u * phi * s``.
    ``rescale`` names the per-tensor factor ``s`` (``kept = sum(phi)``):

    - ``"c_optim"`` (default): ``numel / (kept + 1)``, the paper's reference code;
    - ``"timm"``: ``1 / max(kept / numel, 1e-3)`` (timm ``caution=True``, later C-Optim code);
    - ``"heavyball"``: ``numel / max(kept, 1)`` (heavyball ``caution=True``; recent heavyball
      versions build the mask from sign bits, which differs from ours only at exact zeros);
    - ``"none"``: ``s = 1``.

    If every coordinate is masked the update is 0 under every convention. Place it after the
    preconditioner (the mask only needs the update's sign) and before decay and ``scale_by_lr``.
    Reference: Liang et al., "Cautious Optimizers: Improving Training with One Line of Code",
    arXiv:2411.16085. Peer: timm ``cadamw``, heavyball ``caution=True``, pytorch_optimizer
    ``cautious=True``.
    """
    if rescale not in CAUTIOUS_RESCALINGS:
        raise ValueError(f"invalid rescale={rescale!r}: must be one of {CAUTIOUS_RESCALINGS}")

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        mask = torch._foreach_mul(updates, ctx.grads)
        # sign(u g) in {-1, 0, 1} -> {0, 0, 1}: strict agreement
        torch._foreach_sign_(mask)
        torch._foreach_clamp_min_(mask, 0.0)
        factors = _factors(mask, rescale, ctx)
        if factors is not None:
            torch._foreach_mul_(mask, factors)
        torch._foreach_mul_(mask, updates)
        return mask

    return transform(name, {}, None, update, segmented=True)
