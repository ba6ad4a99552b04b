"""Flat storage: one contiguous buffer each for a bucket's params, grads and elementwise state.

Each param's ``.data``, its ``.grad`` and its state entries become views into the flat buffers,
so that one kernel over a few long buffers serves any number of tensors. The state dict keeps
its per-param format (its tensors are views), so checkpoints move freely between the eager and
the fused path.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .. import base
from ..base import SEGMENT_ROW as CHUNK

_GRAD = operator.attrgetter("grad")
# device types whose workspaces (flat buffers for updates passed between segments) are kept from
# step to step: on a CPU a fresh model-sized buffer costs page faults at every step. Elsewhere they
# are freed after each step (a GPU's caching allocator hands the memory back at no cost), so the
# forward and backward passes can use that memory between steps.
KEEP_WORKSPACES = frozenset({"cpu"})


def mark_flat(t: Tensor) -> None:
    """Tag ``t``'s storage as a flat buffer's (torch keeps one Python object per storage, and its
    attributes, while the storage lives): its views are params this module laid out."""
    t.untyped_storage()._gradchain_flat = True


def foreign_views(params: list[Tensor], owned: Callable[[], Iterable[Tensor]]) -> list[int]:
    """The indices of ``params`` that are views into a larger storage that something else holds and
    reads (ZeroRedundancyOptimizer's ``parameters_as_bucket_view``, FSDP1's flat parameter,
    ``vector_to_parameters``'s vector). Rebinding ``p.data`` to a flat buffer would cut such a param
    off from it, and that other code would go on with stale values.

    A storage a flat bucket made is this module's. Another one is held elsewhere when more tensors
    use it than the optimizer's own params (``owned()``) that view it: a model saved and loaded
    with its params in a flat buffer holds that buffer through its params alone."""
    suspects: dict[int, tuple[Any, list[int]]] = {}
    for i, p in enumerate(params):
        st = p.untyped_storage()
        if st.nbytes() > p.numel() * p.element_size() and not getattr(st, "_gradchain_flat", False):
            suspects.setdefault(st.data_ptr(), (st, []))[1].append(i)
    if not suspects:
        return []
    viewing = Counter(q.untyped_storage().data_ptr() for q in owned())
    out = []
    for ptr, (st, idx) in suspects.items():
        # each tensor over a storage holds it once, and the storage's Python object once more
        if _use_count(st) > viewing[ptr] + 1:
            out.extend(idx)
    return sorted(out)


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes of its storage ``t`` can reach: ``[start, end)`` (a strided tensor's whole extent)."""
    start = t.storage_offset() * t.element_size()
    if t.numel() == 0:
        return start, start
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size()


def aliased(params: list[Tensor], others: Iterable[Tensor]) -> list[int]:
    """The indices of ``params`` whose memory may overlap that of another param in ``params`` or in
    ``others`` (a param made a view of another: ``Parameter(w.data.view(...))``, a slice of it).
    torch.optim steps such params one after the other, each seeing the others' writes; moved into
    flat buffers of their own they would no longer be linked. Spans are compared, so two strided
    slices that interleave without sharing an element count as overlapping too (the safe answer)."""
    spans: dict[int, list[tuple[int, int, int]]] = {}
    seen: set[int] = set()
    for t in (*params, *others):
        # (a DTensor, FSDP2's sharded param, has its own local shard: never a view of a plain param)
        if id(t) in seen or t.numel() == 0 or hasattr(t, "device_mesh"):
            continue
        seen.add(id(t))
        a, z = _span(t)
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((a, z, id(t)))
    hit: set[int] = set()
    for lst in spans.values():
        lst.sort()
        reach, owner = -1, 0
        for a, z, who in lst:
            if a < reach:
                hit.update((who, owner))
            if z > reach:
                reach, owner = z, who
    return [i for i, p in enumerate(params) if id(p) in hit]


def dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of ``t.numel()`` with no gaps and no overlaps, in
    whatever order of dims (contiguous, ``channels_last``, a transposed matrix)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _use_count(storage: Any) -> int:
    try:
        return torch._C._storage_Use_Count(storage._cdata)
    except (AttributeError, RuntimeError):  # (a private API: without it, every untagged view is foreign)
        return 1 << 30


class FlatBucket:
    """The flat buffers of one bucket (the params of one group, device and dtype that have grads)."""

    def __init__(self, params: list[Tensor], states: list[dict[str, Any]], names: list[str | None],
                 fill: Callable[[int], None] | None = None, chunked: bool = False, keep_layouts: bool = True,
                 grad_dtype: torch.dtype | None = None) -> None:
        """``fill(i)``, if given, makes the state of param ``i`` in place when it has none yet (its
        dict holds only ``step``): a bucket of such params makes their state one param at a time,
        each moved into the flat buffers before the next is made. ``chunked`` lays the params out in
        rows whatever their number (then per-tensor reductions take tensors of row indices, not
        one slice per param: a kernel that buckets of other sizes can share). With ``keep_layouts``
        a param in another memory format (``channels_last``, a transposed weight) keeps it: its
        slice of each flat buffer holds its elements in its own order, and every view of it (the
        param, its grad, its state) has its strides. Elementwise kernels and per-tensor sums over
        the flat buffers do not depend on that order; a param whose elements do not fill one dense
        block (a strided slice) is held contiguously. ``grad_dtype`` is the flat gradients' dtype:
        the params' by default, fp32 for bf16 params whose ``grad_dtype`` torch was told is fp32."""
        self.params = params
        self.states = states
        self.names = names
        self.numels = [p.numel() for p in params]
        # each param's strides where its slice keeps another memory format (None: contiguous)
        self.strides = [tuple(p.stride()) if keep_layouts and not p.is_contiguous() and dense(p) else None
                        for p in params]
        self.strided = any(s is not None for s in self.strides)
        # past SEGMENT_UNROLL tensors each param starts a row of CHUNK elements: a per-tensor reduction
        # is then row sums of a (rows, CHUNK) view fused into the kernel (plus a sum of a few rows per
        # tensor), and a per-tensor factor is one load per row. The gaps (under CHUNK elements per
        # param) belong to no param; the reductions mask them out.
        # Not where every param is 0-d: their param-shaped state is 0-d too, laid out as a per-param
        # scalar (one entry a param, _scalar_keys), which is the flat layout only without gaps
        self.chunked = (chunked or len(params) > base.SEGMENT_UNROLL) and any(p.dim() for p in params)
        align = CHUNK if self.chunked else 1
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += -(-n // align) * align
        self.total = total
        p0 = params[0]
        self.device, self.dtype = p0.device, p0.dtype
        self._segments: tuple | None = None
        self._ids: frozenset[int] | None = None
        self._workspaces: dict[torch.dtype, list[Tensor]] = {}
        self._workspace_views: dict[int, tuple[Tensor, list[Tensor]]] = {}
        # the step's hyperparameters as 0-d tensors, kept while their values stay (fused.runner)
        self.hp_cache: dict[str, tuple[Any, Tensor]] = {}
        # params first, then grads: each one copied in frees the tensor it replaces (where nothing else
        # holds it) before the next flat buffer is made, so making the bucket needs one model-sized
        # buffer more than it ends with, not two
        self.flat_params = torch.zeros(total, dtype=p0.dtype, device=p0.device)
        mark_flat(self.flat_params)
        self.param_views = self._views(self.flat_params)
        for p, v in zip(params, self.param_views):
            v.copy_(p.detach())
            p.data = v
        self.flat_grads = torch.zeros(total, dtype=grad_dtype or p0.dtype, device=p0.device)
        self.grad_views = self._views(self.flat_grads)
        self.grads_taken = False
        # a grad pointed at memory that does not fit the flat buffer (another dtype, device or shape)
        # was kept as the param's grad at a step: the next checks look at every grad again
        self.unfit_grads = False
        # whether the last grad copied in was a view of another tensor's storage (the warning says why)
        self.grads_from_views = False
        # ... or a gradient with a graph (backward(create_graph=True) makes a new one at every step)
        self.grads_with_graph = False
        # the version of the flat grads right after zero_grad() zeroed them (None: not zeroed yet)
        self.reset_version: int | None = None
        # whether the params' step counts differ (then the kernels read a step count per param)
        self.uneven = False
        # the params with a grad at the last steps, when some of the bucket's had none, and for how
        # many steps in a row (ChainOptimizer makes the bucket again without the others at a few)
        self.subset: tuple[frozenset[int], int] | None = None
        # consecutive steps whose grads were copied in (ChainOptimizer warns at a few)
        self.copied_steps = 0
        for p, gv in zip(params, self.grad_views):
            if p.grad is not None:
                self.take_grad(p, gv)
        self._param_ptrs = [p.data_ptr() for p in params]
        self._grad_ptrs = [v.data_ptr() for v in self.grad_views]
        self.flat_state: dict[str, Tensor] = {}
        self.state_views: dict[str, list[Tensor]] = {}
        if fill is not None:
            if all(map(self._unmade, states)):
                self._make_state_flat(fill)
            else:
                for i in range(len(params)):
                    fill(i)
        # the step count, one entry per param: each state["step"] is a 0-d view
        self.flat_steps = torch.stack([st["step"].detach().float().cpu() for st in states]).to(
            states[0]["step"].device)
        self.step_views = list(self.flat_steps.unbind())
        for st, v in zip(states, self.step_views):
            st["step"] = v
        # per-param 0-d state (NAdam's running product): one vector, each entry a 0-d view
        for key in self._scalar_keys():
            vec = torch.stack([st[key].detach() for st in states])
            self.flat_state[key], self.state_views[key] = vec, list(vec.unbind())
            for st, v in zip(states, self.state_views[key]):
                st[key] = v
        for key in self._flat_keys():
            dtype = states[0][key].dtype
            buf = torch.zeros(total, dtype=dtype, device=p0.device)
            views = self._views(buf)
            for st, v in zip(states, views):
                v.copy_(st[key])
                st[key] = v
            self.flat_state[key], self.state_views[key] = buf, views
        self._grad_uses = self._grad_users()

    @staticmethod
    def _unmade(st: dict[str, Any]) -> bool:
        return len(st) == 1 and "step" in st

    @staticmethod
    def _fits(t: Any, p: Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether state entry ``t`` can be ``p``'s view of a flat buffer (of ``dtype``, if given)."""
        return (isinstance(t, Tensor) and t.is_floating_point() and t.shape == p.shape and t.device == p.device
                and (dtype is None or t.dtype == dtype))

    def _make_state_flat(self, fill: Callable[[int], None]) -> None:
        """Make every param's state (none has any yet) one param at a time, each entry that will be a
        flat view moved into its flat buffer before the next param's state is made: the bucket never
        holds a second copy of its state (made whole first, then copied, it would: a param's worth
        of memory more per state buffer at the first step, and each page faulted in twice).

        The entries laid out flat are those of :meth:`_flat_keys`: a floating tensor of the param's
        shape, dtype and device for every param, found as the params are made. A buffer starts at
        the first param that is not 0-d (a key 0-d for every param is a per-param scalar,
        :meth:`_scalar_keys`); an entry that turns out not to fit takes its own copies back.

        The flat buffers are made before the largest param's state, which is then held twice for a
        moment: where that costs more than making every state first (its k entries at least one
        bucket's worth: a param holding over 1/k of the bucket), every state is made first."""
        st0 = self.states[0]
        fill(0)
        k = sum(1 for key, t in st0.items() if key != "step" and self._fits(t, self.params[0]))
        if k * max(self.numels) >= self.total:
            for i in range(1, len(self.params)):
                fill(i)
            return
        seen: dict[str, tuple[int, torch.dtype]] = {}  # entries that fit every param so far: (count, dtype)
        flat: dict[str, tuple[Tensor, list[Tensor]]] = {}
        out: set[str] = set()

        def drop(key: str, upto: int) -> None:
            out.add(key)
            seen.pop(key, None)
            taken = flat.pop(key, None)
            if taken is not None:  # the params laid out so far take their entries back
                for st, v in zip(self.states[:upto], taken[1]):
                    st[key] = v.clone()

        for i, (p, st) in enumerate(zip(self.params, self.states)):
            if i:
                fill(i)
            for key, t in st.items():
                if key == "step" or key in out:
                    continue
                count, dtype = seen.get(key, (0, t.dtype if isinstance(t, Tensor) else None))
                if count != i or not self._fits(t, p, dtype):
                    drop(key, i)
                    continue
                seen[key] = (i + 1, dtype)
                if key not in flat and p.dim() > 0:
                    buf = torch.zeros(self.total, dtype=dtype, device=self.device)
                    views = self._views(buf)
                    for earlier, v in zip(self.states[:i], views):  # 0-d params before it
                        v.copy_(earlier[key])
                        earlier[key] = v
                    flat[key] = (buf, views)
            for key in [name for name, (count, _) in seen.items() if count == i]:
                drop(key, i)  # an entry this param lacks
            for key, (_, views) in flat.items():
                views[i].copy_(st[key])
                st[key] = views[i]
        for key in sorted(flat):
            self.flat_state[key], self.state_views[key] = flat[key]

    def workspace(self, dtype: torch.dtype, avoid: Any = None) -> Tensor:
        """A flat buffer of ``dtype`` for updates passed between segments, kept for the step (and from
        step to step on a CPU: ``KEEP_WORKSPACES``). Two at most: the one returned never shares
        storage with ``avoid`` (the segment's input)."""
        taken = avoid.untyped_storage().data_ptr() if isinstance(avoid, Tensor) else None
        spaces = self._workspaces.setdefault(dtype, [])
        for ws in spaces:
            if ws.untyped_storage().data_ptr() != taken:
                return ws
        ws = torch.zeros(self.total, dtype=dtype, device=self.device)
        spaces.append(ws)
        return ws

    def end_step(self) -> None:
        """After a step: free the workspaces where they are not kept (``KEEP_WORKSPACES``)."""
        if self._workspaces and self.device.type not in KEEP_WORKSPACES:
            self._workspaces.clear()
            self._workspace_views.clear()

    def segments(self) -> tuple:
        """``(lengths, rows, numels, names, shapes)``: each param's element count (a tensor); for a
        chunked bucket ``(row_ids, rows_per_param, valid_per_row)`` (tensors), else None; and,
        static in the compiled graph, the element counts as Python ints, the param names and shapes."""
        if self._segments is None:
            lengths = torch.tensor(self.numels, dtype=torch.int64, device=self.device)
            rows = None
            if self.chunked:
                counts = [-(-n // CHUNK) for n in self.numels]
                per_param = torch.tensor(counts, dtype=torch.int64, device=self.device)
                row_ids = torch.repeat_interleave(torch.arange(len(counts), device=self.device), per_param)
                valid = [min(CHUNK, n - r * CHUNK) for n, c in zip(self.numels, counts) for r in range(c)]
                rows = (row_ids, per_param, torch.tensor(valid, dtype=torch.int64, device=self.device))
            self._segments = (lengths, rows, tuple(self.numels), tuple(self.names),
                              tuple(tuple(p.shape) for p in self.params))
        return self._segments

    def join(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        """One flat tensor laid out like the params (into ``out`` if given; the gaps of a chunked
        bucket are zero in a new tensor, left as they are in ``out``)."""
        if not self.chunked and not self.strided:
            flat = [t.reshape(-1) for t in tensors]
            return torch.cat(flat) if out is None else torch.cat(flat, out=out)
        if out is None:
            out = torch.zeros(self.total, dtype=tensors[0].dtype, device=self.device)
        for v, t in zip(self.split(out), tensors, strict=True):
            v.copy_(t)
        return out

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + n].view(p.shape) if s is None else flat[o : o + n].as_strided(p.shape, s)
                for o, n, p, s in zip(self.offsets, self.numels, self.params, self.strides)]

    def _scalar_keys(self) -> list[str]:
        keys = []
        for key, t0 in self.states[0].items():
            if key == "step" or not isinstance(t0, Tensor) or not t0.is_floating_point() or t0.dim() != 0:
                continue
            if all(isinstance(st.get(key), Tensor) and st[key].dim() == 0 and st[key].dtype == t0.dtype
                   and st[key].device == t0.device for st in self.states):
                keys.append(key)
        return sorted(keys)

    def _flat_keys(self) -> list[str]:
        keys = []
        for key, t0 in self.states[0].items():
            if key == "step" or not isinstance(t0, Tensor) or not t0.is_floating_point() or key in self.flat_state:
                continue
            ok = all(self._fits(st.get(key), p, t0.dtype) for st, p in zip(self.states, self.params))
            if ok:
                keys.append(key)
        return sorted(keys)

    # -- per step -----------------------------------------------------------------------------
    def take_grad(self, p: Tensor, view: Tensor) -> None:
        """Copy a gradient that arrived as a new tensor into the flat buffer; ``p.grad`` becomes the view."""
        view.copy_(p.grad)
        p.grad = view

    def holds(self, params: list[Tensor]) -> bool:
        """Whether every one of ``params`` is a param of this bucket."""
        if self._ids is None:
            self._ids = frozenset(map(id, self.params))
        return all(id(p) in self._ids for p in params)

    def intact(self) -> bool:
        """Whether every param is still a view into the flat buffer (``p.data`` was not rebound)."""
        return list(map(Tensor.data_ptr, self.params)) == self._param_ptrs

    def _grad_users(self) -> int:
        return _use_count(self.flat_grads.untyped_storage())

    def grads_moved(self) -> bool:
        """Whether a grad view may no longer view the flat buffer. ``p.grad.data = x`` points the grad
        tensor itself (the view, still ``p.grad``) at other memory: ``Module._apply`` does it to every
        grad in ``model.to(memory_format=...)``, ``model.to(device)`` or ``model.half()``. The flat
        buffer's storage then has fewer users than when last counted: one count per bucket, not a
        check per param. (A view of a grad made elsewhere changes the count too, harmlessly: the
        check per param of :meth:`repair_grad_views` finds nothing and counts again.)"""
        return self.unfit_grads or self._grad_users() != self._grad_uses

    def repair_grad_views(self, keep_values: bool) -> bool:
        """Replace the grad views that no longer view the flat buffer with new views; a param whose
        grad was such a view gets the new one, holding that grad's values (``keep_values``: at a
        step) or zeros (at ``zero_grad()``). A moved grad that no longer fits the buffer (another
        dtype, device or shape) gets None at ``zero_grad()``; at a step it stays the param's grad, for
        the step to check against its param (``unfit_grads``). True if one was replaced."""
        moved = [i for i, (v, ptr) in enumerate(zip(self.grad_views, self._grad_ptrs)) if v.data_ptr() != ptr]
        unfit = False
        if moved:
            fresh = self._views(self.flat_grads)
            for i in moved:
                p, old, new = self.params[i], self.grad_views[i], fresh[i]
                if p.grad is old:
                    if old.dtype == new.dtype and old.device == new.device and old.shape == new.shape:
                        if keep_values:
                            new.copy_(old)
                        p.grad = new
                    elif keep_values:
                        # at a step, the grad stays: the step checks it against its param, and makes
                        # the bucket again for a param cast or moved with it (model.double())
                        unfit = True
                    else:
                        p.grad = None
                self.grad_views[i] = new
            del fresh, old, new
        self._grad_uses = self._grad_users()
        self.unfit_grads = unfit
        return bool(moved)

    def gather_grads(self) -> bool:
        """Make every ``p.grad`` the flat view (copying new ones in); False if a param has no grad.
        ``grads_taken`` tells whether one was copied in."""
        self.grads_taken = self.grads_moved() and self.repair_grad_views(keep_values=True)
        if all(map(operator.is_, map(_GRAD, self.params), self.grad_views)):
            return True
        for p, v in zip(self.params, self.grad_views):
            g = p.grad
            if g is v:
                continue
            if g is None:
                return False
            # a view of another buffer: DDP's bucket (gradient_as_bucket_view=True), not a fresh tensor
            self.grads_from_views = g._base is not None
            self.grads_with_graph = g.requires_grad
            self.take_grad(p, v)
            self.grads_taken = True
        return True

    def uniform_step(self) -> float | None:
        """The step count shared by every param, or None if they differ."""
        lo, hi = torch.aminmax(self.flat_steps)
        lo, hi = float(lo), float(hi)
        return lo if lo == hi else None

    def resync_state(self) -> bool:
        """Copy state entries that a step (or a user) rebound to new tensors back into the flat
        buffers. False if one does not fit its flat buffer (another dtype, shape or device: state cast
        by hand after ``model.double()``): it is left as it is, and the bucket must be made again
        from the state dicts rather than cast it back."""
        fits = True
        for key, views in self.state_views.items():
            for st, v in zip(self.states, views):
                t = st.get(key)
                if t is not v:
                    if not (isinstance(t, Tensor) and t.dtype == v.dtype and t.shape == v.shape
                            and t.device == v.device):
                        fits = False
                        continue
                    v.copy_(t)
                    st[key] = v
        for st, v in zip(self.states, self.step_views):
            t = st.get("step")
            if t is not v:
                v.copy_(t)
                st["step"] = v
        return fits

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-param views of a flat tensor laid out like the params (a new list; the views of the
        bucket's own buffers are made once: a view per param costs microseconds at every step)."""
        if flat is self.flat_grads:
            return list(self.grad_views)
        if flat is self.flat_params:
            return list(self.param_views)
        kept = self._workspace_views.get(id(flat))
        if kept is not None and kept[0] is flat:
            return list(kept[1])
        views = self._views(flat)
        if any(flat is ws for spaces in self._workspaces.values() for ws in spaces):
            self._workspace_views[id(flat)] = (flat, views)  # kept as long as the bucket keeps it
        return list(views)

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer in place. A param whose grad is not its view (a new tensor a
        step did not copy in: a step where some of the bucket's params had none) gets None, so no
        gradient outlives the reset to be added to by the next backward. A grad view pointed at other
        memory (``model.to(memory_format=...)`` during a run) is made a view again first."""
        if self.grads_moved():
            self.repair_grad_views(keep_values=False)
        self.flat_grads.zero_()
        # a write into any grad view (a backward, a clip, a copy) moves the version shared with the views
        self.reset_version = self.flat_grads._version
        if not all(map(operator.is_, map(_GRAD, self.params), self.grad_views)):
            for p, v in zip(self.params, self.grad_views):
                if p.grad is not v:
                    p.grad = None
