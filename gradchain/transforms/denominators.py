"""Adam with an eps-free denominator: atan2 (Adam-atan2) and softplus (Sadam)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import ops
from ..base import Bucket, Leaf, transform, zeros_state
from ..hyperparams import Hyperparam, betas_pair, positive
from ..hyperparams import betas as check_betas

__all__ = ["scale_by_adam_atan2", "scale_by_adam_softplus"]


def _adam_moments(p: torch.Tensor) -> dict:
    return {"exp_avg": zeros_state(p), "exp_avg_sq": zeros_state(p)}


def _update_moments(updates: list, state: dict, b1: float, b2: float) -> tuple[list, list]:
    m, v = state["exp_avg"], state["exp_avg_sq"]
    ops.update_moment(m, updates, b1)
    ops.update_moment_per_elem_norm(v, updates, b2)
    return m, v


_M_CORRECTIONS = ("inside", "outside")


def scale_by_adam_atan2(
    betas: tuple[float, float] = (0.9, 0.99),
    a: float = 1.27,
    b: float = 1.0,
    *,
    m_correction: str = "inside",
    name: str = "adam_atan2",
) -> Leaf:
    """Adam whose division is an atan2: no eps, a bounded step.

    Rule: Adam's ``m`` and ``v``, ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``, and, by where the
    first-moment bias correction sits (``m_correction``, fixed when built):

    - ``"inside"`` (default; the paper's form): ``u = a atan2(m/c1, b sqrt(v/c2))``. Every
      coordinate's step is bounded by ``a pi/2``. This is what ``adam-atan2-pytorch``
      ``AdamAtan2`` computes.
    - ``"outside"``: ``u = (a/c1) atan2(m, b sqrt(v/c2))``, the form of the ``adam-atan2`` CUDA
      package (``AdamATan2``, which has no ``a``/``b``: ``a = b = 1``). It is a different function:
      its bound is ``a pi/(2 c1)`` rather than ``a pi/2``, and at step 1 the step is
      ``(a/(1-b1)) atan((1-b1)/b)`` (about ``a`` for ``b1 = 0.9``, ``b = 1``), not ``a atan(1/b)``.

    Both agree where ``|m| << b sqrt(v)``: ``u ~ (a/b) m^/sqrt(v^)`` (Adam without eps). Both are
    invariant to rescaling the gradients, and ``atan2(0, 0) = 0``. Where ``v`` is not finite (an
    inf gradient) the update is NaN, not ``atan2(inf, inf) = pi/4``, so ``apply_if_finite`` and
    GradScaler-style checks see it before it settles in the state. In a compiled float32 kernel
    (``fused=True``) the atan2 is :func:`gradchain.ops.atan2_nonneg_polynomial` (within 2 ulp,
    at memory speed where a CPU's ``atan2`` is compute-bound). Group keys ``betas``, ``a``,
    ``b``. Reference: Everett et al., "Scaling Exponents Across Parameterizations and
    Optimizers", arXiv:2407.05872. Defaults (``a = 1.27`` ~ 4/pi, ``b = 1``, betas
    ``(0.9, 0.99)``) are those of ``adam-atan2-pytorch`` 0.4.1; that ``a = 4/pi`` is the paper's
    own choice rests on secondary evidence.
    """
    if m_correction not in _M_CORRECTIONS:
        raise ValueError(f"scale_by_adam_atan2: m_correction={m_correction!r} must be one of {_M_CORRECTIONS}")
    inside = m_correction == "inside"

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        # scalars are floats on the eager path and 0-d tensors on the fused one: only ops' math
        b1, b2 = hp["betas"]
        a_, b_ = hp["a"], hp["b"]
        m, v = _update_moments(updates, state, b1, b2)
        # atan2 is unchanged when both its arguments are scaled by one positive factor: the bias
        # corrections and b all scale the denominator, and the numerator is m itself (4 passes
        # over a tensor after the moments, where a scaled copy of m would take a fifth)
        if inside:
            c = ctx.per_step(lambda t: b_ * ops.bias_correction(b1, t) / ops.sqrt(ops.bias_correction(b2, t)))
            scale = a_
        else:
            c = ctx.per_step(lambda t: b_ / ops.sqrt(ops.bias_correction(b2, t)))
            scale = ctx.per_step(lambda t: a_ / ops.bias_correction(b1, t))
        den = torch._foreach_sqrt(v)
        ops.mul_(den, c)
        # atan2(inf, inf) = pi/4 is finite: an inf gradient would sit in m and v unseen by
        # apply_if_finite. 0 * d is +0 where d is finite and NaN where it is not (v overflowed),
        # and atan2 of a NaN is NaN
        torch._foreach_add_(den, den, alpha=0.0)
        num = ops.atan2_nonneg_(m, den)
        if not (isinstance(scale, float) and scale == 1.0):
            ctx.defer_scale(scale)
        return num

    spec = {
        "betas": Hyperparam(betas_pair(betas), check_betas),
        "a": Hyperparam(a, positive),
        "b": Hyperparam(b, positive),
    }
    return transform(name, spec, _adam_moments, update, elementwise=True, momentum_state=("exp_avg",))


def scale_by_adam_softplus(
    betas: tuple[float, float] = (0.9, 0.999), softplus_beta: float = 50.0, *, name: str = "sadam"
) -> Leaf:
    """Adam with a softplus denominator and no eps (Sadam).

    Rule: Adam's ``m``, ``v`` and bias corrections, then ``u = m^ / softplus_b(sqrt(v^))`` with
    ``softplus_b(x) = log(1 + exp(b x)) / b`` (``b = softplus_beta``; identity once ``b x > 20``, so
    it never overflows). The denominator is at least ``log(2)/b``: coordinates with a tiny ``v`` get
    an SGD-like step ``m^ b/log 2`` instead of Adam's ``m^/eps`` blow-up. With torch's default
    ``b=1`` that floor (0.69) turns Adam into momentum SGD, so ``b`` is a real hyperparameter.
    Reference: Tong, Liang, Bi, arXiv:1908.00700. The official code (neilliang90/Sadam) applies
    softplus to the *uncorrected* ``sqrt(v)`` and the correction ``sqrt(1 - b2^t)`` outside, which
    equals this rule with sharpness ``b sqrt(1 - b2^t)`` (a higher floor in the first ~1/(1-b2)
    steps); it also defaults to AMSGrad and coupled L2. Peer: pytorch_optimizer
    ``Ranger21(use_softplus=True, beta_softplus=50)`` (only as part of Ranger21).
    """

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        # static: F.softplus takes its sharpness only as a Python number
        beta = float(hp["softplus_beta"])
        m, v = _update_moments(updates, state, b1, b2)
        # v^ as v times 1 / (1 - b2^t), a factor worked out once per step: the compiled step is
        # bound by its arithmetic, and a division per element costs several multiplications
        den = torch._foreach_mul(v, ctx.per_step(lambda t: 1.0 / ops.bias_correction(b2, t)))
        torch._foreach_sqrt_(den)
        # compiled, one exp and a polynomial (a CPU's exp and log1p at full accuracy would make
        # the step compute-bound); torch has no foreach softplus: one call per tensor eagerly
        den = ops.softplus_nonneg(den, beta, threshold=20.0)
        ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(b1, t)))
        return torch._foreach_div(m, den)

    spec = {"betas": Hyperparam(betas_pair(betas), check_betas), "softplus_beta": Hyperparam(softplus_beta, positive)}
    return transform(name, spec, _adam_moments, update, elementwise=True, static=("softplus_beta",),
                     momentum_state=("exp_avg",))
