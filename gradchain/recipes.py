"""Named optimizers as short chains of transforms.

Rule for every recipe: where torch.optim has the same algorithm, the recipe takes the same
hyperparameter names and defaults, and ``ChainOptimizer(params, recipes.X(**hp))`` follows the
trajectory of ``torch.optim.X(params, **hp)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

from .base import Chain, Transform, chain
from .combinators import _NameMatch, masked, partition
from .hyperparams import Hyperparam, InvalidHyperparameter, betas_pair, nonnegative, validate
from .transforms.adaptive_memory import adaptive_memory_momentum, scale_by_am_adamw
from .transforms.amos import amos_default_eta, scale_by_amos
from .transforms.centralization import centralize
from .transforms.clipping import adaptive_grad_clip, soft_clip
from .transforms.constrained import cpr
from .transforms.denominators import scale_by_adam_atan2, scale_by_adam_softplus
from .transforms.factored import (
    add_lr_scaled_wd,
    clip_by_block_rms,
    scale_by_factored_rms,
    scale_by_param_rms,
    scale_by_relative_step,
)
from .transforms.fractional import fractional
from .transforms.lookahead import Lookahead
from .transforms.lookahead import lookahead as lookahead_transform
from .transforms.loss import loss_gated_ema, scale_by_loss_ema
from .transforms.masks import cautious_mask
from .transforms.moment_variants import scale_by_adamomentum, scale_by_adanorm, scale_by_diffgrad, scale_by_nadam
from .transforms.moments import scale_by_adam
from .transforms.momentum import ema, trace
from .transforms.normalization import normalize
from .transforms.orthogonal import NS_COEFFICIENTS, check_iteration_dtype, orthogonalize, scale_by_shape
from .transforms.prodigy import scale_by_prodigy
from .transforms.regularization import add_cautious_wd, add_decoupled_wd, add_l2, add_switched_wd
from .transforms.scaling import scale, scale_by_lr
from .transforms.schedule_free import scale_by_rms, schedule_free
from .transforms.sm3 import scale_by_sm3
from .transforms.smmf import scale_by_smmf
from .transforms.spectral import spectral_lr_bound
from .transforms.stable_wd import add_stable_wd
from .transforms.trust_ratio import scale_by_trust_ratio


def _renamed(mapping: dict[str, str], make: Callable[[], Transform]) -> Transform:
    """``make().renamed(mapping)``, a value it refuses named by its key in the param group (the
    recipe's argument), not by the inner transform's own name for it."""
    try:
        built = make()
    except InvalidHyperparameter as e:
        if e.key not in mapping:
            raise
        raise InvalidHyperparameter(mapping[e.key], e.value, e.problem) from None
    return built.renamed(mapping)

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
    validate("momentum", Hyperparam(None, nonnegative), momentum)  # (before it decides the chain)
    if momentum == 0 and not nesterov:
        # torch keeps no buffer without momentum: a group may not switch momentum on here
        return chain(add_l2(weight_decay), scale_by_lr(lr), maximize=maximize,
                     fixed={"momentum": momentum, "dampening": dampening, "nesterov": False})
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
    decoupled_weight_decay: bool = False,
) -> Chain:
    """Adam with coupled L2 (torch's ``weight_decay``), or decoupled decay as AdamW.

    Rule: ``g' = g + wd p``; ``p <- p - lr m^/(sqrt(v^) + eps)``; with ``decoupled_weight_decay``
    the decay leaves the gradient: ``p <- p (1 - lr wd) - lr m^/(sqrt(v^) + eps)`` (:func:`adamw`).
    Reference: Kingma & Ba, arXiv:1412.6980. Reproduces ``torch.optim.Adam`` (both forms).
    """
    betas = betas_pair(betas)
    return chain(*_torch_decay(weight_decay, decoupled_weight_decay, scale_by_adam(betas, eps, amsgrad=amsgrad)),
                 scale_by_lr(lr), maximize=maximize, share=["weight_decay", "decoupled_weight_decay"])


def _torch_decay(weight_decay: float, decoupled: bool, core: Transform) -> list[Transform]:
    """``core`` between torch's two decay forms, each param group choosing with ``decoupled_weight_decay``."""
    return [add_switched_wd(weight_decay, decoupled, placement="coupled", name="l2"), core,
            add_switched_wd(weight_decay, decoupled, placement="decoupled", name="wd")]


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
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad), add_decoupled_wd(weight_decay), scale_by_lr(lr), maximize=maximize
    )


# -- Adam variants: bounded denominators, moment variants, loss-driven steps -----------------------

__all__ += ["adalo", "adam_atan2", "adamomentum", "adanorm", "diffgrad", "nadam", "sadam"]


def nadam(
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """NAdam: Adam with Nesterov momentum under Dozat's momentum schedule.

    Rule: ``mu_t = b1 (1 - 0.5 * 0.96^(t momentum_decay))``; ``p <- p - lr m^/(sqrt(v^) + eps)`` with
    ``m^ = mu_{t+1} m_t/(1 - prod_{i<=t+1} mu_i) + (1 - mu_t) g_t/(1 - prod_{i<=t} mu_i)``; weight
    decay coupled (L2 on ``g``) or decoupled (``p <- p (1 - lr wd)``). Reference: Dozat 2016,
    "Incorporating Nesterov Momentum into Adam" (no arXiv id). Reproduces ``torch.optim.NAdam``
    (to 1e-12 in float64 when torch's default dtype is float64: torch keeps the mu product in the
    default dtype, gradchain in the param's compute dtype).
    """
    betas = betas_pair(betas)
    return chain(*_torch_decay(weight_decay, decoupled_weight_decay, scale_by_nadam(betas, eps, momentum_decay)),
                 scale_by_lr(lr), maximize=maximize, share=["weight_decay", "decoupled_weight_decay"])


def adam_atan2(
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    a: float = 1.27,
    b: float = 1.0,
    *,
    m_correction: str = "inside",
    maximize: bool = False,
) -> Chain:
    """Adam-atan2: Adam without eps, ``p <- p (1 - lr wd) - lr a atan2(m^, b sqrt(v^))``.

    ``m_correction="outside"`` moves the first-moment bias correction out of the atan2:
    ``p <- p (1 - lr wd) - (lr a/(1 - b1^t)) atan2(m, b sqrt(v^))`` (see ``scale_by_adam_atan2``).
    Reference: Everett et al., arXiv:2407.05872. Reproduces ``adam_atan2_pytorch.AdamAtan2`` (same
    defaults), weight decay included, at that peer's default ``decoupled_wd=False``: both decay by
    ``lr wd`` as torch's AdamW. With ``decoupled_wd=True`` the peer stores ``wd / lr_0`` (``lr_0``
    its initial lr) and decays by ``lr wd / lr_0``: this recipe with ``weight_decay=wd / lr_0``.
    With ``a=1, b=1, m_correction="outside"`` it is the rule of the ``adam-atan2`` CUDA package's
    ``AdamATan2`` (defaults there: lr 1e-3, betas (0.9, 0.999), weight_decay 1e-2).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam_atan2(betas, a, b, m_correction=m_correction),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def sadam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    softplus_beta: float = 50.0,
    *,
    maximize: bool = False,
) -> Chain:
    """Sadam: Adam with a softplus denominator, ``p <- p (1 - lr wd) - lr m^/softplus_b(sqrt(v^))``.

    ``softplus_b(x) = log(1 + exp(b x))/b``, ``b = softplus_beta`` (50, the paper's choice; b=1
    would make it momentum SGD). Reference: Tong, Liang, Bi, arXiv:1908.00700. Reproduces the
    rule of the paper (no installed peer has a stand-alone Sadam).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam_softplus(betas, softplus_beta), add_decoupled_wd(weight_decay), scale_by_lr(lr), maximize=maximize
    )


def adalo(
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    kappa: float = 3.0,
    eps: float = 1e-8,
    *,
    mode: str = "adversarial",
    debias: bool = False,
    maximize: bool = False,
) -> Chain:
    """AdaLo: the loss sets the step. ``p <- p - lr lr_t (m + wd p)``, ``m = ema(g, b1)`` (no debias).

    ``lr_t = max(a_t/kappa, eps)`` from one fp32 EMA (decay ``b2``) of ``1/(2+L)`` (``mode=
    "adversarial"``, the article's default: big loss, small step), ``1 - ...`` (``"compliant"``) or
    of ``L`` itself (``"paper"``): see :func:`scale_by_loss_ema`. The group key ``betas`` holds
    ``(b1, b2)`` as in torch's Adam, so schedulers that cycle momentum (``OneCycleLR``,
    ``CyclicLR``) move ``b1``. ``lr`` multiplies the loss-driven step (1.0 is the article's rule;
    the article's own ``lr`` is unused) so LR schedulers still work. Needs the loss every step; a
    NaN/inf loss leaves params, ``m`` and the loss EMA as they were (with finite gradients; a
    NaN/inf gradient shows in the update, for ``apply_if_finite``).
    Reference: Jeong & Koo, Information Sciences 690 (2025) 121607 (no arXiv id). Reproduces
    cpuimage/AdaLo ``adalo.py`` (with its loss EMA in fp32 and one per optimizer).
    """
    betas = betas_pair(betas)
    return chain(
        _renamed({"decay": "betas"}, lambda: loss_gated_ema(betas, entry=0)),
        add_decoupled_wd(weight_decay),
        _renamed({"loss_decay": "betas"},
                 lambda: scale_by_loss_ema(betas, kappa, eps, entry=1, mode=mode, debias=debias)),
        scale_by_lr(lr),
        maximize=maximize,
        share=["betas"],  # one pair, read by both: b1 by the first moment, b2 by the loss EMA
    )


def adamomentum(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> Chain:
    """AdaMomentum: ``v`` is an EMA of ``m^2`` with eps accumulated in it; ``p <- p (1 - lr wd) - lr m^/sqrt(v^)``.

    Reference: Wang et al., "Rethinking Adam: A Twofold Exponential Moving Average Approach",
    arXiv:2106.11514. Reproduces the paper's algorithm (no installed peer).
    """
    betas = betas_pair(betas)
    return chain(scale_by_adamomentum(betas, eps), add_decoupled_wd(weight_decay), scale_by_lr(lr), maximize=maximize)


def diffgrad(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> Chain:
    """diffGrad: ``p <- p - lr xi m^/(sqrt(v^) + eps)``, ``xi = sigmoid(|g_{t-1} - g_t|)``, coupled L2.

    Reference: Dubey et al., arXiv:1909.11015. Reproduces the paper's rule and the official code
    (shivram1987/diffGrad: coupled L2), with torch's eps placement ``sqrt(v^) + eps``.
    """
    betas = betas_pair(betas)
    return chain(add_l2(weight_decay), scale_by_diffgrad(betas, eps), scale_by_lr(lr), maximize=maximize)


def adanorm(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    norm_decay: float = 0.95,
    max_ratio: float | None = None,
    *,
    maximize: bool = False,
) -> Chain:
    """AdaNorm (Adam form): ``m`` sees ``g max(1, e_t/|g_t|)``, ``e_t`` an EMA of ``|g|`` per tensor.

    ``p <- p (1 - lr wd) - lr m^/(sqrt(v^) + eps)``, ``v`` from the raw ``g``; ``max_ratio`` caps
    the boost (gradchain's option). Reference: Dubey et al., arXiv:2210.06364. Reproduces the
    paper's AdamNorm rule; pytorch_optimizer ``AdaNorm`` (``r=norm_decay``) is the same but for its
    eps placement ``(sqrt(v) + eps)/sqrt(1 - b2^t)`` and default betas (0.9, 0.99).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adanorm(betas, eps, norm_decay, max_ratio), add_decoupled_wd(weight_decay), scale_by_lr(lr),
        maximize=maximize,
    )


# -- memory-saving second moments: Adafactor, SM3, Amos, SMMF ------------------------------------

__all__ += ["adafactor", "amos", "sm3", "smmf"]


def _momentum3b(momentum: float) -> list:
    # a momentum of 0 keeps no buffer (build with momentum > 0 to schedule it)
    return [_renamed({"decay": "momentum"}, lambda: ema(momentum))] if momentum else []


def adafactor(
    lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    momentum: float = 0.0,
    warmup_init: bool = False,
    factored: str = "two_largest",
    min_dim_size_to_factor: int = 128,
    torch_compat: bool = False,
    maximize: bool = False,
) -> Chain:
    """Adafactor: factored second moment, update clipping, relative step times parameter RMS.

    Rule: ``U = g / sqrt(V^)`` (factored, HF/optax rsqrt-per-factor form, eps1 added to g^2,
    1e-30 when None; two largest dims >= ``min_dim_size_to_factor``); ``U <- U / max(1, RMS(U)/d)``;
    ``alpha_t = max(eps2, RMS(theta)) min(lr, 1/sqrt(t))``; ``theta <- theta (1 - lr wd) - alpha_t U``
    (optional ``momentum``: an EMA of ``alpha_t U``). torch.optim.Adafactor's names and defaults;
    ``torch_compat=True`` reproduces ``torch.optim.Adafactor`` exactly (eps1 as a clamp, machine
    eps when None, last two dims of every tensor with ndim >= 2); the default keeps the paper's
    numerics, which stay finite on dead rows and columns. Weight decay is scaled by ``lr`` as in
    torch (optax adds it unscaled). Reference: Shazeer & Stern, arXiv:1804.04235.
    Reproduces ``torch.optim.Adafactor`` (``torch_compat=True``); HF ``Adafactor`` numerics otherwise.
    """
    return chain(
        scale_by_factored_rms(
            beta2_decay, eps, factored=factored, min_dim_size_to_factor=min_dim_size_to_factor,
            torch_compat=torch_compat,
        ),
        clip_by_block_rms(d, min_d=1.0),  # torch.optim.Adafactor requires d >= 1
        scale_by_param_rms(eps),
        scale_by_relative_step(lr, warmup_init=warmup_init),
        *_momentum3b(momentum),
        add_lr_scaled_wd(weight_decay, lr),
        scale(-1.0),
        maximize=maximize,
        # torch's one eps pair (eps1, eps2) and one lr serve several steps of the rule
        share=["eps", "lr"],
    )


def sm3(
    lr: float = 0.1,
    momentum: float = 0.0,
    b2: float = 1.0,
    eps: float = 1e-8,
    *,
    maximize: bool = False,
) -> Chain:
    """SM3-II: one second-moment accumulator per axis (memory ~ sum of the dims).

    Rule: ``nu = min_a mu_a + g^2`` (EMA with ``b2 < 1``), ``mu_a <- max over the other axes of nu``,
    ``u = g / sqrt(nu + eps)`` (0 where nu = 0), optional EMA ``momentum`` (the paper uses 0.9 and a
    quadratic lr warmup; schedule ``lr`` for it), ``theta <- theta - lr u``.
    Reference: Anil et al., arXiv:1901.11150. Reproduces optax ``sm3`` (momentum as ``ema``);
    pytorch_optimizer ``SM3``'s defaults (lr 0.1, no momentum), except its eps of 1e-30: with
    ``eps=1e-30`` it matches pytorch_optimizer ``SM3`` (``beta=0``, same momentum) in float64.
    """
    return chain(scale_by_sm3(b2, eps), *_momentum3b(momentum), scale_by_lr(lr), maximize=maximize)


def amos(
    lr: float = 1e-3,
    beta: float = 0.999,
    zeta: float = 0.25,
    momentum: float = 0.0,
    finetune_rate: float = 1.0,
    eps: float = 2.0**-125,
    *,
    eta_fn=amos_default_eta,
    shape_fn=None,
    maximize: bool = False,
) -> Chain:
    """Amos: Adam-like scaling with adaptive decay toward a per-tensor target scale eta.

    Rule: see :func:`gradchain.scale_by_amos`; ``lr`` is xi (about 1/sqrt(number of batches)),
    ``eta_fn(name, shape)`` the target scale, ``1 - beta`` of the order of ``lr``; ``momentum``
    is an EMA of the update. Amos contains its lr: no ``scale_by_lr``.
    Reference: Tian & Parikh, arXiv:2210.11693. Reproduces google-research/jestimator ``amos``
    (scalar ``v`` and ``b`` per tensor unless ``shape_fn`` says otherwise; no gradient clip).
    """
    return chain(
        scale_by_amos(lr, beta, zeta, finetune_rate, eps, eta_fn=eta_fn, shape_fn=shape_fn),
        *_momentum3b(momentum),
        maximize=maximize,
    )


def smmf(
    lr: float = 1e-3,
    beta: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_rate: float = -0.5,
    growth_rate: float = 0.999,
    *,
    maximize: bool = False,
) -> Chain:
    """SMMF: square-matricized rank-1 NNMF of both Adam moments, signs bit-packed.

    Rule: see :func:`gradchain.scale_by_smmf`; ``theta <- theta (1 - lr wd) - lr M/(sqrt(V) + eps)``
    (the official 'adamw' weight-decay mode). Reference: Park & Lee, arXiv:2412.08894.
    Reproduces eai-lab/SMMF ``SMMF`` (vector_reshape=True), with 1-bit instead of 1-byte signs.
    """
    return chain(
        scale_by_smmf(beta, growth_rate, decay_rate, eps),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


# -- clipping, normalization, centralization, trust ratio -----------------------------------------


__all__ += ["agc_sgd", "gc_adamw", "lamb", "nsgda", "softclip_adamw"]


def lamb(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 1e-2,
    max_weight_norm: float | None = None,
    *,
    maximize: bool = False,
) -> Chain:
    """LAMB: AdamW's direction scaled per tensor by the trust ratio ``||p|| / ||r + wd p||``.

    Rule: ``r = m^/(sqrt(v^) + eps)`` (bias-corrected, paper v3+); ``q = r + wd p``;
    ``ratio = phi(||p||)/||q||`` (1 where either norm is 0; ``phi = min(., max_weight_norm)``,
    identity when None); ``p <- p - lr ratio q``. Exclude biases and norm gains from decay and
    trust ratio with ``masked`` if wanted. Reference: You et al., arXiv:1904.00962.
    Reproduces optax ``lamb`` (the same chain). pytorch_optimizer ``Lamb`` differs: by default
    (``adam_debias=False``) it applies the first-moment bias correction outside the trust ratio,
    multiplying the step by ``1/(1 - b1^t)`` where the ratio cannot cancel it (up to 10x larger
    early steps), and never corrects ``v``; its ``eps`` sits on the uncorrected ``sqrt(v)`` and is
    added to ``||q||``; ``||p||`` is clamped at 10 (here ``max_weight_norm=10``); its decay is
    applied to ``p`` outside the trust ratio. With ``adam_debias=True, eps=0, weight_decay=0`` it
    equals ``lamb(eps=0, weight_decay=0, max_weight_norm=10)`` in float64 on every param whose norm
    is not 0; where ``||p|| = 0`` (a zero-initialised bias) the ratio is 1, nothing cancels, and the
    peer, which never corrects ``v``, steps by ``m / sqrt(v)`` where the rule steps by
    ``m^ / sqrt(v^)`` (about 3.2x at the first step with the default betas).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps),
        add_decoupled_wd(weight_decay),
        scale_by_trust_ratio(max_weight_norm),
        scale_by_lr(lr),
        maximize=maximize,
    )


def gc_adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    min_ndim: int = 2,
    maximize: bool = False,
) -> Chain:
    """AdamW on centralized gradients (Gradient Centralization).

    Rule: for tensors with ``ndim >= min_ndim``, ``g <- g - mean_{dims 1..}(g)`` per output unit;
    then AdamW with torch's names and defaults. ``min_ndim=4``: conv weights only (GCC).
    Reference: Yong et al., arXiv:2004.01461. Reproduces ``torch.optim.AdamW`` on gradients
    centralized as pytorch_optimizer's ``centralize_gradient`` does (except that ``(n, 1)`` weights,
    which it zeroes, are left alone).
    """
    betas = betas_pair(betas)
    return chain(
        centralize(min_ndim),
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def agc_sgd(
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    clip_factor: float = 0.01,
    agc_eps: float = 1e-3,
    *,
    exclude: str | Iterable[str] | None = None,
    maximize: bool = False,
) -> Chain:
    """SGD on adaptively clipped gradients (AGC, as in NFNets).

    Rule: per unit (slice of dim 0), ``G <- G * min(1, clip_factor * max(||W||, agc_eps)/||G||)``;
    then ``torch.optim.SGD`` (coupled L2, momentum, nesterov) with its names and defaults.
    ``exclude``: param names / globs left unclipped (NFNets does not clip the final classifier,
    e.g. ``exclude="head.*"``). NFNets trains with ``momentum=0.9, nesterov=True`` and
    ``clip_factor`` 0.01 at batch 4096 (larger for smaller batches). Reference: Brock et al.,
    arXiv:2102.06171. Reproduces timm ``adaptive_clip_grad`` followed by ``torch.optim.SGD`` (timm
    floors ``||G||`` at 1e-6 in the clipped branch; this rule needs no floor).
    """
    clip: Transform = adaptive_grad_clip(clip_factor, agc_eps)
    if exclude is not None:
        clip = masked(clip, _NameMatch(exclude, "agc_sgd(exclude=...)", negate=True))
    return chain(clip, sgd(lr, momentum, dampening, weight_decay, nesterov), maximize=maximize)


def softclip_adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    soft_clip_eps: float = 1e-3,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamW on soft-clipped gradients (the article's per-unit RMS clip, i.e. AGC with lambda = 1).

    Rule: per unit, ``G <- G * min(1, max(RMS(W), soft_clip_eps) / RMS(G))``; then AdamW with
    torch's names and defaults. ``soft_clip_eps`` defaults to AGC's 1e-3, not the article's
    1e-12, which freezes zero-initialised params. Reference: the article's ``soft_clip``; AGC,
    Brock et al., arXiv:2102.06171. Reproduces ``torch.optim.AdamW`` on gradients clipped by the
    article's rule (timm ``adaptive_clip_grad(clip_factor=1)`` differs only in flooring the L2 norm
    instead of the RMS).
    """
    betas = betas_pair(betas)
    return chain(
        soft_clip(soft_clip_eps),
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def nsgda(
    lr: float = 4e-5,
    beta: float = 0.9,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    maximize: bool = False,
) -> Chain:
    """nSGDA as the article intends it: normalized EMA momentum per tensor, with coupled L2.

    Rule: ``g' = g + wd p``; ``m = beta m + (1 - beta) g'`` (``m_0 = 0``);
    ``p <- p - lr m / (||m|| + eps)`` per tensor, so every tensor moves by ~lr in L2 norm. The
    article's step counter (never initialised) is gone: its bias correction cancels in the
    normalization, so none is kept. Group keys: ``lr``, ``beta``, ``eps``, ``weight_decay``.
    Reference: Jelassi et al., "Dissecting adaptive methods in GANs", arXiv:2210.04319 (which
    normalizes the raw gradient; the article normalizes momentum, as Cutkosky & Mehta 2020).
    Peer: none under this name; optax ``chain(ema, normalize_by_update_norm)`` is the global form.
    """
    return chain(
        add_l2(weight_decay),
        _renamed({"decay": "beta"}, lambda: ema(beta)),
        _renamed({"normalize_eps": "eps"}, lambda: normalize(eps)),
        scale_by_lr(lr),
        maximize=maximize,
    )


# -- weight-decay variants and cautious masks -----------------------------------------------------

__all__ += ["adams", "cautious_adamw", "cpr_adamw", "cwd_adamw"]


def cautious_adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    rescale: str = "c_optim",
    *,
    maximize: bool = False,
) -> Chain:
    """C-AdamW: AdamW whose Adam direction is masked where it disagrees with the gradient.

    Rule: ``u = m^/(sqrt(v^) + eps)``; ``phi = 1[u g > 0]``; ``u <- u phi s`` with
    ``s = numel / (sum(phi) + 1)`` per tensor (``rescale="timm"``/``"heavyball"``/``"none"`` for
    the other conventions, see ``cautious_mask``); ``p <- p (1 - lr wd) - lr u`` (the decay is not
    masked). Reference: Liang et al., "Cautious Optimizers: Improving Training with One Line of
    Code", arXiv:2411.16085; reference code kyleliang919/C-Optim ``c_adamw.py``. Peer: timm ``cadamw``.
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        cautious_mask(rescale),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def cwd_adamw(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    strict: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamW with cautious weight decay: decay only coordinates where the Adam step shrinks ``|p|``.

    Rule: ``u = m^/(sqrt(v^) + eps)``; ``p <- p - lr (u + wd 1[u p >= 0] p)`` (``> 0`` with
    ``strict=True``). Reference: Chen et al., "Cautious Weight Decay", arXiv:2510.12402,
    Algorithm 1. Peer: heavyball ``AdamW(cautious_weight_decay=True)``. With ``weight_decay=0``
    it is ``torch.optim.Adam``.
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        add_cautious_wd(weight_decay, strict=strict),
        scale_by_lr(lr),
        maximize=maximize,
    )


def adams(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-4,
    eps: float = 1e-8,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamS: Adam with stable weight decay, normalised by one global mean of ``v^``.

    Rule: ``v_bar = mean of v^ over every element of every param`` (all groups);
    ``p <- p (1 - lr wd / sqrt(v_bar)) - lr m^/(sqrt(v^) + eps)``. Defaults are
    pytorch_optimizer ``AdamS``'s (lr 1e-3, betas (0.9, 0.999), weight_decay 1e-4, eps 1e-8).
    Reference: Xie et al., arXiv:2011.11152 (SWD). Matches pytorch_optimizer 4.1.0 ``AdamS`` in
    float64 lockstep with ``eps=0``; with ``eps > 0`` the peer also adds eps to ``sqrt(v_bar)`` in
    the decay, a relative gap of about eps/sqrt(v_bar) (see ``add_stable_wd``).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        add_stable_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def _is_matrix(name: str | None, p: object) -> bool:
    return getattr(p, "ndim", 0) >= 2


def cpr_adamw(
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kappa_init: str = "inflection_point",
    kappa_init_param: float = 1000.0,
    kappa_update: float = 1.0,
    reg_step_size: int = 200,
    reg_ema_decay: float = 0.9,
    reg_by_lr: bool = False,
    matrices_only: bool = True,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamCPR: Adam, then constrained parameter regularization instead of weight decay.

    Rule: ``p' = p - lr m^/(sqrt(v^) + eps)``; per tensor ``lam <- max(0, lam + kappa_update /
    numel (||p'||^2 - kappa))``, ``p <- p' - 2 lam p'``, with ``kappa`` initialised by
    ``kappa_init`` (see ``cpr``). ``matrices_only`` regularises only params with ndim >= 2 (the
    official grouping helper leaves biases and norm gains alone); give a group
    ``kappa_update=0`` to switch CPR off for it. Defaults are the official ``AdamCPR``'s.
    Reference: Franke et al., arXiv:2311.09058; official package ``pytorch-cpr`` (``AdamCPR``).
    """
    betas = betas_pair(betas)
    reg = cpr(kappa_init, kappa_init_param, kappa_update, reg_step_size, reg_ema_decay, reg_by_lr=reg_by_lr)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        scale_by_lr(lr),
        masked(reg, _is_matrix) if matrices_only else reg,
        maximize=maximize,
    )


# -- Muon, Lookahead, fractional-order gradients --------------------------------------------------


__all__ += ["fractional_adam", "fractional_sgd", "lookahead", "muon", "muon_hidden_matrix"]


def muon_hidden_matrix(name: str | None, param: torch.Tensor) -> bool:
    """Muon's default routing: params with ndim >= 2 except embeddings and output heads.

    A name component containing ``embed`` or ending in ``head`` (``head``, ``lm_head``), or
    ``wte`` / ``wpe``, marks a param as not hidden; conv weights are hidden (flattened by Newton–Schulz).
    """
    if param.ndim < 2:
        return False
    if name is None:
        return True
    parts = name.lower().split(".")
    return not any("embed" in c or c.endswith("head") or c in ("wte", "wpe") for c in parts)


class _MuonOrAdamW:
    """Routes a param to ``"muon"`` when ``select(name, param)``, else ``"adamw"`` (picklable).

    With the default routing an unnamed matrix cannot be told from an embedding or an output head:
    it goes to Newton–Schulz, and the first one warns (once per optimizer).
    """

    def __init__(self, select: Callable[[str | None, torch.Tensor], bool]) -> None:
        self.select = select
        self.warned = False

    def __call__(self, name: str | None, param: torch.Tensor) -> str:
        if name is None and param.ndim >= 2 and self.select is muon_hidden_matrix and not self.warned:
            self.warned = True
            warnings.warn(
                f"muon(): a param of shape {tuple(param.shape)} has no name, so it cannot be told apart "
                "from an embedding or an output head and is orthogonalized as a hidden matrix. Pass "
                "model.named_parameters() to the optimizer (embeddings and heads then take AdamW), or "
                "muon_params=(name, param) -> bool",
                UserWarning,
                stacklevel=2,
            )
        return "muon" if self.select(name, param) else "adamw"


def muon(
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
    *,
    adamw_lr: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float | None = None,
    muon_params: Callable[[str | None, torch.Tensor], bool] | None = None,
    ns_dtype: torch.dtype | None = torch.bfloat16,
    maximize: bool = False,
) -> Chain:
    """Muon for hidden matrices, AdamW for everything else (embeddings, heads, 0-d/1-d params).

    Rule on a matrix W (``muon_params``, default :func:`muon_hidden_matrix`):
    ``B = momentum B + (1 - momentum) G`` (zero-initialised EMA, as torch); ``N = lerp(G, B, momentum)``
    with ``nesterov`` else ``B``; ``O = NewtonSchulz_{ns_steps}(N)`` in ``ns_dtype`` (bf16 like torch;
    fp32/fp64 on request); ``W <- W (1 - lr weight_decay) - lr r O`` with ``r`` from ``adjust_lr_fn``
    (None/"original": ``sqrt(max(1, A/B))``, "match_rms_adamw": ``0.2 sqrt(max(A, B))``). The other
    params take AdamW with keys ``adamw_betas``, ``adamw_eps``, and the shared ``lr`` /
    ``weight_decay`` (Moonlight's convention: an LR scheduler moves both parts); pass ``adamw_lr`` /
    ``adamw_weight_decay`` to give the AdamW part keys of its own (a scheduler then moves only
    ``lr``). Reference: Jordan et al., Muon (2024); Liu et al., arXiv:2502.16982 (Moonlight).
    On matrices it reproduces ``torch.optim.Muon`` (same hyperparameter names and defaults);
    ``nesterov`` is chosen when the chain is built, where torch keeps it per param group (a group
    that sets it is refused as an unknown key: route such params to a second ``muon`` chain with
    ``gradchain.partition``).
    """
    adamw_betas = betas_pair(adamw_betas, "adamw_betas")
    check_iteration_dtype(ns_dtype, "ns_dtype")
    matrices = chain(
        _renamed({"decay": "momentum"}, lambda: ema(momentum, nesterov=nesterov, name="momentum")),
        orthogonalize(ns_steps, ns_coefficients, eps, dtype=ns_dtype),
        scale_by_shape(adjust_lr_fn),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
    )
    # shared "lr" / "weight_decay" unless given apart, so an LR scheduler moves both parts
    keys = {"betas": "adamw_betas", "eps": "adamw_eps", "eps_root": "adamw_eps_root"}
    if adamw_lr is not None:
        keys["lr"] = "adamw_lr"
    if adamw_weight_decay is not None:
        keys["weight_decay"] = "adamw_weight_decay"
    rest = _renamed(keys, lambda: adamw(
        lr if adamw_lr is None else adamw_lr,
        adamw_betas,
        adamw_eps,
        weight_decay if adamw_weight_decay is None else adamw_weight_decay,
    ))
    select = muon_hidden_matrix if muon_params is None else muon_params
    routed = partition({"muon": matrices, "adamw": rest}, _MuonOrAdamW(select))
    return chain(routed, maximize=maximize)


def lookahead(
    inner: Transform,
    k: int = 5,
    alpha: float = 0.5,
    pullback_momentum: str = "none",
    *,
    momentum_buffers: Sequence[str] | None = None,
) -> Lookahead:
    """Lookahead around any recipe, e.g. ``lookahead(recipes.adamw(), k=5, alpha=0.5)``.

    Rule: every k steps ``phi <- phi + alpha (theta - phi)``, ``theta <- phi`` (``phi_0 = theta_0``);
    inner momentum at a sync: ``"none"`` / ``"reset"`` / ``"pullback"``. Evaluate with the slow
    weights via ``gradchain.slow_weights(opt)``. Reference: Zhang et al., arXiv:1907.08610. Peer:
    pytorch_optimizer ``Lookahead`` (same sync; its ``"reset"`` and ``"pullback"`` act on torch SGD's
    ``momentum_buffer`` only, so around Adam they are its ``"none"``, where here they act on Adam's
    first moment too).
    """
    return lookahead_transform(inner, k, alpha, pullback_momentum, momentum_buffers=momentum_buffers)


def fractional_adam(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    alpha: float = 0.9,
    history: int = 10,
    drop: int = 1,
    *,
    per_element: bool = False,
    seed: int = 0,
    maximize: bool = False,
) -> Chain:
    """FCAdam_G-L: Adam fed the Grünwald–Letnikov fractional gradient instead of the gradient.

    Rule: ``D_t = g_t + sum_{j=1..K} c_j w_j g_{t-j}`` (see ``gradchain.fractional``), then AdamW's
    update on D_t (decoupled ``weight_decay``, 0 by default). Group key ``frac_alpha`` holds alpha.
    Reference: Zhou, Zhao, Huang, Mathematics 11(2):316, 2023. No peer.
    """
    betas = betas_pair(betas)
    return chain(
        fractional(alpha, history, drop, per_element=per_element, seed=seed),
        scale_by_adam(betas, eps),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def fractional_sgd(
    lr: float = 1e-3,
    alpha: float = 0.9,
    history: int = 10,
    drop: int = 1,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    per_element: bool = False,
    seed: int = 0,
    maximize: bool = False,
) -> Chain:
    """FCSGD_G-L: SGD (optionally with momentum) on the Grünwald–Letnikov fractional gradient.

    Rule: ``g' = g + weight_decay p``; ``D_t = g'_t + sum_j c_j w_j g'_{t-j}``; torch-SGD momentum on
    ``D_t`` if ``momentum > 0``; ``p <- p - lr D``. Reference: Zhou, Zhao, Huang, Mathematics
    11(2):316, 2023 (FCGD_G-L / FCSGD_G-L). No peer.
    """
    parts = [add_l2(weight_decay), fractional(alpha, history, drop, per_element=per_element, seed=seed)]
    if momentum != 0 or nesterov:
        parts.append(trace(momentum, 0.0, nesterov))
    return chain(*parts, scale_by_lr(lr), maximize=maximize)


# -- adaptive memory momentum; the warmup-free spectral bound --------------------------------------

__all__ += ["adamw_spectral", "am_adamw", "am_sgd"]


def am_sgd(
    lr: float = 1e-3,
    am_lambda: float = 0.1,
    beta_max: float = 0.9,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> Chain:
    """AM-SGD: SGD whose momentum coefficient ``beta_t`` is chosen each step, one for all params.

    Rule: ``g' = g + wd p`` (coupled L2, as torch's SGD); ``beta_t = clip((1+lam) ||g'||^2 /
    ||d - g'||^2 - lam, 0, beta_max)`` over all params at once (the two-plane model, see
    ``gradchain.adaptive_memory_momentum``); ``d <- ((beta_t + lam) d + (1 - beta_t) g') / (1 + lam)``
    with ``d_0 = g'_0``; ``p <- p - lr d``. Group keys ``am_lambda`` (lam), ``beta_max``,
    ``beta_min`` (0). Defaults ``lam = 0.1``, ``beta_max = 0.9`` come from secondary sources.
    Reference: Topollai & Choromanska, arXiv:2510.04988. No peer (tested against a float64
    reference and a numerical solve of the two-plane problem).
    """
    return chain(
        add_l2(weight_decay), adaptive_memory_momentum(am_lambda, beta_max), scale_by_lr(lr), maximize=maximize
    )


def am_adamw(
    lr: float = 1e-3,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    am_lambda: float = 0.1,
    beta_max: float | None = None,
    beta_min: float = 0.0,
    *,
    maximize: bool = False,
) -> Chain:
    """AM-AdamW: AdamW whose first-moment coefficient ``beta_t`` is chosen per tensor each step.

    Rule: ``v`` as Adam's; ``P = (1 - beta_max prod_{i<t} beta_i)(sqrt(v^) + eps)``; ``beta_t``
    from the two-plane model in the metric ``P`` (see ``gradchain.scale_by_am_adamw``);
    ``d <- ((1 - beta_t) g + (lam P + beta_t) d) / (1 + lam P)``;
    ``p <- p (1 - lr wd) - lr d / P``. ``beta_max`` defaults to ``0.9 - 0.1 lam`` (0.89); with
    ``am_lambda=0`` and ``beta_min = beta_max = b1`` it is ``torch.optim.AdamW(betas=(b1, beta2))``
    (tested). Defaults come from secondary sources. Reference: Topollai & Choromanska,
    arXiv:2510.04988. No peer.
    """
    return chain(
        scale_by_am_adamw(am_lambda, beta_max, beta_min, beta2, eps),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        maximize=maximize,
    )


def adamw_spectral(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    tau: float = 0.02,
    power_iters: int = 2,
    amsgrad: bool = False,
    *,
    maximize: bool = False,
) -> Chain:
    """AdamW^2: AdamW whose step on each weight matrix is capped at ``tau`` times its spectral norm.

    Rule: ``s = -lr (m^/(sqrt(v^) + eps) + wd p)`` (AdamW's step); for every param with
    ``ndim >= 2``, ``s <- s min(1, tau sigma_1(p) / sigma_1(s))`` (power iteration, see
    ``gradchain.spectral_lr_bound``); ``p <- p + s``. Meant for training without lr warmup.
    ``tau`` (group key ``spectral_tau``) has no published universal default; 0.02 is this
    library's choice. Reference: Qi et al., "Taming Transformer Without Using Learning Rate
    Warmup", arXiv:2505.21910. With a large ``tau`` it is ``torch.optim.AdamW``. No peer.
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_adam(betas, eps, amsgrad=amsgrad),
        add_decoupled_wd(weight_decay),
        scale_by_lr(lr),
        spectral_lr_bound(tau, power_iters),
        maximize=maximize,
    )


# -- learning-rate-free: schedule-free averaging, Prodigy's step-size estimate ---------------------

__all__ += ["prodigy", "schedule_free_adamw", "schedule_free_sgd"]


def schedule_free_adamw(
    lr: float = 0.0025,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    maximize: bool = False,
) -> Chain:
    """Schedule-free AdamW: no LR schedule, train at ``y``, evaluate at the average ``x``.

    Rule: ``d = g / (sqrt(v^) + eps) + wd y`` (``v`` Adam's second moment, no first moment), then the
    schedule-free step with ``beta = betas[0]`` (:func:`gradchain.schedule_free`: ``z <- z - lr_t d``,
    ``y`` moved toward ``z`` by ``c_t = w_t / sum w``), ``lr_t`` warmed up linearly over
    ``warmup_steps``. Evaluate inside ``with gradchain.eval_params(opt):``. Reference: Defazio et
    al., arXiv:2405.15682. Reproduces ``schedulefree.AdamWScheduleFree`` in train mode (same names
    and defaults).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_rms(eps=eps, betas=betas),
        add_decoupled_wd(weight_decay),
        schedule_free(lr, betas=betas, warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power),
        maximize=maximize,
        # the package's one (beta1, beta2) pair: beta2 for the second moment, beta1 for the averaging
        share=["betas"],
    )


def schedule_free_sgd(
    lr: float = 1.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    r: float = 0.0,
    weight_lr_power: float = 2.0,
    *,
    maximize: bool = False,
) -> Chain:
    """Schedule-free SGD: ``d = g + wd y``, then the schedule-free step with ``beta = momentum``.

    See :func:`schedule_free_adamw`; evaluate inside ``with gradchain.eval_params(opt):``.
    Reference: Defazio et al., arXiv:2405.15682. Reproduces ``schedulefree.SGDScheduleFree`` in train
    mode (same names and defaults).
    """
    return chain(
        add_l2(weight_decay),
        schedule_free(lr, momentum, warmup_steps, r, weight_lr_power),
        maximize=maximize,
    )


def prodigy(
    lr: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    beta3: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decouple: bool = True,
    use_bias_correction: bool = False,
    safeguard_warmup: bool = False,
    d0: float = 1e-6,
    d_coef: float = 1.0,
    growth_rate: float = float("inf"),
    slice_p: int = 1,
    *,
    maximize: bool = False,
) -> Chain:
    """Prodigy: Adam whose step size ``d`` is estimated from the distance travelled; leave ``lr`` at 1.

    Rule: see :func:`gradchain.scale_by_prodigy` (``d`` starts at ``d0`` and only grows, to
    ``d_coef`` times an estimate of the distance to a solution). The estimate is in
    ``opt.global_state["prodigy.d"]``. Reference: Mishchenko & Defazio, arXiv:2306.06101.
    Reproduces ``prodigyopt.Prodigy`` (same names and defaults; its ``fsdp_in_use`` is not needed:
    sharded params reduce as DTensors).
    """
    betas = betas_pair(betas)
    return chain(
        scale_by_prodigy(
            lr, betas, beta3, eps, weight_decay, d_coef, growth_rate, decouple=decouple,
            use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, slice_p=slice_p,
        ),
        maximize=maximize,
    )
