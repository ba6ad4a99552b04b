"""The eager step in cache-sized pieces: a chain's elementwise transforms over one piece at a time.

On the eager path every op of a transform is a pass over the whole bucket, so a chain of a few
transforms streams its buffers from memory many times a step. Run in pieces of about
:data:`PIECE_NUMEL` elements instead (small tensors grouped whole, a large tensor cut into
slices), the same ops find their operands in the CPU's caches after the first touch, and the step
costs little more than one pass. The math is the transforms' own ``update``; nothing is written
twice.

The chain's top-level transforms are cut into runs, as the fused path cuts them. A run of
``elementwise`` (and ``segmented`` or shape-dependent) leaves runs piece by piece. A tensor is
sliced only in the chain's last run (which writes the params: no update has to be put together
again), only when its state in that run is shaped like it, contiguous, and only for leaves that
are plain ``elementwise`` (a per-tensor reduction needs the whole tensor). A phased transform
(Prodigy, AdamS's mean) runs its first pass over whole tensors in order and its second, with the
leaves after it, in pieces; a ``partition`` or ``masked`` runs each child's chain in pieces (as
the chain's last run, the children write their params), Lookahead its inner chain; any other
transform runs over the whole buckets. Elementwise ops give each element the bits it gets in one
pass over the whole tensor; vectorized transcendental functions (exp, log, atan2) may differ in
the last bit at the seams of a slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .base import Bucket, Chain, Leaf, Transform, estimate_phases, finish_phase, is_phased, state_owners

# elements per piece: with the few buffers a step reads and makes, a piece stays in the caches (a
# piece of 2^18 fp32 elements is 1 MB per buffer; 2^19 and 2^20 measured slower on a 2-core CPU with
# 2 MB of L2 per core). 0 turns pieces off: every run over whole buckets.
PIECE_NUMEL = 1 << 18


def _kind(t: Transform) -> str | None:
    """"slice" (elementwise: any slice of a tensor will do), "whole" (per-tensor reductions or
    shape-dependent rules: whole tensors only), or None (runs over the whole buckets)."""
    if not isinstance(t, Leaf):
        return None
    if t.elementwise_for is None and ((t.elementwise and not t.segmented) or t.step_scalars):
        return "slice"
    if t.elementwise or t.segmented or t.elementwise_for is not None:
        return "whole"
    return None


class PiecewiseChain:
    """A chain's top-level transforms cut into runs; ``step`` applies them and writes the params."""

    def __init__(self, transform: Transform) -> None:
        top = transform.children if isinstance(transform, Chain) else [transform]
        # runs of kind "pieced" (leaves, piece by piece), "whole" (over whole buckets), "phased" (a
        # phased transform's two passes piece by piece, the pieced leaves after it in its second),
        # "routed" (a partition or mask: each child's chain in pieces over its params) or "wrapped"
        # (Lookahead: its inner chain in pieces, its sync over whole buckets)
        runs: list[tuple[str, list[Transform]]] = []
        self._inner: dict[int, PiecewiseChain] = {}
        for t in top:
            if callable(getattr(t, "apply_routed", None)):
                kind = "routed"
                self._inner.update((id(c), PiecewiseChain(c)) for c in t.children.values())
            elif callable(getattr(t, "due", None)):
                kind = "wrapped"  # Lookahead: its inner chain in pieces, its sync over whole buckets
                self._inner[id(t.inner)] = PiecewiseChain(t.inner)
            else:
                kind = "phased" if is_phased(t) else "pieced" if _kind(t) is not None else "whole"
            joins = runs and (runs[-1][0] == kind not in ("phased", "routed", "wrapped")
                              or runs[-1][0] == "phased" and kind == "pieced")  # a phased transform's tail
            if joins:
                runs[-1][1].append(t)
            else:
                runs.append((kind, [t]))
        self.runs = runs
        # scales and decays alone (folded into the write, one pass) gain nothing from pieces
        self.useful = any(kind == "phased" or kind == "pieced" and any(t._update is not None for t in ts)
                          for kind, ts in runs) or any(inner.useful for inner in self._inner.values())

    def _write_child(self, child: Transform, subs: list[Bucket]) -> None:
        self._inner[id(child)].step(subs, writer=_write_materialized)

    def step(self, buckets: list[Bucket], write: bool = True, writer: Writer = Bucket.write) -> None:
        """Apply the chain to ``buckets`` and write their params (``writer``, ``Bucket.write`` by
        default); with ``write=False`` leave the updates in the buckets instead (nothing is sliced then)."""
        _prime_allocator()
        for j, (kind, ts) in enumerate(self.runs):
            last = write and j == len(self.runs) - 1
            if kind == "routed" and last:
                # each child writes its params piece by piece, while its updates are in the caches,
                # with the bits of the step over whole buckets: its updates materialized, then p + u
                # (the parent's write folds no child's pending form); the params no child took
                # (masked) are written here
                written = ts[0].apply_routed(buckets, self._write_child, written=True)
                for b, done in zip(buckets, written, strict=True):
                    rest = [i for i in range(len(b)) if i not in done]
                    if rest:
                        writer(b.subset(rest) if len(rest) < len(b) else b)
                continue
            if kind == "routed":
                # each child's updates come back to the bucket (as over whole buckets, where the
                # write folds no child's pending form): the same bits
                ts[0].apply_routed(buckets, lambda child, subs: self._inner[id(child)].step(subs, write=False))
            elif kind == "wrapped":
                inner = self._inner[id(ts[0].inner)]
                due = ts[0].due(buckets)
                if last and not any(due):
                    inner.step(buckets)  # no sync this step: the inner chain writes, as it would alone
                    continue
                inner.step(buckets, write=False)
                ts[0].sync(buckets, due)
            elif kind == "whole":
                for t in ts:
                    t.apply(buckets)
            if kind in ("routed", "wrapped", "whole"):
                if last:
                    for b in buckets:
                        writer(b)
                continue
            owners = state_owners(ts)
            if kind == "phased":
                _run_phased(buckets, ts[0], ts[1:], owners, last, writer)
                continue
            sliced = last and all(_kind(t) == "slice" for t in ts)
            for b in buckets:
                if len(b):
                    _run_pieces(b, ts, owners, last, sliced, writer)


Writer = Callable[[Bucket], None]


def _write_materialized(b: Bucket) -> None:
    """``p <- p + u`` with ``u`` materialized first: the bits of a routed child's updates handed
    back to its parent and written there (``Bucket.write`` with nothing pending), in one piece."""
    if b.params:
        b.materialize()
        b.write()


_primed = False


def _prime_allocator() -> None:
    """Free one 16 MB block, once per process. glibc's malloc takes a freed block's size as its
    threshold for serving memory from the heap rather than from fresh pages, and keeps twice that
    free at the heap's top: a piece's temporaries (a few MB) are then recycled from piece to piece,
    where with the start-up thresholds (128 KB) each piece would map fresh pages (page faults that
    cost what the pieces save). A training loop's own activations usually raise them as well."""
    global _primed
    if not _primed:
        _primed = True
        block = torch.empty(16 << 20, dtype=torch.uint8)
        del block


def _sliceable(b: Bucket, i: int, keys: list[str]) -> bool:
    p = b.params[i]
    if hasattr(p, "device_mesh") or p.numel() <= PIECE_NUMEL:
        return False
    state = [b.state[k][i] for k in keys]
    if not all(isinstance(t, Tensor) and (t.shape == p.shape or t.dim() == 0) for t in state):
        return False
    tensors = [p, b.grads[i], b.updates[i], *(t for t in state if t.dim())]
    return all(isinstance(t, Tensor) and t.shape == p.shape and t.is_contiguous() for t in tensors)


def _plan(b: Bucket, keys: list[str], sliced: bool) -> Iterator[list[tuple[int, slice | None]]]:
    """Pieces of about PIECE_NUMEL elements: ``[(tensor index, slice of its flat view or None)]``."""
    piece: list[tuple[int, slice | None]] = []
    size = 0
    for i, n in enumerate(map(Tensor.numel, b.params)):
        if sliced and n > PIECE_NUMEL and _sliceable(b, i, keys):
            if piece:
                yield piece
                piece, size = [], 0
            for start in range(0, n, PIECE_NUMEL):
                yield [(i, slice(start, min(n, start + PIECE_NUMEL)))]
            continue
        if piece and size + n > PIECE_NUMEL:
            yield piece
            piece, size = [], 0
        piece.append((i, None))
        size += n
    if piece:
        yield piece


def _one_piece(b: Bucket) -> bool:
    return sum(map(Tensor.numel, b.params)) <= PIECE_NUMEL


def _owned_keys(b: Bucket, owners: set[str]) -> list[str]:
    return [k for k in b.state if k.split(".", 1)[0] in owners]


def _run_pieces(b: Bucket, ts: list[Transform], owners: set[str], last: bool, sliced: bool,
                writer: Writer = Bucket.write) -> None:
    if _one_piece(b):  # the bucket itself
        for t in ts:
            t.apply([b])
        if last:
            writer(b)
        return
    # the pending form (a divisor, a scale, a param term) goes into the pieces, as it would stay
    # pending over the whole bucket: materialized now, it would round differently
    keys = _owned_keys(b, owners)
    done = []
    # a sliced tensor's 0-d state (step_scalars): every slice starts from the value before the step
    before: dict[int, list[tuple[str, Tensor]]] = {}
    for piece in _plan(b, keys, sliced):
        indices, slices = [i for i, _ in piece], [s for _, s in piece]
        for i, s in piece:
            if s is not None and s.start == 0:
                before[i] = [(k, b.state[k][i].clone()) for k in keys if b.state[k][i].dim() == 0]
            elif s is not None:
                for k, value in before[i]:
                    b.state[k][i].copy_(value)
        sub = b.subset(indices, slices, keys, carry_pending=True)
        for t in ts:
            t.apply([sub])
        if last:
            # written: its temporaries go now, so that the next piece reuses their memory (kept to
            # the end, they would add up to full-size buffers, paid in page faults)
            writer(sub)
            b.absorb(sub, indices, slices, updates=False)
        else:
            done.append((sub, indices, slices))
    b.scale, b.decay, b.divisor, b.toward = 1.0, 0.0, None, None
    if done:
        _hand_over_pending(b, done)
    for sub, indices, slices in done:
        b.absorb(sub, indices, slices)


class _Finish:
    """Pass 2 of a phased transform over a piece, run as the first transform of the piece."""

    def __init__(self, t: Transform, hp: dict, flags: dict, c: Any) -> None:
        self.t, self.hp, self.flags, self.c = t, hp, flags, c

    def apply(self, buckets: list[Bucket]) -> None:
        for b in buckets:
            finish_phase(self.t, b, self.hp, self.flags, self.c)


def _run_phased(buckets: list[Bucket], t: Transform, tail: list[Transform], owners: set[str], last: bool,
                writer: Writer = Bucket.write) -> None:
    """A phased transform in pieces of whole tensors: pass 1 piece by piece, in order (the same
    sums, term by term, as over whole buckets), its estimate, then pass 2 and the leaves after it
    piece by piece (in slices where its ``finish_elementwise``). Pass 1 hands nothing to pass 2
    (pass 2 computes its direction again), so no piece's temporaries outlive it."""
    live = [b for b in buckets if len(b)]
    if not live:
        return

    def parts(b: Bucket) -> Iterator[Bucket]:
        if _one_piece(b):
            yield b
            return
        keys = _owned_keys(b, owners)
        for piece in _plan(b, keys, False):
            indices = [i for i, _ in piece]
            sub = b.subset(indices, None, keys, carry_pending=True)
            yield sub
            b.absorb(sub, indices, updates=False)

    hps, flags, c, _ = estimate_phases(t, live, parts)
    # pass 1 sums per tensor (whole tensors keep those sums' bits); pass 2, when the transform says
    # it is elementwise, may cut a large tensor into slices in the chain's last run
    sliced = last and getattr(t, "finish_elementwise", False) and all(_kind(x) == "slice" for x in tail)
    for b, hp, f in zip(live, hps, flags, strict=True):
        _run_pieces(b, [_Finish(t, hp, f, c), *tail], owners, last, sliced, writer)


def _hand_over_pending(b: Bucket, done: list) -> None:
    """Keep the pieces' pending forms pending on the whole bucket, as the step over the whole bucket
    would (the next transform may fold into it; materialized here, it would round differently): one
    scale for the bucket, or one per tensor; likewise the param term, which takes one value only."""
    subs = [sub for sub, _, _ in done]
    first = subs[0]
    if any((s.divisor is None) != (first.divisor is None) or not _same(s.decay, first.decay)
           or s.toward is not None for s in subs):
        return  # the pieces materialize their own forms when absorbed
    b.decay = first.decay
    if all(_same(s.scale, first.scale) for s in subs):
        b.scale = first.scale
    else:
        scale: list = [None] * len(b.params)
        for sub, indices, _ in done:
            for j, i in enumerate(indices):
                scale[i] = sub.scale[j] if isinstance(sub.scale, list) else sub.scale
        b.scale = scale
    if first.divisor is not None:
        divisor: list = [None] * len(b.params)
        for sub, indices, _ in done:
            for j, i in enumerate(indices):
                divisor[i] = sub.divisor[j]
        b.divisor = divisor
    for sub in subs:
        sub.scale, sub.decay, sub.divisor = 1.0, 0.0, None


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is float and type(b) is float and a == b)
