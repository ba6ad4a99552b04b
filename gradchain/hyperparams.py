"""Declared hyperparameters: defaults and validation.

A hyperparameter is a numeric knob that lives in the optimizer's ``param_groups`` and is read at
every step, so torch LR schedulers and per-group overrides work. A transform declares each one
with its default and a check; an invalid value raises ``ValueError`` naming the key and value.
"""

from __future__ import annotations

import math
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
        if value.numel() != 1 or value.is_complex():
            return None
        return float(value.detach().cpu())
    if isinstance(value, (int, float)):
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


def betas(value: Any) -> str | None:
    """A pair (beta1, beta2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return "must be a pair (beta1, beta2)"
    for i, b in enumerate(value):
        if unit_interval(b) is not None:
            return f"beta{i + 1}={b!r} must be a number in [0, 1)"
    return None


def validate(key: str, spec: Hyperparam, value: Any) -> None:
    """Raise ``ValueError`` naming ``key`` and ``value`` when ``value`` fails ``spec``'s check.

    Callables (schedules of the step) are checked when they are evaluated.
    """
    if spec.check is None or (callable(value) and not isinstance(value, torch.Tensor)):
        return
    problem = spec.check(value)
    if problem is not None:
        raise ValueError(f"invalid hyperparameter {key}={value!r}: {problem}")
