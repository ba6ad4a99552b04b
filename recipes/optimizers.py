"""The optimizers a comparison names, and the settings each run gets (with where each came from).

A name is a recipe of :mod:`gradchain.recipes` (``adamw``) or a peer: ``torch.NAME`` is
``torch.optim.NAME``, and ``module.NAME`` any other importable optimizer class
(``pytorch_optimizer.Lamb``, ``heavyball.AdamW``). Settings resolve in this order, later wins:

1. the recipe's (or class's) own defaults, from its signature;
2. the task's settings for it (``Task.optimizer_defaults``; a peer gets those of the recipe with its
   lowercase name, so ``torch.AdamW`` trains at the task's AdamW learning rate), unless ``--defaults``;
3. ``--set key=value`` (every optimizer that takes ``key``) and ``--set name.key=value``;
4. ``--sweep key=v1,v2,...`` / ``--sweep name.key=...``: one configuration per value (the product
   over several swept keys), plus the configuration before the sweep (the "base", the reference
   point of the tuned-vs-untuned table) when no swept value equals it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import math
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import gradchain
from gradchain import ChainOptimizer, Transform

from .common import Task

# where a setting came from, as the results tables name it
DEFAULT, TASK, SET, SWEEP = "recipe default", "task", "--set", "--sweep"
# torch.optim arguments that choose an implementation, not the algorithm: not shown in the tables
_IMPLEMENTATION_ARGS = {"foreach", "fused", "capturable", "differentiable", "maximize"}


def _ordinary(p: inspect.Parameter) -> bool:
    return p.kind not in (
        inspect.Parameter.VAR_POSITIONAL,
        inspect.Parameter.VAR_KEYWORD,
        inspect.Parameter.POSITIONAL_ONLY,
    )


@dataclass(frozen=True)
class OptimizerRef:
    """An optimizer by name: a gradchain recipe or a peer class."""

    name: str
    factory: Callable[..., Any]
    peer: bool

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        fn = self.factory.__init__ if self.peer else self.factory  # type: ignore[misc]
        params = dict(inspect.signature(fn).parameters)
        if self.peer:
            params.pop("self", None)
            params.pop("params", None)
        return params

    def takes(self, key: str) -> bool:
        # only an explicit parameter: a **kwargs catch-all may ignore a key (a typo would then be listed
        # as applied) or refuse it at build time (heavyball), so it takes nothing for certain
        params = self.parameters
        return key in params and _ordinary(params[key])

    def takes_text(self) -> str:
        """The keys it takes, for an error message."""
        return ", ".join(k for k, p in self.parameters.items() if _ordinary(p)) or "none"

    def needs_closure(self) -> bool:
        """Whether its ``step`` requires a closure (LBFGS): compare steps without one."""
        if not self.peer:
            return False
        closure = inspect.signature(self.factory.step).parameters.get("closure")
        return closure is not None and closure.default is inspect.Parameter.empty

    def defaults(self) -> dict[str, Any]:
        """The signature's defaults (implementation switches left out)."""
        return {
            k: p.default
            for k, p in self.parameters.items()
            if _ordinary(p) and p.default is not inspect.Parameter.empty and k not in _IMPLEMENTATION_ARGS
        }

    def required(self) -> list[str]:
        return [k for k, p in self.parameters.items() if _ordinary(p) and p.default is inspect.Parameter.empty]

    @property
    def task_key(self) -> str:
        """The name the task's settings are looked up under."""
        return self.name.rsplit(".", 1)[-1].lower() if self.peer else self.name

    def build(self, model: torch.nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
        if self.peer:
            try:
                return self.factory(model.parameters(), **settings)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.name}({settings_text(settings)}) failed: {e}") from e
        return ChainOptimizer(model.named_parameters(), build_recipe(self.name, settings))


def available_recipes() -> list[str]:
    """Every name in ``gradchain.recipes.__all__`` (optimizers and helpers alike)."""
    return sorted(getattr(gradchain.recipes, "__all__", []))


def is_optimizer_recipe(name: str) -> bool:
    """Whether ``gradchain.recipes.<name>`` makes an optimizer (not e.g. a routing predicate)."""
    factory = getattr(gradchain.recipes, name, None)
    if not callable(factory):
        return False
    try:
        ret = typing.get_type_hints(factory).get("return")
    except Exception:
        ret = None
    if isinstance(ret, type):
        return issubclass(ret, Transform)
    try:  # no usable annotation: build it at its defaults
        return isinstance(factory(), Transform)
    except Exception:
        return False


def optimizer_recipes() -> list[str]:
    return [n for n in available_recipes() if is_optimizer_recipe(n)]


def find_recipe(name: str) -> Callable[..., Any]:
    factory = getattr(gradchain.recipes, name, None)
    if name.startswith("_") or not callable(factory) or not is_optimizer_recipe(name):
        raise ValueError(
            f"unknown optimizer recipe {name!r}; gradchain.recipes has: {', '.join(optimizer_recipes())} "
            "(and torch.NAME for torch.optim.NAME, module.NAME for another package's optimizer class)"
        )
    return factory


def build_recipe(name: str, settings: dict[str, Any]) -> Transform:
    """``gradchain.recipes.<name>(**settings)``, with an error that names the recipe when it fails."""
    factory = find_recipe(name)
    try:
        t = factory(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gradchain.recipes.{name}({settings_text(settings)}) failed: {e}") from e
    if not isinstance(t, Transform):
        raise ValueError(f"gradchain.recipes.{name} is not an optimizer recipe: it returned {type(t).__name__}")
    return t


def find_optimizer(name: str) -> OptimizerRef:
    """``adamw`` -> the recipe; ``torch.AdamW`` -> ``torch.optim.AdamW``; ``pkg.Name`` -> ``pkg``'s class."""
    if "." not in name:
        return OptimizerRef(name, find_recipe(name), peer=False)
    module, _, cls = name.rpartition(".")
    modname = "torch.optim" if module == "torch" else module
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        hint = ' (pip install -e ".[bench]")' if module in ("heavyball", "pytorch_optimizer") else ""
        raise ValueError(f"optimizer {name!r}: cannot import {modname}{hint}: {e}") from e
    factory = getattr(mod, cls, None)
    if not (isinstance(factory, type) and issubclass(factory, torch.optim.Optimizer)):
        have = sorted(k for k, v in vars(mod).items() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer))
        raise ValueError(
            f"optimizer {name!r}: {modname} has no optimizer class {cls!r}"
            + (f"; it has {', '.join(have)}" if have and len(have) <= 40 else "")
        )
    return OptimizerRef(name, factory, peer=True)


def peer_listing() -> dict[str, list[str] | str]:
    """Peer optimizer classes by package: torch.optim always, the bench extra's when installed."""
    out: dict[str, list[str] | str] = {}
    for module, prefix in (
        ("torch.optim", "torch"),
        ("pytorch_optimizer", "pytorch_optimizer"),
        ("heavyball", "heavyball"),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            out[prefix] = 'not installed (pip install -e ".[bench]")'
            continue
        out[prefix] = sorted(
            f"{prefix}.{k}"
            for k, v in vars(mod).items()
            if isinstance(v, type)
            and issubclass(v, torch.optim.Optimizer)
            and v is not torch.optim.Optimizer
            and not k.startswith("_")
        )
    return out


# -- settings ------------------------------------------------------------------------------------
_NONFINITE = {"inf": math.inf, "nan": math.nan}


class _NonFinite(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _NONFINITE:
            return ast.copy_location(ast.Constant(_NONFINITE[node.id]), node)
        return node


def literal(text: str) -> Any:
    """``ast.literal_eval`` that also reads ``inf`` and ``nan``: ``repr`` writes a float that way
    (``1e999`` is ``inf``), and a setting must read back as the value it was written from."""
    tree = _NonFinite().visit(ast.parse(text.strip(), mode="eval"))
    return _tuples(ast.literal_eval(tree))


def _tuples(v: Any) -> Any:
    # a setting is hashed (sweeps, groups) and compared: a list value means the same as a tuple
    if isinstance(v, list | tuple):
        return tuple(_tuples(x) for x in v)
    return v


def parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``(0.9,0.95)``, ``True``, ``inf``; a list becomes a tuple), else the
    text itself."""
    try:
        return literal(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_values(text: str) -> list[Any]:
    """``1e-4,3e-4`` -> ``[1e-4, 3e-4]``; tuples stay whole (``(0.9,0.95),(0.9,0.99)``)."""
    if _EMPTY_ITEM.search(text):
        raise ValueError(f"{text!r} has an empty value (two commas in a row, or a leading or trailing comma)")
    try:
        v = literal(f"[{text}]")
        if v:
            return list(v)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    return [parse_value(t.strip()) for t in text.split(",")]


_EMPTY_ITEM = re.compile(r"(^|,)\s*(,|$)")


def survives_json(v: Any) -> bool:
    """Whether ``v`` reads back from the ``repr`` that a run's ``result.json`` (and ``--jobs``) keep."""
    try:
        return repr(literal(repr(v))) == repr(v)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def settings_text(s: dict[str, Any], sources: dict[str, str] | None = None) -> str:
    if not s:
        return "(own defaults)"
    marks = {TASK: " (task)", SET: " (--set)", SWEEP: " (swept)"}
    return ", ".join(f"{k}={v}" + (marks.get(sources.get(k, ""), "") if sources else "") for k, v in s.items())


def _split_items(items: Sequence[str], names: Sequence[str], flag: str) -> list[tuple[str | None, str, str]]:
    """``key=rhs`` / ``name.key=rhs`` items -> (name or None, key, rhs)."""
    out = []
    for item in items:
        lhs, eq, rhs = item.partition("=")
        if not eq or not lhs.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value or optimizer.key=value")
        lhs = lhs.strip()
        name = None
        # a name may itself hold dots (torch.AdamW): the key is what follows the last dot
        if "." in lhs:
            name, _, key = lhs.rpartition(".")
            if name not in names:
                raise ValueError(f"{flag} {item!r}: {name!r} is not one of --optimizers ({', '.join(names)})")
        else:
            key = lhs
        out.append((name, key, rhs.strip()))
    return out


@dataclass
class Config:
    """One optimizer at one setting: the keyword arguments it is built with and where each came from."""

    optimizer: OptimizerRef
    settings: dict[str, Any]
    sources: dict[str, str]
    swept: dict[str, Any] = field(default_factory=dict)
    base: bool = True

    @property
    def name(self) -> str:
        return self.optimizer.name

    @property
    def text(self) -> str:
        return settings_text(self.settings, self.sources)

    def all_settings(self) -> list[tuple[str, Any, str]]:
        """Every argument with its value and source (recipe defaults included)."""
        rows = [(k, v, DEFAULT) for k, v in self.optimizer.defaults().items() if k not in self.settings]
        rows += [(k, v, self.sources[k]) for k, v in self.settings.items()]
        order = list(self.optimizer.parameters)
        return sorted(rows, key=lambda r: order.index(r[0]) if r[0] in order else len(order))


def recipe_values(task: Task, kw: dict[str, Any], task_settings: bool = True) -> dict[str, Any]:
    """Setting values ``"recipe:NAME"`` become ``gradchain.recipes.NAME`` with the task's settings for it
    (its own defaults under ``--defaults``), for wrappers: ``--set lookahead.inner=recipe:sgd``."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, str) and v.startswith("recipe:"):
            inner = find_optimizer(v.removeprefix("recipe:"))
            if inner.peer:
                raise ValueError(f"{k}={v}: only a gradchain recipe can be passed as a setting")
            given = task.optimizer_defaults.get(inner.name, {}) if task_settings else {}
            v = build_recipe(inner.name, {a: b for a, b in given.items() if inner.takes(a)})
        out[k] = v
    return out


def _checked(flag: str, key: str, rhs: str, value: Any) -> Any:
    """``value`` if a run can be keyed, shipped to a worker and recorded with it; else an error."""
    try:
        hash(value)
    except TypeError:
        raise ValueError(
            f"{flag} {key}={rhs}: a {type(value).__name__} cannot be a setting; give a number, string or tuple"
        ) from None
    if not survives_json(value):
        raise ValueError(f"{flag} {key}={rhs}: the value {value!r} cannot be recorded with the run and read back")
    return value


def resolve_configs(
    task: Task,
    names: Sequence[str],
    sets: Sequence[str] = (),
    sweeps: Sequence[str] = (),
    *,
    task_settings: bool = True,
) -> list[Config]:
    """Every (optimizer, setting) to run, in the order of ``names``; errors name what is wrong."""
    refs = {n: find_optimizer(n) for n in names}
    parsed_sets = _split_items(sets, names, "--set")
    parsed_sweeps = _split_items(sweeps, names, "--sweep")
    for flag, items in (("--set", parsed_sets), ("--sweep", parsed_sweeps)):
        for name, key, _ in items:
            if name is None and not any(r.takes(key) for r in refs.values()):
                raise ValueError(f"{flag} {key}=...: none of the optimizers {', '.join(names)} takes {key!r}")
            if name is not None and not refs[name].takes(key):
                raise ValueError(
                    f"{flag} {name}.{key}=...: {name} takes no argument {key!r}; it takes: {refs[name].takes_text()}"
                )
    seen: set[tuple[str | None, str]] = set()
    for name, key, _ in parsed_sweeps:
        if (name, key) in seen:
            lhs = f"{name}.{key}" if name else key
            raise ValueError(f"--sweep {lhs} is given twice: put all its values in one --sweep {lhs}=V1,V2,...")
        seen.add((name, key))
    for n, ref in refs.items():
        if ref.needs_closure():
            raise ValueError(
                f"{n} needs a closure that re-evaluates the model at every step (e.g. LBFGS); compare cannot run it"
            )
    configs: list[Config] = []
    for n, ref in refs.items():
        settings: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if task_settings:
            for k, v in task.optimizer_defaults.get(ref.task_key, {}).items():
                if ref.takes(k):
                    settings[k], sources[k] = v, TASK
        # a setting for this optimizer by name beats one for every optimizer
        for name, key, rhs in sorted(parsed_sets, key=lambda t: t[0] is not None):
            if (name is None and ref.takes(key)) or name == n:
                settings[key], sources[key] = _checked("--set", key, rhs, parse_value(rhs)), SET
        grid: dict[str, list[Any]] = {}
        for name, key, rhs in sorted(parsed_sweeps, key=lambda t: t[0] is not None):
            if (name is None and ref.takes(key)) or name == n:
                if not rhs:
                    raise ValueError(f"--sweep {key}=: no values")
                try:
                    values = parse_values(rhs)
                except ValueError as e:
                    raise ValueError(f"--sweep {key}={rhs}: {e}") from None
                values = [_checked("--sweep", key, rhs, v) for v in values]
                grid[key] = list(dict.fromkeys(values))  # in order, each once
        missing = [k for k in ref.required() if k not in settings and k not in grid]
        if missing:
            raise ValueError(
                f"{n} needs {', '.join(missing)}: e.g. --set {n}.{missing[0]}=recipe:adamw"
                if n == "lookahead" or missing == ["inner"]
                else f"{n} needs {', '.join(missing)}: pass it with --set {n}.{missing[0]}=..."
            )
        ours: list[Config] = []
        if grid:
            keys = list(grid)
            base_values = {k: settings.get(k, ref.defaults().get(k)) for k in keys}
            for combo in itertools.product(*(grid[k] for k in keys)):
                swept = dict(zip(keys, combo))
                if swept == base_values:  # the unswept setting itself: it keeps its sources
                    ours.append(Config(ref, dict(settings), dict(sources), swept, base=True))
                    continue
                s = {**settings, **swept}
                src = {**sources, **{k: SWEEP for k in keys}}
                ours.append(Config(ref, s, src, swept, base=False))
            if not any(c.base for c in ours):
                ours.insert(0, Config(ref, dict(settings), dict(sources), dict(base_values), base=True))
        else:
            ours.append(Config(ref, settings, sources))
        for c in ours:  # fail before any training, not after the first runs
            probe = recipe_values(task, c.settings, task_settings)
            if ref.peer:
                ref.build(torch.nn.Linear(1, 1), probe)
            else:
                build_recipe(n, probe)
        configs.extend(ours)
    return configs
