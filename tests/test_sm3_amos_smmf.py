"""SM3, Amos and SMMF: each transform against a float64 reference from the spec; bit packing; recipes."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

import gradchain as gc
from gradchain import recipes
from gradchain.transforms import _smmf_steps


def unit_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Amos ``shape_fn``: one v and b per output unit (module level, so the FSDP2 check can pickle it)."""
    return shape[:1] + (1,) * (len(shape) - 1)


CASES = [
    RecipeCase("sm3", partial(recipes.sm3)),
    RecipeCase("sm3_momentum_ema", partial(recipes.sm3, momentum=0.9, b2=0.99)),
    RecipeCase("amos", partial(recipes.amos, lr=0.05)),
    RecipeCase("amos_units_momentum", partial(recipes.amos, lr=0.05, momentum=0.9, shape_fn=unit_shape)),
    RecipeCase("smmf", partial(recipes.smmf, lr=1e-2, weight_decay=0.01)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)


def _grads(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(shape, generator=g, dtype=torch.float64)
            for _ in range(n)]


def _close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = 1e-12) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-14)


SHAPES = [(), (5,), (4, 3), (4, 3, 2)]


# -- SM3 (docs/families/sm3.md), element by element ------------------------------------------------
def ref_sm3(gs: list[torch.Tensor], b2: float = 1.0, eps: float = 1e-8) -> list[torch.Tensor]:
    shape = tuple(gs[0].shape)
    nd = len(shape)
    cover = nd >= 2
    accs = [[0.0] * n for n in shape] if cover else None
    full = torch.zeros(shape, dtype=torch.float64)
    out = []
    for g in gs:
        nu = torch.zeros(shape, dtype=torch.float64)
        for idx in itertools.product(*[range(n) for n in shape]):
            low = min(accs[a][idx[a]] for a in range(nd)) if cover else float(full[idx])
            g2 = float(g[idx]) ** 2
            nu[idx] = low + g2 if b2 == 1.0 else b2 * low + (1 - b2) * g2
        if cover:
            for a in range(nd):
                for j in range(shape[a]):
                    accs[a][j] = max(float(nu[idx]) for idx in itertools.product(*[range(n) for n in shape])
                                     if idx[a] == j)
        else:
            full = nu.clone()
        u = torch.zeros(shape, dtype=torch.float64)
        for idx in itertools.product(*[range(n) for n in shape]):
            if nu[idx] > 0:
                u[idx] = g[idx] / math.sqrt(float(nu[idx]) + eps)
        out.append(u)
    return out


def _run(t: gc.Transform, gs: list[torch.Tensor], p: torch.Tensor | None = None, **hp) -> list[torch.Tensor]:
    p = torch.zeros_like(gs[0]) if p is None else p
    state = t.init([p])
    return [t.update([g], state, [p], **hp)[0] for g in gs]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("b2", [1.0, 0.9])
def test_sm3_matches_reference(shape: tuple[int, ...], b2: float) -> None:
    gs = _grads(shape)
    gs[1] = gs[1] * 0  # a zero gradient: nu stays at its minimum
    _close(_run(gc.scale_by_sm3(b2=b2), gs), ref_sm3(gs, b2))


def test_sm3_state_and_edges() -> None:
    st = gc.scale_by_sm3().init_state(torch.zeros(64, 32, 3, 3))
    assert {k: tuple(v.shape) for k, v in st.items()} == {
        "sm3.acc_0": (64, 1, 1, 1), "sm3.acc_1": (1, 32, 1, 1), "sm3.acc_2": (1, 1, 3, 1), "sm3.acc_3": (1, 1, 1, 3)}
    # all-zero gradients from the start: 0/0 is 0, not NaN
    (u,) = _run(gc.scale_by_sm3(eps=0.0), [torch.zeros(4, 3)])
    assert torch.equal(u, torch.zeros(4, 3))
    # bf16 params: fp32 state and math
    t = gc.scale_by_sm3()
    p = torch.zeros(4, 3, 2, dtype=torch.bfloat16)
    state = t.init([p])
    gs = _grads((4, 3, 2), 2)
    got = [t.update([g.bfloat16()], state, [p])[0] for g in gs]
    assert all(v.dtype == torch.float32 for k, v in state[0].items() if k != "step")
    _close([x.double() for x in got], ref_sm3([g.bfloat16().double() for g in gs]), rtol=1e-5)


@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_sm3_mixed_bucket_equals_one_tensor_at_a_time(eps: float) -> None:
    # the vectors of a bucket take list ops together, the other tensors a loop: neither may see the other
    shapes = [(4, 3), (5,), (), (0,), (4, 3, 2), (7,)]
    gss = [_grads(s, 3, seed) for seed, s in enumerate(shapes)]
    for gs in gss:
        gs[1] = gs[1] * 0  # a zero gradient (with eps = 0: 0, not 0/0)
    t = gc.scale_by_sm3(eps=eps)
    ps = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    state = t.init(ps)
    together = [t.update([gs[k] for gs in gss], state, ps) for k in range(3)]
    for j, gs in enumerate(gss):
        for k, alone in enumerate(_run(t, gs)):
            assert torch.equal(together[k][j], alone)



@pytest.mark.parametrize("b2", [1.0, 0.9])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_sm3_in_row_blocks_matches_reference(b2: float, eps: float, monkeypatch) -> None:
    # eagerly on a CPU nu is formed a block of rows at a time, for the accumulators and again for the
    # divisor in the final write: blocks of 8 elements here, several per tensor, the last one short
    monkeypatch.setattr(gc.base, "WRITE_BLOCK", 8)
    shapes = [(7, 3), (5, 2, 3), (9,), (6, 1), (10, 1), (0, 4)]
    gss = [_grads(s, 4, seed) for seed, s in enumerate(shapes)]
    for gs in gss:
        gs[1] = gs[1] * 0  # a zero gradient (with eps = 0: 0, not 0/0)
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
    opt = gc.ChainOptimizer(params, recipes.sm3(lr=0.1, b2=b2, eps=eps))
    for k in range(4):
        for p, gs in zip(params, gss):
            p.grad = gs[k].clone()
        opt.step()
    for p, gs in zip(params, gss):
        want = -0.1 * torch.stack(ref_sm3(gs, b2, eps)).sum(0) if gs[0].numel() else torch.zeros(gs[0].shape)
        torch.testing.assert_close(p.detach(), want.double(), rtol=1e-12, atol=1e-14)


# -- Amos (docs/families/amos.md, jestimator's rule) ------------------------------------------------------
def ref_amos(gs, theta, xi, eta, beta=0.999, zeta=0.25, fr=1.0, eps=2.0**-125, per_unit=False):
    """Returns the sequence of params; v, b scalars (or per row of dim 0)."""
    theta = theta.clone()
    rows = theta.shape[0] if per_unit else 1
    v, b = [0.0] * rows, [0.0] * rows
    out = []
    for t, g in enumerate(gs, 1):
        new = theta.clone()
        for k in range(rows):
            gk, th = (g[k], theta[k]) if per_unit else (g, theta)
            g2 = float((gk * gk).sum()) / gk.numel()
            v[k] = beta * v[k] + (1 - beta) * g2
            r = (1 - beta**t) / max(v[k], eps)
            gamma = math.sqrt(fr) / math.sqrt(1 + zeta * math.sqrt(xi) * b[k]) * xi**2 * r * g2
            lr = xi * eta
            step = fr / (1 + zeta * math.sqrt(lr) * b[k]) * (-lr * math.sqrt(r) * gk - 0.5 * gamma * th)
            if per_unit:
                new[k] = th + step
            else:
                new = th + step
            b[k] = b[k] + gamma * (fr + b[k])
        theta = new
        out.append(theta.clone())
    return out


def _amos_params(t: gc.Transform, gs: list[torch.Tensor], p: torch.Tensor, **hp) -> list[torch.Tensor]:
    p = p.clone()
    state = t.init([p])
    out = []
    for g in gs:
        (u,) = t.update([g], state, [p], **hp)
        p = p + u
        out.append(p.clone())
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_amos_matches_reference(shape: tuple[int, ...]) -> None:
    gs = _grads(shape, 5)
    p = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eta = gc.amos_default_eta(None, shape)
    assert eta == (0.5 if len(shape) <= 1 else math.sqrt(2 / math.prod(shape[1:])))
    t = gc.scale_by_amos(0.05, beta=0.9)
    _close(_amos_params(t, gs, p), ref_amos(gs, p, 0.05, eta, beta=0.9))
    # a custom eta_fn, zeta and finetune rate
    t = gc.scale_by_amos(0.02, 0.99, 0.5, 0.7, eta_fn=lambda name, s: 0.3)
    _close(_amos_params(t, gs, p), ref_amos(gs, p, 0.02, 0.3, beta=0.99, zeta=0.5, fr=0.7))
    if len(shape) >= 1:
        t = gc.scale_by_amos(0.05, beta=0.9, shape_fn=unit_shape)
        _close(_amos_params(t, gs, p), ref_amos(gs, p, 0.05, eta, beta=0.9, per_unit=True))


def test_amos_state_and_edges() -> None:
    t = gc.scale_by_amos()
    st = t.init_state(torch.zeros(64, 32))
    assert {k: tuple(v.shape) for k, v in st.items()} == {"amos.v": (), "amos.b": ()}
    assert st["amos.v"].dtype == torch.float32 and t.init_state(torch.zeros(3, dtype=torch.float64))["amos.v"].dtype \
        == torch.float64
    with pytest.raises(ValueError, match="shape_fn"):
        gc.scale_by_amos(shape_fn=lambda s: (2,) + s[1:]).init_state(torch.zeros(4, 3))
    # zero gradient: r is huge but gamma = 0 and the gradient term is 0, so the step is exactly 0
    p = torch.randn(4, 3)
    us = _run(gc.scale_by_amos(), [torch.zeros(4, 3)] * 2, p)
    assert all(torch.equal(u, torch.zeros(4, 3)) for u in us)
    # bf16 params: fp32 state and math
    p = torch.randn(4, 3).bfloat16()
    state = t.init([p])
    (u,) = t.update([torch.randn(4, 3).bfloat16()], state, [p])
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    assert all(v.dtype == torch.float32 for k, v in state[0].items() if k != "step")


# -- SMMF (docs/families/smmf.md; the official code's semantics, dense bool signs) ---------------------------
def ref_smmf(gs, beta=0.9, growth=0.999, decay=-0.5, eps=1e-8):
    n = gs[0].numel()
    c = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    r = n // c
    mr, mc, vr, vc = (torch.zeros(k, dtype=torch.float64) for k in (r, c, r, c))
    sign = torch.zeros(r, c, dtype=torch.bool)
    out = []
    for t, g in enumerate(gs, 1):
        gm = g.reshape(r, c)
        m = torch.outer(mr, mc)
        m = torch.where(sign, m, -m)
        v = torch.outer(vr, vc)
        b1 = beta * growth ** (t - 1)
        b2 = 1 - t**decay
        m = b1 * m + (1 - b1) * gm
        v = b2 * v + (1 - b2) * gm * gm
        out.append((m / (v.sqrt() + eps)).reshape(g.shape))
        sign = m > 0
        a = m.abs()
        mr, mc = a.sum(1), a.sum(0) / a.sum() if a.sum() != 0 else a.sum(0)
        vr, vc = v.sum(1), v.sum(0) / v.sum() if v.sum() != 0 else v.sum(0)
    return out


@pytest.mark.parametrize("shape", [(), (7,), (16,), (6, 4), (5, 2, 3, 3)], ids=str)
def test_smmf_matches_reference(shape: tuple[int, ...]) -> None:
    gs = _grads(shape, 5)
    _close(_run(gc.scale_by_smmf(), gs), ref_smmf(gs))
    _close(_run(gc.scale_by_smmf(0.8, 0.99, -0.8, 1e-6), gs), ref_smmf(gs, 0.8, 0.99, -0.8, 1e-6))
    # the first step is 0.1 sign(g) up to eps (no bias correction of M)
    (u,) = _run(gc.scale_by_smmf(), gs[:1])
    torch.testing.assert_close(u, 0.1 * gs[0] / (gs[0].abs() + 1e-8), rtol=1e-12, atol=0)


def test_smmf_state_is_packed_and_small() -> None:
    assert gc.square_shape(90) == (10, 9) and gc.square_shape(7) == (7, 1) and gc.square_shape(1) == (1, 1)
    p = torch.zeros(1024, 768)
    st = gc.scale_by_smmf().init_state(p)
    assert st["smmf.sign"].dtype == torch.uint8 and st["smmf.sign"].numel() == p.numel() // 8
    r, c = gc.square_shape(p.numel())
    assert {k: v.numel() for k, v in st.items() if k != "smmf.sign"} == {
        "smmf.m_row": r, "smmf.m_col": c, "smmf.v_row": r, "smmf.v_col": c}
    nbytes = sum(v.numel() * v.element_size() for v in st.values())
    assert nbytes == 4 * 2 * (r + c) + p.numel() // 8  # 1 bit per sign
    assert nbytes / (p.numel() * 4) < 0.04
    # zero gradients: all-zero factors (the NNMF skips the division by 0), update 0
    us = _run(gc.scale_by_smmf(), [torch.zeros(6, 4)] * 3)
    assert all(torch.equal(u, torch.zeros(6, 4)) for u in us)
    # bf16 params: fp32 factors, uint8 signs
    t = gc.scale_by_smmf()
    pb = torch.zeros(6, 4, dtype=torch.bfloat16)
    state = t.init([pb])
    gs = _grads((6, 4), 3)
    got = [t.update([g.bfloat16()], state, [pb])[0] for g in gs]
    assert state[0]["smmf.m_row"].dtype == torch.float32 and state[0]["smmf.sign"].dtype == torch.uint8
    _close([x.double() for x in got], ref_smmf([g.bfloat16().double() for g in gs]), rtol=1e-5)


@pytest.mark.parametrize("shape", [(30, 20), (1001,), (9, 8)], ids=str)
def test_smmf_in_row_blocks_matches_reference(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    # a tensor larger than a block is stepped a block of rows at a time: (25, 24) in blocks of 2
    # rows; (77, 13) of 8 rows, the last 5 rows ending mid-byte; (9, 8) of 8 rows
    monkeypatch.setattr(_smmf_steps, "WRITE_BLOCK", 64)
    gs = _grads(shape, 5)
    _close(_run(gc.scale_by_smmf(), gs), ref_smmf(gs))


def test_smmf_tensors_stepped_together_keep_their_bits() -> None:
    # the eager step batches tensors (their signs in one buffer, a piece per tensor from its first
    # byte on) and runs list ops over them: each tensor gets the bits of its step alone, also
    # when the step counts differ
    shapes = [(7,), (5, 3), (16,), (), (4, 4, 3), (0,), (33,)]
    t = gc.scale_by_smmf()
    ps = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    alone, together = [t.init([p]) for p in ps], [t.init([p])[0] for p in ps]
    for k in range(4):
        gs = [_grads(s, 1, seed=10 * k + i)[0] for i, s in enumerate(shapes)]
        live = [i for i in range(len(shapes)) if not (k == 1 and i % 2)]  # odd ones skip a step
        got = t.update([gs[i] for i in live], [together[i] for i in live], [ps[i] for i in live])
        for i, u in zip(live, got, strict=True):
            assert torch.equal(u, t.update([gs[i]], alone[i], [ps[i]])[0]), (k, shapes[i])
    for (a,), b in zip(alone, together, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a), a["smmf.m_row"].shape


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001])
def test_bit_packing_round_trip(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = gc.pack_signs(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(gc.unpack_signs(packed, n), mask)
    m2 = mask.reshape(1, n) if n else mask
    assert torch.equal(gc.unpack_signs(gc.pack_signs(m2), n), mask)


def test_bit_order() -> None:
    first = torch.zeros(8, dtype=torch.bool)
    first[0] = True
    last = torch.zeros(8, dtype=torch.bool)
    last[7] = True
    assert gc.pack_signs(first).tolist() == [1] and gc.pack_signs(last).tolist() == [128]
    assert gc.pack_signs(torch.ones(10, dtype=torch.bool)).tolist() == [255, 3]
