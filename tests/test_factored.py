"""Adafactor pieces: factored second moment, block-RMS clipping, relative step, param RMS; the recipe."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, lockstep_gap

import gradchain as gc
from gradchain import ChainOptimizer, recipes

CASES = [
    RecipeCase("adafactor", partial(recipes.adafactor, min_dim_size_to_factor=2, weight_decay=0.01)),
    RecipeCase("adafactor_unit_momentum", partial(recipes.adafactor, factored="unit", min_dim_size_to_factor=2,
                                                   momentum=0.9)),
    # dtypes: torch's eps1 is the param dtype's machine eps, so a bf16 run is another algorithm
    # than the float64 one it would be compared with
    RecipeCase("adafactor_torch", partial(recipes.adafactor, torch_compat=True, weight_decay=0.01),
               skip=("dtypes",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)


def _grads(shape: tuple[int, ...], n: int = 4, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # heterogeneous rows and columns, so a wrong axis shows
    return [torch.randn(shape, generator=g, dtype=torch.float64).mul(torch.rand(shape, generator=g) * 3).to(dtype)
            for _ in range(n)]


# -- float64 references written from the paper (docs/families/factored.md) -------------------------------
def ref_factored_matrix(gs: list[torch.Tensor], decay: float = -0.8, eps: float = 1e-30) -> list[torch.Tensor]:
    """Rows index R, columns index C; V = R_i C_j / mean(R); u = g / sqrt(V)."""
    n, m = gs[0].shape
    r, c, out = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), []
    for t, g in enumerate(gs, 1):
        b = 1.0 - t**decay
        q = g * g + eps
        r = b * r + (1 - b) * q.mean(dim=1)
        c = b * c + (1 - b) * q.mean(dim=0)
        v = torch.empty(n, m, dtype=torch.float64)
        for i in range(n):
            for j in range(m):
                v[i, j] = r[i] * c[j] / r.mean()
        out.append(g / v.sqrt())
    return out


def ref_unfactored(gs: list[torch.Tensor], decay: float = -0.8, eps: float = 1e-30) -> list[torch.Tensor]:
    v, out = torch.zeros_like(gs[0]), []
    for t, g in enumerate(gs, 1):
        b = 1.0 - t**decay
        v = b * v + (1 - b) * (g * g + eps)
        out.append(g / v.sqrt())
    return out


def _run(t: gc.Transform, gs: list[torch.Tensor], p: torch.Tensor | None = None, **hp) -> list[torch.Tensor]:
    p = torch.zeros_like(gs[0]) if p is None else p
    state = t.init([p])
    return [t.update([g], state, [p], **hp)[0] for g in gs]


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_factored_matrix_matches_reference() -> None:
    gs = _grads((6, 10))
    _close(_run(gc.scale_by_factored_rms(min_dim_size_to_factor=2), gs), ref_factored_matrix(gs))
    # other beta2_decay and eps (eps given as torch's pair: the first entry is eps1)
    got = _run(gc.scale_by_factored_rms(-0.5, (1e-3, 0.1), min_dim_size_to_factor=2), gs)
    _close(got, ref_factored_matrix(gs, -0.5, 1e-3))


def test_factored_conv_two_largest_and_unit() -> None:
    gs = _grads((6, 4, 3, 3))
    # two largest: dim 1 (rows of R) against dim 0, kernel dims kept as a batch
    got = _run(gc.scale_by_factored_rms(min_dim_size_to_factor=2), gs)
    for a in range(3):
        for b in range(3):
            want = ref_factored_matrix([g[:, :, a, b].T for g in gs])
            _close([x[:, :, a, b].T for x in got], want)
    # unit: (O, I*k*k)
    got = _run(gc.scale_by_factored_rms(factored="unit", min_dim_size_to_factor=2), gs)
    _close([x.reshape(6, 36) for x in got], ref_factored_matrix([g.reshape(6, 36) for g in gs]))
    # last two: the kernel dims (HF/torch), batch over (O, I)
    got = _run(gc.scale_by_factored_rms(factored="last_two", min_dim_size_to_factor=2), gs)
    _close([x[5, 3] for x in got], ref_factored_matrix([g[5, 3] for g in gs]))


@pytest.mark.parametrize("shape", [(), (7,), (6, 10)], ids=str)
def test_unfactored_matches_reference(shape: tuple[int, ...]) -> None:
    gs = _grads(shape)
    # (6, 10) is below optax's default minimum of 128: unfactored
    t = gc.scale_by_factored_rms()
    assert "factored.v" in t.init_state(torch.zeros(shape))
    _close(_run(t, gs), ref_unfactored(gs))


def test_factored_dims_rule() -> None:
    fd = gc.factored_dims
    assert fd((64, 32, 3, 3), "two_largest", 2) == ((1,), (0,))
    assert fd((64, 32, 3, 3), "two_largest", 128) is None
    assert fd((512, 256), "two_largest", 128) == ((1,), (0,))
    assert fd((4, 4), "two_largest", 2) == ((0,), (1,))  # ties: the later dim counts as larger
    assert fd((64, 32, 3, 3), "last_two", 2) == ((2,), (3,))
    assert fd((64, 32, 3, 3), "unit", 2) == ((0,), (1, 2, 3))
    assert fd((3,), "two_largest", 0) is None and fd((), "unit", 0) is None
    with pytest.raises(ValueError, match="factored_dims"):
        gc.scale_by_factored_rms(factored="columns")
    with pytest.raises(ValueError, match="beta2_decay"):
        gc.scale_by_factored_rms(0.8)
    with pytest.raises(ValueError, match="eps"):
        gc.scale_by_factored_rms(eps=(None,))


def test_state_is_sublinear() -> None:
    st = gc.scale_by_factored_rms().init_state(torch.zeros(256, 512))
    assert {k: tuple(v.shape) for k, v in st.items()} == {"factored.row": (256, 1), "factored.col": (1, 512)}


def test_dead_row_and_column_stay_finite() -> None:
    """docs/families/factored.md (numerics): the article's sqrt-last form gives inf/NaN here; ours does not."""
    g = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    g[0] = 0.0
    g[:, 0] = 0.0
    t = gc.scale_by_factored_rms(min_dim_size_to_factor=2)
    p = torch.zeros(64, 128)
    state = t.init([p])
    (u,) = t.update([g], state, [p])
    assert u.dtype == torch.float32 and torch.isfinite(u).all()
    assert (u[0] == 0).all() and (u[:, 0] == 0).all()
    # the same stored R, C in the article's form sqrt((mean R / R_i) / C_j) overflow: the test can fail
    r, c = state[0]["factored.row"], state[0]["factored.col"]
    assert not torch.isfinite(g * torch.sqrt((r.mean() / r) / c)).all()
    # end to end, clipping included (one inf would poison the whole tensor through RMS(U))
    w = torch.nn.Parameter(torch.randn(64, 128))
    opt = ChainOptimizer([w], recipes.adafactor(min_dim_size_to_factor=2))
    w.grad = g.clone()
    opt.step()
    assert torch.isfinite(w).all()


def test_zero_gradients_and_bf16() -> None:
    for shape in [(), (5,), (6, 10), (6, 4, 3, 3)]:
        t = gc.scale_by_factored_rms(min_dim_size_to_factor=2)
        us = _run(t, [torch.zeros(shape)] * 2)
        assert all(torch.isfinite(u).all() and (u == 0).all() for u in us)
        p = torch.zeros(shape, dtype=torch.bfloat16)
        state = t.init([p])
        assert all(v.dtype == torch.float32 for k, v in state[0].items() if k != "step")
        gs = _grads(shape, 3, dtype=torch.bfloat16)
        got = [t.update([g], state, [p])[0] for g in gs]
        want = _run(t, [g.double() for g in gs])
        for a, b in zip(got, want):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_clip_relative_step_param_rms() -> None:
    gs = _grads((6, 10), 3)
    p = torch.randn(6, 10, dtype=torch.float64) * 0.01
    clip = gc.clip_by_block_rms(0.5)
    for g in gs:
        rms = math.sqrt(sum(x * x for x in g.flatten().tolist()) / g.numel())
        want = g / max(1.0, rms / 0.5)
        torch.testing.assert_close(clip.update([g], clip.init([p]), [p])[0], want, rtol=1e-13, atol=0)
    small = gs[0] * 1e-3
    torch.testing.assert_close(clip.update([small], clip.init([p]), [p])[0], small, rtol=0, atol=0)
    for warmup in (False, True):
        rel = gc.scale_by_relative_step(0.3, warmup_init=warmup)
        state = rel.init([p])
        for t, g in enumerate(gs, 1):
            rho = min(0.3, 1e-6 * t, 1 / math.sqrt(t)) if warmup else min(0.3, 1 / math.sqrt(t))
            torch.testing.assert_close(rel.update([g], state, [p])[0], rho * g, rtol=1e-15, atol=0)
    prms = gc.scale_by_param_rms(1e-3)
    rms_p = math.sqrt(sum(x * x for x in p.flatten().tolist()) / p.numel())
    torch.testing.assert_close(prms.update([gs[0]], prms.init([p]), [p])[0], max(1e-3, rms_p) * gs[0], rtol=1e-13,
                               atol=0)
    zero = torch.zeros_like(p)  # zero-initialised params: eps2 sets the scale
    torch.testing.assert_close(prms.update([gs[0]], prms.init([zero]), [zero])[0], 1e-3 * gs[0], rtol=1e-15, atol=0)
    # built with torch's pair (eps1, eps2): the second entry, and the key must stay a pair
    pair = gc.scale_by_param_rms((None, 0.5))
    torch.testing.assert_close(pair.update([gs[0]], pair.init([zero]), [zero])[0], 0.5 * gs[0])
    with pytest.raises(ValueError, match="eps"):
        ChainOptimizer([torch.nn.Parameter(zero)], recipes.adafactor(), eps=1e-3)
    with pytest.raises(ValueError, match="d="):
        gc.clip_by_block_rms(0.0)



@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "d": 1.5}, {"momentum": 0.9}], ids=str)
def test_row_blocks_match_reference(kw: dict, monkeypatch) -> None:
    # eagerly on a CPU the statistics are summed a block of rows at a time and the divisor is left to
    # the final write, which forms it block by block (the clip and the param scale read it pending):
    # blocks of 16 elements here, several per tensor and a short last one, against the float64 reference
    import recipe_references as refs

    monkeypatch.setattr(gc.base, "WRITE_BLOCK", 16)
    shapes = {"tall": (9, 4), "wide": (3, 11), "batched": (5, 3, 4), "vec": (40,), "small": (3,)}
    gen = torch.Generator().manual_seed(0)
    init = {n: 0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    grads = [{n: 3.0 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
             for _ in range(8)]
    params = {n: torch.nn.Parameter(p.clone()) for n, p in init.items()}
    opt = ChainOptimizer(list(params.items()), recipes.adafactor(lr=0.05, min_dim_size_to_factor=3, **kw))
    for gs in grads:
        for n, p in params.items():
            p.grad = gs[n].clone()
        opt.step()
    want, _ = refs.adafactor(init, grads, lr=0.05, min_dim_size_to_factor=3, **kw)
    for n, p in params.items():
        torch.testing.assert_close(p.detach() - init[n], want[n] - init[n], rtol=1e-12, atol=1e-15, msg=n)


# -- torch.optim.Adafactor parity ----------------------------------------------------------------------
class _Net(torch.nn.Module):
    """A 3-d weight (torch factors its last two dims, dim 0 a batch), matrices, biases, a 0-d gain."""

    def __init__(self) -> None:
        super().__init__()
        self.w3 = torch.nn.Parameter(torch.randn(3, 6, 5) / 3)
        self.fc = torch.nn.Linear(15, 9)
        self.head = torch.nn.Linear(9, 2)
        self.gain = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.einsum("bi,kij->bkj", x, self.w3)).flatten(1)
        return self.head(torch.tanh(self.fc(h))) * self.gain


def _groups(m: _Net) -> list[dict]:
    return [
        {"params": [m.w3, *m.fc.parameters()], "lr": 0.02, "weight_decay": 0.05},
        {"params": [*m.head.parameters(), m.gain]},
    ]


SCHEDULERS = {
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[0.05, 0.03], total_steps=200, cycle_momentum=False),
}


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("hp", [{"lr": 0.01, "weight_decay": 0.01},
                                {"lr": 0.05, "d": 1.5, "eps": (1e-20, 1e-2), "beta2_decay": -0.6}], ids=str)
def test_matches_torch_adafactor(hp: dict, sched: str) -> None:
    torch.manual_seed(0)
    m1 = _Net().double()
    m2 = copy.deepcopy(m1)
    w3_init = m1.w3.detach().clone()
    o1 = torch.optim.Adafactor(_groups(m1), **hp)
    o2 = ChainOptimizer(_groups(m2), recipes.adafactor(torch_compat=True, **hp))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64, generator=g)
    y = torch.randn(64, 2, dtype=torch.float64, generator=g)
    gap = lockstep_gap((m1, o1, SCHEDULERS[sched](o1)), (m2, o2, SCHEDULERS[sched](o2)), x, y)
    assert gap <= 1e-12
    assert not torch.equal(m1.w3, w3_init)  # the 3-d (batched last-two-dims) path ran


def test_torch_adafactor_maximize() -> None:
    torch.manual_seed(1)
    m1 = _Net().double()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.Adafactor(m1.parameters(), lr=0.02, maximize=True)
    o2 = ChainOptimizer(m2.parameters(), recipes.adafactor(lr=0.02, torch_compat=True, maximize=True))
    x = torch.randn(8, 6, dtype=torch.float64)
    for _ in range(20):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
