"""The eager step in cache-sized pieces: a chain's elementwise transforms over one piece at a time.

On the eager path every op of a transform is a pass over the whole bucket, so a chain of a few
transforms streams its buffers from memory many times a step. Run in pieces of about
:data:`PIECE_NUMEL` elements instead (small tensors grouped whole, a large tensor cut into
slices), the same ops find their operands in the CPU's caches after the first touch, and the step
costs little more than one pass. The math is the transforms' own ``update``; nothing is written
twice.

The chain's top-level transforms are cut into runs, as the fused path cuts them. A run of
``elementwise`` (and ``segmented`` or shape-dependent) leaves runs piece by piece. A tensor is
sliced only when its state in that run is shaped like it, contiguous, and only for leaves that
are plain ``elementwise`` (a per-tensor reduction needs the whole tensor), or ``rowwise`` ones
(gradient centralization, AGC: per-row reductions), which get blocks of whole rows. In the chain's last
run the slices write their params; a run before it hands the next run whole tensors, which its
slices' updates are views of (a lent momentum, Adam's ``m``; Adam's pending divisor is formed
from ``v`` later), or, where they are not, copied together once, that run going over whole
tensors from the next step on. A phased transform
(Prodigy, AdamS's mean) runs its first pass over whole tensors in order and its second, with the
leaves after it, in pieces; a ``partition`` or ``masked`` runs each child's chain in pieces (as
the chain's last run, the children write their params, and a run of leaves just before it runs
with each child's chain over that child's params), Lookahead its inner chain; any other
transform runs over the whole buckets. Elementwise ops give each element the bits it gets in one
pass over the whole tensor; vectorized transcendental functions (exp, log, atan2) may differ in
the last bit at the seams of a slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .base import (
    Bucket,
    Chain,
    Leaf,
    RootDivisor,
    Transform,
    _at,
    estimate_phases,
    finish_phase,
    is_phased,
    state_owners,
)
from .base import _same_scalar as _same

# elements per piece: with the few buffers a step reads and makes, a piece stays in the caches (a
# piece of 2^18 fp32 elements is 1 MB per buffer; 2^19 and 2^20 measured slower on a 2-core CPU with
# 2 MB of L2 per core). 0 turns pieces off: every run over whole buckets.
PIECE_NUMEL = 1 << 18


def _kind(t: Transform) -> str | None:
    """"slice" (elementwise: any slice of a tensor will do), "rows" (``rowwise``: a block of whole
    rows of a tensor with ndim >= 2 will do), "whole" (per-tensor reductions or shape-dependent
    rules: whole tensors only), or None (runs over the whole buckets)."""
    if not isinstance(t, Leaf):
        return None
    if t.elementwise_for is None and ((t.elementwise and not t.segmented) or t.step_scalars):
        return "slice"
    if t.rowwise:
        return "rows"
    if t.elementwise or t.segmented or t.elementwise_for is not None or t.per_tensor:
        return "whole"
    return None


def runs_here(buckets: list[Bucket]) -> bool:
    """Whether a step over ``buckets`` goes in pieces: on a CPU (on a GPU each piece would only add
    kernel launches), not while traced, and unless ``PIECE_NUMEL`` is 0."""
    return PIECE_NUMEL > 0 and not torch.compiler.is_compiling() and all(
        b.params[0].device.type == "cpu" for b in buckets if b.params)


class PiecewiseChain:
    """A chain's top-level transforms cut into runs; ``step`` applies them and writes the params."""

    def __init__(self, transform: Transform | list[Transform]) -> None:
        # a list: those transforms in turn (a segment of a fused chain)
        top = transform if isinstance(transform, list) else transform.children if isinstance(transform, Chain) \
            else [transform]
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
        # a chain's last run routed (a partition or mask): each child writes its params, its chain in
        # pieces over them. Right after a run of pieced leaves, the two runs are one: each child runs
        # those leaves and its own chain over its params, and the params no child takes the leaves
        # alone, so no model-sized updates pass between the runs (the leaves reduce per tensor at
        # most: any split of the params gives each tensor the same step). (index of the first run,
        # each child's chain by id, the chain of the leaves alone or None)
        self._routed_last: tuple[int, dict[int, PiecewiseChain], PiecewiseChain | None] | None = None
        if runs and runs[-1][0] == "routed":
            if len(runs) >= 2 and runs[-2][0] == "pieced":
                prefix = runs[-2][1]
                chains = {id(c): PiecewiseChain(prefix + (c.children if isinstance(c, Chain) else [c]))
                          for c in runs[-1][1][0].children.values()}
                self._routed_last = (len(runs) - 2, chains, PiecewiseChain(list(prefix)))
            else:
                self._routed_last = (len(runs) - 1, self._inner, None)
        # runs before the last whose sliced updates had to be copied together: run whole from then on
        self._copies: set[int] = set()
        # scales and decays alone (folded into the write, one pass) gain nothing from pieces
        self.useful = any(kind == "phased" or kind == "pieced" and any(t._update is not None for t in ts)
                          for kind, ts in runs) or any(inner.useful for inner in self._inner.values())

    def _step_routed_last(self, buckets: list[Bucket], routed: Transform, chains: dict[int, PiecewiseChain],
                          leaves: PiecewiseChain | None, writer: Writer) -> None:
        """The chain's last run, a routing (with the pieced ``leaves`` before it, if any): each child's
        params take the child's chain (after those leaves) in pieces and write themselves while their
        updates are in the caches, the rest take the leaves alone and are written. The bits are
        those of the runs in turn over whole buckets: there the routing's split materializes every
        update of a bucket it splits, then ``p + u`` (the parent's write folds no pending form)."""
        written = routed.apply_routed(
            buckets, lambda child, subs: chains[id(child)].step(subs, writer=_write_materialized), written=True)
        for b, done in zip(buckets, written, strict=True):
            rest = [i for i in range(len(b)) if i not in done]
            if not rest:
                continue
            # a bucket none of whose params a child took was not split, nor its updates materialized:
            # its write folds the pending forms, as the parent's would
            whole = len(rest) == len(b)
            sub = b if whole else b.subset(rest)
            if leaves is None:
                writer(sub)
                continue
            leaves.step([sub], writer=writer if whole else _write_materialized)
            if not whole:
                b.absorb(sub, rest, updates=False)

    def step(self, buckets: list[Bucket], write: bool = True, writer: Writer = Bucket.write) -> None:
        """Apply the chain to ``buckets`` and write their params (``writer``, ``Bucket.write`` by
        default); with ``write=False`` leave the updates in the buckets instead (nothing is sliced then)."""
        _prime_allocator()
        for j, (kind, ts) in enumerate(self.runs):
            last = write and j == len(self.runs) - 1
            if write and self._routed_last is not None and j == self._routed_last[0]:
                self._step_routed_last(buckets, self.runs[-1][1][0], *self._routed_last[1:], writer)
                return
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
            # a run before the chain's last is cut into slices too while its updates come back as
            # the tensors their slices are views of (a lent momentum, Adam's numerator and divisor
            # formed from state); a run that had to copy them together runs over whole tensors
            sliced = _slicing(ts) if last or j not in self._copies else None
            for b in buckets:
                if len(b) and _run_pieces(b, ts, owners, last, sliced, writer):
                    self._copies.add(j)


Writer = Callable[[Bucket], None]


def _slicing(ts: list[Transform]) -> str | None:
    """How a run may cut a large tensor: "flat" (any slice: every transform elementwise), "rows"
    (blocks of whole rows: every transform elementwise or rowwise), or None (whole tensors)."""
    kinds = {_kind(t) for t in ts}
    return "flat" if kinds == {"slice"} else "rows" if kinds <= {"slice", "rows"} else None


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


def _sliceable(b: Bucket, i: int, keys: list[str], mode: str) -> bool:
    p = b.params[i]
    if hasattr(p, "device_mesh") or p.numel() <= PIECE_NUMEL or (mode == "rows" and p.dim() < 2):
        return False
    state = [b.state[k][i] for k in keys]
    if not all(isinstance(t, Tensor) and (t.shape == p.shape or t.dim() == 0) for t in state):
        return False
    tensors = [p, b.grads[i], b.updates[i], *(t for t in state if t.dim())]
    return all(isinstance(t, Tensor) and t.shape == p.shape and t.is_contiguous() for t in tensors)


def _plan(b: Bucket, keys: list[str], sliced: str | None) -> Iterator[list[tuple[int, slice | None]]]:
    """Pieces of about PIECE_NUMEL elements: ``[(tensor index, slice of its flat view or None)]``
    (``sliced="rows"``: slices of whole rows, at least one)."""
    piece: list[tuple[int, slice | None]] = []
    size = 0
    for i, n in enumerate(map(Tensor.numel, b.params)):
        if sliced and n > PIECE_NUMEL and _sliceable(b, i, keys, sliced):
            if piece:
                yield piece
                piece, size = [], 0
            step = PIECE_NUMEL
            if sliced == "rows":
                row = n // b.params[i].shape[0]
                step = max(1, PIECE_NUMEL // row) * row
            for start in range(0, n, step):
                yield [(i, slice(start, min(n, start + step)))]
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


def _run_pieces(b: Bucket, ts: list[Transform], owners: set[str], last: bool, sliced: str | None,
                writer: Writer = Bucket.write) -> bool:
    """``ts`` over ``b`` piece by piece, written if ``last``. Returns True where a sliced tensor's
    update had to be copied together for the next run (see :func:`_hand_over`)."""
    if _one_piece(b):  # the bucket itself
        for t in ts:
            t.apply([b])
        if last:
            writer(b)
        return False
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
        sub = b.subset(indices, slices, keys, carry_pending=True, rows=sliced == "rows")
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
    return _hand_over(b, done) if done else False


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
    finish_sliced = last and getattr(t, "finish_elementwise", False)
    sliced = (_slicing(tail) if tail else "flat") if finish_sliced else None
    for b, hp, f in zip(live, hps, flags, strict=True):
        _run_pieces(b, [_Finish(t, hp, f, c), *tail], owners, last, sliced, writer)


def _hand_over(b: Bucket, done: list[tuple[Bucket, list[int], list[slice | None]]]) -> bool:
    """The pieces of a run that is not the chain's last, back to the whole bucket for the next run:
    their state, their updates (a tensor cut into slices as one tensor again) and their pending
    forms (see :func:`_hand_over_pending`). Returns True where a sliced tensor's update or divisor
    had to be copied into a new tensor (not the view of one tensor that its slices are)."""
    handed, copied = _hand_over_pending(b, done)
    if not handed:
        for sub, _, slices in done:
            if slices[0] is not None:
                sub.materialize()  # as the whole pieces do when absorbed
    for sub, indices, slices in done:
        b.absorb(sub, indices, slices, updates=slices[0] is None)
    pieces_of: dict[int, list[tuple[Tensor, slice]]] = {}
    for sub, indices, slices in done:
        if slices[0] is not None:
            pieces_of.setdefault(indices[0], []).append((sub.updates[0], slices[0]))
    for i, parts in pieces_of.items():
        whole = _root(parts, b.params[i])
        if whole is None:
            whole, copied = _copied(parts, b.params[i]), True
        else:
            # a tensor the step did not make (a gradient, a state buffer, a lent one): the next run
            # may not write it in place
            b._borrowed.add(id(whole))
        b.updates[i] = whole
    return copied


def _root(parts: list[tuple[Tensor, slice]], like: Tensor) -> Tensor | None:
    """The tensor shaped like ``like`` whose flat view's slices ``parts`` are, if they are."""
    base = parts[0][0]._base
    if base is None or base.numel() != like.numel() or not base.is_contiguous():
        return None
    if any(u._base is not base or u.storage_offset() - base.storage_offset() != s.start for u, s in parts):
        return None
    return base if base.shape == like.shape else base.view(like.shape)


def _copied(parts: list[tuple[Tensor, slice]], like: Tensor) -> Tensor:
    """A new tensor shaped like ``like`` from its slices: what the step over whole tensors makes."""
    out = torch.empty(like.shape, dtype=parts[0][0].dtype, device=parts[0][0].device)
    flat = out.view(-1)
    for u, s in parts:
        flat[s].copy_(u.reshape(-1))  # a block of rows has the param's trailing shape
    return out


def _hand_over_pending(b: Bucket, done: list) -> tuple[bool, bool]:
    """Keep the pieces' pending forms pending on the whole bucket, as the step over the whole bucket
    would (the next transform may fold into it; materialized here, it would round differently): one
    scale for the bucket, or one per tensor; likewise the param term, which takes one value only;
    the divisor per tensor (Adam's formed from state stays so: no model-sized denominator).
    Returns whether it handed them over (not where the pieces' forms differ) and whether a sliced
    tensor's divisor was copied together."""
    subs = [sub for sub, _, _ in done]
    first = subs[0]
    if any((s.divisor is None) != (first.divisor is None) or not _same(s.decay, first.decay)
           or s.toward is not None for s in subs):
        return False, False  # the pieces materialize their own forms when absorbed
    # per tensor: (sub, entry, slice) of every piece it is in (several slices of a large tensor)
    entries: list[list[tuple[Bucket, int, slice | None]]] = [[] for _ in b.params]
    for sub, indices, slices in done:
        for j, (i, s) in enumerate(zip(indices, slices, strict=True)):
            entries[i].append((sub, j, s))
    scales = [_at(es[0][0].scale, es[0][1]) for es in entries]
    if any(not _same(_at(sub.scale, j), sc) for es, sc in zip(entries, scales, strict=True) for sub, j, _ in es):
        return False, False  # slices of one tensor with different scales
    divisor, copied = (None, False) if first.divisor is None else _joined_divisor(b, entries)
    b.decay = first.decay
    # (one scale for the bucket only where the pieces' is one value: a list is one per tensor of a piece)
    one = not isinstance(first.scale, list) and all(_same(s.scale, first.scale) for s in subs)
    b.scale = first.scale if one else scales
    b.divisor = divisor
    for sub in subs:
        sub.scale, sub.decay, sub.divisor = 1.0, 0.0, None
    return True, copied


def _joined_divisor(b: Bucket, entries: list[list[tuple[Bucket, int, slice | None]]]
                    ) -> tuple[list | RootDivisor, bool]:
    """The pieces' divisors as one pending divisor of the bucket: a :class:`RootDivisor` over the
    whole ``v`` where every piece has one over its views, else tensors; and whether a sliced
    tensor's divisor had to be copied together."""
    if all(isinstance(sub.divisor, RootDivisor) for es in entries for sub, _, _ in es):
        v = []
        for i, es in enumerate(entries):
            if es[0][2] is None:
                v.append(es[0][0].divisor.v[es[0][1]])
            else:
                v.append(_root([(sub.divisor.v[j], s) for sub, j, s in es], b.params[i]))
        if all(x is not None for x in v):
            cs = [[_at(sub.divisor.c, j) for sub, j, _ in es] for es in entries]
            if all(_same(c, cs_i[0]) for cs_i in cs for c in cs_i):
                joined = RootDivisor.joined([(es[0][0].divisor, es[0][1]) for es in entries], v)
                if joined is not None:
                    return joined, False
    formed: dict[int, list[Tensor]] = {}
    for es in entries:
        for sub, _, _ in es:
            if id(sub) not in formed:
                formed[id(sub)] = sub.divisors()
    out, copied = [], False
    for i, es in enumerate(entries):
        if es[0][2] is None:
            out.append(formed[id(es[0][0])][es[0][1]])
            continue
        parts = [(formed[id(sub)][j], s) for sub, j, s in es]
        whole = _root(parts, b.params[i])
        if whole is None:
            whole, copied = _copied(parts, b.params[i]), True
        out.append(whole)
    return out, copied
