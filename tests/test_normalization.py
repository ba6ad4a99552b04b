"""normalize, centralize, scale_by_trust_ratio and their recipes (lamb, gc_adamw, nsgda)."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

import gradchain as gc
from gradchain import ChainOptimizer, recipes

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny float64 convs: extra intra-op threads only add contention on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


def _tensors(seed: int = 0) -> tuple[list, list]:
    """conv (out, in, kh, kw), linear, a (n, 1) weight, a bias, a zero-init bias, a 0-d gain, a zero grad."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3, 3, 3), (4, 6), (7, 1), (5,), (4,), (), (3, 2)]
    params = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    params[4].zero_()
    grads = [torch.randn(s, generator=g, dtype=F64) * 3 for s in shapes]
    grads[6].zero_()
    return params, grads


def _run(t: gc.Transform, params: list, grads: list, **hp) -> list:
    return t.update(grads, t.init(params), params, **hp)


# -- normalize ----------------------------------------------------------------------------------
def test_normalize_per_tensor() -> None:
    params, grads = _tensors()
    out = _run(gc.normalize(1e-8), params, grads)
    for u, g in zip(out, grads):
        torch.testing.assert_close(u, g / (_norm(g) + 1e-8), rtol=1e-14, atol=0)
    assert torch.equal(out[6], torch.zeros(3, 2, dtype=F64))  # a zero update stays zero
    assert abs(float(out[5]) - math.copysign(1.0, float(grads[5]))) < 1e-8  # a scalar steps +-1


def test_normalize_global_across_two_groups() -> None:
    torch.manual_seed(1)
    a, b = torch.nn.Linear(4, 3).double(), torch.nn.Conv1d(2, 3, 2).double()
    opt = ChainOptimizer(
        [{"params": a.parameters()}, {"params": b.parameters(), "normalize_eps": 1e-3}],
        gc.chain(gc.normalize(1e-8, scope="global"), gc.scale_by_lr(1.0)),
    )
    before = [p.detach().clone() for p in [*a.parameters(), *b.parameters()]]
    (a(torch.randn(5, 4, dtype=F64)).sum() + (b(torch.randn(5, 2, 4, dtype=F64)) ** 2).sum()).backward()
    grads = [p.grad.clone() for p in [*a.parameters(), *b.parameters()]]
    opt.step()
    total = math.sqrt(sum(_norm(g) ** 2 for g in grads))
    for i, (p, p0, g) in enumerate(zip([*a.parameters(), *b.parameters()], before, grads)):
        eps = 1e-8 if i < 2 else 1e-3
        torch.testing.assert_close(p.detach(), p0 - g / (total + eps), rtol=1e-14, atol=1e-15)


# -- centralize ---------------------------------------------------------------------------------
def centralize_reference(g: torch.Tensor, min_ndim: int = 2) -> torch.Tensor:
    if g.ndim < min_ndim or g[0].numel() == 1:
        return g.clone()
    out = g.clone()
    for i in range(g.shape[0]):
        out[i] = g[i] - float(g[i].sum()) / g[i].numel()
    return out


@pytest.mark.parametrize("min_ndim", [2, 4])
def test_centralize_per_output_unit(min_ndim: int) -> None:
    params, grads = _tensors(1)
    out = _run(gc.centralize(min_ndim), params, grads)
    for u, g in zip(out, grads):
        torch.testing.assert_close(u, centralize_reference(g, min_ndim), rtol=0, atol=1e-14)
    # the conv's filters now have zero mean each; biases, (n, 1) weights and scalars are untouched
    assert out[0].mean(dim=(1, 2, 3)).abs().max() < 1e-14
    for i in (2, 3, 4, 5):
        assert torch.equal(out[i], grads[i])
    assert torch.equal(out[1], grads[1]) == (min_ndim == 4)


# -- trust ratio ---------------------------------------------------------------------------------
def trust_reference(u: torch.Tensor, w: torch.Tensor, clamp: float | None) -> torch.Tensor:
    wn, un = _norm(w), _norm(u)
    phi = wn if clamp is None else min(wn, clamp)
    return u * (phi / un) if wn > 0 and un > 0 else u.clone()


@pytest.mark.parametrize("clamp", [None, 2.0])
def test_trust_ratio_against_reference(clamp: float | None) -> None:
    params, grads = _tensors(2)
    out = _run(gc.scale_by_trust_ratio(clamp), params, grads)
    for u, g, w in zip(out, grads, params):
        torch.testing.assert_close(u, trust_reference(g, w, clamp), rtol=1e-14, atol=0)
    assert torch.equal(out[4], grads[4])  # zero weight: ratio 1
    assert torch.equal(out[6], grads[6])  # zero update: stays zero, no NaN
    if clamp is None:
        torch.testing.assert_close(torch.tensor(_norm(out[0])), torch.tensor(_norm(params[0])), rtol=1e-14, atol=0)


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="normalize_eps"):
        gc.normalize(0.0)
    with pytest.raises(ValueError, match="scope"):
        gc.normalize(scope="unit")
    with pytest.raises(ValueError, match="min_ndim"):
        gc.centralize(1)
    with pytest.raises(ValueError, match="max_weight_norm"):
        gc.scale_by_trust_ratio(-1.0)
    with pytest.raises(ValueError, match="max_weight_norm"):
        ChainOptimizer([torch.zeros(2, requires_grad=True)], recipes.lamb(), max_weight_norm=0.0)


# -- recipes against float64 references ------------------------------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(16, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 2),
    ).double()
    torch.nn.init.zeros_(m[3].bias)
    return m


def _groups(model: torch.nn.Module, **first) -> list[dict]:
    return [
        {"params": list(model[0].parameters()) + list(model[3].parameters()), **first},
        {"params": list(model[5].parameters())},
    ]


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i % 8)
    return torch.randn(8, 2, 4, 4, dtype=F64, generator=g), torch.randn(8, 2, dtype=F64, generator=g)


def _grads(model: torch.nn.Module, i: int) -> list[torch.Tensor]:
    model.zero_grad()
    x, y = _data(i)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def _chain_run(model: torch.nn.Module, tr: gc.Transform, steps: int, **first) -> None:
    opt = ChainOptimizer(_groups(model, **first), tr)
    for i in range(steps):
        _grads(model, i)
        opt.step()


def test_lamb_against_the_paper() -> None:
    """LAMB, You et al. 2019, Algorithm 2 with bias correction and phi = min(., clamp), written per param."""
    steps, b1, b2 = 60, 0.9, 0.999
    first = {"lr": 0.02, "weight_decay": 0.1, "max_weight_norm": 1.0}
    for hp in ({}, first):
        ref, m2 = _model(), _model()
        _chain_run(m2, recipes.lamb(lr=0.01, eps=1e-6, weight_decay=0.01), steps, **hp)
        params = list(ref.parameters())
        n_first = 4
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        for t in range(1, steps + 1):
            grads = _grads(ref, t - 1)
            with torch.no_grad():
                for j, (p, g) in enumerate(zip(params, grads)):
                    lr = hp.get("lr", 0.01) if j < n_first else 0.01
                    lam = hp.get("weight_decay", 0.01) if j < n_first else 0.01
                    clamp = hp.get("max_weight_norm") if j < n_first else None
                    m[j] = b1 * m[j] + (1 - b1) * g
                    v[j] = b2 * v[j] + (1 - b2) * g * g
                    r = (m[j] / (1 - b1**t)) / ((v[j] / (1 - b2**t)).sqrt() + 1e-6)
                    q = r + lam * p
                    wn, qn = _norm(p), _norm(q)
                    phi = wn if clamp is None else min(wn, clamp)
                    ratio = phi / qn if wn > 0 and qn > 0 else 1.0
                    p.sub_(lr * ratio * q)
        for a, b in zip(ref.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gc_adamw_matches_torch_adamw_on_centralized_grads() -> None:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(_groups(m1, lr=0.02, weight_decay=0.05), lr=0.01)
    o2 = ChainOptimizer(_groups(m2, lr=0.02, weight_decay=0.05), recipes.gc_adamw(lr=0.01))
    s1, s2 = (torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50) for o in (o1, o2))
    gap = 0.0
    for i in range(200):
        for p in m1.parameters():
            p.grad = None
        for g in _grads(m1, i):
            g.copy_(centralize_reference(g))
        o1.step()
        s1.step()
        _grads(m2, i)
        o2.step()
        s2.step()
        gap = max(gap, max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())))
    assert gap <= 1e-12


def test_nsgda_against_reference() -> None:
    """The fixed article rule: g' = g + wd p; m = beta m + (1 - beta) g'; p -= lr m / (||m|| + eps)."""
    steps, lr, beta, eps, wd = 30, 0.01, 0.8, 1e-8, 0.05
    ref, m2 = _model(), _model()
    _chain_run(m2, recipes.nsgda(lr=lr, beta=beta, eps=eps, weight_decay=wd), steps)
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    for t in range(steps):
        grads = _grads(ref, t)
        with torch.no_grad():
            for j, (p, g) in enumerate(zip(params, grads)):
                m[j] = beta * m[j] + (1 - beta) * (g + wd * p)
                p.sub_(lr * m[j] / (_norm(m[j]) + eps))
    for a, b in zip(ref.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    # every tensor moved by lr ||m|| / (||m|| + eps) ~ lr in L2 norm, whatever its size
    m3 = _model()
    before = [p.detach().clone() for p in m3.parameters()]
    _chain_run(m3, recipes.nsgda(lr=lr), 1)
    for p, b in zip(m3.parameters(), before):
        assert lr * (1 - 1e-6) < _norm(p.detach() - b) <= lr * (1 + 1e-12)


def test_nsgda_zero_gradient_and_scalar() -> None:
    p = torch.nn.Parameter(torch.tensor(0.0, dtype=F64))
    q = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    opt = ChainOptimizer([p, q], recipes.nsgda(lr=0.1, weight_decay=0.0))
    p.grad, q.grad = torch.tensor(-4.0, dtype=F64), torch.zeros(3, dtype=F64)
    opt.step()
    # a scalar steps by ~+-lr: m = 0.1 * -4, update -lr m / (|m| + eps)
    assert float(p.detach()) == pytest.approx(0.1 * 0.4 / (0.4 + 1e-8), rel=1e-14, abs=0)
    assert torch.equal(q.detach(), torch.zeros(3, dtype=F64))  # m = 0: the update is 0, not NaN


# -- the harness ------------------------------------------------------------------------------------
def global_normalized_sgd() -> gc.Transform:
    return gc.chain(gc.trace(0.9), gc.normalize(scope="global"), gc.scale_by_lr(0.05))


CASES = [
    RecipeCase("lamb", partial(recipes.lamb, lr=1e-2)),
    RecipeCase("lamb_clamped", partial(recipes.lamb, lr=1e-2, max_weight_norm=1.0)),
    RecipeCase("gc_adamw", partial(recipes.gc_adamw, lr=1e-2)),
    RecipeCase("nsgda", partial(recipes.nsgda, lr=1e-2)),
    RecipeCase("normalize_global", global_normalized_sgd),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)
