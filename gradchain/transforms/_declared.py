"""Hyperparameter plumbing for transforms that run their own ``apply`` instead of being a Leaf.

A transform that reduces over all buckets (a global norm, a loss EMA, a global mean of ``v``) or
wraps another one (Lookahead) still declares hyperparameters as a Leaf does: a local name, a
spec, and the group key it is read from, which ``renamed`` changes. :class:`Declared` holds that
once, so each such transform states only its own rule.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..base import Bucket, StateDict, Transform, resolve_hyperparam
from ..hyperparams import Hyperparam, check_name, validate


class Declared(Transform):
    """A transform with hyperparameters of its own: local name -> spec, local name -> group key."""

    _specs: dict[str, Hyperparam]
    _keys: dict[str, str]

    def _declare(self, name: str, specs: Mapping[str, Hyperparam], keys: Mapping[str, str] | None = None) -> None:
        """Set the name and the declarations (``keys``: group keys other than the local names)."""
        self.name = check_name(name)
        self._specs = dict(specs)
        self._keys = {k: (keys or {}).get(k, k) for k in self._specs}
        self.extra_defaults: dict[str, Any] = {}
        for k, spec in self._specs.items():
            validate(self._keys[k], spec, spec.default)

    @property
    def declared(self) -> dict[str, Hyperparam]:
        """This transform's own hyperparameters, by group key."""
        return {self._keys[k]: s for k, s in self._specs.items()}

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return self.declared

    def group_key(self, local: str) -> str:
        """The group key the hyperparameter declared as ``local`` is read from."""
        return self._keys[local]

    def renamed(self, mapping: Mapping[str, str]) -> Declared:
        new = copy.copy(self)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    def validate_group(self, group: Mapping[str, Any]) -> None:
        for key, spec in self.declared.items():
            if key in group:
                validate(key, spec, group[key])

    def hp(self, bucket: Bucket) -> dict[str, Any]:
        """This transform's hyperparameters for ``bucket`` (schedules evaluated), by local name."""
        return {k: resolve_hyperparam(g, self._specs[k], bucket.group[g], bucket) for k, g in self._keys.items()}

    def init_state(self, param: Any, name: str | None = None) -> StateDict:
        return {}
