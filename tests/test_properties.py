"""Property tests (hypothesis) over every public transform and combinator.

Each transform is built as ``tests/test_skipped_steps.py``'s registry builds it (combinators around
a small inner transform, matrix-only transforms masked to matrices) and run in a
``ChainOptimizer`` on params drawn by hypothesis: 0-d, vectors, matrices, conv weights (4-d) and
zero-size tensors, in fp64, fp32, bf16 and fp16, with normal, zero, tiny and huge gradients (a
huge one at the last step). The properties, for every draw:

- finite gradients give finite params and finite state (unless the transform documents otherwise);
- zero-size params are taken: the step runs, they stay as they are and their state stays finite;
- every state entry keeps its shape and dtype from one step to the next, and fp16/bf16 params
  keep fp32 state;
- ``Transform.update`` used alone returns tensors that share no memory with a state buffer or a
  gradient.

The draws are derandomized, so a failure is the same failure on every run. Every transform must
hold every property: none is exempt.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from test_skipped_steps import NAMES, _factory

from gradchain import ChainOptimizer

SHAPES = [(), (1,), (5,), (3, 4), (4, 3), (6, 1), (2, 3, 2, 2)]
EMPTY = [(0,), (0, 4), (4, 0), (0, 0), (0, 3, 2, 2)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["normal", "zero", "tiny", "huge", "mixed"]
# huge: squares and sums of squares of the gradient stay in range (fp16 params: the steps too)
HUGE = {torch.float64: 1e15, torch.float32: 1e15, torch.bfloat16: 1e15, torch.float16: 1e3}
TINY = {torch.float64: 1e-30, torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-6}

# explicit examples first (every transform meets them), then drawn ones; no shrinking: a failing
# draw is reported as drawn (shrinking a slow chain costs minutes)
PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))


def _grad(shape: tuple, dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "mixed":
        kind = ["normal", "zero", "tiny", "huge"][int(torch.randint(4, (), generator=gen))]
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "zero":
        g = torch.zeros(shape, dtype=torch.float64)
    elif kind == "tiny":
        g = g * TINY[dtype]
    elif kind == "huge":
        g = g * HUGE[dtype]
    return g.to(dtype)


def _run(name: str, shapes: list, dtype: torch.dtype, kind: str, steps: int, seed: int) -> tuple:
    """``steps`` steps of the transform on params of ``shapes``; returns params, optimizer, state history."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(dtype))
              for s in shapes]
    opt = ChainOptimizer([(f"p{i}", p) for i, p in enumerate(params)], _factory(name)())
    history = []
    for i in range(steps):
        # huge (and mixed) gradients come last: a transform without a learning rate would grow the
        # params by the gradient's size at every step, and overflow no matter what it does
        now = kind if kind in ("zero", "tiny") or i == steps - 1 else "normal"
        for p in params:
            p.grad = _grad(tuple(p.shape), dtype, now, gen)
        opt.step(loss=torch.tensor(1.0))
        history.append([{k: (tuple(v.shape), v.dtype) for k, v in opt.state.get(p, {}).items()} for p in params])
    return params, opt, history


def _nonfinite_state(opt: ChainOptimizer, params: list) -> list[str]:
    bad = []
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                bad.append(f"p{i} {tuple(p.shape)}: {k}")
    for k, v in opt.global_state.items():
        if not torch.isfinite(v).all():
            bad.append(f"optimizer-level {k}")
    return bad


draw_shapes = st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3)
draw_empty = st.lists(st.sampled_from(EMPTY), min_size=1, max_size=2)
draw_dtype = st.sampled_from(DTYPES)
draw_kind = st.sampled_from(KINDS)
draw_steps = st.integers(1, 3)
draw_seed = st.integers(0, 2**16)


# -- finite in, finite out ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(shapes=draw_shapes, dtype=draw_dtype, kind=draw_kind, steps=draw_steps, seed=draw_seed)
@example(shapes=[(), (2, 3, 2, 2), (3, 4)], dtype=torch.float16, kind="huge", steps=3, seed=0)
@example(shapes=[(), (5,), (4, 3)], dtype=torch.bfloat16, kind="zero", steps=2, seed=0)
def test_finite_grads_give_finite_params_and_state(name, shapes, dtype, kind, steps, seed) -> None:
    params, opt, _ = _run(name, shapes, dtype, kind, steps, seed)
    for i, p in enumerate(params):
        assert torch.isfinite(p).all(), f"{name}: param p{i} {tuple(p.shape)} {dtype} not finite after {kind} grads"
    bad = _nonfinite_state(opt, params)
    assert not bad, f"{name}: non-finite state after finite {kind} grads ({dtype}): {bad}"


# -- zero-size params -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(shapes=draw_shapes, empty=draw_empty, dtype=draw_dtype, steps=draw_steps, seed=draw_seed)
@example(shapes=[(3, 4), ()], empty=[(0, 4), (4, 0)], dtype=torch.float32, steps=2, seed=0)
@example(shapes=[(2, 3, 2, 2)], empty=[(0, 0), (0,)], dtype=torch.float64, steps=2, seed=0)
@example(shapes=[(4, 3)], empty=[(0, 3, 2, 2)], dtype=torch.float32, steps=2, seed=0)
def test_zero_size_params_are_taken_and_left_alone(name, shapes, empty, dtype, steps, seed) -> None:
    params, opt, _ = _run(name, [*empty, *shapes], dtype, "normal", steps, seed)
    for p, s in zip(params, [*empty, *shapes]):
        assert p.shape == torch.Size(s) and p.dtype == dtype
    bad = _nonfinite_state(opt, params[: len(empty)])
    assert not bad, f"{name}: non-finite state for zero-size params: {bad}"


# -- state shapes and dtypes ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(shapes=draw_shapes, dtype=draw_dtype, kind=draw_kind, seed=draw_seed)
@example(shapes=[(), (2, 3, 2, 2), (3, 4)], dtype=torch.bfloat16, kind="mixed", seed=0)
def test_state_keeps_its_shapes_and_dtypes(name, shapes, dtype, kind, seed) -> None:
    params, opt, history = _run(name, shapes, dtype, kind, 3, seed)
    for i, p in enumerate(params):
        assert p.dtype == dtype
        for step, entries in enumerate(history[1:], 2):
            assert entries[i] == history[0][i], (
                f"{name}: state of p{i} {tuple(p.shape)} changed from {history[0][i]} to {entries[i]} at step {step}")
        if dtype in (torch.float16, torch.bfloat16):
            for k, (shape, dt) in history[-1][i].items():
                # 0-d entries (counters, per-tensor scalars) may be float64 host scalars
                assert k == "step" or not dt.is_floating_point or dt == torch.float32 or shape == (), (
                    f"{name}: state {k} of a {dtype} param is {dt}, not fp32")


# -- standalone update ----------------------------------------------------------------------------
def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(shapes=draw_shapes, dtype=draw_dtype, seed=draw_seed)
@example(shapes=[(), (5,), (3, 4), (2, 3, 2, 2)], dtype=torch.float32, seed=0)
def test_standalone_update_returns_no_state_buffer(name, shapes, dtype, seed) -> None:
    t = _factory(name)()
    if any(hasattr(leaf, "init_global_state") for leaf in t.leaves()):
        pytest.skip("keeps optimizer-level state: runs in a ChainOptimizer only")
    gen = torch.Generator().manual_seed(seed)
    params = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(dtype) for s in shapes]
    names = [f"p{i}" for i in range(len(shapes))]
    state = t.init(params, names)
    for step in range(2):
        grads = [_grad(tuple(p.shape), dtype, "normal", gen) for p in params]
        updates = t.update(grads, state, params, loss=1.0, names=names)
        for i, u in enumerate(updates):
            for j, entries in enumerate(state):
                for k, v in entries.items():
                    assert not (isinstance(v, torch.Tensor) and _shares_memory(u, v)), (
                        f"{name}: the update of p{i} shares memory with state {k} of p{j} (step {step + 1})")
            for j, g in enumerate(grads):
                assert not _shares_memory(u, g), f"{name}: the update of p{i} is the gradient of p{j}"
        params = [p + u.to(p.dtype) for p, u in zip(params, updates)]
