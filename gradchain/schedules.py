"""Schedules: a hyperparameter as a function of the step.

A schedule is a small callable object ``f(t) -> value``, where ``t`` is the 1-based number of the
step being taken (the core evaluates a callable hyperparameter at ``bucket.group_step``; inside
``accumulate`` that is the number of real, accumulated steps). Use one in place of any declared
hyperparameter: ``scale_by_lr(warmup_cosine(3e-4, 1000, 100_000))``,
``ChainOptimizer(params, chain, weight_decay=linear(0.0, 0.1, 5000))``, or per param group. A
pair such as ``betas`` takes a callable that returns the pair as a group value only (its factory
checks a pair); a flag that chooses the code (``amsgrad``, ``nesterov``) takes no schedule.
They sit next to torch's LR schedulers, which keep working on plain values.

Schedules are plain data (numbers and nested schedules), so they pickle, and the optimizer's
``state_dict`` stores them as a description (``{"gradchain.schedule": ...}``) that
``torch.load(weights_only=True)`` accepts; ``load_state_dict`` rebuilds them. Other callables (a
lambda, an instance of a user's own ``Schedule`` subclass) are saved as an opaque marker and the
live callable of the loading optimizer is kept.

Conventions: each phase of length ``T`` runs over its local steps ``s = 1..T`` and reaches its end
value at ``s = T``; ``join`` restarts the local step at each boundary. A single-phase schedule
equals optax's schedule of the same name evaluated at ``count = t``: the first step already uses
the first warmup increment, none is wasted at value ``init`` (with ``steps=0`` a phase is its end
value from the first step, where optax's ``linear_schedule`` gives its initial value). ``join`` differs from optax's
``join_schedules`` at a boundary ``t = b`` only: it gives the earlier phase's end value (its local
step ``T``), optax the next schedule at its step 0; where the phases meet at one value
(``warmup_cosine``, ``wsd``) the two agree at every step. See docs/concepts.md (Hyperparameters).

With torch's LR schedulers: a scheduler that multiplies the group's lr (``LambdaLR``,
``MultiplicativeLR``, ``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``LinearLR``,
``ConstantLR``) scales the schedule (``factor * schedule``, one factor however many steps). One
that does other arithmetic with the lr (``CosineAnnealingLR``, ``ReduceLROnPlateau``, ...) is
refused with a ``TypeError``: give that group a number lr, or write the whole curve as a gradchain
schedule. Such a scheduler's own ``state_dict()`` holds the schedule objects (``base_lrs``); load
it with ``torch.serialization.safe_globals(schedules.SAFE_GLOBALS)`` around
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "SAFE_GLOBALS",
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_warmup",
    "join",
    "linear",
    "linear_warmup",
    "untuned_linear_warmup",
    "warmup_cosine",
    "wsd",
]

_TAG = "gradchain.schedule"
_OPAQUE = "gradchain.callable"


def _check_steps(what: str, value: Any, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"invalid {what}={value!r}: must be an int {bound}")
    return value


def _check_number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"invalid {what}={value!r}: must be a finite real number")
    return float(value)


class Schedule:
    """Base of the built-in schedules: ``schedule(t)`` is the value at 1-based step ``t``.

    ``factor * schedule`` scales a schedule; subclasses are dataclasses of numbers and schedules.
    """

    def __call__(self, step: int | float) -> float:
        raise NotImplementedError

    def __mul__(self, factor: float) -> Schedule:
        return _Scaled(self, _check_number("factor", factor))

    __rmul__ = __mul__

    def _refuse(self, *args: Any) -> Any:
        raise TypeError(
            f"a gradchain schedule ({self!r}) supports only multiplication by a number: a torch LR scheduler "
            "that does other arithmetic with a group's lr (CosineAnnealingLR, ReduceLROnPlateau, ...) cannot "
            "drive it. Give that group a number lr for the scheduler, use a multiplying scheduler (LambdaLR, "
            "ExponentialLR, ...), or write the whole curve as a gradchain schedule (schedules.join, ...)"
        )

    __add__ = __radd__ = __sub__ = __rsub__ = __truediv__ = __rtruediv__ = __float__ = __neg__ = _refuse

    # -- checkpoint description -------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A dict of plain values (what ``state_dict`` stores): rebuild with :func:`from_description`."""
        out: dict[str, Any] = {_TAG: type(self).__name__}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = _describe_value(getattr(self, f.name))
        return out


def _describe_value(v: Any) -> Any:
    if isinstance(v, Schedule):
        return v.describe()
    if isinstance(v, (list, tuple)):
        return [_describe_value(x) for x in v]
    return v


def _rebuild_value(v: Any) -> Any:
    if isinstance(v, Mapping) and _TAG in v:
        return from_description(v)
    if isinstance(v, list):
        return tuple(_rebuild_value(x) for x in v)
    return v


@dataclass(frozen=True)
class _Scaled(Schedule):
    schedule: Schedule
    factor: float

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"invalid schedule={self.schedule!r}: a scaled schedule scales a gradchain schedule")
        factor = _check_number("factor", self.factor)
        if isinstance(self.schedule, _Scaled):
            # one factor, not one more level per multiplication: a scheduler multiplies every step
            factor *= self.schedule.factor
            object.__setattr__(self, "schedule", self.schedule.schedule)
        object.__setattr__(self, "factor", factor)

    def __call__(self, step: int | float) -> float:
        return self.factor * self.schedule(step)


@dataclass(frozen=True)
class _Constant(Schedule):
    value: float

    def __post_init__(self) -> None:
        _check_number("value", self.value)

    def __call__(self, step: int | float) -> float:
        return self.value


def _progress(step: int | float, steps: int) -> float:
    """How far through a phase of ``steps`` steps ``step`` is, in [0, 1] (a 0-step phase is over)."""
    return 1.0 if steps == 0 else min(max(step, 0), steps) / steps


@dataclass(frozen=True)
class _Linear(Schedule):
    init: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        _check_number("init", self.init)
        _check_number("end", self.end)
        _check_steps("steps", self.steps)

    def __call__(self, step: int | float) -> float:
        frac = _progress(step, self.steps)
        return self.init + (self.end - self.init) * frac


@dataclass(frozen=True)
class _ExponentialWarmup(Schedule):
    peak: float
    beta2: float

    def __post_init__(self) -> None:
        _check_number("peak", self.peak)
        if not 0.0 <= _check_number("beta2", self.beta2) < 1.0:
            raise ValueError(f"invalid beta2={self.beta2!r}: must be a number in [0, 1)")

    def __call__(self, step: int | float) -> float:
        return self.peak * -math.expm1(-(1.0 - self.beta2) * max(step, 0))


@dataclass(frozen=True)
class _UntunedLinearWarmup(Schedule):
    peak: float
    beta2: float

    def __post_init__(self) -> None:
        _check_number("peak", self.peak)
        if not 0.0 <= _check_number("beta2", self.beta2) < 1.0:
            raise ValueError(f"invalid beta2={self.beta2!r}: must be a number in [0, 1)")

    def __call__(self, step: int | float) -> float:
        return self.peak * min(1.0, 0.5 * (1.0 - self.beta2) * max(step, 0))


@dataclass(frozen=True)
class _CosineDecay(Schedule):
    init: float
    steps: int
    end: float
    exponent: float

    def __post_init__(self) -> None:
        _check_number("init", self.init)
        _check_number("end", self.end)
        _check_steps("steps", self.steps)
        if _check_number("exponent", self.exponent) <= 0:
            raise ValueError(f"invalid exponent={self.exponent!r}: must be > 0")

    def __call__(self, step: int | float) -> float:
        frac = _progress(step, self.steps)
        cos = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.end + (self.init - self.end) * cos**self.exponent


@dataclass(frozen=True)
class _SqrtDecay(Schedule):
    init: float
    steps: int
    end: float

    def __post_init__(self) -> None:
        _check_number("init", self.init)
        _check_number("end", self.end)
        _check_steps("steps", self.steps)

    def __call__(self, step: int | float) -> float:
        frac = _progress(step, self.steps)
        return self.end + (self.init - self.end) * (1.0 - math.sqrt(frac))


@dataclass(frozen=True)
class _Join(Schedule):
    schedules: tuple
    boundaries: tuple

    def __post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError(
                f"join() needs one schedule more than boundaries, got {len(self.schedules)} schedules "
                f"and {len(self.boundaries)} boundaries"
            )
        for s in self.schedules:
            if not isinstance(s, Schedule):
                raise TypeError(f"join() takes gradchain schedules, got {type(s).__name__}")
        last = 0
        for b in self.boundaries:
            _check_steps("boundary", b)
            if b < last:
                raise ValueError(f"join() boundaries must not decrease, got {list(self.boundaries)}")
            last = b

    def __call__(self, step: int | float) -> float:
        start = 0
        for sched, boundary in zip(self.schedules, self.boundaries, strict=False):
            if step <= boundary:
                return sched(step - start)
            start = boundary
        return self.schedules[-1](step - start)


_CLASSES: dict[str, type[Schedule]] = {
    c.__name__: c
    for c in (_Scaled, _Constant, _Linear, _ExponentialWarmup, _UntunedLinearWarmup, _CosineDecay, _SqrtDecay, _Join)
}


# the classes a pickled schedule names: torch.serialization.safe_globals(SAFE_GLOBALS) lets
# torch.load(weights_only=True) read them (a torch LR scheduler's state_dict holds the objects)
SAFE_GLOBALS: list[type] = list(_CLASSES.values())


def from_description(desc: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.describe` (only the built-in classes are accepted).

    A description with missing, unknown or invalid fields raises ``ValueError`` naming the schedule.
    """
    kind = desc.get(_TAG)
    if kind not in _CLASSES:
        raise ValueError(f"unknown schedule {kind!r} in a state dict; known: {sorted(_CLASSES)}")
    cls = _CLASSES[kind]
    expected = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    given = [k for k in desc if k != _TAG]
    if sorted(given) != sorted(expected):
        raise ValueError(f"invalid {kind} schedule description: fields {sorted(given)}, expected {sorted(expected)}")
    kwargs = {k: _rebuild_value(desc[k]) for k in given}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {kind} schedule description: {e}") from e


# -- the public constructors ----------------------------------------------------------------------
def constant(value: float) -> Schedule:
    """``f(t) = value``."""
    return _Constant(value)


def linear(init: float, end: float, steps: int) -> Schedule:
    """From ``init`` to ``end`` linearly over ``steps`` steps, then ``end``: ``init + (end-init) min(t,T)/T``.

    ``steps=0`` is ``end`` from the first step. Peer: optax ``linear_schedule``.
    """
    return _Linear(init, end, steps)


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    """Linear warmup ``init + (peak - init) min(1, t/T_w)``; ``T_w = 0`` means no warmup.

    Peer: torch ``LinearLR``, pytorch_optimizer ``linear_warmup``.
    """
    _check_number("peak", peak)
    _check_number("init", init)
    return _Linear(init, peak, _check_steps("warmup_steps", warmup_steps))


def exponential_warmup(peak: float, beta2: float = 0.999) -> Schedule:
    """The "untuned" exponential warmup for Adam: ``peak (1 - exp(-(1 - beta2) t))``.

    Reference: Ma & Yarats, "On the adequacy of untuned warmup for adaptive optimization",
    arXiv:1910.04209 (AAAI 2021).
    """
    return _ExponentialWarmup(peak, beta2)


def untuned_linear_warmup(peak: float, beta2: float = 0.999) -> Schedule:
    """The "untuned" linear warmup: ``peak min(1, (1 - beta2) t / 2)``, i.e. over ``2 / (1 - beta2)``
    steps (2000 for beta2 = 0.999), the paper's recommended default.

    Reference: Ma & Yarats, arXiv:1910.04209.
    """
    return _UntunedLinearWarmup(peak, beta2)


def cosine_decay(init: float, decay_steps: int, end: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine from ``init`` to ``end`` over ``decay_steps``: ``end + (init-end) ((1 + cos(pi min(t,T)/T))/2)^p``.

    Peer: optax ``cosine_decay_schedule`` (``alpha = end/init``), torch ``CosineAnnealingLR``.
    """
    return _CosineDecay(init, decay_steps, end, exponent)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Schedule ``i`` runs for ``boundaries[i-1] < t <= boundaries[i]``, with its local step
    ``t - boundaries[i-1]`` (1 at the first step of the phase). Peer: optax ``join_schedules``.
    """
    return _Join(tuple(schedules), tuple(boundaries))


def warmup_cosine(
    peak: float, warmup_steps: int, total_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warmup to ``peak`` over ``warmup_steps``, then cosine to ``end`` at ``total_steps``.

    Peer: optax ``warmup_cosine_decay_schedule(init, peak, warmup_steps, total_steps, end)``,
    pytorch_optimizer ``cosine_annealing_with_warmup``.
    """
    _check_number("peak", peak)
    _check_steps("warmup_steps", warmup_steps)
    if _check_steps("total_steps", total_steps) < warmup_steps:
        raise ValueError(f"invalid total_steps={total_steps!r}: must be >= warmup_steps={warmup_steps!r}")
    return join([linear_warmup(peak, warmup_steps, init), cosine_decay(peak, total_steps - warmup_steps, end)],
                [warmup_steps])


_DECAYS: dict[str, Callable[[float, int, float], Schedule]] = {
    "linear": lambda peak, steps, end: _Linear(peak, end, steps),
    "cosine": lambda peak, steps, end: _CosineDecay(peak, steps, end, 1.0),
    "sqrt": lambda peak, steps, end: _SqrtDecay(peak, steps, end),
}


def wsd(
    peak: float,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    end: float = 0.0,
    *,
    init: float = 0.0,
    decay: str = "linear",
) -> Schedule:
    """Warmup-stable-decay: linear warmup to ``peak``, ``peak`` for ``stable_steps``, then decay to ``end``.

    ``decay``: ``"linear"``, ``"cosine"`` or ``"sqrt"`` (``1 - sqrt(s/T)``, Hägele et al.,
    arXiv:2405.18392). Reference: Hu et al., MiniCPM, arXiv:2404.06395. Peer: pytorch_optimizer
    ``get_wsd_schedule``.
    """
    _check_number("peak", peak)
    if decay not in _DECAYS:
        raise ValueError(f"invalid decay={decay!r}: must be one of {sorted(_DECAYS)}")
    _check_steps("stable_steps", stable_steps)
    w = _check_steps("warmup_steps", warmup_steps)
    _check_steps("decay_steps", decay_steps)
    return join(
        [linear_warmup(peak, w, init), constant(peak), _DECAYS[decay](peak, decay_steps, end)],
        [w, w + stable_steps],
    )


# -- checkpoints: schedules in param groups --------------------------------------------------------
def encode_groups(groups: list[dict[str, Any]]) -> None:
    """Replace callable hyperparameters in saved param groups (in place) by plain descriptions."""
    for g in groups:
        for k, v in list(g.items()):
            if _built_in(v):
                g[k] = v.describe()
            elif callable(v) and not _is_tensor(v):
                # a user's own Schedule subclass too: kept as the live callable at a load, as a lambda
                g[k] = {_OPAQUE: repr(v)}


def _built_in(v: Any) -> bool:
    """Whether ``v`` is a schedule made of the built-in classes only (what a description rebuilds)."""
    if not isinstance(v, Schedule) or _CLASSES.get(type(v).__name__) is not type(v):
        return False
    return all(_parts_built_in(getattr(v, f.name)) for f in fields(v))  # type: ignore[arg-type]


def _parts_built_in(x: Any) -> bool:
    if isinstance(x, (list, tuple)):
        return all(map(_parts_built_in, x))
    return _built_in(x) if isinstance(x, Schedule) else True


def decode_groups(saved: list[dict[str, Any]], live: list[dict[str, Any]]) -> None:
    """Undo :func:`encode_groups` (in place): rebuild schedules, keep the live opaque callables."""
    for i, (sg, g) in enumerate(zip(saved, live, strict=False)):
        for k, v in list(sg.items()):
            if not isinstance(v, Mapping):
                continue
            if _TAG in v:
                try:
                    sg[k] = from_description(v)
                except ValueError as e:
                    raise ValueError(
                        f"param group {i}: the state dict's {k!r} holds a corrupted schedule ({e}); save the "
                        "state dict again, or set this key in the loaded group by hand"
                    ) from e
            elif _OPAQUE in v:
                if not callable(g.get(k)):
                    raise ValueError(
                        f"param group {i}: the state dict's {k!r} was a callable ({v[_OPAQUE]}) that cannot "
                        "be saved; give the loading optimizer that callable (or use a gradchain schedule)"
                    )
                sg[k] = g[k]


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)
