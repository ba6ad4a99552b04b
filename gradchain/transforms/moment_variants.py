"""Adam variants that change the moments: NAdam, AdaMomentum, diffGrad, AdaNorm."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import ops
from ..base import Bucket, Leaf, scalar_state, transform, zeros_state
from ..hyperparams import Hyperparam, betas_pair, nonnegative, positive, unit_interval
from ..hyperparams import betas as check_betas
from .moments import adam_denominator

__all__ = ["scale_by_adamomentum", "scale_by_adanorm", "scale_by_diffgrad", "scale_by_nadam"]

_FORMS = ("torch", "optax")


def _moments(p: torch.Tensor) -> dict:
    return {"exp_avg": zeros_state(p), "exp_avg_sq": zeros_state(p)}




def scale_by_nadam(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum_decay: float = 4e-3,
    *,
    form: str = "torch",
    name: str = "nadam",
) -> Leaf:
    """Adam with Nesterov momentum (NAdam), in torch's scheduled form or optax's simplified form.

    Rule (``form="torch"``): ``mu_t = b1 (1 - 0.5 * 0.96^(t momentum_decay))``, ``P_t = prod mu_i``
    (kept as state, so a scheduled ``b1`` is honoured as in torch),
    ``m^ = mu_{t+1} m_t / (1 - P_t mu_{t+1}) + (1 - mu_t) g_t / (1 - P_t)`` and
    ``u = m^ / (sqrt(v_t / (1 - b2^t)) + eps)``. ``form="optax"``: constant ``mu = b1``,
    ``m^ = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``, no extra state.
    Reference: Dozat 2016, "Incorporating Nesterov Momentum into Adam" (no arXiv id).
    Peers: torch ``NAdam`` (form="torch"; ``P_t`` is kept in the param's compute dtype, which is
    torch's when the default dtype is that dtype), optax ``nadam`` / ``scale_by_adam(nesterov=True)``.
    """
    if form not in _FORMS:
        raise ValueError(f"scale_by_nadam: form={form!r} must be one of {_FORMS}")

    def init(p: torch.Tensor) -> dict:
        st = _moments(p)
        if form == "torch":
            st["mu_product"] = scalar_state(p, 1.0)
        return st

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        psi = hp["momentum_decay"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ops.update_moment(m, updates, b1)
        ops.update_moment_per_elem_norm(v, updates, b2)
        den = adam_denominator(v, b2, hp["eps"], ctx)
        if form == "optax":
            cg = ctx.per_step(lambda t: (1.0 - b1) / ops.bias_correction(b1, t))
            cm = ctx.per_step(lambda t: b1 / ops.bias_correction(b1, t + 1))
        else:
            mu = lambda t: b1 * (1.0 - 0.5 * 0.96 ** (t * psi))  # noqa: E731
            prod = state["mu_product"]
            # the product as one vector, written back: an in-place op on each 0-d state is lost
            # when torch.compile (AOT) traces a step and specializes one of them (torch 2.13).
            # The coefficients depend on it (one per tensor): a vector, no host sync
            pv = ctx.state_vector(prod)
            pv = pv * ctx.per_step_vector(mu, pv)
            ctx.store_state_vector(prod, pv)
            cg = ctx.per_tensor((1.0 - pv).reciprocal() * ctx.per_step_vector(lambda t: 1.0 - mu(t), pv))
            mu_next = ctx.per_step_vector(lambda t: mu(t + 1), pv)
            cm = ctx.per_tensor((1.0 - pv * mu_next).reciprocal() * mu_next)
        out = torch._foreach_mul(m, cm)
        ops.axpy_(out, updates, cg)
        # u = out / den, left for the final write to fuse into one addcdiv (as torch's NAdam)
        ctx.defer_divide(den)
        return out

    spec = {
        "betas": Hyperparam(betas_pair(betas), check_betas),
        "eps": Hyperparam(eps, nonnegative),
        "momentum_decay": Hyperparam(momentum_decay, nonnegative),
    }
    return transform(name, spec, init, update, segmented=True, step_scalars=True, momentum_state=("exp_avg",))


def scale_by_adamomentum(
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *, name: str = "adamomentum"
) -> Leaf:
    """AdaMomentum: the second moment is an EMA of the squared *first moment* (a twofold EMA).

    Rule: ``m_t = b1 m + (1-b1) g``; ``v_t = b2 v + (1-b2) m_t^2 + eps`` (eps accumulated into
    ``v`` every step, as AdaBelief does); ``u = m^ / sqrt(v^)`` with no outer eps; ``v^ > 0`` always
    once ``eps > 0``. Reference: Wang et al., "Rethinking Adam: A Twofold Exponential Moving
    Average Approach", arXiv:2106.11514. Peer: none installed (third-party ports only).
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        ops.update_moment(m, updates, b1)
        ops.update_moment_per_elem_norm(v, m, b2)
        ops.add_(v, hp["eps"])
        den = torch._foreach_div(v, ctx.per_step(lambda t: ops.bias_correction(b2, t)))
        torch._foreach_sqrt_(den)
        ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(b1, t)))
        return torch._foreach_div(m, den)

    spec = {"betas": Hyperparam(betas_pair(betas), check_betas), "eps": Hyperparam(eps, nonnegative)}
    return transform(name, spec, _moments, update, elementwise=True, momentum_state=("exp_avg",))


def scale_by_diffgrad(
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *, name: str = "diffgrad"
) -> Leaf:
    """diffGrad: Adam whose step is damped by a friction ``xi = sigmoid(|g_{t-1} - g_t|)``.

    Rule: Adam's ``m``, ``v``; ``xi_t = sigmoid(|g_{t-1} - g_t|)`` elementwise, ``g_0 = 0``;
    ``u = xi_t m^ / (sqrt(v^) + eps)``. ``xi`` lies in [0.5, 1): coordinates whose gradient barely
    changes move at half Adam's step. ``xi`` is not scale-invariant (it depends on the loss
    scale). Keeps the previous gradient (3x state). Reference: Dubey et al., arXiv:1909.11015.
    Peer: the official code shivram1987/diffGrad (its eps sits at ``sqrt(v) + eps`` before the
    bias correction); pytorch_optimizer ``DiffGrad``.
    """

    def init(p: torch.Tensor) -> dict:
        return {**_moments(p), "prev_grad": zeros_state(p)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        m, v, prev = state["exp_avg"], state["exp_avg_sq"], state["prev_grad"]
        ops.update_moment(m, updates, b1)
        ops.update_moment_per_elem_norm(v, updates, b2)
        xi = torch._foreach_sub(prev, updates)
        torch._foreach_abs_(xi)
        ops.sigmoid_(xi)
        for q, u in zip(prev, updates):  # DTensor has no sharding rule for _foreach_copy_
            q.copy_(u)
        torch._foreach_mul_(xi, m)
        ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(b1, t)))
        # u = xi m / denom, left for the final write (one addcdiv)
        ctx.defer_divide(adam_denominator(v, b2, hp["eps"], ctx))
        return xi

    spec = {"betas": Hyperparam(betas_pair(betas), check_betas), "eps": Hyperparam(eps, nonnegative)}
    return transform(name, spec, init, update, elementwise=True, momentum_state=("exp_avg",))


def _none_or_at_least_one(x: object) -> str | None:
    # the ratio is at least 1 by its rule: a cap under 1 would scale every gradient, not cap a ratio
    if x is None or positive(x) is None and float(x) >= 1.0:  # type: ignore[arg-type]
        return None
    return "must be None or a finite number >= 1 (it caps the ratio e_t/|g_t|, which is >= 1 where applied)"


def scale_by_adanorm(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    norm_decay: float = 0.95,
    max_ratio: float | None = None,
    *,
    name: str = "adanorm",
) -> Leaf:
    """AdaNorm: Adam whose first moment sees the gradient rescaled to its norm history.

    Rule (per tensor): ``e_t = r e_{t-1} + (1-r) |g_t|`` (``r = norm_decay``, ``e_0 = 0``, no bias
    correction); ``s_t = (e_t/|g_t|) g_t`` if ``e_t > |g_t|`` else ``g_t`` (``|g| = 0``: ``s = g``),
    the ratio capped at ``max_ratio >= 1`` when given (gradchain's option against the late-training
    over-acceleration); ``m`` from ``s``, ``v`` from the raw ``g``; ``u = m^/(sqrt(v^) + eps)``.
    Reference: Dubey et al., arXiv:2210.06364. Peer: pytorch_optimizer ``AdaNorm`` (its ``r``; eps
    placed before the bias correction there).
    """

    def init(p: torch.Tensor) -> dict:
        return {**_moments(p), "grad_norm": scalar_state(p, 0.0)}

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        r, cap = hp["norm_decay"], hp["max_ratio"]
        m, v, e = state["exp_avg"], state["exp_avg_sq"], state["grad_norm"]
        # per-tensor scalars as one vector: a list of 0-d tensors eagerly, the flat vector fused
        ev = ctx.state_vector(e)
        # in the state's dtype (fp32 where state_dtype narrows the updates: bf16 norms would not lerp into it)
        norms = ctx.tensor_norms(updates, ev.dtype)
        ops.lerp_([ev], [norms], 1.0 - r)
        ctx.store_state_vector(e, ev)
        ratio = torch.where((ev > norms) & (norms > 0), ev / norms, torch.ones_like(ev))
        if cap is not None:
            ratio = ratio.clamp(max=cap)
        ops.update_moment_per_elem_norm(v, updates, b2)
        ops.mul_(m, b1)
        ops.addcmul_(m, updates, ctx.per_tensor(ratio), 1.0 - b1)
        ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(b1, t)))
        # u = m / denom, left for the final write (one addcdiv, no quotient buffer)
        ctx.defer_divide(adam_denominator(v, b2, hp["eps"], ctx))
        return list(m)

    spec = {
        "betas": Hyperparam(betas_pair(betas), check_betas),
        "eps": Hyperparam(eps, nonnegative),
        "norm_decay": Hyperparam(norm_decay, unit_interval),
        "max_ratio": Hyperparam(max_ratio, _none_or_at_least_one),
    }
    return transform(name, spec, init, update, segmented=True, static=("max_ratio",), momentum_state=("exp_avg",))
