"""The fused path (``ChainOptimizer(fused=True)``): flat buffers and compiled segments.

Every recipe's fused trajectory equals its eager one (params and state) in float64 and float32;
checkpoints move between the paths; grads are views that zero_grad zeroes in place; a new lr or a
new step never recompiles. Most checks trace with the ``aot_eager`` backend (the same graphs,
no code generation, so the suite stays fast: see conftest.py); a few run the real inductor kernels.
"""

from __future__ import annotations

import copy
import io
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gradchain as gc
from gradchain import recipes
from gradchain.fused import runner
from gradchain.fused.flat import CHUNK, FlatBucket
from gradchain.testing import _variants

RECIPES = sorted(n for n in recipes.__all__ if n != "muon_hidden_matrix")
# recipes that wrap another
FACTORIES = {"lookahead": lambda: recipes.lookahead(recipes.adamw())}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12, 5)
        self.norm = nn.LayerNorm(5)
        self.gain = nn.Parameter(torch.tensor(1.5))


def make_params(dtype: torch.dtype, seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    torch.manual_seed(seed)
    return [(n, p) for n, p in Net().to(dtype).named_parameters()]


def set_grads(named: list, step: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)


def run(name: str, fused: bool, dtype: torch.dtype, steps: int = 6, **kw):
    named = make_params(dtype)
    factory = FACTORIES[name] if name in FACTORIES else getattr(recipes, name)
    opt = gc.ChainOptimizer(named, factory(), fused=fused, **kw)
    for i in range(steps):
        set_grads(named, i, dtype)
        opt.step(loss=torch.tensor(1.0 / (i + 2)))
    return named, opt


def assert_same(a_named, a_opt, b_named, b_opt, rtol: float, atol: float) -> None:
    for (n, a), (_, b) in zip(a_named, b_named):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        sa, sb = a_opt.state[a], b_opt.state[b]
        assert set(sa) == set(sb), n
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol,
                                           msg=lambda m, n=n, k=k: f"{n} {k}: {m}")
    # optimizer-level state (Prodigy's d and its sums)
    assert set(a_opt.global_state) == set(b_opt.global_state)
    for k, v in a_opt.global_state.items():
        torch.testing.assert_close(b_opt.global_state[k], v, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def check_inductor_equals_eager(run_fn, name: str, monkeypatch, steps: int):
    """``run_fn(name, fused, dtype, steps=)`` with inductor's real kernels: float32 to a few ulps of eager."""
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    a = run_fn(name, False, torch.float32, steps=steps)
    b = run_fn(name, True, torch.float32, steps=steps)
    assert b[1].compile_seconds > 0  # the compiled kernel ran, not the eager fallback
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)
    return b


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_fused_equals_eager_float64(name: str, chunked: bool, aot_eager, monkeypatch) -> None:
    if chunked:  # the layout of buckets past SEGMENT_UNROLL tensors: params on rows, gaps between
        monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = run(name, False, torch.float64)
        b = run(name, True, torch.float64)
    # the same math in float64; only the order of scalar products may differ
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "sgd", "nadam", "lamb", "cautious_adamw", "adafactor"])
def test_fused_equals_eager_float32(name: str, aot_eager) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        a = run(name, False, torch.float32)
        b = run(name, True, torch.float32)
    # fp32: a few ulps of difference from the order of scalar products, over 6 steps
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [None, 7])
@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_lookahead_compiles_its_inner_chain(pullback: str, block: int | None, aot_eager, monkeypatch) -> None:
    if block is not None:  # the sync over the flat buffers in blocks: several per tensor, a short last one
        monkeypatch.setattr(gc.base, "WRITE_BLOCK", block)
    FACTORIES["lookahead_pb"] = lambda: recipes.lookahead(recipes.adamw(lr=0.1), k=3, alpha=0.5,
                                                          pullback_momentum=pullback)
    try:
        a = run("lookahead_pb", False, torch.float64, steps=8)
        b = run("lookahead_pb", True, torch.float64, steps=8)
    finally:
        del FACTORIES["lookahead_pb"]
    # the inner AdamW is one kernel; the sync every k steps runs over the flat buffers
    assert b[1].fused_plan() == [("compiled", ["adam", "wd", "lr"]), ("eager", ["lookahead"])]
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


def test_renamed_static_hyperparameters_compile(aot_eager) -> None:
    # static keys reach the kernel by their group key, also after a rename (adamw_eps_root)
    FACTORIES["renamed"] = lambda: recipes.adamw(amsgrad=True).renamed({"eps_root": "a_eps_root", "amsgrad": "a_ams"})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
            a = run("renamed", False, torch.float64)
            b = run("renamed", True, torch.float64)
    finally:
        del FACTORIES["renamed"]
    assert b[1].compile_seconds > 0 and "adam.max_exp_avg_sq" in b[1].state[b[0][0][1]]
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


def test_partition_compiles_each_label(aot_eager) -> None:
    # Muon: the matrices and the rest are flat buckets of their own, each with its segments: AdamW's
    # compiled; the matrices' momentum joins the eager Newton-Schulz, which steps each tensor alone
    # (per_tensor), so that on a CPU the segment runs in pieces and keeps no buffer between them
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        a = run("muon", False, torch.float32)
        b = run("muon", True, torch.float32)
    plan = b[1].fused_plan()
    assert plan == [("eager", ["muon/momentum", "muon/orthogonalize", "muon/shape_scale", "muon/wd", "muon/lr"]),
                    ("compiled", ["adamw/adam", "adamw/wd", "adamw/lr"])]
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)
    # a checkpoint of the fused run resumes on the eager path
    named = make_params(torch.float32)
    eager = gc.ChainOptimizer(named, recipes.muon())
    eager.load_state_dict(b[1].state_dict())
    for (_, p), (_, q) in zip(named, b[0]):
        p.data.copy_(q.detach())
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    eager.step()
    b[1].step()
    assert_same(b[0], b[1], named, eager, rtol=1e-5, atol=1e-6)


def test_masked_routes_each_selection(aot_eager) -> None:
    # a top-level mask splits the params: the selected ones get the chain with the masked transform
    # in its place, the others the chain without it; both compile, state stays per param
    def chain():
        return gc.chain(gc.scale_by_adam(), gc.masked(gc.add_decoupled_wd(0.1), lambda n, p: p.ndim >= 2),
                        gc.masked(gc.trace(0.9), "fc.*"), gc.scale_by_lr(1e-2))

    def go(fused: bool):
        named = make_params(torch.float64)
        opt = gc.ChainOptimizer(named, chain(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for i in range(5):
                set_grads(named, i, torch.float64)
                opt.step()
        return named, opt

    a, b = go(False), go(True)
    plan = b[1].fused_plan()
    assert ("compiled", ["+wd,+momentum/adam", "+wd,+momentum/wd", "+wd,+momentum/momentum",
                         "+wd,+momentum/lr"]) in plan
    assert ("compiled", ["-wd,-momentum/adam", "-wd,-momentum/lr"]) in plan
    assert b[1].compile_seconds > 0
    # the momentum's state only where its mask selects (fc.weight, fc.bias)
    assert [n for n, p in b[0] if "momentum.buffer" in b[1].state[p]] == ["fc.weight", "fc.bias"]
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


def test_masked_over_a_global_transform_is_not_routed(aot_eager) -> None:
    # a global norm sums over every param: routed apart, each route would see only its own share
    t = gc.chain(gc.scale_by_adam(), gc.masked(gc.clip_by_global_norm(0.1), lambda n, p: p.ndim >= 2))
    assert not isinstance(runner.fused_chain(t), runner.FusedRoutes)
    t = gc.chain(gc.clip_by_global_norm(0.1), gc.masked(gc.add_decoupled_wd(0.1), lambda n, p: p.ndim >= 2))
    assert not isinstance(runner.fused_chain(t), runner.FusedRoutes)


@pytest.mark.parametrize("name", ["lamb", "cautious_adamw", "nsgda"])
def test_chunked_bucket_gaps_never_reach_the_params(name: str, aot_eager, monkeypatch) -> None:
    # many tensors: each param starts a row of CHUNK elements; the gaps between them are masked
    # out of every per-tensor reduction, so even NaN written there changes nothing
    monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    a = run(name, False, torch.float64)
    named = make_params(torch.float64)
    opt = gc.ChainOptimizer(named, recipes.__dict__[name](), fused=True)
    for i in range(6):
        set_grads(named, i, torch.float64)
        opt.step(loss=torch.tensor(1.0 / (i + 2)))
        (fb,) = opt._flats.values()
        assert fb.chunked and fb.total % CHUNK == 0 and fb.total > sum(fb.numels)
        gaps = torch.ones(fb.total, dtype=torch.bool)
        for o, n in zip(fb.offsets, fb.numels):
            gaps[o : o + n] = False
        for buf in (fb.flat_params, fb.flat_grads, *fb.flat_state.values()):
            if buf.numel() == fb.total:
                buf[gaps] = float("nan")
    assert_same(*a, named, opt, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lamb", "adanorm", "cautious_adamw"])
def test_inductor_chunked_reductions_equal_eager(name: str, monkeypatch) -> None:
    # many tensors: per-tensor norms, sums and factors through the rows of a chunked bucket
    monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    b = check_inductor_equals_eager(run, name, monkeypatch, steps=4)
    assert b[1].fused_plan()[0][0] == "compiled"


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "cautious_adamw"])
def test_inductor_kernels_equal_eager(name: str, monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    kw = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    named_a = make_params(torch.float32)
    named_b = make_params(torch.float32)
    oa = gc.ChainOptimizer(named_a, getattr(recipes, name)(**kw))
    ob = gc.ChainOptimizer(named_b, getattr(recipes, name)(**kw), fused=True)
    for i in range(4):
        set_grads(named_a, i, torch.float32)
        set_grads(named_b, i, torch.float32)
        oa.step()
        ob.step()
    assert ob.fused_plan() == [("compiled", [t.name for t in ob.transform.leaves()])]
    assert ob.compile_seconds > 0
    assert_same(named_a, oa, named_b, ob, rtol=1e-5, atol=1e-6)


def test_flat_views_and_zero_grad_in_place(aot_eager) -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)
    set_grads(named, 0, torch.float32)
    opt.step()
    (fb,) = opt._flats.values()
    grads = [p.grad for _, p in named]
    for (_, p), view in zip(named, fb.grad_views):
        assert p.grad is view and p.untyped_storage().data_ptr() == fb.flat_params.untyped_storage().data_ptr()
        assert opt.state[p]["adam.exp_avg"].untyped_storage().data_ptr() == \
            fb.flat_state["adam.exp_avg"].untyped_storage().data_ptr()
    opt.zero_grad()
    assert all(p.grad is g for (_, p), g in zip(named, grads))
    assert float(fb.flat_grads.abs().sum()) == 0.0
    # backward accumulates into the views
    loss = sum((p.float() ** 2).sum() for _, p in named)
    loss.backward()
    assert all(p.grad is g for (_, p), g in zip(named, grads))
    torch.testing.assert_close(named[0][1].grad, 2 * named[0][1].detach())


def test_new_grad_tensors_are_copied_in(aot_eager) -> None:
    # set_grads assigns fresh tensors every step (as zero_grad(set_to_none=True) + backward does)
    a = run("adamw", False, torch.float64)
    b = run("adamw", True, torch.float64)
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    named, opt = b
    (fb,) = opt._flats.values()
    assert all(p.grad is v for (_, p), v in zip(named, fb.grad_views))



def test_grads_copied_in_step_after_step_warn_once(aot_eager) -> None:
    named = make_params(torch.float64)
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(gc.optimizer.COPIED_GRADS_WARN_STEPS - 1):  # the first copy makes the flat buffer
            set_grads(named, i, torch.float64)
            opt.step()
        assert not [w for w in caught if w.category is gc.FusedGradientCopyWarning]
        # grads reset in place between steps (opt.zero_grad()) stay views: no copy, the count restarts
        for _ in range(3):
            opt.zero_grad()
            for _, p in named:
                p.grad.add_(1.0)
            opt.step()
        assert not [w for w in caught if w.category is gc.FusedGradientCopyWarning]
        for i in range(2 * gc.optimizer.COPIED_GRADS_WARN_STEPS):  # as after model.zero_grad() + backward
            set_grads(named, i, torch.float64)
            opt.step()
    mine = [w for w in caught if w.category is gc.FusedGradientCopyWarning]
    assert len(mine) == 1 and "zero_grad()" in str(mine[0].message)


def test_grads_with_a_graph_are_copied_with_a_warning_that_names_create_graph(aot_eager) -> None:
    # backward(create_graph=True) (a gradient penalty, second-order methods): autograd adds each new
    # gradient out of place, so p.grad is a new tensor at every step even after opt.zero_grad()
    x = torch.randn(16, 8, dtype=torch.float64)
    runs = []
    for fused in (False, True):
        net = _mlp()
        opt = gc.ChainOptimizer(net.parameters(), recipes.adamw(), fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(gc.optimizer.COPIED_GRADS_WARN_STEPS + 2):
                net(x).pow(2).mean().backward(create_graph=True)
                opt.step()
                opt.zero_grad()
        runs.append((list(net.named_parameters()), opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    (mine,) = [str(w.message) for w in caught if w.category is gc.FusedGradientCopyWarning]
    assert "create_graph=True" in mine and "fused=False" in mine and "this optimizer's zero_grad()" not in mine


@pytest.mark.parametrize("name", ["adamw", "am_sgd"])  # AM-SGD: a phased transform, one beta for all
def test_param_without_grad_keeps_the_eager_trajectory(name: str, aot_eager) -> None:
    # small params (and a 0-d one): once their step counts differ, AdamW's kernels read a step count
    # per param and AM-SGD's bucket steps eagerly, each as the eager path steps
    results = []
    for fused in (False, True):
        named = make_params(torch.float64)
        opt = gc.ChainOptimizer(named, getattr(recipes, name)(), fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(5):
                set_grads(named, i, torch.float64)
                if i == 2:
                    named[1][1].grad = None  # conv bias: no grad this step
                opt.step()
        results.append((named, opt, caught))
    (a, oa, _), (b, ob, caught) = results
    assert_same(a, oa, b, ob, rtol=1e-12, atol=1e-14)
    assert float(ob.state[b[1][1]]["step"]) == 4.0 and float(ob.state[b[0][1]]["step"]) == 5.0
    # the warning says why and how to stay fused
    assert any("different numbers of steps" in str(w.message) and "opt.zero_grad()" in str(w.message)
               for w in caught)
    assert ob.compile_seconds > 0  # the first steps were fused
    assert any("runs on the eager path" in str(w.message) for w in caught) == (name == "am_sgd")


def _uneven_run(name: str, fused: bool, skip: int = 2, steps: int = 6):
    """``name``'s trajectory over the test net, one param without a grad at step ``skip``."""
    named = make_params(torch.float64)
    opt = gc.ChainOptimizer(named, FACTORIES[name]() if name in FACTORIES else getattr(recipes, name)(), fused=fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            set_grads(named, i, torch.float64)
            if i == skip:
                named[1][1].grad = None  # conv bias: skipped, one step behind from then on
                flats = dict(opt._flats)
            opt.step(loss=torch.tensor(1.0 / (i + 2)))
    # the step without a grad was an eager step over the same flat buffers: none made again
    assert opt._flats == flats
    return named, opt, [str(w.message) for w in caught]


# NAdam: per-param 0-d state; LAMB: per-tensor norms; Adafactor and SMMF: routed by shape (a kernel
# per large param); schedule-free and Amos: per-tensor state advanced by the step; Muon: its
# matrices eager; a bucket of more than 32 params is laid out in rows (chunked)
@pytest.mark.parametrize("chunked", [False, True], ids=["slices", "rows"])
@pytest.mark.parametrize("name", ["adamw", "nadam", "lamb", "adafactor", "smmf", "schedule_free_adamw", "sgd",
                                  "amos", "cautious_adamw", "muon"])
def test_uneven_steps_keep_one_kernel(name: str, chunked: bool, aot_eager, monkeypatch) -> None:
    # params whose step counts differ (one was skipped without a grad) keep the fused path: the
    # kernels read a step count per param, a vector broadcast per param (not a kernel per param)
    if chunked:
        monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    per_param = []
    monkeypatch.setattr(runner.FusedChain, "_run_per_tensor",
                        _recording(runner.FusedChain._run_per_tensor, per_param))
    a, oa, _ = _uneven_run(name, fused=False)
    b, ob, messages = _uneven_run(name, fused=True)
    assert_same(a, oa, b, ob, rtol=1e-12, atol=1e-14)
    assert float(ob.state[b[1][1]]["step"]) == 5.0 and float(ob.state[b[0][1]]["step"]) == 6.0
    assert any(fb.uneven for fb in ob._flats.values())
    assert not any("runs on the eager path" in m for m in messages)
    assert sum("a step count per param" in m for m in messages) >= 1
    # a segment runs per param only where it did with even counts (Adafactor's large matrices)
    assert all(seg.per_tensor for seg in per_param)


def _recording(method, calls: list):
    def run(self, seg, *args, **kwargs):
        calls.append(seg)
        return method(self, seg, *args, **kwargs)

    return run


def test_params_without_grads_for_a_few_steps_leave_the_bucket(aot_eager) -> None:
    # a layer frozen for good (its grads None from step 2 on): eager steps over the same flat
    # buffers at first, then the bucket is made again without it, one kernel with even steps
    runs = []
    for fused in (False, True):
        named = make_params(torch.float64)
        opt = gc.ChainOptimizer(named, recipes.adamw(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(8):
                set_grads(named, i, torch.float64)
                if i >= 2:
                    named[0][1].grad = None  # the conv weight
                opt.step()
        runs.append((named, opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    named, opt = runs[1]
    (fb,) = opt._flats.values()
    assert len(fb.params) == len(named) - 1 and not fb.uneven
    assert float(opt.state[named[0][1]]["step"]) == 2.0 and float(opt.state[named[1][1]]["step"]) == 8.0


def test_zero_grad_resets_a_grad_that_was_not_copied_in(aot_eager) -> None:
    # model.zero_grad() drops the grads; the next backward misses one param (an unused branch), so
    # the step is an eager one over the flat buffers and the new grads are not copied in; the
    # optimizer's zero_grad() must still reset them, or the next backward adds to them
    x = torch.randn(16, 8, dtype=torch.float64)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        a, b = nn.Linear(8, 8).double(), nn.Linear(8, 3).double()
        opt = gc.ChainOptimizer([*a.parameters(), *b.parameters()], recipes.adamw(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(5):
                if i == 1:
                    a.zero_grad()
                    b.zero_grad()
                out = b(x) if i == 1 else b(torch.tanh(a(x)))  # step 1: the first layer unused
                out.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                assert all(p.grad is None or not p.grad.any() for p in [*a.parameters(), *b.parameters()])
        runs.append(([*a.named_parameters(), *b.named_parameters()], opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)


def _mlp() -> nn.Sequential:
    """Two seeded float64 linear layers: the model of the zero_grad and freezing tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()


@pytest.mark.parametrize("name", ["adamw", "lamb", "prodigy"])
def test_a_group_no_backward_reached_since_zero_grad_is_not_stepped(name: str, aot_eager) -> None:
    # after zero_grad() (torch: grads None), a step with no backward, or a group the loss did not
    # reach (a backbone under no_grad while the head warms up), skips those params as torch does;
    # the fused path's kept zero grads would have moved them (weight decay, momentum, step counts)
    x = torch.randn(16, 8, dtype=torch.float64)
    runs = []
    for fused in (False, True):
        net = _mlp()
        opt = gc.ChainOptimizer([{"params": net[0].parameters()}, {"params": net[2].parameters()}],
                                getattr(recipes, name)(), fused=fused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(10):
                if i in (2, 3):
                    before = [p.detach().clone() for p in net.parameters()]
                    opt.step()  # no backward since zero_grad()
                    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
                elif 4 <= i < 8:
                    with torch.no_grad():
                        features = torch.tanh(net[0](x))
                    net[2](features).pow(2).mean().backward()  # the first group is not reached
                    opt.step()
                else:
                    net(x).pow(2).mean().backward()
                    opt.step()
                opt.zero_grad()
        runs.append((list(net.named_parameters()), opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    named, opt = runs[1]
    assert [float(opt.state[p]["step"]) for _, p in named] == [4.0, 4.0, 8.0, 8.0]
    assert opt.compile_seconds > 0
    assert not [w for w in caught if "eager path" in str(w.message)]  # each group skipped whole: counts stay even


@pytest.mark.parametrize("name", ["adamw", "lamb", "prodigy"])
def test_a_layer_frozen_mid_run_is_not_stepped(name: str, aot_eager) -> None:
    # requires_grad_(False) mid-run (before or after zero_grad()): torch's zero_grad() drops the
    # frozen layer's grads and the step skips it; the fused path's kept zero grads would go on moving
    # it (weight decay, momentum), so they are dropped too; unfrozen, it is stepped again
    runs = []
    x = torch.randn(16, 8, dtype=torch.float64)
    for fused in (False, True):
        net = _mlp()
        opt = gc.ChainOptimizer(net.parameters(), getattr(recipes, name)(), fused=fused)
        frozen_at = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(9):
                if i == 2:
                    net[0].requires_grad_(False)  # after the last zero_grad()
                if i == 6:
                    net[0].requires_grad_(True)
                if i == 2 or i == 5:
                    frozen_at[i] = net[0].weight.detach().clone()
                net(x).pow(2).mean().backward()
                if i == 2:
                    net[0].bias.grad = torch.ones_like(net[0].bias)  # given by hand while frozen: stepped
                opt.step()
                if i == 3:
                    net[2].weight.requires_grad_(False)  # before the next zero_grad()
                opt.zero_grad()
                if i == 4:
                    net[2].weight.requires_grad_(True)
        # the first layer did not move while frozen (steps 2-5)
        assert torch.equal(frozen_at[2], frozen_at[5])
        runs.append((list(net.named_parameters()), opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    named, opt = runs[1]
    assert float(opt.state[named[0][1]]["step"]) == 9.0 - 4 and float(opt.state[named[2][1]]["step"]) == 9.0 - 1
    assert float(opt.state[named[1][1]]["step"]) == 9.0 - 3
    assert opt.compile_seconds > 0


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_grads_written_where_the_version_cannot_see_are_stepped(name: str, aot_eager) -> None:
    # a layer frozen between backward and step (a callback), and grads written through .data after
    # zero_grad() (a hand all-reduce): torch (set_to_none=False) and the eager path step them; the
    # fused path read them as unwritten zero grads and dropped them, skipping the step (no error)
    x = torch.randn(16, 8, dtype=torch.float64)
    runs = []
    for fused in (False, True):
        net = _mlp()
        opt = gc.ChainOptimizer(net.parameters(), getattr(recipes, name)(), fused=fused)
        moved = []
        for i in range(6):
            before = net[0].weight.detach().clone()
            if i in (2, 3):
                grads = torch.autograd.grad(net(x).pow(2).mean(), list(net.parameters()))
                if opt.param_groups[0]["params"][0].grad is None:  # (eager: zero_grad() left None)
                    for p in net.parameters():
                        p.grad = torch.zeros_like(p)
                for p, g in zip(net.parameters(), grads):
                    p.grad.data.copy_(g)
            else:
                net(x).pow(2).mean().backward()
            if i == 4:
                net[0].requires_grad_(False)
            opt.step()
            moved.append(not torch.equal(before, net[0].weight))
            opt.zero_grad()
            net[0].requires_grad_(True)
        assert all(moved)
        runs.append((list(net.named_parameters()), opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    named, opt = runs[1]
    assert all(float(opt.state[p]["step"]) == 6.0 for _, p in named)


@pytest.mark.parametrize("name", ["prodigy", "lookahead", "fractional_adam", "adalo"])
def test_uneven_steps_fall_back_where_a_transform_needs_one_step(name: str, aot_eager, monkeypatch) -> None:
    # a reduction over every bucket (Prodigy), a wrapper's sync (Lookahead), host values of the
    # step (the fractional ring) or a factor from the loss (AdaLo): the bucket steps eagerly
    a, oa, _ = _uneven_run(name, fused=False)
    b, ob, messages = _uneven_run(name, fused=True)
    assert_same(a, oa, b, ob, rtol=1e-12, atol=1e-14)
    assert not ob._fused_chain.takes_uneven_steps
    assert any("runs on the eager path" in m and "different numbers of steps" in m for m in messages)


def test_uneven_steps_from_a_checkpoint_run_fused(aot_eager, monkeypatch) -> None:
    # a checkpoint whose params have taken different numbers of steps flattens and steps fused
    a, oa, _ = _uneven_run("adamw", fused=False, steps=4)
    b, ob = resume(a, saved(oa), recipes.adamw, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(4, 7):
            set_grads(a, i, torch.float64)
            set_grads(b, i, torch.float64)
            oa.step()
            ob.step()
    assert_same(a, oa, b, ob, rtol=1e-12, atol=1e-14)
    (fb,) = ob._flats.values()
    assert fb.uneven and ob.compile_seconds > 0


@pytest.mark.parametrize("name", ["adamw", "muon", "sm3"])  # unrouted; routed by partition; routed by shape
@pytest.mark.parametrize("events", [{3: "no grad"}, {5: "new grad", 6: "rebound data"}])
def test_kept_split_sees_every_change(events: dict, name: str, aot_eager) -> None:
    # the fused path reuses the last step's split (and its split by route) while params, grads and
    # state dicts stay the same objects (backward accumulating into the flat views); a grad gone
    # for a step, a new grad tensor and a rebound p.data must each be seen, with the trajectory
    # the eager path's
    results = []
    for fused in (False, True):
        named = make_params(torch.float64)
        ps = [p for _, p in named]
        opt = gc.ChainOptimizer(named, getattr(recipes, name)(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the step without a grad warns on the fused path
            for i in range(9):
                g = torch.Generator().manual_seed(100 + i)
                for p in ps:
                    d = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    if p.grad is None:
                        p.grad = d
                    else:
                        p.grad.copy_(d)
                event = events.get(i)
                if event == "no grad":
                    ps[1].grad = None
                elif event == "new grad":
                    ps[2].grad = ps[2].grad.clone()
                elif event == "rebound data":
                    ps[0].data = ps[0].data.clone()
                opt.step()
        results.append((named, opt))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)
    named, opt = results[1]
    assert opt._collected_again(0, opt.param_groups[0]["params"]) is not None
    # the steps since the last change took the fast path in every bucket, routed ones included
    assert set(opt._checked) == set(opt._flats) and len(opt._flats) == (1 if name == "adamw" else 2)
    grads = {id(p): p.grad for _, p in named}
    for fb in opt._flats.values():
        assert fb.intact() and all(grads[id(p)] is v for p, v in zip(fb.params, fb.grad_views))


def test_kept_split_sees_a_replaced_state_dict(aot_eager) -> None:
    # the state's entries are compared by identity in order (no tensor hashing): a param's state
    # dict replaced, or a new param's state made, is a new split, checked in full again (and the
    # flat bucket is made again from the new dict, which then holds the views)
    named = make_params(torch.float32)
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)

    def step(i: int) -> None:  # backward accumulating into the flat views, as in training
        g = torch.Generator().manual_seed(100 + i)
        for p in ps:
            d = torch.randn(p.shape, generator=g)
            p.grad = d if p.grad is None else p.grad.copy_(d)
        opt.step()

    for i in range(3):
        step(i)
    assert opt._collected_again(0, ps) is not None and opt._checked
    opt.state[ps[1]] = dict(opt.state[ps[1]])
    assert opt._collected_again(0, ps) is None
    opt._collect()
    assert not opt._checked  # the flat bucket's checks run in full on this step
    step(3)
    (fb,) = opt._flats.values()
    assert fb.states[1] is opt.state[ps[1]] and opt.state[ps[1]]["step"] is fb.step_views[1]
    step(4)
    assert opt._collected_again(0, ps) is not None and opt._checked
    del opt.state[ps[0]]
    opt.state[ps[0]] = {}
    assert opt._collected_again(0, ps) is None


def test_a_new_grad_is_not_kept_after_it_is_copied_in(aot_eager) -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)
    set_grads(named, 0, torch.float32)
    opt.step()
    set_grads(named, 1, torch.float32)
    fresh = weakref.ref(named[0][1].grad)
    opt.step()
    assert fresh() is None


def _accepted_changes(name: str) -> dict:
    """Another value for every number hyperparameter of ``name`` that an eager optimizer takes mid-run
    and that keeps the params finite (Newton-Schulz coefficients scaled by 1.5 diverge), each tried on
    a copy of a run one step in, on top of the values kept before it."""
    named = make_params(torch.float64)
    factory = FACTORIES[name] if name in FACTORIES else getattr(recipes, name)
    opt = gc.ChainOptimizer(named, factory())
    set_grads(named, 0, torch.float64)
    opt.step(loss=torch.tensor(0.5))
    changes: dict = {}
    for key, value in list(opt.defaults.items()):
        for _, new in _variants(key, value):
            trial = copy.deepcopy(opt)
            trial.param_groups[0].update(changes, **{key: new})
            params = trial.param_groups[0]["params"]
            set_grads(list(enumerate(params)), 1, torch.float64)
            try:
                trial.step(loss=torch.tensor(0.4))
            except ValueError:
                continue
            if all(bool(p.isfinite().all()) for p in params):
                changes[key] = new
                break
    return changes


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_fused_follows_hyperparameter_changes_float64(name: str, aot_eager) -> None:
    # a value the compiled graph took as a constant, or read once, would keep its old value here
    changes = _accepted_changes(name)
    assert changes, "no hyperparameter could change"
    runs = []
    for fused in (False, True):
        named = make_params(torch.float64)
        factory = FACTORIES[name] if name in FACTORIES else getattr(recipes, name)
        opt = gc.ChainOptimizer(named, factory(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for i in range(6):
                if i == 3:
                    opt.param_groups[0].update(changes)
                set_grads(named, i, torch.float64)
                opt.step(loss=torch.tensor(1.0 / (i + 2)))
        runs.append((named, opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
    unchanged, _ = run(name, False, torch.float64)
    assert any(not torch.equal(p, q) for (_, p), (_, q) in zip(unchanged, runs[0][0])), "the changes changed nothing"


def test_scheduler_and_new_steps_do_not_recompile() -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    set_grads(named, 0, torch.float32)
    opt.step()
    sched.step()
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seconds = opt.compile_seconds
    for i in range(1, 8):
        set_grads(named, i, torch.float32)
        opt.step()
        sched.step()  # moves lr and beta1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    assert opt.compile_seconds == seconds



def test_hyperparameters_set_between_steps_take_effect(aot_eager) -> None:
    # an unchanged value keeps its 0-d tensor from step to step; a changed one is made anew
    plan = [{"lr": 1e-2}, {}, {"lr": 3e-3, "betas": (0.8, 0.99)}, {}, {"weight_decay": 0.0}, {"weight_decay": 0.3}]
    runs = []
    for fused in (False, True):
        named = make_params(torch.float64)
        opt = gc.ChainOptimizer(named, recipes.adamw(), fused=fused)
        for i, change in enumerate(plan):
            opt.param_groups[0].update(change)
            set_grads(named, i, torch.float64)
            opt.step()
        runs.append((named, opt))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-15)
    # and the last values are what the compiled code read: a step with lr 0 moves nothing
    named, opt = runs[1]
    opt.param_groups[0].update(lr=0.0)
    before = [p.detach().clone() for _, p in named]
    set_grads(named, 9, torch.float64)
    opt.step()
    assert all(torch.equal(p.detach(), b) for (_, p), b in zip(named, before))


def saved(opt: gc.ChainOptimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def resume(source: list, state: bytes, build, fused: bool, dtype: torch.dtype = torch.float64):
    """A new optimizer over copies of ``source``'s param values, loaded from a saved state dict."""
    named = make_params(dtype)
    for (_, p), (_, q) in zip(named, source):
        p.data.copy_(q.detach())
    opt = gc.ChainOptimizer(named, build(), fused=fused)
    opt.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return named, opt


def test_checkpoints_move_between_paths(aot_eager) -> None:
    a_named, a_opt = run("adamw", False, torch.float64, steps=3)
    # eager -> fused
    named, opt = resume(a_named, saved(a_opt), recipes.adamw, fused=True)
    for i in range(3, 6):
        set_grads(named, i, torch.float64)
        set_grads(a_named, i, torch.float64)
        opt.step()
        a_opt.step()
    assert_same(a_named, a_opt, named, opt, rtol=1e-12, atol=1e-14)
    # fused -> eager, and bit-exact resume within the fused path
    state = saved(opt)
    for fused in (False, True):
        named2, opt2 = resume(named, state, recipes.adamw, fused)
        set_grads(named2, 6, torch.float64)
        opt2.step()
        if fused:
            named3 = named
            set_grads(named3, 6, torch.float64)
            opt.step()
            for (_, p), (_, q) in zip(named2, named3):
                assert torch.equal(p, q)


def test_maximize_and_bfloat16(aot_eager) -> None:
    a = run("adamw", False, torch.float64, maximize=True)
    b = run("adamw", True, torch.float64, maximize=True)
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    a = run("adamw", False, torch.bfloat16)
    b = run("adamw", True, torch.bfloat16)
    # fp32 math, one rounding into bf16 on both paths
    assert_same(*a, *b, rtol=1e-2, atol=1e-2)
    for (_, p), (_, q) in zip(a[0], b[0]):
        assert (p.float() - q.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * p.abs().max()


def test_failed_step_leaves_everything_as_before(aot_eager) -> None:
    named = make_params(torch.float64)
    opt = gc.ChainOptimizer(named, recipes.adamw(), fused=True)
    set_grads(named, 0, torch.float64)
    opt.step()
    before = [p.detach().clone() for _, p in named]
    state = {k: v.clone() for k, v in opt.state[named[0][1]].items()}
    opt.param_groups[0]["lr"] = lambda step: float("nan")  # a schedule that returns an invalid value
    set_grads(named, 1, torch.float64)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert all(torch.equal(p, q) for (_, p), q in zip(named, before))
    assert all(torch.equal(opt.state[named[0][1]][k], v) for k, v in state.items())


def user_step_runs(make: Callable[[], list], build: Callable[[], gc.Transform],
                   grads: Callable[[list, int], None]) -> list[tuple[list, gc.ChainOptimizer]]:
    """``(named, opt)`` after 4 steps, plain and with ``opt.step`` under ``torch.compile(fullgraph=True)``
    (a graph break raises)."""
    results = []
    for compiled in (False, True):
        named = make()
        opt = gc.ChainOptimizer(named, build())
        grads(named, 0)
        opt.step()  # state exists before tracing, as torch's own optimizers need
        step = torch.compile(opt.step, fullgraph=True, backend="eager") if compiled else opt.step
        for i in range(1, 4):
            grads(named, i)
            step()
        results.append((named, opt))
    return results


def channels_last_run(recipe: str, fused: bool, steps: int = 4,
                      groups: int = 1) -> tuple[list, gc.ChainOptimizer, list]:
    """A channels_last conv net with a transposed weight, trained ``steps`` steps in float64
    (``groups`` param groups, the last ones chunked past STATIC_BUCKETS); the warnings it gave."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    model = model.double().to(memory_format=torch.channels_last)
    model[4].weight = nn.Parameter(model[4].weight.detach().t().contiguous().t())  # column-major
    named = list(model.named_parameters())
    per = [named[i::groups] for i in range(groups)]
    opt = gc.ChainOptimizer([{"params": [p for _, p in g], "param_names": [n for n, _ in g]} for g in per],
                            getattr(recipes, recipe)(), fused=fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
            loss = model(x.to(memory_format=torch.channels_last)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss)
    return [(n, p) for g in per for n, p in g], opt, [str(w.message) for w in caught]


@pytest.mark.parametrize(("recipe", "groups"), [("adamw", 1), ("lamb", 1), ("adafactor", 1), ("muon", 1),
                                                ("adamw", gc.fused.runner.STATIC_BUCKETS + 1)])
def test_params_in_another_memory_format_keep_it(aot_eager, recipe: str, groups: int) -> None:
    # a channels_last conv weight (and a column-major matrix) keeps its memory format on the fused
    # path: its slice of each flat buffer holds its elements in its own order, and its grad and state
    # are views with its strides, so a backward accumulates straight into the flat grads; the
    # numbers are the eager path's (groups past STATIC_BUCKETS are chunked buckets)
    eager = channels_last_run(recipe, False, groups=groups)
    named, opt, caught = channels_last_run(recipe, True, groups=groups)
    assert not [m for m in caught if "ChainOptimizer" in m], caught  # no layout warning, no grads copied
    assert opt._flats  # the fused path ran, not the eager one
    flat_grads = {fb.flat_grads.untyped_storage().data_ptr() for fb in opt._flats.values()}
    for (name, p), (_, q) in zip(named, eager[0]):
        assert p.stride() == q.stride(), name
        assert p.grad.stride() == p.stride() and p.grad.untyped_storage().data_ptr() in flat_grads, name
        for key, t in opt.state[p].items():
            if isinstance(t, Tensor) and t.shape == p.shape and t.dim() > 1:
                assert t.stride() == p.stride(), (name, key)
    assert named[0][1].is_contiguous(memory_format=torch.channels_last)
    assert_same(*eager[:2], named, opt, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("recipe", ["gc_adamw", "adafactor"])
def test_large_params_in_another_memory_format_compile_alone_in_it(aot_eager, recipe: str) -> None:
    # a large param that a transform does not treat elementwise (gradient centralization's rows,
    # Adafactor's factored statistics) compiles alone, over its own view: a channels_last weight
    # and a column-major matrix get it with their strides, and the numbers are the eager path's
    def run(fused: bool) -> tuple[list, gc.ChainOptimizer]:
        g = torch.Generator().manual_seed(0)
        f64 = torch.float64
        params = [nn.Parameter(t) for t in (
            torch.randn(512, 64, 3, 3, generator=g, dtype=f64).to(memory_format=torch.channels_last),
            torch.randn(320, 900, generator=g, dtype=f64).t(), torch.randn(64, generator=g, dtype=f64))]
        strides = [p.stride() for p in params]
        opt = gc.ChainOptimizer(params, getattr(recipes, recipe)(), fused=fused)
        for i in range(3):
            gen = torch.Generator().manual_seed(10 + i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        assert [p.stride() for p in params] == strides
        return [(str(i), p) for i, p in enumerate(params)], opt

    assert min(512 * 64 * 9, 320 * 900) >= runner.PER_TENSOR_MIN_NUMEL  # each compiles alone
    eager, fused = run(False), run(True)
    assert any("[tensor]" in t for _, ts in fused[1].fused_plan() for t in ts)
    assert_same(*eager, *fused, rtol=1e-12, atol=1e-14)


def test_a_param_viewed_in_another_shape_is_held_contiguously_with_a_warning(aot_eager) -> None:
    # SMMF's kernels view each param as a square matrix in its logical order, which a channels_last
    # weight's memory is not in: such a param is held contiguously, and the user is told once why
    eager = channels_last_run("smmf", False)
    named, opt, caught = channels_last_run("smmf", True)
    layout = [m for m in caught if "not contiguous" in m]
    assert len(layout) == 1 and "0.weight" in layout[0] and "tensor_view" in layout[0], caught
    assert named[0][1].is_contiguous() and not named[0][1].is_contiguous(memory_format=torch.channels_last)
    assert_same(*eager[:2], named, opt, rtol=1e-12, atol=1e-14)


def bf16_run(recipe: str, fused: bool, grad_dtypes: tuple, steps: int = 3) -> tuple[list, gc.ChainOptimizer, list]:
    """A bf16 model whose params' ``grad_dtype`` is set (``grad_dtypes``, one per param; None
    leaves it), trained ``steps`` steps; the warnings it gave."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    named = list(model.named_parameters())
    for (_, p), dtype in zip(named, grad_dtypes):
        if dtype is not None:
            p.grad_dtype = dtype
    opt = gc.ChainOptimizer(named, getattr(recipes, recipe)(), fused=fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(steps):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
            opt.zero_grad()
            model(x).float().square().mean().backward()
            opt.step()
    return named, opt, [str(w.message) for w in caught if "ChainOptimizer" in str(w.message)]


def assert_same_bf16(a_named, a_opt, b_named, b_opt) -> None:
    """fp32 state to fp32 rounding (the traced kernels may order a multiply-add apart), bf16 params
    to one rounding of that."""
    for (n, p), (_, q) in zip(a_named, b_named):
        assert (p.float() - q.float()).abs().max() <= torch.finfo(torch.bfloat16).eps * p.float().abs().max(), n
        for k, v in a_opt.state[p].items():
            torch.testing.assert_close(b_opt.state[q][k], v, rtol=1e-5, atol=1e-9,
                                       msg=lambda m, n=n, k=k: f"{n} {k}: {m}")


@pytest.mark.parametrize("recipe", ["adamw", "lamb", "adafactor"])
def test_fp32_grads_of_bf16_params_stay_fp32(aot_eager, recipe: str) -> None:
    # bf16 params whose grad_dtype is fp32 (gradients accumulated in fp32): the flat gradient buffer
    # is fp32, backward accumulates into it, and the step is the eager path's (which torch.optim's
    # own optimizers refuse: they expect the grads in the params' dtype). Before, the fused path
    # failed on its bf16 buffer.
    fp32 = (torch.float32,) * 4
    eager = bf16_run(recipe, False, fp32)
    named, opt, caught = bf16_run(recipe, True, fp32)
    assert not caught and opt._flats, caught
    for name, p in named:
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.float32, name
        assert p.grad.untyped_storage().data_ptr() == next(iter(opt._flats.values())).flat_grads.data_ptr(), name
    assert_same_bf16(*eager[:2], named, opt)


def test_grads_of_two_dtypes_in_one_group_step_eagerly_with_a_warning(aot_eager) -> None:
    # one flat gradient buffer holds one dtype: a group whose params' grad_dtype differ steps
    # eagerly, where it is told why, and its numbers are the eager path's
    mixed = (torch.float32, None, torch.float32, None)
    eager = bf16_run("adamw", False, mixed)
    named, opt, caught = bf16_run("adamw", True, mixed)
    assert len(caught) == 1 and "different dtypes" in caught[0] and "torch.float32" in caught[0], caught
    assert named[0][1].grad.dtype == torch.float32 and named[1][1].grad.dtype == torch.bfloat16
    assert_same_bf16(*eager[:2], named, opt)


def grads_moved_run(recipe: str, fused: bool, how: str) -> list[Tensor]:
    """Seven float64 steps of a small conv net whose grads are pointed at other memory in the way
    ``how`` names; the params after them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    model = model.double()
    opt = gc.ChainOptimizer(model.parameters(), getattr(recipes, recipe)(), fused=fused)
    held = []
    for i in range(7):
        if how == "model.to(channels_last)" and i == 3:
            model = model.to(memory_format=torch.channels_last)  # p.data and p.grad.data of the conv weights
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        if how == "p.grad.data =" and i >= 2:
            for p in model.parameters():
                p.grad.data = p.grad.data.clamp(-0.01, 0.01)
        if how == "a held view" and i == 2:
            held = [p.grad.view(-1) for p in model.parameters()]
        opt.step()
    assert held or how != "a held view"
    return list(model.parameters())


@pytest.mark.parametrize("how", ["model.to(channels_last)", "p.grad.data =", "a held view"])
@pytest.mark.parametrize("recipe", ["adamw", "lamb"])
def test_a_grad_pointed_at_other_memory_is_stepped_and_reset(aot_eager, recipe: str, how: str) -> None:
    # ``p.grad.data = x`` points the grad tensor itself, the flat buffer's view, at other memory
    # (Module._apply does it to every grad in model.to(memory_format=...), model.to(device)): the
    # step takes that grad's values, and zero_grad() resets it, where before the step read the flat
    # buffer's stale values and the next backward added to a grad zero_grad() had missed (AdamW
    # 4e-3 from eager). A view of a grad that the user keeps changes nothing
    eager = grads_moved_run(recipe, False, how)
    fused = grads_moved_run(recipe, True, how)
    for p, q in zip(eager, fused):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chunked", [False, True])
def test_flat_bucket_views_keep_each_params_strides(chunked: bool) -> None:
    # join() lays tensors out as the params are (each in its own memory order) and split() gives
    # them back; a strided slice, not one dense block, is held contiguously
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    params = [nn.Parameter(torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)),
              nn.Parameter(torch.randn(5, 7, generator=g).t()), nn.Parameter(torch.randn(6, generator=g)),
              nn.Parameter(base[:, ::2])]
    strides = [p.stride() for p in params[:3]]
    values = [p.detach().clone() for p in params]
    fb = FlatBucket(params, [{"step": torch.tensor(0.0)} for _ in params], [None] * 4, chunked=chunked)
    assert [p.stride() for p in params[:3]] == strides and params[3].is_contiguous()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert all(p.untyped_storage().data_ptr() == fb.flat_params.untyped_storage().data_ptr() for p in params)
    tensors = [torch.randn(p.shape, generator=g) for p in params]
    out = fb.split(fb.join(tensors))
    assert all(torch.equal(a, b) and a.stride() == p.stride() for a, b, p in zip(out, tensors, params))
    # the flat buffer holds a channels_last param in its own order: its slice is its memory
    o, n = fb.offsets[0], fb.numels[0]
    assert torch.equal(fb.flat_params[o:o + n], params[0].permute(0, 2, 3, 1).reshape(-1))


@pytest.mark.parametrize("recipe", ["adamw", "adafactor"])
def test_compiled_user_step_with_a_fused_optimizer(aot_eager, recipe: str) -> None:
    # torch.compile of a whole training step with fused=True: the forward and backward compile in
    # the user's graph, opt.step() and opt.zero_grad() break it and run the fused kernels outside
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        opt = gc.ChainOptimizer(model.named_parameters(), getattr(recipes, recipe)(), fused=True)
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))

        def step(model: nn.Module = model, opt: gc.ChainOptimizer = opt, x: Tensor = x) -> Tensor:
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        run = torch.compile(step, backend="eager") if compiled else step
        losses = [run() for _ in range(4)]
        assert opt._flats and opt.compile_seconds > 0  # the fused path ran, with its own kernels
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        results.append((list(model.named_parameters()), opt, losses))
    assert_same(*results[0][:2], *results[1][:2], rtol=0, atol=0)
    assert results[0][2] == results[1][2]


ROUTED = {
    "muon": lambda: recipes.muon(ns_dtype=None),
    "masked": lambda: gc.chain(gc.masked(gc.scale_by_adam(), lambda n, p: p.ndim >= 2), gc.scale_by_lr(1e-3)),
}


@pytest.mark.parametrize("name", ["adamw", "lamb", "adafactor", "muon", "masked"])
def test_compiled_user_step_has_no_graph_break(name: str) -> None:
    # torch.compile of a step that calls opt.step(): the common path traces as one graph (routed
    # chains too: their labels' caches, weak references, broke it at every step)
    build = ROUTED[name] if name in ROUTED else getattr(recipes, name)
    results = user_step_runs(lambda: make_params(torch.float64), build,
                             lambda named, i: set_grads(named, i, torch.float64))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)


def _whole_step_compiled(name: str) -> float:
    """The largest difference from the eager path over 4 steps of two params, with ``opt.step()``
    inside a function compiled by an AOT backend from the first step (the state made while tracing)."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(shape, dtype=torch.float64)) for shape in [(8, 4), (4,)]]
        opt = gc.ChainOptimizer(params, getattr(recipes, name)())
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            step()
        runs.append(params)
    return max(float((p - q).abs().max()) for p, q in zip(*runs))


# schedule-free: per-tensor step counts traced as 0-d tensors are stacked into a vector, not read
# while tracing (torch.as_tensor of a list of them failed to trace). NAdam: its running product of
# 0-d state is updated as one vector written back, where an in-place op on each 0-d state was lost
# when the trace specialized one of them (its step then divided by 0). CPR and the fractional
# gradient (host_step) run outside the graph, where the step counts are numbers (a KeyError before)
@pytest.mark.parametrize("name", ["schedule_free_adamw", "schedule_free_sgd", "nadam", "cpr_adamw",
                                  "fractional_adam", "fractional_sgd"])
def test_whole_step_compiled_with_aot_backend(name: str) -> None:
    assert _whole_step_compiled(name) < 1e-12


def _train_step_compiled_with_a_schedule(name: str, backend: str, compiled: bool) -> tuple[list[Tensor], int]:
    """Params after each of 5 steps of a training step compiled whole by ``backend`` (the eager path
    inside the user's graph, a loss passed to the step), the lr, betas and momentum changed between
    steps as LR schedulers do (OneCycleLR cycles the betas too); and the graphs compiled after step 3
    (a fresh optimizer's first step runs outside the graph, and the first change of a value in the
    traced step may compile once more)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    chain = gc.accumulate(recipes.adamw(), 2) if name == "accumulate" else getattr(recipes, name)()
    opt = gc.ChainOptimizer(model.named_parameters(), chain)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
            for _ in range(5)]

    def train_step(x: Tensor, y: Tensor) -> Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        return loss

    step = torch.compile(train_step, backend=backend) if compiled else train_step
    out, graphs = [], 0
    for i, (x, y) in enumerate(data):
        if i == 3:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        step(x, y)
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        for group in opt.param_groups:
            group["lr"] *= 0.7
            if "betas" in group:
                group["betas"] = (group["betas"][0] - 0.01, group["betas"][1])
            if "momentum" in group:
                group["momentum"] *= 0.9
    return out, torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


# A scheduled number (lr, betas) in a traced eager step was fixed to its value wherever a list op,
# a lerp weight or a number's power took it: every new value recompiled, and torch 2.13's FX graph
# cache could serve the recompiled graph the kernels of the value before (inductor: AdamW's decay
# 1 - lr wd, 1e-3 off at the third lr). Prodigy's 0-d float64 estimate of d was never written back
# (an in-place write to a 0-d float64 CPU tensor is dropped by the trace): d stayed at d0.
# accumulate (of AdamW) branches on the host count of calls: it runs outside the graph (it failed
# to trace: round() of a tensor), its update formed there (its bias corrections recompiled it)
@pytest.mark.parametrize("name,backend", [("adamw", "inductor"), ("adamw", "aot_eager"), ("lamb", "aot_eager"),
                                          ("sgd", "aot_eager"), ("nadam", "aot_eager"),
                                          ("adafactor", "aot_eager"), ("prodigy", "aot_eager"),
                                          ("accumulate", "aot_eager")])
def test_train_step_compiled_whole_follows_its_schedule(name: str, backend: str) -> None:
    expected, _ = _train_step_compiled_with_a_schedule(name, backend, compiled=False)
    got, recompiled = _train_step_compiled_with_a_schedule(name, backend, compiled=True)
    for i, (a, b) in enumerate(zip(expected, got)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=lambda m, i=i: f"step {i}: {m}")
    if name != "prodigy":  # (Prodigy checks its lr and betas across groups as numbers: a graph per value)
        assert recompiled == 0  # the values changed at steps 3-4 are symbolic: no graph per value


def _plain_and_compiled_train_steps(make_opt: Callable[[nn.Module], gc.ChainOptimizer],
                                    steps: int = 5) -> list[Tensor]:
    """A small float64 model's params after ``steps`` training steps with ``make_opt(model)``:
    plain, then with the whole step compiled (``aot_eager``); the initial params last."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = make_opt(model)
        g = torch.Generator().manual_seed(1)

        def train_step(x: Tensor, y: Tensor, model: nn.Module = model, opt: gc.ChainOptimizer = opt) -> None:
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for _ in range(steps):
            x, y = (torch.randn(8, n, generator=g, dtype=torch.float64) for n in (6, 3))
            step(x, y)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return [*runs, start]


def test_train_step_compiled_whole_evaluates_group_schedules() -> None:
    # a gradchain schedule as a group's lr, the eager path traced in the user's graph: evaluated on
    # the host at the advanced step count (a graph break); before, the schedule object itself
    # reached the transforms (TypeError: bad operand type for unary -)
    def make(model: nn.Module) -> gc.ChainOptimizer:
        groups = [{"params": model[0].parameters(), "lr": gc.schedules.linear_warmup(1e-2, 3)},
                  {"params": model[2].parameters(), "lr": 3e-3}]
        return gc.ChainOptimizer(groups, recipes.adamw())

    plain, compiled, _ = _plain_and_compiled_train_steps(make)
    torch.testing.assert_close(compiled, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("chain, second", [
    (lambda: gc.chain(gc.scale_by_sm3(), gc.scale_by_lr(0.1)), {"eps": 1e-6}),
    (lambda: recipes.sgd(lr=0.05, momentum=0.9), {"nesterov": True}),
    (lambda: recipes.adamw(lr=1e-2), {"amsgrad": True}),
], ids=["sm3_eps", "sgd_nesterov", "adamw_amsgrad"])
def test_train_step_compiled_whole_keeps_each_groups_own_options(chain, second: dict) -> None:
    # options that choose the code (static: SM3's eps, nesterov, amsgrad) were read from one dict
    # shared by the step's buckets, which held the last group's: every group ran with its values
    # (SM3 6.9e-2 off at the first step; amsgrad raised in the compiled run only)
    def make(model: nn.Module) -> gc.ChainOptimizer:
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
                  {"params": [p for p in model.parameters() if p.dim() == 1], **second}]
        return gc.ChainOptimizer(groups, chain())

    plain, compiled, _ = _plain_and_compiled_train_steps(make, steps=4)
    torch.testing.assert_close(compiled, plain, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["prodigy_scheduled", "accumulate_adaptive_memory"])
def test_train_step_compiled_whole_runs_the_host_parts_as_eager(case: str) -> None:
    # Prodigy evaluated its group's schedule itself, at the bucket's host step, which a traced step
    # has not got (RuntimeError); accumulate's inner chain runs outside the graph on host step
    # counts, which AdaM's first-step rule took for tensors (TypeError in torch.where)
    def make(model: nn.Module) -> gc.ChainOptimizer:
        if case == "prodigy_scheduled":
            return gc.ChainOptimizer(model.parameters(), recipes.prodigy(), lr=gc.schedules.linear_warmup(1.0, 3))
        chain = gc.accumulate(gc.chain(gc.adaptive_memory_momentum(), gc.scale_by_lr(0.01)), 2)
        return gc.ChainOptimizer(model.parameters(), chain)

    plain, compiled, start = _plain_and_compiled_train_steps(make)
    assert (plain - start).abs().max() > 1e-6  # it trained (Prodigy starts from d0 = 1e-6)
    torch.testing.assert_close(compiled, plain, rtol=1e-12, atol=1e-14)


def test_chunked_bucket_with_empty_params(aot_eager, monkeypatch) -> None:
    # a param with no elements has no row: its norm is 0 and nothing divides by its row count
    monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(0,), (3, 4), (0, 5), (300,)]]
        opt = gc.ChainOptimizer(params, recipes.lamb(lr=0.1, weight_decay=0.1), fused=fused)
        for i in range(3):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + i)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
    params = [nn.Parameter(torch.zeros(0, dtype=torch.float64)) for _ in range(3)]
    opt = gc.ChainOptimizer(params, recipes.lamb(), fused=True)
    for p in params:
        p.grad = torch.zeros(0, dtype=torch.float64)
    opt.step()  # only empty params: no rows at all


def test_chunked_bucket_checkpoint_round_trip(aot_eager, monkeypatch) -> None:
    # the state dict holds views without the gaps; a chunked bucket resumes bit for bit
    monkeypatch.setattr(gc.base, "SEGMENT_UNROLL", 0)
    whole = run("lamb", True, torch.float64, steps=6)
    first = run("lamb", True, torch.float64, steps=3)
    state = saved(first[1])
    for fused in (True, False):
        named, opt = resume(first[0], state, recipes.lamb, fused)
        for i in range(3, 6):
            set_grads(named, i, torch.float64)
            opt.step(loss=torch.tensor(1.0 / (i + 2)))
        if fused:
            for (_, p), (_, q) in zip(named, whole[0]):
                assert torch.equal(p, q)
        assert_same(*whole, named, opt, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "prodigy"])
def test_a_segment_that_cannot_compile_runs_uncompiled_with_a_warning(name: str, monkeypatch) -> None:
    # a backend that fails at the first call: each compiled segment (or Prodigy's pass) warns once,
    # then runs the same function uncompiled over the flat buffers
    def broken(gm, example_inputs):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(runner, "BACKEND", broken)
    a = run(name, False, torch.float64)
    with pytest.warns(RuntimeWarning, match="could not compile") as caught:
        b = run(name, True, torch.float64)
    assert len([w for w in caught if "could not compile" in str(w.message)]) == (1 if name == "adamw" else 2)
    assert b[1].compile_seconds == 0
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "adams", "prodigy"])
def test_no_float_specializations_leak_into_later_compiles(name: str, monkeypatch) -> None:
    # torch 2.13 keeps the 0-d float inputs it specialized in a global set that outlives the
    # compile; a later, unrelated compile (a user's training step) could then specialize one of its
    # own inputs by a name clash and lose an in-place update of it
    from torch._dynamo.symbolic_convert import TensorifyState

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, getattr(recipes, name)(), fused=True)
    for i in range(2):
        set_grads(named, i, torch.float32)
        opt.step()
    assert opt.compile_seconds > 0 and TensorifyState.empty()


def test_a_transform_that_cannot_take_a_step_count_per_param_runs_eagerly(aot_eager) -> None:
    # scalar math in Python on the step (min() of a number and the count) traces for neither a
    # 0-d count nor a vector of them: the segment then runs eagerly over the flat buffers, with
    # each param's own step count as a number once the counts differ
    def capped_warmup(steps: int = 4) -> gc.Leaf:
        def update(updates, state, hp, ctx):
            return torch._foreach_mul(updates, ctx.per_step(lambda t: min(1.0, float(t) / steps)))

        return gc.transform("capped_warmup", {}, None, update, elementwise=True)

    def chain() -> gc.Transform:
        return gc.chain(gc.scale_by_adam(), capped_warmup(), gc.scale_by_lr(0.1))

    FACTORIES["capped_warmup_adam"] = chain
    try:
        a, oa, _ = _uneven_run("capped_warmup_adam", fused=False)
        b, ob, messages = _uneven_run("capped_warmup_adam", fused=True)
    finally:
        del FACTORIES["capped_warmup_adam"]
    assert_same(a, oa, b, ob, rtol=1e-12, atol=1e-14)
    assert any(fb.uneven for fb in ob._flats.values())
    assert any("could not compile" in m for m in messages)


def test_a_new_bucket_makes_its_state_in_the_flat_buffers(aot_eager, monkeypatch) -> None:
    # a fresh bucket's state is made a param at a time inside the flat buffers; which entries are
    # laid out flat is found as the params are made: "a" fits every param (a 0-d one first, before
    # any buffer exists), "b" fits the vectors only, "c" only some params have, "n" is not floating
    def init(p: Tensor) -> dict:
        st = {"a": torch.zeros_like(p), "b": torch.zeros_like(p) if p.dim() <= 1 else torch.zeros(1, dtype=p.dtype),
              "n": torch.zeros(p.shape, dtype=torch.int64)}
        if p.numel() > 4:
            st["c"] = torch.zeros_like(p)
        return st

    def update(updates: list, state: dict, hp: dict, ctx) -> list:
        out = []
        for g, a, b, c, n in zip(updates, state["a"], state["b"], state["c"], state["n"], strict=True):
            a.mul_(0.5).add_(g)
            b.add_(g.abs().sum())
            n.add_(1)
            if c is not None:
                c.add_(g * g)
            out.append(a + 0.1 * b.sum() + (0.0 if c is None else 0.01 * c.sum()))
        return out

    def chain() -> gc.Transform:
        return gc.chain(gc.transform("odd", {}, init, update), recipes.adamw(lr=0.1))

    # the keys the bucket lays out after every state is made (none, where each param's was laid out
    # as it was made; a param of over a quarter of the bucket would have them all made first)
    laid_out_after: list[list[str]] = []
    flat_keys = FlatBucket._flat_keys
    monkeypatch.setattr(FlatBucket, "_flat_keys",
                        lambda self: laid_out_after.append(flat_keys(self)) or flat_keys(self))
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        shapes = [(), (3,), (3, 4), (12,)] + [(10,)] * 8
        params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        opt = gc.ChainOptimizer(named, chain(), fused=fused, atomic="never")
        for i in range(4):
            set_grads(named, i, torch.float64)
            opt.step()
        results.append((named, opt))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)
    named, opt = results[1]
    (fb,) = opt._flats.values()
    assert sorted(fb.flat_state) == ["adam.exp_avg", "adam.exp_avg_sq", "odd.a"] and laid_out_after == [[]]
    for (_, p), v in zip(named, fb.state_views["odd.a"]):
        assert opt.state[p]["odd.a"] is v
        assert opt.state[p]["odd.b"].untyped_storage().data_ptr() != fb.flat_state["odd.a"].untyped_storage().data_ptr()
    assert "odd.c" not in opt.state[named[0][1]] and "odd.c" in opt.state[named[2][1]]


def test_a_first_step_that_raises_before_the_state_is_made_leaves_none_half_made(aot_eager) -> None:
    # atomic="never" rolls nothing back; a new param whose state the fused path had not made yet when
    # the step raised (here: a transform's init, once) gets it made at the next step, as the eager path's
    # (the routes are worked out when the optimizer is built, so a route cannot be what raises here)
    calls = [0]

    def flaky_init(p: Tensor) -> dict:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("state init failed once")
        return {}

    def labels(name: str, p: Tensor) -> str:
        return "a" if p.dim() > 1 else "b"

    results = []
    for fused in (False, True):
        calls[0] = 0
        named = make_params(torch.float64)
        flaky = gc.transform("flaky", None, flaky_init, lambda u, s, hp, ctx: u)
        chain = gc.partition({"a": gc.chain(flaky, recipes.adamw(lr=0.1)),
                              "b": recipes.adamw(lr=0.01).renamed({"lr": "lr_b", "weight_decay": "wd_b"})}, labels)
        opt = gc.ChainOptimizer(named, chain, fused=fused, atomic="never")
        set_grads(named, 0, torch.float64)
        with pytest.raises(RuntimeError, match="state init failed once"):
            opt.step()
        assert all(set(opt.state[p]) != {"step"} for _, p in named if p in opt.state)  # none holds only its step
        for i in range(1, 4):
            set_grads(named, i, torch.float64)
            opt.step()
        results.append((named, opt))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)


def test_renamed_params_are_routed_by_their_new_names(aot_eager) -> None:
    # a rename splits the group again on both paths, and a partition by name routes the param by its
    # new name from then on (here to the child with the larger lr; both keep the same state entries)
    def labels(name: str, p: Tensor) -> str:
        return "a" if name.endswith("weight") else "b"

    results = []
    for fused in (False, True):
        named = make_params(torch.float64)
        chain = gc.partition({"a": recipes.adamw(lr=0.1),
                              "b": recipes.adamw(lr=0.01).renamed({"lr": "lr_b", "weight_decay": "wd_b"})}, labels)
        opt = gc.ChainOptimizer(named, chain, fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fused path steps eagerly while its buckets are made again
            for i in range(8):
                g = torch.Generator().manual_seed(100 + i)
                for _, p in named:  # backward accumulating into the grads, as in training
                    d = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    p.grad = d if p.grad is None else p.grad.copy_(d)
                if i == 3:
                    opt.param_groups[0]["param_names"] = [n + ".weight" if n == "fc.bias" else n
                                                          for n in opt.param_groups[0]["param_names"]]
                opt.step()
        results.append((named, opt))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)
    named, opt = results[1]
    fc_bias = dict(named)["fc.bias"]
    assert any(fc_bias is p for (_, _, _, label), fb in opt._flats.items() if label[0] == "a" for p in fb.params)


@pytest.mark.parametrize("fused", [False, True])
def test_a_param_renamed_into_a_route_whose_state_it_lacks_gets_a_clear_error(fused: bool, aot_eager) -> None:
    # its state holds the first route's entries (Adam's moments), the new route needs momentum's:
    # the step says why (and, atomic, moves nothing); with its state dropped it starts afresh there
    def labels(name: str, p: Tensor) -> str:
        return "adamw" if name.startswith("fc") else "sgd"

    named = make_params(torch.float64)
    chain = gc.partition({"adamw": recipes.adamw(lr=0.1),
                          "sgd": recipes.sgd(lr=0.1, momentum=0.9).renamed({"lr": "lr_sgd", "weight_decay": "wd_sgd"})},
                         labels)
    opt = gc.ChainOptimizer(named, chain, fused=fused, atomic="always")
    for i in range(2):
        set_grads(named, i, torch.float64)
        opt.step()
    fc_weight = dict(named)["fc.weight"]
    before = {k: v.clone() for k, v in opt.state[fc_weight].items()}
    opt.param_groups[0]["param_names"] = ["renamed." + n if n == "fc.weight" else n
                                          for n in opt.param_groups[0]["param_names"]]
    with pytest.raises(ValueError, match=r"param renamed\.fc\.weight is routed to 'sgd', but its state "
                                         r"\(adam\.exp_avg, adam\.exp_avg_sq\) was made by another route"):
        opt.step()
    assert all(torch.equal(opt.state[fc_weight][k], v) for k, v in before.items())
    del opt.state[fc_weight]
    opt.step()
    assert sorted(opt.state[fc_weight]) == ["momentum.buffer", "step"] and float(opt.state[fc_weight]["step"]) == 1


@pytest.mark.parametrize("name", ["adamw", "sgd", "nadam", "lamb", "amos"])
def test_many_param_groups_compile_a_bounded_number_of_kernels(name: str, aot_eager) -> None:
    """Layer-wise lr decay: a param group per layer, each a flat bucket of its own size. The first
    few buckets compile a kernel each; the others share one with a symbolic size (forty groups
    compiled forty kernels, one to one and a half minutes cold). Per-tensor reductions (LAMB's
    norms), per-param state (NAdam's running product) and per-tensor values from the names and
    shapes (Amos) share it too: those buckets are laid out in rows. The trajectory is the eager
    one in float64, and the shared kernel traces once."""
    def build(fused: bool):
        torch.manual_seed(0)
        layers = [nn.Linear(3 + i, 4 + i).double() for i in range(runner.STATIC_BUCKETS + 5)]
        groups = [{"params": list(layer.parameters()), "lr": 1e-2 * 0.8 ** i} for i, layer in enumerate(layers)]
        return layers, gc.ChainOptimizer(groups, getattr(recipes, name)(), fused=fused)

    eager_layers, eager = build(False)
    fused_layers, fused = build(True)
    traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(4):
        for layers, opt in ((eager_layers, eager), (fused_layers, fused)):
            g = torch.Generator().manual_seed(step)
            for layer in layers:
                for p in layer.parameters():
                    p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
    for a, b in zip(eager_layers, fused_layers):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    (seg,) = [s for s in fused._fused_chain.segments if s.compiled]
    shared = [k for k in seg._fns if isinstance(k, tuple) and k[0] == "sized"]
    assert len(shared) == 1 and len(seg._fns) == runner.STATIC_BUCKETS + 1, list(seg._fns)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - traced == len(seg._fns)


def test_inductor_kernel_with_a_symbolic_size_equals_eager(monkeypatch) -> None:
    """The kernel that buckets past the first few share, compiled by inductor with a symbolic size
    (sizes that are no multiple of a vector, so the loops' tails run), against the eager path."""
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(runner, "STATIC_BUCKETS", 1)

    def build(fused: bool):
        torch.manual_seed(0)
        layers = [nn.Linear(5 + 3 * i, 7 + i) for i in range(3)]
        groups = [{"params": list(layer.parameters()), "lr": 1e-2 * 0.5 ** i} for i, layer in enumerate(layers)]
        return layers, gc.ChainOptimizer(groups, recipes.adamw(weight_decay=0.1), fused=fused)

    runs = [build(False), build(True)]
    for step in range(4):
        for layers, opt in runs:
            g = torch.Generator().manual_seed(step)
            for layer in layers:
                for p in layer.parameters():
                    p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    (seg,) = [s for s in runs[1][1]._fused_chain.segments if s.compiled]
    assert [k for k in seg._fns if isinstance(k, tuple) and k[0] == "sized"], list(seg._fns)
    for a, b in zip(runs[0][0], runs[1][0]):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adams", "am_sgd"])
def test_many_param_groups_share_the_passes_around_a_global_sum(name: str, aot_eager) -> None:
    """The two compiled passes of a chain with a sum over every bucket (AdamS's mean of v^, AM-SGD's
    inner products): past the first few buckets, one kernel per pass for all of them, as above.
    AM-SGD's second pass lends a state buffer as the update, and the compiler guards on that
    buffer's identity, so the shared kernel traced again for every bucket (past eight, torch would
    run it uncompiled): after a few such traces in one step the buckets after take kernels of their
    own, and no step after the second traces anything."""
    def build(fused: bool):
        torch.manual_seed(0)
        layers = [nn.Linear(3 + i, 4 + i).double() for i in range(runner.STATIC_BUCKETS + 5)]
        groups = [{"params": list(layer.parameters()), "lr": 1e-2 * 0.8 ** i} for i, layer in enumerate(layers)]
        return layers, gc.ChainOptimizer(groups, getattr(recipes, name)(), fused=fused)

    runs = [build(False), build(True)]
    traces = []
    for step in range(4):
        traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for layers, opt in runs:
            g = torch.Generator().manual_seed(step)
            for layer in layers:
                for p in layer.parameters():
                    p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            opt.step()
        traces.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - traced)
    for a, b in zip(runs[0][0], runs[1][0]):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    (seg,) = [s for s in runs[1][1]._fused_chain.segments if s.phased is not None]
    assert traces[2:] == [0, 0], traces
    if name == "adams":
        assert len(seg._fns) == 2 * (runner.STATIC_BUCKETS + 1), list(seg._fns)
        assert sum(traces) == len(seg._fns) and not seg._retraced
    else:
        assert [k[0] for k in seg._retraced] == ["finish"], seg._retraced
        assert sum(traces) <= len(seg._fns) + runner._RETRACES + 1 + runner.STATIC_BUCKETS, traces


def test_a_kernel_past_the_recompile_limit_steps_eagerly_with_a_warning(aot_eager, monkeypatch) -> None:
    # a user's elementwise transform reading a hyperparameter as a number can compile once per value
    # (dynamo's float specialization); under a schedule the ninth value hit dynamo's limit and the
    # step raised FailOnRecompileLimitHit. That failure comes at the guards, before anything runs:
    # here the kernel raises it from its third call on (whether a given value recompiles depends on
    # dynamo's state, so the test does not rely on it)
    compile_ = torch.compile

    def compile_failing_later(fn, **kw):
        compiled, calls = compile_(fn, **kw), []

        def call(*args):
            calls.append(1)
            if len(calls) >= 3:
                raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached with fullgraph=True")
            return compiled(*args)

        return call

    def run(fused: bool):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
        opt = gc.ChainOptimizer([p], recipes.adamw(lr=0.01), fused=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            p.grad = torch.randn(5, 3, dtype=torch.float64, generator=gen)
            opt.step()
        return p.detach(), opt

    monkeypatch.setattr(runner.torch, "compile", compile_failing_later)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        (fused, opt), (eager, _) = run(True), run(False)
    assert any("FailOnRecompileLimitHit" in str(w.message) and "float(hp[key])" in str(w.message) for w in seen)
    assert any(s._failed for s in opt._fused_chain.segments)
    torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "adalo"])
def test_a_training_step_compiled_before_the_first_step_traces_as_one_made_after(name: str) -> None:
    """``torch.compile(train_step)`` from a fresh optimizer, as training scripts write it: making
    the state while tracing broke the graph at every param, and dynamo gave up on tracing the step's
    collection of params for good (10 graphs at the first step, 4 at every later one, where an
    optimizer stepped once before compiling runs 2). The first step now runs outside the graph, and
    later steps run as many graphs as after a step taken before compiling, on the same numbers."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend("aot_eager")
    calls = [0]

    def counting(gm, example_inputs):
        compiled = inner(gm, example_inputs)

        def run(*args):
            calls[0] += 1
            return compiled(*args)

        return run

    def run(compiled: bool, before: bool):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)).double()
        opt = gc.ChainOptimizer(model.parameters(), getattr(recipes, name)())
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

        def train_step():
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss) if name == "adalo" else opt.step()
            opt.zero_grad()
            return loss

        if before:
            train_step()
        step = torch.compile(train_step, backend=counting) if compiled else train_step
        per = []
        for _ in range(4 - before):
            c = calls[0]
            step()
            per.append(calls[0] - c)
        return [p.detach().clone() for p in model.parameters()], per

    want, _ = run(False, False)
    fresh, per_fresh = run(True, False)
    _, per_before = run(True, True)
    assert per_fresh[1:] == per_before, (per_fresh, per_before)
    for a, b in zip(want, fresh):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-14)


@pytest.mark.parametrize("split", ["partition", "shape_class", "dtype"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_schedule_is_evaluated_at_its_whole_groups_step_count(split: str, fused: bool, aot_eager) -> None:
    # the group's buckets (routes, SM3's shape classes, dtypes) hold params that skipped steps: each
    # param gets the lr of the group's largest count, not of its own bucket's
    lin = gc.schedules.linear(0.0, 0.1, 10)
    w = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    b = nn.Parameter(torch.randn(7, dtype=torch.float32 if split == "dtype" else torch.float64))
    if split == "partition":
        chain = gc.partition({"mat": gc.scale_by_lr(), "vec": gc.scale_by_lr()},
                             lambda n, p: "mat" if p.ndim >= 2 else "vec")
    elif split == "shape_class":
        chain = gc.chain(gc.scale_by_sm3(eps=0.0), gc.scale_by_lr())
    else:
        chain = gc.chain(gc.scale_by_lr())
    opt = gc.ChainOptimizer([{"params": [("w", w), ("b", b)], "lr": lin}], chain, fused=fused)
    b0 = b.detach().double().clone()
    for k in range(1, 6):
        w.grad = torch.ones_like(w)
        b.grad = torch.ones_like(b) if k >= 3 else None
        opt.step()
    # b's update is -lr * 1 (SM3's first step on a fresh vector divides 1 by sqrt(1): 1, then
    # 1/sqrt(2), 1/sqrt(3))
    scale = [1.0, 2 ** -0.5, 3 ** -0.5] if split == "shape_class" else [1.0, 1.0, 1.0]
    want = b0 - sum(lin(t) * s for t, s in zip((3, 4, 5), scale))
    torch.testing.assert_close(b.detach().double(), want, rtol=1e-6 if split == "dtype" else 1e-14, atol=0)


def test_a_load_keeps_the_compiled_kernels_and_the_warnings_said(aot_eager) -> None:
    # (every load_state_dict() made the fused chain anew: a compile per load, the old code kept alive,
    # and each once-only warning said again)
    buf = torch.zeros(10)
    a, b = nn.Parameter(buf[:4]), nn.Parameter(buf[4:8])  # views of one buffer: a warning, once
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer([{"params": [p for _, p in named]}, {"params": [a, b]}], recipes.adamw(), fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            set_grads(named, i, torch.float32)
            for p in (a, b):
                p.grad = torch.ones(4)
            opt.step()
            if i == 0:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                seconds = opt.compile_seconds
            opt.load_state_dict(opt.state_dict())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt.compile_seconds == seconds
    assert len([w for w in caught if "views into a larger buffer" in str(w.message)]) == 1


def test_a_deleted_group_leaves_no_flat_bucket_behind(aot_eager) -> None:
    # (the bucket made for the old index stayed: its zero_grad() dropped the live grads, copied in
    # again at every step, with a warning that blamed the user's zero_grad())
    runs = []
    for fused in (False, True):
        named = make_params(torch.float64)
        half = len(named) // 2
        opt = gc.ChainOptimizer([{"params": [p for _, p in named[:half]]}, {"params": [p for _, p in named[half:]]}],
                                recipes.adamw(), fused=fused)
        with warnings.catch_warnings():
            warnings.simplefilter("error", gc.FusedGradientCopyWarning)
            for i in range(6):
                if i == 2:
                    del opt.param_groups[0]
                opt.zero_grad()
                g = torch.Generator().manual_seed(100 + i)
                for _, p in named:  # into the kept grads, as a backward does
                    new = torch.randn(p.shape, generator=g, dtype=torch.float64)
                    if p.grad is None:
                        p.grad = new
                    else:
                        p.grad.copy_(new)
                opt.step()
        runs.append((named, opt))
    assert len(opt._flats) == 1
    flat = next(iter(opt._flats.values()))
    assert all(p.grad is v for p, v in zip(flat.params, flat.grad_views))
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)
