"""Adam's first and second moments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import ops
from ..base import Bucket, Leaf, RootDivisor, transform, zeros_state
from ..hyperparams import Hyperparam, betas_pair, flag, nonnegative
from ..hyperparams import betas as check_betas

__all__ = ["scale_by_adam"]


def adam_denominator(v: list, b2: Any, eps: Any, ctx: Bucket) -> RootDivisor:
    """``sqrt(v) / sqrt(1 - b2^t) + eps`` (torch's form), pending: formed by the final write, or
    now by ``.tensors()``."""
    return RootDivisor(v, ctx.per_step(lambda t: ops.sqrt(ops.bias_correction(b2, t))), eps)


def scale_by_adam(
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    amsgrad: bool = False,
    name: str = "adam",
) -> Leaf:
    """Scale by Adam's bias-corrected moments.

    Rule: ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``m^ = m/(1-b1^t)``,
    ``v^ = v/(1-b2^t)`` (``max`` of all ``v`` so far with ``amsgrad``, a group key as in torch), and
    ``u = m^ / (sqrt(v^ + eps_root) + eps)``: ``eps`` outside the root as torch does, the optional
    ``eps_root`` inside as optax does. Reference: Kingma & Ba, arXiv:1412.6980; AMSGrad, Reddi et
    al. 2018. Peer: torch ``Adam``/``AdamW``, optax ``scale_by_adam``. The update is the step
    followed by ``from_state`` (``u`` from the new ``m`` and ``v`` alone), so on the fused path a
    reduction over every bucket after it (AdamS's mean of ``v^``) gets ``u`` again in its second
    pass rather than from a kept buffer.
    """

    def init(p: torch.Tensor, hp: Mapping) -> dict:
        st = {"exp_avg": zeros_state(p), "exp_avg_sq": zeros_state(p)}
        if hp["amsgrad"]:  # the param's group decides, as in torch
            st["max_exp_avg_sq"] = zeros_state(p)
        return st

    def update(updates: list, state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if hp["amsgrad"] and "max_exp_avg_sq" not in state:  # (before the moments move, as torch)
            raise ValueError(
                "amsgrad was switched on for a param group after its params' state was made; set it "
                "in the group before the first step (as torch, which keeps the running max from then)"
            )
        ops.update_moment(m, updates, b1)
        ops.update_moment_per_elem_norm(v, updates, b2)
        if hp["amsgrad"]:
            torch._foreach_maximum_(state["max_exp_avg_sq"], v)
        return from_state(state, hp, ctx)

    def from_state(state: dict, hp: Mapping, ctx: Bucket) -> list:
        b1, b2 = hp["betas"]
        eps, eps_root = hp["eps"], hp["eps_root"]
        m = state["exp_avg"]
        v = state["max_exp_avg_sq"] if hp["amsgrad"] else state["exp_avg_sq"]
        if eps_root:
            denom = torch._foreach_div(v, ctx.per_step(lambda t: ops.bias_correction(b2, t)))
            ops.add_(denom, eps_root)
            torch._foreach_sqrt_(denom)
            ops.add_(denom, eps)
        else:
            # formed by the final write (piece by piece on the eager path: no model-sized
            # denominator, even where this is not the chain's last run)
            denom = adam_denominator(v, b2, eps, ctx)
        ctx.defer_scale(ctx.per_step(lambda t: 1.0 / ops.bias_correction(b1, t)))
        # u = m / denom, left for the final write to fuse into one addcdiv (as torch's AdamW)
        ctx.defer_divide(denom)
        return list(m)

    spec = {
        "betas": Hyperparam(betas_pair(betas), check_betas),
        "eps": Hyperparam(eps, nonnegative),
        "eps_root": Hyperparam(eps_root, nonnegative),
        "amsgrad": Hyperparam(bool(amsgrad), flag),
    }
    return transform(name, spec, init, update, elementwise=True, static=("eps_root", "amsgrad"),
                     momentum_state=("exp_avg",), from_state=from_state)
