"""Grünwald–Letnikov fractional gradient: weights, memory, the alpha = 1 limit, the drop mask, recipes."""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

from gradchain import ChainOptimizer, fractional, gl_coefficients, gl_weights, recipes


def binom(alpha: float, n: int) -> float:
    """Generalized binomial coefficient C(alpha, n) = alpha (alpha-1) ... (alpha-n+1) / n!."""
    return math.prod(alpha - i for i in range(n)) / math.factorial(n)


@pytest.mark.parametrize("alpha", [0.3, 0.9, 1.0])
def test_weights(alpha) -> None:
    w = gl_weights(alpha, 10)
    # spec recursion: w_0 = 1, w_j = (1 - (alpha+1)/(j+1)) w_{j-1}
    rec = [1.0]
    for j in range(1, 11):
        rec.append((1 - (alpha + 1) / (j + 1)) * rec[-1])
    assert w == pytest.approx(rec, rel=1e-15, abs=0)
    # = textbook GL coefficients a_j = (-1)^j C(alpha, j), shifted by one and normalized by a_1
    a = [(-1) ** j * binom(alpha, j) for j in range(12)]
    assert w[1:] == pytest.approx([a[j + 1] / a[1] for j in range(1, 11)], rel=1e-12, abs=1e-300)
    if alpha < 1:
        assert all(x > y > 0 for x, y in zip(w[1:], w[2:]))  # positive, decaying memory
    else:
        assert w[1:] == [0.0] * 10


def reference(grads: list[torch.Tensor], alpha: float, K: int) -> list[torch.Tensor]:
    """D_t = g_t + sum_{j=1..K} w_j g_{t-j}, missing history = 0 (no disturbance)."""
    w = [1.0]
    for j in range(1, K + 1):
        w.append((1 - (alpha + 1) / (j + 1)) * w[-1])
    out = []
    for t in range(len(grads)):
        d = grads[t].clone()
        for j in range(1, K + 1):
            if t - j >= 0:
                d += w[j] * grads[t - j]
        out.append(d)
    return out


def _grads(n: int, shape=(4, 3)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(*shape, dtype=torch.float64, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("alpha,K", [(0.7, 10), (0.5, 3), (0.95, 1)])
def test_memory_against_reference(alpha, K) -> None:
    gs = _grads(25)
    t = fractional(alpha, K, drop=0)
    p = torch.zeros(4, 3, dtype=torch.float64)
    state = t.init([p])
    for g, want in zip(gs, reference(gs, alpha, K)):
        torch.testing.assert_close(t.update([g], state, [p])[0], want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("drop,per_element", [(0, False), (1, False), (3, True)])
def test_alpha_one_is_plain_gradient(drop, per_element) -> None:
    t = fractional(1.0, 10, drop, per_element=per_element)
    p = torch.zeros(4, 3, dtype=torch.float64)
    state = t.init([p])
    for g in _grads(15):
        assert torch.equal(t.update([g], state, [p])[0], g)


def _terms(gs: list[torch.Tensor], t: int, alpha: float, K: int) -> torch.Tensor:
    w = gl_weights(alpha, K)
    return torch.stack([w[j] * gs[t - j] if t - j >= 0 else torch.zeros_like(gs[0]) for j in range(1, K + 1)])


def test_drop_one_term_per_step() -> None:
    alpha, K = 0.6, 5
    gs = _grads(20)
    t = fractional(alpha, K, drop=1, seed=3)
    p = torch.zeros(4, 3, dtype=torch.float64)
    state = t.init([p])
    dropped = []
    for i, g in enumerate(gs):
        d = t.update([g], state, [p])[0]
        terms = _terms(gs, i, alpha, K)
        missing = g + terms.sum(0) - d  # exactly one memory term is left out
        hits = [j for j in range(K) if torch.allclose(missing, terms[j], rtol=0, atol=1e-13)]
        if i >= K:  # all K terms are non-zero, so the dropped one is identifiable
            assert len(hits) == 1
            dropped.append(hits[0])
    assert len(set(dropped)) > 1  # it is random, not a fixed term


def test_drop_per_element_and_reproducible() -> None:
    alpha, K, drop = 0.6, 4, 2
    gs = _grads(10, shape=(6, 5))
    p = torch.zeros(6, 5, dtype=torch.float64)
    outs = {}
    for seed in (0, 0, 1):
        t = fractional(alpha, K, drop, per_element=True, seed=seed)
        state = t.init([p])
        outs.setdefault(seed, []).append([t.update([g], state, [p])[0] for g in gs])
    i = 8
    d = outs[0][0][i]
    terms = _terms(gs, i, alpha, K)
    kept = d - gs[i]
    # per element, exactly K - drop of the K terms are summed
    combos = torch.stack([terms[list(c)].sum(0) for c in _subsets(K, K - drop)])
    match = (combos - kept).abs() <= 1e-13
    assert bool(match.any(0).all())
    assert not bool(match.all(0).all())  # elements differ in which terms they drop
    assert all(torch.equal(a, b) for a, b in zip(outs[0][0], outs[0][1]))  # same seed, same draws
    assert not torch.equal(outs[0][0][i], outs[1][0][i])


def _subsets(n: int, r: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.combinations(range(n), r))


def test_invalid() -> None:
    with pytest.raises(ValueError, match="history"):
        fractional(0.5, 0)
    with pytest.raises(ValueError, match="drop"):
        fractional(0.5, 3, drop=4)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="frac_alpha"):
        ChainOptimizer(model.parameters(), recipes.fractional_adam(), frac_alpha=1.5)
    with pytest.raises(ValueError, match="frac_alpha"):
        ChainOptimizer(model.parameters(), recipes.fractional_sgd(alpha=0.0))


def test_fractional_sgd_is_plain_sgd_at_alpha_one() -> None:
    torch.manual_seed(0)
    m1 = torch.nn.Linear(5, 3).double()
    m2 = torch.nn.Linear(5, 3).double()
    m2.load_state_dict(m1.state_dict())
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    o2 = ChainOptimizer(m2.parameters(), recipes.fractional_sgd(lr=0.1, alpha=1.0, momentum=0.9, weight_decay=0.01))
    x = torch.randn(16, 5, dtype=torch.float64)
    for i in range(10):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x[i % 2 * 8 :][:8]).pow(2).mean().backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


CASES = [
    RecipeCase(
        "fractional_adam_per_element",
        partial(recipes.fractional_adam, lr=1e-2, alpha=0.7, history=4, drop=2, per_element=True, weight_decay=0.01),
    ),
    RecipeCase("fractional_sgd", partial(recipes.fractional_sgd, lr=0.05, alpha=0.6, history=5, momentum=0.9)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES, steps=4)


# -- the Grünwald–Letnikov convention -------------------------------------------------------------
def gen_binom(q: float, j: int) -> float:
    """C(q, j) for real q through the gamma function (reflection for the poles of Gamma(q - j + 1))."""
    if q == int(q) and q >= 0:
        return float(math.comb(int(q), j)) if j <= q else 0.0
    # Gamma(q+1) / (Gamma(j+1) Gamma(q-j+1)); for q - j + 1 <= 0, Gamma(z) Gamma(1-z) = pi / sin(pi z)
    z = q - j + 1
    if z > 0:
        return math.gamma(q + 1) / (math.factorial(j) * math.gamma(z))
    return math.gamma(q + 1) * math.gamma(1 - z) * math.sin(math.pi * z) / (math.pi * math.factorial(j))


@pytest.mark.parametrize("q", [0.0, 1.0, 2.0, 0.5, -0.5, -0.3, 1.7, -1.4])
def test_gl_coefficients_against_the_binomial_form(q: float) -> None:
    c = gl_coefficients(q, 12)
    want = [(-1) ** j * gen_binom(q, j) for j in range(13)]
    assert c == pytest.approx(want, rel=1e-12, abs=1e-15)
    # and against the product form C(q, j) = q (q-1) ... (q-j+1) / j!
    assert c == pytest.approx([(-1) ** j * binom(q, j) for j in range(13)], rel=1e-12, abs=1e-15)


def test_gl_coefficients_integer_orders() -> None:
    assert gl_coefficients(0.0, 5) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # order 0: the identity
    assert gl_coefficients(1.0, 5) == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0]  # order 1: x_t - x_{t-1}
    assert gl_coefficients(2.0, 4) == [1.0, -2.0, 1.0, 0.0, 0.0]  # order 2: the second difference
    assert all(x > y > 0 for x, y in zip(gl_coefficients(-0.5, 8), gl_coefficients(-0.5, 8)[1:]))
    with pytest.raises(ValueError, match="n="):
        gl_coefficients(0.5, -1)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9, 1.0])
def test_memory_weights_are_gl_of_order_alpha_minus_one(alpha: float) -> None:
    # the convention of fractional(): order alpha - 1 on the gradient history, damped by 1/(j+1);
    # alpha = 1 is order 0 (the identity): plain SGD
    w = gl_weights(alpha, 10)
    c = gl_coefficients(alpha - 1.0, 10)
    assert w == pytest.approx([c[j] / (j + 1) for j in range(11)], rel=1e-12, abs=1e-16)
    assert w == pytest.approx([(-1) ** j * gen_binom(alpha - 1.0, j) / (j + 1) for j in range(11)], rel=1e-12,
                              abs=1e-16)


# -- the fused path: the ring of past gradients compiles once ----------------------------------------
FUSED = {
    "adam_drop": lambda: recipes.fractional_adam(lr=1e-2, alpha=0.7, history=3, drop=1, weight_decay=0.1),
    "sgd_momentum": lambda: recipes.fractional_sgd(lr=0.05, alpha=0.6, history=4, momentum=0.9, weight_decay=0.01),
    "adam_alpha_one": lambda: recipes.fractional_adam(lr=1e-2, alpha=1.0, history=2, drop=0),
}


def _fused_run(name: str, fused: bool, dtype: torch.dtype, steps: int = 9, lr_at: dict | None = None):
    from test_fused import make_params, set_grads

    named = make_params(dtype)
    opt = ChainOptimizer(named, FUSED[name](), fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile that falls back to eager fails here
        for i in range(steps):
            if lr_at and i in lr_at:
                opt.param_groups[0]["frac_alpha"] = lr_at[i]
            set_grads(named, i, dtype)
            opt.step()
    return named, opt


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-14)])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_equals_eager_around_the_ring(name: str, dtype, rtol: float, atol: float) -> None:
    from test_fused import assert_same

    # 9 steps wrap a ring of 2-4 slots twice; alpha moves mid-run (a new value, not a new kernel)
    a = _fused_run(name, False, dtype, lr_at={5: 0.5})
    b = _fused_run(name, True, dtype, lr_at={5: 0.5})
    assert b[1].fused_plan() == [("compiled", [t.name for t in b[1].transform.leaves()])]
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=rtol, atol=atol)


def test_fused_ring_compiles_past_the_first_param_groups() -> None:
    # past STATIC_BUCKETS groups the buckets share a kernel with symbolic sizes, where the ring's
    # length was traced as a symbol and a state key formatted from it failed to trace: a warning and
    # an eager step at every step
    def run(fused: bool):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(4, 3 + i, generator=g, dtype=torch.float64).requires_grad_() for i in range(6)]
        opt = ChainOptimizer([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(ps)],
                             recipes.fractional_sgd(lr=0.05, alpha=0.7, history=3), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for _ in range(5):
                for p in ps:
                    d = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    p.grad = d if p.grad is None else p.grad.copy_(d)
                opt.step()
        return ps

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)


def test_fused_ring_compiles_once_with_inductor(monkeypatch) -> None:
    from test_fused import assert_same

    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "inductor")

    a = _fused_run("adam_drop", False, torch.float32, steps=2)
    b = _fused_run("adam_drop", True, torch.float32, steps=2)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seconds = b[1].compile_seconds
    named_a, opt_a = a
    named_b, opt_b = b
    from test_fused import set_grads

    for i in range(2, 9):  # every slot of the ring is the newest once, and alpha changes
        if i == 5:
            for o in (opt_a, opt_b):
                o.param_groups[0]["frac_alpha"] = 0.4
        for named, opt in (a, b):
            set_grads(named, i, torch.float32)
            opt.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt_b.compile_seconds == seconds
    assert_same(named_a, opt_a, named_b, opt_b, rtol=1e-5, atol=1e-6)


def test_fused_checkpoint_moves_between_paths() -> None:
    from test_fused import assert_same, make_params, set_grads

    def run(first: bool, second: bool):
        named = make_params(torch.float64)
        opt = ChainOptimizer(named, FUSED["adam_drop"](), fused=first)
        for i in range(4):
            set_grads(named, i, torch.float64)
            opt.step()
        other = ChainOptimizer(named, FUSED["adam_drop"](), fused=second)
        other.load_state_dict(opt.state_dict())
        for i in range(4, 8):
            set_grads(named, i, torch.float64)
            other.step()
        return named, other

    assert_same(*run(False, False), *run(True, False), rtol=1e-12, atol=1e-14)
    assert_same(*run(False, False), *run(False, True), rtol=1e-12, atol=1e-14)


def test_per_element_draws_stay_eager_on_the_fused_path() -> None:
    named = [(n, p) for n, p in torch.nn.Linear(4, 3).double().named_parameters()]
    opt = ChainOptimizer(named, recipes.fractional_adam(per_element=True, history=3), fused=True)
    assert opt.fused_plan()[0] == ("eager", ["fractional"])


def test_params_with_their_own_step_counts_read_their_own_slots() -> None:
    # eager: a param without a grad skips a step, so its ring lags the others'; each reads its own
    alpha, K = 0.7, 3
    gs = _grads(12, shape=(4, 3))
    hs = _grads(12, shape=(2,))
    p, q = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True), torch.zeros(2, dtype=torch.float64,
                                                                                  requires_grad=True)
    opt = ChainOptimizer([p, q], gc_chain_identity(alpha, K))
    seen_q = []
    for i in range(12):
        p.grad = gs[i]
        q.grad = hs[i] if i % 3 else None
        if q.grad is not None:
            seen_q.append(hs[i])
        before_p, before_q = p.detach().clone(), q.detach().clone()
        opt.step()
        torch.testing.assert_close(before_p - p.detach(), reference(gs[: i + 1], alpha, K)[-1], rtol=0, atol=1e-12)
        if q.grad is not None:
            torch.testing.assert_close(before_q - q.detach(), reference(seen_q, alpha, K)[-1], rtol=0, atol=1e-12)


def gc_chain_identity(alpha: float, K: int):
    from gradchain import chain, scale_by_lr

    return chain(fractional(alpha, K, drop=0), scale_by_lr(1.0))
