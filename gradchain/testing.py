"""Contract checks for transforms and recipes: the tests gradchain runs on its own, for yours.

``check_transform`` runs on a transform you wrote the same contract that every transform and
recipe of gradchain passes in the project's own test suite. A failure raises ``AssertionError``
saying in words what failed, for which param and which state key; a check that cannot run here
(no gloo for FSDP2, no fused path) is skipped and the returned :class:`Report` says why::

    import functools
    import gradchain as gc
    from gradchain.testing import check_transform

    def my_optimizer(lr: float = 1e-2, beta: float = 0.9) -> gc.Transform:
        return gc.chain(gc.trace(beta), gc.scale_by_lr(lr))

    def test_my_optimizer():   # under pytest, or call it anywhere
        report = check_transform(functools.partial(my_optimizer, lr=1e-2))
        print(report)          # what ran, what was skipped and why

    if __name__ == "__main__":  # in a script: the FSDP2 check's two spawned ranks import it
        test_my_optimizer()

``check_transform`` takes a transform, or a function of no arguments that builds one (a module-level
function or a ``functools.partial``: the FSDP2 check sends it to two spawned processes, so it must
pickle). The transform runs in a :class:`~gradchain.ChainOptimizer` on :class:`TinyNet` (a conv
layer, linear layers, a LayerNorm, biases, a 0-d gain and a param that never gets a gradient),
with ``overrides`` passed to the optimizer. A transform that only makes sense for some params
(matrices only, say) is wrapped the way a user would: ``gc.masked(t, lambda name, p: p.ndim >= 2)``.

The checks, each also a function of its own taking a :class:`Case`:

- ``contract``: state keys ``"<transform>.<buffer>"`` and a 0-d fp32 ``step``; no state and no
  change for a param without a gradient; ``step(closure)`` and ``step(loss=)`` return the loss;
  step hooks run once; ``deepcopy``; a state dict of another chain is refused.
- ``invalid_hyperparams``: a negative ``lr`` (where declared) raises ``ValueError`` naming it.
- ``hyperparams_used``: every declared hyperparameter with a number value (each entry of a tuple
  such as ``betas`` on its own), set to another valid value in the param groups after two steps
  (or at construction, where a change mid-run is refused), changes the params or the state of the
  steps after it. A transform that reads the value its factory was given instead of ``hp[name]``
  ignores per-group values and schedulers, and fails here. A value that by design changes nothing
  over a short run (a warmup longer than the run, a threshold the run never reaches) is named in
  ``Case.inert``; a name there that does change the run fails too (the list stays true).
- ``resume``: state dict -> ``torch.save`` -> ``torch.load(weights_only=True)`` -> a fresh
  optimizer -> the rest of the run equals an uninterrupted run bit for bit, params and state.
- ``skipped_steps``: an accumulation mini-step (``accumulate(t, 2)``) and a non-finite step inside
  ``apply_if_finite`` move no param and no state.
- ``gradscaler``: a run under ``torch.amp.GradScaler`` with an injected inf batch equals, bit for
  bit, a plain run without that batch (power-of-two scales unscale exactly).
- ``aliasing``: the update that standalone ``Transform.update`` returns shares memory with no
  state buffer and no gradient, and writing into it changes no state; in an optimizer (fp32 and
  bf16 params), with an identity after each part of the chain and then a transform that writes
  its input in place, a deferred scale and a decay, every state entry and param is exactly as when
  copies stand for the identities: no write reaches a state buffer.
- ``dtypes``: fp64, fp32, bf16 and fp16 params compared number by number with a float64 run fed
  the same gradients (tolerance below); fp16/bf16 params keep fp32 state.
- ``zero_size``: params of shapes (0, 4), (4, 0), (0, 0) and (0,) with gradients are taken, stay
  as they are, their state stays finite, and the other params follow the run without them (to
  float64 rounding: a global norm may sum in another order); the 0-d gain stays finite.
- ``nonfinite``: one NaN or +-inf gradient entry (in a matrix, a vector, the 0-d gain) either
  raises, or shows as a non-finite update (so ``apply_if_finite`` sees it); it never enters the
  state while every update stays finite.
- ``sparse``: a sparse gradient raises an error that says so.
- ``pieces``: the eager CPU step in pieces small enough to cut the model's tensors equals the step
  over whole buckets to float64 rounding (a wrong ``elementwise``/``rowwise``/``step_scalars``
  declaration shows only on tensors larger than a piece otherwise).
- ``fused``: if ``ChainOptimizer`` accepts ``fused=True``, the fused run equals the eager one
  within the dtype tolerance of float32; skipped with the constructor's message if it refuses.
- ``fsdp2`` (in ``check_transform`` unless ``fsdp2=False``; or :func:`check_fsdp2`): under FSDP2 on 2 gloo
  processes (uneven shards, one param whose shard is empty on a rank, and two params left plain
  by ``ignored_params`` in the same group as sharded ones) the run equals one process to 1e-12 in
  float64. The two processes are spawned and import the calling script: call ``check_transform``
  under ``if __name__ == "__main__":`` in a script, or pass ``fsdp2=False``.

How ``dtypes`` compares. Every run gets the same gradients (fixed by the step, rounded to the
param dtype) and starts from the same params; the float64 run gets them too.

- fp64 params: bit for bit equal to the float64 run (the step is deterministic).
- fp32 params, per element after ``n`` steps: each write rounds by at most ``u |p|`` (unit roundoff
  ``u = 2^-24``), so ``n`` writes by at most ``n u max_t |p_t|``; the update computed in fp32
  differs by a relative ``dtype_rtol`` (default 1e-5: fp32 carries 7 digits, this leaves 2 for
  cancellation over a few dozen operations) of the distance the element travelled, summed over
  the steps. The bound is doubled for the feedback of a rounded param into later updates (decay,
  trust ratios). The float64 run must move some entry further than that, else the comparison
  could not fail, and the check says so. ``fused`` compares fused and eager fp32 runs this way.
- bf16 and fp16 params: their state and math are fp32, far finer than the params, so they are
  compared with the float64 run *rounded to bf16/fp16 after every step*: both write the same
  number unless the fp32 and the float64 update fall on two sides of a rounding boundary, which
  a relative error ``dtype_rtol`` of an update ``du`` does with probability about
  ``dtype_rtol |du| / ulp``, moving the param by one ulp. So every entry must be within ``n``
  ulps, and at most ``1 + 0.1%`` of the entries (fp32-to-bf16 double-rounding ties) plus 4 times
  the expected count may differ at all. An update rounded to the param dtype before the write,
  or state kept in bf16, differs far more often and fails. At least 1% of the entries must move.

A transform whose math runs in a lower precision on purpose (Muon's bf16 Newton-Schulz) sets
``Case(dtype_rtol=2**-8)``, that precision.

Importing this module imports nothing beyond ``gradchain`` and torch (no pytest);
``import gradchain`` does not import it.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import multiprocessing
import os
import pickle
import socket
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from .base import Chain, Transform, chain, transform
from .combinators import accumulate, apply_if_finite
from .hyperparams import Hyperparam
from .optimizer import ChainOptimizer, FusedGradientCopyWarning

__all__ = [
    "CHECKS",
    "Case",
    "CheckSkipped",
    "RecipeCase",
    "Report",
    "TinyNet",
    "batch",
    "check_aliasing",
    "check_contract",
    "check_dtypes",
    "check_fsdp2",
    "check_fused",
    "check_gradscaler",
    "check_hyperparams_used",
    "check_invalid_hyperparams",
    "check_nonfinite",
    "check_pieces",
    "check_recipe",
    "check_resume",
    "check_skipped_steps",
    "check_sparse_rejected",
    "check_transform",
    "check_zero_size",
    "lockstep_gap",
    "loss_fn",
    "make_model",
    "make_optimizer",
    "train",
]


class CheckSkipped(Exception):
    """A check that cannot run here (no gloo, no fused path, a factory that does not pickle)."""


@dataclass
class Case:
    """A transform under test.

    ``factory`` is a :class:`~gradchain.Transform` or a function of no arguments returning one
    (each check builds a fresh one); ``overrides`` go to ``ChainOptimizer``; ``steps`` is the run
    length of the multi-step checks; ``skip`` names checks to leave out; ``dtype_rtol`` is the
    relative error allowed in the update computed below float64 (see the module docstring);
    ``optimizer`` builds the optimizer (``ChainOptimizer`` or a subclass with its signature), so
    the same checks run on an optimizer of your own; ``inert`` names the hyperparameters (``"b"``,
    or ``"betas[1]"`` for one entry of a tuple) that by design change nothing over this short run
    (the ``hyperparams_used`` check).
    """

    label: str
    factory: Transform | Callable[[], Transform]
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 6
    skip: tuple[str, ...] = ()
    dtype_rtol: float = 1e-5
    optimizer: Callable[..., ChainOptimizer] = ChainOptimizer
    inert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.skip = _valid_skip(self.skip)
        if isinstance(self.inert, str):
            raise ValueError(f"invalid inert={self.inert!r}: pass a sequence of names, e.g. inert=({self.inert!r},)")
        self.inert = tuple(self.inert)


def _valid_skip(skip: Any) -> tuple[str, ...]:
    """``skip`` as a tuple of check names; a name that is no check (a typo would run it) raises ``ValueError``."""
    if isinstance(skip, str):
        raise ValueError(f"invalid skip={skip!r}: pass a sequence of check names, e.g. skip=({skip!r},)")
    skip = tuple(skip)
    valid = [*CHECKS, "fused", "fsdp2"]
    unknown = [n for n in skip if n not in valid]
    if unknown:
        raise ValueError(f"skip names no such check: {unknown}; the checks are {valid}")
    return skip


RecipeCase = Case  # the name the project's tests use


@dataclass
class Report:
    """What a ``check_*`` call ran and what it skipped (check name -> why)."""

    label: str
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.label}: {len(self.passed)} checks passed ({', '.join(self.passed)})"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _fail(message: str) -> None:
    raise AssertionError(message)


def _build(case: Case) -> Transform:
    t = copy.deepcopy(case.factory) if isinstance(case.factory, Transform) else case.factory()
    if not isinstance(t, Transform):
        raise TypeError(f"{case.label}: the factory returned {type(t).__name__}, not a gradchain Transform")
    return t


# -- the model and the data every check uses -----------------------------------------------------
class TinyNet(nn.Module):
    """Conv (4-d), linear (2-d), norm gains (1-d), biases, a 0-d gain, and a param with no grad;
    with ``one_row`` also a (1, 3) output scale (under FSDP2 on 2 ranks: one rank's shard empty)."""

    def __init__(self, scalar: bool = True, one_row: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.fc1 = nn.Linear(20, 13)
        self.fc2 = nn.Linear(13, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)
        self.gain = nn.Parameter(torch.tensor(1.0)) if scalar else None
        self.unused = nn.Parameter(torch.ones(4))
        self.row = nn.Parameter(torch.tensor([[1.0, 0.5, -0.8]])) if one_row else None

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.conv(x)).flatten(1)
        x = torch.tanh(self.fc1(x))
        x = self.norm(torch.tanh(self.fc2(x)))
        out = self.head(x)
        out = out * self.gain if self.gain is not None else out
        return out * self.row if self.row is not None else out


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0, scalar: bool = True,
               one_row: bool = False) -> TinyNet:
    """A :class:`TinyNet` with the weights of ``seed``, in ``dtype``."""
    torch.manual_seed(seed)
    return TinyNet(scalar, one_row).to(dtype)


def batch(i: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ``i``-th batch of inputs and targets for :class:`TinyNet` (fixed by ``i``)."""
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(8, 2, 4, 4, generator=g).to(dtype)
    y = torch.randn(8, 3, generator=g).to(dtype)
    return x, y


def loss_fn(model: nn.Module, i: int, dtype: torch.dtype) -> Tensor:
    """Mean squared error of ``model`` on batch ``i``, computed in fp32 or better."""
    x, y = batch(i, dtype)
    return ((model(x).float() - y.float()) ** 2).mean()


def make_optimizer(case: Case, model: nn.Module, **extra: Any) -> ChainOptimizer:
    """A ``ChainOptimizer`` over ``model.named_parameters()`` with a fresh transform of ``case``."""
    named = [(n, p) for n, p in model.named_parameters()]
    return case.optimizer(named, _build(case), **{**case.overrides, **extra})


def train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int, dtype: torch.dtype) -> None:
    """``steps`` plain steps on batches ``start, start + 1, ...``; the loss goes to ``step(loss=)``."""
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_fn(model, i, dtype)
        loss.backward()
        opt.step(loss=loss.detach())


# -- comparing ------------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Equal dtype, shape and values, NaN equal to NaN (a run that goes NaN twice is the same run)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    return a == b


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _state_by_name(opt: ChainOptimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    names = _param_names(model)
    out = {}
    for p, st in opt.state.items():
        if isinstance(p, Tensor):
            out[names.get(id(p), str(tuple(p.shape)))] = {
                k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()
            }
    glob = getattr(opt, "global_state", {})
    if glob:
        out["<optimizer-level state>"] = {k: v.detach().clone() for k, v in glob.items()}
    return out


def _params_by_name(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _describe(x: Any, y: Any) -> str:
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        if x.dtype != y.dtype:
            return f"dtype {x.dtype} vs {y.dtype}"
        if x.shape != y.shape:
            return f"shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.is_floating_point():
            gap = (x.double() - y.double()).abs()
            gap = gap[~gap.isnan()]
            return f"largest difference {gap.max().item() if gap.numel() else float('nan'):.3e}"
    return f"{x!r} vs {y!r}"


def _assert_same_params(a: dict[str, Tensor], b: dict[str, Tensor], what: str) -> None:
    for name, x in a.items():
        if not _same(x, b[name]):
            _fail(f"{what}: param {name} differs ({_describe(x, b[name])})")


def _assert_same_state(a: dict, b: dict, what: str, ignore: Sequence[str] = ()) -> None:
    """Same params with state, same keys, same values; keys whose transform is in ``ignore`` excepted."""
    if a.keys() != b.keys():
        _fail(f"{what}: the params with state differ: {sorted(a)} vs {sorted(b)}")
    for pname in a:
        ka = {k for k in a[pname] if k.split(".", 1)[0] not in ignore and k not in ignore}
        kb = {k for k in b[pname] if k.split(".", 1)[0] not in ignore and k not in ignore}
        if ka != kb:
            _fail(f"{what}: param {pname} has state keys {sorted(ka)} vs {sorted(kb)}")
        for k in sorted(ka):
            if not _same(a[pname][k], b[pname][k]):
                _fail(f"{what}: state {k!r} of param {pname} differs ({_describe(a[pname][k], b[pname][k])})")


# -- the single-process checks --------------------------------------------------------------------
def check_contract(case: Case) -> None:
    """State keys, no state for grad-None params, closure/loss= return, hooks, deepcopy, foreign state."""
    dtype = torch.float64
    model = make_model(dtype)
    opt = make_optimizer(case, model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    unused_before = model.unused.detach().clone()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn(model, 0, dtype)
        loss.backward()
        return loss

    before = _params_by_name(model)
    ret = opt.step(closure)
    if not isinstance(ret, Tensor):
        _fail(f"step(closure) returned {type(ret).__name__}, not the closure's loss")
    if calls != ["pre", "post"]:
        _fail(f"the step pre- and post-hooks were not called once each: {calls}")
    if not torch.equal(model.unused, unused_before):
        _fail("param 'unused' has no gradient but the step changed it")
    if opt.state.get(model.unused):
        _fail(f"param 'unused' has no gradient but got state {sorted(opt.state[model.unused])}")
    if all(torch.equal(before[n], p) for n, p in model.named_parameters()):
        _fail("the first step changed no param")
    names = _param_names(model)
    for p, st in opt.state.items():
        for k in st:
            if k != "step" and "." not in k:
                _fail(f"state key {k!r} of param {names.get(id(p))} is not '<transform name>.<buffer>'")
        s = st.get("step")
        if not (isinstance(s, Tensor) and s.dim() == 0 and s.dtype == torch.float32 and float(s) == 1.0):
            _fail(f"state 'step' of param {names.get(id(p))} after one step is {s!r}, not a 0-d fp32 tensor 1.0")
    loss = loss_fn(model, 1, dtype)
    opt.zero_grad()
    loss.backward()
    if opt.step(loss=loss.detach()) is None:
        _fail("step(loss=...) did not return the loss")
    clone = copy.deepcopy(opt)
    if clone.state_dict()["gradchain"] != opt.state_dict()["gradchain"]:
        _fail("a deepcopy of the optimizer has another chain signature")
    other = case.optimizer(list(model.named_parameters()), chain(_copy_probe("gradchain_testing_other")))
    try:
        other.load_state_dict(opt.state_dict())
    except ValueError as e:
        if "different chain" not in str(e):
            _fail(f"loading another chain's state dict raised ValueError without saying so: {e}")
    else:
        _fail("loading another chain's state dict did not raise")


def check_invalid_hyperparams(case: Case) -> None:
    """A negative lr (when declared) raises ValueError naming it, at construction and add_param_group."""
    model = make_model()
    opt = make_optimizer(case, model)
    if "lr" not in opt.defaults:
        raise CheckSkipped("the transform declares no 'lr'")
    try:
        make_optimizer(case, model, lr=-1.0)
    except ValueError as e:
        if "lr" not in str(e):
            _fail(f"lr=-1 raised ValueError without naming lr: {e}")
    else:
        _fail("ChainOptimizer(..., lr=-1) did not raise")
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    try:
        opt.add_param_group({"params": [extra], "lr": -0.5})
    except ValueError as e:
        if "lr" not in str(e):
            _fail(f"add_param_group with lr=-0.5 raised ValueError without naming lr: {e}")
    else:
        _fail("add_param_group with lr=-0.5 did not raise")
    if len(opt.param_groups) != 1:
        _fail("a refused add_param_group left a param group behind")


_CHANGE_AT = 2  # steps run before a hyperparameter changes in the param groups
_TRIES = 4  # accepted other values tried per hyperparameter before it counts as changing nothing


def _other_values(v: Any) -> list[Any]:
    """Other values for a number hyperparameter ``v``, in the order tried (the optimizer refuses invalid ones)."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v + 10, *([v - 1] if v > 0 else [])]
    if isinstance(v, float):
        if math.isinf(v):
            return [2.0, 1.5, 10.0]
        if v == 0.0:
            return [0.1, 0.5, 0.9, 1e-3, 1.0, 2.0]
        return [v * 1.5, v * 10, v + 0.1, v * 0.5, v * 0.1, v - 0.1, 0.5, 2.0, 1e-3]
    if isinstance(v, Tensor) and v.dim() == 0 and v.is_floating_point():
        return [torch.tensor(x, dtype=v.dtype) for x in _other_values(v.item())]
    return []


def _variants(key: str, v: Any) -> list[tuple[str, Any]]:
    """(label, new value) pairs: each entry of a tuple or list varied on its own, as ``key[i]``."""
    if isinstance(v, (tuple, list)):
        return [(f"{key}[{i}]", type(v)([*v[:i], y, *v[i + 1:]])) for i, x in enumerate(v) for y in _other_values(x)]
    return [(key, y) for y in _other_values(v)]


def _hyperparam_run(case: Case, change: tuple[str, Any] | None, at_construction: bool) -> tuple[dict, dict]:
    """Params and state after ``case.steps`` steps on fixed float64 gradients, with ``change`` (name,
    value) set in every param group after ``_CHANGE_AT`` steps, or passed at construction."""
    model = make_model(torch.float64)
    extra = {change[0]: change[1]} if change is not None and at_construction else {}
    opt = make_optimizer(case, model, **extra)
    for i in range(case.steps):
        if change is not None and not at_construction and i == _CHANGE_AT:
            for group in opt.param_groups:
                group[change[0]] = change[1]
        for p, g in zip(model.parameters(), _synthetic_grads(model, i)):
            p.grad = g
        opt.step(loss=_synthetic_loss(i))
    return _params_by_name(model), _state_by_name(opt, model)


def _same_run(a: tuple[dict, dict], b: tuple[dict, dict]) -> bool:
    (pa, sa), (pb, sb) = a, b
    if any(not _same(x, pb[n]) for n, x in pa.items()) or sa.keys() != sb.keys():
        return False
    return all(sa[n].keys() == sb[n].keys() and all(_same(v, sb[n][k]) for k, v in sa[n].items()) for n in sa)


def check_hyperparams_used(case: Case) -> str | None:
    """Each declared number hyperparameter, changed in the param groups, changes the run (see the module docstring)."""
    defaults = make_optimizer(case, make_model(torch.float64)).defaults
    declared = {label for key, v in defaults.items() for label, _ in _variants(key, v)} | set(defaults)
    unknown = [n for n in case.inert if n not in declared]
    if unknown:
        _fail(f"Case.inert names no hyperparameter of the optimizer: {unknown}; it declares {sorted(defaults)}")
    base = _hyperparam_run(case, None, False)
    candidates: dict[str, list[tuple[str, Any]]] = {}
    untried = [key for key, v in defaults.items() if not _variants(key, v)]
    for key, v in defaults.items():
        for label, new in _variants(key, v):
            candidates.setdefault(label, []).append((key, new))
    idle, moved_inert = [], []
    for label, pairs in candidates.items():
        tried, moved = [], None
        values = 0
        for key, new in pairs:
            # mid-run, then at construction: a value that only acts early (a warmup) or that the run
            # fixes (amsgrad) changes nothing there or is refused there
            accepted = False
            for at_construction in (False, True):
                try:
                    run = _hyperparam_run(case, (key, new), at_construction)
                except (ValueError, TypeError):
                    continue
                accepted = True
                tried.append(f"{new!r} {'at construction' if at_construction else f'after step {_CHANGE_AT}'}")
                if not _same_run(base, run):
                    moved = tried[-1]
                    break
            values += accepted
            if moved or values >= _TRIES:
                break
        if not tried:
            untried.append(label)
        elif label in case.inert and moved:
            moved_inert.append(f"{label} ({moved})")
        elif label not in case.inert and not moved:
            idle.append(f"{label} (tried {', '.join(tried)})")
    if idle:
        _fail(f"hyperparameter(s) that change nothing when set in the param groups: {'; '.join(idle)}: params and "
              "state ended exactly as without the change. The transform reads another value than the param "
              "group's (its factory's?) or ignores it; one that by design changes nothing over a short run goes "
              "in Case(inert=...)")
    if moved_inert:
        _fail(f"Case.inert names hyperparameter(s) that do change the run: {'; '.join(moved_inert)}")
    return f"not varied (no other valid number): {untried}" if untried else None


def check_resume(case: Case, dtype: torch.dtype = torch.float64) -> None:
    """Save -> torch.load(weights_only=True) -> load into a fresh optimizer -> continue == uninterrupted."""
    n1, n2 = case.steps // 2 + 1, case.steps - case.steps // 2 + 1
    ref = make_model(dtype)
    ref_opt = make_optimizer(case, ref)
    train(ref, ref_opt, 0, n1 + n2, dtype)

    model = make_model(dtype)
    opt = make_optimizer(case, model)
    train(model, opt, 0, n1, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved = _state_by_name(opt, model)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model(dtype, seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = make_optimizer(case, model2)
    opt2.load_state_dict(ckpt["opt"])
    _assert_same_state(saved, _state_by_name(opt2, model2), "resume: the state right after load_state_dict")
    train(model2, opt2, n1, n2, dtype)
    what = "resume: the resumed run vs an uninterrupted run"
    _assert_same_params(_params_by_name(ref), _params_by_name(model2), what)
    _assert_same_state(_state_by_name(ref_opt, ref), _state_by_name(opt2, model2), what)


def _probe(t: Transform) -> Transform:
    """``t``, allowed after a transform that must end its chain (Lookahead, schedule-free): a probe."""
    t.may_follow_final = True
    return t


def _poison_probe() -> Transform:
    """Multiplies the update by the group's ``gradchain_testing_poison`` (1.0; NaN for one step)."""
    return _probe(transform("gradchain_testing_poison", {"gradchain_testing_poison": Hyperparam(1.0)}, None,
                            _poison_update))


def _poison_update(u: list, state: dict, hp: dict, ctx: Any) -> list:
    return list(torch._foreach_mul(u, hp["gradchain_testing_poison"]))


def check_skipped_steps(case: Case) -> None:
    """An accumulation mini-step and a non-finite step inside apply_if_finite move no param or state."""
    dtype = torch.float64
    acc = Case(case.label, lambda: accumulate(_build(case), 2, name="gradchain_testing_accumulate"), case.overrides,
               optimizer=case.optimizer)
    model = make_model(dtype)
    opt = make_optimizer(acc, model)
    train(model, opt, 0, 2, dtype)  # a mini-step, then a real step: the state is not all zeros
    params, state = _params_by_name(model), _state_by_name(opt, model)
    train(model, opt, 2, 1, dtype)
    what = "an accumulation mini-step (accumulate(t, 2))"
    _assert_same_params(params, _params_by_name(model), what)
    _assert_same_state(state, _state_by_name(opt, model), what, ignore=("gradchain_testing_accumulate", "step"))

    guarded = Case(
        case.label,
        lambda: apply_if_finite(chain(_build(case), _poison_probe()), None, name="gradchain_testing_if_finite"),
        case.overrides,
        optimizer=case.optimizer,
    )
    model = make_model(dtype)
    opt = make_optimizer(guarded, model)
    train(model, opt, 0, 1, dtype)
    params, state = _params_by_name(model), _state_by_name(opt, model)
    for g in opt.param_groups:
        g["gradchain_testing_poison"] = float("nan")
    train(model, opt, 1, 1, dtype)
    what = "a step whose update is NaN inside apply_if_finite"
    _assert_same_params(params, _params_by_name(model), what)
    _assert_same_state(state, _state_by_name(opt, model), what, ignore=("gradchain_testing_if_finite",))
    for g in opt.param_groups:
        g["gradchain_testing_poison"] = 1.0
    train(model, opt, 2, 1, dtype)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            _fail(f"{what}: param {name} is not finite on the finite step after it")


_INF_BATCH = 10_000


def check_gradscaler(case: Case) -> None:
    """A run under GradScaler with an injected inf batch equals a plain run without that batch.

    fp32, a power-of-two scale that grows every 2 steps and halves on the inf step, so unscaling
    is exact: every param and every state entry must match the plain run bit for bit. This holds
    if the step the scaler skips changes nothing, and if the transform sees the unscaled
    gradients and the unscaled loss on the others.
    """
    dtype = torch.float32
    n = min(case.steps, 4)
    k = n // 2
    ref = make_model(dtype)
    ref_opt = make_optimizer(case, ref)
    train(ref, ref_opt, 0, n, dtype)

    model = make_model(dtype)
    opt = make_optimizer(case, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    order = [*range(k), _INF_BATCH, *range(k, n)]
    for i in order:
        opt.zero_grad()
        loss = loss_fn(model, i, dtype)
        scaler.scale(loss).backward()
        if i == _INF_BATCH:
            model.fc1.weight.grad[0, 0] = float("inf")
            params, state = _params_by_name(model), _state_by_name(opt, model)
        scale = scaler.get_scale()
        scaler.step(opt, loss=loss.detach())
        scaler.update()
        if i == _INF_BATCH:
            what = "gradscaler: the step GradScaler skipped (an inf gradient)"
            _assert_same_params(params, _params_by_name(model), what)
            _assert_same_state(state, _state_by_name(opt, model), what)
        if i == _INF_BATCH and not scaler.get_scale() < scale:
            _fail("gradscaler: GradScaler did not register the injected inf gradient (its scale did not back off)")
        if i != _INF_BATCH and scaler.get_scale() < scale:
            _fail(f"gradscaler: GradScaler found a non-finite gradient at batch {i} too, not only at the injected "
                  f"one: under a loss scale of {scale:g} the run overflows (has it diverged?)")
    what = f"gradscaler: a GradScaler run with an inf batch injected after {k} steps vs a plain run without it"
    _assert_same_params(_params_by_name(ref), _params_by_name(model), what)
    _assert_same_state(_state_by_name(ref_opt, ref), _state_by_name(opt, model), what)


def _copy_probe(name: str = "gradchain_testing_copy") -> Transform:
    return transform(name, None, None, _copy_update)


def _copy_update(u: list, state: dict, hp: dict, ctx: Any) -> list:
    return [x.clone() for x in u]


def _identity(u: list, state: dict, hp: dict, ctx: Any) -> list:
    return u


def _inplace_update(u: list, state: dict, hp: dict, ctx: Any) -> list:
    torch._foreach_mul_(u, 0.5)
    torch._foreach_add_(u, 1e-3)
    return u


def _probe_scale(hp: Any, ctx: Any) -> float:
    return 0.5


def _probe_decay(hp: Any, ctx: Any) -> float:
    return -1e-3


def _synthetic_grads(model: nn.Module, i: int, scale: float = 0.1) -> list[Tensor | None]:
    """Gradients fixed by ``i`` (float64), one per param; None for ``unused``."""
    g = torch.Generator().manual_seed(3000 + i)
    return [
        None if n == "unused" else torch.randn(tuple(p.shape), generator=g, dtype=torch.float64) * scale
        for n, p in model.named_parameters()
    ]


def _synthetic_loss(i: int) -> float:
    return 1.0 / (1.0 + 0.25 * i)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_standalone_aliasing(case: Case) -> str | None:
    t = _build(case)
    if any(hasattr(leaf, "init_global_state") for leaf in t.leaves()):
        return "standalone update skipped: the transform keeps optimizer-level state (it needs a ChainOptimizer)"
    model = make_model(torch.float32)
    named = [(n, p.detach().clone()) for n, p in model.named_parameters() if n != "unused"]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    state = t.init(params, names)
    hp = {k: v for k, v in case.overrides.items() if k in t.hyperparams}
    for i in range(3):
        grads = [g.float() for g in _synthetic_grads(model, i) if g is not None]
        grads_before = [g.clone() for g in grads]
        u = t.update(grads, state, params, loss=_synthetic_loss(i), names=names, **hp)
        for j, uj in enumerate(u):
            for m, st in enumerate(state):
                for k, v in st.items():
                    if isinstance(v, Tensor) and _shares_memory(uj, v):
                        _fail(f"aliasing: standalone update of param {names[j]} shares memory with state {k!r} "
                              f"of param {names[m]} (step {i + 1}): the caller's writes into it would change state")
            for m, g in enumerate(grads):
                if _shares_memory(uj, g):
                    _fail(f"aliasing: standalone update of param {names[j]} shares memory with the gradient of "
                          f"param {names[m]} (step {i + 1})")
        for g, gb, n in zip(grads, grads_before, names):
            if not _same(g, gb):
                _fail(f"aliasing: the standalone update wrote into the gradient of param {n} (step {i + 1})")
        torch._foreach_add_(params, u)
        snap = [{k: v.clone() for k, v in st.items() if isinstance(v, Tensor)} for st in state]
        torch._foreach_mul_(u, -3.0)
        torch._foreach_add_(u, 1.0)
        for n, st, sn in zip(names, state, snap):
            for k, v in sn.items():
                if not _same(st[k], v):
                    _fail(f"aliasing: writing into the standalone update changed state {k!r} of param {n} "
                          f"(step {i + 1})")
    return None


def _interleaved(case: Case, isolate: bool) -> Transform:
    """The case's transform with a probe after each of its chain's parts, then in-place work.

    The probe is a copy (``isolate``) or an identity: both fold the pending form at the same
    point, so the two chains compute the same numbers unless a write reaches a state buffer.
    """
    t = _build(case)
    parts = list(t.children) if isinstance(t, Chain) else [t]
    seq: list[Transform] = []
    for i, part in enumerate(parts):
        name = f"gradchain_testing_copy{i}"
        seq += [part, _probe(_copy_probe(name) if isolate else transform(name, None, None, _identity))]
    seq += [_probe(transform("gradchain_testing_inplace", None, None, _inplace_update, inplace=True)),
            _probe(transform("gradchain_testing_scale", scale=_probe_scale)),
            _probe(transform("gradchain_testing_decay", param_term=_probe_decay))]
    # the parts taken out of their chain keep what it declared: shared keys, defaults, fixed options
    shared = getattr(t, "shared_keys", ())
    out = chain(*seq, share=shared) if shared else chain(*seq)
    out.extra_defaults.update(t.extra_defaults)
    if hasattr(t, "fixed_options"):
        out.fixed_options.update(t.fixed_options)
    return out


def check_aliasing(case: Case) -> str | None:
    """No update shares memory with state or grads; later in-place work never changes state."""
    note = _check_standalone_aliasing(case)
    for dtype in (torch.float32, torch.bfloat16):
        runs = []
        for isolate in (False, True):
            c = Case(case.label, lambda isolate=isolate: _interleaved(case, isolate), case.overrides,
                     optimizer=case.optimizer)
            model = make_model(dtype)
            opt = make_optimizer(c, model)
            train(model, opt, 0, 2, dtype)
            runs.append((_params_by_name(model), _state_by_name(opt, model)))
        what = (f"aliasing ({dtype} params): the chain with an identity after each part, then a transform writing "
                "its input in place, a scale and a decay, vs the same with copies for identities: a later write "
                "reached a state buffer")
        _assert_same_state(runs[1][1], runs[0][1], what)
        _assert_same_params(runs[1][0], runs[0][0], what)
    return note


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _tolerance(dtype: torch.dtype, steps: int, peak: Tensor, path: Tensor, rtol: float) -> Tensor:
    """The bound of the module docstring: 2 (n u max|p| + rtol * path) + n subnormal spacings."""
    fi = torch.finfo(dtype)
    return 2 * (steps * _unit_roundoff(dtype) * peak + rtol * path) + steps * fi.tiny * fi.eps


def _synthetic_run(case: Case, dtype: torch.dtype, fused: bool = False) -> tuple:
    """``case.steps`` steps on fixed gradients (rounded to ``dtype``); returns model, optimizer, history."""
    model = make_model(torch.float64).to(dtype)
    opt = make_optimizer(case, model, fused=True) if fused else make_optimizer(case, model)
    history = [[p.detach().double().clone() for p in model.parameters()]]
    for i in range(case.steps):
        for p, g in zip(model.parameters(), _synthetic_grads(model, i)):
            p.grad = None if g is None else g.to(dtype)
        with warnings.catch_warnings():
            # the harness sets new grads on purpose: the fused path's advice about that is not the user's
            warnings.filterwarnings("ignore", category=FusedGradientCopyWarning)
            opt.step(loss=_synthetic_loss(i))
        history.append([p.detach().double().clone() for p in model.parameters()])
    return model, opt, history


def _compare_runs(
    case: Case, dtype: torch.dtype, names: list[str], got: list, ref: list, what: str, rtol: float,
    ref_name: str = "the float64 run",
) -> None:
    """Compare two histories (lists of per-step param lists) with the tolerance of ``dtype``."""
    moved_beyond = False
    for j, name in enumerate(names):
        traj = torch.stack([h[j] for h in ref])
        peak = traj.abs().amax(0)
        path = (traj[1:] - traj[:-1]).abs().sum(0) if len(ref) > 1 else torch.zeros_like(peak)
        tol = _tolerance(dtype, case.steps, peak, path, rtol)
        a, b = got[-1][j], ref[-1][j]
        if not torch.isfinite(a).all():
            _fail(f"{what}: param {name} is not finite")
        err = (a - b).abs()
        bad = err > tol
        if bad.any():
            idx = int((err - tol).flatten().argmax())
            _fail(f"{what}: param {name} differs from {ref_name} by {err.flatten()[idx].item():.3e} at "
                  f"flat index {idx}, more than the tolerance {tol.flatten()[idx].item():.3e} "
                  f"({int(bad.sum())} of {err.numel()} entries)")
        moved_beyond |= bool((path > tol).any())
    if not moved_beyond:
        _fail(f"{what}: {ref_name} moved no entry further than the tolerance, so the comparison could not "
              "fail; raise the learning rate or the steps of the Case")


def check_dtypes(case: Case) -> None:
    """fp64/fp32/bf16/fp16 params against a float64 run on the same gradients; fp32 state for fp16/bf16."""
    ref_model, _, ref_hist = _synthetic_run(case, torch.float64)
    names = [n for n, _ in ref_model.named_parameters()]
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        model, opt, hist = _synthetic_run(case, dtype)
        for name, p in model.named_parameters():
            if p.dtype != dtype:
                _fail(f"dtypes: param {name} changed dtype from {dtype} to {p.dtype}")
        want = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        for pname, st in _state_by_name(opt, model).items():
            for k, v in st.items():
                if k != "step" and isinstance(v, Tensor) and v.is_floating_point() and v.dim() > 0 and v.dtype != want:
                    _fail(f"dtypes: state {k!r} of {dtype} param {pname} is {v.dtype}, expected {want}")
        if dtype == torch.float64:
            for j, name in enumerate(names):
                if not _same(hist[-1][j], ref_hist[-1][j]):
                    _fail(f"dtypes: two float64 runs on the same gradients differ at param {name}: "
                          "the step is not deterministic")
        elif dtype == torch.float32:
            _, _, ref = _synthetic_run_float64(case, dtype, round_params=False)
            _compare_runs(case, dtype, names, hist, ref, "dtypes (fp32 params vs a float64 run)", case.dtype_rtol)
        else:
            _, _, ref = _synthetic_run_float64(case, dtype, round_params=True)
            _compare_rounded_runs(case, dtype, names, hist, ref)


def _synthetic_run_float64(case: Case, dtype: torch.dtype, round_params: bool) -> tuple:
    """A float64 run from the params and on the gradients of ``_synthetic_run(case, dtype)``.

    With ``round_params`` the params are rounded to ``dtype`` after every step: what a ``dtype``
    run whose math and state were exact would hold.
    """
    model = make_model(torch.float64).to(dtype).to(torch.float64)
    opt = make_optimizer(case, model)
    history = [[p.detach().clone() for p in model.parameters()]]
    for i in range(case.steps):
        for p, g in zip(model.parameters(), _synthetic_grads(model, i)):
            p.grad = None if g is None else g.to(dtype).to(torch.float64)
        opt.step(loss=_synthetic_loss(i))
        if round_params:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(dtype))
        history.append([p.detach().clone() for p in model.parameters()])
    return model, opt, history


def _ulp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of ``dtype`` numbers at magnitude ``|x|`` (the subnormal spacing near 0)."""
    fi = torch.finfo(dtype)
    exponent = torch.frexp(x.abs().double()).exponent
    return torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float64), exponent - 1).clamp(min=fi.tiny * fi.eps)


def _compare_rounded_runs(case: Case, dtype: torch.dtype, names: list[str], got: list, ref: list) -> None:
    """A bf16/fp16 run against the float64 run rounded to ``dtype`` after every step.

    The state and the math are fp32, far finer than the params, so the two runs write the same
    ``dtype`` number unless the fp32 update and the float64 one fall on two sides of a rounding
    boundary: a relative error ``rtol`` of an update ``|du|`` does that with probability about
    ``rtol |du| / ulp``. Each such event moves the param by one ulp; so every entry must be within
    ``steps`` ulps, and the entries that differ at all must be few: at most 1 + 0.1% of them (for
    fp32-to-``dtype`` double-rounding ties, 2^-16 per write for bf16) + 4x the expected count.
    An update rounded to ``dtype`` before the write, or state kept in ``dtype``, differs far more often.
    """
    what = f"dtypes ({dtype} params vs a float64 run rounded to {dtype} after every step)"
    total = differ = moved = 0
    expected = 0.0
    for j, name in enumerate(names):
        traj = torch.stack([h[j] for h in ref])
        a, b = got[-1][j], ref[-1][j]
        if not torch.isfinite(a).all():
            _fail(f"{what}: param {name} is not finite")
        ulp = _ulp(traj.abs().amax(0), dtype)
        err = (a - b).abs()
        over = err > case.steps * ulp
        if over.any():
            idx = int((err / ulp).flatten().argmax())
            _fail(f"{what}: param {name} differs by {err.flatten()[idx].item():.3e} = "
                  f"{(err / ulp).flatten()[idx].item():.1f} ulps at flat index {idx}, more than one ulp per step "
                  f"({int(over.sum())} of {err.numel()} entries)")
        steps_moved = (traj[1:] - traj[:-1]).abs()
        expected += float((case.dtype_rtol * steps_moved / _ulp(traj[1:], dtype)).sum())
        differ += int((a != b).sum())
        moved += int((traj[-1] != traj[0]).sum())
        total += a.numel()
    allowed = 1 + 0.001 * total + 4 * expected
    if differ > allowed:
        _fail(f"{what}: {differ} of {total} entries differ, more than the {allowed:.1f} that fp32 math "
              f"explains (relative error {case.dtype_rtol:g}): is the update or the state rounded to {dtype}?")
    if moved < 0.01 * total:
        _fail(f"{what}: the run moved only {moved} of {total} entries (updates below half an ulp), so the "
              "comparison could not fail; raise the learning rate or the steps of the Case")


_EMPTY = {"empty_rows": (0, 4), "empty_cols": (4, 0), "empty_both": (0, 0), "empty_vec": (0,)}


def check_zero_size(case: Case) -> None:
    """Zero-size params are taken and left alone; the others follow the run without them."""
    dtype = torch.float64
    ref = make_model(dtype)
    ref_opt = make_optimizer(case, ref)
    train(ref, ref_opt, 0, 3, dtype)

    model = make_model(dtype)
    empties = {n: nn.Parameter(torch.zeros(s, dtype=dtype)) for n, s in _EMPTY.items()}
    first, last = list(empties.items())[:2], list(empties.items())[2:]
    named = [*first, *model.named_parameters(), *last]
    opt = case.optimizer(named, _build(case), **case.overrides)
    for i in range(3):
        opt.zero_grad()
        loss = loss_fn(model, i, dtype)
        loss.backward()
        for e in empties.values():
            e.grad = torch.zeros_like(e)
        opt.step(loss=loss.detach())
    for n, e in empties.items():
        if e.shape != torch.Size(_EMPTY[n]) or e.dtype != dtype:
            _fail(f"zero_size: param {n} became {tuple(e.shape)} {e.dtype}")
        for k, v in opt.state.get(e, {}).items():
            if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                _fail(f"zero_size: state {k!r} of the empty param {n} is not finite")
    what = "zero_size: a run with params of shapes (0, 4), (4, 0), (0, 0), (0,) vs the run without them"
    got = _params_by_name(model)
    for name, want in _params_by_name(ref).items():
        # to float64 rounding: a reduction over all tensors (a global norm) may sum in another order
        err = (got[name] - want).abs().max().item() if want.numel() else 0.0
        if not err <= 1e-12 * max(want.abs().max().item() if want.numel() else 0.0, 1e-300):
            _fail(f"{what}: param {name} differs by {err:.3e}")
    if not torch.isfinite(model.gain).all():
        _fail("zero_size: the 0-d param gain is not finite")


_BAD_SPOTS = {
    "fc1.weight[0, 0]": lambda m: (m.fc1.weight, (0, 0)),
    "norm.weight[1]": lambda m: (m.norm.weight, (1,)),
    "gain (0-d)": lambda m: (m.gain, ()),
}
_BAD_INPUTS = [("fc1.weight[0, 0]", math.nan), ("fc1.weight[0, 0]", math.inf), ("norm.weight[1]", -math.inf),
               ("gain (0-d)", math.nan)]


def check_nonfinite(case: Case) -> None:
    """A NaN/inf gradient entry raises or shows in the update; it never enters state silently."""
    dtype = torch.float64
    model = make_model(dtype)
    opt = make_optimizer(case, model)
    train(model, opt, 0, 2, dtype)
    for spot, value in _BAD_INPUTS:
        m, o = copy.deepcopy((model, opt))
        o.zero_grad()
        loss = loss_fn(m, 2, dtype)
        loss.backward()
        p, idx = _BAD_SPOTS[spot](m)
        p.grad[idx] = value
        try:
            o.step(loss=loss.detach())
        except Exception:
            continue  # refusing a non-finite gradient is allowed
        if not all(torch.isfinite(q).all() for q in m.parameters()):
            continue  # the non-finite input shows in the update: apply_if_finite sees it
        for pname, st in _state_by_name(o, m).items():
            for k, v in st.items():
                if isinstance(v, Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                    _fail(f"nonfinite: a {value} gradient entry at {spot} entered state {k!r} of param "
                          f"{pname} while every update stayed finite: apply_if_finite cannot see it, and "
                          "the state is poisoned")


def check_sparse_rejected(case: Case) -> None:
    """A sparse gradient raises an error that says 'sparse'."""
    emb = nn.Embedding(10, 4, sparse=True).double()
    opt = case.optimizer(list(emb.named_parameters()), _build(case), **case.overrides)
    emb(torch.tensor([1, 2])).sum().backward()
    try:
        opt.step(loss=torch.tensor(1.0))
    except RuntimeError as e:
        if "sparse" not in str(e):
            _fail(f"a sparse gradient raised RuntimeError without saying 'sparse': {e}")
    else:
        _fail("a sparse gradient did not raise")


def check_fused(case: Case, required: bool = False) -> None:
    """If ``ChainOptimizer(fused=True)`` is accepted: the fused run equals the eager one (fp32 tolerance)."""
    dtype = torch.float32
    try:
        make_optimizer(case, make_model(dtype), fused=True)
    except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
        if required:
            _fail(f"fused: ChainOptimizer(fused=True) was refused: {type(e).__name__}: {e}")
        raise CheckSkipped(f"ChainOptimizer(fused=True) was refused: {type(e).__name__}: {e}") from None
    eager_model, _, eager = _synthetic_run(case, dtype)
    _, _, fused = _synthetic_run(case, dtype, fused=True)
    names = [n for n, _ in eager_model.named_parameters()]
    _compare_runs(case, dtype, names, fused, eager, "fused (fused=True vs eager, fp32)", 1e-5, "the eager run")


def check_pieces(case: Case) -> None:
    """The eager step in pieces (each tensor cut into slices, small ones grouped) equals the step over
    whole buckets, in float64: what a transform declares (``elementwise``, ``rowwise``,
    ``step_scalars``, ``segmented``) decides how the eager CPU step may cut it, and a wrong declaration
    shows only on tensors larger than a piece, 2^18 elements by default."""
    from . import pieces

    saved = pieces.PIECE_NUMEL
    try:
        pieces.PIECE_NUMEL = 0  # whole buckets
        model, _, whole = _synthetic_run(case, torch.float64)
        pieces.PIECE_NUMEL = 16  # cuts every tensor of the model but the smallest
        _, _, cut = _synthetic_run(case, torch.float64)
    finally:
        pieces.PIECE_NUMEL = saved
    names = [n for n, _ in model.named_parameters()]
    _compare_runs(case, torch.float64, names, cut, whole, "pieces (the eager step in pieces of 16 elements, "
                  "float64)", 1e-12, "the run over whole buckets")


CHECKS: dict[str, Callable[[Case], Any]] = {
    "contract": check_contract,
    "invalid_hyperparams": check_invalid_hyperparams,
    "hyperparams_used": check_hyperparams_used,
    "resume": check_resume,
    "skipped_steps": check_skipped_steps,
    "gradscaler": check_gradscaler,
    "aliasing": check_aliasing,
    "dtypes": check_dtypes,
    "zero_size": check_zero_size,
    "nonfinite": check_nonfinite,
    "sparse": check_sparse_rejected,
    "pieces": check_pieces,
}


def _run_checks(case: Case, checks: dict[str, Callable[[], Any]], report: Report) -> None:
    failures: list[str] = []
    first: BaseException | None = None
    for name, fn in checks.items():
        try:
            note = fn()
        except CheckSkipped as e:
            report.skipped[name] = str(e)
            continue
        except AssertionError as e:
            failures.append(f"- {name}: {e}")
            first = first or e
            continue
        except Exception as e:  # a transform that raises where it should not is a failure too
            failures.append(f"- {name}: raised {type(e).__name__}: {e}")
            first = first or e
            continue
        report.passed.append(name)
        if isinstance(note, str):
            report.skipped[f"{name} (part)"] = note
    if failures:
        raise AssertionError(f"{case.label}: {len(failures)} check(s) failed:\n" + "\n".join(failures)) from first


def check_recipe(case: Case, *, fused: bool | None = None) -> Report:
    """Every single-process check (those in ``case.skip`` excepted); raises if any fails.

    ``fused``: None runs the fused check if ``ChainOptimizer`` accepts ``fused=True`` and skips it
    otherwise, True requires it, False leaves it out.
    """
    case.skip = _valid_skip(case.skip)  # also a skip set on the case after it was made
    report = Report(case.label)
    checks: dict[str, Callable[[], Any]] = {
        name: (lambda fn=fn: fn(case)) for name, fn in CHECKS.items() if name not in case.skip
    }
    if fused is not False and "fused" not in case.skip:
        checks["fused"] = lambda: check_fused(case, required=bool(fused))
    _run_checks(case, checks, report)
    return report


def _label(t: Any) -> str:
    if isinstance(t, Transform):
        return t.name
    if isinstance(t, functools.partial):
        args = [repr(a) for a in t.args] + [f"{k}={v!r}" for k, v in t.keywords.items()]
        return f"{getattr(t.func, '__name__', 'transform')}({', '.join(args)})"
    return getattr(t, "__name__", None) or repr(t)


def check_transform(
    t: Transform | Callable[[], Transform],
    *,
    overrides: dict[str, Any] | None = None,
    steps: int = 6,
    skip: Sequence[str] = (),
    dtype_rtol: float = 1e-5,
    fused: bool | None = None,
    fsdp2: bool = True,
    label: str | None = None,
) -> Report:
    """Run the whole contract (see the module docstring) on a transform; raise if any check fails.

    ``t``: a transform or a function of no arguments that builds one; ``overrides``: hyperparameters
    for ``ChainOptimizer`` (a learning rate large enough for the run to move); ``skip``: names of
    checks to leave out (keys of :data:`CHECKS`, ``"fused"``, ``"fsdp2"``; another name raises
    ``ValueError``); ``fused``: as in :func:`check_recipe`; ``fsdp2``: also run the 2-process FSDP2
    check (skipped where gloo is missing or ``t`` does not pickle). Returns a :class:`Report`.

    With ``fsdp2=True`` (the default) two processes are spawned, and each imports the calling
    script: a script (not a test under pytest) that calls ``check_transform`` at top level must do
    it under ``if __name__ == "__main__":`` (else every rank runs the script again), or pass
    ``fsdp2=False``.
    """
    if not isinstance(t, Transform) and not callable(t):
        raise TypeError(f"check_transform takes a Transform or a function returning one, got {type(t).__name__}")
    name = label or _label(t)
    case = Case(name, t, dict(overrides or {}), steps, tuple(skip), dtype_rtol)
    _build(case)  # a factory that does not build a transform fails here, with its own message
    report = Report(case.label)
    checks: dict[str, Callable[[], Any]] = {
        n: (lambda fn=fn: fn(case)) for n, fn in CHECKS.items() if n not in case.skip
    }
    if fused is not False and "fused" not in case.skip:
        checks["fused"] = lambda: check_fused(case, required=bool(fused))
    if fsdp2 and "fsdp2" not in case.skip:
        checks["fsdp2"] = lambda: check_fsdp2([case])
    _run_checks(case, checks, report)
    return report


# -- FSDP2: 2 processes, gloo on 127.0.0.1, float64 -----------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_case(case: Case, steps: int) -> float:
    from torch.distributed.fsdp import fully_shard

    dtype = torch.float64
    ref = make_model(dtype, scalar=False, one_row=True)  # (with a param whose shard is empty on one rank)
    model = copy.deepcopy(ref)
    for mod in (model.conv, model.fc1, model.fc2, model.head):
        fully_shard(mod)
    # the norm's params stay plain tensors, in the groups of the sharded ones (every rank steps the same
    # batch, so their grads need no reduction)
    fully_shard(model, ignored_params={model.norm.weight, model.norm.bias})
    ref_opt = make_optimizer(case, ref)
    opt = make_optimizer(case, model)
    train(ref, ref_opt, 0, steps, dtype)
    train(model, opt, 0, steps, dtype)
    err = 0.0
    for a, b in zip(ref.parameters(), model.parameters()):
        full = b.full_tensor() if hasattr(b, "full_tensor") else b
        err = max(err, (a - full).abs().max().item())
    return err


def _fsdp_worker(rank: int, world: int, port: int, cases: list, steps: int, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        for case in cases:
            try:
                results[case.label] = _fsdp_case(case, steps)
            except Exception:
                results[case.label] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        results["<setup>"] = traceback.format_exc()
    queue.put((rank, results))


def check_fsdp2(cases: Sequence[Case], steps: int = 3, tol: float = 1e-12, timeout: float = 240.0) -> None:
    """Run every case under FSDP2 (2 ranks, uneven shards) and in one process, in float64: equal to ``tol``.

    Raises :class:`CheckSkipped` if gloo is not available or a case does not pickle (its factory
    goes to spawned processes: use a module-level function or ``functools.partial``).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        raise CheckSkipped("torch.distributed with gloo is not available")
    cases = [c for c in cases if "fsdp2" not in c.skip]
    for c in cases:
        try:
            pickle.dumps(c)
        except Exception as e:
            raise CheckSkipped(
                f"{c.label}: the transform (or its factory) does not pickle, and FSDP2 runs it in spawned "
                f"processes ({type(e).__name__}: {e}); pass a module-level function or functools.partial"
            ) from None
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, cases, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, res = queue.get(timeout=timeout)
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = []
    for rank, res in sorted(results.items()):
        for label, value in res.items():
            if isinstance(value, str):
                failures.append(f"rank {rank} {label}:\n{value}")
            elif not (value <= tol) or math.isnan(value):
                failures.append(f"rank {rank} {label}: FSDP2 differs from one process by {value:.3e} (> {tol:g})")
    if failures:
        _fail("fsdp2: " + "\n".join(failures))


# -- lockstep parity with a torch.optim optimizer -------------------------------------------------
def lockstep_gap(
    pair_a: tuple[nn.Module, torch.optim.Optimizer, Any],
    pair_b: tuple[nn.Module, torch.optim.Optimizer, Any],
    x: Tensor,
    y: Tensor,
    steps: int = 200,
    batch_size: int = 8,
) -> float:
    """Train two (model, optimizer, scheduler or None) on the same MSE batches in lockstep.

    Returns the largest parameter difference seen over the run (compare it with float64 rounding).
    """
    n_batches = x.shape[0] // batch_size
    gap = 0.0
    for i in range(steps):
        lo = i % n_batches * batch_size
        xb, yb = x[lo : lo + batch_size], y[lo : lo + batch_size]
        for model, opt, sched in (pair_a, pair_b):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
            if sched is not None:
                sched.step()
        gap = max(gap, max((a - b).abs().max().item() for a, b in zip(pair_a[0].parameters(), pair_b[0].parameters())))
    return gap
