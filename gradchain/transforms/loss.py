"""Loss-driven step size: AdaLo's loss EMA sets the learning rate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .._dtensor import replicate_like
from ..base import Bucket, Leaf, StateDict, Transform, transform, zeros_state
from ..hyperparams import Hyperparam, betas, betas_pair, nonnegative, positive, unit_interval
from ._declared import Declared

__all__ = ["loss_gated_ema", "scale_by_loss_ema"]

_MODES = ("adversarial", "compliant", "paper")


def _mean_over_ranks(loss: Tensor) -> Tensor:
    """The loss averaged over the default process group (data-parallel ranks see different batches)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return loss
    loss = loss.clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def _step_loss(ctx: Bucket, who: str, sync: bool) -> tuple[Tensor, Tensor]:
    """This step's loss as a 0-d fp32 tensor (0 where not finite) and whether it is finite.

    Computed once per step (cached in ``ctx.shared``) so every loss-aware transform and every
    rank agree on it.
    """
    key = ("loss", sync)
    if key not in ctx.shared:
        loss = ctx.loss
        if loss is None:
            raise ValueError(
                f"{who}: the loss sets the step, but none reached it; call opt.step(closure) or "
                "opt.step(loss=loss) (under GradScaler: scaler.step(opt, loss=loss)). (torch.distributed."
                "checkpoint's get/set_optimizer_state_dict step a fresh optimizer without a loss to make its "
                "state: call opt.init_state() first)"
            )
        if loss.numel() != 1:
            raise ValueError(f"{who}: the loss must be a scalar, got shape {tuple(loss.shape)}")
        loss = loss.detach().reshape(()).to(dtype=torch.float32)
        if sync:
            loss = _mean_over_ranks(loss)
        finite = torch.isfinite(loss)
        ctx.shared[key] = (torch.where(finite, loss, torch.zeros_like(loss)), finite)
    return ctx.shared[key]


def _decay_spec(decay: Any, entry: int | None, key: str) -> Hyperparam:
    """A decay in [0, 1); with ``entry`` (0 or 1) a pair of them, as torch's ``betas``, read at ``entry``."""
    if entry is None:
        return Hyperparam(decay, unit_interval)
    if entry not in (0, 1):
        raise ValueError(f"invalid entry={entry!r}: must be 0 or 1 (an index into the pair {key})")
    return Hyperparam(betas_pair(decay, key), betas)


def _decay(value: Any, entry: int | None) -> float:
    return float(value if entry is None else value[entry])


def loss_gated_ema(
    decay: float | tuple[float, float] = 0.9, *, entry: int | None = None, sync_loss: bool = True, name: str = "ema"
) -> Leaf:
    """EMA of the updates that holds still on a step whose loss is NaN or inf (AdaLo's first moment).

    Rule: ``m_t = decay m_{t-1} + (1 - decay) u_t`` if the loss is finite, else ``m_t = m_{t-1}``
    (a 0-d tensor lerp weight, no host sync); the update is ``m_t``, not bias-corrected. Only finite
    gradients leave ``m`` exact on a skipped step: for non-finite gradients use GradScaler or
    ``apply_if_finite``. Needs the loss (``ValueError`` otherwise); ``sync_loss`` as in
    :func:`scale_by_loss_ema`. With ``entry`` (0 or 1), ``decay`` is a pair such as torch's
    ``betas`` and the decay is ``decay[entry]`` (the ``adalo`` recipe keeps both its decays in one
    ``betas`` key, where torch's momentum-cycling schedulers look). Peer: optax ``ema`` (without
    the gate).
    """

    def init(p: Tensor) -> dict:
        return {"ema": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        _, finite = _step_loss(ctx, name, sync_loss)
        p0 = ctx.params[0]
        decay = hp["decay"] if entry is None else hp["decay"][entry]
        # a tensor weight (the gate): ops.lerp_ takes it in the buffers' dtype, one lerp per tensor,
        # which the compiler fuses (a foreach lerp with tensor weights would stay a call of its own)
        w = replicate_like(finite.to(device=p0.device, dtype=ctx.dtype) * (1.0 - decay), p0)
        ops.lerp_(state["ema"], updates, w)
        return ctx.lend(list(state["ema"]))

    return transform(name, {"decay": _decay_spec(decay, entry, "decay")}, init, update, elementwise=True,
                     momentum_state=("ema",))


class _LossEMA(Declared):
    """See :func:`scale_by_loss_ema`."""

    def __init__(
        self, name: str, specs: dict[str, Hyperparam], mode: str, debias: bool, sync: bool, entry: int | None
    ) -> None:
        self._declare(name, specs)
        self._mode, self._debias, self._sync, self._entry = mode, debias, sync, entry

    def init_global_state(self, device: torch.device) -> StateDict:
        """One fp32 scalar for the whole optimizer (two with ``debias``: the EMA of ones)."""
        st = {f"{self.name}.loss_ema": torch.zeros((), dtype=torch.float32, device=device)}
        if self._debias:
            st[f"{self.name}.norm"] = torch.zeros((), dtype=torch.float32, device=device)
        return st

    def validate_groups(self, resolved: list[Mapping[str, Any]]) -> None:
        """Every group's decay of the one loss EMA agrees (by group key), before any state moves."""
        key = self.group_key("loss_decay")
        self._one_decay([r[key] for r in resolved if key in r])

    def _one_decay(self, values: list) -> float:
        decays = sorted({_decay(v, self._entry) for v in values})
        if len(decays) > 1:
            key = self.group_key("loss_decay") + ("" if self._entry is None else f"[{self._entry}]")
            raise ValueError(
                f"{self.name}: the loss EMA is one for the whole optimizer, but param groups set {key} to {decays}"
            )
        return decays[0]

    def apply(self, buckets: list[Bucket]) -> None:
        live = [b for b in buckets if len(b)]
        # pending, folded into the final write (no pass and no model-sized buffer of its own);
        # u * 0, not a where: a non-finite update entry (a NaN gradient already kept by the
        # state before this) stays non-finite, so apply_if_finite can undo the step
        for b, lr in zip(live, self.step_scales(live), strict=True):
            b.defer_scale(lr)

    def step_scales(self, buckets: list[Bucket]) -> list[Tensor]:
        """This step's learning rate for each bucket, as a 0-d tensor: from the loss and the EMA,
        which it advances, never from the updates (so the fused path works it out before its
        kernels and passes it in: one kernel for the whole chain)."""
        if not buckets:
            return []
        shared = buckets[0].shared.get("global_state")
        if shared is None:
            raise RuntimeError(
                f"{self.name}: scale_by_loss_ema keeps optimizer-level state; run it in a ChainOptimizer"
            )
        loss, finite = _step_loss(buckets[0], self.name, self._sync)
        hps = [self.hp(b) for b in buckets]
        decay = self._one_decay([h["loss_decay"] for h in hps])
        ema = shared[f"{self.name}.loss_ema"]
        loss, finite = loss.to(ema.device), finite.to(ema.device)
        # the article's map (tanh(-log1p(L)/2) + 1)/2 is exactly 1/(2 + L); L < -1 is clamped to its limit
        target = loss if self._mode == "paper" else 1.0 / (2.0 + loss.clamp(min=-1.0))
        # a non-finite loss leaves the EMA as it was (no Python branch on the value)
        w = torch.where(finite, torch.full_like(loss, 1.0 - decay), torch.zeros_like(loss))
        ema.lerp_(target, w)
        value = ema
        if self._debias:
            norm = shared[f"{self.name}.norm"]
            norm.lerp_(torch.ones_like(norm), w)
            value = ema / norm
        scales = []
        for b, hp in zip(buckets, hps, strict=True):
            if self._mode == "compliant":
                lr = (1.0 - value) / float(hp["kappa"])
            else:
                lr = value / float(hp["kappa"])
            lr = torch.where(finite, lr.clamp(min=float(hp["eps"])), torch.zeros_like(lr))
            p0 = b.params[0]
            scales.append(replicate_like(lr.to(dtype=b.dtype, device=p0.device), p0))
        return scales


def scale_by_loss_ema(
    loss_decay: float | tuple[float, float] = 0.999,
    kappa: float = 3.0,
    eps: float = 1e-8,
    *,
    entry: int | None = None,
    mode: str = "adversarial",
    debias: bool = False,
    sync_loss: bool = True,
    name: str = "loss_ema",
) -> Transform:
    """AdaLo's step size: multiply the update by a learning rate set by an EMA of the loss.

    Rule: ``a_t = d a_{t-1} + (1 - d) T(L_t)`` (``d = loss_decay``, ``a_0 = 0``; divided by
    ``1 - d^k`` with ``debias``) and ``u <- lr_t u`` with
    ``mode="paper"``: ``T(L) = L``, ``lr_t = max(a_t/kappa, eps)`` (big loss, big step);
    ``mode="adversarial"`` (the article's default): ``T(L) = 1/(2+L)`` (the article's
    ``(tanh(-log1p(L)/2)+1)/2``), ``lr_t = max(a_t/kappa, eps)``: big loss, *small* step, in
    (0, 0.5/kappa]; ``mode="compliant"``: same ``T``, ``lr_t = max((1-a_t)/kappa, eps)``, in
    [0.5/kappa, 1/kappa]. Without ``debias`` the EMA starts at 0: an implicit warmup of about
    ``1/(1-d)`` steps (adversarial, paper) or the largest step first (compliant).
    Put decoupled decay before it to get the article's ``lambda lr_t`` decay.

    State: one fp32 scalar for the whole optimizer (plus the EMA of ones with ``debias``), in
    ``ChainOptimizer.global_state``, saved in the state dict: it advances once per step whatever
    params have grads, and keeps full precision for bf16 params. ``loss`` must reach the step
    (``step(closure)`` or ``step(loss=...)``), else ``ValueError``; a NaN/inf loss skips the step:
    the EMA is kept and the update is 0 (with :func:`loss_gated_ema` as the first moment, as in the
    ``adalo`` recipe, the momentum is kept too; the optimizer's per-param step counters still count
    the step: AdaLo does not read them). The update is 0 times the incoming update, so a NaN/inf
    entry in it stays NaN and ``apply_if_finite`` still sees a bad gradient. With ``sync_loss`` and
    torch.distributed initialized, the loss is averaged over the default group (one all-reduce of a
    scalar) so every data-parallel rank uses the same step. ``L < -1`` is clamped to -1 for the
    article's modes (the limit of its formula). Reference: Jeong & Koo, "AdaLo", Information
    Sciences 690 (2025) 121607 (no arXiv id); the article's modes: cpuimage/AdaLo ``adalo.py``.
    Peer: none. ``entry`` as in :func:`loss_gated_ema` (``loss_decay`` a pair, the decay its entry
    ``entry``).
    """
    if mode not in _MODES:
        raise ValueError(f"scale_by_loss_ema: mode={mode!r} must be one of {_MODES}")
    specs = {
        "loss_decay": _decay_spec(loss_decay, entry, "loss_decay"),
        "kappa": Hyperparam(kappa, positive),
        "eps": Hyperparam(eps, nonnegative),
    }
    return _LossEMA(name, specs, mode, debias, sync_loss, entry)
