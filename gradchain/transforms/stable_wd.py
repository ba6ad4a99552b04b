"""Stable weight decay (SWD / AdamS): decoupled decay normalised by one global second-moment scale."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..base import Bucket, Transform, resolve_hyperparam
from ..hyperparams import Hyperparam, nonnegative
from ._declared import Declared

__all__ = ["add_stable_wd"]


class _StableWD(Declared):
    def __init__(self, weight_decay: float, adam: str, betas_key: str, name: str) -> None:
        self._declare(name, {"weight_decay": Hyperparam(weight_decay, nonnegative)})
        self._adam = adam
        self.reads_state = (f"{adam}.exp_avg_sq",)
        self._betas_key = betas_key

    def renamed(self, mapping: Mapping[str, str]) -> _StableWD:
        new = super().renamed(mapping)
        # the Adam's keys follow a chain-wide renaming (chain.prefixed renames them as well)
        new._betas_key = mapping.get(self._betas_key, self._betas_key)
        return new

    def _group_value(self, b: Bucket, key: str) -> Any:
        if key not in b.group:
            raise ValueError(
                f"add_stable_wd reads {key!r} of the preceding scale_by_adam from the param group, "
                f"but the group has no {key!r}; pass betas_key="
            )
        return resolve_hyperparam(key, Hyperparam(None), b.group[key], b)

    def _second_moments(self, b: Bucket) -> list[Tensor]:
        for buf in ("max_exp_avg_sq", "exp_avg_sq"):  # amsgrad's running max is the v^ Adam divides by
            v = b.state.get(f"{self._adam}.{buf}")
            if v is not None and all(t is not None for t in v):
                return v
        raise ValueError(
            f"add_stable_wd needs the second moment of a preceding scale_by_adam named {self._adam!r} "
            f"(state '{self._adam}.exp_avg_sq') for every param it decays; pass adam=<its name>"
        )

    def apply(self, buckets: list[Bucket]) -> None:
        live = [b for b in buckets if len(b)]
        if not live:
            return
        # one mean of v^ over every element of every param of every bucket (all groups)
        total: Tensor | None = None
        count = 0
        for b in live:
            v = self._second_moments(b)
            b2 = float(self._group_value(b, self._betas_key)[1])
            sharded = hasattr(v[0], "device_mesh")
            # sum() stays a Partial DTensor under FSDP2 through the divisions and additions below:
            # the whole mean then costs one all-reduce. Plain v >= 0: its L1 norms are its sums, one
            # call for the bucket rather than a small op per tensor
            sums = [t.sum() for t in v] if sharded else list(torch._foreach_norm(v, 1))
            torch._foreach_div_(sums, b.per_step(lambda t, b2=b2: 1.0 - b2**t))
            for s in sums if sharded else [torch.stack(sums).sum()]:
                s = s.to(device=live[0].params[0].device)
                total = s if total is None else total + s
            count += sum(t.numel() for t in v)
        assert total is not None
        vbar = total / count
        for b in live:
            wd = float(self.hp(b)["weight_decay"])
            # no gradient seen anywhere yet (v_bar = 0): no decay rather than wd / 0; == 0, not
            # > 0, so a NaN v_bar shows in the update
            coef = torch.where(vbar == 0, torch.zeros_like(vbar), wd / vbar.sqrt())
            coef = coef.to(device=b.params[0].device, dtype=b.dtype)
            if b.params[0].dtype == b.dtype:
                # a param term of the pending form: folded into the final write, no pass of its own
                b.add_param_term(coef)
                continue
            params = [p.to(b.dtype) for p in b.params]
            b.materialize()
            b.ensure_owned()
            torch._foreach_add_(b.updates, torch._foreach_mul(params, coef))


def add_stable_wd(
    weight_decay: float = 1e-4,
    *,
    adam: str = "adam",
    betas_key: str = "betas",
    name: str = "swd",
) -> Transform:
    """Stable weight decay: decoupled decay divided by the root of ONE global mean of Adam's v^.

    Rule: ``v_bar = sum over all params and elements of v^ / total element count`` (``v^ =
    v / (1 - b2^t)`` with each tensor's own step ``t``; amsgrad's running max when Adam keeps
    one), then ``u <- u + weight_decay / sqrt(v_bar) * p`` (no eps: the authors' rule). Placed
    before ``scale_by_lr`` this is AdamS: ``p <- p (1 - lr wd / sqrt(v_bar)) - lr m^/(sqrt(v^) + eps)``.

    The mean is a reduction over every tensor of every bucket (all param groups) that this
    transform sees; it stays a tensor (no host sync; under FSDP2 each ``sum`` is a DTensor
    reduction). It reads the state of the preceding ``scale_by_adam`` named ``adam`` from the
    bucket (``"<adam>.exp_avg_sq"``, declared in ``reads_state``, so a chain without that Adam
    before it is refused when built) and that Adam's ``betas`` from the param group (key
    ``betas_key``, renamed along with a chain's ``prefixed``/``renamed``).
    To exclude biases and norm gains, give them a param group with ``weight_decay=0``: they
    still count in ``v_bar``, as in AdamS. Wrapping this transform in ``masked()`` instead
    restricts the mean to the selected params too. When ``v_bar = 0`` (no non-zero gradient
    seen yet) no decay is applied, where AdamS would divide by zero.

    Reference: Xie et al., "On the Overlooked Pitfalls of Weight Decay and How to Mitigate
    Them" (SWD), arXiv:2011.11152, and the authors' AdamS code. Peer: pytorch_optimizer 4.1.0
    ``AdamS`` adds its eps to ``sqrt(v_bar)`` in the decay (a relative gap of about eps/sqrt(v_bar));
    it divides a copy of ``exp_avg_sq`` by the bias correction (an older version divided the
    stored buffer in place, compounding the correction every step).
    """
    return _StableWD(weight_decay, adam, betas_key, name)
