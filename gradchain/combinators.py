"""Transforms that take transforms: masked, partition, accumulate, apply_if_finite.

They nest freely, keep the inner leaves' state names (``"<leaf>.<buffer>"``), and declare the
union of their children's hyperparameters. Schedules of any hyperparameter are in
:mod:`gradchain.schedules`.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._dtensor import plain, replicate_like, some_shard_empty
from .base import (
    Bucket,
    StateDict,
    Transform,
    check_unique_names,
    compute_dtype,
    merge_hyperparams,
    resolve_group,
    scalar_state,
    zeros_state,
)
from .hyperparams import check_name

__all__ = ["accumulate", "apply_if_finite", "masked", "partition"]

Selector = Callable[[str, Tensor], Any]


def _needs_name(kind: str, name: str | None, param: Tensor) -> str:
    if name is None:
        raise ValueError(
            f"{kind} selects params by name, but a param of shape {tuple(param.shape)} has none; "
            "pass model.named_parameters() to the optimizer"
        )
    return name


class _NameMatch:
    """``(name, param) -> bool``: the name is one of ``patterns`` (exact names or globs), or, with
    ``negate``, none of them. A param without a name is an error naming ``kind``. Picklable."""

    def __init__(self, patterns: str | Iterable[str], kind: str = "masked()", negate: bool = False) -> None:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        self.exact = {p for p in pats if not any(c in p for c in "*?[")}
        self.globs = [p for p in pats if p not in self.exact]
        self.kind, self.negate = kind, negate

    def __call__(self, name: str | None, param: Tensor) -> bool:
        name = _needs_name(self.kind, name, param)
        hit = name in self.exact or any(fnmatch.fnmatchcase(name, g) for g in self.globs)
        return hit != self.negate


class _Routing(Transform):
    """Shared machinery: route each param of a bucket to a child, run children on sub-buckets."""

    children: dict[Any, Transform]

    def _route(self, name: str | None, param: Tensor) -> Any:
        raise NotImplementedError

    def _cached_route(self, name: str | None, param: Tensor) -> Any:
        # keyed by the param itself, weakly: an entry goes with its param, and a new param that
        # reuses a freed one's address is routed afresh
        by_name = self._cache.get(param)
        if by_name is None:
            by_name = self._cache[param] = {}
        if name not in by_name:
            by_name[name] = self._route(name, param)
        return by_name[name]

    def _routes(self, b: Bucket) -> list:
        """Each param's label in ``b``. A step's buckets hold the last step's params, so the labels
        are kept per bucket and reused when it holds the same params (by identity, through weak
        references: a new param at a freed one's address is routed afresh) under the same names:
        a lookup per param is a few us, which on thousands of small tensors is a visible share of
        the step."""
        if torch.compiler.is_compiling():
            # traced (a user's compiled step): the labels are worked out while tracing, from names and
            # shapes the graph's guards hold; the caches' weak references would break the graph
            return [self._route(n, p) for n, p in zip(b.names, b.params)]
        key = (len(b.params), id(b.params[0]) if b.params else None)
        last = self._by_bucket.get(key)
        if (last is not None and last[1] == b.names
                and all(map(operator.is_, map(weakref.ref.__call__, last[0]), b.params))):
            return last[2]
        labels = [self._cached_route(n, p) for n, p in zip(b.names, b.params)]
        if len(self._by_bucket) >= 16:  # buckets of param groups come and go: keep a few
            self._by_bucket.clear()
        self._by_bucket[key] = ([weakref.ref(p) for p in b.params], list(b.names), labels)
        return labels

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        label = self._route(name, param)
        child = self.children.get(label)
        return child.init_state(param, name) if child is not None else {}

    def apply(self, buckets: list[Bucket]) -> None:
        self.apply_routed(buckets, lambda child, subs: child.apply(subs))

    def apply_routed(self, buckets: list[Bucket], run: Callable[[Transform, list[Bucket]], None],
                     *, written: bool = False) -> list[set[int]]:
        """``run(child, sub-buckets)`` for each child over the params routed to it, their updates and
        state then written back (the eager pieces run a child chain piece by piece this way). With
        ``written`` the children wrote their params: only their state comes back. Returns, per
        bucket, the indices of the params routed to a child."""
        routed: list[set[int]] = [set() for _ in buckets]
        labels = [self._routes(b) for b in buckets]
        for label, child in self.children.items():
            subs, where = [], []
            for j, b in enumerate(buckets):
                idx = [i for i, x in enumerate(labels[j]) if x == label]
                if idx:
                    subs.append(b.subset(idx))
                    where.append((b, idx))
                    routed[j].update(idx)
            if subs:
                try:
                    run(child, subs)
                except Exception as e:
                    self.explain_state_of_other_routes(
                        label, ((p, n, [k for k, v in b.state.items() if v[i] is not None])
                                for b in subs for i, (p, n) in enumerate(zip(b.params, b.names))), e)
                    raise
                for sub, (b, idx) in zip(subs, where):
                    b.absorb(sub, idx, updates=not written)
        return routed

    def explain_state_of_other_routes(self, label: Any, entries: Iterable[tuple[Tensor, str | None, list[str]]],
                                      error: Exception) -> None:
        """Raise a clear error in place of ``error`` if a param routed to ``label`` holds state that only
        another route's transforms make (its route changed during the run: a param renamed under a
        route by name), and none that its own route's make: ``label``'s transforms then fail on the
        entries it lacks. ``entries``: ``(param, name, its state keys)``."""
        own = {n for path in self.children[label].paths() for n in path}
        others = {n for other, child in self.children.items() if other != label
                  for path in child.paths() for n in path} - own
        for p, name, keys in entries:
            foreign = sorted(k for k in keys if k.split(".", 1)[0] in others)
            if foreign and not any(k.split(".", 1)[0] in own for k in keys):
                who = name if name is not None else f"of shape {tuple(p.shape)}"
                raise ValueError(
                    f"{self.name}(): param {who} is routed to {label!r}, but its state ({', '.join(foreign)}) "
                    f"was made by another route's transforms: a param's route must stay the same during a "
                    f"run (a renamed param can change it). Keep its name, or start its state afresh "
                    f"(del opt.state[param])"
                ) from error

    def leaves(self) -> Iterator[Transform]:
        for child in self.children.values():
            yield from child.leaves()

    def paths(self) -> list[list[str]]:
        return [p for child in self.children.values() for p in child.paths()]

    def validate_group(self, group: Mapping[str, Any]) -> None:
        for child in self.children.values():
            child.validate_group(group)

    def check_routes(self, named: Sequence[tuple[str | None, Tensor]]) -> None:
        by_label: dict[Any, list] = {}
        for name, p in named:
            by_label.setdefault(self._cached_route(name, p), []).append((name, p))
        for label, part in by_label.items():
            if label in self.children:
                self.children[label].check_routes(part)

    def _setup(self, name: str, children: dict[Any, Transform]) -> None:
        self.name = name
        self.children = children
        self._cache = WeakIdKeyDictionary()
        self._by_bucket: dict[tuple, tuple] = {}
        check_unique_names(self, f"{name}()")
        self.hyperparams = merge_hyperparams(list(children.values()))
        self.extra_defaults = {}
        self.shared_keys = frozenset().union(*(c.shared_keys for c in children.values()))
        self.fixed_options = {}
        for c in children.values():
            self.extra_defaults.update(c.extra_defaults)
            self.fixed_options.update(c.fixed_options)

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cache"] = None
        d["_by_bucket"] = None
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = WeakIdKeyDictionary()
        self._by_bucket = {}


class _Masked(_Routing):
    def __init__(self, inner: Transform, select: Callable[[str | None, Tensor], bool]) -> None:
        self._select = select
        self._setup("masked", {True: inner})

    def _route(self, name: str | None, param: Tensor) -> Any:
        return bool(self._select(name, param))

    def paths(self) -> list[list[str]]:
        return [[], *self.children[True].paths()]

    def renamed(self, mapping: Mapping[str, str]) -> _Masked:
        return _Masked(self.children[True].renamed(mapping), self._select)


class _AsBool:
    """A user predicate whose result is taken as a bool (a class, not a closure: it pickles)."""

    def __init__(self, predicate: Selector) -> None:
        self.predicate = predicate

    def __call__(self, name: str | None, param: Tensor) -> bool:
        return bool(self.predicate(name, param))


def masked(inner: Transform, mask: Selector | str | Iterable[str]) -> Transform:
    """Apply ``inner`` only to the selected params; the others' updates pass through unchanged.

    ``mask`` is a predicate ``(name, param) -> bool``, or a name / glob pattern / collection of
    them (``"*.bias"``). Unselected params get no state from ``inner``. Example, no weight decay on
    biases and norm gains: ``masked(add_decoupled_wd(0.1), lambda name, p: p.ndim >= 2)``.
    Peer: optax ``masked``.
    """
    if not isinstance(inner, Transform):
        raise TypeError(f"masked() takes a transform, got {type(inner).__name__} (a factory not called?)")
    if callable(mask):
        select = _AsBool(mask)
    else:
        select = _NameMatch(mask)
    return _Masked(inner, select)


class _Partition(_Routing):
    def __init__(self, transforms: Mapping[Any, Transform], labels: Selector | Mapping[str, Any]) -> None:
        if not transforms:
            raise ValueError("partition() needs at least one transform")
        bad = {k: type(t).__name__ for k, t in transforms.items() if not isinstance(t, Transform)}
        if bad:
            raise TypeError(f"partition() takes a transform per label, got {bad} (a factory not called?)")
        self._labels = labels
        self._setup("partition", dict(transforms))

    def _route(self, name: str | None, param: Tensor) -> Any:
        if callable(self._labels):
            label = self._labels(name, param)
        else:
            label = self._labels.get(_needs_name("partition()", name, param))
        if label not in self.children:
            who = name if name is not None else f"of shape {tuple(param.shape)}"
            raise ValueError(
                f"partition(): param {who} has label {label!r}, which is none of {sorted(map(str, self.children))}"
            )
        return label

    def renamed(self, mapping: Mapping[str, str]) -> _Partition:
        return _Partition({k: t.renamed(mapping) for k, t in self.children.items()}, self._labels)


def partition(transforms: Mapping[Any, Transform], labels: Selector | Mapping[str, Any]) -> Transform:
    """Send each param to exactly one transform, chosen by its label.

    ``labels`` is ``(name, param) -> label`` or a dict ``name -> label``. A param whose label is
    not a key of ``transforms`` is an error that names it. Children that declare the same
    hyperparameter key share it; give them separate keys with ``.renamed({...})``.
    Peer: optax ``partition`` (formerly ``multi_transform``).
    """
    return _Partition(transforms, labels)


# -- helpers for the wrappers below ---------------------------------------------------------------
class _Like:
    """A plain 0-d tensor, handed out on each target's device/dtype (a replicated DTensor for DTensors)."""

    def __init__(self, value: Tensor) -> None:
        self.value = value
        self._cache: dict[tuple, Tensor] = {}

    def like(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        mesh = getattr(t, "device_mesh", None)
        key = (t.device, id(mesh), dtype)
        if key not in self._cache:
            self._cache[key] = replicate_like(self.value.to(device=t.device, dtype=dtype or self.value.dtype), t)
        return self._cache[key]


class _Wrapper(Transform):
    """One inner transform plus state of the wrapper's own (keys ``"<name>.<buffer>"``)."""

    inner: Transform

    def _setup(self, inner: Transform, name: str) -> None:
        if not isinstance(inner, Transform):
            raise TypeError(f"{type(self).__name__} wraps a gradchain Transform, got {type(inner).__name__}")
        self.inner = inner
        self.name = check_name(name)
        self.hyperparams = dict(inner.hyperparams)
        self.extra_defaults = dict(inner.extra_defaults)
        self.fixed_options = dict(inner.fixed_options)
        self.shared_keys = inner.shared_keys
        check_unique_names(self, f"{name}()")

    def leaves(self) -> Iterator[Transform]:
        yield self  # it keeps state of its own: a chain without it is a different chain
        yield from self.inner.leaves()

    def paths(self) -> list[list[str]]:
        return [[self.name, *p] for p in self.inner.paths()]

    def validate_group(self, group: Mapping[str, Any]) -> None:
        self.inner.validate_group(group)

    def check_routes(self, named: Sequence[tuple[str | None, Tensor]]) -> None:
        self.inner.check_routes(named)

    def _own_state(self, param: Tensor) -> StateDict:
        raise NotImplementedError

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        st = self.inner.init_state(param, name)
        st.update({f"{self.name}.{k}": v for k, v in self._own_state(param).items()})
        return st

    def _mine(self, b: Bucket, buffer: str) -> list[Tensor]:
        return b.state[f"{self.name}.{buffer}"]


# -- accumulate ---------------------------------------------------------------------------------
def _micro_weight(batch_size: Any) -> float | Tensor:
    """``step(batch_size=)`` as a float (a number) or a 0-d tensor (used as one: no host read); 1 if None."""
    if batch_size is None:
        return 1.0
    if isinstance(batch_size, Tensor):
        if batch_size.numel() != 1 or batch_size.is_complex() or batch_size.dtype == torch.bool:
            raise ValueError(f"invalid batch_size={batch_size!r}: must be one real number")
        w = batch_size.detach().reshape(())
        if w.device.type == "cpu" and not (torch.isfinite(w) and w >= 0):  # no host read on a device
            raise ValueError(f"invalid batch_size={batch_size!r}: must be a finite number >= 0")
        return w
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, float)) or not (
        math.isfinite(batch_size) and batch_size >= 0
    ):
        raise ValueError(f"invalid batch_size={batch_size!r}: must be a finite number >= 0 (a sample or token count)")
    return float(batch_size)


class _Accumulate(_Wrapper):
    reads_batch_size = True  # ChainOptimizer.step(batch_size=) is refused by chains without one

    def __init__(self, inner: Transform, steps: int, name: str) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"invalid steps={steps!r}: accumulate() needs an int >= 1")
        self.every = steps
        self._setup(inner, name)
        # leaves that read a step count outside a step (schedule-free's eval_weight) need the count
        # their schedules saw: this wrapper's, unless an accumulate nested inside already counts for them
        key = f"{self.name}.step"
        for leaf in inner.leaves():
            keys = getattr(leaf, "step_keys", None)
            if isinstance(keys, tuple) and key not in keys:
                leaf.step_keys = (*keys, key)

    def renamed(self, mapping: Mapping[str, str]) -> _Accumulate:
        return _Accumulate(self.inner.renamed(mapping), self.every, self.name)

    def _own_state(self, param: Tensor) -> StateDict:
        return {
            "grad": zeros_state(param),  # sum of w_i * u_i over the cycle's micro-steps
            "weight": scalar_state(param),  # sum of w_i
            "loss": scalar_state(param),  # sum of w_i * L_i over the micro-steps that passed a loss
            "loss_weight": scalar_state(param),  # sum of w_i over those
            # the inner transforms' step count (real steps); on the host, as the optimizer's "step"
            "step": torch.zeros((), dtype=compute_dtype(param.dtype)),
            # on the host too, read every call without a device sync: this cycle's micro-steps,
            # +1 each that passed batch_size and -1 each that did not (a cycle may not mix them) ...
            "sized_calls": torch.zeros((), dtype=torch.float64),
            # ... and the sum of their batch sizes known on the host (NaN once one was a device tensor)
            "host_weight": torch.zeros((), dtype=torch.float64),
        }

    def _host(self, b: Bucket, buffer: str) -> list[Tensor]:
        ts = self._mine(b, buffer)
        for i, t in enumerate(ts):
            if t.device.type != "cpu":  # moved to the param's device by a checkpoint load: once
                ts[i] = t.cpu()
        return ts

    def _inner_steps(self, b: Bucket) -> list[Tensor]:
        return self._host(b, "step")

    def _inner_values(self, b: Bucket) -> dict[str, Any] | None:
        """The inner chain's hyperparameters at the real step it is about to take (its schedules see
        that count), checked; None where the bucket carries no group values (they resolve inside)."""
        if not self.inner.hyperparams.keys() <= b.group.keys():
            return None
        step = int(max(torch.stack(self._inner_steps(b)).tolist())) + 1
        return resolve_group(self.inner, b.group, step)

    def _refuse(self, live: list[Bucket], sized: bool, host_w: float, real: bool) -> None:
        """Raise, before any state moves, for a cycle that mixes sized and unsized calls or weighs 0."""
        calls = torch.stack([t for b in live for t in self._host(b, "sized_calls")]).tolist()
        problem = None
        if (sized and min(calls) < 0) or (not sized and max(calls) > 0):
            problem = (
                "step(batch_size=) was passed on some micro-steps of this accumulation cycle and not on "
                "others; pass it on every call or never (the weights would mix sample counts with 1s)"
            )
        elif sized and real:
            totals = torch.stack([t for b in live for t in self._host(b, "host_weight")]).tolist()
            if any(t + host_w == 0 for t in totals):
                problem = (
                    f"the batch sizes of this accumulation cycle's {self.every} micro-steps sum to 0: "
                    "the mean gradient is 0/0; at least one micro-batch needs batch_size > 0"
                )
        if problem is not None:
            raise ValueError(f"{self.name}(): {problem}")

    def _add(self, b: Bucket, w: float | Tensor) -> None:
        """Add this micro-step: ``grad += w u``, ``weight += w``, ``loss += w L``, ``loss_weight += w``."""
        u = b.materialize()
        acc, wsum = self._mine(b, "grad"), self._mine(b, "weight")
        if isinstance(w, Tensor):
            wt = _Like(w)
            torch._foreach_add_(acc, torch._foreach_mul(u, [wt.like(a, a.dtype) for a in acc]))
            torch._foreach_add_(wsum, [wt.like(x, x.dtype) for x in wsum])
        else:
            torch._foreach_add_(acc, u, alpha=w)
            torch._foreach_add_(wsum, w)
        if b.loss is not None:
            lsum, lw = self._mine(b, "loss"), self._mine(b, "loss_weight")
            wl = _Like(b.loss.detach().reshape(()) * w)
            torch._foreach_add_(lsum, [wl.like(x, x.dtype) for x in lsum])
            if isinstance(w, Tensor):
                wt = _Like(w)
                torch._foreach_add_(lw, [wt.like(x, x.dtype) for x in lw])
            else:
                torch._foreach_add_(lw, w)

    def apply(self, buckets: list[Bucket]) -> None:
        if torch.compiler.is_compiling():
            # traced (a user's torch.compile of the step): whether the inner chain steps is a host
            # branch on the count of calls, so the whole accumulation runs outside the graph
            return self._apply_outside_graph(buckets)
        self._apply(buckets)

    @torch.compiler.disable
    def _apply_outside_graph(self, buckets: list[Bucket]) -> None:
        # outside the graph this is an eager step: host step numbers and schedules, as the inner
        # chain's own step counts are (a traced bucket's rules would take them for tensors)
        traced = [b.tensor_scalars for b in buckets]
        for b in buckets:
            b.tensor_scalars = False
        try:
            self._apply(buckets)
        finally:
            for b, t in zip(buckets, traced, strict=True):
                b.tensor_scalars = t
        for b in buckets:
            # the update formed here: a pending scale or divisor (the inner chain's lr and bias
            # corrections, numbers that change at every step) would each compile the graph again
            if len(b):
                b.materialize()

    def _apply(self, buckets: list[Bucket]) -> None:
        live = [b for b in buckets if len(b)]
        if not live:
            return
        # the phase is global (the most micro-steps any param has seen), so params stay in step
        calls = round(float(max(max(b.step_values) for b in live)))
        sized = live[0].batch_size is not None  # one step(batch_size=) for every bucket
        real = calls % self.every == 0
        try:
            w = _micro_weight(live[0].batch_size)
            host_w = float(w) if not isinstance(w, Tensor) or w.device.type == "cpu" else math.nan
            self._refuse(live, sized, host_w, real)
            # the inner chain's values at its own (real) step, resolved and checked before anything moves
            inner = [self._inner_values(b) for b in live] if real else []
        except ValueError:
            for b in live:  # a refused call never happened: the optimizer's step counters go back too
                torch._foreach_sub_(b.steps, 1.0)
                b.step_values = [v - 1.0 for v in b.step_values]
            raise
        for b in live:
            self._add(b, w)
            torch._foreach_add_(self._host(b, "sized_calls"), 1.0 if sized else -1.0)
            torch._foreach_add_(self._host(b, "host_weight"), host_w)
        if calls % self.every:
            for b in live:  # a mini-step: the write adds 0 * acc, i.e. nothing; inner not called
                b.updates = b.lend(list(self._mine(b, "grad")))
                b.defer_scale(0.0)
            return
        saved = []
        for b in live:
            acc, wsum = self._mine(b, "grad"), self._mine(b, "weight")
            g = torch._foreach_div(acc, wsum)
            loss = None
            if b.loss is not None:
                lsum, lw = self._mine(b, "loss"), self._mine(b, "loss_weight")
                loss = plain(lsum[0] / lw[0])
            for k in ("grad", "weight", "loss", "loss_weight", "sized_calls", "host_weight"):
                torch._foreach_zero_(self._mine(b, k))
            steps = self._inner_steps(b)
            torch._foreach_add_(steps, 1.0)
            saved.append((b.grads, b.steps, b.step_values, b.loss, b.resolved))
            # the inner chain sees the large batch: its mean gradient (as raw grads too), loss, steps;
            # its schedules are evaluated at its own step count
            b.grads, b.updates, b.steps, b.loss = g, list(g), steps, loss
            b.step_values = torch.stack(steps).tolist()
        for b, values in zip(live, inner, strict=True):
            b.resolved = values
        try:
            self.inner.apply(live)
        finally:
            for b, (grads, steps, values, loss, resolved) in zip(live, saved, strict=True):
                b.grads, b.steps, b.step_values, b.loss, b.resolved = grads, steps, values, loss, resolved


def accumulated_keys(t: Transform) -> dict[str, int]:
    """The group keys read only inside ``accumulate``: each with the calls per step of the inner
    chain that reads it (the smallest where several do). Their schedules see that chain's count."""
    reads: dict[str, list[int]] = {}

    def walk(node: Transform, k: int) -> None:
        if isinstance(node, _Accumulate):
            k *= node.every
        children = getattr(node, "children", None)
        kids = list(children.values()) if isinstance(children, Mapping) else list(children or ())
        inner = getattr(node, "inner", None)
        if isinstance(inner, Transform):
            kids.append(inner)
        below = set().union(*(c.hyperparams for c in kids))
        for key in node.hyperparams:
            if key not in below:  # read by this node itself (a leaf, Lookahead's own keys)
                reads.setdefault(key, []).append(k)
        for c in kids:
            walk(c, k)

    walk(t, 1)
    return {key: min(ks) for key, ks in reads.items() if min(ks) > 1}


def accumulate(inner: Transform, steps: int, *, name: str = "accumulate") -> Transform:
    """Gradient accumulation inside the optimizer: ``inner`` steps once every ``steps`` calls.

    Each ``step()`` adds the micro-batch update ``u_i`` (the gradient, when ``accumulate`` is
    outermost) with weight ``w_i``: the ``batch_size=`` given to ``ChainOptimizer.step`` (its
    sample or token count, a number or a 0-d tensor), 1 if not given. Every ``steps``-th call
    runs ``inner`` on ``sum w_i u_i / sum w_i`` -- for micro-batch losses that are means over
    their samples this is the gradient of the large batch's mean loss -- with the loss
    ``sum w_i L_i / sum w_i`` (over the calls that passed one, if this call passes one) and with
    its own step count (real steps: what its bias corrections and schedules see). The other calls
    change no parameter and no inner state. State: ``grad`` (1x), ``weight``, ``loss``,
    ``loss_weight``, ``step`` and, on the host, ``sized_calls`` and ``host_weight``; a real step
    eagerly also holds the mean (1x) while ``inner`` runs.

    Put the whole chain inside (``accumulate(recipes.adamw(...), 4)``): a transform after it
    would also act on the mini-steps. Call a torch LR scheduler once per ``steps`` calls. The phase
    is global (the largest optimizer step count among the params); a param whose grad is None
    in a micro-step is averaged over the micro-steps it took part in (use
    ``zero_grad(set_to_none=False)`` to count it as a zero gradient, as the large batch does).
    Pass ``batch_size=`` on every call or never: a cycle that mixes both, or whose batch sizes
    sum to 0, raises ``ValueError`` and the call changes nothing (with 0-d tensor batch sizes on a
    device the zero sum is not seen without a sync: the update is then NaN, for
    ``apply_if_finite``). See docs/concepts.md (Combinators). Peer: optax ``MultiSteps`` (which
    takes the plain mean of the micro-batch gradients).
    """
    return _Accumulate(inner, steps, name)


# -- apply_if_finite ------------------------------------------------------------------------------
class _ApplyIfFinite(_Wrapper):
    def __init__(self, inner: Transform, max_consecutive_errors: int | None, name: str) -> None:
        m = max_consecutive_errors
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"invalid max_consecutive_errors={m!r}: must be an int >= 0 or None")
        self.max_errors = m
        self._setup(inner, name)
        self._inner_names = {n for path in inner.paths() for n in path}
        self._buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def renamed(self, mapping: Mapping[str, str]) -> _ApplyIfFinite:
        return _ApplyIfFinite(self.inner.renamed(mapping), self.max_errors, self.name)

    def _own_state(self, param: Tensor) -> StateDict:
        return {"notfinite_count": scalar_state(param), "total_notfinite": scalar_state(param)}

    def _owned(self, key: str) -> bool:
        return key.split(".", 1)[0] in self._inner_names

    def apply(self, buckets: list[Bucket]) -> None:
        live = [b for b in buckets if len(b)]
        if not live:
            self.inner.apply(buckets)
            return
        # copy every state the inner chain may change into buffers kept from step to step (a fresh
        # full-size allocation per step costs page faults on CPU); the step counters are undone by
        # arithmetic
        snaps = []
        for b in live:
            keys = [k for k in b.state if self._owned(k)]
            snaps.append({k: [None if t is None else self._saved(t) for t in b.state[k]] for k in keys})
        gstate = live[0].shared.get("global_state")
        gstate = gstate if isinstance(gstate, dict) else {}
        gsnap = {k: self._saved(v) for k, v in gstate.items() if isinstance(v, Tensor) and self._owned(k)}

        self.inner.apply(buckets)

        flags = []
        for b in live:
            u = [x for x in b.materialize() if x.numel()]
            # (an empty shard under FSDP2 has no max norm: its tensor is checked entry by entry; a
            # bucket is all sharded or all plain, so plain ones skip the test per tensor)
            empty = [x for x in u if some_shard_empty(x)] if u and hasattr(u[0], "device_mesh") else []
            whole = [x for x in u if all(x is not y for y in empty)] if empty else u
            if whole:
                norms = torch._foreach_norm(whole, math.inf)  # inf or nan iff some entry is
                flags.append(plain(torch.isfinite(torch.stack(norms)).all()))
            flags += [plain(torch.isfinite(x).all()) for x in empty]
        dev = flags[0].device if flags else live[0].steps[0].device
        # the one host read of a finite step: a finite step then costs nothing more
        ok = bool(torch.stack([f.to(dev) for f in flags]).all()) if flags else True
        for b, snap in zip(live, snaps, strict=True):
            counts = self._mine(b, "notfinite_count")
            if ok:
                torch._foreach_zero_(counts)
                continue
            b.updates = [torch.zeros_like(x) for x in b.updates]
            for k, olds in snap.items():
                for cur, old in zip(b.state[k], olds, strict=True):
                    if cur is not None and old is not None:
                        cur.copy_(old)
            torch._foreach_add_(self._mine(b, "total_notfinite"), 1.0)
            torch._foreach_add_(counts, 1.0)
            torch._foreach_sub_(b.steps, 1.0)
            b.step_values = [v - 1.0 for v in b.step_values]
        if ok:
            return
        for k, old in gsnap.items():
            gstate[k].copy_(old)
        count = float(plain(self._mine(live[0], "notfinite_count")[0]))
        if self.max_errors is not None and count > self.max_errors:
            raise RuntimeError(
                f"apply_if_finite: {int(count)} consecutive steps had a non-finite update "
                f"(max_consecutive_errors={self.max_errors}); params and state are those of the last "
                "finite step"
            )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_buffers"] = None  # workspaces, not state: a copy starts without them
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._buffers = WeakIdKeyDictionary()

    def _saved(self, t: Tensor) -> Tensor:
        """A copy of ``t`` in a buffer kept for ``t`` (weakly: it goes when ``t`` goes)."""
        buf = self._buffers.get(t)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            buf = self._buffers[t] = torch.empty_like(t)
        return buf.copy_(t)


def apply_if_finite(
    inner: Transform, max_consecutive_errors: int | None = 5, *, name: str = "apply_if_finite"
) -> Transform:
    """Skip a step whose update is not finite: params and every state stay as they were.

    ``inner`` runs; if any entry of the final update of any param is inf or NaN, the update is
    replaced by zero and every state ``inner`` keeps (moments, loss EMAs, its step counters and
    those of the optimizer) is restored, with ``torch.where``, from a copy taken before the step
    (cost: one copy of the inner state per step, into buffers kept between steps; a finite step
    then reads its update once more and nothing else). ``notfinite_count`` counts consecutive skipped
    steps (0 after a finite one), ``total_notfinite`` all of them. When ``notfinite_count``
    exceeds ``max_consecutive_errors`` (``None``: never) the step is skipped and ``RuntimeError``
    is raised. One host read per step (two numbers): the step counters are host tensors and
    the raise needs the count. Wrap the whole chain; inside ``accumulate`` it guards each real
    step, outside it also drops a non-finite micro-batch. Peer: optax ``apply_if_finite`` (which
    applies the update after too many errors instead of raising).
    """
    return _ApplyIfFinite(inner, max_consecutive_errors, name)
