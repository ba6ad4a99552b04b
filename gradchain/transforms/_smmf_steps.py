"""SMMF's step over rank-1 factors and packed signs: eagerly (pieces of rows in batches that stay
in cache, list ops) and traced (one tensor's whole-tensor expressions, for ``torch.compile``).
:func:`gradchain.transforms.smmf.scale_by_smmf` is the transform; the rule is stated there."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..base import WRITE_BLOCK

# -- the eager step: pieces of rows, in batches that stay in cache ----------------------------------
# off the CPU a batch need not fit a cache: it only has to be large enough that the launches of its
# few dozen kernels cost little beside their work
_DEVICE_BATCH = 1 << 24
_SIGN_TABLES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(256, 8)``: row ``b`` holds +1 where bit ``j`` of ``b`` is set, else -1 (made once per device and dtype)."""
    key = (device, dtype)
    table = _SIGN_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        table = _SIGN_TABLES[key] = (bits * 2 - 1).to(dtype)
    return table


class TensorStep:
    """One tensor's eager step: its gradient as ``(r, c)`` and its state (written in place); then,
    from its pieces (:func:`_batches`), its update and the new column sums (normalized at the end)."""

    __slots__ = ("g", "sign", "m_row", "m_col", "v_row", "v_col", "b1", "b2", "u", "m_cols", "v_cols")

    def __init__(self, g: Tensor, state: tuple[Tensor, ...], b1: float, b2: float) -> None:
        self.g = g
        self.sign, self.m_row, self.m_col, self.v_row, self.v_col = state
        self.b1, self.b2 = b1, b2
        self.u: Tensor | None = None
        self.m_cols: Tensor | None = None
        self.v_cols: Tensor | None = None
        if not g.numel():  # no pieces: an empty update, and the factors of an all-zero matrix
            self.take(0, 0, torch.empty_like(g), torch.zeros_like(self.m_col), torch.zeros_like(self.v_col))

    def take(self, start: int, stop: int, u: Tensor, m_cols: Tensor, v_cols: Tensor) -> None:
        """A piece's results: a whole tensor's as they are; a block of rows' into the update, its
        column sums added to those of the blocks before."""
        if stop - start == self.g.shape[0]:
            self.u, self.m_cols, self.v_cols = u, m_cols, v_cols
            return
        if self.u is None:
            self.u = torch.empty_like(self.g)
            self.m_cols, self.v_cols = torch.zeros_like(m_cols), torch.zeros_like(v_cols)
        self.u[start:stop].copy_(u)
        self.m_cols.add_(m_cols)  # type: ignore[union-attr]
        self.v_cols.add_(v_cols)  # type: ignore[union-attr]


_Piece = tuple[TensorStep, int, int]  # rows start:stop of a tensor


def _row_block(rows: int, cols: int, size: int) -> int:
    """Rows per piece of a large tensor: about ``size`` elements, a multiple of the rows that make a
    whole number of bytes of packed signs."""
    unit = 8 // math.gcd(cols, 8)
    per = max(size // max(cols, 1), 1)
    return min(rows, -(-per // unit) * unit)


def _batches(ts: list[TensorStep]) -> Iterator[list[_Piece]]:
    """Pieces in batches of about ``WRITE_BLOCK`` elements on a CPU, whose temporaries stay in
    cache (``_DEVICE_BATCH`` elsewhere): tensors up to that size whole, several to a batch; a larger
    one in blocks of rows, a batch each. Every piece starts on a byte of packed signs."""
    size = WRITE_BLOCK if ts and ts[0].g.is_cpu else _DEVICE_BATCH
    batch: list[_Piece] = []
    filled = 0
    for t in ts:
        r, c = t.g.shape
        n = r * c
        if n > size:
            step = _row_block(r, c, size)
            yield from ([(t, a, min(a + step, r))] for a in range(0, r, step))
        elif n:
            if batch and filled + n > size:
                yield batch
                batch, filled = [], 0
            batch.append((t, 0, r))
            filled += n
    if batch:
        yield batch


def _by_value(pieces: list[_Piece], attr: str) -> dict[float, list[int]]:
    """The pieces' indices by the value of a per-tensor scalar (``b1``, ``b2``): one list op per
    value, the same op on each tensor whatever else shares the batch."""
    groups: dict[float, list[int]] = {}
    for k, (t, _, _) in enumerate(pieces):
        groups.setdefault(getattr(t, attr), []).append(k)
    return groups


def _scaled_rows(pieces: list[_Piece], factor: str, scalar: str) -> list[Tensor]:
    """Each piece's rows of a row factor times its tensor's ``b1`` or ``b2``, as a column ``(rows, 1)``
    (the scalar folded into a vector: no pass over the matrix)."""
    rows = [getattr(t, factor)[a:z].unsqueeze(1) for t, a, z in pieces]
    out = list(rows)
    for value, ks in _by_value(pieces, scalar).items():
        for k, x in zip(ks, torch._foreach_mul([rows[k] for k in ks], value), strict=True):
            out[k] = x
    return out


def _sums(pieces: list[_Piece], xs: list[Tensor], factor: str) -> list[Tensor]:
    """Row sums of each piece into its rows of the row factor ``factor`` (a piece's rows are its
    own: read already); returns the column sums."""
    for (t, a, z), x in zip(pieces, xs, strict=True):
        torch.sum(x, dim=1, out=getattr(t, factor)[a:z])
    return [x.sum(dim=0) for x in xs]


def _signs(packed: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Packed signs (whole bytes each) as +1 / -1 in ``dtype``, 8 per byte, in one flat buffer: one
    table lookup per byte (a bool mask and ``torch.where`` would cost several passes, and ``where``
    is not vectorized on CPU)."""
    table = _sign_table(packed[0].device, dtype)
    return torch.index_select(table, 0, (packed[0] if len(packed) == 1 else torch.cat(packed)).int()).view(-1)


def _pack_positive(flat: Tensor, packed: list[Tensor]) -> None:
    """Write the signs of ``flat > 0`` into ``packed`` (``flat`` laid out as :func:`_signs` gives
    it): as 1.0 / 0.0 (a float result is vectorized, a bool one is not), 8 to a byte by one
    product with the bit weights (exact: integers below 256)."""
    bits = torch.gt(flat, 0, out=torch.empty_like(flat)).view(-1, 8)
    weights = 2.0 ** torch.arange(8, dtype=bits.dtype, device=bits.device)
    torch._foreach_copy_(packed, torch.mv(bits, weights).split([p.numel() for p in packed]))


def _step_batch(pieces: list[_Piece], eps: float) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One step over a batch of pieces: ``M`` and ``V`` decompressed and updated, the new row sums
    of ``|M|`` and ``V`` and the packed signs of ``M > 0`` written into the state. Returns the
    pieces' updates and column sums of ``|M|`` and ``V``.

    ``M`` lives in the flat buffer of the pieces' signs (:func:`_signs`), each piece at its first
    byte's place; the padding after a piece's last element holds the -1 of a 0 bit, which packs
    as 0 again. The rest are list ops, over the pieces of a batch at once."""
    shapes = [(z - a, t.g.shape[1]) for t, a, z in pieces]
    packed = [t.sign[a * c // 8: (z * c + 7) // 8] for (t, a, z), (_, c) in zip(pieces, shapes, strict=True)]
    m_flat = _signs(packed, pieces[0][0].g.dtype)
    offsets = [0]
    for p in packed[:-1]:
        offsets.append(offsets[-1] + 8 * p.numel())
    ms = [m_flat[o: o + r * c].view(r, c) for o, (r, c) in zip(offsets, shapes, strict=True)]
    gs = [t.g[a:z] for t, a, z in pieces]
    # M = sign * (b1 m_row) m_col^T + (1 - b1) G
    torch._foreach_mul_(ms, [t.m_col for t, _, _ in pieces])
    torch._foreach_mul_(ms, _scaled_rows(pieces, "m_row", "b1"))
    for b1, ks in _by_value(pieces, "b1").items():
        torch._foreach_add_([ms[k] for k in ks], [gs[k] for k in ks], alpha=1.0 - b1)
    # V = (b2 v_row) v_col^T + (1 - b2) G^2
    vs = torch._foreach_mul(_scaled_rows(pieces, "v_row", "b2"), [t.v_col for t, _, _ in pieces])
    for b2, ks in _by_value(pieces, "b2").items():
        torch._foreach_addcmul_([vs[k] for k in ks], [gs[k] for k in ks], [gs[k] for k in ks], value=1.0 - b2)
    v_cols = _sums(pieces, vs, "v_row")
    torch._foreach_sqrt_(vs)
    torch._foreach_add_(vs, eps)
    us = torch._foreach_div(ms, vs)
    _pack_positive(m_flat, packed)
    m_flat.abs_()
    return us, _sums(pieces, ms, "m_row"), v_cols


def step_eager(ts: list[TensorStep], eps: float) -> None:
    """SMMF's step over tensors, eagerly: their pieces in batches (:func:`_batches`), then the
    column factors, normalized: ``cols / sum(cols)``, all-zero ones left as they are (the
    official code skips the division by 0)."""
    for batch in _batches(ts):
        for (t, a, z), *results in zip(batch, *_step_batch(batch, eps), strict=True):
            t.take(a, z, *results)
    cols = [t.m_cols for t in ts] + [t.v_cols for t in ts]
    totals = torch.stack(torch._foreach_norm(cols, 1))  # sums: the columns are >= 0
    torch._foreach_div_(cols, list(torch.where(totals > 0, totals, torch.ones_like(totals)).unbind()))
    torch._foreach_copy_([t.m_col for t in ts] + [t.v_col for t in ts], cols)


# -- the traced step: one tensor, whole-tensor expressions, for torch.compile -----------------------
# Inductor (CPU) vectorizes a loop only where each load is contiguous or the same for all lanes of
# a vector, and it fuses reductions only over the same loops. So the signs are read 16 at a time
# (one 16-bit word per 16 lanes, not a byte per 8), each column's lane picked by a bit mask of its
# own (a vector indexed like m_col); the new signs and the row sums are reduced over the same
# groups of 16 elements of a row (one loop); the column sums run over blocks of rows (in cache).
# The step is then three passes over the gradient: the final write, the signs with the row sums,
# and the column sums.
_LANES = 16


def _halfwords(packed: Tensor) -> Tensor:
    """The packed signs as int32 values of 16 bits each: signs 16k..16k+15 in value k."""
    b = packed.to(torch.int32)
    # padded by a size, not under a branch: with symbolic sizes a branch would guard on it
    b = torch.nn.functional.pad(b, (0, b.numel() % 2)).view(-1, 2)
    return b[:, 0] | (b[:, 1] << 8)


def _lanes_aligned(c: int) -> bool:
    """Whether each row of an ``(r, c)`` matrix is whole groups of 16 (then a column is one lane).
    With symbolic sizes, one guard on ``c % 16``: two kernels at most."""
    return c % _LANES == 0


def _signs_traced(packed: Tensor, r: int, c: int) -> Tensor:
    """The packed signs as an ``(r, c)`` bool matrix (:func:`gradchain.transforms.smmf.unpack_signs`)."""
    h = _halfwords(packed)
    if _lanes_aligned(c):
        bit = 1 << (torch.arange(c, dtype=torch.int32, device=packed.device) % _LANES)
        return (h.view(r, c // _LANES, 1).expand(r, c // _LANES, _LANES).reshape(r, c) & bit) != 0
    lanes = torch.arange(_LANES, dtype=torch.int32, device=packed.device)
    return ((h.unsqueeze(1) >> lanes) & 1).reshape(-1)[: r * c].view(r, c) != 0


def _groups(x: Tensor) -> Tensor:
    """``(r, c)`` as ``(groups, 16)``: a row's groups of 16 when it has whole ones, else the flat
    tensor's (zero-padded at the end)."""
    r, c = x.shape
    if _lanes_aligned(c):
        return x.view(r, c // _LANES, _LANES)
    flat = x.reshape(-1)
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % _LANES)).view(-1, _LANES)


def _pack_traced(pos: Tensor, nbytes: int) -> Tensor:
    """:func:`gradchain.transforms.smmf.pack_signs` of an ``(r, c)`` bool matrix: per 16 signs one
    float sum of their weights 1, 2, ..., 2^15 (exact in float32; a bool or int reduction is not
    vectorized), as two bytes."""
    weights = 2.0 ** torch.arange(_LANES, dtype=torch.float32, device=pos.device)
    h = (_groups(pos.to(torch.float32)) * weights).sum(-1).to(torch.int32)
    return torch.stack([h & 255, h >> 8], -1).reshape(-1)[:nbytes].to(torch.uint8)


def _row_sums(x: Tensor) -> Tensor:
    """Row sums of an ``(r, c)`` matrix: over its groups of 16 first, which the packing's loop reduces too."""
    r, c = x.shape
    return _groups(x).sum(-1).sum(-1) if _lanes_aligned(c) else x.sum(dim=1)


def _col_sums(x: Tensor) -> Tensor:
    """Column sums of an ``(r, c)`` matrix over blocks of 16 rows first (zero rows pad the last),
    each block in cache, where one pass down whole columns would stream the matrix once per
    vector of columns. A fixed block, not a divisor of ``r``: a search would guard on the size."""
    r, c = x.shape
    if r % _LANES:  # only then: with a pad of 0 inductor's step measured a third slower
        x = torch.nn.functional.pad(x, (0, 0, 0, _LANES - r % _LANES))
    return x.view(-1, _LANES, c).sum(1).sum(0)


def _normalized(col: Tensor) -> Tensor:
    """``col / sum(col)``, an all-zero ``col`` as it is (the official code skips the division by 0)."""
    total = col.sum()
    return col / torch.where(total > 0, total, torch.ones_like(total))


def step_traced(gm: Tensor, sign: Tensor, m_row: Tensor, m_col: Tensor, v_row: Tensor, v_col: Tensor,
                 b1: Any, b2: Any, eps: Any) -> Tensor:
    """One SMMF step of an ``(r, c)`` gradient with 0-d tensor scalars; returns the update and
    writes the state. The ops of :func:`_step_batch`, as whole-tensor expressions."""
    r, c = gm.shape
    pos = _signs_traced(sign, r, c)
    m = torch.where(pos, m_col, -m_col) * (m_row * b1).unsqueeze(1) + gm * (1.0 - b1)
    v = (v_row * b2).unsqueeze(1) * v_col + gm * gm * (1.0 - b2)
    u = m / (v.sqrt() + eps)
    a = m.abs()
    sign.copy_(_pack_traced(m > 0, sign.numel()))
    m_row.copy_(_row_sums(a))
    v_row.copy_(_row_sums(v))
    m_col.copy_(_normalized(_col_sums(a)))
    v_col.copy_(_normalized(_col_sums(v)))
    return u
