"""Plain float64 references of whole recipes, written from each paper's rule (decay placement, bias
corrections, clipping and lr included), one tensor at a time, with no gradchain transform inside.

Every reference takes ``params`` (name -> tensor), ``grads`` (one name -> tensor dict per step)
and the recipe's hyperparameters with the recipe's documented defaults written out again here
(so a changed default is caught too), and returns ``(params, state)``: the final params and, per
param name, the state the recipe keeps, under the recipe's state keys (``"<transform>.<buffer>"``).
``adalo`` also returns its loss EMA, ``cpr_adamw`` when each bound was set and whether it bit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

F64 = torch.float64
Params = dict[str, Tensor]
Grads = Sequence[dict[str, Tensor]]


def _adam(m: Tensor, v: Tensor, g: Tensor, b1: float, b2: float) -> tuple[Tensor, Tensor]:
    return b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g


def _zeros(params: Params) -> dict[str, Tensor]:
    return {n: torch.zeros_like(p) for n, p in params.items()}


def _rms(x: Tensor) -> float:
    return math.sqrt(float((x * x).sum()) / x.numel())


# -- Adam variants ----------------------------------------------------------------------------------
def adam_atan2(params: Params, grads: Grads, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, a=1.27, b=1.0):
    """Everett et al. 2407.05872: p <- p (1 - lr wd) - lr a atan2(m^, b sqrt(v^)), no eps."""
    b1, b2 = betas
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            m[n], v[n] = _adam(m[n], v[n], g, b1, b2)
            step = a * torch.atan2(m[n] / (1 - b1**t), b * torch.sqrt(v[n] / (1 - b2**t)))
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * step
    return ps, {n: {"adam_atan2.exp_avg": m[n], "adam_atan2.exp_avg_sq": v[n]} for n in ps}


def sadam(params: Params, grads: Grads, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, softplus_beta=50.0):
    """Tong et al. 1908.00700: p <- p (1 - lr wd) - lr m^ / softplus_b(sqrt(v^)).

    softplus_b(x) = log(1 + exp(b x)) / b, taken as x once b x > 20 (the documented overflow guard;
    the two differ by less than exp(-20)/b there).
    """
    b1, b2 = betas
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            m[n], v[n] = _adam(m[n], v[n], g, b1, b2)
            x = torch.sqrt(v[n] / (1 - b2**t))
            bx = softplus_beta * x
            den = torch.where(bx > 20, x, torch.log1p(torch.exp(bx)) / softplus_beta)
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * (m[n] / (1 - b1**t)) / den
    return ps, {n: {"sadam.exp_avg": m[n], "sadam.exp_avg_sq": v[n]} for n in ps}


def adamomentum(params: Params, grads: Grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Wang et al. 2106.11514: v = b2 v + (1 - b2) m^2 + eps; p <- p (1 - lr wd) - lr m^/sqrt(v^)."""
    b1, b2 = betas
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * m[n] * m[n] + eps
            step = (m[n] / (1 - b1**t)) / torch.sqrt(v[n] / (1 - b2**t))
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * step
    return ps, {n: {"adamomentum.exp_avg": m[n], "adamomentum.exp_avg_sq": v[n]} for n in ps}


def diffgrad(params: Params, grads: Grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Dubey et al. 1909.11015 (official code: coupled L2): g' = g + wd p, xi = sigmoid(|g'_{t-1} - g'_t|)."""
    b1, b2 = betas
    ps, m, v, prev = dict(params), _zeros(params), _zeros(params), _zeros(params)
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            g = g + weight_decay * ps[n]
            m[n], v[n] = _adam(m[n], v[n], g, b1, b2)
            xi = 1.0 / (1.0 + torch.exp(-(prev[n] - g).abs()))
            prev[n] = g
            ps[n] = ps[n] - lr * xi * (m[n] / (1 - b1**t)) / (torch.sqrt(v[n] / (1 - b2**t)) + eps)
    return ps, {n: {"diffgrad.exp_avg": m[n], "diffgrad.exp_avg_sq": v[n], "diffgrad.prev_grad": prev[n]} for n in ps}


def adanorm(
    params: Params,
    grads: Grads,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    norm_decay=0.95,
    max_ratio=None,
):
    """Dubey et al. 2210.06364 (AdamNorm): e = r e + (1-r)||g||; m sees g e/||g|| when e > ||g||; v the raw g."""
    b1, b2 = betas
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    e = {n: 0.0 for n in params}
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            norm = math.sqrt(float((g * g).sum()))
            e[n] = norm_decay * e[n] + (1 - norm_decay) * norm
            ratio = e[n] / norm if e[n] > norm > 0 else 1.0
            if max_ratio is not None:
                ratio = min(ratio, max_ratio)
            m[n] = b1 * m[n] + (1 - b1) * ratio * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            step = (m[n] / (1 - b1**t)) / (torch.sqrt(v[n] / (1 - b2**t)) + eps)
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * step
    state = {
        n: {"adanorm.exp_avg": m[n], "adanorm.exp_avg_sq": v[n], "adanorm.grad_norm": torch.tensor(e[n], dtype=F64)}
        for n in ps
    }
    return ps, state


def adalo(
    params: Params,
    grads: Grads,
    losses: Sequence[float],
    lr=1.0,
    betas=(0.9, 0.999),
    weight_decay=1e-2,
    kappa=3.0,
    eps=1e-8,
    mode="adversarial",
):
    """AdaLo (Jeong & Koo 2025; the article's modes): m = ema(g, b1), no debias; one fp32 EMA a of
    T(L) (1/(2+L) for the article's modes, L for the paper's); lr_t = max(a/kappa, eps), or
    max((1-a)/kappa, eps) when compliant; p <- p - lr lr_t (m + wd p). Also returns the final a."""
    b1, b2 = betas
    ps, m = dict(params), _zeros(params)
    a = torch.zeros((), dtype=torch.float32)  # the loss EMA is one fp32 scalar for the optimizer
    w = torch.tensor(1 - b2, dtype=torch.float32)
    for gs, loss in zip(grads, losses):
        L = torch.tensor(loss, dtype=F64).to(torch.float32)
        a = torch.lerp(a, L if mode == "paper" else 1.0 / (2.0 + L), w)
        lr_t = ((1.0 - a) if mode == "compliant" else a) / kappa
        lr_t = float(lr_t.clamp(min=eps))
        for n, g in gs.items():
            m[n] = b1 * m[n] + (1 - b1) * g
            ps[n] = ps[n] - lr * lr_t * (m[n] + weight_decay * ps[n])
    return ps, {n: {"ema.ema": m[n]} for n in ps}, float(a)


def adams(params: Params, grads: Grads, lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8):
    """AdamS (Xie et al. 2011.11152, Algorithm AdamS and the authors' code): v_bar = mean of v^ over
    every element of every param; p <- p - lr wd p / sqrt(v_bar) - lr m^/(sqrt(v^) + eps)."""
    b1, b2 = betas
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            m[n], v[n] = _adam(m[n], v[n], g, b1, b2)
        vbar = sum(float(v[n].sum()) / (1 - b2**t) for n in gs) / sum(v[n].numel() for n in gs)
        for n in gs:
            step = (m[n] / (1 - b1**t)) / (torch.sqrt(v[n] / (1 - b2**t)) + eps)
            ps[n] = ps[n] - lr * weight_decay / math.sqrt(vbar) * ps[n] - lr * step
    return ps, {n: {"adam.exp_avg": m[n], "adam.exp_avg_sq": v[n]} for n in ps}


def cpr_adamw(
    params: Params,
    grads: Grads,
    lr=1e-4,
    betas=(0.9, 0.999),
    eps=1e-8,
    kappa_init="inflection_point",
    kappa_init_param=1000.0,
    kappa_update=1.0,
    reg_step_size=200,
    reg_ema_decay=0.9,
    reg_by_lr=False,
    matrices_only=True,
):
    """AdamCPR (Franke et al. 2311.09058; official AdamCPR): the Adam step p' = p - lr m^/(sqrt(v^)+eps),
    then per regularised tensor R = ||p'||^2, lam <- max(0, lam + kappa_update/numel (R - kappa)),
    p <- p' - 2 c lam p'. kappa: a constant ("uniform"), kappa_init_param ||p_0||^2 ("dependent"),
    R at step s ("warm_start"), or R where the growth of an EMA of R (taken every reg_step_size steps)
    first slows down after 3 periods ("inflection_point"). Also returns, per regularised tensor, the
    step its inflection-point bound was set at and whether lam was ever positive (the bound bit)."""
    b1, b2 = betas
    D, d = reg_step_size, reg_ema_decay
    warm = int(kappa_init_param) if kappa_init == "warm_start" else 0
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    regd = [n for n, p in params.items() if p.ndim >= 2 or not matrices_only]
    lam = {n: 0.0 for n in regd}
    kappa = {n: (kappa_init_param if kappa_init == "uniform" else 0.0) for n in regd}
    if kappa_init == "dependent":
        kappa = {n: kappa_init_param * float((params[n] ** 2).sum()) for n in regd}
    on = {n: kappa_init != "inflection_point" for n in regd}
    ema, prev, prev_slope = ({n: 0.0 for n in regd} for _ in range(3))
    set_at: dict[str, int] = {}
    bit = {n: False for n in regd}
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            m[n], v[n] = _adam(m[n], v[n], g, b1, b2)
            ps[n] = ps[n] - lr * (m[n] / (1 - b1**t)) / (torch.sqrt(v[n] / (1 - b2**t)) + eps)
            if n not in lam:
                continue
            reg = float((ps[n] ** 2).sum())
            if on[n] and t > warm:
                lam[n] = max(0.0, lam[n] + kappa_update / ps[n].numel() * (reg - kappa[n]))
                bit[n] |= lam[n] > 0
            if kappa_init == "warm_start" and t == warm:
                kappa[n] = reg
            if kappa_init == "inflection_point" and t % D == 0:
                ema[n] = d * ema[n] + (1 - d) * reg
                if t > D:
                    slope = ema[n] - prev[n]
                    if t > 3 * D and prev_slope[n] > slope and not on[n]:
                        kappa[n], on[n], set_at[n] = reg, True, t
                    prev[n] = ema[n]
                    if t > 2 * D:
                        prev_slope[n] = slope
            ps[n] = ps[n] - 2 * (lr if reg_by_lr else 1.0) * lam[n] * ps[n]
    state = {n: {"adam.exp_avg": m[n], "adam.exp_avg_sq": v[n]} for n in ps}
    for n in regd:
        state[n].update({"cpr.kappa": torch.tensor(kappa[n], dtype=F64), "cpr.lagmul": torch.tensor(lam[n], dtype=F64)})
    return ps, state, {"set_at": set_at, "bit": bit}


# -- memory-saving second moments ---------------------------------------------------------------------
def _factored_axes(shape: tuple[int, ...], min_size: int) -> tuple[int, int] | None:
    """Adafactor's two largest dims (a later dim wins a tie), as (row dim, column dim), if both >= min_size."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    row, col = order[-2], order[-1]
    return (row, col) if shape[row] >= min_size and shape[col] >= min_size else None


def adafactor(
    params: Params,
    grads: Grads,
    lr=1e-2,
    beta2_decay=-0.8,
    eps=(None, 1e-3),
    d=1.0,
    weight_decay=0.0,
    momentum=0.0,
    min_dim_size_to_factor=128,
):
    """Adafactor (Shazeer & Stern 1804.04235), the paper's numerics: Q = g^2 + eps1 (1e-30 for None);
    R, C EMAs of the row and column means of Q with weight t^beta2_decay; V^ = R C / mean(R);
    U = g / sqrt(V^); U <- U / max(1, RMS(U)/d); alpha = max(eps2, RMS(theta_{t-1})) min(lr, 1/sqrt(t));
    theta <- theta (1 - lr wd) - alpha U (or - M with M = EMA(alpha U) of decay momentum)."""
    eps1 = 1e-30 if eps[0] is None else eps[0]
    ps = dict(params)
    axes = {n: _factored_axes(tuple(p.shape), min_dim_size_to_factor) for n, p in params.items()}
    acc: dict[str, dict[str, Tensor]] = {}
    for n, p in params.items():
        if axes[n] is None:
            acc[n] = {"factored.v": torch.zeros_like(p)}
        else:
            row, col = axes[n]
            acc[n] = {
                "factored.row": torch.zeros_like(p).sum(col, keepdim=True),
                "factored.col": torch.zeros_like(p).sum(row, keepdim=True),
            }
        if momentum:
            acc[n]["ema.ema"] = torch.zeros_like(p)
    for t, gs in enumerate(grads, 1):
        w = t**beta2_decay
        for n, g in gs.items():
            q, st = g * g + eps1, acc[n]
            if axes[n] is None:
                st["factored.v"] = (1 - w) * st["factored.v"] + w * q
                vhat = st["factored.v"]
            else:
                row, col = axes[n]
                st["factored.row"] = (1 - w) * st["factored.row"] + w * q.mean(col, keepdim=True)
                st["factored.col"] = (1 - w) * st["factored.col"] + w * q.mean(row, keepdim=True)
                vhat = st["factored.row"] * st["factored.col"] / st["factored.row"].mean(row, keepdim=True)
            u = g / torch.sqrt(vhat)
            u = u / max(1.0, _rms(u) / d)
            step = max(eps[1], _rms(ps[n])) * min(lr, 1 / math.sqrt(t)) * u
            if momentum:
                st["ema.ema"] = momentum * st["ema.ema"] + (1 - momentum) * step
                step = st["ema.ema"]
            ps[n] = ps[n] * (1 - lr * weight_decay) - step
    return ps, acc


def sm3(params: Params, grads: Grads, lr=0.1, momentum=0.0, b2=1.0, eps=1e-8):
    """SM3-II (Anil et al. 1901.11150): nu = min over the axis accumulators of mu + g^2 (EMA when b2 < 1);
    mu_a <- max of nu over the other axes; u = g / sqrt(nu + eps) where nu > 0, else 0; optional
    EMA momentum; theta <- theta - lr u. A tensor of ndim <= 1 keeps one full accumulator."""
    ps, mom = dict(params), _zeros(params)
    acc: dict[str, list[Tensor]] = {}
    for n, p in params.items():
        if p.ndim <= 1:
            acc[n] = [torch.zeros_like(p)]
        else:
            acc[n] = [
                torch.zeros([s if i == a else 1 for i, s in enumerate(p.shape)], dtype=F64) for a in range(p.ndim)
            ]
    for gs in grads:
        for n, g in gs.items():
            low = acc[n][0]
            for mu in acc[n][1:]:
                low = torch.minimum(low, mu)  # broadcasts to the full shape
            nu = low + g * g if b2 == 1.0 else b2 * low + (1 - b2) * g * g
            if g.ndim <= 1:
                acc[n] = [nu]
            else:
                acc[n] = [nu.amax(dim=tuple(i for i in range(g.ndim) if i != a), keepdim=True) for a in range(g.ndim)]
            u = torch.where(nu > 0, g / torch.sqrt(nu + eps), torch.zeros_like(g))
            if momentum:
                mom[n] = momentum * mom[n] + (1 - momentum) * u
                u = mom[n]
            ps[n] = ps[n] - lr * u
    state = {n: {f"sm3.acc_{a}": mu for a, mu in enumerate(acc[n])} for n in ps}
    if momentum:
        for n in ps:
            state[n]["ema.ema"] = mom[n]
    return ps, state


def amos_eta(shape: tuple[int, ...]) -> float:
    """The recipe's documented target scale: 0.5 for ndim <= 1, else sqrt(2 / fan_in), fan_in = prod(shape[1:])."""
    return 0.5 if len(shape) <= 1 else math.sqrt(2.0 / math.prod(shape[1:]))


def amos(params: Params, grads: Grads, lr=1e-3, beta=0.999, zeta=0.25, momentum=0.0, finetune_rate=1.0, eps=2.0**-125):
    """Amos (Tian & Parikh 2210.11693; jestimator), scalar v and b per tensor, xi = lr:
    g2 = mean(g^2); v <- beta v + (1-beta) g2; r = (1 - beta^t)/max(v, eps);
    gamma = sqrt(fr) (1 + zeta sqrt(xi) b)^(-1/2) xi^2 r g2; l = xi eta;
    delta = fr/(1 + zeta sqrt(l) b) (-l sqrt(r) g - gamma theta/2); b <- b + gamma (fr + b);
    theta <- theta + delta (or + M, M an EMA of delta)."""
    xi, fr = lr, finetune_rate
    ps, mom = dict(params), _zeros(params)
    v = {n: 0.0 for n in params}
    b = {n: 0.0 for n in params}
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            g2 = float((g * g).mean())
            v[n] = beta * v[n] + (1 - beta) * g2
            r = (1 - beta**t) / max(v[n], eps)
            gamma = math.sqrt(fr) / math.sqrt(1 + zeta * math.sqrt(xi) * b[n]) * xi**2 * r * g2
            ell = xi * amos_eta(tuple(g.shape))
            delta = fr / (1 + zeta * math.sqrt(ell) * b[n]) * (-ell * math.sqrt(r) * g - 0.5 * gamma * ps[n])
            b[n] = b[n] + gamma * (fr + b[n])
            if momentum:
                mom[n] = momentum * mom[n] + (1 - momentum) * delta
                delta = mom[n]
            ps[n] = ps[n] + delta
    state = {n: {"amos.v": torch.tensor(v[n], dtype=F64), "amos.b": torch.tensor(b[n], dtype=F64)} for n in ps}
    if momentum:
        for n in ps:
            state[n]["ema.ema"] = mom[n]
    return ps, state


def most_square(numel: int) -> tuple[int, int]:
    """(r, c), r c = numel, c the largest divisor of numel not above sqrt(numel)."""
    c = max(d for d in range(1, math.isqrt(numel) + 1) if numel % d == 0)
    return numel // c, c


def _rank1(x: Tensor) -> tuple[Tensor, Tensor]:
    """Rank-1 NNMF of a non-negative matrix: row sums and column sums, the shorter one (columns,
    since r >= c) normalised to sum 1 (left alone when the matrix is all zero)."""
    row, col = x.sum(1), x.sum(0)
    total = float(col.sum())
    return row, (col / total if total > 0 else col)


def smmf(
    params: Params, grads: Grads, lr=1e-3, beta=0.9, eps=1e-8, weight_decay=0.0, decay_rate=-0.5, growth_rate=0.999
):
    """SMMF (Park & Lee 2412.08894, official code, vector_reshape): each tensor as its most square
    (r, c) matrix; M = sign * outer(m_r, m_c), V = outer(v_r, v_c); b1 = beta growth^(t-1),
    M <- b1 M + (1-b1) G; b2 = 1 - t^decay_rate, V <- b2 V + (1-b2) G^2; U = M / (sqrt(V) + eps);
    keep sign(M > 0) and the rank-1 NNMF of |M| and V; theta <- theta (1 - lr wd) - lr U.
    The state returned is what the factors reconstruct (|M|, V) and the signs."""
    ps = dict(params)
    st = {}
    for n, p in params.items():
        r, c = most_square(p.numel())
        st[n] = {
            "m": (torch.zeros(r, dtype=F64), torch.zeros(c, dtype=F64)),
            "sign": torch.zeros(r, c, dtype=torch.bool),
            "v": (torch.zeros(r, dtype=F64), torch.zeros(c, dtype=F64)),
        }
    for t, gs in enumerate(grads, 1):
        b1, b2 = beta * growth_rate ** (t - 1), 1 - t**decay_rate
        for n, g in gs.items():
            s = st[n]
            G = g.reshape(most_square(g.numel()))
            mag = torch.outer(*s["m"])
            M = b1 * torch.where(s["sign"], mag, -mag) + (1 - b1) * G
            V = b2 * torch.outer(*s["v"]) + (1 - b2) * G * G
            U = M / (torch.sqrt(V) + eps)
            s["sign"], s["m"], s["v"] = M > 0, _rank1(M.abs()), _rank1(V)
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * U.reshape(g.shape)
    out = {n: {"abs_m": torch.outer(*s["m"]), "v": torch.outer(*s["v"]), "sign": s["sign"]} for n, s in st.items()}
    return ps, out


# -- fractional-order gradients -------------------------------------------------------------------------
def gl_memory_weights(alpha: float, history: int) -> list[float]:
    """w_0 = 1, w_j = (1 - (alpha + 1)/(j + 1)) w_{j-1} (Zhou, Zhao, Huang 2023, FCGD_G-L)."""
    w = [1.0]
    for j in range(1, history + 1):
        w.append((1 - (alpha + 1) / (j + 1)) * w[-1])
    return w


def _fractional(history_of: dict[str, list[Tensor]], n: str, u: Tensor, w: list[float], keep: list[float]) -> Tensor:
    """D_t = u_t + sum_j keep_j w_j u_{t-j}; history_of[n] holds u_{t-1}, u_{t-2}, ... newest first."""
    d = u.clone()
    for j, past in enumerate(history_of[n][: len(w) - 1], 1):
        d = d + keep[j] * w[j] * past
    history_of[n].insert(0, u)
    return d


def dropped_terms(seed: int, history: int, drop: int) -> Callable[[int], list[float]]:
    """keep_j per step: which memory term the step drops is the recipe's seeded draw (seed and step only)."""
    from gradchain.transforms.fractional import _mix  # the draw only; every number is computed here

    def keep(t: int) -> list[float]:
        k = [1.0] * (history + 1)
        for j in random.Random(_mix(seed, t)).sample(range(1, history + 1), drop) if drop else ():
            k[j] = 0.0
        return k

    return keep


def fractional_adam(
    params: Params,
    grads: Grads,
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    alpha=0.9,
    history=10,
    drop=1,
    seed=0,
):
    """FCAdam_G-L: Adam (decoupled decay) on D_t = g_t + sum_j c_j w_j g_{t-j}."""
    b1, b2 = betas
    w, keep = gl_memory_weights(alpha, history), dropped_terms(seed, history, drop)
    ps, m, v = dict(params), _zeros(params), _zeros(params)
    hist: dict[str, list[Tensor]] = {n: [] for n in params}
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            D = _fractional(hist, n, g, w, keep(t))
            m[n], v[n] = _adam(m[n], v[n], D, b1, b2)
            step = (m[n] / (1 - b1**t)) / (torch.sqrt(v[n] / (1 - b2**t)) + eps)
            ps[n] = ps[n] * (1 - lr * weight_decay) - lr * step
    return ps, {n: {"adam.exp_avg": m[n], "adam.exp_avg_sq": v[n]} for n in ps}


def fractional_sgd(
    params: Params,
    grads: Grads,
    lr=1e-3,
    alpha=0.9,
    history=10,
    drop=1,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    seed=0,
):
    """FCSGD_G-L: g' = g + wd p; D_t from the g' history; torch-SGD momentum on D (b_1 = D_1); p <- p - lr step."""
    w, keep = gl_memory_weights(alpha, history), dropped_terms(seed, history, drop)
    ps, buf = dict(params), _zeros(params)
    hist: dict[str, list[Tensor]] = {n: [] for n in params}
    for t, gs in enumerate(grads, 1):
        for n, g in gs.items():
            D = _fractional(hist, n, g + weight_decay * ps[n], w, keep(t))
            step = D
            if momentum or nesterov:
                buf[n] = D if t == 1 else momentum * buf[n] + D
                step = D + momentum * buf[n] if nesterov else buf[n]
            ps[n] = ps[n] - lr * step
    state = {n: ({"momentum.buffer": buf[n]} if momentum else {}) for n in ps}
    return ps, state
