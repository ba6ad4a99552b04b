"""Lookahead: slow weights pulled toward the fast ones every k steps (a wrapper of any transform)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, StateDict, Transform, check_unique_names, row_blocks, zeros_state
from ..evaluation import eval_providers, swap_in
from ..hyperparams import Hyperparam, closed_unit_interval
from ._declared import Declared

__all__ = ["lookahead", "slow_weights"]

PULLBACK_MODES = ("none", "reset", "pullback")
# buffer names of first-moment state in gradchain's transforms (trace, scale_by_adam, ema)


def _positive_int(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be an int >= 1"
    return None


class Lookahead(Declared):
    """See :func:`lookahead`."""

    last_in_chain = ("its sync is the update phi - p, which a transform after it would change too. Put the lr "
                     "inside it, lookahead(chain(..., scale_by_lr(lr))), and accumulate() or apply_if_finite() "
                     "around it")

    def __init__(
        self,
        inner: Transform,
        k: int,
        alpha: float,
        pullback_momentum: str,
        momentum_buffers: Sequence[str] | None,
        name: str,
        keys: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(inner, Transform):
            raise TypeError(f"lookahead() wraps a gradchain Transform, got {type(inner).__name__}")
        if pullback_momentum not in PULLBACK_MODES:
            raise ValueError(f"invalid pullback_momentum={pullback_momentum!r}: must be one of {PULLBACK_MODES}")
        specs = {"k": Hyperparam(k, _positive_int), "alpha": Hyperparam(alpha, closed_unit_interval)}
        self._declare(name, specs, keys or {"k": "lookahead_k", "alpha": "lookahead_alpha"})
        self.inner = inner
        self.pullback_momentum = pullback_momentum
        self.momentum_buffers = tuple(momentum_buffers) if momentum_buffers is not None else None
        self.extra_defaults = dict(inner.extra_defaults)
        self.shared_keys = inner.shared_keys  # keys the inner chain shares on purpose stay shared
        self.fixed_options = dict(inner.fixed_options)
        self._check_tree()

    def _check_tree(self) -> None:
        clash = sorted(set(self.declared) & set(self.inner.hyperparams))
        if clash:
            raise ValueError(f"lookahead(): the inner transform already declares {clash}; rename them")
        check_unique_names(self, "lookahead()")

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {**self.inner.hyperparams, **self.declared}

    # -- tree -------------------------------------------------------------------------------
    def leaves(self) -> Iterator[Transform]:
        yield self
        yield from self.inner.leaves()

    def paths(self) -> list[list[str]]:
        return [[self.name, *p] for p in self.inner.paths()]

    def renamed(self, mapping: Mapping[str, str]) -> Lookahead:
        new = super().renamed(mapping)
        new.inner = self.inner.renamed(mapping)
        new._check_tree()
        return new

    def validate_group(self, group: Mapping[str, Any]) -> None:
        self.inner.validate_group(group)
        super().validate_group(group)

    def check_routes(self, named: Sequence[tuple[str | None, Tensor]]) -> None:
        self.inner.check_routes(named)

    # -- state ------------------------------------------------------------------------------
    @property
    def slow_key(self) -> str:
        return f"{self.name}.slow"

    def _momentum_keys(self, state: Mapping[str, Any]) -> list[str]:
        keys = self.momentum_buffers if self.momentum_buffers is not None else self.inner.momentum_keys()
        return [k for k in keys if k in state]

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        state = self.inner.init_state(param, name)
        if self.pullback_momentum != "none" and not self._momentum_keys(state):
            who = name if name is not None else f"of shape {tuple(param.shape)}"
            raise ValueError(
                f"lookahead(pullback_momentum={self.pullback_momentum!r}): param {who} has no momentum buffer "
                f"among its state {sorted(state)}; pass momentum_buffers=[...]"
            )
        if self.pullback_momentum == "pullback":
            for k in self._momentum_keys(state):
                state[f"{self.name}.slow_{k}"] = zeros_state(param)
        slow = zeros_state(param)  # phi_0 = theta_0 (fp32 for low-precision params)
        slow.copy_(param.detach())
        state[self.slow_key] = slow
        return state

    def eval_weight(self, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor | None:
        """The slow weights of ``param``: what to evaluate (see :func:`gradchain.eval_params`)."""
        return state.get(self.slow_key)

    # -- the step ---------------------------------------------------------------------------
    def apply(self, buckets: list[Bucket]) -> None:
        self.inner.apply(buckets)
        self.sync(buckets)

    def due(self, buckets: list[Bucket]) -> list[list[int]]:
        """Per bucket, the tensors this step syncs (their step a multiple of ``k``). Where none is
        due, the inner chain's update is the update: the eager pieces let the inner chain write."""
        out: list[list[int]] = []
        for b in buckets:
            k = int(self.hp(b)["k"]) if len(b) else 1
            out.append([i for i, t in enumerate(b.step_values) if int(t) % k == 0])
        return out

    def sync(self, buckets: list[Bucket], due: list[list[int]] | None = None) -> None:
        """The sync, after the inner chain made its updates, for the tensors whose step is ``due``."""
        for b, idx in zip(buckets, self.due(buckets) if due is None else due, strict=True):
            if idx:
                self._sync(b, idx, float(self.hp(b)["alpha"]))

    def due_flat(self, resolved: Mapping[str, Any], step: float) -> bool:
        """Whether the fused path's bucket at host step ``step`` syncs this step."""
        return int(step) % int(resolved[self.group_key("k")]) == 0

    def sync_flat(self, fb: Any, resolved: Mapping[str, Any], step: float, fast: Tensor | None = None) -> None:
        """The sync on the fused path, after the inner chain wrote the fast weights into ``fb``.

        ``phi <- phi + alpha (theta - phi)``, ``theta <- phi``: one pass over the flat buffers every
        ``k`` steps, the inner chain compiled in between. ``fast``: where the inner chain wrote the
        fast weights instead of the params (low-precision params: unrounded, as the eager path's).
        """
        if not self.due_flat(resolved, step):
            return
        alpha = float(resolved[self.group_key("alpha")])
        slow = fb.flat_state[self.slow_key]
        p = fb.flat_params
        fast = p if fast is None else fast
        # a block at a time on a CPU: the copy reads the block the lerp just wrote from the cache
        # (16 bytes an element moved, not 20); one launch each on a GPU
        for a, z in row_blocks(p) if p.device.type == "cpu" else [(0, fb.total)]:
            s, q = slow[a:z], fast[a:z]
            s.lerp_(q if q.dtype == s.dtype else q.to(s.dtype), alpha)
            p[a:z].copy_(s)
        if self.pullback_momentum == "none":
            return
        state = {key: fb.state_views.get(key) or [st[key] for st in fb.states] for key in fb.states[0]}
        for key in self._momentum_keys(state):
            bufs = state[key]
            if self.pullback_momentum == "reset":
                torch._foreach_zero_(bufs)
            else:
                slow_m = state[f"{self.name}.slow_{key}"]
                torch._foreach_lerp_(bufs, slow_m, 1.0 - alpha)
                for m, sm in zip(slow_m, bufs):
                    m.copy_(sm)

    def _sync(self, b: Bucket, idx: list[int], alpha: float) -> None:
        """phi <- phi + alpha (theta_fast - phi); the update becomes ``phi - p`` so the write lands on phi."""
        b.materialize()
        b.ensure_owned()
        params = [b.params[i] if b.params[i].dtype == b.dtype else b.params[i].to(b.dtype) for i in idx]
        # in the updates' own buffers, which become the new updates: a sync step holds no
        # model-sized temporary beyond the update (three before: the update, theta and phi - p)
        fast = [b.updates[i] for i in idx]
        torch._foreach_add_(fast, params)  # what the inner step would write
        slow = [b.state[self.slow_key][i] for i in idx]
        torch._foreach_lerp_(slow, fast, alpha)
        ops.copy_(fast, slow)
        torch._foreach_sub_(fast, params)
        if self.pullback_momentum == "none":
            return
        for i in idx:
            present = {key: v[i] for key, v in b.state.items() if v[i] is not None}
            for key in self._momentum_keys(present):
                buf = present[key]
                if self.pullback_momentum == "reset":
                    buf.zero_()
                else:  # pytorch_optimizer's pullback: m <- alpha m + (1 - alpha) m_slow; m_slow <- m
                    slow_m = present[f"{self.name}.slow_{key}"]
                    buf.lerp_(slow_m, 1.0 - alpha)
                    slow_m.copy_(buf)


def lookahead(
    inner: Transform,
    k: int = 5,
    alpha: float = 0.5,
    pullback_momentum: str = "none",
    *,
    momentum_buffers: Sequence[str] | None = None,
    name: str = "lookahead",
) -> Lookahead:
    """Lookahead around any transform: k fast steps forward, one step back toward the slow weights.

    Rule: slow weights ``phi_0 = theta_0``; the inner transform updates the fast weights ``theta``;
    after every k-th step of a param (its ``"step"`` count, so the cycle survives save/load)
    ``phi <- phi + alpha (theta - phi)`` and ``theta <- phi``. The sync is expressed as the update
    ``phi - p``, so the chain stays one pipeline; nothing may follow it (a chain refuses that; ``accumulate`` and
    ``apply_if_finite`` go outside it: ``accumulate(lookahead(...), 4)``). At a sync
    the inner momentum (``momentum_buffers``, by default the buffers the inner transforms declare
    as ``momentum_state``: Adam's ``exp_avg``, ``trace``'s ``buffer``, ``ema``'s ``ema``) is left
    alone (``"none"``), zeroed (``"reset"``) or pulled back
    (``"pullback"``: ``m <- alpha m + (1 - alpha) m_slow; m_slow <- m``, ``m_slow_0 = 0``), as
    pytorch_optimizer does to torch SGD's ``momentum_buffer`` (it leaves Adam's moments alone).
    Group keys ``lookahead_k``, ``lookahead_alpha``. Evaluate with the
    slow weights through :func:`gradchain.eval_params` (or :func:`slow_weights`). Reference: Zhang,
    Lucas, Hinton, Ba, arXiv:1907.08610.
    Peer: pytorch_optimizer ``Lookahead``, optax ``lookahead``, timm ``Lookahead`` (timm sets
    ``phi`` lazily at the first sync, so its first sync is a no-op).
    """
    return Lookahead(inner, k, alpha, pullback_momentum, momentum_buffers, name)


@contextlib.contextmanager
def slow_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Swap the Lookahead slow weights into the params for the ``with`` block, then restore the fast ones.

    :func:`gradchain.eval_params` restricted to Lookahead: the fast weights are restored bit for bit
    even if the block raises; ``optimizer.step()`` inside the block is refused; params without
    Lookahead state (never stepped) are left as they are. ``ValueError`` if the chain has no
    ``lookahead()``::

        with slow_weights(opt):
            evaluate(model)
    """
    providers = eval_providers(optimizer, Lookahead)
    if not providers:
        raise ValueError("slow_weights() needs a ChainOptimizer whose transform contains lookahead()")
    with swap_in(optimizer, providers, "slow_weights"):
        yield
