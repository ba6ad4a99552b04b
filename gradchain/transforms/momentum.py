"""Heavy-ball and Nesterov momentum (torch.optim.SGD semantics)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import ops
from ..base import Bucket, Leaf, transform, zeros_state
from ..hyperparams import Hyperparam, nonnegative, number, unit_interval

__all__ = ["ema", "nesterov", "trace"]


def _flag(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be a bool"


def _check_nesterov(hp: Mapping) -> None:
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError(
            f"Nesterov momentum requires momentum > 0 and zero dampening, got "
            f"momentum={hp['momentum']!r}, dampening={hp['dampening']!r}"
        )


def trace(momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False, *, name: str = "momentum") -> Leaf:
    """Momentum with dampening, as torch.optim.SGD.

    Rule: ``b_1 = g``; ``b_t = momentum * b_{t-1} + (1 - dampening) * g``; the update is ``b_t``,
    or ``g + momentum * b_t`` with ``nesterov``. ``momentum``, ``dampening`` and ``nesterov`` are
    group keys, so each param group may set its own, as in torch (a group with ``momentum=0`` steps
    by ``g``, its dampening ignored). Reference: Sutskever et al. 2013.
    Peer: torch ``SGD(momentum, dampening, nesterov)``; optax ``trace`` (zero-initialised).
    """

    def init(p: torch.Tensor) -> dict:
        return {"buffer": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        mu, damp = hp["momentum"], hp["dampening"]
        buf = state["buffer"]
        # torch's b_1 = g: the buffer is still zero at a tensor's first step, and no dampening applies
        # then, nor without momentum
        ops.mul_(buf, mu)
        # no dampening: the same 1.0 at every step, without reading the step counts to the host
        no_damp = isinstance(damp, (int, float)) and damp == 0
        ops.axpy_(buf, updates, 1.0 if no_damp else ctx.per_step(lambda t: 1.0 - damp * (t > 1) * (mu != 0)))
        if hp["nesterov"]:
            out = [u.clone() for u in updates] if ctx.tensor_scalars else torch._foreach_add(updates, buf, alpha=mu)
            if ctx.tensor_scalars:
                ops.axpy_(out, buf, mu)
            return out
        return list(buf)

    spec = {
        "momentum": Hyperparam(momentum, nonnegative),
        "dampening": Hyperparam(dampening, number),
        "nesterov": Hyperparam(bool(nesterov), _flag),
    }
    return transform(name, spec, init, update, check=_check_nesterov, elementwise=True, static=("nesterov",),
                     momentum_state=("buffer",))


def nesterov(momentum: float = 0.9, dampening: float = 0.0, *, name: str = "nesterov") -> Leaf:
    """Nesterov momentum, torch form: ``b_t = momentum * b_{t-1} + g``, update ``g + momentum * b_t``.

    ``momentum > 0`` and ``dampening = 0``, as torch's SGD requires for Nesterov (the argument is
    there for a group that states it); other values are refused.

    Reference: Sutskever et al. 2013. Peer: torch ``SGD(nesterov=True)``, optax ``trace(nesterov=True)``.
    """
    return trace(momentum, dampening, nesterov=True, name=name)


def ema(decay: float = 0.9, debias: bool = False, nesterov: bool = False, *, name: str = "ema") -> Leaf:
    """Exponential moving average of the updates, optionally bias-corrected or Nesterov-style.

    Rule: ``m_t = decay m_{t-1} + (1 - decay) u_t`` (``m_0 = 0``); the update is ``m_t``, or
    ``m_t / (1 - decay^t)`` with ``debias``, or ``lerp(u_t, m_t, decay) = (1 - decay) u_t + decay m_t``
    with ``nesterov`` (the EMA form of Nesterov momentum torch.optim.Muon and Keller Jordan's Muon
    use). Peer: optax ``ema``; torch ``Muon`` momentum (``nesterov=True``).
    """
    if debias and nesterov:
        raise ValueError("ema(): debias and nesterov cannot be combined")

    def init(p: torch.Tensor) -> dict:
        return {"ema": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        d = hp["decay"]
        ops.update_moment(state["ema"], updates, d)
        if nesterov:
            if not ctx.tensor_scalars:
                return torch._foreach_lerp(updates, state["ema"], d)
            out = [u.clone() for u in updates]
            ops.lerp_(out, state["ema"], d)
            return out
        if debias:
            ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(d, t)))
        return list(state["ema"])

    return transform(name, {"decay": Hyperparam(decay, unit_interval)}, init, update, elementwise=True,
                     momentum_state=("ema",))
