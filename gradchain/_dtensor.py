"""DTensor placement helpers shared by the transforms and combinators (plain tensors pass through).

Under FSDP2 params, grads and state are DTensors sharded on dim 0. A per-tensor statistic kept
across steps or mixed into a DTensor op must itself be a DTensor with a plain placement: these
helpers make or resolve one, and leave plain tensors as they are, so the same code runs in a
single process and sharded.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["gather", "plain", "replicate_like", "settle"]


def replicate_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a plain tensor with the same value on every rank) as a replicated DTensor on ``like``'s mesh.

    Returns ``t`` itself when ``like`` is a plain tensor. No communication: the value is taken as
    already equal on every rank (a hyperparameter, a step count, a global statistic).
    """
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def settle(t: Tensor) -> Tensor:
    """Resolve a DTensor's pending reduction (a ``Partial`` placement) to ``Replicate``.

    A reduction over a sharded dim leaves a DTensor ``Partial``; state kept across steps must have a
    plain placement. Plain tensors pass through.
    """
    placements = getattr(t, "placements", None)
    if placements is None or not any(pl.is_partial() for pl in placements):
        return t
    from torch.distributed.tensor import Replicate

    return t.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in placements])


def gather(t: Tensor) -> Tensor:
    """The whole tensor on every rank (a replicated DTensor; one all-gather) for math that mixes rows.

    Plain and already replicated tensors pass through. ``t.redistribute(placements=p.placements)``
    takes the result back to a param's sharding (a local slice, no communication).
    """
    placements = getattr(t, "placements", None)
    if placements is None or all(pl.is_replicate() for pl in placements):
        return t
    from torch.distributed.tensor import Replicate

    return t.redistribute(placements=[Replicate()] * len(placements))


def plain(t: Tensor) -> Tensor:
    """A DTensor's full value as a plain tensor (a collective for a sharded one); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
