"""Transforms that take transforms: masked and partition (more in later issues).

They nest freely, keep the inner leaves' state names (``"<leaf>.<buffer>"``), and declare the
union of their children's hyperparameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from .base import Bucket, StateDict, Transform, check_unique_names, merge_hyperparams

__all__ = ["masked", "partition"]

Selector = Callable[[str, Tensor], Any]


def _needs_name(kind: str, name: str | None, param: Tensor) -> str:
    if name is None:
        raise ValueError(
            f"{kind} selects params by name, but a param of shape {tuple(param.shape)} has none; "
            "pass model.named_parameters() to the optimizer"
        )
    return name


def _name_predicate(patterns: Iterable[str]) -> Callable[[str | None, Tensor], bool]:
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    exact = {p for p in pats if not any(c in p for c in "*?[")}
    globs = [p for p in pats if p not in exact]

    def select(name: str | None, param: Tensor) -> bool:
        name = _needs_name("masked()", name, param)
        return name in exact or any(fnmatch.fnmatchcase(name, g) for g in globs)

    return select


class _Routing(Transform):
    """Shared machinery: route each param of a bucket to a child, run children on sub-buckets."""

    children: dict[Any, Transform]

    def _route(self, name: str | None, param: Tensor) -> Any:
        raise NotImplementedError

    def _cached_route(self, name: str | None, param: Tensor) -> Any:
        key = (id(param), name)
        if key not in self._cache:
            self._cache[key] = self._route(name, param)
        return self._cache[key]

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        label = self._route(name, param)
        child = self.children.get(label)
        return child.init_state(param, name) if child is not None else {}

    def apply(self, buckets: list[Bucket]) -> None:
        for label, child in self.children.items():
            subs, where = [], []
            for b in buckets:
                idx = [i for i, (n, p) in enumerate(zip(b.names, b.params)) if self._cached_route(n, p) == label]
                if idx:
                    subs.append(b.subset(idx))
                    where.append((b, idx))
            if subs:
                child.apply(subs)
                for sub, (b, idx) in zip(subs, where):
                    b.absorb(sub, idx)

    def leaves(self) -> Iterator[Transform]:
        for child in self.children.values():
            yield from child.leaves()

    def paths(self) -> list[list[str]]:
        return [p for child in self.children.values() for p in child.paths()]

    def validate_group(self, group: Mapping[str, Any]) -> None:
        for child in self.children.values():
            child.validate_group(group)

    def _setup(self, name: str, children: dict[Any, Transform]) -> None:
        self.name = name
        self.children = children
        self._cache: dict[tuple, Any] = {}
        check_unique_names(self, f"{name}()")
        self.hyperparams = merge_hyperparams(list(children.values()))
        self.extra_defaults = {}
        for c in children.values():
            self.extra_defaults.update(c.extra_defaults)

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_cache"] = {}
        return d


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


def masked(inner: Transform, mask: Selector | str | Iterable[str]) -> Transform:
    """Apply ``inner`` only to the selected params; the others' updates pass through unchanged.

    ``mask`` is a predicate ``(name, param) -> bool``, or a name / glob pattern / collection of
    them (``"*.bias"``). Unselected params get no state from ``inner``. Example, no weight decay on
    biases and norm gains: ``masked(add_decoupled_wd(0.1), lambda name, p: p.ndim >= 2)``.
    Peer: optax ``masked``.
    """
    if callable(mask):
        user = mask
        select = lambda name, p: bool(user(name, p))  # noqa: E731
    else:
        select = _name_predicate(mask)
    return _Masked(inner, select)


class _Partition(_Routing):
    def __init__(self, transforms: Mapping[Any, Transform], labels: Selector | Mapping[str, Any]) -> None:
        if not transforms:
            raise ValueError("partition() needs at least one transform")
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
