"""DTensor placement helpers shared by the transforms and combinators (plain tensors pass through).

Under FSDP2 params, grads and state are DTensors sharded on dim 0. A per-tensor statistic kept
across steps or mixed into a DTensor op must itself be a DTensor with a plain placement: these
helpers make or resolve one, and leave plain tensors as they are, so the same code runs in a
single process and sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["gather", "on_whole", "plain", "replicate_like", "settle", "some_shard_empty"]


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


def _chunks_short(n: int, ranks: int) -> bool:
    """Whether ``torch.chunk`` of ``n`` rows into ``ranks`` parts (how a DTensor shards a dim) leaves
    some part empty: parts of ``ceil(n / ranks)`` rows fill only ``ceil(n / part)`` of them (4 rows on
    3 ranks: 2, 2, 0; a ``Linear(d, 10)`` head on 8 ranks: five of 2, three of 0)."""
    if n < ranks:
        return True
    part = -(-n // ranks)
    return -(-n // part) < ranks


def some_shard_empty(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor sharded so that some rank holds an empty shard (fewer rows than
    ranks, as a ``Linear(d, 1)`` head, or rows that chunk into fewer parts than ranks)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return False
    return any(pl.is_shard() and _chunks_short(t.shape[pl.dim], t.device_mesh.size(i))
               for i, pl in enumerate(placements))


def on_whole(fn: Callable[..., Tensor], args: Sequence[Tensor], written: Sequence[int], like: Tensor) -> Tensor:
    """``fn`` over the whole values of ``args`` (a sharded DTensor gathered: plain tensors, the same
    on every rank), for the math of a param with an empty shard (:func:`some_shard_empty`), where a
    size-1 sharded dim broadcast against a replicated statistic has no sharding rule. The entries
    ``written`` (indices of ``args`` that ``fn`` updates in place) are written back to their shards;
    the result is returned with ``like``'s placements. Such a param is small: gathering it is cheap.
    """
    whole = [gather(a).to_local() if hasattr(a, "placements") else a for a in args]
    out = fn(*whole)
    for i in written:
        args[i].copy_(_placed_as(whole[i], args[i]))
    return _placed_as(out, like)


def _placed_as(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (a plain tensor equal on every rank) as a DTensor with ``ref``'s placements: a local slice."""
    mesh = getattr(ref, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(mesh, ref.placements)
