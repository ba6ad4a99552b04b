"""Adaptive memory momentum: beta_t against a numerical solve of the two-plane proximal problem,
AM-AdamW = torch AdamW at lambda = 0 and a constant beta, AM-SGD against a float64 reference of its
whole trajectory, bad input, and the recipe harness."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, lockstep_gap, make_model, peak_bytes

import gradchain as gc
from gradchain import ChainOptimizer, recipes

F64 = torch.float64
SHAPES = [(3, 4), (5,), ()]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second intra-op thread only spins, and on a shared CPU that costs seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the two-plane proximal problem, solved numerically -------------------------------------------
def _golden_max(fn, lo: float, hi: float, iters: int = 50) -> float:
    """The maximiser of a concave function on [lo, hi] by golden-section search."""
    r = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = fn(d)
    x = (a + b) / 2.0
    # golden section alone stops near sqrt(machine eps) (the top is flat); polish with Newton steps
    # on central differences, kept inside [lo, hi] (a maximiser at a bound stays there)
    h = 1e-3
    for _ in range(3):
        xm, xp = max(lo, x - h), min(hi, x + h)
        x0 = (xm + xp) / 2.0
        fm, f0, fp = fn(xm), fn(x0), fn(xp)
        curv = (fp - 2.0 * f0 + fm) / ((xp - xm) / 2.0) ** 2
        if curv >= 0:
            break
        x = min(hi, max(lo, x0 - ((fp - fm) / (xp - xm)) / curv))
    return max((lo, hi, x), key=fn)


def _solve_two_plane(g: torch.Tensor, d: torch.Tensor, lam: float, P: torch.Tensor | None = None, lr: float = 0.1):
    """beta maximising the dual of  min_x max(l1, l2)(x) + (1/2lr) x'Px + (lam/2lr) ||P x + lr d||^2.

    ``l1(x) = f + <g, x>`` (the gradient plane through the current point, x = the step) and
    ``l2(x) = f_hat + <d, x>`` (the memory plane) with ``f_hat - f = lr <g, P^-1 d>``: the first-order
    estimate of the previous point's loss. P = 1 is AM-SGD's problem. The inner minimum for a fixed
    plane weight beta is a dense linear solve; beta by golden-section search on [0, 1]. Returns beta
    and the duality gap at it (primal minus dual: zero only at the solution).
    """
    n = g.numel()
    P = torch.ones(n, dtype=F64) if P is None else P.reshape(-1)
    g, d = g.reshape(-1), d.reshape(-1)
    f = 0.0  # only f_hat - f matters; 0 keeps the dual values at the scale of their differences
    f_hat = f + lr * float((g * d / P).sum())
    A = torch.diag(P)  # the proximal metric; the heavy-ball term uses the map x -> P x as well

    def prox(x):
        return float(x @ (A @ x)) / (2 * lr) + lam / (2 * lr) * float(((A @ x) + lr * d).pow(2).sum())

    # the inner problem's Hessian (times lr) and a fixed linear term (elementwise: A is diagonal)
    H, Ctd = A + lam * torch.diag(P * P), P * d

    def inner(beta: float):
        s = (1 - beta) * g + beta * d
        x = torch.linalg.solve(H, -lr * s - lr * lam * Ctd)
        value = (1 - beta) * (f + float(g @ x)) + beta * (f_hat + float(d @ x)) + prox(x)
        return value, x

    beta = _golden_max(lambda b: inner(b)[0], 0.0, 1.0)
    dual, x = inner(beta)
    primal = max(f + float(g @ x), f_hat + float(d @ x)) + prox(x)
    assert n > 0
    return beta, primal - dual


def test_solver_finds_known_optima() -> None:
    g = torch.tensor([1.0, -2.0], dtype=F64)
    # d = 0, lam = 0: the memory plane is flat at f, so no step beats x = 0: the flat plane alone, beta = 1
    beta, gap = _solve_two_plane(g, torch.zeros(2, dtype=F64), 0.0)
    assert beta == pytest.approx(1.0, abs=1e-9) and abs(gap) < 1e-10
    # d = -g, lam = 0: f_hat = f - lr |g|^2, the planes meet where <g, x> = -lr |g|^2 / 2, and the
    # step for plane weight beta, x = -lr (1 - 2 beta) g, lies there for beta = 1/4
    beta, gap = _solve_two_plane(g, -g, 0.0)
    assert beta == pytest.approx(0.25, abs=1e-9) and abs(gap) < 1e-10


def _concat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _sequences(kind: str, steps: int) -> list[list[torch.Tensor]]:
    """Gradient sequences whose beta_t hits the interior and both clips."""
    gen = torch.Generator().manual_seed({"random": 1, "drift": 2, "flip": 3}[kind])
    base = [torch.randn(s, dtype=F64, generator=gen) for s in SHAPES]
    out = []
    for t in range(steps):
        noise = [torch.randn(s, dtype=F64, generator=gen) for s in SHAPES]
        if kind == "random":
            out.append(noise)
        elif kind == "drift":  # a steady direction plus small noise: long memory
            out.append([b + 0.05 * z for b, z in zip(base, noise)])
        else:  # the sign flips and shrinks: the memory points the wrong way
            out.append([(-1) ** t * (0.2**t) * b + 1e-4 * z for b, z in zip(base, noise)])
    return out


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_am_sgd_beta_solves_the_proximal_problem(lam: float) -> None:
    seen = set()
    for kind in ("random", "drift", "flip"):
        t = gc.adaptive_memory_momentum(am_lambda=lam, beta_max=0.9)
        params = [torch.zeros(s, dtype=F64) for s in SHAPES]
        state = t.init(params)
        for k, grads in enumerate(_sequences(kind, 8)):
            d = _concat([st["am.memory"] for st in state]).clone()
            t.update(grads, state, params)
            betas = [float(st["am.beta"]) for st in state]
            assert len(set(betas)) == 1, "AM-SGD keeps one beta for all params"
            if k == 0:
                assert betas[0] == 0.9  # d_0 = g_0: the planes are parallel, beta = beta_max
                continue
            want, gap = _solve_two_plane(_concat(grads), d, lam)
            assert abs(gap) < 1e-9, f"{kind} step {k}: the numerical solve did not converge (gap {gap})"
            assert betas[0] == pytest.approx(min(want, 0.9), abs=1e-9), f"{kind} step {k + 1}"
            seen.add("zero" if want < 1e-12 else "max" if want >= 0.9 else "interior")
    # with lam = 0 the solution is ||g||^2 / ||d - g||^2 > 0: it can't clip at zero
    assert seen == ({"max", "interior"} if lam == 0 else {"zero", "max", "interior"}), seen


def test_am_adamw_beta_solves_the_proximal_problem_in_its_metric() -> None:
    lam, b2, eps, bmax = 0.3, 0.99, 1e-8, 0.87
    seen = set()
    for kind in ("random", "drift", "flip"):
        t = gc.scale_by_am_adamw(am_lambda=lam, beta_max=bmax, beta2=b2, eps=eps)
        params = [torch.zeros(s, dtype=F64) for s in SHAPES]
        state = t.init(params)
        v = [torch.zeros(s, dtype=F64) for s in SHAPES]
        prod = [1.0] * len(SHAPES)
        for k, grads in enumerate(_sequences(kind, 8), 1):
            ds = [st["am_adamw.memory"].clone() for st in state]
            t.update(grads, state, params)
            for i, g in enumerate(grads):
                v[i] = b2 * v[i] + (1 - b2) * g * g
                P = (1 - bmax * prod[i]) * (torch.sqrt(v[i] / (1 - b2**k)) + eps)
                want, gap = _solve_two_plane(g, ds[i], lam, P)
                got = float(state[i]["am_adamw.beta"])
                assert abs(gap) < 1e-9, f"{kind} step {k} tensor {i}: gap {gap}"
                assert got == pytest.approx(min(want, bmax), abs=1e-9), f"{kind} step {k} tensor {i}"
                prod[i] *= got
                seen.add("zero" if want < 1e-12 else "max" if want >= bmax else "interior")
    assert seen == {"zero", "max", "interior"}, seen


# -- AM-AdamW at lambda = 0 and a constant beta is AdamW ------------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)
    ).double()


def _groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 0.02, "weight_decay": 0.05},
        {"params": model[4].parameters()},
    ]


@pytest.mark.parametrize("b1,b2", [(0.9, 0.999), (0.8, 0.99)])
def test_am_adamw_is_adamw_at_lambda_zero_and_constant_beta(b1: float, b2: float) -> None:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(_groups(m1), lr=0.01, betas=(b1, b2), eps=1e-8, weight_decay=0.01)
    rec = recipes.am_adamw(lr=0.01, beta2=b2, eps=1e-8, weight_decay=0.01, am_lambda=0.0, beta_max=b1, beta_min=b1)
    o2 = ChainOptimizer(_groups(m2), rec)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=50)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, dtype=F64, generator=g)
    y = torch.randn(256, 2, dtype=F64, generator=g)
    assert lockstep_gap((m1, o1, s1), (m2, o2, s2), x, y, steps=200) <= 1e-12


def test_am_adamw_with_memory_differs_from_adamw() -> None:
    # the test above is not vacuous: with the adaptive beta the trajectory leaves AdamW's
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=0.01, betas=(0.89, 0.999))
    o2 = ChainOptimizer(m2.parameters(), recipes.am_adamw(lr=0.01))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, dtype=F64, generator=g), torch.randn(64, 2, dtype=F64, generator=g)
    assert lockstep_gap((m1, o1, None), (m2, o2, None), x, y, steps=20) > 1e-4
    betas = {float(st["am_adamw.beta"]) for st in o2.state.values()}
    assert len(betas) > 1  # per tensor


# -- AM-SGD: the whole trajectory against a float64 reference -------------------------------------
def _reference_am_sgd(model, lrs: dict, lam: float, beta_max: float, wd: float):
    """One AM-SGD step on ``model`` in place, written from the rule over the concatenated params."""
    state = {"d": None}

    @torch.no_grad()
    def step() -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        g = torch.cat([(p.grad + wd * p).reshape(-1) for p in params])
        d = g.clone() if state["d"] is None else state["d"]
        diff = d - g
        denom = float(diff @ diff)
        if denom > 0:
            beta = ((1 + lam) * float(g @ d) - float(diff @ (g + lam * d))) / denom
            beta = min(max(beta, 0.0), beta_max)
        else:  # d = g: parallel planes, the memory plane above; the proximal solution is beta = 1
            beta = beta_max
        d = ((beta + lam) * d + (1 - beta) * g) / (1 + lam)
        state["d"] = d
        offset = 0
        for p in params:
            n = p.numel()
            p -= lrs[id(p)] * d[offset : offset + n].reshape(p.shape)
            offset += n
        return beta

    return step


def test_am_sgd_trajectory_against_float64_reference() -> None:
    lam, beta_max, wd = 0.1, 0.9, 0.01
    m1 = make_model(F64)
    m2 = copy.deepcopy(m1)
    groups = lambda m: [  # noqa: E731
        {"params": [m.conv.weight, m.conv.bias, m.fc1.weight, m.fc1.bias, m.unused], "lr": 0.03},
        {"params": [p for n, p in m.named_parameters() if not n.startswith(("conv", "fc1", "unused"))]},
    ]
    opt = ChainOptimizer(groups(m1), recipes.am_sgd(lr=0.05, am_lambda=lam, beta_max=beta_max, weight_decay=wd))
    lrs = {}
    for grp, lr in zip(groups(m2), (0.03, 0.05)):
        lrs.update({id(p): lr for p in grp["params"]})
    ref_step = _reference_am_sgd(m2, lrs, lam, beta_max, wd)
    gen = torch.Generator().manual_seed(0)
    betas = []
    for _ in range(40):
        x, y = torch.randn(8, 2, 4, 4, dtype=F64, generator=gen), torch.randn(8, 3, dtype=F64, generator=gen)
        for m in (m1, m2):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        want = ref_step()
        got = float(opt.state[m1.fc1.weight]["am.beta"])
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
        betas.append(want)
        gap = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
        assert gap <= 1e-12
    assert len({round(b, 6) for b in betas}) > 10  # beta really adapts along the way


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_beta_of_fp32_grads_whose_squares_leave_the_fp32_range(scale: float, fused: bool, monkeypatch) -> None:
    # beta_t is a ratio of two sums of squares: fp32 grads of 1e-30 (or 1e25) are ordinary fp32
    # numbers whose squares are not, so the sums are formed in float64 from the start; before,
    # the eager path took fp32 norms (beta 0.02 where it is 0.85) and the fused path fp32 squares
    # (0.9, the cap)
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (5, 3), (2, 3, 4)]
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(4)]

    def last_beta(dtype: torch.dtype, at: float, fused_path: bool) -> float:
        ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        opt = ChainOptimizer(ps, gc.chain(gc.adaptive_memory_momentum(), gc.scale_by_lr(1.0)), fused=fused_path)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = (g * at).to(dtype)
            opt.step()
        return float(opt.state[ps[0]]["am.beta"])

    want = last_beta(F64, 1.0, False)  # beta_t does not depend on the grads' scale
    assert 0.1 < want < 0.89  # inside the clip: a wrong ratio shows
    assert last_beta(torch.float32, scale, fused) == pytest.approx(want, rel=1e-6)


# -- bad input ------------------------------------------------------------------------------------
def test_invalid_hyperparameters() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="beta_min"):
        gc.adaptive_memory_momentum(beta_max=0.5, beta_min=0.6)
    with pytest.raises(ValueError, match="beta_min"):
        gc.scale_by_am_adamw(beta_max=0.5, beta_min=0.6)
    with pytest.raises(ValueError, match="am_lambda"):
        ChainOptimizer(model.parameters(), recipes.am_sgd(am_lambda=-0.1))
    with pytest.raises(ValueError, match="beta_max"):
        ChainOptimizer(model.parameters(), recipes.am_sgd(), beta_max=1.0)
    with pytest.raises(ValueError, match="eps"):
        ChainOptimizer(model.parameters(), recipes.am_adamw(), eps=0.0)
    with pytest.raises(ValueError, match="beta_min"):
        ChainOptimizer(model.parameters(), recipes.am_adamw(), beta_min=0.95)


def test_one_beta_needs_one_lambda_across_groups() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="am_lambda"):  # when the groups are made
        ChainOptimizer([{"params": [model.weight]}, {"params": [model.bias], "am_lambda": 0.2}], recipes.am_sgd(lr=0.1))
    opt = ChainOptimizer([{"params": [model.weight]}, {"params": [model.bias]}], recipes.am_sgd(lr=0.1))
    opt.param_groups[1]["am_lambda"] = 0.2  # and at the step, for a value set in place
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="am_lambda"):
        opt.step()


def test_default_beta_max_of_am_adamw() -> None:
    assert gc.scale_by_am_adamw().hyperparams["beta_max"].default == pytest.approx(0.89)
    assert gc.scale_by_am_adamw(am_lambda=0.5).hyperparams["beta_max"].default == pytest.approx(0.85)


CASES = [
    RecipeCase("am_sgd", partial(recipes.am_sgd, lr=0.05, weight_decay=0.01)),
    # the beta chosen each step stays above every floor tried over the run
    RecipeCase("am_adamw", partial(recipes.am_adamw, lr=1e-2), inert=("beta_min",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES, steps=4)


def test_a_large_tensor_holds_three_temporaries_at_most() -> None:
    # the eager step of a tensor that a piece cannot cut (AM-AdamW's beta is a sum per tensor)
    # holds P, 1 + lam P and one scratch of its size at a time (six before)
    named = [("w", torch.nn.Parameter(torch.randn(512, 512))), ("b", torch.nn.Parameter(torch.randn(16)))]
    opt = ChainOptimizer(named, recipes.am_adamw())
    for _, p in named:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    peak = peak_bytes(opt.step) / (512 * 512 * 4)
    assert 2.5 < peak < 3.5, peak
