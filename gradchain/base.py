"""Transform, chain and the step context (a bucket of tensors) that transforms work on.

A transform turns an *update* into another update. The optimizer owns parameters, groups and
state and does the final write ``p += u``. Transforms run over *buckets*: the params of one
param group, device and dtype, as lists, so each call is a handful of ``torch._foreach_*`` ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import ops
from ._dtensor import replicate_like
from .hyperparams import Hyperparam, same_value, validate

Scalar = float | list
StateDict = dict[str, Tensor]
InitFn = Callable[[Tensor], StateDict]
UpdateFn = Callable[[list, dict, Mapping, "Bucket"], list]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# on the fused path, buckets of at most this many tensors reduce per tensor through one slice each
# (fused by the compiler); larger ones, whose graphs would grow with the count, are laid out in rows
# (FlatBucket.chunked) and reduce through row sums, also fused
SEGMENT_UNROLL = 32
# elements: a divisor at least this large takes the quotient in place (Bucket._divide)
_DIVIDE_IN_PLACE = 1 << 16
# the eager final write forms a large tensor's row-block divisor (PendingDivisor.rows) this many elements at a time
WRITE_BLOCK = 1 << 18
# elements per row of such a chunked bucket
SEGMENT_ROW = 256


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype state and math use for params of ``dtype``: fp32 for fp16/bf16, else itself."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def zeros_state(param: Tensor) -> Tensor:
    """A zero buffer shaped like ``param`` (a DTensor for a DTensor param), fp32 if it is low precision."""
    return torch.zeros_like(param, dtype=compute_dtype(param.dtype), memory_format=torch.preserve_format)


def scalar_state(param: Tensor, value: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
    """A 0-d state tensor for ``param`` (its compute dtype): a replicated DTensor under FSDP2.

    Per-tensor statistics (a norm EMA, a Lagrange multiplier) computed from a DTensor are
    replicated DTensors; keeping the state in the same kind lets in-place updates mix them.
    """
    return replicate_like(torch.full((), value, dtype=dtype or compute_dtype(param.dtype), device=param.device),
                          param)


# the param group a param's state is being made for (set by the optimizer around init_state)
_INIT_GROUP: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("gradchain_init_group",
                                                                                      default=None)


@contextlib.contextmanager
def initializing_for(group: Mapping[str, Any] | None) -> Iterator[None]:
    """Within the block, ``init`` functions that take hyperparameters see ``group``'s values."""
    token = _INIT_GROUP.set(group)
    try:
        yield
    finally:
        _INIT_GROUP.reset(token)


def _is_one(s: Scalar) -> bool:
    # a tensor scalar (fused path) is never known to be 1: its value is not read on the host
    return not isinstance(s, (list, Tensor)) and s == 1.0


def _is_zero(s: Scalar) -> bool:
    return not isinstance(s, (list, Tensor)) and s == 0.0


def _plus(a: Any, b: Any) -> Any:
    """``a + b`` where either may be one value per tensor (a list): then a list."""
    if isinstance(a, list) or isinstance(b, list):
        n = len(a) if isinstance(a, list) else len(b)
        return [_at(a, i) + _at(b, i) for i in range(n)]
    return a + b


def _times(a: Any, b: Any) -> Any:
    """``a * b`` where either may be one value per tensor (a list): then a list."""
    if isinstance(a, list) or isinstance(b, list):
        n = len(a) if isinstance(a, list) else len(b)
        return [_at(a, i) * _at(b, i) for i in range(n)]
    return a * b


def _storage(t: Tensor) -> int | None:
    """The address of a tensor's storage (a DTensor's local shard), or None when it has none."""
    local = getattr(t, "_local_tensor", t)
    try:
        return local.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


class PendingDivisor:
    """A divisor per tensor formed only when it is needed: by the final write or by ``materialize``.

    ``tensors()`` forms it whole. A subclass with ``in_row_blocks = True`` also forms any block of
    rows (dim 0) of one tensor (``rows``): the eager final write on a CPU then forms a large
    tensor's divisor one cache-sized block at a time, right before it divides by it, so the divisor
    never exists at full size in memory (SM3's).
    """

    __slots__ = ()
    in_row_blocks = False

    def __len__(self) -> int:
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """The divisors, new tensors."""
        raise NotImplementedError

    def rows(self, i: int, start: int, stop: int) -> Tensor:
        """Tensor ``i``'s divisor over rows ``start:stop`` of its dim 0, a new tensor."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int], views: Sequence[Tensor] | None = None) -> PendingDivisor:
        """The divisor of the tensors at ``indices`` (``views``: the slices of them it is for, where
        it supports slices)."""
        raise NotImplementedError


class RowBlockDivisor(PendingDivisor):
    """A pending divisor of the tensors ``g`` (a bucket's updates) that forms any block of rows of one
    of them (``rows``). ``tensors()`` forms those that ``listed()`` forms together with list ops (many
    small tensors are bound by per-op overhead), and the others whole by ``rows``; an empty tensor
    divides by itself (nothing to form)."""

    __slots__ = ("g",)
    in_row_blocks = True

    def __len__(self) -> int:
        return len(self.g)

    def listed(self) -> dict[int, Tensor]:
        """The divisors formed together by list ops, by index."""
        return {}

    def tensors(self) -> list[Tensor]:
        out = self.listed()
        return [out[i] if i in out else g if not g.numel() else self.rows(i, 0, g.shape[0])
                for i, g in enumerate(self.g)]


class RootDivisor(PendingDivisor):
    """A pending divisor formed from state only when it is needed: ``sqrt(v) / c + eps`` per tensor.

    Adam's denominator: ``v`` a state buffer per tensor (shaped like its param), ``c`` a number, a
    0-d tensor or one per tensor, ``eps`` one number. The final write forms it (on the eager path
    piece by piece, so no model-sized denominator is made, even for a run that is not the chain's
    last), as does ``Bucket.materialize``: the ops, and so the bits, of forming it in the
    transform. It reads ``v`` then, so nothing may write ``v`` in between: a transform sees its
    updates materialized (``Leaf.apply``), and only the pending forms and the write come between.
    """

    __slots__ = ("v", "c", "eps")

    def __init__(self, v: Sequence[Tensor], c: Scalar, eps: Any) -> None:
        self.v, self.c, self.eps = list(v), c, eps

    def __len__(self) -> int:
        return len(self.v)

    def tensors(self) -> list[Tensor]:
        """The divisors, new tensors."""
        d = torch._foreach_sqrt(self.v)
        if not (type(self.c) is float and self.c == 1.0):  # x / 1 is x: no pass
            ops.div_(d, self.c)
        ops.add_(d, self.eps)
        return list(d)

    def subset(self, indices: Sequence[int], views: Sequence[Tensor] | None = None) -> RootDivisor:
        """The divisor of the tensors at ``indices``, whose ``v`` (or its slice) is ``views``."""
        views = [self.v[i] for i in indices] if views is None else views
        return RootDivisor(views, [self.c[i] for i in indices] if isinstance(self.c, list) else self.c, self.eps)

    @staticmethod
    def joined(parts: Sequence[tuple[RootDivisor, int]], v: Sequence[Tensor]) -> RootDivisor | None:
        """One divisor over the tensors ``v``: the ``k``-th is entry ``j`` of ``parts[k] = (divisor,
        j)``; None where the parts' ``eps`` differ."""
        eps = parts[0][0].eps
        if any(not _same_scalar(d.eps, eps) for d, _ in parts):
            return None
        cs = [d.c[j] if isinstance(d.c, list) else d.c for d, j in parts]
        c = cs[0] if all(_same_scalar(x, cs[0]) for x in cs) else cs
        return RootDivisor(v, c, eps)


def _same_scalar(a: Any, b: Any) -> bool:
    return a is b or same_value(a, b)


def row_blocks(x: Tensor) -> list[tuple[int, int]]:
    """``(start, stop)`` along dim 0 of ``x``: blocks of whole rows of about ``WRITE_BLOCK`` elements,
    the last one shorter (the unit of a divisor formed in row blocks, and of the eager transforms
    that keep a model-sized temporary out of memory this way)."""
    n = x.shape[0]
    step = max(1, WRITE_BLOCK * n // max(x.numel(), 1))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


class HostStep(NamedTuple):
    """What a transform works out on the host from a tensor's step count (``transform(host_step=)``).

    ``values``: numbers (or sequences of numbers) the update reads as ``ctx.host_values[i]``.
    ``state``: the names under which the update sees some of its state buffers this step (seen name
    -> stored name; a ring buffer's slots in order of age), so that the update never branches on
    the step itself.
    """

    values: Mapping[str, Any]
    state: Mapping[str, str] = {}


class Bucket:
    """The step context of one bucket: params of one group, device and dtype.

    Transforms read ``params``, ``grads`` (raw descent-direction gradients: negated under
    ``maximize``), ``steps`` (0-d tensors, already counting this step), ``names``, ``loss`` and
    ``shared`` (a dict shared by all buckets and transforms for this step), and map ``updates``.

    ``updates`` may carry a pending affine form ``scale * updates + decay * params`` that is folded
    into the final write, so that scaling by lr and decoupled decay cost no pass of their own.
    Generic transforms always see it materialized.

    State is safe by construction: an update that is a gradient or one of the bucket's state
    buffers (a transform may return its momentum buffer, as optax code does) is never written in
    place; it is copied first (:meth:`ensure_owned`).

    With ``tensor_scalars=True`` (the fused path and traced steps) step counts and hyperparameters
    are 0-d tensors rather than Python numbers, so that new values do not recompile; transforms
    built with ``elementwise=True`` are written for both kinds (see :mod:`gradchain.ops`).
    """

    def __init__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, list],
        steps: list[Tensor],
        names: list[str | None],
        group: Mapping[str, Any],
        loss: Tensor | None = None,
        shared: dict | None = None,
        dtype: torch.dtype | None = None,
        batch_size: Any = None,
        *,
        step_values: list | None = None,
        tensor_scalars: bool = False,
        resolved: Mapping[str, Any] | None = None,
    ) -> None:
        self.params = params
        self.grads = grads
        self.state = state
        self.steps = steps
        self.names = names
        self.group = group
        self.loss = loss
        self.shared = {} if shared is None else shared
        # this micro-batch's sample or token count (``step(batch_size=)``), read by accumulate()
        self.batch_size = batch_size
        param_dtype = params[0].dtype if params else torch.float32
        self.dtype = dtype or compute_dtype(param_dtype)
        if self.dtype != param_dtype or (grads and grads[0].dtype != self.dtype):
            # (grads of low-precision params, where the fused path steps an exact copy of them: Lookahead)
            self.updates = [g.to(self.dtype) for g in grads]
        else:
            self.updates = list(grads)
        self.tensor_scalars = tensor_scalars
        if step_values is None and tensor_scalars:
            step_values = list(steps)
        # host step numbers, read from ``steps`` when first asked for (most chains never ask)
        self._step_values: list | None = step_values
        # hyperparameters already resolved (schedules evaluated, checked) for this step, by group key
        self.resolved = resolved
        # on the fused path's flat buffer: FlatBucket.segments() (lengths, rows, numels, names, shapes)
        self.segments: tuple | None = None
        self.scale: Scalar = 1.0
        self.decay: Any = 0.0
        # a pending divisor: tensors, or Adam's formed from its state when needed (RootDivisor)
        self.divisor: list[Tensor] | RootDivisor | None = None
        # a pending interpolation of the params toward these tensors by this weight (schedule-free)
        self.toward: tuple[list[Tensor], float] | None = None
        self._borrowed: set[int] = set()
        # the values of the transform being applied's ``host_step``, one mapping per tensor
        self.host_values: list[Mapping[str, Any]] | None = None
        # on the fused path's flat buffer of params whose step counts differ: one count per param
        # (a vector), read through ``per_step`` and ``per_step_vector`` and broadcast per param
        self.step_vector: Tensor | None = None

    def __len__(self) -> int:
        return len(self.params)

    # -- the step count -------------------------------------------------------------------
    @property
    def step_values(self) -> list:
        """Each tensor's step number (this step included): floats on the eager path, 0-d tensors traced
        (on a flat buffer with a count per param, each element's count)."""
        if self.step_vector is not None:
            return self.per_tensor(self.step_vector.to(self.dtype))
        if self._step_values is None:
            self._step_values = torch.stack(self.steps).tolist() if self.steps else []
        return self._step_values

    @step_values.setter
    def step_values(self, values: list) -> None:
        self._step_values = values

    @property
    def step(self) -> Any:
        """The step number (1-based, this step included) if it is the same for every tensor.

        A float on the eager path; on the fused path the bucket's one step count, a 0-d tensor.
        """
        if self.step_vector is not None:
            return None
        v = self.step_values
        if not v:
            return None
        if self.tensor_scalars:
            return v[0] if len(v) == 1 else None
        lo, hi = min(v), max(v)
        return lo if lo == hi else None

    @property
    def group_step(self) -> int:
        """The largest step count in the bucket: what schedules of the step are evaluated at."""
        if self.tensor_scalars:
            raise RuntimeError("group_step is a host value: resolve schedules before a fused step")
        return int(max(self.step_values)) if self.step_values else 0

    def per_step(self, fn: Callable[[Any], Any]) -> Scalar:
        """``fn(step)`` as one value when all tensors share a step, else a list (one per tensor)."""
        if self.step_vector is not None:
            # worked out once per param in float64 (as the host does), then broadcast per param
            v = fn(self.step_vector)
            return self.per_tensor(v.to(self.dtype)) if isinstance(v, Tensor) and v.dim() else v
        s = self.step
        if s is not None:
            return fn(s)
        return [fn(t) for t in self.step_values]

    def per_step_vector(self, fn: Callable[[Any], Any], like: Tensor) -> Any:
        """``fn(step)`` for each tensor as one vector of ``like``'s dtype and device (one value when
        all tensors share a step, as :meth:`per_step`). Host numbers eagerly; traced, 0-d tensors
        stacked (a new tensor from a list of them would read their values while tracing)."""
        if self.step_vector is not None:
            return torch.as_tensor(fn(self.step_vector)).to(like.device, like.dtype)
        s = self.per_step(fn)
        if not isinstance(s, list):
            return s
        if any(isinstance(x, Tensor) for x in s):
            return torch.stack([torch.as_tensor(x).to(like.device, like.dtype) for x in s])
        return like.new_tensor(s)

    # -- per-tensor reductions, on lists or on one flat buffer ----------------------------------
    def tensor_norms(self, xs: list[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """The L2 norm of each param's tensor in ``xs`` (laid out like the params), as one vector.

        On a list, one norm per element; on the fused path's flat buffer, one per param segment.
        """
        if self.segments is None and not (self.tensor_scalars and xs):
            return torch.stack(ops.norms(xs, dtype)) if xs else torch.zeros(0)
        # squares in ``dtype`` where it widens the tensors, else in their own (then cast)
        wide = dtype if xs and ops.widens(dtype, xs[0].dtype) else None
        if self.segments is None:
            # traced over per-tensor views: sums of squares fuse into the kernel that computes x,
            # where a norm is an opaque call that makes x a full-size buffer of its own
            xs = xs if wide is None else [x.to(wide) for x in xs]
            n = torch.stack([(x * x).sum() for x in xs]).sqrt()
        else:
            x = xs[0] if wide is None else xs[0].to(wide)
            n = self._segment_sums(x * x).sqrt()
        return n if dtype is None else n.to(dtype)

    def tensor_sums(self, xs: list[Tensor]) -> Tensor:
        """The sum of each param's tensor in ``xs``, as one vector (see :meth:`tensor_norms`)."""
        if self.segments is None:
            return torch.stack([x.sum() for x in xs]) if xs else torch.zeros(0)
        return self._segment_sums(xs[0])

    def _segment_sums(self, x: Tensor) -> Tensor:
        rows, numels = self.segments[1], self.segments[2]
        if rows is None and max(numels, default=0) == 1 and min(numels) == 1:
            return x.clone()  # one element a param (0-d params): each its own sum, in place of a slice each
        if rows is None:
            # one reduction per slice: the compiler fuses each into the kernel that computes x,
            # where torch.segment_reduce over x is an opaque call that makes x a full-size buffer
            return torch.stack([part.sum() for part in x.split(numels)])
        # a chunked bucket: row sums fused into that kernel, then a sum of each param's few rows.
        # Only a param's last row reaches into the gap after it: that row is summed again with the
        # gap masked out and replaces the plain sum (so whatever the gap holds, NaN included, stays
        # out), where masking every row costs an index compare per element
        row_ids, per_param, valid = rows
        view = x.view(-1, SEGMENT_ROW)
        sums = view.sum(1)
        if sums.numel():
            last = per_param.cumsum(0) - 1  # a param without elements points at a neighbour's row: the same value
            inside = torch.arange(SEGMENT_ROW, device=x.device) < valid[last].unsqueeze(1)
            sums = sums.index_put((last,), torch.where(inside, view[last], 0).sum(1))
        return torch.segment_reduce(sums, "sum", lengths=per_param)

    def tensor_numels(self, xs: list[Tensor]) -> Tensor:
        """The element count of each param's tensor, as one vector of the compute dtype."""
        if self.segments is None:
            return torch.tensor([float(x.numel()) for x in xs], dtype=self.dtype, device=xs[0].device)
        return self.segments[0].to(self.dtype)

    def tensor_info(self) -> list[tuple[str | None, tuple[int, ...]]]:
        """``(name, shape)`` of each param, in the order of the per-tensor vectors."""
        if self.segments is None:
            return [(n, tuple(p.shape)) for n, p in zip(self.names, self.params, strict=False)]
        return list(zip(self.segments[3], self.segments[4], strict=True))

    def per_tensor(self, values: Tensor) -> list[Tensor]:
        """One entry per param of ``values`` as factors for a list op: 0-d tensors on a list, a
        gathered full-size tensor on the flat buffer."""
        if self.segments is None:
            return list(values.unbind(0))
        rows, numels = self.segments[1], self.segments[2]
        if rows is None and max(numels, default=0) == 1 and min(numels) == 1:
            return [values]  # one element a param: the values are already laid out as the params
        if rows is None:
            # broadcast pieces: computed from the position, where a gather reads an index per element
            return [torch.cat([v.expand(n) for v, n in zip(values.unbind(0), numels)])]
        # a chunked bucket: one value per row (a load per row, not an index per element)
        return [values[rows[0]].unsqueeze(1).expand(-1, SEGMENT_ROW).reshape(-1)]

    def state_vector(self, xs: list[Tensor]) -> Tensor:
        """Per-param 0-d state as one vector (one entry per param, as :meth:`tensor_norms`).

        On a list a new vector (write it back with :meth:`store_state_vector`); on the fused path
        the flat vector that holds that state.
        """
        if self.segments is None:
            return torch.stack(xs) if xs else torch.zeros(0)
        return xs[0]

    def store_state_vector(self, xs: list[Tensor], values: Tensor) -> None:
        """Write ``values`` (one entry per param) into the per-param 0-d state ``xs``."""
        if self.segments is None:
            ops.copy_(xs, values.unbind(0))
        elif values is not xs[0]:
            xs[0].copy_(values)

    # -- pending affine form ----------------------------------------------------------------
    def defer_scale(self, s: Scalar) -> None:
        """Multiply the updates by ``s`` (a number, a 0-d tensor or one per tensor) lazily."""
        if self.toward is not None or (isinstance(s, list) and not _is_zero(self.decay)):
            self.materialize()
        self.scale = _times(self.scale, s)
        if not _is_zero(self.decay):
            self.decay = _times(self.decay, s)

    def defer_divide(self, divisor: list[Tensor] | RootDivisor) -> None:
        """Divide the updates by ``divisor`` lazily: the final write is then one ``addcdiv``.

        Call it at most once per transform, right before returning the numerators. A
        :class:`RootDivisor` is formed from state only then (or when materialized).
        """
        if self.divisor is not None or self.toward is not None:
            self.materialize()
        self.divisor = divisor

    def add_param_term(self, coef: Any) -> None:
        """Add ``coef * params`` to the updates lazily (``coef``: a number, a 0-d tensor or one per tensor)."""
        if self.toward is not None:
            self.materialize()
        self.decay = coef if _is_zero(self.decay) else _plus(self.decay, coef)

    def defer_lerp(self, targets: list[Tensor], weight: Scalar) -> None:
        """Add ``weight * (targets - params)`` to the updates lazily: the final write then moves the
        params toward ``targets`` with one ``lerp_`` (``p + w (t - p)``) before adding the update.
        ``weight`` is a number, a 0-d tensor or one per tensor (what :meth:`per_step` returns).
        The last pending form a transform may set (anything deferred after it materializes it)."""
        if self.divisor is not None or not _is_zero(self.decay) or self.toward is not None:
            self.materialize()
        self.toward = (list(targets), float(weight) if isinstance(weight, (int, float)) else weight)

    def materialize(self) -> list[Tensor]:
        """Fold the pending divisor, scale and param term into ``updates``."""
        fresh = self.divisor is not None
        if fresh:
            self.updates = self._divide(self.updates, self.divisors())
            self.divisor = None
        if _is_one(self.scale) and _is_zero(self.decay) and self.toward is None:
            return self.updates
        if not fresh:  # quotients are new tensors (or dead divisors): nothing to check per tensor
            self.ensure_owned()
        if not _is_one(self.scale):
            ops.mul_(self.updates, self.scale)
        decay = self.decay
        if self.toward is not None:
            targets, w = self.toward
            ops.axpy_(self.updates, targets, w)
            decay = _plus(decay, _times(w, -1.0))
        if not _is_zero(decay):
            terms = self.params
            if isinstance(decay, Tensor) or (isinstance(decay, list) and any(isinstance(d, Tensor) for d in decay)):
                # a traced coefficient is not known to be 0 here: where it is, add no term, as the
                # eager path and torch do (0 * p is NaN where p holds inf or NaN)
                terms = [torch.where(d == 0, 0.0, p) if isinstance(d, Tensor) else p
                         for i, p in enumerate(terms) for d in (_at(decay, i),)]
            ops.axpy_(self.updates, terms, decay)
        self.scale, self.decay, self.toward = 1.0, 0.0, None
        return self.updates

    def update_norms(self) -> list[Tensor]:
        """The L2 norm of each update as the final write would add it, pending forms included.

        A divisor formed in row blocks (:class:`PendingDivisor` with ``in_row_blocks``) is formed
        block by block here too, and nothing model-sized is made; any other pending form is
        materialized first."""
        d = self.divisor
        if self.toward is not None or not _is_zero(self.decay) or (d is not None and not getattr(
                d, "in_row_blocks", False)):
            self.materialize()
            d = None
        if d is None:
            norms = list(torch._foreach_norm(self.updates))
        else:
            big = set(self._row_blocked())
            rest = [i for i in range(len(self.updates)) if i not in big]
            norms = [None] * len(self.updates)
            if rest:
                quotients = torch._foreach_div([self.updates[i] for i in rest], d.subset(rest).tensors())
                for i, n in zip(rest, torch._foreach_norm(quotients), strict=True):
                    norms[i] = n
            for i in big:
                u = self.updates[i]
                squares = sum(torch.div(u[a:z], d.rows(i, a, z)).square().sum() for a, z in row_blocks(u))
                norms[i] = squares.sqrt()
        if isinstance(self.scale, list) or not _is_one(self.scale):
            norms = [n * abs(_at(self.scale, i)) for i, n in enumerate(norms)]
        return norms  # type: ignore[return-value]

    def _row_blocked(self) -> list[int]:
        """The tensors large enough for the eager write to form their divisor a block of rows at a time."""
        return [i for i, p in enumerate(self.params) if p.numel() > WRITE_BLOCK and p.dim() >= 1 and p.shape[0] > 1]

    def divisors(self) -> list[Tensor] | None:
        """The pending divisor as tensors (a :class:`PendingDivisor` formed now, into new tensors)."""
        d = self.divisor
        return d.tensors() if isinstance(d, PendingDivisor) else d

    def _divide(self, updates: list[Tensor], divisors: list[Tensor]) -> list[Tensor]:
        """``u / d`` per tensor. Eagerly, a large quotient goes into its divisor when this step made
        that buffer (a preconditioner's denominator, dead after the division): on CPU every fresh
        model-sized buffer costs page faults, every step. The same division, the same bits."""
        big = [] if self.tensor_scalars else self._dead_divisors(divisors)
        if not big:
            return list(torch._foreach_div(updates, divisors))
        out = list(updates)
        for i in big:
            out[i] = torch.div(updates[i], divisors[i], out=divisors[i])
        rest = [i for i in range(len(updates)) if i not in big]
        if rest:
            for i, q in zip(rest, torch._foreach_div([updates[i] for i in rest], [divisors[i] for i in rest])):
                out[i] = q
        return out

    def kept_storages(self) -> set:
        """The storages of the bucket's params, gradients and state buffers: what a step must not
        write as scratch."""
        kept = [*self.params, *self.grads, *(t for lst in self.state.values() for t in lst if isinstance(t, Tensor))]
        return {_storage(t) for t in kept}

    def _dead_divisors(self, divisors: list[Tensor]) -> set[int]:
        """Indices of large divisors this step made: no param, gradient, update or state buffer of
        the bucket shares their storage, nor another divisor, and none is lent."""
        large = [i for i, d in enumerate(divisors) if d.numel() >= _DIVIDE_IN_PLACE
                 and d.dtype == self.updates[i].dtype and d.shape == self.updates[i].shape
                 and not hasattr(d, "device_mesh") and id(d) not in self._borrowed]
        if not large:
            return set()
        taken = self.kept_storages() | {_storage(u) for u in self.updates}
        seen: dict[Any, int] = {}
        for d in divisors:
            ptr = _storage(d)
            seen[ptr] = seen.get(ptr, 0) + 1
        return {i for i in large if (ptr := _storage(divisors[i])) is not None and ptr not in taken and seen[ptr] == 1}

    # -- ownership: in-place writes must never reach p.grad or a state buffer -----------------
    def lend(self, tensors: list[Tensor]) -> list[Tensor]:
        """Mark ``tensors`` as not writable in place (state buffers of this bucket already are)."""
        self._borrowed.update(id(t) for t in tensors)
        return tensors

    def _foreign(self, i: int, u: Tensor) -> bool:
        # id() only when something is borrowed: traced, id() of an input guards on that object,
        # and the next step's fresh update would recompile the kernel
        if u is self.grads[i] or (self._borrowed and id(u) in self._borrowed):
            return True
        # a transform returns its own buffer (or a view of it) for the same tensor: compare the
        # index-aligned entries, by identity and, on the eager path, by storage
        mine = [lst[i] for lst in self.state.values() if i < len(lst) and isinstance(lst[i], Tensor)]
        if any(s is u for s in mine):
            return True
        if self.tensor_scalars or not mine:
            return False
        ptr = _storage(u)
        return ptr is not None and any(_storage(s) == ptr for s in mine)

    def ensure_owned(self) -> list[Tensor]:
        """Copy any update that aliases a gradient or a state buffer, so it can be written in place."""
        self.updates = [u.clone() if self._foreign(i, u) else u for i, u in enumerate(self.updates)]
        return self.updates

    # -- sub-buckets, for combinators and the eager step in pieces -----------------------------
    def subset(self, indices: Sequence[int], slices: Sequence[slice | None] | None = None,
               keys: Iterable[str] | None = None, *, carry_pending: bool = False, rows: bool = False) -> Bucket:
        """A bucket over the tensors at ``indices`` (updates materialized), sharing this step.

        ``slices`` (one per index, None for the whole tensor) takes part of a contiguous tensor:
        the sub-bucket then holds 1-d views of that slice of its param, gradient, update and state
        (``keys``, every key by default; state of another shape comes whole). Whatever this bucket may not
        write in place (a gradient, a lent tensor), the sub-bucket may not write either.
        ``carry_pending`` gives the sub-bucket this bucket's pending form instead: the caller then
        owns that form. With ``rows`` each slice is a block of whole rows, viewed with the tensor's
        trailing shape (for ``rowwise`` transforms).
        """
        if not carry_pending:
            self.materialize()
        slices = [None] * len(indices) if slices is None else list(slices)

        def part(x: Tensor | None, s: slice | None) -> Tensor | None:
            if s is None or x is None:
                return x
            return x.view(-1)[s].view(-1, *x.shape[1:]) if rows else x.view(-1)[s]

        # whole tensors (the eager pieces' many small ones): the lists picked in C
        pick = lambda xs: list(map(xs.__getitem__, indices))  # noqa: E731
        whole = not any(slices)
        sub = Bucket.__new__(Bucket)
        if whole:
            sub.params, sub.grads, sub.updates = pick(self.params), pick(self.grads), pick(self.updates)
        else:
            sub.params = [part(self.params[i], s) for i, s in zip(indices, slices, strict=True)]
            sub.grads = [part(self.grads[i], s) for i, s in zip(indices, slices, strict=True)]
            # the gradient's own view where the update is the gradient: the in-place check is by identity
            sub.updates = [g if self.updates[i] is self.grads[i] else part(self.updates[i], s)
                           for i, s, g in zip(indices, slices, sub.grads, strict=True)]
        sub._borrowed = set(self._borrowed)
        if self._borrowed:
            sub._borrowed.update(id(u) for i, u in zip(indices, sub.updates, strict=True)
                                 if id(self.updates[i]) in self._borrowed)
        # state shaped like its param is sliced alike; other state (0-d) comes whole
        keys = self.state if keys is None else keys
        if not whole:
            sub.state = {k: [part(x, s) if x is None or x.shape == self.params[i].shape else x
                             for i, s in zip(indices, slices, strict=True) for x in (self.state[k][i],)]
                         for k in keys}
        else:
            sub.state = {k: pick(self.state[k]) for k in keys}
        sub.steps, sub.names = pick(self.steps), pick(self.names)
        sub.group, sub.loss, sub.shared, sub.dtype = self.group, self.loss, self.shared, self.dtype
        sub.batch_size = self.batch_size
        sub.step_values = pick(self.step_values)
        sub.tensor_scalars, sub.resolved, sub.segments = self.tensor_scalars, self.resolved, None
        sub.scale, sub.decay, sub.divisor, sub.toward = 1.0, 0.0, None, None
        sub.host_values = None
        sub.step_vector = None  # (the fused path's flat buckets are not split)
        if carry_pending:
            sub.scale, sub.decay = (x if not isinstance(x, list) else pick(x) for x in (self.scale, self.decay))
            d = self.divisor
            if isinstance(d, PendingDivisor) and not isinstance(d, RootDivisor):
                d = self.divisor = d.tensors()  # formed once for all the sub-buckets
            if isinstance(d, RootDivisor):
                sub.divisor = d.subset(indices, [part(d.v[i], s) for i, s in zip(indices, slices, strict=True)])
            elif d is not None:
                sub.divisor = [part(d[i], s) for i, s in zip(indices, slices, strict=True)]
            if self.toward is not None:
                w = self.toward[1]
                sub.toward = ([part(self.toward[0][i], s) for i, s in zip(indices, slices, strict=True)],
                              pick(w) if isinstance(w, list) else w)
        return sub

    def absorb(self, sub: Bucket, indices: Sequence[int], slices: Sequence[slice | None] | None = None,
               *, updates: bool = True) -> None:
        """Write a sub-bucket's updates (unless ``updates=False``: it wrote its params) and state back
        at ``indices``. A slice's state rebound to a new tensor is copied into the slice."""
        if updates:
            sub.materialize()
        slices = [None] * len(indices) if slices is None else list(slices)
        self._borrowed |= sub._borrowed
        if updates:
            for j, i in enumerate(indices):
                if slices[j] is not None:
                    raise ValueError("a sliced sub-bucket writes its params; absorb it with updates=False")
                self.updates[i] = sub.updates[j]
        whole = not any(slices)
        for k, v in sub.state.items():
            mine = self.state.get(k)
            if mine is None:
                mine = self.state[k] = [None] * len(self.params)
            if whole:
                # whole tensors: the state lists back, unless they hold the same tensors (the usual
                # case, state written in place): one identity test per tensor, in C
                if not all(map(operator.is_, v, map(mine.__getitem__, indices))):
                    for i, x in zip(indices, v, strict=True):
                        mine[i] = x
                continue
            for j, i in enumerate(indices):
                if slices[j] is None or mine[i].shape != self.params[i].shape:
                    mine[i] = v[j]
                elif v[j] is not None and v[j].data_ptr() != (view := mine[i].view(-1)[slices[j]]).data_ptr():
                    view.copy_(v[j].reshape(-1))  # a block of rows has the param's trailing shape

    @property
    def updates(self) -> list[Tensor]:
        """The update of each tensor, in the order of ``params``."""
        return self._updates

    @updates.setter
    def updates(self, value: Sequence[Tensor]) -> None:
        # always a list: a later run writes entries (the pieces' hand-over, Lookahead's sync), and a
        # transform may hand back the tuple torch's list ops return
        self._updates = value if type(value) is list else list(value)

    # -- the final write ----------------------------------------------------------------------
    def write(self) -> None:
        """``p <- p + u`` with the pending form folded in: ``(1 + decay) * p + scale * u``, or
        ``p + w (t - p) + scale * u`` with an interpolation toward ``t`` pending (``defer_lerp``).
        The pending form is then spent, and cleared."""
        self._write_pending()
        # no number of this step outlives it in the bucket: in a step that torch.compile traces, a
        # scheduled lr kept in an attribute would be a graph output, which fixes it to its value
        self.scale, self.decay, self.divisor, self.toward = 1.0, 0.0, None, None

    def _write_pending(self) -> None:
        if not self.params:
            return
        if self.params[0].dtype != self.dtype:
            # compute dtype differs (fp32 math for bf16 params): form the whole update, round once into p
            self.materialize()
            torch._foreach_add_(self.params, self.updates)
            return
        if self.toward is not None:
            # p + w (t - p), then + scale * u below (defer_lerp left no param term or divisor pending)
            ops.lerp_(self.params, self.toward[0], self.toward[1])
            self.toward = None
        if not _is_zero(self.decay):
            ops.mul_(self.params, _plus(self.decay, 1.0))
        if self.divisor is not None:
            if getattr(self.divisor, "in_row_blocks", False) and not self.tensor_scalars:
                self._addcdiv_in_row_blocks(self.divisor)
            else:
                ops.addcdiv_(self.params, self.updates, self.divisors(), self.scale)
        elif isinstance(self.scale, list) and not self.tensor_scalars:
            # one pass per tensor and no full-size temporary (a fresh one costs page faults on CPU)
            for p, u, s in zip(self.params, self.updates, self.scale, strict=True):
                if isinstance(s, Tensor):
                    p.addcmul_(u, s)
                else:
                    p.add_(u, alpha=s)
        elif not _is_zero(self.scale):
            ops.axpy_(self.params, self.updates, self.scale)

    def _addcdiv_in_row_blocks(self, d: PendingDivisor) -> None:
        """``p <- p + scale * u / d`` with a large tensor's divisor formed a block of rows at a time
        (about ``WRITE_BLOCK`` elements, which stay in cache until the division reads them)."""
        big = self._row_blocked()
        rest = sorted(set(range(len(self.params))) - set(big))
        if rest:
            pick = lambda xs: [xs[i] for i in rest]  # noqa: E731
            divisors = d.tensors() if not big else d.subset(rest).tensors()
            scale = pick(self.scale) if isinstance(self.scale, list) else self.scale
            ops.addcdiv_(pick(self.params), pick(self.updates), divisors, scale)
        for i in big:
            p, u = self.params[i], self.updates[i]
            for a, z in row_blocks(p):
                ops.addcdiv_([p[a:z]], [u[a:z]], [d.rows(i, a, z)], _at(self.scale, i))


def _at(x: Any, i: int) -> Any:
    """Entry ``i`` of a per-tensor list, or the one value for all."""
    return x[i] if isinstance(x, list) else x


def _check_updates(name: str, b: Bucket) -> None:
    """A transform's updates are one tensor per param, in the step's compute dtype or the params'
    (with ``state_dtype``): another dtype would fail later, in another transform's op, with an error
    that does not name this one (the first tensor is checked: a cost that does not grow with the
    number of params)."""
    u = b.updates
    if len(u) != len(b.params):
        raise RuntimeError(f"transform {name!r} returned {len(u)} updates for {len(b.params)} params")
    if u and isinstance(u[0], Tensor) and u[0].dtype != b.dtype and u[0].dtype != b.params[0].dtype:
        raise RuntimeError(
            f"transform {name!r} returned updates of dtype {u[0].dtype} for {b.params[0].dtype} params: a "
            f"transform's updates keep the step's compute dtype ctx.dtype={b.dtype} (fp32 for bf16/fp16 "
            "params): cast a result back with u.to(ctx.dtype)")


def resolve_hyperparam(key: str, spec: Hyperparam, value: Any, bucket: Bucket) -> Any:
    """The value of a hyperparameter for this step: a callable is a schedule of the step (evaluated
    by the optimizer before the step where it did: on the host, for a traced step)."""
    if callable(value) and not isinstance(value, Tensor):
        done = bucket.resolved.get(key) if bucket.resolved is not None else None
        if done is not None and not callable(done):
            return done
        value = value(bucket.group_step)
        validate(key, Hyperparam(None, spec.check), value)
    return _as_number(value)


def _as_number(value: Any) -> Any:
    """A 1-element tensor without grad as a number (a 0-d tensor off the CPU, where reading it would
    wait for the device), and so each such element of a tuple or list (torch takes
    ``betas=(tensor([0.9]), tensor([0.999]))``); a numpy scalar as a Python number."""
    if isinstance(value, Tensor):
        if value.numel() == 1 and not value.requires_grad:
            return value.item() if value.device.type == "cpu" else value.reshape(())
        return value
    if isinstance(value, (list, tuple)):
        # a copy: the group's list, changed in place later, would still compare equal to the
        # values that passed their checks, and skip them
        return tuple(_as_number(x) for x in value)
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def resolve_group(transform: Transform, group: Mapping[str, Any], step: int,
                  checked: Mapping[str, Any] | None = None, calls_per_step: Mapping[str, int] | None = None
                  ) -> dict[str, Any]:
    """Every hyperparameter ``transform`` declares, resolved for one step and checked.

    Schedules (callables) are evaluated at ``step``, or for a key in ``calls_per_step`` (read only
    inside ``accumulate``, whose inner chain steps once every k calls) at ``ceil(step / k)``, the
    inner chain's count at its next step; 1-element CPU tensors become numbers. Raises
    ``ValueError`` naming the key for an invalid value, before any state moves. Values equal to
    ``checked`` (values that passed before: checks are pure functions of the values) are not
    checked again.
    """
    out: dict[str, Any] = {}
    for key, spec in transform.hyperparams.items():
        value = group[key]
        if callable(value) and not isinstance(value, Tensor):
            k = calls_per_step.get(key) if calls_per_step else None
            value = value(step if k is None else -(-step // k))
            validate(key, Hyperparam(None, spec.check), value)
        out[key] = _as_number(value)
    if checked is None or len(checked) != len(out) or not all(
            k in out and same_value(v, out[k]) for k, v in checked.items()):
        transform.validate_group(out)
    return out


class Transform:
    """A gradient transformation: per-parameter state from ``init_state``, ``apply`` over buckets.

    Subclasses: :class:`Leaf` (one concept, built with :func:`transform`) and combinators such as
    :func:`chain`. Every transform has a stable ``name`` (state keys are ``"<name>.<buffer>"``)
    and declares its hyperparameters (``group key -> Hyperparam``).
    """

    name: str
    hyperparams: dict[str, Hyperparam]
    # optimizer-level group defaults the transform adds (a chain's maximize); none unless set
    extra_defaults: Mapping[str, Any] = MappingProxyType({})
    # hyperparameter keys this transform's children share on purpose (see chain(share=))
    shared_keys: frozenset[str] = frozenset()
    # constructor options recorded in param groups as torch does, fixed when the chain is built
    fixed_options: Mapping[str, Any] = {}
    # state sharing is declared, never guessed from names: the buffers (local names) that hold a
    # momentum (Lookahead resets or pulls them back), and the full state keys of transforms
    # earlier in the chain that this one reads (checked when the chain is built)
    momentum_state: tuple[str, ...] = ()
    reads_state: tuple[str, ...] = ()
    # why nothing may follow this transform in a chain (its update is a final one: Lookahead's sync,
    # schedule-free's step); empty where anything may
    last_in_chain: str = ""
    # may follow such a transform all the same (gradchain.testing's probes, which watch the update)
    may_follow_final: bool = False

    def momentum_keys(self) -> list[str]:
        """The full state keys of every momentum buffer in this tree (declared by the leaves)."""
        return [f"{t.name}.{b}" for t in self.leaves() for b in t.momentum_state]

    # -- what the optimizer calls -------------------------------------------------------------
    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        """State for one parameter, keyed ``"<leaf name>.<buffer>"``."""
        raise NotImplementedError

    def apply(self, buckets: list[Bucket]) -> None:
        """Map every bucket's updates (in ``bucket.updates``) for this step."""
        raise NotImplementedError

    def leaves(self) -> Iterator[Transform]:
        """Every named transform in this tree (names must be unique in a chain)."""
        yield self

    def paths(self) -> list[list[str]]:
        """The sequences of leaf names one param can pass through (their state keys must not clash)."""
        return [[self.name]]

    def check_routes(self, named: Sequence[tuple[str | None, Tensor]]) -> None:
        """Route every ``(name, param)`` through this tree (``partition``, ``masked``) now: a param no
        route takes raises ``ValueError`` when the optimizer is built, not at its first gradient."""

    def renamed(self, mapping: Mapping[str, str]) -> Transform:
        """A copy whose hyperparameter group keys are renamed by ``mapping`` (old -> new)."""
        raise NotImplementedError(f"{type(self).__name__} does not support renaming hyperparameters")

    def prefixed(self, prefix: str) -> Transform:
        """A copy whose hyperparameter keys all start with ``prefix`` (``lr`` -> ``adamw_lr``)."""
        return self.renamed({k: prefix + k for k in self.hyperparams})

    def resolved_hyperparams(self, bucket: Bucket) -> dict[str, Any]:
        """This transform's hyperparameters for ``bucket``'s step, by group key, as a leaf's rule gets
        them: a schedule evaluated at the group's step count, a 1-element tensor as a number. What an
        ``apply`` of a subclass reads (``bucket.group`` holds the raw values)."""
        return {k: resolve_hyperparam(k, spec, bucket.group[k], bucket) for k, spec in self.hyperparams.items()}

    def validate_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if a group's hyperparameters are invalid for this transform."""
        for key, spec in self.hyperparams.items():
            if key in group:
                validate(key, spec, group[key])

    def signature(self) -> list[str]:
        """The names of the transforms in order: a checkpoint of another chain is refused."""
        return [t.name for t in self.leaves()]

    # -- standalone use, without an optimizer ---------------------------------------------------
    def init(self, params: Sequence[Tensor], names: Sequence[str | None] | None = None) -> list[StateDict]:
        """State for a list of tensors: one dict per tensor (``"step"`` included)."""
        names = list(names) if names is not None else [None] * len(params)
        out = []
        for p, n in zip(params, names, strict=False):
            st = self.init_state(p, n)
            st["step"] = torch.zeros((), dtype=torch.float32)
            out.append(st)
        return out

    def update(
        self,
        grads: Sequence[Tensor],
        state: list[StateDict],
        params: Sequence[Tensor] | None = None,
        *,
        loss: Tensor | float | None = None,
        names: Sequence[str | None] | None = None,
        batch_size: Any = None,
        **hyperparams: Any,
    ) -> list[Tensor]:
        """One step on plain tensors: returns ``u`` such that the new params are ``p + u``.

        Advances the ``"step"`` entry of each state dict. Hyperparameters default to the declared
        ones; keyword arguments override them.
        """
        grads = list(grads)
        params = list(params) if params is not None else [torch.zeros_like(g) for g in grads]
        unknown = set(hyperparams) - set(self.hyperparams)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}; declared: {sorted(self.hyperparams)}")
        group = {k: spec.default for k, spec in self.hyperparams.items()}
        group.update(hyperparams)
        self.validate_group(group)
        steps = [st["step"] for st in state]
        torch._foreach_add_(steps, 1.0)
        keys = sorted({k for st in state for k in st if k != "step"})
        lists = {k: [st.get(k) for st in state] for k in keys}
        names = list(names) if names is not None else [None] * len(grads)
        loss_t = None if loss is None else torch.as_tensor(loss).detach()
        bucket = Bucket(params, grads, lists, steps, names, group, loss_t, batch_size=batch_size)
        self.apply([bucket])
        for k, v in bucket.state.items():
            for st, t in zip(state, v, strict=False):
                if t is not None:
                    st[k] = t
        bucket.materialize()
        # the caller owns what it gets: never a gradient or a state buffer
        return bucket.ensure_owned()


class Leaf(Transform):
    """One transform: ``init`` makes a parameter's state, ``update`` maps a bucket's updates."""

    def __init__(
        self,
        name: str,
        hyperparams: Mapping[str, Hyperparam] | None = None,
        init: InitFn | None = None,
        update: UpdateFn | None = None,
        *,
        scale: Callable[[Mapping, Bucket], Scalar] | None = None,
        param_term: Callable[[Mapping, Bucket], float] | None = None,
        inplace: bool = False,
        check: Callable[[Mapping], None] | None = None,
        elementwise: bool = False,
        segmented: bool = False,
        elementwise_for: Callable[[tuple[int, ...]], bool] | None = None,
        step_scalars: bool = False,
        static: Sequence[str] = (),
        momentum_state: Sequence[str] = (),
        reads_pending: bool = False,
        rowwise: bool = False,
        host_step: Callable[[Mapping[str, Any], int], HostStep] | None = None,
        tensor_view: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None,
        from_state: Callable[[dict, Mapping, Bucket], list] | None = None,
        per_tensor: bool = False,
    ) -> None:
        if not name or "." in name:
            raise ValueError(f"transform name {name!r} must be non-empty and contain no '.'")
        if sum(x is not None for x in (update, scale, param_term)) != 1:
            raise ValueError(f"transform {name!r}: give exactly one of update, scale, param_term")
        self.name = name
        self._specs = dict(hyperparams or {})
        self._keys = {k: k for k in self._specs}
        self._init = init
        # init(param) or init(param, hp): hp are the param's group's values (defaults outside one)
        self._init_takes_hp = init is not None and len(inspect.signature(init).parameters) >= 2
        self._update = update
        self._scale = scale
        self._param_term = param_term
        self._inplace = inplace
        self._check = check
        # elementwise: the update treats every element alone, its state is shaped like the param and
        # its math takes tensor scalars (gradchain.ops), so the fused path runs it over one flat
        # buffer inside a compiled kernel; ``static`` names hyperparameters it branches on in Python
        self.elementwise = elementwise
        # segmented: reduces per tensor only through the bucket's tensor_norms / tensor_sums /
        # per_tensor helpers, which the fused path computes as segment reductions of a flat buffer
        self.segmented = segmented
        # elementwise for the params whose shape passes this test (Adafactor's unfactored tensors):
        # the fused path gives those params flat buckets of their own, where it compiles the update
        self.elementwise_for = elementwise_for
        # step_scalars: segmented only for per-tensor 0-d state that the step and the hyperparameters
        # advance alone (NAdam's running product), never the tensor's values: the update is
        # elementwise given that state, so the eager step in pieces may run it on slices of a tensor
        self.step_scalars = step_scalars
        # reads_pending: on the eager path the update gets the bucket with its pending forms as they
        # are (it reads the updates only through ``ctx.update_norms()`` and defers its own factors),
        # so a divisor formed in row blocks stays pending; traced, it sees them materialized
        self._reads_pending = reads_pending
        # rowwise: on a tensor with ndim >= 2 the update treats each slice along dim 0 alone (per-row
        # reductions only), so the eager step in pieces may give it a block of whole rows
        self.rowwise = rowwise
        # host_step(hp, t): what the update needs of the step count, worked out on the host (per
        # tensor on the eager path; once per flat bucket before a fused kernel, whose inputs its
        # values then are: a new step neither recompiles nor syncs)
        self.host_step = host_step
        # tensor_view(shape): the shape in which the update works on a param (SMMF's square matrix);
        # the fused path's per-tensor route presents the param in it where that changes nothing else
        self.tensor_view = tensor_view
        # per_tensor: the update of a tensor reads that tensor alone (no reduction across tensors,
        # whatever it does within one: Newton-Schulz), so the eager step in pieces may give it any
        # group of whole tensors, with the leaves around it: a step then holds one piece's updates
        self.per_tensor = per_tensor
        # from_state(state, hp, ctx): the updates of the step just taken, worked out again from the
        # state it wrote (Adam's m^/(sqrt(v^) + eps)); the fused path then takes the step in one pass
        # and recomputes its output in a later one, where it would keep it in a model-sized buffer
        self._from_state = from_state
        self.momentum_state = tuple(momentum_state)
        self.static = frozenset(static)
        unknown_static = self.static - set(self._specs)
        if unknown_static:
            raise ValueError(f"transform {name!r}: static names undeclared hyperparameters {sorted(unknown_static)}")
        self.extra_defaults = {}
        self.validate_group({k: s.default for k, s in self.hyperparams.items()})

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {self._keys[k]: s for k, s in self._specs.items()}

    @property
    def static_keys(self) -> frozenset[str]:
        """The group keys of ``static`` (a renamed transform's differ from its local names)."""
        return frozenset(self._keys[k] for k in self.static)

    def __reduce__(self) -> tuple:
        built = self.__dict__.get("_built_by")
        if built is None:
            raise TypeError(
                f"transform {self.name!r} cannot be pickled: its update is a closure. Build it with a "
                "factory decorated by @gradchain.factory (gradchain's own are) so it pickles as a call "
                "of that factory"
            )
        build, args, kwargs = built
        return _rebuild_leaf, (build, args, kwargs, dict(self._keys))

    def __deepcopy__(self, memo: dict) -> Leaf:
        # closures are shared, not copied: a transform holds no mutable state of its own
        new = Leaf.__new__(Leaf)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) if k in ("_keys", "extra_defaults") else v
                             for k, v in self.__dict__.items()})
        return new

    def renamed(self, mapping: Mapping[str, str]) -> Leaf:
        new = Leaf.__new__(Leaf)
        new.__dict__.update(self.__dict__)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    def validate_group(self, group: Mapping[str, Any]) -> None:
        super().validate_group(group)
        if self._check is not None:
            local = {k: group[g] for k, g in self._keys.items() if g in group}
            scheduled = any(callable(v) and not isinstance(v, Tensor) for v in local.values())
            if len(local) == len(self._keys) and not scheduled:
                self._check(local)

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        if self._init is None:
            return {}
        if self._init_takes_hp:
            group = _INIT_GROUP.get() or {}
            hp = {k: group.get(g, self._specs[k].default) for k, g in self._keys.items()}
            made = self._init(param, hp)
        else:
            made = self._init(param)
        return {f"{self.name}.{k}": v for k, v in made.items()}

    def hp(self, bucket: Bucket) -> dict[str, Any]:
        """This transform's hyperparameters for ``bucket``, by local name."""
        resolved = bucket.resolved
        if resolved is None:
            return {k: resolve_hyperparam(g, self._specs[k], bucket.group[g], bucket) for k, g in self._keys.items()}
        if bucket.tensor_scalars:
            # the fused kernels' host values of their bucket; a traced eager step's own group values
            host = bucket.shared.get("host_hyperparams", resolved)
            return {k: host[g] if k in self.static else resolved[g] for k, g in self._keys.items()}
        return {k: resolved[g] for k, g in self._keys.items()}

    def apply(self, buckets: list[Bucket]) -> None:
        prefix = self.name + "."
        for b in buckets:
            if not len(b):
                continue
            hp = self.hp(b)
            if self._scale is not None:
                b.defer_scale(self._scale(hp, b))
                continue
            if self._param_term is not None:
                b.add_param_term(self._param_term(hp, b))
                continue
            if not self._reads_pending or b.tensor_scalars:
                b.materialize()
                if self._inplace:
                    b.ensure_owned()
            local = {k[len(prefix):]: v for k, v in b.state.items() if k.startswith(prefix)}
            if self.host_step is None:
                b.updates = list(self._update(b.updates, local, hp, b))
                _check_updates(self.name, b)
                for k, v in local.items():
                    b.state[prefix + k] = v
            elif b.tensor_scalars and "host_values" in b.shared:
                # fused: the runner has called host_step and passed its state already renamed
                b.host_values = [b.shared["host_values"][self.name]]
                try:
                    b.updates = list(self._update(b.updates, local, hp, b))
                finally:
                    b.host_values = None
                for k, v in local.items():
                    b.state[prefix + k] = v
            elif b.tensor_scalars:
                # the eager step traced into a user's torch.compile: the step counts are values the
                # trace does not have; this transform runs outside the graph (a graph break)
                self._apply_host_step_outside_graph(b, local, hp)
            else:
                self._apply_host_step(b, local, hp)

    @property
    def stateful(self) -> bool:
        """Whether it keeps state per param (built with an ``init``)."""
        return self._init is not None

    @property
    def recomputable(self) -> bool:
        """Whether the updates of a step can be worked out again from the state it wrote (``from_state``)."""
        return self._from_state is not None

    def apply_from_state(self, buckets: list[Bucket]) -> None:
        """The updates of the step just taken, again, from the state it wrote (``from_state``); the
        state is left as it is."""
        prefix = self.name + "."
        for b in buckets:
            if len(b):
                local = {k[len(prefix):]: v for k, v in b.state.items() if k.startswith(prefix)}
                b.updates = list(self._from_state(local, self.hp(b), b))  # type: ignore[misc]

    @torch.compiler.disable
    def _apply_host_step_outside_graph(self, b: Bucket, stored: dict[str, list], hp: Mapping[str, Any]) -> None:
        self._apply_host_step(b, stored, hp)

    def _apply_host_step(self, b: Bucket, stored: dict[str, list], hp: Mapping[str, Any]) -> None:
        """The update of a ``host_step`` transform on the eager path: its values and state names per
        tensor (each tensor has its own step count)."""
        made = [self.host_step(hp, round(float(t))) for t in b.step_values]
        renamed = {s for m in made for s in m.state.values()}
        seen = {k: v for k, v in stored.items() if k not in renamed}
        for v in {v for m in made for v in m.state}:
            seen[v] = [stored[m.state[v]][i] for i, m in enumerate(made)]
        b.host_values = [m.values for m in made]
        try:
            b.updates = list(self._update(b.updates, seen, hp, b))
        finally:
            b.host_values = None
        out = {k: list(stored[k]) for k in renamed}
        for k, lst in seen.items():
            if k in made[0].state:
                for i, m in enumerate(made):
                    out[m.state[k]][i] = lst[i]
            else:
                out[k] = lst
        for k, lst in out.items():
            b.state[self.name + "." + k] = lst


def transform(
    name: str,
    hyperparams: Mapping[str, Hyperparam] | None = None,
    init: InitFn | None = None,
    update: UpdateFn | None = None,
    **options: Any,
) -> Leaf:
    """Build a transform from an ``init(param) -> dict`` and an ``update(updates, state, hp, ctx)``.

    ``init(param, hp)`` (two arguments) also gets the hyperparameters of the param's group, by
    local name, for state that a group option decides (``amsgrad``).

    ``update`` gets the bucket's updates (a list), its state (buffer name -> list of tensors),
    the hyperparameters by name and the :class:`Bucket` as step context, and returns the new
    updates. It may write state in place; it writes the update list in place only if built with
    ``inplace=True``. It may return its own state buffers: nothing later writes into them.
    ``scale=fn(hp, ctx)`` or ``param_term=fn(hp, ctx)`` declare a transform that multiplies the
    updates or adds ``coef * params``; those are fused into the final write.

    ``elementwise=True`` declares an update that treats each element alone, keeps state shaped
    like the param and does its scalar math with :mod:`gradchain.ops` (scalars may be 0-d
    tensors): the fused path then compiles it into one kernel with its neighbours.
    ``segmented=True`` declares one that reduces per tensor only through ``ctx.tensor_norms``,
    ``ctx.tensor_sums``, ``ctx.tensor_numels`` and ``ctx.per_tensor`` (otherwise elementwise),
    and reads and writes per-param 0-d state only through ``ctx.state_vector`` and
    ``ctx.store_state_vector``: the fused path compiles it too, with segment reductions over the
    flat buffer and that state as one vector.
    ``elementwise_for=fn(shape) -> bool`` declares an update that is elementwise (as above) for
    the params whose shape passes ``fn`` only (Adafactor factors matrices, not vectors): the fused
    path gives those params flat buckets of their own and compiles the update there (where it may
    reduce per tensor through the bucket's helpers, as a ``segmented`` one: AGC's vectors), and
    one large param at a time for the others; over the rest it runs eagerly. Its state for the
    passing shapes must be shaped like the param.
    ``step_scalars=True`` (with ``segmented``) declares that its only per-tensor values are 0-d
    state advanced by the step and the hyperparameters alone, never by the tensor's values
    (NAdam's running product): the eager step in pieces (:mod:`gradchain.pieces`) then runs it on
    slices of a large tensor, each slice from the same 0-d state, as it runs ``elementwise`` ones.
    ``momentum_state=("exp_avg",)`` declares which buffers hold a momentum (Lookahead's
    momentum reset and pullback find them so).
    ``rowwise=True`` (with ``elementwise_for``) declares that on a tensor with ``ndim >= 2`` the
    update treats each slice along dim 0 alone and reduces only within it (gradient
    centralization's row means, AGC's unit norms): the eager step in pieces then runs it, with the
    elementwise transforms around it, on cache-sized blocks of whole rows of a large tensor
    (views with the tensor's trailing shape); 1-d tensors stay whole.
    ``per_tensor=True`` declares an update whose result for a tensor reads that tensor alone (no
    reduction across tensors; Newton–Schulz, a shape-dependent scale): the eager step in pieces
    runs it, with the transforms around it, over pieces of whole tensors instead of whole buckets.
    ``host_step=fn(hp, t) -> HostStep`` declares what the update needs of the step count ``t``
    (an int) beyond arithmetic: numbers it reads as ``ctx.host_values[i]`` (a ring buffer's
    weights this step) and the names under which it sees some state buffers (the ring's slots in
    order of age). The eager path calls it per tensor; the fused path once per flat bucket and
    step, outside the kernel, whose inputs the values and the renamed buffers then are: an
    ``elementwise`` update that needs the step only so compiles once (the fractional gradient).
    ``tensor_view=fn(shape) -> shape`` (with ``elementwise_for``) declares the shape in which the
    update works on a param of ``shape`` (SMMF reshapes every tensor to its most square matrix):
    where the fused path compiles one large param at a time and the rest of that segment is
    stateless and elementwise, it gives the segment the param, its grad and its update as
    contiguous views of that shape, so that the compiled write loops over the same rows and
    columns as the update (over the param's own shape the index arithmetic of the reshape keeps
    the loop from vectorizing).
    ``from_state=fn(state, hp, ctx) -> updates`` (with ``elementwise``) declares what the update
    returns as a function of the state it has just written, read and not written (Adam's
    ``m^/(sqrt(v^) + eps)``): before a transform whose two compiled passes surround a reduction
    over every bucket (``fused_phases``: AdamS's mean of ``v^``), the fused path then takes the
    step in the first pass and works its output out again in the second, where it would keep it
    in a model-sized buffer between them.
    ``static=("key",)`` names hyperparameters the update branches on in Python (a change of
    their value recompiles the fused kernel). Other transforms run on the fused path eagerly,
    over per-tensor views of the flat buffers.
    """
    return Leaf(name, hyperparams, init, update, **options)


def factory(fn: Callable[..., Transform]) -> Callable[..., Transform]:
    """Record how a transform factory built each transform, so that the transform pickles.

    A transform's ``update`` is usually a closure, which pickle cannot store; a transform built by
    a decorated factory pickles as "call this factory again with these arguments" (renamed keys
    kept). gradchain's own factories are decorated; decorate yours to pickle optimizers that use
    them (``pickle.dumps(opt)``, ``copy.deepcopy`` works either way).
    """

    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> Transform:
        t = fn(*args, **kwargs)
        if isinstance(t, Leaf) and t.__dict__.get("_built_by") is None:
            t._built_by = (build, args, kwargs)
        return t

    build.__gradchain_factory__ = True  # type: ignore[attr-defined]
    return build


def _rebuild_leaf(build: Callable[..., Transform], args: tuple, kwargs: dict, keys: dict[str, str]) -> Leaf:
    leaf = build(*args, **kwargs)
    if not isinstance(leaf, Leaf):
        raise TypeError(f"{build.__qualname__} no longer builds a single transform")
    leaf._keys = dict(keys)
    return leaf


def is_phased(t: Transform) -> bool:
    """Whether ``t`` is a phased transform: a reduction over every bucket between two passes
    (Prodigy's estimate of d, AdamS's mean of v^), stated by ``bucket_hyperparams``, ``prepare``,
    ``bucket_flags``, ``init_accumulators``, ``accumulate``, ``estimate`` and ``finish``."""
    return all(callable(getattr(t, m, None)) for m in ("bucket_hyperparams", "prepare", "accumulate", "finish"))


def estimate_phases(t: Transform, live: list[Bucket],
                    parts: Callable[[Bucket], Iterable[Bucket]] | None = None) -> tuple[list, list, Any, dict]:
    """Pass 1 of a phased transform, eager: each bucket's hyperparameters (every check before
    anything moves), ``accumulate`` over every bucket not frozen, in order, and ``estimate`` once.

    Returns ``(hps, flags, c, carries)``, ``c`` None where nothing accumulated (every bucket
    frozen). ``parts(b)`` runs ``accumulate`` over sub-buckets of whole tensors, in order (the eager
    pieces: the same sums, term by term); without it, what pass 1 of a bucket hands to its pass 2
    is in ``carries``.
    """
    gstate = live[0].shared.get("global_state")
    hps = [t.bucket_hyperparams(b) for b in live]
    c = t.prepare(hps, gstate)
    flags = [t.bucket_flags(hp) for hp in hps]
    active = [] if c is None else [i for i, f in enumerate(flags) if not f["frozen"]]
    if not active:
        return hps, flags, None, {}
    acc = t.init_accumulators(c, live[0].params[0].device)
    carries: dict[int, Any] = {}
    for i in active:
        if parts is None:
            acc, carries[i] = t.accumulate(live[i], hps[i], flags[i], c, acc, reuse=True)
        else:
            for part in parts(live[i]):
                acc = t.accumulate(part, hps[i], flags[i], c, acc, reuse=True)[0]
    return hps, flags, t.estimate(c, acc, gstate), carries


def finish_phase(t: Transform, b: Bucket, hp: dict, flags: dict, c: Any, carry: Any = None) -> None:
    """Pass 2 of a phased transform over one bucket: ``finish``, or zero updates where it is frozen."""
    if c is None or flags["frozen"]:
        b.updates = [torch.zeros_like(u) for u in b.materialize()]
    else:
        t.finish(b, hp, flags, c, carry)


def apply_phases(t: Transform, buckets: list[Bucket]) -> None:
    """The eager step of a phased transform over whole buckets (:func:`estimate_phases`, then
    :func:`finish_phase` per bucket): the one statement of its rule that the fused path compiles."""
    live = [b for b in buckets if len(b)]
    if not live:
        return
    hps, flags, c, carries = estimate_phases(t, live)
    for i, b in enumerate(live):
        finish_phase(t, b, hps[i], flags[i], c, carries.get(i))


def state_owners(transforms: Iterable[Transform]) -> set[str]:
    """The transform names whose state (keys ``"<name>.<buffer>"``) ``transforms`` keep, or read
    (those of a transform named in a ``reads_state`` entry): the state a part of a chain may touch."""
    transforms = list(transforms)
    return ({leaf.name for t in transforms for leaf in t.leaves()}
            | {k.split(".", 1)[0] for t in transforms for k in getattr(t, "reads_state", ())})


def check_unique_names(t: Transform, where: str) -> None:
    """Raise if two transforms one param passes through share a name (their state keys would clash)."""
    for path in t.paths():
        dup = sorted({n for n in path if path.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate transform names in {where}: {dup}; pass name= to tell them apart")


def merge_hyperparams(children: Sequence[Transform], share: Iterable[str] | None = None) -> dict[str, Hyperparam]:
    """The union of the children's hyperparameters.

    One key with two defaults is an error. With ``share`` given (a chain), a key declared by two
    children is an error too unless it is named in ``share``: one group value would silently drive
    both (``chain(add_l2(0.01), scale_by_adam(), add_decoupled_wd(0.01))`` has two
    ``weight_decay`` knobs).
    """
    merged: dict[str, Hyperparam] = {}
    owner: dict[str, str] = {}
    allowed = None if share is None else set(share)
    for t in children:
        for key, spec in t.hyperparams.items():
            if key in merged and not _same(merged[key].default, spec.default):
                raise ValueError(
                    f"hyperparameter {key!r} is declared with default {merged[key].default!r} by "
                    f"{owner[key]!r} and {spec.default!r} by {t.name!r}: rename one with "
                    f".renamed({{{key!r}: 'new_key'}})"
                    + ("" if allowed is None else f", or give both one default and share it on purpose with "
                       f"chain(..., share=[{key!r}])")
                )
            if key in merged and allowed is not None and key not in allowed:
                raise ValueError(
                    f"hyperparameter {key!r} is declared by both {owner[key]!r} and {t.name!r}: one group "
                    f"value would drive both. Rename one with .renamed({{{key!r}: 'new_key'}}), or share it "
                    f"on purpose with chain(..., share=[{key!r}])"
                )
            merged.setdefault(key, spec)
            owner.setdefault(key, t.name)
    return merged


def _check_reads(children: Sequence[Transform]) -> None:
    """A transform that reads another's state (``reads_state``) needs it earlier in the chain."""
    readers = [i for i, t in enumerate(children) if t.reads_state]
    if not readers:
        return
    meta = torch.empty((2, 2), device="meta")
    kept: set[str] = set()
    for t in children[: readers[-1] + 1]:
        missing = [k for k in t.reads_state if k not in kept]
        if missing:
            raise ValueError(
                f"{t.name!r} reads state {missing} of a transform that must come before it in the chain; "
                f"the chain so far keeps {sorted(kept)}"
            )
        try:
            kept |= set(t.init_state(meta))
        except Exception:  # noqa: BLE001 - a transform whose state needs a real tensor: nothing to check
            continue


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


class Chain(Transform):
    """Transforms applied one after the other to every bucket."""

    def __init__(self, children: Sequence[Transform], name: str = "chain", share: Iterable[str] = ()) -> None:
        flat: list[Transform] = []
        extra: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        shared = set(share)
        for t in children:
            if not isinstance(t, Transform):
                raise TypeError(f"chain() takes transforms, got {type(t).__name__}")
            # a nested chain keeps its optimizer-level defaults (maximize) and what it shares
            extra.update(t.extra_defaults)
            fixed.update(t.fixed_options)
            shared |= t.shared_keys
            flat.extend(t.children if isinstance(t, Chain) else [t])
        for i, t in enumerate(flat[:-1]):
            final = next((leaf for leaf in t.leaves() if leaf.last_in_chain), None)
            after = ", ".join(u.name for u in flat[i + 1:] if not u.may_follow_final)
            if final is not None and after:
                raise ValueError(f"{final.name} is followed by {after} in a chain, but nothing may follow it: "
                                 f"{final.last_in_chain}")
        self.name = name
        self.children = flat
        self.shared_keys = frozenset(shared)
        self.fixed_options = fixed
        check_unique_names(self, "a chain")
        _check_reads(flat)
        self.hyperparams = merge_hyperparams(flat, share=self.shared_keys)
        self.extra_defaults = extra

    def leaves(self) -> Iterator[Transform]:
        for t in self.children:
            yield from t.leaves()

    def paths(self) -> list[list[str]]:
        out: list[list[str]] = [[]]
        for t in self.children:
            out = [a + b for a in out for b in t.paths()]
        return out

    def renamed(self, mapping: Mapping[str, str]) -> Chain:
        out = Chain([t.renamed(mapping) for t in self.children], self.name,
                    share={mapping.get(k, k) for k in self.shared_keys})
        out.extra_defaults = dict(self.extra_defaults)
        out.fixed_options = dict(self.fixed_options)
        return out

    def validate_group(self, group: Mapping[str, Any]) -> None:
        for t in self.children:
            t.validate_group(group)

    def check_routes(self, named: Sequence[tuple[str | None, Tensor]]) -> None:
        for t in self.children:
            t.check_routes(named)

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        state: StateDict = {}
        for t in self.children:
            state.update(t.init_state(param, name))
        return state

    def apply(self, buckets: list[Bucket]) -> None:
        for t in self.children:
            t.apply(buckets)


def chain(
    *transforms: Transform,
    maximize: bool | None = None,
    share: Iterable[str] = (),
    fixed: Mapping[str, Any] | None = None,
) -> Chain:
    """Compose transforms: ``chain(a, b, c)`` applies ``a`` then ``b`` then ``c``.

    Nested chains are flattened (keeping their ``maximize`` default); transform names must be
    unique. Two transforms that declare the same hyperparameter key are an error unless the key
    is named in ``share`` (one group value then drives both, e.g. ``share=["lr"]`` for a decay
    scaled by the learning rate). ``maximize`` sets the optimizer's default for the ``maximize``
    group option (as in torch.optim). ``fixed`` records constructor options that decide the chain's
    structure (``amsgrad``, ``decoupled_weight_decay``): they appear in every param group, as in
    torch, and a group may repeat them but not change them.
    """
    c = Chain(transforms, share=share)
    for key, value in (fixed or {}).items():
        if key in c.hyperparams:
            raise ValueError(f"chain(fixed=): {key!r} is a hyperparameter of this chain, not a fixed option")
        c.fixed_options[key] = value
    if maximize is not None:
        c.extra_defaults["maximize"] = bool(maximize)
    return c
