"""Recipes that compile whole on the fused path: one kernel, the same trajectory as eager.

Adam-atan2 and Sadam (elementwise); NAdam, AdaNorm, AM-AdamW, Amos and schedule-free AdamW/SGD
(per-tensor sums and per-param 0-d state as one vector per bucket); Prodigy (a reduction over every
bucket between two compiled passes).

The whole chain (moments, denominator, decay, lr) must be one compiled segment, and its float32
trajectory must match the eager path's to a few ulps (the eager trajectories themselves are
checked against peers and float64 references in their families' test files).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_fused import assert_same, check_inductor_equals_eager, make_params, resume, saved, set_grads

import gradchain as gc
from gradchain import recipes

FACTORIES = {
    "adam_atan2": lambda: recipes.adam_atan2(lr=1e-2, weight_decay=0.1),
    "adam_atan2_outside": lambda: recipes.adam_atan2(lr=1e-2, weight_decay=0.1, a=2.0, b=0.5,
                                                     m_correction="outside"),
    "sadam": lambda: recipes.sadam(lr=1e-2, weight_decay=0.1),
    # per-param 0-d state (a running product, a norm EMA): one vector in the flat bucket
    "nadam": lambda: recipes.nadam(lr=1e-2, weight_decay=0.1),
    "adanorm": lambda: recipes.adanorm(lr=1e-2, weight_decay=0.1),
    "am_adamw": lambda: recipes.am_adamw(lr=1e-2, weight_decay=0.1),
    "amos": lambda: recipes.amos(lr=1e-2),
    # per-param host sums as vectors; the warmup's branch is a where
    "schedule_free_adamw": lambda: recipes.schedule_free_adamw(warmup_steps=3),
    "schedule_free_sgd": lambda: recipes.schedule_free_sgd(warmup_steps=3),
    # a reduction over every bucket: two compiled passes around one estimate of d
    "prodigy": lambda: recipes.prodigy(weight_decay=0.1, use_bias_correction=True),
    "prodigy_coupled_no_momentum": lambda: recipes.prodigy(betas=(0.0, 0.99), weight_decay=0.1, decouple=False,
                                                           safeguard_warmup=True),
}


def _run(name: str, fused: bool, dtype: torch.dtype, steps: int = 6, change=None):
    named = make_params(dtype)
    opt = gc.ChainOptimizer(named, FACTORIES[name](), fused=fused)
    with warnings.catch_warnings():
        # a segment that fails to trace falls back to eager with a RuntimeWarning: that is a failure here
        warnings.simplefilter("error", RuntimeWarning)
        for i in range(steps):
            if change is not None and i == steps // 2:
                change(opt)
            set_grads(named, i, dtype)
            opt.step()
    return named, opt


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_plan_is_fully_compiled(name: str) -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, FACTORIES[name](), fused=True)
    assert opt.fused_plan() == [("compiled", [t.name for t in opt.transform.leaves()])]


@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-14)])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fused_equals_eager(name: str, dtype: torch.dtype, rtol: float, atol: float) -> None:
    a = _run(name, False, dtype)
    b = _run(name, True, dtype)
    assert b[1].compile_seconds > 0  # the compiled kernel ran, not the eager fallback
    assert_same(*a, *b, rtol=rtol, atol=atol)


def test_sadam_new_softplus_beta_is_honoured_fused() -> None:
    # softplus_beta is static (a Python number for F.softplus): a new value recompiles, never goes stale
    def change(opt):
        opt.param_groups[0]["softplus_beta"] = 5.0

    a = _run("sadam", False, torch.float32, change=change)
    b = _run("sadam", True, torch.float32, change=change)
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)
    c = _run("sadam", False, torch.float32)
    assert not torch.allclose(a[0][1][1], c[0][1][1])  # the change did move the trajectory


@pytest.mark.parametrize("name", ["adam_atan2", "sadam", "schedule_free_adamw", "schedule_free_sgd", "prodigy"])
def test_inductor_kernels_equal_eager(name: str, monkeypatch) -> None:
    check_inductor_equals_eager(_run, name, monkeypatch, steps=4)


def _prodigy_groups(fused: bool, frozen: bool, steps: int = 6):
    # three groups, hence three flat buckets whose sums make one estimate: per-group decay, and a
    # last group frozen with lr 0 (it must neither move nor count)
    named = make_params(torch.float64)
    ps = [p for _, p in named]
    groups = [{"params": ps[:2]}, {"params": ps[2:4], "weight_decay": 0.3}, {"params": ps[4:]}]
    if frozen:
        groups[2]["lr"] = 0.0
    opt = gc.ChainOptimizer(groups, recipes.prodigy(weight_decay=0.05), fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for i in range(steps):
            set_grads(named, i, torch.float64)
            opt.step()
    return named, opt


@pytest.mark.parametrize("frozen", [False, True])
def test_prodigy_estimate_over_groups_fused_equals_eager(frozen: bool) -> None:
    start = [p.detach().clone() for _, p in make_params(torch.float64)]
    a = _prodigy_groups(False, frozen)
    b = _prodigy_groups(True, frozen)
    assert b[1].compile_seconds > 0
    assert_same(*a, *b, rtol=1e-12, atol=1e-14)
    moved = [not torch.equal(p.detach(), s) for (_, p), s in zip(b[0], start)]
    assert moved == [True] * 4 + [not frozen] * (len(moved) - 4)


def test_prodigy_slice_p_runs_eagerly_on_the_fused_path() -> None:
    # slice_p > 1 keeps strided per-tensor slices, which a flat buffer does not hold
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.prodigy(slice_p=3), fused=True)
    assert opt.fused_plan() == [("eager", ["prodigy"])]


@pytest.mark.parametrize("fused", [False, True])
def test_prodigy_groups_that_disagree_are_refused_before_anything_moves(fused: bool) -> None:
    named = make_params(torch.float64)
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer([{"params": ps[:3]}, {"params": ps[3:]}], recipes.prodigy(), fused=fused)
    set_grads(named, 0, torch.float64)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]
    glob = {k: v.clone() for k, v in opt.global_state.items()}
    opt.param_groups[1]["betas"] = (0.8, 0.999)  # one estimate of d needs one beta
    set_grads(named, 1, torch.float64)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    for p, st in zip(ps, state):
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items()), "state (step counts too) moved"
    assert all(torch.equal(opt.global_state[k], v) for k, v in glob.items())


def test_prodigy_fused_lr_schedule_does_not_recompile_and_checkpoints_cross_paths(monkeypatch) -> None:
    # plain Prodigy: its estimate of d grows within these steps
    monkeypatch.setitem(FACTORIES, "prodigy", lambda: recipes.prodigy(weight_decay=0.1))
    a = _run("prodigy", False, torch.float64, steps=3)
    named, opt = resume(a[0], saved(a[1]), FACTORIES["prodigy"], fused=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (a[1], opt)]
    for i in range(3, 8):
        set_grads(named, i, torch.float64)
        set_grads(a[0], i, torch.float64)
        opt.step()
        a[1].step()
        if i == 3:
            graphs, seconds = torch._dynamo.utils.counters["stats"]["unique_graphs"], opt.compile_seconds
        for s in scheds:
            s.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt.compile_seconds == seconds > 0
    assert float(opt.global_state["prodigy.d"]) > 1e-6  # the estimate moved
    assert_same(*a, named, opt, rtol=1e-12, atol=1e-14)
