"""SMMF on the fused path: each large param compiled alone (``elementwise_for``: no shape is
elementwise), the others eager; the compiled step equals the eager one, state and packed signs
included; checkpoints cross the paths; the packing forms of both steps agree with ``pack_signs``."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from test_fused import assert_same, user_step_runs
from torch import nn

import gradchain as gc
from gradchain import recipes
from gradchain.fused import runner
from gradchain.transforms import _smmf_steps, smmf

# square shapes (square_shape of the numel): (40, 32) whole groups of 16 per row but not of 16
# rows; (64, 48) both; (15, 7) and (12, 10) neither, with 105 and 33 elements not whole bytes
SHAPES = [(40, 32), (64, 48), (5, 7, 3), (2, 3, 4, 5), (33,)]


def make(dtype: torch.dtype, shapes: list[tuple[int, ...]] = SHAPES) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    return [(f"p{i}", nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)))
            for i, s in enumerate(shapes)]


def grads(named: list, step: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, (_, p) in enumerate(named):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        if step == 0 and i == 1:
            grad.zero_()  # all-zero moments: the factors keep 0 (no division by a zero total)
        p.grad = grad


def build() -> gc.Transform:
    return recipes.smmf(lr=1e-2, weight_decay=0.1)


def run(fused: bool, dtype: torch.dtype, steps: int = 6, named: list | None = None,
        opt: gc.ChainOptimizer | None = None, first: int = 0):
    named = make(dtype) if named is None else named
    opt = gc.ChainOptimizer(named, build(), fused=fused) if opt is None else opt
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the uncompiled step fails
        for i in range(first, first + steps):
            grads(named, i, dtype)
            opt.step()
    return named, opt


def assert_signs_equal(a, b) -> None:
    for (n, p), (_, q) in zip(a[0], b[0], strict=True):
        assert torch.equal(a[1].state[p]["smmf.sign"], b[1].state[q]["smmf.sign"]), n


@pytest.fixture
def per_tensor(monkeypatch):
    """Every test param large enough to be compiled alone, traced with ``aot_eager``."""
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)


def test_plan_compiles_smmf_one_large_param_at_a_time(monkeypatch) -> None:
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 1000)  # (40, 32) and (64, 48) are large
    named = make(torch.float32)
    opt = gc.ChainOptimizer(named, build(), fused=True)
    names = [f"[tensor]{t.name}" for t in build().leaves()]
    assert ("compiled", names) in opt.fused_plan()
    assert ("eager", [n.replace("[tensor]", "[eager]") for n in names]) in opt.fused_plan()
    grads(named, 0, torch.float32)
    opt.step()
    routes = {tuple(p.shape): key[3][1] for key, fb in opt._flats.items() for p in fb.params}
    assert routes == {s: "tensor" if torch.Size(s).numel() >= 1000 else "eager" for s in SHAPES}


@pytest.mark.parametrize(("static_shapes", "dtype"), [(6, torch.float64), (6, torch.float32), (1, torch.float64)],
                         ids=str)
def test_fused_equals_eager(static_shapes: int, dtype: torch.dtype, per_tensor, monkeypatch) -> None:
    # 1: past the first shape, one kernel with symbolic sizes per ndim
    monkeypatch.setattr(runner, "PER_TENSOR_STATIC_SHAPES", static_shapes)
    a = run(False, dtype)
    b = run(True, dtype)
    assert b[1].compile_seconds > 0
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    assert_same(*a, *b, rtol=rtol, atol=atol)
    assert_signs_equal(a, b)
    seg = b[1]._fused_chain.chains[(None, "tensor")].segments[0]
    assert not seg._failed and len(seg.static_shapes) == min(static_shapes, len(SHAPES))
    if static_shapes == len(SHAPES) + 1:
        # each kernel took its param as SMMF's square matrix (tensor_view), not in the param's shape
        assert seg.static_shapes == {smmf.square_shape(math.prod(s)) for s in SHAPES}


def test_a_stateful_transform_after_smmf_keeps_the_params_shape(per_tensor) -> None:
    # momentum's buffer has the param's shape: the segment is not given the square view
    def chain() -> gc.Transform:
        return gc.chain(smmf.scale_by_smmf(), gc.trace(0.5), gc.scale_by_lr(1e-2))

    results = []
    for fused in (False, True):
        named = make(torch.float64)
        opt = gc.ChainOptimizer(named, chain(), fused=fused)
        results.append(run(fused, torch.float64, steps=3, named=named, opt=opt))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)
    seg = results[1][1]._fused_chain.chains[(None, "tensor")].segments[0]
    assert seg.tensor_view is None and not seg._failed
    assert seg.static_shapes == {tuple(s) for s in SHAPES}


def test_inductor_kernels_equal_eager(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(runner, "PER_TENSOR_MIN_NUMEL", 0)
    # both forms: rows of whole groups of 16 (each column one lane), and not
    shapes = [(40, 32), (5, 7, 3)]
    a = run(False, torch.float32, steps=4, named=make(torch.float32, shapes))
    b = run(True, torch.float32, steps=4, named=make(torch.float32, shapes))
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)
    assert_signs_equal(a, b)


def test_compiled_user_step_has_no_graph_break() -> None:
    # torch.compile of a step that calls opt.step(): every param through the traced step, whatever
    # its size (a scalar, a vector, rows of groups of 16 or not)
    shapes = [(), (33,), (40, 32), (5, 7, 3)]
    results = user_step_runs(lambda: make(torch.float64, shapes), build,
                             lambda named, i: grads(named, i, torch.float64))
    assert_same(*results[0], *results[1], rtol=1e-12, atol=1e-14)
    assert_signs_equal(*results)


def _saved(opt: gc.ChainOptimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def test_eager_checkpoint_continues_on_the_fused_path(per_tensor) -> None:
    named, opt = run(False, torch.float64, steps=3)
    state = _saved(opt)
    resumed = make(torch.float64)
    for (_, p), (_, q) in zip(resumed, named, strict=True):
        p.data.copy_(q.detach())
    fused = gc.ChainOptimizer(resumed, build(), fused=True)
    fused.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    a = run(False, torch.float64, steps=3, named=named, opt=opt, first=3)
    b = run(True, torch.float64, steps=3, named=resumed, opt=fused, first=3)
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    assert_signs_equal(a, b)


# -- the packing forms of the two steps, against pack_signs / unpack_signs ------------------------------
def _masks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for n in range(71):
        yield n, torch.rand(n, generator=g) < torch.rand((), generator=g)  # densities from 0 to 1


def test_eager_sign_forms_round_trip() -> None:
    masks = [m for _, m in _masks()]
    packed = [gc.pack_signs(m) for m in masks]
    nonempty = [p for p in packed if p.numel()]
    flat = _smmf_steps._signs(nonempty, torch.float32)
    assert set(flat.unique().tolist()) == {-1.0, 1.0}
    # each mask's signs at its first byte's place, as many as its bytes hold
    pos = iter(flat.split([8 * p.numel() for p in nonempty]))
    for m, p in zip(masks, packed, strict=True):
        if p.numel():
            assert torch.equal(next(pos)[: m.numel()] > 0, m)
    out = [torch.full_like(p, 0xA5) for p in nonempty]
    _smmf_steps._pack_positive(flat, out)
    assert all(torch.equal(o, p) for o, p in zip(out, nonempty, strict=True))


def test_traced_sign_forms_round_trip() -> None:
    # the square shapes of 0..70 elements (no row is whole groups of 16), then rows that are
    shapes = [gc.square_shape(n) for n in range(71)] + [(r, c) for r in (1, 2, 3, 5) for c in (16, 32, 48)]
    g = torch.Generator().manual_seed(1)
    for r, c in shapes:
        mask = torch.rand(r, c, generator=g) < torch.rand((), generator=g)
        packed = gc.pack_signs(mask)
        assert torch.equal(_smmf_steps._signs_traced(packed, r, c), mask), (r, c)
        assert torch.equal(_smmf_steps._pack_traced(mask, packed.numel()), packed), (r, c)
