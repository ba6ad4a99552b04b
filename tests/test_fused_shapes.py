"""Shape routes of the fused path: ``elementwise_for`` transforms (Adafactor's factored second
moment, SM3, gradient centralization) compile over the params whose shape makes them elementwise, and run eagerly over
the others, in flat buckets of their own."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_fused import assert_same, resume, saved
from torch import nn

import gradchain as gc
from gradchain import recipes
from gradchain.fused import runner


class Mixed(nn.Module):
    """A factored matrix (both sides >= 128), a small matrix, a conv kernel, vectors and a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(130, 128)
        self.norm = nn.LayerNorm(128)
        self.head = nn.Linear(128, 7)
        self.conv = nn.Conv2d(2, 3, 3)
        self.gain = nn.Parameter(torch.tensor(1.5))


def make(dtype: torch.dtype) -> list:
    torch.manual_seed(0)
    return list(Mixed().to(dtype).named_parameters())


def grads(named: list, step: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(50 + step)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)


def run(build, fused: bool, dtype: torch.dtype, steps: int = 5, named=None, opt=None):
    named = make(dtype) if named is None else named
    opt = gc.ChainOptimizer(named, build(), fused=fused) if opt is None else opt
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        for i in range(steps):
            grads(named, i, dtype)
            opt.step()
            sched.step()  # a new lr each step: never recompiles
    return named, opt


BUILDS = {
    "adafactor": recipes.adafactor,
    "adafactor_torch": lambda: recipes.adafactor(torch_compat=True, weight_decay=0.1),
    "adafactor_momentum": lambda: recipes.adafactor(momentum=0.9, warmup_init=True, eps=(1e-30, 1e-3)),
    "sm3": lambda: recipes.sm3(momentum=0.9),
    "sm3_ema": lambda: recipes.sm3(b2=0.99, eps=0.0),
    # centred per output unit: matrices and the conv kernel; identity on vectors
    "gc_adamw": lambda: recipes.gc_adamw(weight_decay=0.1),
    # clipped per unit: a vector is one unit (a segment of the flat buffer), a matrix one per row
    "agc_sgd": lambda: recipes.agc_sgd(lr=0.1, momentum=0.9, clip_factor=0.05),
    "softclip_adamw": lambda: recipes.softclip_adamw(lr=0.1),
}


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_shape_routes_equal_eager(name: str, per_tensor: bool, aot_eager, monkeypatch) -> None:
    # per_tensor: every matrix is "large", so each compiles alone (a kernel per shape)
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0 if per_tensor else 1 << 40)
    for dtype, tol in ((torch.float64, (1e-12, 1e-14)), (torch.float32, (1e-5, 1e-6))):
        a = run(BUILDS[name], False, dtype)
        b = run(BUILDS[name], True, dtype)
        assert_same(*a, *b, rtol=tol[0], atol=tol[1])
    names = [t.name for t in b[1].transform.leaves()]
    plan = b[1].fused_plan()
    # the passing shapes compile the whole chain over one flat buffer; large failing ones compile
    # it a param at a time; the rest keep the transform eager
    assert plan[0] == ("compiled", [f"[flat]{n}" for n in names])
    assert plan[1] == ("compiled", [f"[tensor]{n}" for n in names])
    assert plan[2][0] == "eager" and plan[2][1][0] == f"[eager]{names[0]}"
    routes = {key[3][1] for key in b[1]._flats}
    assert routes == ({"flat", "tensor"} if per_tensor else {"flat", "eager"})
    if per_tensor:  # a kernel per shape, each compiled once
        seg = b[1]._fused_chain.chains[(None, "tensor")].segments[0]
        shapes = {tuple(p.shape) for n, p in b[0] if p.dim() >= 2 and not n.startswith("norm")}
        assert {k[1] for k in seg._fns} <= shapes and not seg._failed
    if name.startswith(("adafactor", "sm3")):
        factored = b[1].state[dict(b[0])["big.weight"]]
        assert "factored.row" in factored or "sm3.acc_1" in factored  # the big matrix keeps its factored state


def test_a_reduction_over_every_bucket_keeps_shapes_together(aot_eager, monkeypatch) -> None:
    # the global norm must see every param: routed by shape, each route would clip by its own norm
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)

    def build():
        return gc.chain(gc.scale_by_factored_rms(), gc.clip_by_global_norm(0.01), gc.scale_by_lr(0.1))

    for dtype, tol in ((torch.float64, (1e-12, 1e-14)), (torch.float32, (1e-5, 1e-6))):
        assert_same(*run(build, False, dtype), *run(build, True, dtype), rtol=tol[0], atol=tol[1])
    plan = run(build, True, torch.float32, steps=1)[1].fused_plan()
    assert not any(n.startswith("[") for _, names in plan for n in names)


def test_new_lr_and_steps_do_not_recompile(aot_eager, monkeypatch) -> None:
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)  # flat and per-tensor kernels both
    named, opt = run(recipes.adafactor, True, torch.float32, steps=2)
    graphs, seconds = torch._dynamo.utils.counters["stats"]["unique_graphs"], opt.compile_seconds
    run(recipes.adafactor, True, torch.float32, steps=4, named=named, opt=opt)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt.compile_seconds == seconds


@pytest.mark.parametrize("name", ["adafactor", "sm3"])
def test_shape_route_checkpoints_cross_paths(name: str, aot_eager, monkeypatch) -> None:
    monkeypatch.setattr("test_fused.make_params", make)
    a = run(BUILDS[name], False, torch.float64, steps=3)
    b = run(BUILDS[name], True, torch.float64, steps=3)
    for source, fused in ((a, True), (b, False), (b, True)):
        named, opt = resume(source[0], saved(source[1]), BUILDS[name], fused)
        ref_named, ref_opt = resume(a[0], saved(a[1]), BUILDS[name], False)
        for i in range(3, 5):
            grads(named, i, torch.float64)
            grads(ref_named, i, torch.float64)
            opt.step()
            ref_opt.step()
        assert_same(ref_named, ref_opt, named, opt, rtol=1e-12, atol=1e-14)


def test_inductor_shape_routes_equal_eager(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 1000)  # the factored matrix compiles alone
    for name, static_shapes in (("adafactor", 6), ("sm3", 0)):  # a kernel for its shape; one for any size
        monkeypatch.setattr(runner, "PER_TENSOR_STATIC_SHAPES", static_shapes)
        a = run(BUILDS[name], False, torch.float32, steps=3)
        b = run(BUILDS[name], True, torch.float32, steps=3)
        assert b[1].compile_seconds > 0
        assert_same(*a, *b, rtol=1e-5, atol=1e-6)


def test_compiled_segment_after_an_eager_one_does_not_recompile(aot_eager) -> None:
    # the eager segment's updates are a fresh flat tensor each step; the in-place clip that
    # follows must not guard on that tensor's identity (it recompiled every step, then failed)
    build = lambda: gc.chain(gc.clip_by_norm(0.5), gc.clip_by_block_rms(1.0), gc.scale_by_adam(),  # noqa: E731
                             gc.scale_by_lr(1e-2))
    named = make(torch.float64)
    assert gc.ChainOptimizer(named, build(), fused=True).fused_plan() == [
        ("eager", ["clip_norm"]), ("compiled", ["clip_rms", "adam", "lr"])]
    a = run(build, False, torch.float64, steps=12)
    b = run(build, True, torch.float64, steps=12)
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)


def test_stateless_run_after_an_eager_one_stays_eager() -> None:
    # Adafactor's factored matrices: the clip, the param scale and the write stay with the eager
    # factored statistics rather than pay a copy of the updates into a flat buffer
    named = make(torch.float32)
    plan = gc.ChainOptimizer(named, recipes.adafactor(), fused=True).fused_plan()
    assert plan[2] == ("eager", [f"[eager]{t.name}" for t in recipes.adafactor().leaves()])


def test_past_a_few_shapes_one_kernel_takes_any_size(aot_eager, monkeypatch) -> None:
    # a kernel per shape for the first shapes, then one with symbolic sizes: compile time stays
    # bounded whatever the number of shapes
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    monkeypatch.setattr(runner, "PER_TENSOR_STATIC_SHAPES", 1)
    for name in ("adafactor_torch", "sm3"):  # every matrix factored (torch factors all of them)
        a = run(BUILDS[name], False, torch.float64)
        b = run(BUILDS[name], True, torch.float64)
        assert_same(*a, *b, rtol=1e-12, atol=1e-14)
        seg = b[1]._fused_chain.chains[(None, "tensor")].segments[0]
        keys = sorted(str(k[1]) for k in seg._fns)
        assert len(seg.static_shapes) == 1 and not seg._failed
        assert any(k.isdigit() for k in keys) and any(not k.isdigit() for k in keys), keys


def test_per_tensor_segment_hands_its_updates_to_an_eager_one(aot_eager, monkeypatch) -> None:
    # the per-tensor kernels write each update into the bucket's kept buffer; the eager segment
    # after them reads it
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    build = lambda: gc.chain(gc.scale_by_sm3(), gc.clip_by_norm(0.5), gc.ema(0.5), gc.scale_by_lr(0.1))  # noqa: E731
    a = run(build, False, torch.float64)
    b = run(build, True, torch.float64)
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    tensor_route = b[1]._fused_chain.chains[(None, "tensor")]
    assert [s.per_tensor for s in tensor_route.segments] == [True, False, False]
    assert b[1].fused_plan()[3:6] == [("compiled", ["[tensor]sm3"]), ("eager", ["[tensor]clip_norm"]),
                                       ("compiled", ["[tensor]ema", "[tensor]lr"])]


class Ragged(nn.Module):
    """Matrices whose reduced side is not a multiple of the column block, one smaller than a block,
    one factored along dim 0 (its largest), and a 3-d tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(203, 130))  # 203 rows: 12 blocks of 16 and 11 left over
        self.b = nn.Parameter(torch.randn(300, 129))  # two_largest: dim 0 is the largest (columns)
        self.c = nn.Parameter(torch.randn(9, 160))  # fewer rows than a block
        self.d = nn.Parameter(torch.randn(5, 130, 140))  # a batch dim in front


@pytest.mark.parametrize("static_shapes", [6, 1])
def test_inductor_blocked_column_reductions_equal_eager(monkeypatch, static_shapes: int) -> None:
    # the compiled per-tensor kernels reduce down the columns over blocks of rows (reduce_dims):
    # only the summation order differs from eager, on every shape, with sizes fixed or symbolic
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 1000)
    monkeypatch.setattr(runner, "PER_TENSOR_STATIC_SHAPES", static_shapes)

    def make_ragged(dtype: torch.dtype) -> list:
        torch.manual_seed(0)
        return list(Ragged().to(dtype).named_parameters())

    for name in ("adafactor", "sm3", "sm3_ema"):
        a = run(BUILDS[name], False, torch.float32, steps=3, named=make_ragged(torch.float32))
        b = run(BUILDS[name], True, torch.float32, steps=3, named=make_ragged(torch.float32))
        assert b[1].compile_seconds > 0
        assert "tensor" in {key[3][1] for key in b[1]._flats}
        assert_same(*a, *b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(203, 130), (9, 160), (16, 3), (5, 13, 7), (1, 40)])
def test_reduce_dims_blocked_equals_plain(shape: tuple) -> None:
    from gradchain.ops import reduce_dims

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for dims in [tuple(range(len(shape) - 1)), (len(shape) - 1,), tuple(range(len(shape)))]:
        for op in ("sum", "amax"):
            want = getattr(x, op)(dim=dims, keepdim=True)
            got = reduce_dims(x, dims, op, blocked=True)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


UNIT_BUILDS = ("gc_adamw", "agc_sgd", "softclip_adamw")


@pytest.mark.parametrize("name", UNIT_BUILDS)
def test_inductor_unit_transforms_compile_one_large_matrix_at_a_time(name: str, monkeypatch) -> None:
    # the per-unit reductions and the rest of the chain in one compiled graph per large matrix
    # (inductor's own kernels); a matrix under PER_TENSOR_MIN_NUMEL runs them eagerly
    monkeypatch.setattr(runner, "BACKEND", "inductor")

    def make_units(dtype: torch.dtype) -> list:
        torch.manual_seed(0)
        shapes = {"w": (512, 520), "small": (16, 9), "b": (520,)}
        return [(n, nn.Parameter(torch.randn(s, dtype=dtype))) for n, s in shapes.items()]

    monkeypatch.setattr("test_fused_shapes.make", make_units)
    build = BUILDS[name]
    a = run(build, False, torch.float32, steps=3)
    b = run(build, True, torch.float32, steps=3)
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)
    names = [t.name for t in b[1].transform.leaves()]
    assert ("compiled", [f"[tensor]{n}" for n in names]) in b[1].fused_plan()
    assert {key[3][1] for key in b[1]._flats} == {"flat", "tensor", "eager"}


def test_a_tensor_view_that_loses_elements_is_refused_by_name(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)

    def halve(updates: list, state: dict, hp: dict, ctx: gc.Bucket) -> list:
        return [u * 0.5 for u in updates]

    bad = gc.transform("bad_view", update=halve, elementwise_for=lambda shape: False,
                       tensor_view=lambda shape: (math.prod(shape) + 1,))
    p = nn.Parameter(torch.randn(4, 6))
    opt = gc.ChainOptimizer([p], gc.chain(bad, gc.scale_by_lr(0.1)), fused=True)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"'bad_view': tensor_view\(4, 6\) returned \(25,\)"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("recipe", ["adamw", "lamb", "adanorm", "sgd_momentum"])
@pytest.mark.parametrize("layout", ["many_scalars", "fifth_group"])
def test_a_bucket_of_scalar_params_equals_eager(recipe: str, layout: str, aot_eager) -> None:
    # every param of a bucket 0-d (gates, temperatures): their param-shaped state is 0-d too, one entry a
    # param. Past 32 params, or from the fifth group on (buckets laid out in rows), it failed to compile
    # and then raised at every step (a vector of one entry a param against a flat buffer in rows)
    build = {"adamw": lambda: recipes.adamw(lr=0.05, weight_decay=0.1), "lamb": lambda: recipes.lamb(lr=0.05),
             "adanorm": lambda: recipes.adanorm(lr=0.05), "sgd_momentum": lambda: recipes.sgd(lr=0.05, momentum=0.9)}

    def make(fused: bool) -> tuple[list[torch.Tensor], gc.ChainOptimizer]:
        gen = torch.Generator().manual_seed(0)
        others = [nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=gen))
                  for _ in range(4 if layout == "fifth_group" else 0)]
        scalars = [nn.Parameter(torch.randn((), dtype=torch.float64, generator=gen))
                   for _ in range(3 if layout == "fifth_group" else 40)]
        groups = [{"params": [p]} for p in others] + [{"params": scalars}]
        return others + scalars, gc.ChainOptimizer(groups, build[recipe](), fused=fused)

    (a, oa), (b, ob) = make(False), make(True)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "gradchain fused path: could not compile")
        for _ in range(4):
            for x, y in zip(a, b):
                g = torch.randn(x.shape, dtype=torch.float64, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
    assert_same([(str(i), x) for i, x in enumerate(a)], oa, [(str(i), y) for i, y in enumerate(b)], ob,
                 rtol=1e-12, atol=1e-14)
