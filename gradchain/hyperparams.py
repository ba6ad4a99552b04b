"""Declared hyperparameters: defaults and validation.

A hyperparameter is a numeric knob that lives in the optimizer's ``param_groups`` and is read at
every step, so torch LR schedulers and per-group overrides work. A transform declares each one
with its default and a check; an invalid value raises ``ValueError`` naming the key and value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Hyperparam:
    """A declared hyperparameter: its default value and a check returning an error or None."""

    default: Any
    check: Check | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.is_meta:
            return None  # (a meta tensor has no value to check)
        return float(value.detach().cpu())
    if isinstance(value, numbers.Real):  # (numpy's scalars too, as torch.optim takes them)
        return float(value)
    return None


def number(value: Any) -> str | None:
    """Any finite real number."""
    x = _number(value)
    if x is None or not math.isfinite(x):
        return "must be a finite real number"
    return None


def nonnegative(value: Any) -> str | None:
    """A finite number >= 0."""
    x = _number(value)
    if x is None or not math.isfinite(x) or x < 0:
        return "must be a finite number >= 0"
    return None


def positive(value: Any) -> str | None:
    """A finite number > 0."""
    x = _number(value)
    if x is None or not math.isfinite(x) or x <= 0:
        return "must be a finite number > 0"
    return None


def unit_interval(value: Any) -> str | None:
    """A number in [0, 1): an EMA decay or a momentum coefficient."""
    x = _number(value)
    if x is None or not 0.0 <= x < 1.0:
        return "must be a number in [0, 1)"
    return None


def closed_unit_interval(value: Any) -> str | None:
    """A number in [0, 1]."""
    x = _number(value)
    if x is None or not 0.0 <= x <= 1.0:
        return "must be a number in [0, 1]"
    return None


def flag(value: Any) -> str | None:
    """A bool (a switch a param group may set, as torch's ``amsgrad``)."""
    return None if isinstance(value, bool) else "must be a bool"


def betas(value: Any) -> str | None:
    """A pair (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (beta1, beta2)"
    for i, b in enumerate(value):
        if unit_interval(b) is not None:
            return f"beta{i + 1}={b!r} must be a number in [0, 1)"
    return None


class HyperparamTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong kind (a float where a pair is due): both a ``TypeError``, as
    torch.optim raises for it, and a ``ValueError``, as gradchain raises for every invalid value."""


def betas_pair(value: Any, key: str = "betas") -> tuple:
    """``value`` as a tuple ``(beta1, beta2)``, checked before anything unpacks it.

    Raises :class:`HyperparamTypeError` naming ``key`` for something other than a pair (``0.9``)
    and ``ValueError`` for a beta outside [0, 1). Factories call it on their ``betas`` argument.
    """
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise HyperparamTypeError(f"invalid hyperparameter {key}={value!r}: must be a pair (beta1, beta2)")
    validate(key, Hyperparam(None, betas), value)
    return tuple(value)


def check_name(name: Any) -> str:
    """A transform name: a non-empty string without ``'.'`` (state keys are ``"<name>.<buffer>"``)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"transform name {name!r} must be a non-empty string without '.'")
    return name


def validate(key: str, spec: Hyperparam, value: Any) -> None:
    """Raise ``ValueError`` naming ``key`` and ``value`` when ``value`` fails ``spec``'s check.

    Callables (schedules of the step) are checked when they are evaluated.
    """
    if spec.check is None or (callable(value) and not isinstance(value, torch.Tensor)):
        return
    problem = spec.check(value)
    if problem is not None:
        raise InvalidHyperparameter(key, value, problem)


class InvalidHyperparameter(ValueError):
    """A hyperparameter value that fails its check: ``key``, ``value`` and the ``problem``."""

    def __init__(self, key: str, value: Any, problem: str) -> None:
        super().__init__(f"invalid hyperparameter {key}={value!r}: {problem}")
        self.key, self.value, self.problem = key, value, problem

    def __reduce__(self) -> tuple:  # (pickled across processes with the key, not the message)
        return type(self), (self.key, self.value, self.problem)


def same_value(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same plain value: numbers, bools, strings, None,
    or tuples and lists of them, of the same types, equal, and zeros of one sign. Anything else (a
    tensor) is never the same: a caller keyed on it computes again."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(same_value, a, b))
    if type(a) is float:
        return a == b and (a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b))
    return a is None or (type(a) in (int, bool, str) and a == b)
