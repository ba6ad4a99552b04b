"""The spectral bound (AdamW^2) on the fused path: vectors and scalars compile with the chain over a
flat buffer (the bound is the identity there), large matrices one at a time with the whole chain in
one graph, small ones run the bound eagerly; every route equals the eager path (params and state)
with the cap binding, checkpoints cross the paths, a new tau never recompiles."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_fused import assert_same, check_inductor_equals_eager, resume, saved
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from gradchain import ChainOptimizer, recipes
from gradchain.fused import runner

pytestmark = pytest.mark.usefixtures("one_thread")

LR, TAU = 0.1, 1e-3
NAMES = ["adam", "wd", "lr", "spectral"]


def params(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))) for n, s in shapes.items()]


def make(dtype: torch.dtype) -> list[tuple[str, nn.Parameter]]:
    """Matrices of three shapes (a conv kernel among them), a zero-initialised matrix, a vector, a scalar."""
    named = params({"w": (24, 40), "tall": (40, 12), "conv": (6, 3, 3, 3), "zero": (10, 14), "b": (40,), "gain": ()},
                   dtype)
    dict(named)["zero"].data.zero_()
    return named


def grads(named: list, step: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(70 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)


def build(tau: float = TAU, power_iters: int = 2):
    return recipes.adamw_spectral(lr=LR, weight_decay=0.1, tau=tau, power_iters=power_iters)


def sigma1(x: torch.Tensor) -> float:
    m = x.detach().double()
    return float(torch.linalg.matrix_norm(m.reshape(m.shape[0], -1), ord=2))


def run(fused: bool, dtype: torch.dtype, steps: int = 6, named=None, opt=None, caps=None, **kw):
    """``steps`` steps; ``caps`` collects each matrix's ``sigma_1(step) / (tau sigma_1(W))`` per step."""
    named = make(dtype) if named is None else named
    opt = ChainOptimizer(named, build(**kw), fused=fused) if opt is None else opt
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        for i in range(steps):
            grads(named, i, dtype)
            before = {n: p.detach().clone() for n, p in named}
            opt.step()
            if caps is not None:
                tau = opt.param_groups[0]["spectral_tau"]
                caps.append({n: sigma1(p - before[n]) / (tau * sigma1(before[n])) if sigma1(before[n]) else None
                             for n, p in named if p.dim() >= 2})
    return named, opt


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")


@pytest.mark.parametrize("per_tensor", [True, False])
def test_fused_equals_eager_with_the_cap_binding(per_tensor: bool, aot_eager, monkeypatch) -> None:
    # per_tensor: every matrix counts as large and compiles alone; else they run the bound eagerly
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0 if per_tensor else 1 << 40)
    # eagerly bound (on the fused path's eager route): enough rounds that the estimates are close,
    # so the capped step's sigma_1 is tau sigma_1(W) to 2% (AdamW's own steps are ~100 times that).
    # Compiled: the default rounds (25 unrolled rounds per matrix make slow traces); the same math
    iters = 2 if per_tensor else 25
    for dtype, tol in ((torch.float64, (1e-12, 1e-14)), (torch.float32, (1e-5, 1e-6))):
        caps: list = []
        a = run(False, dtype, power_iters=iters)
        b = run(True, dtype, caps=caps, power_iters=iters)
        assert_same(*a, *b, rtol=tol[0], atol=tol[1])
        assert b[1].compile_seconds > 0
        if per_tensor:
            continue
        for step in caps:
            for n, ratio in step.items():
                if ratio is not None:  # every nonzero matrix's step is capped
                    assert ratio == pytest.approx(1.0, rel=0.02), (n, ratio)
        assert caps[0]["zero"] is None and caps[1]["zero"] == pytest.approx(1.0, rel=0.02)
    plan = b[1].fused_plan()
    assert plan[0] == ("compiled", [f"[flat]{n}" for n in NAMES])
    assert plan[1] == ("compiled", [f"[tensor]{n}" for n in NAMES])
    assert plan[2:] == [("compiled", [f"[eager]{n}" for n in NAMES[:3]]), ("eager", ["[eager]spectral"])]
    routes = {key[3][1] for key in b[1]._flats}
    assert routes == ({"flat", "tensor"} if per_tensor else {"flat", "eager"})
    if per_tensor:  # a kernel per matrix shape, each compiled once
        seg = b[1]._fused_chain.chains[(None, "tensor")].segments[0]
        assert {k[1] for k in seg._fns} == {(24, 40), (40, 12), (6, 3, 3, 3), (10, 14)} and not seg._failed


def test_graphs_hold_matrix_products_and_no_host_reads(monkeypatch) -> None:
    # a matrix's graph: 2 x (2 rounds x 2 + 1) matrix products (BLAS calls, not reductions that
    # recompute the update); no graph reads tau back to the host (a device sync per matrix on GPU)
    graphs: list[list[str]] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(runner, "BACKEND", recording)
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    run(True, torch.float64, steps=2)
    products = sorted({sum("method mm " in t for t in g) for g in graphs})
    assert products == [0, 10]  # the flat buffer's graph (the identity) and the matrices'
    assert not any(t in ("item", "tolist") or "_local_scalar_dense" in t for g in graphs for t in g)


def test_a_zero_matrix_takes_the_whole_step(aot_eager, monkeypatch) -> None:
    # sigma_1(W) = 0: the bound leaves the step alone (AdamW's), where a cap would freeze it at 0
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    named, _ = run(True, torch.float64, steps=1)
    ref = make(torch.float64)
    opt = ChainOptimizer(ref, recipes.adamw(lr=LR, weight_decay=0.1))
    grads(ref, 0, torch.float64)
    opt.step()
    zero, want = dict(named)["zero"], dict(ref)["zero"]
    assert float(zero.abs().max()) > 0.05
    torch.testing.assert_close(zero, want, rtol=1e-12, atol=1e-14)
    assert not torch.equal(dict(named)["w"], dict(ref)["w"])  # the other matrices were capped


def test_past_a_few_shapes_one_kernel_takes_any_size(aot_eager, monkeypatch) -> None:
    # symbolic sizes: the power iterations trace for a matrix of any shape
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    monkeypatch.setattr(runner, "PER_TENSOR_STATIC_SHAPES", 1)
    a = run(False, torch.float64, steps=3)
    b = run(True, torch.float64, steps=3)
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    seg = b[1]._fused_chain.chains[(None, "tensor")].segments[0]
    assert ("tensor", 2, torch.float64) in seg._fns and not seg._failed


def test_a_new_tau_takes_effect_without_recompiling(aot_eager, monkeypatch) -> None:
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    a = run(False, torch.float64, steps=2)
    b = run(True, torch.float64, steps=2)
    old = run(False, torch.float64, steps=4)  # the old tau all along
    seconds = b[1].compile_seconds
    for _, opt in (a, b):
        opt.param_groups[0]["spectral_tau"] = 4 * TAU
    run(False, torch.float64, steps=2, named=a[0], opt=a[1])
    run(True, torch.float64, steps=2, named=b[0], opt=b[1])
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)  # the kernel applies the new tau as the eager path does
    assert b[1].compile_seconds == seconds
    assert not torch.allclose(dict(old[0])["w"], dict(b[0])["w"])  # and the new tau did change the steps


@pytest.mark.parametrize("per_tensor", [True, False])
def test_checkpoints_cross_paths(per_tensor: bool, aot_eager, monkeypatch) -> None:
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0 if per_tensor else 1 << 40)
    monkeypatch.setattr("test_fused.make_params", make)
    a = run(False, torch.float64, steps=3)
    b = run(True, torch.float64, steps=3)
    assert set(b[1].state[dict(b[0])["conv"]]) == {"step", "adam.exp_avg", "adam.exp_avg_sq",
                                                   "spectral.param_vector", "spectral.update_vector"}
    # eager -> fused, fused -> eager, fused -> fused: each continues as the eager run does
    for source, fused in ((a, True), (b, False), (b, True)):
        named, opt = resume(source[0], saved(source[1]), build, fused)
        ref_named, ref_opt = resume(a[0], saved(a[1]), build, False)
        run(fused, torch.float64, steps=3, named=named, opt=opt)
        run(False, torch.float64, steps=3, named=ref_named, opt=ref_opt)
        assert_same(ref_named, ref_opt, named, opt, rtol=1e-12, atol=1e-14)


def test_inductor_kernels_equal_eager(monkeypatch) -> None:
    # inductor's own code: the Adam step, the power iterations' matrix products, the capped write
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 300)  # w compiles alone, the small matrix is eager
    monkeypatch.setattr("test_fused_spectral.make",
                        lambda dtype: params({"w": (24, 40), "small": (5, 7), "b": (40,)}, dtype, seed=1))

    def run_fn(name: str, fused: bool, dtype: torch.dtype, steps: int):
        caps: list = []
        out = run(fused, dtype, steps=steps, caps=caps, power_iters=25)
        assert all(r == pytest.approx(1.0, rel=0.02) for step in caps for r in step.values())
        return out

    b = check_inductor_equals_eager(run_fn, "adamw_spectral", monkeypatch, steps=3)
    assert {key[3][1] for key in b[1]._flats} == {"flat", "tensor", "eager"}
    assert not b[1]._fused_chain.chains[(None, "tensor")].segments[0]._failed
