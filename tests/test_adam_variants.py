"""Adam-atan2, Sadam, NAdam, AdaMomentum, diffGrad, AdaNorm: float64 references, edge cases,
torch.optim.NAdam parity and the recipe harness."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, lockstep_gap

import gradchain as gc
from gradchain import ChainOptimizer, recipes

SHAPES = [(), (5,), (3, 4), (4, 2, 3, 3)]  # 0-d, 1-d, matrix, conv 4-d


def _grads(shape: tuple, steps: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a shrinking scale makes AdaNorm's norm EMA exceed the current norm at some steps
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * (2.0 if t < 4 else 0.3)).to(dtype)
            for t in range(steps)]


# -- float64 references, written from the spec (one tensor, plain loops) ------------------------
def ref_atan2(grads, b1=0.9, b2=0.99, a=1.27, b=1.0):
    # the paper's form (2407.05872), both corrections inside the atan2 (m_correction="inside"); the
    # CUDA package's form is pinned in test_adam_atan2.py
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(a * torch.atan2(m / (1 - b1**t), b * torch.sqrt(v / (1 - b2**t))))
    return out


def ref_sadam(grads, b1=0.9, b2=0.999, beta=50.0):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = torch.sqrt(v / (1 - b2**t))
        sp = torch.where(beta * x > 20, x, torch.log1p(torch.exp(beta * x)) / beta)
        out.append((m / (1 - b1**t)) / sp)
    return out


def ref_nadam(grads, b1=0.9, b2=0.999, eps=1e-8, psi=4e-3, form="torch"):
    m = v = 0.0
    prod = 1.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        den = torch.sqrt(v / (1 - b2**t)) + eps
        if form == "torch":
            mu = b1 * (1 - 0.5 * 0.96 ** (t * psi))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
            prod *= mu
            mhat = mu_next * m / (1 - prod * mu_next) + (1 - mu) * g / (1 - prod)
        else:
            mhat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
        out.append(mhat / den)
    return out


def ref_adamomentum(grads, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * m * m + eps
        out.append((m / (1 - b1**t)) / torch.sqrt(v / (1 - b2**t)))
    return out


def ref_diffgrad(grads, b1=0.9, b2=0.999, eps=1e-8):
    m = v = 0.0
    prev = torch.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        xi = 1 / (1 + torch.exp(-(prev - g).abs()))
        prev = g
        out.append(xi * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps))
    return out


def ref_adanorm(grads, b1=0.9, b2=0.999, eps=1e-8, r=0.95, cap=None):
    m = v = 0.0
    e = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        n = math.sqrt(float((g * g).sum()))
        e = r * e + (1 - r) * n
        ratio = e / n if (e > n and n > 0) else 1.0
        if cap is not None:
            ratio = min(ratio, cap)
        m = b1 * m + (1 - b1) * g * ratio
        v = b2 * v + (1 - b2) * g * g
        out.append((m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps))
    return out


TRANSFORMS = {
    "atan2": (lambda: gc.scale_by_adam_atan2(), ref_atan2),
    "atan2_ab": (lambda: gc.scale_by_adam_atan2((0.8, 0.95), a=2.0, b=0.5),
                 partial(ref_atan2, b1=0.8, b2=0.95, a=2.0, b=0.5)),
    "sadam": (lambda: gc.scale_by_adam_softplus(), ref_sadam),
    "sadam_b3": (lambda: gc.scale_by_adam_softplus(softplus_beta=3.0), partial(ref_sadam, beta=3.0)),
    "nadam_torch": (lambda: gc.scale_by_nadam(), ref_nadam),
    "nadam_psi": (lambda: gc.scale_by_nadam((0.8, 0.99), 1e-6, 0.1), partial(ref_nadam, b1=0.8, b2=0.99, eps=1e-6,
                                                                              psi=0.1)),
    "nadam_optax": (lambda: gc.scale_by_nadam(form="optax"), partial(ref_nadam, form="optax")),
    "adamomentum": (lambda: gc.scale_by_adamomentum(), ref_adamomentum),
    "adamomentum_eps": (lambda: gc.scale_by_adamomentum(eps=1e-3), partial(ref_adamomentum, eps=1e-3)),
    "diffgrad": (lambda: gc.scale_by_diffgrad(), ref_diffgrad),
    "adanorm": (lambda: gc.scale_by_adanorm(), ref_adanorm),
    "adanorm_cap": (lambda: gc.scale_by_adanorm(norm_decay=0.5, max_ratio=1.5), partial(ref_adanorm, r=0.5, cap=1.5)),
}


@pytest.mark.parametrize("key", sorted(TRANSFORMS))
def test_transform_against_float64_reference(key: str) -> None:
    make, ref = TRANSFORMS[key]
    t = make()
    steps = 12
    seqs = [_grads(s, steps, seed=i) for i, s in enumerate(SHAPES)]
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    state = t.init(params)
    want = [ref(seq) for seq in seqs]
    for k in range(steps):
        got = t.update([seq[k] for seq in seqs], state, params)
        for shape, u, w in zip(SHAPES, got, want):
            assert u.shape == shape and u.dtype == torch.float64
            torch.testing.assert_close(u, w[k], rtol=1e-12, atol=1e-14, msg=f"{key} {shape} step {k + 1}")


@pytest.mark.parametrize("key", sorted(TRANSFORMS))
def test_zero_gradients_give_zero_update(key: str) -> None:
    t = TRANSFORMS[key][0]()
    params = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    state = t.init(params)
    for _ in range(3):
        for u in t.update([torch.zeros(s, dtype=torch.float64) for s in SHAPES], state, params):
            assert torch.equal(u, torch.zeros_like(u)), key


@pytest.mark.parametrize("key", sorted(TRANSFORMS))
def test_bf16_params_fp32_state(key: str) -> None:
    make, ref = TRANSFORMS[key]
    t = make()
    seqs = [_grads(s, 5, seed=10 + i, dtype=torch.bfloat16) for i, s in enumerate(SHAPES)]
    params = [torch.zeros(s, dtype=torch.bfloat16) for s in SHAPES]
    state = t.init(params)
    for st in state:
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32, f"{key}: state {k} is {v.dtype}"
    want = [ref([g.double() for g in seq]) for seq in seqs]
    for k in range(5):
        got = t.update([seq[k] for seq in seqs], state, params)
        for u, w in zip(got, want):
            assert u.dtype == torch.float32 and torch.isfinite(u).all()
            torch.testing.assert_close(u.double(), w[k], rtol=2e-5, atol=1e-6)


def test_atan2_is_bounded_and_scale_invariant() -> None:
    g = torch.tensor([1e-30, 5.0, -3.0, 1e30], dtype=torch.float64)
    outs = []
    for c in (1.0, 1e-20, 1e20):
        t = gc.scale_by_adam_atan2()
        p = torch.zeros(4, dtype=torch.float64)
        st = t.init([p])
        outs.append(t.update([g * c], st, [p])[0])
    for u in outs:
        assert torch.isfinite(u).all() and (u.abs() <= 1.27 * math.pi / 2).all()
        torch.testing.assert_close(u, outs[0], rtol=1e-12, atol=0)


def test_sadam_floor_and_no_overflow() -> None:
    # v = 0 exactly after g = 0 then a tiny g: the denominator is at least log(2)/beta
    t = gc.scale_by_adam_softplus(softplus_beta=50.0)
    p = torch.zeros(3, dtype=torch.float64)
    st = t.init([p])
    u = t.update([torch.tensor([1e-12, 1e3, 1e30], dtype=torch.float64)], st, [p])[0]
    assert torch.isfinite(u).all()
    assert u[0] == pytest.approx(1e-12 * 50 / math.log(2), rel=1e-6)
    assert u[1] == pytest.approx(1.0, rel=1e-12) and u[2] == pytest.approx(1.0, rel=1e-12)


def _softplus_ulps(x: torch.Tensor, beta: float, compiled: bool) -> torch.Tensor:
    f = gc.ops.softplus_nonneg_polynomial
    f = torch.compile(f, fullgraph=True) if compiled else f
    exact = torch.nn.functional.softplus(x.double(), beta=beta, threshold=20.0)
    near = exact.float().abs()
    spacing = (torch.nextafter(near, torch.tensor(math.inf)) - near).double()
    return (f(x, beta).double() - exact).abs() / spacing


@pytest.mark.parametrize("beta, compiled", [(50.0, False), (1.0, False), (3.0, False), (50.0, True)])
def test_fused_softplus_polynomial_is_within_4_ulp(beta: float, compiled: bool) -> None:
    # Sadam's compiled denominator (x = sqrt(v^) >= 0): many decades, up to and past the threshold
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.logspace(-40, 3, 100_000), torch.rand(100_000, generator=g) * 30.0 / beta])
    err = _softplus_ulps(x, beta, compiled)
    assert err.max() <= 4.0, err.max()
    assert err.mean() < 0.5  # most results within half an ulp, not merely within the bound


def test_fused_softplus_polynomial_special_values() -> None:
    x = torch.tensor([0.0, -0.0, math.inf, math.nan, 0.4, 0.4 + 1e-7, 1e-45])
    got = gc.ops.softplus_nonneg_polynomial(x, 50.0)
    want = torch.nn.functional.softplus(x.double(), beta=50.0, threshold=20.0).float()
    torch.testing.assert_close(got, want, rtol=3e-7, atol=0, equal_nan=True)
    assert got[2] == math.inf and got[5] == x[5]  # past the threshold: x itself, as torch


def test_sadam_fused_uses_the_polynomial_eager_keeps_torch(monkeypatch) -> None:
    # the compiled kernel calls the polynomial (float32); float64 and eager keep F.softplus
    calls = []
    real = gc.ops.softplus_nonneg_polynomial
    monkeypatch.setattr(gc.ops, "softplus_nonneg_polynomial", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [(torch.float32, True, True), (torch.float64, True, False), (torch.float32, False, False)]
    for dtype, fused, used in cases:
        calls.clear()
        p = torch.nn.Parameter(torch.ones(5, dtype=dtype))
        p.grad = torch.ones_like(p)
        ChainOptimizer([p], recipes.sadam(), fused=fused).step()
        assert bool(calls) == used, (dtype, fused)


def test_adanorm_zero_norm_and_state_is_per_tensor_scalar() -> None:
    t = gc.scale_by_adanorm()
    ps = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
    st = t.init(ps)
    assert all(s["adanorm.grad_norm"].shape == () and s["adanorm.grad_norm"].dtype == torch.float64 for s in st)
    t.update([torch.ones(3, 2, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)], st, ps)
    u = t.update([torch.zeros(3, 2, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)], st, ps)
    assert all(torch.isfinite(x).all() for x in u)
    assert float(st[0]["adanorm.grad_norm"]) == pytest.approx(0.05 * math.sqrt(6) * 0.95)


def test_invalid_structural_options() -> None:
    with pytest.raises(ValueError, match="form"):
        gc.scale_by_nadam(form="dozat2")
    with pytest.raises(ValueError, match="softplus_beta"):
        gc.scale_by_adam_softplus(softplus_beta=0.0)
    for bad in (-1.0, 0.5, math.inf):  # the ratio is >= 1: a "cap" of 0.5 scaled every gradient by 0.5
        with pytest.raises(ValueError, match="max_ratio"):
            gc.scale_by_adanorm(max_ratio=bad)
    gc.scale_by_adanorm(max_ratio=1.0)


# -- NAdam equals torch.optim.NAdam ---------------------------------------------------------------
@pytest.fixture
def float64_default():
    # torch keeps NAdam's mu_product in the default dtype; gradchain in the param's dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


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


SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
    # cycles betas[0] too: the stored mu product must follow a scheduled beta1 as torch's does
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=200),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("decoupled", [False, True])
def test_nadam_matches_torch(float64_default, decoupled: bool, sched: str) -> None:
    hp = {"lr": 0.01, "betas": (0.85, 0.99), "weight_decay": 0.01, "momentum_decay": 0.01,
          "decoupled_weight_decay": decoupled}
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.NAdam(_groups(m1), **hp)
    o2 = ChainOptimizer(_groups(m2), recipes.nadam(**hp))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = torch.randn(256, 2, generator=g)
    gap = lockstep_gap((m1, o1, SCHEDULERS[sched](o1)), (m2, o2, SCHEDULERS[sched](o2)), x, y)
    assert gap <= 1e-12
    p = next(m2.parameters())
    assert o2.state[p]["nadam.mu_product"].item() == pytest.approx(o1.state[next(m1.parameters())]["mu_product"].item(),
                                                                  rel=1e-14)


# -- the recipes through the harness ---------------------------------------------------------------
CASES = [
    RecipeCase("nadam", partial(recipes.nadam, lr=1e-2, weight_decay=1e-2)),
    RecipeCase("nadam_decoupled", partial(recipes.nadam, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True)),
    RecipeCase("adam_atan2", partial(recipes.adam_atan2, lr=1e-2, weight_decay=0.1)),
    RecipeCase("sadam", partial(recipes.sadam, lr=1e-2, weight_decay=0.01)),
    RecipeCase("adamomentum", partial(recipes.adamomentum, lr=1e-2, weight_decay=0.01)),
    RecipeCase("diffgrad", partial(recipes.diffgrad, lr=1e-2, weight_decay=0.01)),
    # e starts at 0 (no bias correction) and stays below |g| over the run: the ratio is 1, no cap binds
    RecipeCase("adanorm", partial(recipes.adanorm, lr=1e-2, max_ratio=2.0), inert=("max_ratio",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)
