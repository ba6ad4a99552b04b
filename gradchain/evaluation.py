"""Evaluation weights: swap them into the params for a block, then restore the training weights exactly.

Some chains train at other weights than the ones to evaluate: schedule-free keeps the average
``x`` apart from the training point ``y`` the params hold, Lookahead keeps slow weights apart from
the fast ones. A transform declares such weights with one method (duck-typed, found among the
chain's ``leaves()``)::

    def eval_weight(self, param: Tensor, state: Mapping[str, Tensor], group: Mapping) -> Tensor | None

which returns the evaluation tensor for ``param`` (any dtype; it is copied into the param), given
the param's optimizer state and its param group, or None when it has none for this param (e.g.
before the param's first step). :func:`eval_params` uses it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["EvalWeights", "eval_params", "eval_providers"]

# optimizers whose params hold evaluation weights right now (no nesting: it would save those as the
# training weights)
_SWAPPED: weakref.WeakSet = weakref.WeakSet()


@runtime_checkable
class EvalWeights(Protocol):
    """A transform with evaluation weights (see the module docstring)."""

    def eval_weight(self, param: Tensor, state: Any, group: Any) -> Tensor | None: ...


def eval_providers(optimizer: torch.optim.Optimizer, kind: type | None = None) -> list[Any]:
    """The transforms of ``optimizer``'s chain that declare evaluation weights, outermost first.

    ``kind`` keeps only instances of that class. An optimizer without a gradchain chain has none.
    """
    transform = getattr(optimizer, "transform", None)
    if transform is None:
        return []
    found = [t for t in transform.leaves() if callable(getattr(t, "eval_weight", None))]
    return [t for t in found if kind is None or isinstance(t, kind)]


def _refuser(who: str) -> Callable[..., None]:
    def refuse(opt: Any, args: Any, kwargs: Any) -> None:
        raise RuntimeError(
            f"optimizer.step() inside {who}(): the params hold the evaluation weights; leave the block first"
        )

    return refuse


@contextlib.contextmanager
def swap_in(optimizer: torch.optim.Optimizer, providers: list[Any], who: str) -> Iterator[None]:
    """Swap the evaluation weights of ``providers`` into the params; restore the training weights on exit."""
    if optimizer in _SWAPPED:
        raise RuntimeError(f"{who}(): the params already hold evaluation weights (nested eval_params/slow_weights)")
    saved: list[tuple[Tensor, Tensor]] = []
    handle = optimizer.register_step_pre_hook(_refuser(who))
    _SWAPPED.add(optimizer)
    try:
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    st = optimizer.state.get(p)
                    if not st:
                        continue
                    x = None
                    for t in providers:
                        x = t.eval_weight(p, st, group)
                        if x is not None:
                            break
                    if x is None:
                        continue
                    saved.append((p, p.detach().clone()))  # the training weights, bit for bit
                    p.copy_(x)
        yield
    finally:
        with torch.no_grad():
            for p, train in saved:
                p.copy_(train)
        handle.remove()
        _SWAPPED.discard(optimizer)


@contextlib.contextmanager
def eval_params(optimizer: torch.optim.Optimizer, *, strict: bool = False) -> Iterator[None]:
    """Evaluate at the chain's evaluation weights inside the block; train at the training weights outside.

    Inside ``with eval_params(opt):`` every param that has evaluation weights holds them:
    schedule-free's average ``x`` (:func:`gradchain.schedule_free`), Lookahead's slow weights
    (:func:`gradchain.lookahead`), or those of any transform with an ``eval_weight`` method (see
    :mod:`gradchain.evaluation`). On exit, also when the block raises, the training weights are
    copied back bit for bit (a copy of them is held for the block: 1x the swapped params), so a run
    that evaluates follows the same trajectory as one that does not. ``opt.step()`` inside the block
    raises ``RuntimeError``, and so does a nested ``eval_params``. Params never stepped (no state)
    are left as they are; where two transforms of the chain have evaluation weights for one param,
    the outermost one's are used::

        opt = gc.ChainOptimizer(model.named_parameters(), gc.recipes.schedule_free_adamw())
        ...
        model.eval()
        with gc.eval_params(opt):
            val_loss = evaluate(model)
        model.train()

    A chain without evaluation weights (AdamW, ...) trains at the weights to evaluate: the block is
    then a no-op, so one loop serves every recipe; ``strict=True`` raises ``ValueError`` instead.
    ``optimizer`` must be a :class:`gradchain.ChainOptimizer` (``TypeError`` otherwise: a
    ``schedulefree`` optimizer has its own ``eval()``/``train()``). Batch-norm running statistics are
    not recomputed at the evaluation weights (the schedule-free authors recompute them with a few
    training batches in train mode inside the block).
    """
    if getattr(optimizer, "transform", None) is None:
        raise TypeError(
            f"eval_params() takes a gradchain ChainOptimizer, got {type(optimizer).__name__} "
            "(a schedulefree optimizer swaps with its own .eval() / .train())"
        )
    providers = eval_providers(optimizer)
    if not providers and strict:
        raise ValueError(
            "eval_params(strict=True): this chain has no evaluation weights (no schedule_free() or lookahead()); "
            "its params are already the weights to evaluate"
        )
    with swap_in(optimizer, providers, "eval_params"):
        yield
