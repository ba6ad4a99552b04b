"""Named optimizers as short chains of transforms.

Rule for every recipe: where torch.optim has the same algorithm, the recipe takes the same
hyperparameter names and defaults, and ``ChainOptimizer(params, recipes.X(**hp))`` follows the
trajectory of ``torch.optim.X(params, **hp)``.
"""

from __future__ import annotations

from .base import Chain, chain
from .transforms.moments import scale_by_adam
from .transforms.momentum import trace
from .transforms.regularization import add_decoupled_wd, add_l2
from .transforms.scaling import scale_by_lr

__all__ = ["adam", "adamw", "sgd"]


def sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """Stochastic gradient descent with optional (Nesterov) momentum and coupled L2.

    Rule: ``g' = g + wd p``; ``b = momentum b + (1 - dampening) g'`` (``b_1 = g'``); step
    ``g' + momentum b`` (nesterov) or ``b``; ``p <- p - lr step``. With ``momentum=0`` no buffer
    is kept (build with momentum > 0 to schedule it). Reference: Sutskever et al. 2013.
    Reproduces ``torch.optim.SGD``.
    """
    if momentum == 0 and not nesterov:
        return chain(add_l2(weight_decay), scale_by_lr(lr), maximize=maximize)
    return chain(
        add_l2(weight_decay), trace(momentum, dampening, nesterov), scale_by_lr(lr), maximize=maximize
    )


def adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """Adam with coupled L2 (torch's ``weight_decay``).

    Rule: ``g' = g + wd p``; ``p <- p - lr m^/(sqrt(v^) + eps)``. Reference: Kingma & Ba,
    arXiv:1412.6980. Reproduces ``torch.optim.Adam``.
    """
    return chain(
        add_l2(weight_decay), scale_by_adam(betas, eps, amsgrad=amsgrad), scale_by_lr(lr), maximize=maximize
    )


def adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamW: Adam with decoupled weight decay.

    Rule: ``p <- p (1 - lr wd) - lr m^/(sqrt(v^) + eps)``. Reference: Loshchilov & Hutter,
    arXiv:1711.05101. Reproduces ``torch.optim.AdamW``.
    """
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad), add_decoupled_wd(weight_decay), scale_by_lr(lr), maximize=maximize
    )


# ---- issue 3a: adaptive denominators, moment variants, loss-driven steps ----
# ---- end issue 3a ----


# ---- issue 3b: memory-saving second moments (Adafactor, SM3, Amos, SMMF) ----
# ---- end issue 3b ----


# ---- issue 4a: clipping, normalization, centralization, trust ratio (and nsgda) ----
# ---- end issue 4a ----


# ---- issue 4b: weight-decay variants and cautious masks ----
# ---- end issue 4b ----


# ---- issue 5: momentum family, Lookahead, Muon ----
# ---- end issue 5 ----
