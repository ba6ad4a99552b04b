"""ChainOptimizer: a torch.optim.Optimizer that runs a transform over buckets of params."""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from copy import deepcopy
from itertools import compress, repeat
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import pieces
from .base import Bucket, Transform, compute_dtype, initializing_for, resolve_group
from .combinators import accumulated_keys
from .fused import FlatBucket, FusedRoutes, fused_chain, step_scales
from .fused.flat import aliased, dense, foreign_views, mark_flat
from .fused.runner import STATIC_BUCKETS
from .pieces import PiecewiseChain
from .schedules import decode_groups, encode_groups

__all__ = ["ChainOptimizer", "FusedGradientCopyWarning"]

# keys torch's LR schedulers (swa_utils.SWALR's too) write into param groups
_SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr", "initial_momentum", "swa_lr"}
)
_GROUP_KEYS = frozenset({"params", "param_names"})
_OPTIONS = frozenset({"transform", "fused", "atomic", "state_dtype"})  # ChainOptimizer's own arguments
# optimizer-level state travels in the state dict as entries of the first param's state, so that
# torch.distributed.checkpoint (which keeps only "state" and "param_groups") carries it too
_GLOBAL = "@global."
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_UNEVEN_STEPS = ("its params have taken different numbers of steps (a param had no grad at a step and was "
                 "skipped, as torch does; the bucket stays eager from then on. To keep the fused path, give "
                 "every param a grad at every step: opt.zero_grad() keeps the grads, as zeros)")
# on the fused path, after this many steps in a row whose grads were new tensors (copied into the
# flat buffer), a warning says how to keep them views
COPIED_GRADS_WARN_STEPS = 3
# after this many steps in a row at which the same params of a flat bucket have no grad, the bucket
# is made again without them (before, such a step is eager over the bucket's flat buffers)
SUBSET_FLATTEN_STEPS = 3


def _check_grad(p: Tensor, g: Tensor, name: str | None) -> None:
    """Refuse a gradient that breaks torch's own rule for ``p.grad = g``: the param's shape and
    device, and its ``grad_dtype`` (by default the param's dtype; any floating dtype where it is
    None). Only ``p.grad.data = x``, or a module's ``_apply`` between backward and step, gets past
    that rule; a step would fail part-way on such a grad, or broadcast it."""
    want = getattr(p, "grad_dtype", p.dtype)
    if g.shape == p.shape and g.device == p.device and g.is_floating_point() and (want is None or g.dtype == want):
        return
    who = f"param {name}" if name else "a param"
    raise ValueError(
        f"ChainOptimizer.step(): {who} of shape {tuple(p.shape)} ({p.dtype}, {p.device}) has a "
        f"gradient of shape {tuple(g.shape)} ({g.dtype}, {g.device}). A gradient takes its param's shape and "
        f"device, and its grad_dtype ({want}), as torch requires of p.grad = g; this one was set some other way "
        "(p.grad.data = x, or model.to() between backward and step?). Nothing was stepped"
    )


def _structural(value: Any) -> Hashable:
    """``value`` as part of a step's structure key: numbers and strings as they are, a list as a tuple,
    anything else (a tensor) by identity."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_structural(v) for v in value)
    return ("id", id(value))


def _picker(indices: list[int]) -> Callable[[list], tuple]:
    """The entries of a list at ``indices``, as a tuple (one C call)."""
    if len(indices) == 1:
        i = indices[0]
        return lambda xs: (xs[i],)
    return operator.itemgetter(*indices)


class _EagerSplit(NamedTuple):
    """What the eager step's split of a group depends on (``_collected_eager_again``), and the split."""

    params: list[Tensor]
    has_grad: list[bool]
    state: Any  # the optimizer's state mapping, its keys and values (the per-param dicts) in order
    keys: list[Tensor]
    dicts: list[dict]
    ptrs: list[int]
    names: list[str | None]
    buckets: list[Callable[[list], tuple]]  # per bucket, the entries of a per-param list it holds
    kept: list[dict | None]  # per param, its state dict (None: no grad)
    grad_shapes: list[torch.Size]  # of the grads there are, checked (p.grad.data = x changes them)
    grad_dtypes: list[torch.dtype]


class _FusedSplit(NamedTuple):
    """The fused step's split of a group and what it depends on (``_collected_again``). Its grads
    are the flat buffers' views, which live on anyway."""

    params: list[Tensor]
    grads: list[Tensor | None]
    state: Any  # the optimizer's state mapping, its keys and values (the per-param dicts) in order
    keys: list[Tensor]
    dicts: list[dict]
    ptrs: list[int]
    names: list[str | None] | None  # the group's param_names, if it has them
    buckets: list[list]
    parts: dict[int, list]  # id of a bucket -> its split by route (filled by _by_label)


class _ParamState(dict):
    """A param's state dict that counts its edits (an entry set or removed) in a counter its
    optimizer shares: the fused path's state entries are views into flat buffers, and an entry a
    user replaced (``opt.state[p]["step"] = torch.tensor(0.0)``) is copied into them before the next
    step. Pickled and copied as a plain dict."""

    __slots__ = ("_edits",)

    def __init__(self, entries: dict, edits: list[int]) -> None:
        super().__init__(entries)
        self._edits = edits

    def __setitem__(self, key: Any, value: Any) -> None:
        dict.__setitem__(self, key, value)
        self._edits[0] += 1

    def __delitem__(self, key: Any) -> None:
        dict.__delitem__(self, key)
        self._edits[0] += 1

    def __ior__(self, other: Any) -> _ParamState:
        self.update(other)
        return self

    def _edited(name: str) -> Callable:  # type: ignore[misc]
        method = getattr(dict, name)

        def edit(self: _ParamState, *args: Any, **kwargs: Any) -> Any:
            self._edits[0] += 1
            return method(self, *args, **kwargs)

        edit.__name__ = name
        return edit

    pop = _edited("pop")
    popitem = _edited("popitem")
    clear = _edited("clear")
    update = _edited("update")
    setdefault = _edited("setdefault")
    del _edited

    def __reduce__(self) -> tuple:
        return (dict, (dict(self),))


class FusedGradientCopyWarning(UserWarning):
    """The fused path copies gradients into its flat buffer at every step, because they arrive as
    new tensors (reset to None between steps) or as views of another buffer (DDP's
    ``gradient_as_bucket_view=True``): a cost, not an error. The message says how to avoid it."""


def _kept_dtype(saved: Tensor, expected: Any) -> torch.dtype:
    """The dtype a loaded state tensor takes: the one this optimizer makes for it, if both float."""
    if isinstance(expected, Tensor) and saved.is_floating_point() and expected.is_floating_point():
        return expected.dtype
    return saved.dtype


class ChainOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is a gradchain transform.

    ``ChainOptimizer(params, transform, **overrides)``: ``params`` as tensors, param-group dicts
    or ``named_parameters()``; ``overrides`` set any hyperparameter the transform declares
    (``lr``, ``betas``, ``weight_decay``, ...) for every group, and groups may override them
    again. Hyperparameters live in ``param_groups`` and are read every step, so torch LR
    schedulers work. ``maximize`` is a group option as in torch.optim.

    State per parameter is keyed ``"<transform name>.<buffer>"`` plus ``"step"`` (a 0-d fp32
    tensor). For fp16/bf16 params the state and the math are fp32; ``state_dtype`` sets another
    dtype for both (e.g. bf16 state to save memory). A param whose grad is None gets no state and
    is not touched.

    ``fused=True`` runs the chain over flat buffers (params, grads and elementwise state become
    views into one buffer per bucket) and compiles each run of elementwise transforms, final write
    included, into one kernel with ``torch.compile``; hyperparameters and step counts enter as 0-d
    tensors, so schedulers do not recompile. Transforms declared ``segmented`` (per-tensor
    reductions and state) compile too, as do ``elementwise_for`` transforms by shape (large
    matrices one at a time), ``fused_phases`` transforms as two passes around their sum over every
    bucket (with the elementwise transforms before them that are stateless or have a
    ``from_state``), and ``step_scales`` transforms (a loss-driven lr) as kernel inputs; a chain
    that is one ``partition`` compiles per label. Other transforms run eagerly over views of the
    same storage (:meth:`fused_plan`). ``zero_grad()`` then zeroes the flat grads in place. Once a
    param has been skipped (no grad at a step), its bucket's step counts differ: its kernels then
    read a step count per param (compiled once more; chains needing one step per bucket step
    eagerly), with a warning. Inside
    a ``torch.compile``'d training step, ``step()`` and ``zero_grad()`` of a fused optimizer break
    the graph and run outside it (its own kernels are compiled already); without ``fused`` the
    eager step traces into the graph.

    ``atomic``: a step either completes or leaves params and state as they were. Hyperparameters
    are always checked before anything moves; a step that raises inside a transform is rolled back
    from a snapshot taken on the first step of each structure (``"first"``, the default: which
    params have grads, their devices and dtypes, whether a loss or batch size is given, the loss's
    shape, the group values of options that choose the code such as ``amsgrad``) or on
    every step (``"always"``, for chains whose transforms may raise on values; it costs a copy of
    the state per step). The
    snapshot is a copy of the params and of the state that existed before the step: at a fresh
    start a copy of the params, after ``load_state_dict`` the params and the loaded state (for
    AdamW, three params' worth held during that step). ``"never"`` takes none, as torch.optim: a
    step that raises part-way may leave some params and state updated.
    """

    def __init__(
        self,
        params: Iterable[Any],
        transform: Transform,
        *,
        state_dtype: torch.dtype | None = None,
        fused: bool = False,
        atomic: str = "first",
        **overrides: Any,
    ) -> None:
        if not isinstance(transform, Transform):
            raise TypeError(f"ChainOptimizer needs a gradchain Transform, got {type(transform).__name__}")
        self.transform = transform
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype such as torch.bfloat16, got {state_dtype!r}")
        if state_dtype is not None and state_dtype not in (torch.bfloat16, torch.float32, torch.float64):
            # float16's range ends at 6e-8: a second moment of 1e-4 gradients (1e-8) and an eps of 1e-8 are
            # 0 there, and the update m / (sqrt(v) + eps) is inf; the float8 types have less still
            raise ValueError(
                f"state_dtype={state_dtype} cannot hold optimizer state: second moments and eps underflow to 0 "
                "(an Adam update then is inf). Use torch.bfloat16 (float32's range, half the memory), "
                "torch.float32 or torch.float64"
            )
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        if atomic not in ("first", "always", "never"):
            raise ValueError(f"atomic must be 'first', 'always' or 'never', got {atomic!r}")
        self.state_dtype = state_dtype
        self.fused = fused
        self.atomic = atomic
        self._init_runtime()
        defaults = {k: spec.default for k, spec in transform.hyperparams.items()}
        defaults["maximize"] = False
        defaults.update(transform.extra_defaults)
        defaults.update(transform.fixed_options)
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown hyperparameters {unknown} for this chain; it declares {sorted(defaults)}"
            )
        defaults.update(overrides)
        # optimizer-level state (one for the whole optimizer, not per param), for transforms that
        # define ``init_global_state(device)``; transforms reach it as ``bucket.shared["global_state"]``
        self.global_state: dict[str, Tensor] = {}
        if not isinstance(params, Tensor):
            # (torch makes a list of them too) how many groups are coming: an error names its group's index
            params = list(params)
        self._groups_given = len(params) if params and isinstance(params[0], dict) else 1
        super().__init__(params, defaults)
        del self._groups_given

    def _init_runtime(self) -> None:
        # not part of the optimizer's state: rebuilt after a load, a copy or unpickling. The compiled
        # segments depend on the transform alone: a load into this optimizer keeps them (made anew,
        # every load compiled again and kept the old code alive), and the warnings said once stay said
        if self.__dict__.get("_fused_of") is not self.transform:
            self._fused_chain = fused_chain(self.transform)
            self._warned: set = set()
        self._fused_of = self.transform
        # the eager step on a CPU, in cache-sized pieces (gradchain.pieces)
        in_pieces = PiecewiseChain(self.transform)
        self._pieces = in_pieces if in_pieces.useful else None
        self._flats: dict[tuple, FlatBucket] = {}
        self._proven: set = set()
        # per bucket: one vector of step counts whose 0-d views are the state["step"] tensors
        self._step_vectors: dict[tuple, tuple[Tensor, list[Tensor]]] = {}
        # per group (fused path), the last step's params, grads, state (its entries), storages and buckets
        self._collected: dict[int, _FusedSplit] = {}
        # params whose state this step makes later (``_defer_param_state``): id -> (param, name, group)
        self._pending: dict[int, tuple[Tensor, str | None, dict]] = {}
        # per group (eager path), the last step's split and what it depends on
        self._eager_splits: dict[int, _EagerSplit] = {}
        # per flat bucket key, the kept split's items and the flat bucket that took them with every
        # check passed (ids: a new split or a new flat bucket is checked again)
        self._checked: dict[tuple, tuple[int, int]] = {}
        self._created: list = []
        # zero_grad() reset the flat grads since the last step: a zero grad it kept that no backward
        # reached then stands for no grad (_drop_unwritten_grads)
        self._grads_reset = False
        # edits of the params' state dicts (_ParamState), and the count the fused path last read them at
        self._state_edits = [0]
        self._edits_seen = 0
        state = self.__dict__.get("state", {})  # (none yet when called from __init__)
        for p, st in list(state.items()):
            state[p] = _ParamState(st, self._state_edits)
        # during a guarded step (atomic): takes the snapshot, once, right before the first write
        self._pending_snapshot: Callable[[], None] | None = None
        # the hyperparameter values that passed their checks last (_resolve)
        self._checked_values: dict[str, Any] | None = None
        # id of a param -> its shape when its state was last found to fit it (p.data = x can change it)
        # (and its dtype: model.double() during a run leaves state of the old dtype, which some ops take silently)
        self._state_layouts: dict[int, tuple] = {id(p): (p.shape, p.dtype) for p in state if isinstance(p, Tensor)}
        # the group keys the transforms branch on in Python (amsgrad): a new value is a new structure
        self._static_keys = tuple(sorted(frozenset().union(*(getattr(t, "static_keys", ())
                                                              for t in self.transform.leaves()))))
        # the keys read only inside accumulate(): their schedules are checked at its inner count
        self._calls_per_step = accumulated_keys(self.transform)
        # those of them that are flags (amsgrad, nesterov): a schedule of one is refused
        declared = self.transform.hyperparams
        self._flag_keys = tuple(k for k in self._static_keys
                                if isinstance(getattr(declared.get(k), "default", None), bool))
        self._keeps_global_state = any(hasattr(t, "init_global_state") for t in self.transform.leaves())
        # the transforms whose checks span param groups (Prodigy's one estimate), found once
        self._group_checks = [c for c in (getattr(t, "validate_groups", None) for t in self.transform.leaves())
                              if c is not None]

    # -- groups -------------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        self._check_keys(group)
        if not isinstance(group.get("maximize", False), bool):
            raise ValueError(f"invalid hyperparameter maximize={group['maximize']!r}: must be a bool")
        self._check_fixed_options(group)
        self.transform.validate_group(group)

    def _check_keys(self, group: dict[str, Any]) -> None:
        """Refuse a key the chain does not declare (a typo would change nothing, silently). Kept: the
        keys torch's schedulers and SWALR write, and any ``initial_<key>`` (other schedulers' record
        of a starting value)."""
        known = self.__dict__.get("_known_keys")
        if known is None:
            known = self._known_keys = frozenset(self.defaults) | _GROUP_KEYS | _SCHEDULER_KEYS | {"differentiable"}
        if group.keys() <= known:
            return
        unknown = sorted(k for k in set(group) - known if not (isinstance(k, str) and k.startswith("initial_")))
        if unknown:
            options = [k for k in unknown if k in _OPTIONS]
            raise ValueError(
                f"param group has unknown hyperparameters {unknown}; this chain declares "
                f"{sorted(k for k in self.defaults if k != 'differentiable')}"
                + (f". {', '.join(options)}: arguments of ChainOptimizer, not hyperparameters. A wrapper that puts "
                   "its keyword arguments into every param group (ZeroRedundancyOptimizer(params, optimizer_class, "
                   "**kwargs)) takes ChainOptimizer with them bound: optimizer_class=functools.partial("
                   "gradchain.ChainOptimizer, transform=chain, fused=...)" if options else "")
            )

    def _check_fixed_options(self, group: dict[str, Any]) -> None:
        # at every step too: a scheduler that cycles momentum (OneCycleLR, CyclicLR) sets it in the group
        if group.get("differentiable", False) is not False:
            # (torch sets the key to False in a loaded optimizer's defaults: tolerated as such)
            raise ValueError(
                f"differentiable={group['differentiable']!r}: gradchain steps without autograd (its state and "
                "params change in place under no_grad), so no gradient flows through a step; torch.optim's "
                "differentiable=True optimizers do that"
            )
        for key in self._flag_keys:
            value = group.get(key)
            if callable(value) and not isinstance(value, Tensor):
                # a schedule of a flag that chooses the code (amsgrad's running max) would switch the
                # state's layout mid-run, which a value set by hand is refused for
                raise ValueError(
                    f"{key}={value!r}: {key} chooses which state and code the step has, so it takes a value, "
                    "not a schedule of the step"
                )
        for key, built in self.transform.fixed_options.items():
            if key in group and group[key] != built:
                raise ValueError(
                    f"param group sets {key}={group[key]!r}, but this optimizer's chain was built with "
                    f"{key}={built!r}: in gradchain {key} decides which transforms the chain holds. Build the "
                    f"chain with {key}={group[key]!r}, or route this group's params to a chain of their own "
                    "with gradchain.partition" + (" (a scheduler that cycles it, OneCycleLR or CyclicLR, takes "
                                                  "cycle_momentum=False)" if key == "momentum" else "")
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated (``ValueError`` names a bad one, and the
        group's index where there are several groups)."""
        at = len(self.param_groups)
        try:
            self._add_param_group(param_group)
        except ValueError as e:
            if max(at + 1, self.__dict__.get("_groups_given", 1)) > 1:
                raise ValueError(f"param group {at}: {e}") from e
            raise

    def _add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            self._check_group({k: v for k, v in param_group.items()})
        with warnings.catch_warnings():
            # torch warns about a param listed twice in a group ("in future, this will cause an error"):
            # here it is that error, raised below
            warnings.filterwarnings("ignore", "optimizer contains a parameter group with duplicate parameters")
            super().add_param_group(param_group)
        try:
            group = self.param_groups[-1]
            self._check_group(group)
            self._check_unique_params(group)
            self._check_across_groups(self.param_groups)
            self.transform.check_routes(list(zip(self._names(group), group["params"], strict=True)))
        except Exception:
            self.param_groups.pop()
            raise

    @staticmethod
    def _check_unique_params(group: dict[str, Any]) -> None:
        """A param listed twice in one group would be stepped twice per step (twice the lr, and its
        state advanced twice); the flat buffers of the fused path cannot hold it twice either."""
        params = group["params"]
        if len(set(map(id, params))) == len(params):
            return
        first: dict[int, int] = {}
        twice = []
        for i, p in enumerate(params):
            if id(p) in first:
                twice.append((first[id(p)], i))
            first.setdefault(id(p), i)
        names = group.get("param_names")
        said = ", ".join(f"#{i} repeats {names[j]!r} (#{j})" if names else f"#{i} repeats #{j}" for j, i in twice[:3])
        raise ValueError(
            f"a param group lists {len(twice)} param(s) more than once ({said}{', ...' if len(twice) > 3 else ''}): "
            "each would be stepped once per listing. List each param once; model.parameters() lists tied "
            "weights once, where concatenating two submodules' parameters() may list a shared one twice"
        )

    def _check_listed_once(self, gi: int) -> None:
        """Group ``gi`` lists each param once, and no other group lists one of them: a list edited in
        place (``param_groups[i]["params"].append(p)``) gets past ``add_param_group``'s checks."""
        group = self.param_groups[gi]
        self._check_unique_params(group)
        mine = set(map(id, group["params"]))
        for gj, other in enumerate(self.param_groups):
            if gj != gi and not mine.isdisjoint(map(id, other["params"])):
                raise ValueError(
                    f"param groups {min(gi, gj)} and {max(gi, gj)} list the same param (a group's params "
                    "edited in place): each group would step it. List each param in one group only"
                )

    # -- state --------------------------------------------------------------------------------
    def _init_param_state(self, p: Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Tensor]:
        st = self.state[p] = _ParamState(self._new_state(p, name, group), self._state_edits)
        return st

    def _new_state(self, p: Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Tensor]:
        """A new state for ``p``: the chain's, in ``state_dtype`` if set, and its step count (0)."""
        with initializing_for(group):
            st = self.transform.init_state(p, name)
        if self.state_dtype is not None:
            shaped = {k for k, v in st.items() if v.dim() > 0}
            if p.dim() == 0:
                # a 0-d param's buffers are 0-d like its per-tensor scalars (NAdam's running product,
                # kept as they are): the buffers are what a 1-element vector of the same kind gets
                with initializing_for(group):
                    probe = self.transform.init_state(torch.zeros(1, dtype=p.dtype, device=p.device), name)
                shaped = {k for k, v in probe.items() if v.dim() > 0}
            st = {k: v.to(self.state_dtype) if v.is_floating_point() and k in shaped else v for k, v in st.items()}
        st["step"] = torch.zeros((), dtype=torch.float32)
        return st

    def _defer_param_state(self, p: Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Tensor]:
        """A state of ``p`` that holds only its step count (0) until the fused path makes the rest
        inside its flat buffers (``FlatBucket``'s ``fill``), or the step goes eager (``_fill_pending``)."""
        st = self.state[p] = _ParamState({"step": torch.zeros((), dtype=torch.float32)}, self._state_edits)
        self._pending[id(p)] = (p, name, group)
        return st

    def _fill_pending_state(self, p: Tensor, st: dict) -> None:
        """Make the state of ``p`` in place if it was deferred."""
        entry = self._pending.pop(id(p), None)
        if entry is not None and entry[0] is p:
            dict.clear(st)
            dict.update(st, self._new_state(*entry))

    def _fill_pending(self) -> None:
        """Make every deferred state that the fused path did not (the step goes eager)."""
        for p, _, _ in list(self._pending.values()):
            self._fill_pending_state(p, self.state[p])

    @staticmethod
    def _names(group: dict[str, Any]) -> list[str | None]:
        names = group.get("param_names")
        return list(names) if names is not None else [None] * len(group["params"])

    def init_state(self) -> None:
        """Allocate the state of every param now (needed before a distributed checkpoint load)."""
        for group in self.param_groups:
            for p, name in zip(group["params"], self._names(group), strict=False):
                if not self.state.get(p):
                    self._init_param_state(p, name, group)
                self._init_global_state(p.device)

    def _init_global_state(self, device: torch.device) -> dict[str, Tensor]:
        if not self.global_state:
            for t in self.transform.leaves():
                init = getattr(t, "init_global_state", None)
                if init is not None:
                    self.global_state.update(init(device))
        return self.global_state

    def _adopt_packed_global_state(self) -> bool:
        """Take back optimizer-level state that a state dict carried in a param's entry (``@global.``
        keys) and a wrapper loaded straight into ``self.state``: ZeroRedundancyOptimizer's
        ``load_state_dict`` writes the entries itself, not through :meth:`load_state_dict`, so the
        resumed run would start Prodigy's ``d`` or AdaLo's loss EMA afresh."""
        for st in self.state.values():
            packed = [k for k in st if isinstance(k, str) and k.startswith(_GLOBAL)]
            if packed:
                for k in packed:
                    self.global_state[k[len(_GLOBAL):]] = st.pop(k)
                return True
        return False

    # -- the step -----------------------------------------------------------------------------
    def _collect(self, defer: bool = False) -> list[tuple[int, dict, list]]:
        """``(group index, group, [(p, grad, state, name)])`` per bucket: params with a grad, by device
        and dtype. With ``defer``, a param without state gets one that holds only its step count,
        made whole later in the step (``_defer_param_state``)."""
        out = []
        compiling = torch.compiler.is_compiling()
        fused_split = self.fused and not compiling
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            if compiling:
                reused = None
            elif self.fused:
                reused = self._collected_again(gi, params)
            else:
                reused = self._collected_eager_again(gi, group, params)
            if reused is not None:
                out.extend((gi, group, items) for items in reused)
                continue
            self._checked = {k: v for k, v in self._checked.items() if k[0] != gi}
            if not compiling:  # (the group's params changed, or a first step: cheap next to a split)
                self._check_listed_once(gi)
            split: dict[tuple, list] = defaultdict(list)
            where: dict[tuple, list[int]] = defaultdict(list)
            names = self._names(group)
            kept: list[dict | None] = [None] * len(params)
            for i, (p, name) in enumerate(zip(params, names, strict=False)):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"gradchain does not support sparse gradients (param {name or tuple(p.shape)}); "
                        "use a dense embedding or torch.optim.SparseAdam"
                    )
                dtype = p.dtype
                if dtype.is_complex:
                    raise RuntimeError(
                        f"gradchain does not support complex params yet (param {name or tuple(p.shape)})"
                    )
                if not compiling:  # (traced, the grads are autograd's own)
                    _check_grad(p, g, name)
                st = self.state.get(p)
                made = not st
                if made:
                    make = self._defer_param_state if defer and not compiling else self._init_param_state
                    st = make(p, name, group)
                    self._created.append(p)
                elif type(st) is not _ParamState:  # a dict put in by hand
                    st = self.state[p] = _ParamState(st, self._state_edits)
                if not compiling and self._state_layouts.get(id(p)) != (p.shape, p.dtype):
                    if not made:
                        self._check_state_fits(p, name, group, st)
                    self._state_layouts[id(p)] = (p.shape, p.dtype)
                # the fused path holds no reference to a grad it may copy into its flat buffer (that one is
                # freed there, a param's worth of memory at the first step); the step reads p.grad
                # (a sharded param and a plain one never share a list op: FSDP2's ignored params)
                key = (p.device, dtype, getattr(p, "device_mesh", None))
                split[key].append((p, None if fused_split else g, st, name))
                where[key].append(i)
                kept[i] = st
            buckets = list(split.values())
            if self.fused and not compiling:
                given = group.get("param_names")
                self._collected[gi] = _FusedSplit(
                    list(params), list(map(_GRAD, params)), self.state, list(self.state), list(self.state.values()),
                    list(map(Tensor.data_ptr, params)), None if given is None else list(given), buckets, {})
            elif not compiling:
                # the eager path keeps what tells the split apart, not the grads (freed ones held alive)
                grads = [g for g in map(_GRAD, params) if g is not None]
                self._eager_splits[gi] = _EagerSplit(
                    list(params), [g is not None for g in map(_GRAD, params)], self.state, list(self.state),
                    list(self.state.values()), list(map(Tensor.data_ptr, params)), names,
                    [_picker(idx) for idx in where.values()], kept, list(map(_SHAPE, grads)),
                    list(map(_DTYPE, grads)))
                del grads
            out.extend((gi, group, items) for items in buckets)
        return out

    def _collected_again(self, gi: int, params: list[Tensor]) -> list[list] | None:
        """The last step's buckets of group ``gi`` if nothing they hold changed: the same params
        (storage included, so the same devices and dtypes), names, grads and state dicts. The fused path's
        grads are the same views every step, so its steps skip the checks per tensor."""
        last = self._collected.get(gi)
        if last is None or len(last.params) != len(params) or not all(map(operator.is_, last.params, params)):
            return None
        # the same keys mapped to the same dicts, so each param's state dict is the one this split holds
        if not self._same_state(last.state, last.keys, last.dicts):
            return None
        names = self.param_groups[gi].get("param_names")
        if (last.names is not None) if names is None else last.names != list(names):
            return None  # renamed params: routed (and warned about) by their new names
        # a param's grad and storage in one pass: after a step over a large model the tensors are out
        # of the cache, and the two reads of one param then share its first miss (two C loops, one per
        # attribute, take about a third longer than this one Python loop)
        if not all(p.grad is g and p.data_ptr() == d for p, g, d in zip(params, last.grads, last.ptrs)):
            return None
        return last.buckets

    def _same_state(self, state: Any, keys: list[Tensor], dicts: list[dict]) -> bool:
        """Whether ``self.state`` is ``state`` and maps the same params ``keys`` to the same ``dicts``:
        every entry compared by identity, in order (no hashing of tensors)."""
        now = self.state
        return now is state and len(now) == len(keys) and all(map(operator.is_, now, keys)) \
            and all(map(operator.is_, now.values(), dicts))

    def _collected_eager_again(self, gi: int, group: dict, params: list[Tensor]) -> list[list] | None:
        """Group ``gi``'s buckets with this step's grads, split as at the last step, where nothing
        else they depend on changed: the same params (storage included, so the same devices and
        dtypes) with a grad, the same state dicts and names. The checks run over the whole group at
        once (C loops), where a full split costs a few attribute reads and a hash per param."""
        last = self._eager_splits.get(gi)
        if last is None or len(last.params) != len(params) or not all(map(operator.is_, last.params, params)):
            return None
        grads = list(map(_GRAD, params))
        if list(map(operator.is_not, grads, repeat(None))) != last.has_grad \
                or not self._same_state(last.state, last.keys, last.dicts) \
                or list(map(Tensor.data_ptr, params)) != last.ptrs:
            return None
        names = group.get("param_names")
        if (last.names != [None] * len(params)) if names is None else last.names != list(names):
            return None
        present = list(compress(grads, last.has_grad))
        if any(map(_IS_SPARSE, present)) or not all(compress(last.kept, last.has_grad)) \
                or list(map(_SHAPE, present)) != last.grad_shapes or list(map(_DTYPE, present)) != last.grad_dtypes:
            # the full split raises the error, or makes the state of a param whose dict was emptied
            return None
        return [list(zip(*(pick(x) for x in (params, grads, last.kept, last.names)))) for pick in last.buckets]

    def _resolve(self, group: dict, step: int) -> dict[str, Any]:
        # the values checked at the last step of any group are not checked again (on a small model
        # the checks are a good part of a step's host time)
        try:
            self._check_keys(group)  # a key set in the group since (a typo) is refused at the step it would be ignored
            self._check_fixed_options(group)
            self._checked_values = resolve_group(self.transform, group, step, self._checked_values,
                                                 self._calls_per_step)
        except ValueError as e:
            if len(self.param_groups) > 1:
                at = next((i for i, g in enumerate(self.param_groups) if g is group), None)
                raise ValueError(f"param group {at}: {e}") from e
            raise
        return self._checked_values

    def _check_across_groups(self, groups: list[dict[str, Any]]) -> None:
        """The checks that span groups, on the groups' values as they are (when a group is added or a
        state dict loaded). A scheduled value is checked at the step, where it is evaluated."""
        if not self._group_checks or any(callable(g[k]) and not isinstance(g[k], Tensor)
                                         for g in groups for k in self.transform.hyperparams if k in g):
            return
        self._validate_across_groups([resolve_group(self.transform, g, 0) for g in groups])

    def _validate_across_groups(self, resolved: list[dict[str, Any]]) -> None:
        """Checks that span param groups (Prodigy's one estimate needs one beta), before any state moves."""
        for check in self._group_checks if resolved else ():
            check(resolved)

    def _buckets(self, loss: Tensor | None, batch_size: Any = None,
                 collected: list | None = None) -> tuple[list[Bucket], list[list[dict]]]:
        shared: dict[str, Any] = {}
        compiling = torch.compiler.is_compiling()
        plans = []
        collected = list(self._collect() if collected is None else collected)
        # a schedule is evaluated at the largest step count of its whole group (plus one), whichever
        # of the group's buckets (dtypes, devices) holds it
        group_steps: dict[int, list[Tensor]] = {}
        for gi, group, items in collected:
            if self._scheduled(group):
                group_steps.setdefault(gi, []).extend(st["step"] for _, _, st, _ in items)
        # every hyperparameter (schedules included) is resolved and checked before any state moves
        for gi, group, items in collected:
            sts = [x[2] for x in items]
            steps = [st["step"] for st in sts]
            # the host step count (one read of every step tensor) only for a schedule to evaluate
            scheduled = gi in group_steps
            if compiling:
                # traced: step counts stay tensors, so the graph does not depend on their values; a
                # schedule is evaluated outside the graph (a graph break) and enters it as a number
                resolved = self._resolve_outside_graph(group, group_steps[gi]) if scheduled else None
                plans.append((gi, group, items, steps, resolved))
                continue
            plans.append((gi, group, items, steps, self._resolve_next(group, group_steps[gi]) if scheduled
                          else self._resolve(group, 0)))
        if not compiling:
            self._validate_across_groups([x[4] for x in plans])
        buckets, states = [], []
        for gi, group, items, steps, resolved in plans:
            params = [x[0] for x in items]
            grads = [x[0].grad if x[1] is None else x[1] for x in items]
            if group["maximize"]:
                grads = torch._foreach_neg(grads)
            sts = [x[2] for x in items]
            keys = set().union(*sts) - {"step"}
            lists = {k: list(map(dict.get, sts, repeat(k))) for k in keys}
            values = None
            if compiling:
                torch._foreach_add_(steps, 1.0)
            else:
                steps, values = self._advance_steps((gi, items[0][0].device, items[0][0].dtype), sts, steps)
            if compiling and resolved is None:
                # (each bucket its own group's values: one dict in the shared one held the last group's)
                resolved = {k: group[k] for k in self.transform.hyperparams}
            buckets.append(
                Bucket(params, grads, lists, steps, [x[3] for x in items], group, loss, shared, self.state_dtype,
                       batch_size=batch_size, tensor_scalars=compiling,
                       # traced: float64 step tensors, so bias corrections keep the eager path's precision
                       step_values=[t.to(torch.float64) for t in steps] if compiling else values,
                       resolved=resolved)
            )
            # what the lists held, to find the entries a transform replaced (_step_eager)
            states.append((sts, {k: list(v) for k, v in lists.items()}))
        if buckets:
            shared["global_state"] = self._init_global_state(buckets[0].params[0].device)
        return buckets, states

    def _scheduled(self, group: dict) -> bool:
        return any(callable(group[k]) and not isinstance(group[k], Tensor) for k in self.transform.hyperparams)

    def _resolve_next(self, group: dict, steps: list[Tensor]) -> dict[str, Any]:
        """The group's hyperparameters at the step about to be taken (the largest count plus one)."""
        return self._resolve(group, int(max(torch.stack(steps).tolist())) + 1)

    # a traced step's hyperparameters where its group holds a schedule (a Python function of the
    # step count): evaluated on the host, a graph break; the values enter the graph as numbers
    _resolve_outside_graph = torch.compiler.disable(_resolve_next)

    def _advance_steps(self, key: tuple, sts: list[dict], steps: list[Tensor]) -> tuple[list[Tensor], list | None]:
        """Add 1 to every step count of a bucket: one add over a vector whose 0-d views are the
        ``state["step"]`` tensors (made so at the first step), rather than a small op per tensor.
        Returns the step tensors and, read from that vector at once, their host values (None where
        the counts are not views of one vector: the bucket reads them when asked)."""
        cached = self._step_vectors.get(key)
        if cached is None or len(cached[1]) != len(steps) or not all(map(operator.is_, cached[1], steps)):
            t0 = steps[0]
            if any(t.dim() or t.dtype != t0.dtype or t.device != t0.device or hasattr(t, "device_mesh")
                   for t in steps):
                torch._foreach_add_(steps, 1.0)
                return steps, None
            vec = torch.stack([t.detach() for t in steps])
            cached = self._step_vectors[key] = (vec, list(vec.unbind()))
            for st, v in zip(sts, cached[1], strict=True):
                st["step"] = v
        cached[0].add_(1.0)
        return cached[1], cached[0].tolist() if cached[0].is_cpu else None

    def _step_eager(self, loss: Tensor | None, batch_size: Any, collected: list | None = None) -> None:
        buckets, states = self._buckets(loss, batch_size, collected)
        if not buckets:
            return
        if self._pieces is not None and pieces.runs_here(buckets):  # in cache-sized pieces
            self._pieces.step(buckets)
        else:
            self.transform.apply(buckets)
            for b in buckets:
                b.write()
        for b, (sts, before) in zip(buckets, states, strict=False):
            for k, lst in b.state.items():
                if k in before and len(lst) == len(before[k]) and all(map(operator.is_, lst, before[k])):
                    continue  # the entries the state dicts hold (one C loop, not a lookup per param)
                for st, t in zip(sts, lst, strict=False):
                    if t is not None and st.get(k) is not t:
                        st[k] = t
        # flat buffers of the fused path stay the storage of record
        self._resync_flats()

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: Any = None, batch_size: Any = None
    ) -> Any:
        """One optimizer step.

        ``closure`` (re-evaluates the model and returns the loss) runs under ``enable_grad``;
        ``loss=`` passes the loss without a closure (also through ``GradScaler.step(opt, loss=loss)``).
        Either way loss-aware transforms see it, and it is returned. ``batch_size=`` (a number or a
        0-d tensor: this micro-batch's sample or token count) weighs the micro-batches of
        ``accumulate()``; a chain without one refuses it.

        A step is all or nothing: hyperparameters (schedules included) are resolved and checked
        before any state moves, and if a transform raises, params and state are restored to what
        they were before the step (see ``atomic`` in the class docstring).
        """
        if batch_size is not None and not any(getattr(t, "reads_batch_size", False) for t in self.transform.leaves()):
            raise ValueError("step(batch_size=) is read by accumulate(); this chain has no accumulate()")
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either a closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
        loss_t = None
        if loss is not None:
            loss_t = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        if torch.compiler.is_compiling():
            if self.fused:
                # traced, the flat buffers' views would make their offsets symbols of the user's
                # graph: a graph break instead, and the fused step runs its own compiled kernels
                self._step_outside_graph(loss_t, batch_size)
            elif self._state_missing():
                # a fresh optimizer in a compiled step: its first step (state made) runs outside the
                # graph, one clean graph break; traced, making state broke the graph at every param
                # and dynamo gave up on tracing the collection of params for every later step
                self._step_outside_graph(loss_t, batch_size)
            else:
                self._step_eager(loss_t, batch_size)
            return loss
        if torch.is_inference_mode_enabled():
            # state, flat buffers and their views made under inference mode would be inference
            # tensors: the next forward pass could not use the params with autograd, and a later
            # step outside inference mode could not update the state in place
            with torch.inference_mode(False), torch.no_grad():
                self._atomic_step(None if loss_t is None else loss_t.clone(), batch_size)
            return loss
        self._atomic_step(loss_t, batch_size)
        return loss

    def _state_missing(self) -> bool:
        """Whether a param with a grad has no state yet (a first step, or a param that joined)."""
        return any(p.grad is not None and not self.state.get(p) for g in self.param_groups for p in g["params"])

    @torch.compiler.disable
    def _step_outside_graph(self, loss_t: Tensor | None, batch_size: Any) -> None:
        self._atomic_step(loss_t, batch_size)

    def _atomic_step(self, loss_t: Tensor | None, batch_size: Any) -> None:
        self._created = []
        self._pending_snapshot = None
        if not self.global_state and self._keeps_global_state:
            self._adopt_packed_global_state()
        taken: list[dict[str, Any]] = []
        fused = self.fused and batch_size is None and not self._fused_chain.all_eager
        collected: list = []
        self._drop_unwritten_grads()  # after zero_grad(): no backward reached them
        try:
            # the fused path makes a new param's state inside its flat buffers, a param at a time
            collected = self._collect(defer=fused)
            key = self._structure(loss_t, batch_size, collected)
            if self.atomic == "always" or (self.atomic == "first" and key not in self._proven):
                # taken right before the first write: after the fused path has moved params and state
                # into its flat buffers, so the snapshot holds what a rollback must restore (the flat
                # views) and the copies of the params it displaced are already freed
                self._pending_snapshot = lambda: taken.append(self._snapshot(collected))
            if not (fused and self._step_fused(loss_t, collected)):
                self._fill_pending()
                self._take_snapshot()
                self._step_eager(loss_t, batch_size, collected)
        except BaseException as e:
            if self.atomic == "never":
                for fb in self._flats.values():
                    fb.step_host = None  # read again from the step counts, whichever moved
                for p, _, _ in self._pending.values():  # a state not made yet is made at the next step
                    self.state.pop(p, None)
            else:
                self._rollback(taken[0] if taken else None)
            if isinstance(e, Exception):
                self._explain_state_dtypes(collected, e)
            raise
        finally:
            self._pending_snapshot = None
            self._pending.clear()
        self._grads_reset = False
        self._proven.add(key)

    def _check_state_fits(self, p: Tensor, name: str | None, group: dict[str, Any], st: dict) -> None:
        """Refuse state made for a param of another shape or floating dtype (the param replaced,
        reshaped or cast since: ``p.data = x``, ``model.double()``), which a step would fail on
        part-way, or take silently (SM3's accumulators broadcast; an in-place op writes a float64
        update into float32 momentum)."""
        who = f"param {name}" if name else f"a param of shape {tuple(p.shape)}"
        for key, want in (self._expected_state(p, name, group) or {}).items():
            got = st.get(key)
            if key == "step" or not isinstance(want, Tensor) or not isinstance(got, Tensor):
                continue
            if got.shape != want.shape:
                raise ValueError(
                    f"ChainOptimizer.step(): {who} has shape {tuple(p.shape)}, but its state {key!r} has shape "
                    f"{tuple(got.shape)}, made for a param of another shape: the param was replaced or reshaped "
                    "(p.data = x) after its state was made. Restore its shape, or start its state afresh (del "
                    "opt.state[p]); nothing was stepped"
                )
            if want.is_floating_point() and got.is_floating_point() and got.dtype != want.dtype:
                raise ValueError(
                    f"ChainOptimizer.step(): {who} is {p.dtype} and its state {key!r} {got.dtype}, where this chain "
                    f"keeps {want.dtype}: the param's dtype changed after its state was made (model.to(dtype) "
                    "during a run). Cast its floating state entries to the dtype this chain keeps "
                    "(opt.state[p][key] = opt.state[p][key].to(dtype)) or start it afresh (del opt.state[p]); "
                    "the step was rolled back before anything moved"
                )

    def _explain_state_dtypes(self, collected: list, error: Exception) -> None:
        """Raise a clear error in place of ``error`` where a param's state has another dtype than this
        chain makes for the param as it is now: the param's dtype changed after its state was made
        (``model.double()`` during a run), and the transforms fail on the mixed dtypes. Runs only
        after a step raised with an error about dtypes (another failure is not put down to state
        whose dtype differs for a reason: loaded with dtypes of its own, ``state_dtype`` changed)."""
        if not re.search(r"dtype|scalar type", str(error), re.IGNORECASE):
            return
        created = set(map(id, self._created))
        wrong = []
        for _, group, items in collected:
            for p, _, st, name in items:
                if id(p) in created or len(wrong) >= 3:
                    continue
                want = self._expected_state(p, name, group)
                for key, w in (want or {}).items():
                    got = st.get(key)
                    if key != "step" and isinstance(w, Tensor) and isinstance(got, Tensor) \
                            and w.is_floating_point() and got.is_floating_point() and got.dtype != w.dtype:
                        who = name if name is not None else f"of shape {tuple(p.shape)}"
                        wrong.append(f"param {who} is {p.dtype} and its state {key!r} {got.dtype}, where this "
                                     f"chain keeps {w.dtype}")
                        break
        if wrong:
            undone = "the step was rolled back" if self.atomic != "never" else "atomic='never': nothing was rolled back"
            raise ValueError(
                f"ChainOptimizer.step(): {'; '.join(wrong)}. A param's dtype changed after its state was made "
                "(model.to(dtype) during a run), or a state dict saved with other dtypes was loaded? Cast its "
                "floating state entries to the dtype this chain keeps "
                f"(opt.state[p][key] = opt.state[p][key].to(dtype)) or start it afresh (del opt.state[p]); {undone}"
            ) from error

    def _take_snapshot(self) -> None:
        if self._pending_snapshot is not None:
            take, self._pending_snapshot = self._pending_snapshot, None
            take()

    # -- all or nothing ------------------------------------------------------------------------
    def _structure(self, loss: Tensor | None, batch_size: Any, collected: list) -> tuple:
        # each bucket's device and dtype too: a step over params moved or cast during a run
        # (model.double()) meets state made for the old ones, and is a first step again
        buckets = tuple((gi, items[0][0].device, items[0][0].dtype, len(items)) for gi, _, items in collected if items)
        # the options that choose the code (amsgrad switched on mid-run is refused part-way through a
        # step) and the loss's shape (a loss-aware transform refuses a vector) make a step a first again
        options = tuple(tuple(_structural(g.get(k)) for k in self._static_keys) for g in self.param_groups)
        return (None if loss is None else tuple(loss.shape), batch_size is None, buckets,
                tuple(len(g["params"]) for g in self.param_groups), options)

    def _snapshot(self, collected: list) -> dict[str, Any]:
        params = [x[0] for _, _, items in collected for x in items]
        # state made by this step's _collect is dropped on rollback, not restored
        created = set(map(id, self._created))
        return {
            "params": [(p, p.detach().clone()) for p in params],
            "state": {p: (dict(self.state[p]), {k: v.detach().clone() for k, v in self.state[p].items()
                                                if isinstance(v, Tensor)})
                      for p in params if id(p) not in created and self.state.get(p)},
            "global": (dict(self.global_state), {k: v.clone() for k, v in self.global_state.items()}),
        }

    def _rollback(self, snapshot: dict[str, Any] | None) -> None:
        created = set(map(id, self._created))
        for p in self._created:
            self.state.pop(p, None)
        # a flat bucket made this step over state that is now dropped: made again at the next step,
        # from the params (their values restored) and the state then made
        for key in [k for k, fb in self._flats.items() if any(id(p) in created for p in fb.params)]:
            del self._flats[key]
        self._collected.clear()
        self._checked.clear()
        if snapshot is None:
            return
        for p, value in snapshot["params"]:
            p.detach().copy_(value)
        for p, (entries, values) in snapshot["state"].items():
            st = self.state[p]
            st.clear()
            st.update(entries)
            for k, v in values.items():
                entries[k].copy_(v)
        entries, values = snapshot["global"]
        self.global_state.clear()
        self.global_state.update(entries)
        for k, v in values.items():
            entries[k].copy_(v)
        for fb in self._flats.values():
            fb.step_host = None

    # -- the fused path ------------------------------------------------------------------------
    def _step_fused(self, loss: Tensor | None, collected: list) -> bool:
        """One step over flat buffers; False (nothing done) when a bucket cannot take it this step."""
        flats, groups, resolved, host_steps, dtypes, labels = [], [], [], [], [], []
        routes = self._fused_chain if isinstance(self._fused_chain, FusedRoutes) else None
        if self._state_edits[0] != self._edits_seen:
            # state entries set since the last fused step (by hand, or by an eager step): copied
            # into the flat buffers, which the kernels read
            self._resync_flats()
        for gi, group, bucket in collected:
            for label, items in self._by_label(routes, gi, bucket):
                if not self._add_flat(gi, group, label, items, flats, groups, dtypes):
                    return False
                labels.append(label)
        if not flats:
            return True
        # a schedule at the largest count of its whole group, as on the eager path: a group split into
        # several flat buckets (routes, shape classes) must not give the params of one another value
        group_next: dict[int, int] = {}
        for fb, group in zip(flats, groups):
            group_next[id(group)] = max(group_next.get(id(group), 0), int(fb.step_host) + 1)
        for fb, group in zip(flats, groups):
            resolved.append(self._resolve(group, group_next[id(group)]))
            host_steps.append(fb.step_host + 1.0)
        self._validate_across_groups(resolved)
        self._take_snapshot()
        for fb in flats:
            fb.flat_steps.add_(1.0)
            fb.step_host += 1.0
        shared = {"global_state": self._init_global_state(flats[0].device)}
        chains = {None: self._fused_chain} if routes is None else routes.chains
        # factors a transform works out from the loss alone (AdaLo's lr): once for every route
        scales = step_scales(list(chains.values()), flats, groups, resolved, host_steps, loss, shared, dtypes)
        for label, chain in chains.items():
            idx = [i for i, x in enumerate(labels) if x == label]
            if idx:
                try:
                    chain.step(*([v[i] for i in idx] for v in (flats, groups, resolved, host_steps)), loss, shared,
                               [dtypes[i] for i in idx], scales)
                except Exception as e:
                    if routes is not None and routes.partition is not None:
                        routes.partition.explain_state_of_other_routes(
                            label[0], ((p, n, list(st)) for i in idx
                                       for p, n, st in zip(flats[i].params, flats[i].names, flats[i].states)), e)
                    raise
        for fb in flats:
            fb.end_step()
        self._edits_seen = self._state_edits[0]
        return True

    def _resync_flats(self) -> None:
        """Copy state entries set since the last fused step into the flat buffers; a bucket with an
        entry that does not fit its buffer (cast by hand) is dropped, to be made again from the state
        dicts at its next fused step."""
        for key, fb in list(self._flats.items()):
            fb.step_host = None
            if not fb.resync_state():
                del self._flats[key]
                self._collected.pop(key[0], None)
                self._checked.pop(key, None)

    def _by_label(self, routes: FusedRoutes | None, gi: int, items: list) -> list[tuple[Any, list]]:
        """A bucket's items per route label (one part, label None, without routes). A bucket of the
        split ``_collect`` kept is split once, and its parts kept with it: the same lists at every
        step while nothing they hold changes, so ``_add_flat`` skips its checks per tensor for them
        as for an unrouted bucket (a label lookup and those checks are a few us per param)."""
        if routes is None:
            return [(None, items)]
        kept = self._kept_parts(gi, items)
        if kept is not None and id(items) in kept:
            return kept[id(items)]
        parts: dict[Any, list] = {}
        for x in items:
            parts.setdefault(routes.label(x[3], x[0]), []).append(x)
        split = list(parts.items())
        if kept is not None:
            kept[id(items)] = split
        return split

    def _kept_parts(self, gi: int, items: list) -> dict[int, list] | None:
        """The split by route of group ``gi``'s kept buckets, if ``items`` is one of them (ids are
        safe keys there: the kept split holds the buckets alive)."""
        last = self._collected.get(gi)
        return last.parts if last is not None and any(b is items for b in last.buckets) else None

    def _kept(self, gi: int, label: Any, items: list) -> bool:
        """Whether ``items`` is a list the kept split of group ``gi`` holds alive (a bucket, or one
        of its parts by route), so its id stands for it until that split is dropped."""
        last = self._collected.get(gi)
        if last is None:
            return False
        if label is None:
            return True
        return any(part is items for split in last.parts.values() for _, part in split)

    def _add_flat(self, gi: int, group: dict, label: Any, items: list, flats: list, groups: list,
                  dtypes: list) -> bool:
        """Find or make the flat bucket of ``items``; False if it cannot take a fused step now."""
        p0 = items[0][0]
        key = (gi, p0.device, p0.dtype, label)
        fb = self._flats.get(key)
        if fb is not None and self._checked.get(key) == (id(items), id(fb)) and not fb.grads_moved():
            # the split _collect kept, found again (the same params, storages and grads, and the last
            # step found them this bucket's views): nothing to check per tensor again
            fb.grads_taken = False
            fb.copied_steps = 0
            fb.subset = None
        else:
            params = [x[0] for x in items]
            if fb is not None and len(params) < len(fb.params) and fb.holds(params):
                # some of the bucket's params have no grad this step: an eager step skips them, as
                # torch does, and the flat buffers stay for the steps where they all have one (made
                # again for this subset, they would cost a copy of the bucket and a compile now,
                # and the same again at the next step). The same params without a grad for
                # SUBSET_FLATTEN_STEPS steps in a row (a frozen layer): the bucket is made again without them
                ids = frozenset(map(id, params))
                seen = fb.subset[1] + 1 if fb.subset is not None and fb.subset[0] == ids else 1
                fb.subset = (ids, seen)
                if seen < SUBSET_FLATTEN_STEPS:
                    return False
            elif fb is not None:
                fb.subset = None
            for p, _, _, name in items:  # a grad pointed at other memory since the split was kept
                _check_grad(p, p.grad, name)
            # (a param's state dict replaced by hand, or made anew after it was deleted: from it)
            # (or a gradient of another dtype than the flat one: grad_dtype changed during the run)
            if fb is None or len(fb.params) != len(params) or not all(map(operator.is_, fb.params, params)) \
                    or not fb.intact() or not all(map(operator.is_, fb.states, [x[2] for x in items])) \
                    or any(p.grad.dtype != fb.flat_grads.dtype for p in params):
                fb = self._flatten(key, items)
                if fb is None:
                    return False
            if not fb.gather_grads():
                return False
            fb.copied_steps = fb.copied_steps + 1 if fb.grads_taken else 0
            if fb.copied_steps == COPIED_GRADS_WARN_STEPS:
                self._warn_copied_grads(key, fb.grads_from_views, fb.grads_with_graph)
        if fb.grads_taken:
            # the split kept by _collect holds the grads just copied in: let them go
            self._collected.pop(gi, None)
            self._checked.pop(key, None)
        elif self._kept(gi, label, items):
            self._checked[key] = (id(items), id(fb))
        if fb.step_host is None:
            fb.step_host = fb.uniform_step()
            fb.uneven = fb.step_host is None
            if fb.uneven:
                # a chain that needs one step for the whole bucket steps eagerly
                if not self._fused_chain.takes_uneven_steps:
                    self._warn_eager(key, _UNEVEN_STEPS)
                    return False
                # schedules are evaluated at the bucket's largest step, as on the eager path
                fb.step_host = float(fb.flat_steps.max())
                self._warn_per_param(key)
        flats.append(fb)
        groups.append(group)
        dtypes.append(self.state_dtype or compute_dtype(p0.dtype))
        return True

    def _warn_per_param(self, key: tuple) -> None:
        if ("uneven", key) not in self._warned:
            self._warned.add(("uneven", key))
            warnings.warn(
                f"ChainOptimizer(fused=True): the params of param group {key[0]} have taken different numbers "
                "of steps (a param had no grad at a step and was skipped, as torch does); from now on its "
                "kernels read a step count per param (compiled once more, and a little slower). To keep "
                "the counts even, give every param a grad at every step: opt.zero_grad() keeps the grads, "
                "as zeros", UserWarning, stacklevel=4)

    def _flatten(self, key: tuple, items: list) -> FlatBucket | None:
        params = [x[0] for x in items]
        grad_dtypes = {p.grad.dtype for p in params}
        why = None
        if any(getattr(p, "device_mesh", None) is not None for p in params):
            why = "its params are DTensors (FSDP2): the fused path keeps flat buffers of plain tensors"
        elif not self._fused_chain.takes_uneven_steps and len({float(x[2]["step"]) for x in items}) != 1:
            why = _UNEVEN_STEPS
        elif len(grad_dtypes) > 1:
            why = (f"its params' gradients have different dtypes ({', '.join(sorted(map(str, grad_dtypes)))}: "
                   "grad_dtype set on some of them), and a flat gradient buffer holds one dtype; a param group "
                   "for each keeps them fused")
        elif any(p.is_cpu and p.is_shared() for p in params):
            why = ("its params are in shared memory (model.share_memory(), for Hogwild training across processes): "
                   "moved into this process's flat buffers, the other processes would no longer see its updates")
        elif shared := aliased(params, (q for g in self.param_groups for q in g["params"])):
            views = [items[i][3] or f"#{i}" for i in shared]
            why = (f"{len(views)} of its params ({', '.join(map(str, views[:3]))}{', ...' if len(views) > 3 else ''}) "
                   "share memory with another param (one made a view or a slice of another): moved into flat "
                   "buffers they would no longer be linked, where torch.optim steps them one after the other")
        elif foreign := foreign_views(params, lambda: (q for g in self.param_groups for q in g["params"])):
            views = [items[i][3] or f"#{i}" for i in foreign]
            why = (f"{len(views)} of its params ({', '.join(map(str, views[:3]))}{', ...' if len(views) > 3 else ''}) "
                   "are views into a larger buffer that something else holds (ZeroRedundancyOptimizer("
                   "parameters_as_bucket_view=True), FSDP1's use_orig_params, vector_to_parameters): moved into "
                   "flat buffers they would be cut off from it")
        if why is not None:
            self._warn_eager(key, why)
            return None
        keeps = self._fused_chain.keeps_layouts
        strided = [x[3] or f"#{i}" for i, x in enumerate(items)
                   if not x[0].is_contiguous() and not (keeps and dense(x[0]))]
        if strided and ("layout", key) not in self._warned:
            self._warned.add(("layout", key))
            why = ("their elements do not fill one dense block (a strided slice)" if keeps else
                   "this chain views each param in another shape (tensor_view), which needs the logical order")
            warnings.warn(
                f"ChainOptimizer(fused=True): in param group {key[0]}, {len(strided)} params are not contiguous "
                f"({', '.join(map(str, strided[:3]))}{', ...' if len(strided) > 3 else ''}) and the flat buffers "
                f"hold them contiguously, because {why}: they lose their memory format (a channels_last "
                "convolution then converts its weight at every call). fused=False keeps it",
                UserWarning, stacklevel=4)
        old = self._flats.pop(key, None)
        if old is not None:
            old.resync_state()
        # the kept split holds this step's grads, which the flat buffer replaces: let them go first
        self._collected.pop(key[0], None)
        self._checked.pop(key, None)
        states = [x[2] for x in items]
        fill = (lambda i: self._fill_pending_state(params[i], states[i])) if self._pending else None
        # past the first few groups, rows whatever the number of params: their per-tensor kernels
        # can then share one compiled graph (fused.runner.STATIC_BUCKETS)
        fb = FlatBucket(params, states, [x[3] for x in items], fill, chunked=key[0] >= STATIC_BUCKETS,
                        keep_layouts=keeps, grad_dtype=grad_dtypes.pop())
        fb.step_host = None
        self._flats[key] = fb
        # a param is in one flat bucket: one made under another key before (its group deleted or
        # reordered, its route changed) is left behind, and its zero_grad() would drop these grads
        taken = set(map(id, params))
        for other, stale in list(self._flats.items()):
            if other != key and any(id(q) in taken for q in stale.params):
                del self._flats[other]
                self._collected.pop(other[0], None)
                self._checked.pop(other, None)
        return fb

    def _warn_eager(self, key: tuple, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"ChainOptimizer(fused=True): param group {key[0]} runs on the eager path because {why}",
                          RuntimeWarning, stacklevel=4)

    def _warn_copied_grads(self, key: tuple, from_views: bool, with_graph: bool = False) -> None:
        if ("copied", key) in self._warned:
            return
        self._warned.add(("copied", key))
        head = f"ChainOptimizer(fused=True): the gradients of param group {key[0]} arrived as "
        if with_graph:
            # under create_graph autograd adds a new gradient to the old one out of place, so that the
            # sum has a graph: a new tensor at every step whatever resets it
            why = (f"tensors with a graph {COPIED_GRADS_WARN_STEPS} steps in a row (backward(create_graph=True)), "
                   "so each step copies them into the flat gradient buffer (a read and a write of every gradient): "
                   "with create_graph, autograd makes a new gradient tensor at every backward, however the grads "
                   "are reset. fused=False steps them where they are")
        elif from_views:
            # DDP with gradient_as_bucket_view=True copies p.grad into its bucket and points p.grad at
            # the bucket after every backward: the same copies as with False, which writes in place
            why = (f"views of another buffer {COPIED_GRADS_WARN_STEPS} steps in a row, so each step copies them "
                   "into the flat gradient buffer. DistributedDataParallel(gradient_as_bucket_view=True) does this: "
                   "it points p.grad at its buckets after every backward. With fused=True that option saves no "
                   "memory (the gradients live in the flat buffer too); gradient_as_bucket_view=False (DDP's "
                   "default) writes the averaged gradients into p.grad in place, as many copies, without this warning")
        else:
            why = (f"new tensors {COPIED_GRADS_WARN_STEPS} steps in a row, so each step copies them into the flat "
                   "gradient buffer (a read and a write of every gradient). They stay views of that buffer when "
                   "they are reset in place: with this optimizer's zero_grad(), or a wrapper's zero_grad("
                   "set_to_none=False) (ZeroRedundancyOptimizer's), not model.zero_grad() or "
                   "zero_grad(set_to_none=True)")
        warnings.warn(head + why, FusedGradientCopyWarning, stacklevel=4)

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """Reset the gradients. On the fused path (and ``set_to_none`` not given) the flat gradient
        buffers are zeroed in place and ``p.grad`` stays a view into them; elsewhere as torch."""
        if self.fused and set_to_none is None:
            if torch.compiler.is_compiling():
                self._zero_flat_grads_outside_graph()  # a graph break, as step()
            else:
                self._zero_flat_grads()
            return
        super().zero_grad(set_to_none=True if set_to_none is None else set_to_none)

    @torch.compiler.disable
    def _zero_flat_grads_outside_graph(self) -> None:
        self._zero_flat_grads()

    def _zero_flat_grads(self) -> None:
        by_group: dict[int, list[FlatBucket]] = {}
        for key, fb in self._flats.items():
            fb.zero_grad()
            by_group.setdefault(key[0], []).append(fb)
        flat_params = None
        for gi, group in enumerate(self.param_groups):
            params = group["params"]
            held = by_group.get(gi, ())
            if len(held) == 1 and len(held[0].params) == len(params) and all(map(operator.is_, held[0].params, params)):
                continue  # the group is one flat bucket (the common case): no loop over its params here
            if flat_params is None:
                flat_params = {id(p) for fb in self._flats.values() for p in fb.params}
            for p in params:
                if id(p) not in flat_params and p.grad is not None:
                    p.grad = None
        self._grads_reset = True  # grads no backward reaches before the step are dropped there

    def _drop_unwritten_grads(self) -> None:
        """Set to None the zero grads that ``zero_grad()`` kept (flat views) where no gradient
        reached them since: torch's ``zero_grad()`` would have dropped them, and its step skips a
        param without a grad, where a step with a zero grad would move it by its weight decay and
        momentum. A bucket that nothing wrote into since the reset (a step with no backward, or a
        param group the loss did not reach) keeps its flat grads' version; a frozen param
        (``requires_grad=False``) gets nothing from a backward. Writes the version cannot see (through
        ``p.grad.data``), and a frozen param's grad written before it was frozen, show in the values:
        there a kept grad holding a value other than 0 was written and is stepped (one all zeros
        counts as not written). A grad given as a new tensor (``p.grad = g``) is kept and stepped, as
        under torch."""
        if not self._grads_reset:
            return
        for fb in self._flats.values():
            if fb.grads_moved():  # grads pointed at other memory since (model.to()): their values first
                fb.repair_grad_views(keep_values=True)
            written = fb.flat_grads._version != fb.reset_version
            if written and all(map(_REQUIRES_GRAD, fb.params)):
                continue
            kept = [(p, v) for p, v in zip(fb.params, fb.grad_views)
                    if p.grad is v and not (written and p.requires_grad)]
            if not kept:
                continue
            if not written and not bool(fb.flat_grads.any()):  # (one read, where nothing wrote: the common case)
                for p, _ in kept:
                    p.grad = None
                continue
            nonzero = torch.stack([v.ne(0).any() for _, v in kept]).tolist()
            for (p, _), live in zip(kept, nonzero, strict=True):
                if not live:
                    p.grad = None

    def fused_plan(self) -> list[tuple[str, list[str]]]:
        """What the fused path does with this chain: ``("compiled" | "eager", [transform names])`` per segment."""
        return self._fused_chain.describe()

    @property
    def compile_seconds(self) -> float:
        """Seconds the fused path has spent compiling (its first steps)."""
        return self._fused_chain.compile_seconds

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus ``"gradchain"``: the chain's transform names, checked on load.
        Hooks from ``register_state_dict_post_hook`` see (and may replace) the finished state dict,
        optimizer-level state and the encoded schedules included, as the one returned."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post_hooks)()  # run below, on what this method adds too
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # plain dicts (torch.load weights_only)
        encode_groups(sd["param_groups"])  # schedules as plain descriptions (torch.load weights_only)
        sd["gradchain"] = {"transforms": self.transform.signature()}
        # on the first param of the first group that has one (a first group may be empty)
        holder = next((g["params"][0] for g in sd["param_groups"] if g["params"]), None)
        if self.global_state and holder is not None:
            entry = dict(sd["state"].get(holder, {}))  # a copy: the live state stays as it is
            entry.update({_GLOBAL + k: v for k, v in self.global_state.items()})
            sd["state"][holder] = entry
        for hook in post_hooks.values():
            replaced = hook(self, sd)
            if replaced is not None:
                sd = replaced
        return sd

    def _expected_state(self, p: Tensor, name: str | None, group: dict[str, Any]) -> dict[str, Any] | None:
        """The state this chain makes for ``p`` as it is now (``state_dtype`` included), on the meta
        device; None if its init cannot run there."""
        try:
            return self._new_state(torch.empty(tuple(p.shape), dtype=p.dtype, device="meta"), name, group)
        except Exception:
            return None

    @staticmethod
    def _check_loaded(label: Any, expected: dict[str, Any], loaded: dict[str, Any]) -> None:
        """Refuse state that cannot belong to this param: other shapes, integer moments, a bad step."""
        for key, want in expected.items():
            got = loaded[key]
            if key == "step":
                scalar = not isinstance(got, Tensor) or got.numel() == 1
                number = isinstance(got, (Tensor, int, float)) and not isinstance(got, bool) and scalar
                value = float(got) if number else None
                if value is None or not math.isfinite(value) or value < 0:
                    raise ValueError(f"state dict: param {label} has an invalid step {got!r} (a count >= 0)")
                continue
            if not isinstance(want, Tensor):
                continue
            if not isinstance(got, Tensor):
                raise ValueError(f"state dict: param {label} state {key!r} is a {type(got).__name__}, not a tensor")
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(
                    f"state dict: param {label} state {key!r} has shape {tuple(got.shape)}, this param needs "
                    f"{tuple(want.shape)}: is the state dict from another model?"
                )
            if got.is_floating_point() != want.is_floating_point() or got.is_complex() != want.is_complex():
                raise ValueError(
                    f"state dict: param {label} state {key!r} has dtype {got.dtype}, this chain keeps {want.dtype}"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, its floating state cast to the dtypes this optimizer keeps (torch would
        cast it to the param's dtype: bf16 moments for a bf16 model, where gradchain keeps fp32).

        Raises ``ValueError`` when it comes from a different chain: other transform names, other
        state buffers, other group structure or hyperparameters this chain does not declare.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        mine = self.transform.signature()
        meta = state_dict.get("gradchain")
        if meta is None and any({"foreach", "capturable"} & set(g) for g in state_dict.get("param_groups", ())):
            raise ValueError(
                "state dict is from a torch.optim optimizer (its param groups have foreach/capturable), not from a "
                "ChainOptimizer: gradchain keys state by transform ('adam.exp_avg', not 'exp_avg') and does not "
                "convert torch checkpoints. Resume with the torch optimizer, or start this one's state afresh"
            )
        if meta is not None and list(meta.get("transforms", [])) != mine:
            raise ValueError(
                f"state dict is from a different chain: it has transforms {list(meta['transforms'])}, "
                f"this optimizer has {mine}"
            )
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        decode_groups(saved_groups, groups)
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=False)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {i} has {len(g['params'])} params, the state dict's has {len(sg['params'])}"
                )
        id_map, name_map, group_map = {}, {}, {}
        for g, sg in zip(groups, saved_groups, strict=False):
            for pid, p, name in zip(sg["params"], g["params"], self._names(g), strict=False):
                id_map[pid], name_map[pid], group_map[pid] = p, name, sg
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        saved_global: dict[str, Tensor] = {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict) and any(isinstance(key, str) and key.startswith(_GLOBAL) for key in v):
                saved_global.update({key[len(_GLOBAL):]: val for key, val in v.items() if key.startswith(_GLOBAL)})
                v = {key: val for key, val in v.items() if not key.startswith(_GLOBAL)}
                if not v:
                    continue
            if k not in id_map:
                state[k] = deepcopy(v)
                continue
            if isinstance(v, dict) and not v:
                continue  # no state yet (an entry that reading opt.state[p] leaves, as torch saves it)
            p = id_map[k]
            expected = self._expected_state(p, name_map[k], group_map[k])
            if expected is not None and set(v) != set(expected):
                raise ValueError(
                    f"state dict is from a different chain: param {name_map[k] or k} has state "
                    f"{sorted(v)}, this chain keeps {sorted(expected)}"
                )
            if expected is not None:
                self._check_loaded(name_map[k] or k, expected, v)
            # copies: the optimizer must not share buffers with the dict (or with another optimizer).
            # Floating state takes the dtype this optimizer keeps for it (float64 params, another
            # state_dtype): the step would refuse any other; a bf16 model's fp32 moments stay fp32,
            # where torch's loader would cast them to the param's dtype
            state[p] = {
                key: (val.to(device=p.device, dtype=_kept_dtype(val, (expected or {}).get(key)), copy=True)
                      if key != "step" else val.clone())
                if isinstance(val, Tensor)
                else deepcopy(val)
                for key, val in v.items()
            }
            step = state[p].get("step")
            if step is not None and not (isinstance(step, Tensor) and step.dim() == 0
                                         and step.dtype == torch.float32):
                # a count as this optimizer makes it: older torch checkpoints keep a Python number,
                # others an integer or 1-element tensor
                state[p]["step"] = torch.tensor(float(step), dtype=torch.float32)
        new_groups = []
        for g, sg in zip(groups, saved_groups, strict=False):
            # a state dict saved before a group option existed (maximize, ...) takes today's default
            for key, value in self.defaults.items():
                sg.setdefault(key, deepcopy(value))
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            self._check_group(sg)
            new_groups.append(sg)
        self._check_across_groups(new_groups)
        self.__setstate__({"state": state, "param_groups": new_groups})
        # a state dict saved before the first step has none: it is then made at the next step
        device = next((g["params"][0].device for g in groups if g["params"]), None)
        self.global_state = {k: v.detach().clone().to(device) for k, v in saved_global.items()}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["transform"] = self.transform
        d["state_dtype"] = self.state_dtype
        d["global_state"] = self.global_state
        d["fused"] = getattr(self, "fused", False)
        d["atomic"] = getattr(self, "atomic", "first")
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "transform" in self.__dict__:
            flats = self.__dict__.get("_flats")
            if flats:
                for fb in flats.values():
                    fb.resync_state()
                    mark_flat(fb.flat_params)  # (a loaded storage has lost its tag)
            self._init_runtime()
