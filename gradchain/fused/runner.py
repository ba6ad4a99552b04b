"""The fused step: a chain's runs of elementwise transforms compiled into one kernel per flat bucket.

The chain is cut into segments. A run of consecutive ``elementwise`` or ``segmented`` transforms
is one segment: its transforms' own update functions are traced by ``torch.compile`` over the flat
buffers (a list of one tensor each), with hyperparameters and the step count as 0-d tensors, so
neither an LR scheduler nor the next step recompiles (and a graph pass, ``hoist``, computes their
scalar math once per step). Any other transform (factored statistics, a combinator, a reduction
over every bucket) is a segment of its own, run eagerly over per-tensor views of the same flat
storage. The final write ``p += u`` happens in the last segment; when that one is compiled, a
chain such as AdamW is one kernel that reads p, g, m, v once and writes p, m, v once. A wrapper
with a ``sync_flat`` (Lookahead) runs after its inner chain's segments; a chain that is one
``partition`` gets a :class:`FusedChain` per label (:class:`FusedRoutes`).
"""

from __future__ import annotations

import itertools
import math
import time
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import pieces
from ..base import Bucket, Chain, Leaf, Transform, _storage, state_owners
from ..combinators import _Masked, _Partition
from ..hyperparams import same_value
from ..pieces import PiecewiseChain
from .flat import FlatBucket
from .hoist import hoisting_backend

# the torch.compile backend of fused segments ("aot_eager" traces the same graph without code
# generation: the test suite uses it to check every recipe quickly)
BACKEND = "inductor"
# a param that fails an elementwise_for test compiles alone when it is this large, so that the call
# costs little beside its work: one kernel per shape for the first few shapes of a bucket, then one
# kernel with symbolic sizes for all the others (a little slower, but compiled once)
PER_TENSOR_MIN_NUMEL = 1 << 18
PER_TENSOR_STATIC_SHAPES = 6
# likewise for flat buckets (one per param group, device and dtype): the first few compile a kernel
# each, the others of the same structure share one with a symbolic size (forty param groups, as
# layer-wise lr decay makes, compiled forty kernels: about a minute cold)
STATIC_BUCKETS = 4
# past this many traces in one step a shared kernel traces for each bucket (a guard on each one's
# own), and the buckets after take kernels of their own. (A few are normal: a new size may
# specialize again.)
_RETRACES = 3


def _end(b: Bucket, state: dict, last: bool, out: Tensor | None, update: bool = True) -> Tensor | None:
    """The end of a compiled function over a flat bucket: state a transform rebound is copied into
    the flat storage; then the final write (``last``), or the update into ``out`` (a buffer kept from
    step to step: no fresh full-size allocation), or the update returned."""
    for key, lst in b.state.items():
        for new, kept in zip(lst, state[key]):
            if new is not kept:
                kept.copy_(new)
    if not update:
        return None
    if last:
        b.write()
        return None
    if out is not None:
        out.copy_(b.materialize()[0])
        return None
    return b.materialize()[0]


def _host_math(steps: list) -> list:
    """The step counts that ``ctx.per_step`` and ``ctx.step`` hand a rule: float64, as the host's
    numbers on the eager path (the stored count is float32, as torch's; ``0.2 / t`` would be
    formed in float32 from it)."""
    return [s.to(torch.float64) if isinstance(s, Tensor) else s for s in steps]


def _segment(leaves: list[Leaf], last: bool):
    def run(params, grads, updates, state, resolved, host, step, loss, dtype, tensor_scalars, segments, out=None,
            host_values=None):
        shared = {"host_hyperparams": host, "host_values": host_values}
        # the bucket's one step count, or a vector of one per param over a flat buffer (uneven counts)
        vector = isinstance(step, Tensor) and step.dim() == 1
        steps = [] if vector else [step]
        b = Bucket(params, grads, dict(state), steps if tensor_scalars else [], [None] * len(params), {}, loss,
                   shared, dtype, step_values=_host_math(steps), tensor_scalars=tensor_scalars, resolved=resolved)
        b.segments = segments
        if vector:
            b.step_vector = step.to(torch.float64)  # (as the host's step math, and a 0-d float64 count)
        if updates is not None:
            b.updates = list(updates)
        for leaf in leaves:
            if _scales_only(leaf):  # its factor, worked out before the kernels (step_scales)
                b.defer_scale(host_values[leaf.name]["scale"])
            else:
                leaf.apply([b])
        return _end(b, state, last, out)

    # a fresh code object per segment: torch.compile keeps one cache per code object, so one
    # optimizer's graphs never evict another's
    return types.FunctionType(run.__code__.replace(), run.__globals__, "fused_segment", run.__defaults__,
                              run.__closure__)


def _phase(transform: Transform, head: list[Leaf], tail: list[Leaf], name: str, last: bool):
    """One per-bucket pass of a transform that reduces over every bucket (``fused_phases``: pass 1
    ``accumulate``, one eager ``estimate``, pass 2 ``finish``), as a function over a flat bucket.
    Each pass first runs the elementwise leaves before the transform (``head``): the first takes
    their step (stateful ones advance their state), the second works their output out again
    (stateless ones run again, stateful ones give it ``from_state``: AdamS's Adam); ``finish`` is
    followed by the elementwise leaves after it (``tail``) and the final write; ``frozen`` is that
    pass for a bucket the transform leaves alone (zero updates; the head's state still advances)."""
    stateful = any(leaf.stateful for leaf in head)

    def run(params, grads, updates, state, hp, flags, coefs, acc, dtype, step, resolved, host, loss, segments,
            out=None):
        # the bucket's one step count (a 0-d tensor): bias corrections of the state it reads
        b = Bucket(params, grads, dict(state), [step], [None], {}, loss, {"host_hyperparams": host}, dtype,
                   step_values=_host_math([step]), tensor_scalars=True, resolved=resolved)
        b.segments = segments
        if updates is not None:
            b.updates = list(updates)
        if head and (name != "frozen" or stateful):
            for leaf in head:
                if name == "finish" and leaf.stateful:
                    leaf.apply_from_state([b])
                else:
                    leaf.apply([b])
            b.materialize()
        if name == "accumulate":
            sums = transform.accumulate(b, hp, flags, coefs, acc, reuse=False)[0]
        elif name == "frozen":
            b.updates = [torch.zeros_like(u) for u in b.materialize()]
        else:
            transform.finish(b, hp, flags, coefs, None)
        if name == "accumulate":
            _end(b, state, False, None, update=False)
            return sums
        for leaf in tail:
            leaf.apply([b])
        return _end(b, state, last, out)

    return types.FunctionType(run.__code__.replace(), run.__globals__, f"fused_{name}", run.__defaults__,
                              run.__closure__)


def _forget_specialized_floats() -> None:
    """Empty torch's global set of float inputs to specialize, after a compile.

    Compiling a graph whose inputs include 0-d float64 tensors (the phases' coefficients) may
    restart its tracing with some of them specialized; torch (2.13) records them by symbol name
    (``zf28``: a hash of the input's source, modulo 100) in a set that it does not empty when that
    compile ends. A later compile of any other function then specializes its own float input that
    got the same name, and can lose an in-place update of it (seen: ``v.lerp_`` of a 0-d state in
    a ``torch.compile``d training step). The set is only meant for one compile's restarts."""
    state = getattr(getattr(torch._dynamo, "symbolic_convert", None), "TensorifyState", None)
    if state is not None and hasattr(state, "clear"):
        state.clear()


def _phase_hyperparams(t: Transform, resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A phased transform's hyperparameters for one bucket, by local name: its own declared ones,
    or what its ``phase_hyperparams(resolved)`` takes from the group (another transform's betas)."""
    take = getattr(t, "phase_hyperparams", None)
    if take is not None:
        return take(resolved)
    return {k: resolved[g] for k, g in t._keys.items()}


def _coefs(c: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A step's coefficients for the compiled passes: numbers as float64 0-d tensors (a new value
    does not recompile), tensors as they are (on ``device``), flags as flags."""
    return {k: _to(v, device) if isinstance(v, Tensor) else _tensorize(v, device) for k, v in c.items()}


def _tail_ok(t: Transform) -> bool:
    """Whether ``t`` can follow a phased transform in its compiled ``finish`` pass."""
    return (isinstance(t, Leaf) and (t.elementwise or t.segmented) and t.elementwise_for is None
            and t.host_step is None)


def _host_steps(seg: Segment, resolved: Mapping[str, Any], step: float,
                device: torch.device) -> tuple[dict[str, str], dict[str, dict[str, Tensor]]]:
    """The ``host_step`` of a compiled segment's transforms for one bucket at host step ``step``:
    the state renaming (seen key -> stored key, full names) and their values as float64 tensors
    (a number 0-d, a sequence 1-d), inputs of the kernel."""
    renames: dict[str, str] = {}
    values: dict[str, dict[str, Tensor]] = {}
    for t in seg.host_stepped:
        made = t.host_step({k: resolved[g] for k, g in t._keys.items()}, round(step))
        renames.update({f"{t.name}.{k}": f"{t.name}.{v}" for k, v in made.state.items()})
        values[t.name] = {k: _to(torch.tensor(v, dtype=torch.float64), device) for k, v in made.values.items()}
    return renames, values


def _renamed(state: dict[str, list], renames: Mapping[str, str]) -> dict[str, list]:
    """``state`` (stored keys) as a ``host_step`` transform sees it (``renames``: seen -> stored)."""
    if not renames:
        return state
    targets = set(renames.values())
    out = {k: v for k, v in state.items() if k not in targets}
    out.update({k: state[v] for k, v in renames.items()})
    return out


# what a failed trace raises (a new size under a kernel with symbolic sizes), as opposed to a kernel's run
_TRACING_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _versions(args: Any) -> list[int]:
    """The version counters of every tensor in ``args``: a write in place moves them."""
    return [t._version for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, Tensor)]


def _tensor_hp(tensor_hp: list, i: int, resolved: Mapping[str, Any], fb: FlatBucket) -> dict:
    """Bucket ``i``'s hyperparameters as 0-d tensors, made once per step for all its segments.

    A number that has not changed since the last step keeps its tensor (``fb.hp_cache``): most
    hyperparameters are constant, and a new 0-d tensor per value per step is most of the fused
    path's host time on a small model. The compiled code only reads them."""
    if tensor_hp[i] is None:
        cache = fb.hp_cache
        out = {}
        for k, v in resolved.items():
            if not _number_like(v):
                out[k] = _tensorize(v, fb.device)
                continue
            hit = cache.get(k)
            if hit is None or not same_value(hit[0], v):
                hit = cache[k] = (v, _tensorize(v, fb.device))
            out[k] = hit[1]
        tensor_hp[i] = out
    return tensor_hp[i]


def _graph_signature(value: Any) -> Any:
    """What a compiled graph specializes on in ``value`` (a kernel's arguments): each tensor's dtype,
    device and number of dims, and every other value as it is; containers by their items."""
    if isinstance(value, Tensor):
        return ("T", value.dtype, value.device, value.dim())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_graph_signature, value))
    if isinstance(value, Mapping):
        return ("M", *((k, _graph_signature(v)) for k, v in value.items()))
    return value if isinstance(value, (bool, int, float, str, type(None), torch.dtype)) else repr(value)


def _shared_key(seg: Segment, tag: tuple, args: tuple, at: int) -> tuple | None:
    """The key of the kernel with a symbolic size that a bucket shares with those whose arguments
    ``args`` have the same signature (``args[at]``: its segments, or None), or None if that kernel
    traced for bucket after bucket (``Segment._retraced``). A chunked bucket's per-tensor sums take
    row-index tensors; its static sizes, names and shapes stay out of the key (a transform that
    reads them traces again, guarded)."""
    segments = args[at]
    if segments is not None:
        args = (*args[:at], (segments[0], segments[1], len(segments[2])), *args[at + 1:])
    key = (*tag, "sized", _graph_signature(args))
    return None if key in seg._retraced else key


def _graph_count() -> int:
    """The number of graphs torch.compile has traced in this process (dynamo's own count)."""
    try:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]
    except (AttributeError, KeyError):
        return 0


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without waiting for the work queued there: a blocking copy from the host
    to a GPU waits for its whole stream, which a new value each step (a scheduled lr) would pay at
    every step. From pageable host memory the copy is staged at once, so ``t`` may go right away."""
    return t.to(device, non_blocking=True)


def _number_like(v: Any) -> bool:
    """A float or int (not a bool), or a tuple or list of them."""
    if isinstance(v, (tuple, list)):
        return all(_number_like(x) for x in v)
    return type(v) in (float, int)


def _tensorize(value: Any, device: torch.device) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return _to(torch.tensor(float(value), dtype=torch.float64), device)
    if isinstance(value, Tensor):
        return _to(value.detach().to(torch.float64), device)
    if isinstance(value, (tuple, list)):
        return type(value)(_tensorize(v, device) for v in value)
    return value


def _scales_only(t: Transform) -> bool:
    """Whether ``t`` only scales each bucket's update, by a factor it works out from the loss, the
    hyperparameters and its own optimizer-level state, never from the updates (``step_scales``:
    AdaLo's loss-driven lr). The fused step works the factors out once, before its kernels, and
    passes them in as 0-d tensors, so ``t`` compiles with the transforms around it."""
    return callable(getattr(t, "step_scales", None))


def step_scales(chains: list[FusedChain], flats: list[FlatBucket], groups: list, resolved: list[dict],
                host_steps: list[float], loss: Tensor | None, shared: dict,
                dtypes: list[torch.dtype]) -> dict[str, dict[FlatBucket, Tensor]]:
    """This step's factors of the ``step_scales`` transforms of ``chains`` (the routes of one chain),
    per flat bucket: each transform is called once per step over every bucket of every route (its
    state advances once), before any kernel runs (a bad loss raises before anything is written)."""
    scaled = {t.name: t for c in chains for seg in c.segments for t in seg.scaled}
    if not scaled:
        return {}
    # the factors read the loss, the group and the bucket's dtype and device, not the updates
    buckets = [Bucket(fb.param_views, fb.grad_views, {}, fb.step_views, fb.names, group or {}, loss, shared,
                      dtype, step_values=[step] * len(fb.params), resolved=res)
               for fb, group, res, step, dtype in zip(flats, groups, resolved, host_steps, dtypes, strict=True)]
    return {name: dict(zip(flats, t.step_scales(buckets), strict=True)) for name, t in scaled.items()}


def _deferred(t: Transform) -> bool:
    """A scale or a decay: on the eager path it only updates the pending form of the final write."""
    return isinstance(t, Leaf) and t._update is None


def _tensor_view(seg: Segment, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The segment's ``tensor_view`` of a param of ``shape``, checked to hold its elements."""
    view = tuple(seg.tensor_view(shape))  # type: ignore[misc]
    if math.prod(view) != math.prod(shape):
        names = [t.name for t in seg.transforms if getattr(t, "tensor_view", None) is not None]
        raise ValueError(f"transform {names[0]!r}: tensor_view{shape} returned {view}, which does not hold "
                         f"the param's {math.prod(shape)} elements")
    return view


def _shape_free(t: Transform) -> bool:
    """Whether ``t``'s update is the same over any view of a param: stateless and elementwise."""
    return isinstance(t, Leaf) and t.elementwise and not t.stateful and t.host_step is None


def _steps_each_tensor_alone(t: Transform) -> bool:
    """Whether ``t`` steps each tensor alone: declared so (``per_tensor``), or elementwise, or a
    scale or decay folded into the write."""
    return isinstance(t, Leaf) and (t.per_tensor or t.elementwise or t._update is None) and not _scales_only(t)


def _head_ok(t: Transform) -> bool:
    """Whether ``t`` may run at the start of each pass of a phased transform (:func:`_phase`):
    stateless and elementwise, or elementwise with its output worked out again ``from_state``."""
    return _shape_free(t) or (isinstance(t, Leaf) and t.elementwise and t.recomputable and t.host_step is None
                              and not _scales_only(t))


class Segment:
    """Consecutive transforms that run together: compiled (elementwise leaves) or eager (one transform)."""

    def __init__(self, transforms: list[Transform], compiled: bool) -> None:
        self.transforms = transforms
        self.compiled = compiled
        self.last = False
        self.per_tensor = False  # compiled one param at a time (a kernel per shape), not over the flat buffer
        self.static_shapes: set[tuple[int, ...]] = set()
        # whose state these keep or read (declared in ``reads_state``: AdamS reads Adam's v)
        self.owners = state_owners(transforms)
        # group keys, which a renamed transform's differ from its local names (adamw_eps_root)
        self.static = frozenset().union(*(getattr(t, "static_keys", ()) for t in transforms))
        # per-tensor reductions over the flat buffer: segmented transforms, and elementwise_for ones
        # over the shapes they pass (AGC's vectors, each one unit)
        self.segmented = any(getattr(t, "segmented", False) or getattr(t, "elementwise_for", None) is not None
                             for t in transforms)
        # a transform whose two passes compile around one reduction over every bucket (Prodigy,
        # AdamS's decay), each pass after the elementwise leaves before it (``head``: AM-SGD's L2,
        # AdamS's Adam), the second followed by the elementwise leaves after it (``tail``)
        at = next((j for j, t in enumerate(transforms) if getattr(t, "fused_phases", False)), None)
        self.phased = None if at is None else transforms[at]
        self.head: list[Leaf] = [] if at is None else list(transforms[:at])  # type: ignore[arg-type]
        self.tail: list[Leaf] = [] if at is None else list(transforms[at + 1:])  # type: ignore[arg-type]
        self.host_stepped = [t for t in transforms if getattr(t, "host_step", None) is not None]
        self.scaled = [t for t in transforms if _scales_only(t)]
        # the shape a per-tensor kernel sees each param in: the one its transform declares
        # (``tensor_view``), when the others are stateless and elementwise (no state of the
        # param's shape to match)
        views = [t.tensor_view for t in transforms if getattr(t, "tensor_view", None) is not None]
        self.tensor_view = views[0] if len(views) == 1 and all(
            getattr(t, "tensor_view", None) is not None or _shape_free(t) for t in transforms) else None
        # an eager last segment that steps each tensor alone: its step in pieces on a CPU
        self.pieces: PiecewiseChain | None = None
        self._fns: dict[Any, Any] = {}
        self._eager_fn = None
        self._failed: set[Any] = set()
        # keys whose last trace stopped at an error the traced code raised (see _try_compiled)
        self._raised: set[Any] = set()
        # shared kernels (symbolic sizes) that traced again for bucket after bucket in one step
        # (_RETRACES): a transform guards on something of each bucket's own (a state tensor's
        # identity), so the others take kernels of their own. (A trace again at a later step is a new
        # specialization for all of them, as at the second step.) key -> traces in this step
        self._retraced: set[Any] = set()
        self._traces: dict[Any, int] = {}
        self.compile_seconds = 0.0

    def host(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters this segment branches on in Python (``static``), as host values."""
        return {k: v for k, v in resolved.items() if k in self.static}

    def keys(self, fb: FlatBucket) -> set[str]:
        """The state keys this segment's transforms keep in ``fb`` (its group's options decide some)."""
        return self.keys_of(fb.states[0])

    def keys_of(self, state: Mapping[str, Any]) -> set[str]:
        """The state keys this segment's transforms keep (or read, of a transform they declare in
        ``reads_state``) in one param's ``state``."""
        return {k for k in state if k != "step" and k.split(".", 1)[0] in self.owners}

    def eager_fn(self):
        if self._eager_fn is None:
            self._eager_fn = _segment(self.transforms, self.last)  # type: ignore[arg-type]
        return self._eager_fn


class FusedChain:
    """A chain cut into segments, run over flat buckets."""

    def __init__(self, transform: Transform, compile: bool = True, *, shapes: str | None = None) -> None:
        # shapes: which params of this chain's buckets are (FusedRoutes): "flat", those that pass its
        # transforms' ``elementwise_for`` tests; "tensor", large ones that fail them, compiled one
        # param at a time; "eager", the others
        # a wrapper that acts on the params after its inner chain's step (Lookahead's sync) lets the
        # inner chain be cut into segments; its own part runs after them, eagerly
        self.wrapper = transform if hasattr(transform, "sync_flat") else None
        if self.wrapper is not None:
            transform = self.wrapper.inner
        top = transform.children if isinstance(transform, Chain) else [transform]
        # a run is compiled (True), eager (False) or "phased": a transform that reduces over every
        # bucket in two compiled passes (fused_phases), with the elementwise leaves after it, which
        # its second pass runs before the write (AdamS: the decay, then the lr, then p += u)
        runs: list[tuple[Any, list[Transform]]] = []
        for t in top:
            if getattr(t, "fused_phases", False):
                # elementwise leaves just before it run at the start of each pass, the second working
                # their output out again (AM-SGD's coupled L2 again, AdamS's Adam from its new m and
                # v): no kernel and no kept flat buffer for their output
                head = runs.pop()[1] if runs and runs[-1][0] is True and all(map(_head_ok, runs[-1][1])) else []
                runs.append(("phased", [*head, t]))
                continue
            if runs and runs[-1][0] == "phased" and _tail_ok(t):
                runs[-1][1].append(t)
                continue
            fusable = _scales_only(t) or isinstance(t, Leaf) and bool(t.elementwise or t.segmented or (
                shapes in ("flat", "tensor") and t.elementwise_for is not None))
            if runs and runs[-1][0] == fusable:
                runs[-1][1].append(t)
            else:
                runs.append((fusable, [t]))
        if any(kind is not True for kind, _ in runs):
            # a run of scales and decays alone is free on the eager path (folded into the final
            # write); compiled next to an eager segment it would cost a pass and a copy of its own
            # (next to compiled ones only, it stays compiled: AM-SGD's L2 before its phased passes)
            runs = [(False if kind is True and all(_deferred(t) for t in ts) and any(
                runs[k][0] is False for k in (j - 1, j + 1) if 0 <= k < len(runs)) else kind, ts)
                for j, (kind, ts) in enumerate(runs)]
            # likewise a stateless run after an eager one: the eager updates would first be copied
            # into a flat buffer, and the kernel saves no more than that copy costs
            for j in range(1, len(runs)):
                if runs[j][0] is True and runs[j - 1][0] is False and not any(
                        getattr(t, "_init", None) is not None for t in runs[j][1]):
                    runs[j] = (False, runs[j][1])
        merged: list[tuple[Any, list[Transform]]] = []
        for kind, ts in runs:
            if merged and merged[-1][0] == kind and kind != "phased":
                merged[-1][1].extend(ts)
            else:
                merged.append((kind, list(ts)))
        if len(merged) > 1 and merged[-1][0] is False and merged[-2][0] is True \
                and all(map(_steps_each_tensor_alone, merged[-2][1] + merged[-1][1])) \
                and any(getattr(t, "per_tensor", False) for t in merged[-1][1]):
            # elementwise leaves before a last eager segment that steps each tensor alone (Muon's
            # momentum before Newton-Schulz) join it: on a CPU that segment runs in pieces of whole
            # tensors (gradchain.pieces), so no model-sized buffer passes between them, kept or not
            merged[-2:] = [(False, merged[-2][1] + merged[-1][1])]
        self.segments = [Segment(ts, compiled=kind is not False) for kind, ts in merged]
        for seg in self.segments:
            seg.per_tensor = shapes == "tensor" and seg.compiled and any(
                getattr(t, "elementwise_for", None) is not None for t in seg.transforms)
        if self.segments:
            last = self.segments[-1]
            last.last = True
            if not last.compiled and not last.scaled and any(getattr(t, "per_tensor", False) for t in last.transforms):
                in_pieces = PiecewiseChain(list(last.transforms))
                last.pieces = in_pieces if in_pieces.useful else None
        # nothing to compile: the fused step is the eager step (over the same flat storage)
        self.all_eager = not any(s.compiled for s in self.segments)
        # a bucket whose params have taken different numbers of steps (one had no grad at a step)
        # runs its kernels with a step count per param (a vector, broadcast per param), unless a
        # transform needs one step for the whole bucket: host values of the step (host_step), a
        # reduction over every bucket (fused_phases), a factor from the loss (step_scales) or a
        # wrapper's sync (Lookahead)
        self.takes_uneven_steps = self.wrapper is None and not any(
            s.phased is not None or s.host_stepped or s.scaled for s in self.segments)
        # a per-tensor kernel that sees each param in another shape (SMMF's square matrix) views it
        # in its logical order, which a param laid out in another memory format has not
        self.keeps_layouts = not any(s.per_tensor and s.tensor_view is not None for s in self.segments)
        self.compile = compile
        # this step's factors of the step_scales transforms, per flat bucket (step_scales)
        self._scales: dict[str, dict[FlatBucket, Tensor]] = {}

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far (first calls of each compiled segment)."""
        return sum(s.compile_seconds for s in self.segments)

    def describe(self) -> list[tuple[str, list[str]]]:
        """``("compiled" | "eager", [transform names])`` per segment: what the fused path fuses."""
        plan = [("compiled" if s.compiled else "eager", [t.name for t in s.transforms]) for s in self.segments]
        return plan + ([("eager", [self.wrapper.name])] if self.wrapper is not None else [])

    # -- one step over every flat bucket --------------------------------------------------------
    def step(
        self,
        flats: list[FlatBucket],
        groups: list[Mapping[str, Any]],
        resolved: list[dict[str, Any]],
        host_steps: list[float],
        loss: Tensor | None,
        shared: dict,
        dtypes: list[torch.dtype],
        scales: dict[str, dict[FlatBucket, Tensor]],
    ) -> None:
        """One step over ``flats``; ``scales``: the factors of the ``step_scales`` transforms, worked
        out for the buckets of every route at once (:func:`step_scales`)."""
        for seg in self.segments:
            seg._traces.clear()
        grads = []
        for fb, group in zip(flats, groups):
            grads.append(torch.neg(fb.flat_grads) if group["maximize"] else fb.flat_grads)
        updates: list[Tensor | None] = [None] * len(flats)
        tensor_hp = [None] * len(flats)
        self._scales = scales
        # a sync of low-precision params reads the fast weights before they are rounded (as the eager
        # path): that step's inner chain writes them into an exact copy of the params
        exact = [self._exact_params(fb, res, step, dtype) for fb, res, step, dtype
                 in zip(flats, resolved, host_steps, dtypes, strict=True)]
        try:
            for seg in self.segments:
                if seg.per_tensor:
                    for i, fb in enumerate(flats):
                        updates[i] = self._run_per_tensor(seg, i, fb, grads[i], updates[i], resolved[i], tensor_hp,
                                                          host_steps[i], loss, dtypes[i])
                elif seg.phased is not None:
                    updates = self._run_phased(seg, flats, groups, grads, updates, resolved, tensor_hp, host_steps,
                                               loss, shared, dtypes)
                elif seg.compiled:
                    for i, fb in enumerate(flats):
                        updates[i] = self._run_compiled(seg, i, fb, grads[i], updates[i], resolved[i], tensor_hp,
                                                        host_steps[i], loss, dtypes[i])
                else:
                    updates = self._run_eager(seg, flats, groups, grads, updates, resolved, host_steps, loss, shared,
                                              dtypes)
        finally:
            self._scales = {}  # not kept: they would keep a replaced bucket's buffers alive
            for fb, held in zip(flats, exact, strict=True):
                if held is not None:
                    fb.flat_params, fb.param_views = held[0], held[1]
        if self.wrapper is not None:
            for fb, res, step, held in zip(flats, resolved, host_steps, exact, strict=True):
                self.wrapper.sync_flat(fb, res, step, fast=None if held is None else held[2])

    def _exact_params(self, fb: FlatBucket, resolved: Mapping[str, Any], step: float,
                      dtype: torch.dtype) -> tuple[Tensor, list[Tensor], Tensor] | None:
        """Before a sync of params held in a lower precision than the compute dtype: ``fb``'s params
        and their views, after putting a copy in the compute dtype in their place (and that copy)."""
        if self.wrapper is None or fb.flat_params.dtype == dtype or not self.wrapper.due_flat(resolved, step):
            return None
        held = (fb.flat_params, fb.param_views)
        fb.flat_params = fb.flat_params.to(dtype)
        fb.param_views = fb._views(fb.flat_params)
        return (*held, fb.flat_params)

    def _scale_values(self, seg: Segment, fb: FlatBucket) -> dict[str, dict[str, Tensor]]:
        """The factors of ``seg``'s ``step_scales`` transforms for ``fb``, as the kernel's host values."""
        return {t.name: {"scale": self._scales[t.name][fb]} for t in seg.scaled}

    def _run_compiled(self, seg: Segment, i: int, fb: FlatBucket, grad: Tensor, update: Tensor | None,
                      resolved: dict, tensor_hp: list, host_step: float, loss: Tensor | None,
                      dtype: torch.dtype) -> Tensor | None:
        keys = seg.keys(fb)
        state = {k: [fb.flat_state[k]] for k in keys if k in fb.flat_state}
        upd = None if update is None else [update]
        host = seg.host(resolved)
        # uneven step counts: a count per param, broadcast per param through the bucket's segments
        step = fb.flat_steps if fb.uneven else fb.flat_steps[0]
        segments = fb.segments() if seg.segmented or fb.uneven else None
        if self.compile and len(state) == len(keys):
            _tensor_hp(tensor_hp, i, resolved, fb)
            lossv = None if loss is None else _to(loss.detach(), fb.device)
            # the updates for the next segment go into a buffer of the bucket's, not a fresh one
            ws = None if seg.last else fb.workspace(dtype, avoid=update)
            renames, values = _host_steps(seg, resolved, host_step, fb.device)
            values.update(self._scale_values(seg, fb))
            args = ([fb.flat_params], [grad], upd, _renamed(state, renames), tensor_hp[i], host, step,
                    lossv, dtype, True, segments, ws, values)
            # a function of its own per bucket: buckets of other sizes never recompile another's (and
            # one for a count per param: a transform that cannot trace it falls back alone). Past the
            # first few, a bucket whose graph depends on its sizes alone (no per-tensor reductions, or
            # a bucket in rows) shares a kernel with a symbolic size with those of the same structure
            key, dynamic = ((i, "uneven") if fb.uneven else i), False
            if i >= STATIC_BUCKETS and not fb.uneven and (segments is None or fb.chunked) \
                    and (shared := _shared_key(seg, (), args, 10)) is not None:
                key, dynamic = shared, True
            ok, out = self._try_compiled(seg, key, lambda: _segment(seg.transforms, seg.last), args,
                                         str([t.name for t in seg.transforms])
                                         + (" with a step count per param" if fb.uneven else ""), dynamic=dynamic)
            if ok:
                return ws if ws is not None else out
        if len(state) != len(keys) or fb.uneven:
            # (uneven: each param's update from its own step count, as numbers)
            return self._run_eager(seg, [fb], [None], [grad], [update], [resolved], [host_step], loss, {},
                                   [dtype])[0]
        return seg.eager_fn()([fb.flat_params], [grad], upd, state, resolved, resolved, host_step, loss, dtype,
                              False, segments, host_values=self._scale_values(seg, fb))

    def _run_per_tensor(self, seg: Segment, i: int, fb: FlatBucket, grad: Tensor, update: Tensor | None,
                        resolved: dict, tensor_hp: list, host_step: float, loss: Tensor | None,
                        dtype: torch.dtype) -> Tensor | None:
        """A segment compiled for one param at a time (a kernel per shape) over per-param views:
        transforms that are elementwise for other shapes only (Adafactor's factored matrices).
        Each param's update goes into its view of a kept flat buffer, which is returned."""
        _tensor_hp(tensor_hp, i, resolved, fb)
        host = seg.host(resolved)
        lossv = None if loss is None else _to(loss.detach(), fb.device)
        grads = fb.split(grad)
        ups = None if update is None else fb.split(update)
        flat_out = None if seg.last else fb.workspace(dtype, avoid=update)
        outs = None if flat_out is None else fb.split(flat_out)
        renames, values = _host_steps(seg, resolved, host_step, fb.device)
        values.update(self._scale_values(seg, fb))

        def make():
            return _segment(seg.transforms, seg.last)

        for j in range(len(fb.param_views)):
            p = fb.param_views[j]
            st = fb.states[j]
            state = _renamed({k: [st[k]] for k in seg.keys_of(st)}, renames)
            views = [p, grads[j], None if ups is None else ups[j], None if outs is None else outs[j]]
            if seg.tensor_view is not None and seg.per_tensor:
                shape = _tensor_view(seg, tuple(p.shape))
                views = [None if x is None else x.view(shape) for x in views]
            p, g, u, o = views
            args = ([p], [g], None if u is None else [u], state, tensor_hp[i], host, fb.flat_steps[j],
                    lossv, dtype, True, None, o, values)
            ok = False
            if self.compile:
                shape = tuple(p.shape)
                if shape in seg.static_shapes or len(seg.static_shapes) < PER_TENSOR_STATIC_SHAPES:
                    seg.static_shapes.add(shape)
                    key, dynamic = ("tensor", shape, p.dtype), False
                else:
                    key, dynamic = ("tensor", p.dim(), p.dtype), True
                ok, _ = self._try_compiled(seg, key, make, args,
                                           f"{[t.name for t in seg.transforms]} for shape {shape}", dynamic=dynamic)
            if not ok:
                make()(*args)
        return flat_out

    def _run_phased(self, seg: Segment, flats: list[FlatBucket], groups: list, grads: list[Tensor],
                    updates: list[Tensor | None], resolved: list[dict], tensor_hp: list, host_steps: list[float],
                    loss: Tensor | None, shared: dict, dtypes: list[torch.dtype]) -> list[Tensor | None]:
        """A phased transform (and its tail): ``prepare`` once, ``accumulate`` compiled per flat
        bucket, ``estimate`` once, ``finish`` with the tail and the write compiled per flat bucket."""
        t = seg.phased
        keys = [seg.keys(fb) for fb in flats]
        if any(k not in fb.flat_state for fb, ks in zip(flats, keys) for k in ks):
            return self._run_eager(seg, flats, groups, grads, updates, resolved, host_steps, loss, shared, dtypes)
        gstate = shared["global_state"]
        hps = [_phase_hyperparams(t, r) for r in resolved]
        c = t.prepare(hps, gstate)
        flags = [t.bucket_flags(hp) for hp in hps]
        live = [] if c is None else [i for i, f in enumerate(flags) if not f["frozen"]]
        thp = [{k: _tensorize(v, fb.device) for k, v in hp.items()} for hp, fb in zip(hps, flats)]
        for i, fb in enumerate(flats):
            _tensor_hp(tensor_hp, i, resolved[i], fb)
        lossv = None if loss is None else _to(loss.detach(), flats[0].device)
        coefs: dict[str, Any] = {}
        if live:
            device = flats[live[0]].device
            coefs = _coefs(c, device)
            acc = t.init_accumulators(c, device)
            for i in live:
                acc = self._call_phase(seg, "accumulate", i, flats[i], keys[i], grads[i], updates[i], thp[i],
                                       flags[i], coefs, acc, dtypes[i], tensor_hp[i], resolved[i], lossv)
            coefs = _coefs(t.estimate(c, acc, gstate), device)
        out: list[Tensor | None] = []
        for i, fb in enumerate(flats):
            if i in live or seg.tail or any(leaf.stateful for leaf in seg.head):
                # a frozen bucket (Prodigy's lr 0) gets zero updates; the leaves after it still run,
                # and a stateful one before it still takes its step
                name = "finish" if i in live else "frozen"
                out.append(self._call_phase(seg, name, i, fb, keys[i], grads[i], updates[i], thp[i], flags[i],
                                            coefs, None, dtypes[i], tensor_hp[i], resolved[i], lossv))
            else:  # a frozen bucket (lr 0): nothing moves
                out.append(None if seg.last else torch.zeros_like(grads[i], dtype=dtypes[i]))
        return out

    def _call_phase(self, seg: Segment, name: str, i: int, fb: FlatBucket, keys: set[str], grad: Tensor,
                    update: Tensor | None, hp: dict, flags: dict, coefs: dict, acc: Any, dtype: torch.dtype,
                    tensor_hp: dict, resolved: dict, loss: Tensor | None) -> Any:
        state = {k: [fb.flat_state[k]] for k in keys}
        host = seg.host(resolved)
        # the updates for the next segment go into a buffer of the bucket's, not a fresh one
        ws = None if seg.last or name == "accumulate" else fb.workspace(dtype, avoid=update)
        args = ([fb.flat_params], [grad], None if update is None else [update], state, hp, flags, coefs, acc, dtype,
                fb.flat_steps[0], tensor_hp, host, loss, fb.segments(), ws)

        def make():
            return _phase(seg.phased, seg.head, seg.tail, name, seg.last)

        key, dynamic = (name, i), False
        if i >= STATIC_BUCKETS and fb.chunked and (shared := _shared_key(seg, (name,), args, 13)) is not None:
            key, dynamic = shared, True  # (past the first few: as in _run_compiled)
        ok, out = (self._try_compiled(seg, key, make, args, f"{seg.phased.name}.{name}", dynamic=dynamic)
                   if self.compile else (False, None))
        if not ok:
            out = make()(*args)
        return ws if ws is not None else out

    @staticmethod
    def _try_compiled(seg: Segment, key: Any, make: Any, args: tuple, what: str,
                      dynamic: bool = False) -> tuple[bool, Any]:
        """Run the compiled form of ``make()`` for ``key`` (compiled at its first call). ``(False, None)``
        if that first tracing failed (warned once): the caller runs the same function uncompiled.
        With ``dynamic`` (sizes symbolic), a new size may trace again; if that fails, likewise."""
        if key in seg._failed:
            return False, None
        fn = seg._fns.get(key)
        first = fn is None
        if first:
            fn = seg._fns[key] = torch.compile(make(), fullgraph=True, dynamic=dynamic,
                                               backend=hoisting_backend(BACKEND))
        versions = _versions(args) if first else None
        try:
            t0 = time.perf_counter()
            graphs = _graph_count()
            try:
                out = fn(*args)
            finally:
                if first or dynamic:  # a call that may have traced (a new size traces again)
                    _forget_specialized_floats()
            if dynamic and _graph_count() > graphs:
                seg._traces[key] = n = seg._traces.get(key, 0) + 1
                if n > _RETRACES:
                    seg._retraced.add(key)
        except Exception as err:
            if getattr(err, "gb_type", None) == "Observed exception" and key not in seg._raised:
                # the traced code raised (a transform refusing a value): tracing runs nothing, so the
                # uncompiled run raises the same error, the transform's own, in place of dynamo's. If
                # it does not (code that raises only when traced), the next such trace falls back below
                seg._raised.add(key)
                return False, None
            # only a failure to trace or compile falls back to the uncompiled run, and only where nothing
            # was written: a kernel that failed while running (out of memory) may have updated some
            # params and state, and running the segment again would apply their update twice (the
            # step raises instead, and is rolled back)
            # (past dynamo's recompile limit, a call fails at its guards, before anything runs: a kernel
            # whose code reads a hyperparameter's value, float(hp["eps"]), recompiles for each new value)
            if not isinstance(err, _TRACING_ERRORS) or not (
                    first or dynamic or isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit)) or (
                    first and _versions(args) != versions):
                raise
            seg._failed.add(key)
            hint = ("; a hyperparameter read as a number in the update (float(hp[key]), .item()) compiles "
                    "again for each new value: use it as the 0-d tensor it is there, or declare it static"
                    if isinstance(err, torch._dynamo.exc.FailOnRecompileLimitHit) else "")
            warnings.warn(
                f"gradchain fused path: could not compile {what} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it runs eagerly "
                f"over the flat buffers instead{hint}",
                RuntimeWarning,
                stacklevel=5,
            )
            return False, None
        if first:
            seg.compile_seconds += time.perf_counter() - t0
        seg._raised.discard(key)
        return True, out

    def _run_eager(self, seg: Segment, flats: list[FlatBucket], groups: list, grads: list[Tensor],
                   updates: list[Tensor | None], resolved: list[dict], host_steps: list[float],
                   loss: Tensor | None, shared: dict, dtypes: list[torch.dtype]) -> list[Tensor | None]:
        buckets, inputs = [], []
        for i, fb in enumerate(flats):
            state = {}
            for key in set().union(*(st.keys() for st in fb.states)) - {"step"}:
                state[key] = fb.state_views.get(key) or [st.get(key) for st in fb.states]
            group = groups[i] if groups[i] is not None else {}
            steps = fb.flat_steps.tolist() if fb.uneven else [host_steps[i]] * len(fb.params)
            b = Bucket(fb.param_views, fb.split(grads[i]), state, fb.step_views, fb.names, group, loss, shared,
                       dtypes[i], step_values=steps, resolved=resolved[i])
            if updates[i] is not None:
                b.updates = fb.split(updates[i])
            inputs.append(list(b.updates))
            buckets.append(b)
        # in pieces of whole tensors on a CPU, which also write their params (seg.pieces)
        in_pieces = seg.pieces is not None and pieces.runs_here(buckets)
        if in_pieces:
            seg.pieces.step(buckets)  # type: ignore[union-attr]
        for t in () if in_pieces else seg.transforms:
            if _scales_only(t):  # its factors, worked out before the segments (step_scales)
                for b, fb in zip(buckets, flats, strict=True):
                    b.defer_scale(self._scales[t.name][fb])
            else:
                t.apply(buckets)
        out: list[Tensor | None] = []
        for i, (b, fb) in enumerate(zip(buckets, flats)):
            for key, lst in b.state.items():
                for st, t in zip(fb.states, lst):
                    if t is not None and st.get(key) is not t:
                        st[key] = t
            fb.resync_state()
            if seg.last:
                if not in_pieces and not _write_flat(b, fb, updates[i], inputs[i]):
                    b.write()
                out.append(None)
                continue
            ups = b.materialize()
            if updates[i] is not None and all(u is v for u, v in zip(ups, inputs[i])):
                out.append(updates[i])  # changed in place: the flat update already holds them
            elif (len(ups) == 1 and not fb.chunked and not fb.strided and ups[0].is_contiguous()
                  and _storage(ups[0]) not in b.kept_storages()):
                out.append(ups[0].view(-1))  # one param: its update is already flat, no copy
            else:
                # into a buffer the bucket keeps (not the one it came in)
                out.append(fb.join(ups, out=fb.workspace(ups[0].dtype, avoid=updates[i])) if ups
                           else grads[i].new_empty(0))
        return out


def _write_flat(b: Bucket, fb: FlatBucket, update: Tensor | None, inputs: list[Tensor]) -> bool:
    """The final write of an eager last segment as one op over the flat buffers, where its
    transforms only left a scale or a decay pending on the flat update they got (AdaLo's loss-driven
    lr): one pass, not a list op per param. False where the write needs the per-param form."""
    if (update is None or b.divisor is not None or b.toward is not None or isinstance(b.scale, list)
            or isinstance(b.decay, list) or fb.flat_params.dtype != update.dtype
            or len(b.updates) != len(inputs) or not all(u is v for u, v in zip(b.updates, inputs))):
        return False
    flat = Bucket([fb.flat_params], [update], {}, [], [None], {}, None, {}, update.dtype, step_values=[])
    flat.scale, flat.decay = b.scale, b.decay
    flat.write()  # over the gaps between params too, as a compiled last segment writes
    return True


def _shape_tests(transform: Transform) -> list:
    """The ``elementwise_for`` tests of a chain's top-level transforms (those the fused path cuts);
    none when a transform of the chain may reduce over every bucket (a global norm, AdamS's mean):
    routed apart, params of other shapes would be left out of its reduction."""
    inner = transform.inner if hasattr(transform, "sync_flat") else transform
    top = inner.children if isinstance(inner, Chain) else [inner]
    # a Leaf maps each bucket alone; step_scales are worked out over the buckets of every route at once
    if not all(isinstance(t, Leaf) or _scales_only(t) for t in top):
        return []
    return [t.elementwise_for for t in top if getattr(t, "elementwise_for", None) is not None]


# a chain with more top-level masks than this is not routed by them (2^n chains, each compiled)
MAX_ROUTED_MASKS = 2


def _masks_of(transform: Transform) -> list[_Masked]:
    """The top-level ``masked`` transforms by which the fused path routes a chain: each over leaves
    only, and every other top-level transform a leaf (a leaf maps each bucket alone, so splitting
    the params between routes changes nothing it computes)."""
    if hasattr(transform, "sync_flat") or not isinstance(transform, Chain):
        return []
    top = transform.children
    masks = [t for t in top if isinstance(t, _Masked)]
    if not masks or len(masks) > MAX_ROUTED_MASKS:
        return []
    for t in top:
        inner = t.children[True] if isinstance(t, _Masked) else t
        if not all(isinstance(x, Leaf) for x in (inner.children if isinstance(inner, Chain) else [inner])):
            return []
    if all(isinstance(t, _Masked) for t in top):
        return []  # a param that no mask selects would have no chain to write it
    return masks


def _unmasked(transform: Chain, masks: list[_Masked], on: tuple[bool, ...]) -> Chain:
    """``transform`` for the params that the masks select as in ``on``: a selected mask's transform
    in its place, an unselected one left out."""
    children: list[Transform] = []
    for t in transform.children:
        if isinstance(t, _Masked):
            if on[masks.index(t)]:
                children.append(t.children[True])
        else:
            children.append(t)
    return Chain(children, transform.name, share=transform.shared_keys)


class FusedRoutes:
    """Params routed to flat buckets of their own, a :class:`FusedChain` each.

    A chain that is one ``partition`` routes by label (Muon's matrices and the AdamW rest are two
    buckets, each compiled). A chain with top-level ``masked`` transforms routes by what they
    select: the selected params get a chain with the masked transform in its place, the others
    one without it (CPR on matrices only). A chain with ``elementwise_for`` transforms routes by shape: params
    that pass every test go where those transforms compile over the flat buffer ("flat"); large
    ones that fail go where they compile one param at a time ("tensor"); the rest go where they
    run eagerly ("eager"). A route is ``(label, shapes)``; either part is None
    where it does not apply.
    """

    def __init__(self, transform: Transform) -> None:
        inner = transform.children[0] if isinstance(transform, Chain) and len(transform.children) == 1 else transform
        self.partition = inner if isinstance(inner, _Partition) else None
        self.masks = _masks_of(transform) if self.partition is None else []
        if self.partition is not None:
            children = dict(self.partition.children)
        elif self.masks:
            children = {on: _unmasked(transform, self.masks, on)
                        for on in itertools.product((True, False), repeat=len(self.masks))}
        else:
            children = {None: transform}
        self.tests = {label: _shape_tests(child) for label, child in children.items()}
        self.chains: dict[tuple, FusedChain] = {}
        for label, child in children.items():
            for shapes in (("flat", "tensor", "eager") if self.tests[label] else (None,)):
                self.chains[(label, shapes)] = FusedChain(child, shapes=shapes)
        self.all_eager = all(c.all_eager for c in self.chains.values())
        self.takes_uneven_steps = all(c.takes_uneven_steps for c in self.chains.values())
        self.keeps_layouts = all(c.keeps_layouts for c in self.chains.values())
        self._routes: dict[tuple, str] = {}

    def label(self, name: str | None, param: Tensor) -> tuple:
        """The param's route: its partition label (from the partition's own cache, as its eager
        apply routes) and, for ``elementwise_for`` transforms, where its shape goes."""
        if self.partition is not None:
            label = self.partition._cached_route(name, param)
        elif self.masks:
            label = tuple(m._cached_route(name, param) for m in self.masks)
        else:
            label = None
        tests = self.tests.get(label)
        if not tests:
            return (label, None)
        key = (label, param.shape)
        route = self._routes.get(key)
        if route is None:
            if all(test(tuple(param.shape)) for test in tests):
                route = "flat"
            elif param.numel() >= PER_TENSOR_MIN_NUMEL and param.dim() > 0:
                # (a 0-d param as a graph input of its own may be specialized into a number by
                # torch 2.13 when it is float64, and its in-place write lost)
                route = "tensor"
            else:
                route = "eager"
            self._routes[key] = route
        return (label, route)

    @property
    def compile_seconds(self) -> float:
        return sum(c.compile_seconds for c in self.chains.values())

    def describe(self) -> list[tuple[str, list[str]]]:
        """Each route's segments, the transform names prefixed with ``label/`` (a partition) and
        ``[flat]``, ``[tensor]`` or ``[eager]`` (where params go by shape)."""
        plan = []
        for (label, shapes), c in self.chains.items():
            if self.masks:  # which masked transforms this route's params get: +cpr, -cpr
                label = ",".join(("+" if on else "-") + m.children[True].name for m, on in zip(self.masks, label))
            prefix = ("" if label is None else f"{label}/") + ("" if shapes is None else f"[{shapes}]")
            plan += [(kind, [prefix + n for n in names]) for kind, names in c.describe()]
        return plan


def fused_chain(transform: Transform) -> FusedChain | FusedRoutes:
    """The fused form of a chain: routed (:class:`FusedRoutes`) when it is one ``partition`` or has
    ``elementwise_for`` transforms, else one :class:`FusedChain`."""
    inner = transform.children[0] if isinstance(transform, Chain) and len(transform.children) == 1 else transform
    if isinstance(inner, _Partition) or _masks_of(transform) or _shape_tests(transform):
        return FusedRoutes(transform)
    return FusedChain(transform)
