"""The warmup-free spectral bound: power iteration against matrix_norm(ord=2), the cap on a step that
exceeds it (and none on one under it), 1-d params untouched, AdamW^2, bad input, the recipe harness."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, lockstep_gap, make_model

import gradchain as gc
from gradchain import ChainOptimizer, recipes
from gradchain.transforms.spectral import _start_vector, power_iteration

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second intra-op thread only spins, and on a shared CPU that costs seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigma1(x: torch.Tensor) -> float:
    """The exact top singular value (an SVD), conv kernels as (out, in * kernel)."""
    m = x.reshape(x.shape[0], -1) if x.ndim > 2 else x
    return float(torch.linalg.matrix_norm(m, ord=2))


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (1, 7), (7, 1), (16, 16)])
def test_power_iteration_converges_to_the_spectral_norm(shape) -> None:
    m = _randn(*shape, seed=sum(shape))
    v0 = _start_vector(m)
    s, v = power_iteration(m, v0, 400)
    assert float(s) == pytest.approx(sigma1(m), rel=1e-10)
    assert float(v.norm()) == pytest.approx(1.0, rel=1e-12)
    # the estimate is ||M v|| with a unit v: from below, and better with more rounds
    estimates = [float(power_iteration(m, v0, k)[0]) for k in range(6)]
    assert all(e <= sigma1(m) * (1 + 1e-12) for e in estimates)
    assert all(b >= a * (1 - 1e-12) for a, b in zip(estimates, estimates[1:]))


def test_power_iteration_rank_one_and_zero() -> None:
    a, b = _randn(9, seed=1), _randn(5, seed=2)
    m = torch.outer(a, b)
    s, _ = power_iteration(m, _start_vector(m), 1)
    assert float(s) == pytest.approx(float(a.norm() * b.norm()), rel=1e-12)
    z = torch.zeros(4, 6, dtype=F64)
    v0 = _start_vector(z)
    s, v = power_iteration(z, v0, 3)
    assert float(s) == 0.0 and torch.equal(v, v0)  # no NaN: the vector is kept


def test_start_vector_is_fixed() -> None:
    p = torch.empty(6, 3, 2, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a = _start_vector(p)
    torch.manual_seed(2)
    b = _start_vector(p)
    assert torch.equal(a, b) and a.shape == (6,) and a.dtype == torch.float32
    assert float(a.norm()) == pytest.approx(1.0, rel=1e-6)


def _bounded(tau: float, w: torch.Tensor, u: torch.Tensor, iters: int, steps: int = 1) -> torch.Tensor:
    t = gc.spectral_lr_bound(tau, power_iters=iters)
    state = t.init([w])
    for _ in range(steps):
        out = t.update([u], state, [w])[0]
    return out


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (5, 2, 3, 3)])
def test_a_large_step_is_capped_at_tau_sigma_w(shape) -> None:
    tau = 0.05
    w, u = _randn(*shape, seed=3), 10.0 * _randn(*shape, seed=4)
    assert sigma1(u) > tau * sigma1(w)  # the step would exceed the bound
    out = _bounded(tau, w, u, iters=300)
    assert sigma1(out) == pytest.approx(tau * sigma1(w), rel=1e-10)
    assert torch.allclose(out / u, (out / u).flatten()[0].expand_as(u), rtol=1e-12)  # a scalar multiple


def test_the_callers_update_is_never_written() -> None:
    # the bound scales the step in place (no model-sized buffer per step), so a tensor the caller
    # passed in, as a gradient is, must be copied first
    w, u = _randn(12, 8, seed=3), 10.0 * _randn(12, 8, seed=4)
    before = u.clone()
    out = _bounded(0.05, w, u, iters=5)
    assert torch.equal(u, before) and sigma1(out) < 0.1 * sigma1(u)


def test_few_rounds_converge_across_steps() -> None:
    # the default two rounds per step, warm-started from the kept vectors: the same matrices over
    # several steps reach the exact bound (the vectors persist in the state)
    tau = 0.05
    w, u = _randn(16, 12, seed=5), 10.0 * _randn(16, 12, seed=6)
    first = sigma1(_bounded(tau, w, u, iters=2, steps=1))
    later = sigma1(_bounded(tau, w, u, iters=2, steps=300))
    assert later == pytest.approx(tau * sigma1(w), rel=1e-9)
    assert abs(first / (tau * sigma1(w)) - 1) > 1e-6  # one step of two rounds is not yet exact


def test_a_small_step_is_left_alone() -> None:
    w = _randn(12, 8, seed=7)
    u = 1e-3 * _randn(12, 8, seed=8)
    assert sigma1(u) < 0.05 * sigma1(w)
    assert torch.equal(_bounded(0.05, w, u, iters=2), u)


def test_vectors_scalars_and_zero_weights_are_not_bounded() -> None:
    t = gc.spectral_lr_bound(1e-6)
    params = [_randn(5, seed=9), torch.tensor(2.0, dtype=F64), torch.zeros(4, 3, dtype=F64)]
    grads = [1e3 * _randn(5, seed=10), torch.tensor(-7.0, dtype=F64), _randn(4, 3, seed=11)]
    state = t.init(params)
    assert set(state[0]) == {"step"} and set(state[1]) == {"step"}  # no vectors for 1-d, 0-d
    assert set(state[2]) == {"step", "spectral.param_vector", "spectral.update_vector"}
    for u, g in zip(t.update(grads, state, params), grads):
        assert torch.equal(u, g)  # sigma_1(W) = 0 would freeze a zero-initialised matrix: not bounded


def test_adamw_spectral_bounds_every_matrix_step() -> None:
    tau = 0.01
    model = make_model(F64)
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw_spectral(lr=0.5, tau=tau, power_iters=20))
    gen = torch.Generator().manual_seed(0)
    capped = 0
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, y = torch.randn(8, 2, 4, 4, dtype=F64, generator=gen), torch.randn(8, 3, dtype=F64, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                ratio = sigma1(p.detach() - before[n]) / sigma1(before[n])
                assert ratio <= tau * (1 + 1e-6), f"{n}: step/weight spectral ratio {ratio}"
                capped += ratio > tau * (1 - 1e-6)
    assert capped > 0  # lr 0.5 makes the plain AdamW steps exceed the bound


def test_adamw_spectral_with_a_loose_bound_is_adamw() -> None:
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.AdamW(m1.parameters(), lr=0.01, weight_decay=0.05)
    o2 = ChainOptimizer(m2.parameters(), recipes.adamw_spectral(lr=0.01, weight_decay=0.05, tau=1e6))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 6, dtype=F64, generator=g), torch.randn(128, 2, dtype=F64, generator=g)
    assert lockstep_gap((m1, o1, None), (m2, o2, None), x, y, steps=100) <= 1e-12


def test_invalid() -> None:
    with pytest.raises(ValueError, match="power_iters"):
        gc.spectral_lr_bound(power_iters=0)
    with pytest.raises(ValueError, match="power_iters"):
        gc.spectral_lr_bound(power_iters=True)
    with pytest.raises(ValueError, match="spectral_tau"):
        gc.spectral_lr_bound(tau=0.0)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="spectral_tau"):
        ChainOptimizer(model.parameters(), recipes.adamw_spectral(), spectral_tau=-1.0)


CASES = [
    # a tight bound so that it is active in the harness runs (FSDP2 included)
    RecipeCase("adamw_spectral", partial(recipes.adamw_spectral, lr=0.05, tau=0.005)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES, steps=4)
