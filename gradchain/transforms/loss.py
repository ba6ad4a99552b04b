"""Loss-driven step size: AdaLo's loss EMA sets the learning rate."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..base import Bucket, Leaf, StateDict, Transform, resolve_hyperparam, transform, zeros_state
from ..hyperparams import Hyperparam, nonnegative, positive, unit_interval

__all__ = ["loss_gated_ema", "scale_by_loss_ema"]

_MODES = ("adversarial", "compliant", "paper")


def _replicate_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a plain 0-d tensor, equal on every rank) as a replicated DTensor when ``like`` is one."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is None:
        return t
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


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
                "opt.step(loss=loss) (under GradScaler: scaler.step(opt, loss=loss))"
            )
        if loss.numel() != 1:
            raise ValueError(f"{who}: the loss must be a scalar, got shape {tuple(loss.shape)}")
        loss = loss.detach().reshape(()).to(dtype=torch.float32)
        if sync:
            loss = _mean_over_ranks(loss)
        finite = torch.isfinite(loss)
        ctx.shared[key] = (torch.where(finite, loss, torch.zeros_like(loss)), finite)
    return ctx.shared[key]


def loss_gated_ema(decay: float = 0.9, *, sync_loss: bool = True, name: str = "ema") -> Leaf:
    """EMA of the updates that holds still on a step whose loss is NaN or inf (AdaLo's first moment).

    Rule: ``m_t = decay m_{t-1} + (1 - decay) u_t`` if the loss is finite, else ``m_t = m_{t-1}``
    (a 0-d tensor lerp weight, no host sync); the update is ``m_t``, not bias-corrected. Only finite
    gradients leave ``m`` exact on a skipped step: for non-finite gradients use GradScaler or
    ``apply_if_finite``. Needs the loss (``ValueError`` otherwise); ``sync_loss`` as in
    :func:`scale_by_loss_ema`. Peer: optax ``ema`` (without the gate).
    """

    def init(p: Tensor) -> dict:
        return {"ema": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        _, finite = _step_loss(ctx, name, sync_loss)
        p0 = ctx.params[0]
        w = finite.to(device=p0.device, dtype=ctx.dtype) * (1.0 - float(hp["decay"]))
        w = _replicate_like(w, p0)
        torch._foreach_lerp_(state["ema"], updates, [w] * len(updates))
        return ctx.lend(list(state["ema"]))

    return transform(name, {"decay": Hyperparam(decay, unit_interval)}, init, update)


class _LossEMA(Transform):
    """See :func:`scale_by_loss_ema`."""

    def __init__(self, name: str, specs: dict[str, Hyperparam], mode: str, debias: bool, sync: bool) -> None:
        if not name or "." in name:
            raise ValueError(f"transform name {name!r} must be non-empty and contain no '.'")
        self.name, self._specs, self._mode, self._debias, self._sync = name, specs, mode, debias, sync
        self._keys = {k: k for k in specs}
        self.extra_defaults: dict[str, Any] = {}
        self.validate_group({k: s.default for k, s in self.hyperparams.items()})

    @property
    def hyperparams(self) -> dict[str, Hyperparam]:  # type: ignore[override]
        return {self._keys[k]: s for k, s in self._specs.items()}

    def renamed(self, mapping: Mapping[str, str]) -> _LossEMA:
        new = _LossEMA.__new__(_LossEMA)
        new.__dict__.update(self.__dict__)
        new._keys = {k: mapping.get(g, g) for k, g in self._keys.items()}
        return new

    def init_state(self, param: Tensor, name: str | None = None) -> StateDict:
        return {}

    def init_global_state(self, device: torch.device) -> StateDict:
        """One fp32 scalar for the whole optimizer (two with ``debias``: the EMA of ones)."""
        st = {f"{self.name}.loss_ema": torch.zeros((), dtype=torch.float32, device=device)}
        if self._debias:
            st[f"{self.name}.norm"] = torch.zeros((), dtype=torch.float32, device=device)
        return st

    def _hp(self, b: Bucket) -> dict[str, Any]:
        return {k: resolve_hyperparam(g, self._specs[k], b.group[g], b) for k, g in self._keys.items()}

    def apply(self, buckets: list[Bucket]) -> None:
        buckets = [b for b in buckets if len(b)]
        if not buckets:
            return
        shared = buckets[0].shared.get("global_state")
        if shared is None:
            raise RuntimeError(
                f"{self.name}: scale_by_loss_ema keeps optimizer-level state; run it in a ChainOptimizer"
            )
        loss, finite = _step_loss(buckets[0], self.name, self._sync)
        hps = [self._hp(b) for b in buckets]
        decay = float(hps[0]["loss_decay"])
        if any(float(h["loss_decay"]) != decay for h in hps):
            raise ValueError(
                f"{self.name}: the loss EMA is one for the whole optimizer, but param groups set "
                f"{self._keys['loss_decay']} to {sorted({float(h['loss_decay']) for h in hps})}"
            )
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
        for b, hp in zip(buckets, hps):
            if self._mode == "compliant":
                lr = (1.0 - value) / float(hp["kappa"])
            else:
                lr = value / float(hp["kappa"])
            lr = torch.where(finite, lr.clamp(min=float(hp["eps"])), torch.zeros_like(lr))
            p0 = b.params[0]
            lr = _replicate_like(lr.to(dtype=b.dtype, device=p0.device), p0)
            ok = _replicate_like(finite.to(device=p0.device), p0)
            # where, not only lr = 0: a non-finite loss usually comes with non-finite gradients
            b.updates = [torch.where(ok, u * lr, torch.zeros_like(u)) for u in b.materialize()]


def scale_by_loss_ema(
    loss_decay: float = 0.999,
    kappa: float = 3.0,
    eps: float = 1e-8,
    *,
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
    ``adalo`` recipe, the momentum is kept too; the optimizer's per-param step counters still
    count the step: AdaLo does not read them). With ``sync_loss`` and torch.distributed initialized, the
    loss is averaged over the default group (one all-reduce of a scalar) so every data-parallel
    rank uses the same step. ``L < -1`` is clamped to -1 for the article's modes (the limit of its
    formula). Reference: Jeong & Koo, "AdaLo", Information Sciences 690 (2025) 121607 (no arXiv
    id); the article's modes: cpuimage/AdaLo ``adalo.py``. Peer: none.
    """
    if mode not in _MODES:
        raise ValueError(f"scale_by_loss_ema: mode={mode!r} must be one of {_MODES}")
    specs = {
        "loss_decay": Hyperparam(loss_decay, unit_interval),
        "kappa": Hyperparam(kappa, positive),
        "eps": Hyperparam(eps, nonnegative),
    }
    return _LossEMA(name, specs, mode, debias, sync_loss)
