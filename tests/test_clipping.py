"""AGC, soft clip, per-tensor and global norm clipping against float64 references written here."""

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


def _units(x: torch.Tensor) -> list:
    """Index of every unit: the rows of dim 0, or the whole tensor when ndim <= 1."""
    return [(i,) for i in range(x.shape[0])] if x.ndim > 1 else [...]


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).sum()))


def agc_reference(g: torch.Tensor, w: torch.Tensor, lam: float, eps: float, rms: bool = False) -> torch.Tensor:
    """The AGC rule of Brock et al. per unit, with Python floats."""
    out = g.clone()
    for idx in _units(g):
        gi, wi = g[idx], w[idx]
        count = gi.numel() if rms else 1
        gn, wn = _norm(gi) / math.sqrt(count), _norm(wi) / math.sqrt(count)
        wstar = max(wn, eps)
        if gn / wstar > lam:
            out[idx] = gi * (lam * wstar / gn)
    return out


def soft_clip_reference(g: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The article's soft clip as written: rms_w, rms_g floored at eps, G * min(rms_g, rms_w) / rms_g."""
    out = g.clone()
    for idx in _units(g):
        gi, wi = g[idx], w[idx]
        n = gi.numel()
        rms_w = max(_norm(wi) / math.sqrt(n), eps)
        rms_g = max(_norm(gi) / math.sqrt(n), eps)
        out[idx] = gi * (min(rms_g, rms_w) / rms_g)
    return out


def _tensors(seed: int = 0) -> tuple[list, list]:
    """A conv weight (out, in, kh, kw) with rows at mixed scales, a 1-d bias, a zero bias, a 0-d gain."""
    g = torch.Generator().manual_seed(seed)
    w_conv = torch.randn(6, 3, 3, 3, generator=g, dtype=F64)
    row_scales = torch.tensor([1e-3, 0.01, 0.1, 1, 10, 0], dtype=F64).view(6, 1, 1, 1)
    g_conv = torch.randn(6, 3, 3, 3, generator=g, dtype=F64) * row_scales
    w_bias, g_bias = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    w_zero, g_zero = torch.zeros(4, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    w_gain, g_gain = torch.tensor(0.5, dtype=F64), torch.tensor(-2.0, dtype=F64)
    return [w_conv, w_bias, w_zero, w_gain], [g_conv, g_bias, g_zero, g_gain]


def _run(t: gc.Transform, params: list, grads: list, **hp) -> list:
    return t.update(grads, t.init(params), params, **hp)


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_agc_per_unit_against_reference(lam: float, norm: str) -> None:
    params, grads = _tensors()
    out = _run(gc.adaptive_grad_clip(lam, 1e-3, norm=norm), params, grads)
    clipped = 0
    for u, g, w in zip(out, grads, params):
        want = agc_reference(g, w, lam, 1e-3, rms=norm == "rms")
        torch.testing.assert_close(u, want, rtol=1e-14, atol=0)
        clipped += sum(not torch.equal(want[i], g[i]) for i in _units(g))
    # both branches are exercised: some units clipped, some (the small and the zero rows) not
    assert 0 < clipped < sum(len(_units(g)) for g in grads)
    # the conv's units are rows: each clipped row's norm is exactly lam * max(||W_i||, eps)
    for i in range(6):
        gi, wi = out[0][i], params[0][i]
        scale = math.sqrt(gi.numel()) if norm == "rms" else 1.0
        assert _norm(gi) / scale <= lam * max(_norm(wi) / scale, 1e-3) * (1 + 1e-14) or torch.equal(gi, grads[0][i])


def test_agc_zero_gradient_and_zero_weight() -> None:
    w = torch.zeros(3, 4, dtype=F64)
    g = torch.zeros(3, 4, dtype=F64)
    g[1] = 1.0
    (u,) = _run(gc.adaptive_grad_clip(0.5, 1e-3), [w], [g])
    assert torch.equal(u[0], g[0]) and torch.equal(u[2], g[2])  # zero rows stay zero, no NaN
    torch.testing.assert_close(u[1].norm(), torch.tensor(0.5 * 1e-3, dtype=F64), rtol=1e-14, atol=0)


def test_agc_unit_dim_override() -> None:
    params, grads = _tensors(1)
    w, g = params[0].flatten(2).transpose(0, 1).contiguous(), grads[0].flatten(2).transpose(0, 1).contiguous()
    (u,) = _run(gc.adaptive_grad_clip(0.1, unit_dim=1), [w], [g])
    want = agc_reference(g.transpose(0, 1), w.transpose(0, 1), 0.1, 1e-3).transpose(0, 1)
    torch.testing.assert_close(u, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("make", [lambda d: gc.adaptive_grad_clip(0.5, unit_dim=d), lambda d: gc.soft_clip(unit_dim=d)],
                         ids=["agc", "soft_clip"])
@pytest.mark.parametrize("unit_dim", [2, -3, 7])
def test_a_unit_dim_out_of_a_params_range_is_refused(make, unit_dim: int, fused: bool, monkeypatch) -> None:
    # unit_dim % ndim clipped a (4, 3) weight along another axis than the one asked for (2 acted
    # as 0, 7 as 1), where torch raises for such a dim; now the step refuses it and moves nothing
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=F64))
    b = torch.nn.Parameter(torch.randn(3, dtype=F64))
    opt = ChainOptimizer([w, b], gc.chain(make(unit_dim), gc.trace(0.9), gc.scale_by_lr(0.1)), fused=fused)
    before = [w.detach().clone(), b.detach().clone()]
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    with pytest.raises(ValueError, match=rf"unit_dim={unit_dim} is out of range for a param of shape \(4, 3\)"):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert all(not st or float(st["step"]) == 0 for st in opt.state.values())
    with pytest.raises(TypeError, match="unit_dim=True must be an int"):
        make(True)


@pytest.mark.parametrize("eps", [1e-3, 1e-12])
def test_soft_clip_is_the_article_rule(eps: float) -> None:
    params, grads = _tensors(2)
    out = _run(gc.soft_clip(eps), params, grads)
    for u, g, w in zip(out, grads, params):
        torch.testing.assert_close(u, soft_clip_reference(g, w, eps), rtol=1e-14, atol=0)
        # ... which is AGC with lambda 1 in RMS form
        torch.testing.assert_close(u, agc_reference(g, w, 1.0, eps, rms=True), rtol=1e-14, atol=0)


def _zero_bias_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 3).double()
    torch.nn.init.zeros_(m.bias)
    return m


def _bias_travel(tr: gc.Transform, steps: int = 5) -> float:
    m = _zero_bias_model()
    opt = ChainOptimizer(m.parameters(), tr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g, dtype=F64), torch.randn(16, 3, generator=g, dtype=F64) + 3.0
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m.bias.abs().max().item()


def test_zero_initialised_bias_trains_under_soft_clip() -> None:
    sgd = lambda eps: gc.chain(gc.soft_clip(eps), gc.scale_by_lr(0.1))  # noqa: E731
    # the default floor: the bias's gradient RMS (~3) is clipped to 1e-3 and the bias moves
    assert _bias_travel(sgd(1e-3)) > 1e-4
    # the article's eps = 1e-12 freezes it: this is why the default differs
    assert _bias_travel(sgd(1e-12)) < 1e-11
    # under AdamW the default gives a full first step (~lr), the article's eps about 1e-4 of it
    assert _bias_travel(recipes.softclip_adamw(lr=0.01, weight_decay=0.0), 1) > 0.5 * 0.01
    assert _bias_travel(recipes.softclip_adamw(lr=0.01, weight_decay=0.0, soft_clip_eps=1e-12), 1) < 1e-5


def test_clip_by_norm_per_tensor() -> None:
    params, grads = _tensors(3)
    out = _run(gc.clip_by_norm(1.5), params, grads)
    for u, g in zip(out, grads):
        n = _norm(g)
        want = g * (1.5 / n) if n > 1.5 else g
        torch.testing.assert_close(u, want, rtol=1e-14, atol=0)
    assert _norm(grads[0]) > 1.5 and _norm(grads[3]) > 1.5 and _norm(grads[1]) < 1.5


def _global_case(max_norms: tuple[float, float]) -> None:
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3)).double()
    groups = [
        {"params": list(model[0].parameters()), "max_norm": max_norms[0]},
        {"params": list(model[2].parameters()), "max_norm": max_norms[1]},
    ]
    opt = ChainOptimizer(groups, gc.chain(gc.clip_by_global_norm(), gc.scale_by_lr(1.0)))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(5, 2, 4, dtype=F64)
    (model(x) ** 2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    total = math.sqrt(sum(_norm(g) ** 2 for g in grads))  # over both groups
    n_first = len(groups[0]["params"])
    for i, (p, b, g) in enumerate(zip(model.parameters(), before, grads)):
        c = max_norms[0] if i < n_first else max_norms[1]
        want = b - (g * (c / total) if total > c else g)
        torch.testing.assert_close(p.detach(), want, rtol=1e-14, atol=1e-15)


def test_clip_by_global_norm_across_two_groups() -> None:
    _global_case((1.0, 1.0))  # clipped: the total norm is far above 1
    _global_case((0.5, 2.0))  # a per-group threshold against the one global norm
    _global_case((1e6, 1e6))  # not clipped: unchanged


def test_clip_by_global_norm_renamed_key() -> None:
    p = torch.nn.Parameter(torch.zeros(4, dtype=F64))
    tr = gc.chain(gc.clip_by_global_norm(1.0).renamed({"max_norm": "clip"}), gc.scale_by_lr(1.0))
    opt = ChainOptimizer([p], tr, clip=0.5)
    assert "clip" in opt.defaults and "max_norm" not in opt.defaults
    p.grad = torch.full((4,), 2.0, dtype=F64)  # norm 4
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.25, dtype=F64), rtol=1e-15, atol=0)


def test_clip_by_global_norm_mixed_dtypes() -> None:
    a = torch.randn(4, 3, dtype=F64)
    b = torch.randn(7, dtype=torch.float32)
    ga, gb = torch.randn(4, 3, dtype=F64) * 3, torch.randn(7, dtype=torch.float32) * 3
    pa, pb = a.clone().requires_grad_(), b.clone().requires_grad_()
    pa.grad, pb.grad = ga.clone(), gb.clone()
    opt = ChainOptimizer([pa, pb], gc.chain(gc.clip_by_global_norm(1.0), gc.scale_by_lr(1.0)))
    opt.step()
    # each bucket's norm is taken in its own dtype (the fp32 one to fp32 precision), then combined in fp64
    total = math.sqrt(_norm(ga) ** 2 + torch.linalg.vector_norm(gb).item() ** 2)
    torch.testing.assert_close(pa.detach(), a - ga / total, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(pb.detach(), b - (gb.double() / total).float(), rtol=1e-6, atol=1e-7)


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="clip_factor"):
        gc.adaptive_grad_clip(0.0)
    with pytest.raises(ValueError, match="agc_eps"):
        gc.adaptive_grad_clip(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="norm"):
        gc.adaptive_grad_clip(norm="l1")
    with pytest.raises(ValueError, match="soft_clip_eps"):
        gc.soft_clip(0.0)
    with pytest.raises(ValueError, match="max_norm"):
        gc.clip_by_norm(-1.0)
    with pytest.raises(ValueError, match="max_norm"):
        ChainOptimizer([torch.zeros(2, requires_grad=True)], gc.clip_by_global_norm(), max_norm=0.0)


# -- recipes against torch.optim on hand-clipped gradients ----------------------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(16, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 2),
    ).double()
    torch.nn.init.zeros_(m[3].bias)
    return m


def _groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": list(model[0].parameters()) + list(model[3].parameters()), "lr": 0.02, "weight_decay": 0.05},
        {"params": list(model[5].parameters())},
    ]


def _parity_gap(torch_opt, recipe, clip, steps: int = 200) -> float:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = torch_opt(_groups(m1)), ChainOptimizer(_groups(m2), recipe)
    s1, s2 = (torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50) for o in (o1, o2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, 4, 4, dtype=F64, generator=g), torch.randn(64, 2, dtype=F64, generator=g)
    gap = 0.0
    for i in range(steps):
        xb, yb = x[i % 8 * 8 :][:8], y[i % 8 * 8 :][:8]
        for m, o, s in ((m1, o1, s1), (m2, o2, s2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(xb), yb).backward()
            if o is o1:
                for p in m.parameters():
                    p.grad.copy_(clip(p.grad, p.detach()))
            o.step()
            s.step()
        gap = max(gap, max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())))
    return gap


def test_agc_sgd_matches_torch_sgd_on_clipped_grads() -> None:
    hp = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    clip = lambda g, w: agc_reference(g, w, 0.05, 1e-3)  # noqa: E731
    gap = _parity_gap(partial(torch.optim.SGD, **hp), recipes.agc_sgd(**hp, clip_factor=0.05), clip)
    assert gap <= 1e-12


def test_softclip_adamw_matches_torch_adamw_on_clipped_grads() -> None:
    clip = lambda g, w: soft_clip_reference(g, w, 1e-3)  # noqa: E731
    gap = _parity_gap(partial(torch.optim.AdamW, lr=0.01), recipes.softclip_adamw(lr=0.01), clip)
    assert gap <= 1e-12


def test_agc_sgd_exclude_leaves_the_head_unclipped() -> None:
    m = _model()
    opt = ChainOptimizer(m.named_parameters(), recipes.agc_sgd(lr=1.0, clip_factor=1e-3, exclude="5.*"))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    torch.nn.functional.mse_loss(m(torch.randn(8, 2, 4, 4, dtype=F64)), torch.randn(8, 2, dtype=F64)).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.step()
    for n, p in m.named_parameters():
        want = grads[n] if n.startswith("5.") else agc_reference(grads[n], before[n], 1e-3, 1e-3)
        torch.testing.assert_close(before[n] - p.detach(), want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="named_parameters"):
        ChainOptimizer(m.parameters(), recipes.agc_sgd(exclude="5.*")).step()


# -- the harness ------------------------------------------------------------------------------------
def global_clip_adam() -> gc.Transform:
    return gc.chain(gc.clip_by_global_norm(0.05), gc.scale_by_adam(), gc.scale_by_lr(1e-2))


def clip_norm_sgd() -> gc.Transform:
    return gc.chain(gc.clip_by_norm(0.05), gc.trace(0.9), gc.scale_by_lr(0.1))


CASES = [
    RecipeCase("agc_sgd", partial(recipes.agc_sgd, lr=0.05, momentum=0.9, nesterov=True, clip_factor=0.02)),
    RecipeCase("agc_sgd_exclude_head", partial(recipes.agc_sgd, lr=0.05, clip_factor=0.02, exclude="head.*")),
    RecipeCase("softclip_adamw", partial(recipes.softclip_adamw, lr=1e-2)),
    RecipeCase("clip_by_global_norm", global_clip_adam),
    RecipeCase("clip_by_norm", clip_norm_sgd),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)
