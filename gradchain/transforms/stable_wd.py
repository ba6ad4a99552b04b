"""Stable weight decay (SWD / AdamS): decoupled decay normalised by one global second-moment scale."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..base import Bucket, Transform, apply_phases, resolve_hyperparam
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

    def _missing_betas(self) -> ValueError:
        key = self._betas_key
        return ValueError(
            f"add_stable_wd reads {key!r} of the preceding scale_by_adam from the param group, "
            f"but the group has no {key!r}; pass betas_key="
        )

    def bucket_hyperparams(self, b: Bucket) -> dict[str, Any]:
        """The decay and the Adam's betas of one bucket (schedules evaluated), by local name; checks,
        before anything moves, that the Adam's second moment is there."""
        self._second_moments(b)
        if self._betas_key not in b.group:
            raise self._missing_betas()
        betas = resolve_hyperparam(self._betas_key, Hyperparam(None), b.group[self._betas_key], b)
        return {"weight_decay": self.hp(b)["weight_decay"], "betas": betas}

    def phase_hyperparams(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The fused path's :meth:`bucket_hyperparams`: from a group's resolved values (by group key)."""
        if self._betas_key not in resolved:
            raise self._missing_betas()
        return {"weight_decay": resolved[self._keys["weight_decay"]], "betas": resolved[self._betas_key]}

    def _second_moments(self, b: Bucket) -> list[Tensor]:
        for buf in ("max_exp_avg_sq", "exp_avg_sq"):  # amsgrad's running max is the v^ Adam divides by
            v = b.state.get(f"{self._adam}.{buf}")
            if v is not None and all(t is not None for t in v):
                return v
        raise ValueError(
            f"add_stable_wd needs the second moment of a preceding scale_by_adam named {self._adam!r} "
            f"(state '{self._adam}.exp_avg_sq') for every param it decays; pass adam=<its name>"
        )

    # -- the step: the sum of v^ per bucket, one mean, the decay per bucket --------------------
    # (the fused path runs accumulate and finish compiled over each flat bucket: ``fused_phases``)
    fused_phases = True
    # finish adds a param term per element: the eager pieces may run it on slices of a tensor
    finish_elementwise = True

    def prepare(self, hps: list[dict[str, Any]], gstate: Mapping[str, Tensor]) -> dict[str, Any]:
        return {}

    def bucket_flags(self, hp: dict[str, Any]) -> dict[str, bool]:
        return {"frozen": False}  # every group counts in v_bar and is decayed (an lr of 0 stops it later)

    def init_accumulators(self, c: dict[str, Any], device: torch.device) -> tuple[Tensor | None, int]:
        """The sum of v^ (none yet: the first bucket's sum starts it, a DTensor under FSDP2) and
        the element count (a host number; on the fused path an int64 0-d tensor once added to)."""
        return None, 0

    def accumulate(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any],
                   acc: tuple[Tensor | None, int], reuse: bool = False) -> tuple[tuple[Tensor, int], None]:
        """Adds the bucket's sum of v^ (each tensor's over its own elements) and element count."""
        total, count = acc
        v = self._second_moments(b)
        b2 = hp["betas"][1]
        correction = b.per_step(lambda t: ops.bias_correction(b2, t))
        if b.segments is not None:
            # the fused path's flat buffer: per-param sums, which leave out the gaps between params
            # (a bucket of many params); the bucket's params share one step. The count is the
            # params' element counts (an int64 vector there), not the buffer's length
            sums = [(b.tensor_sums([v[0]]) / correction).sum()]
            n = b.segments[0].sum()
            count = count + n.to(count.device) if isinstance(count, Tensor) else count + n
        else:
            if hasattr(v[0], "device_mesh"):
                # sum() stays a Partial DTensor under FSDP2 through the divisions and additions
                # below: the whole mean then costs one all-reduce
                sums = [t.sum() for t in v]
                torch._foreach_div_(sums, correction)
            else:
                # plain v >= 0, each sum divided by its own correction: one division for the
                # bucket, not a small op per tensor
                sums = torch.stack(ops.sums_nonneg(v))
                per = correction if not isinstance(correction, list) else torch.stack(
                    [torch.as_tensor(x, dtype=sums.dtype, device=sums.device) for x in correction])
                sums = [(sums / per).sum()]
            count += sum(t.numel() for t in v)
        for s in sums:
            total = s if total is None else total + s.to(device=total.device)
        return (total, count), None

    def estimate(self, c: dict[str, Any], acc: tuple[Tensor, int], gstate: Mapping[str, Tensor]) -> dict[str, Any]:
        total, count = acc
        return {**c, "vbar": total / count}

    def finish(self, b: Bucket, hp: dict[str, Any], flags: dict[str, bool], c: dict[str, Any], carry: Any) -> None:
        """The decay ``wd / sqrt(v_bar) * p``: a pending param term, folded into the final write."""
        vbar = c["vbar"]
        # no gradient seen anywhere yet (v_bar = 0): no decay rather than wd / 0; == 0, not
        # > 0, so a NaN v_bar shows in the update
        coef = torch.where(vbar == 0, torch.zeros_like(vbar), hp["weight_decay"] / vbar.sqrt())
        coef = coef.to(device=b.params[0].device, dtype=b.dtype)
        if b.params[0].dtype == b.dtype:
            b.add_param_term(coef)
            return
        params = [p.to(b.dtype) for p in b.params]
        b.materialize()
        b.ensure_owned()
        torch._foreach_add_(b.updates, torch._foreach_mul(params, coef))

    def apply(self, buckets: list[Bucket]) -> None:
        apply_phases(self, buckets)


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
    reduction). On the fused path (``fused_phases``) the sum of ``v^`` is compiled per flat bucket,
    and the decay, the elementwise transforms after it (``scale_by_lr``) and the write are one
    compiled pass per bucket; ``apply`` states the rule once for both paths.
    It reads the state of the preceding ``scale_by_adam`` named ``adam`` from the
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
