"""Prodigy: float64 lockstep with the official ``prodigyopt.Prodigy``, d estimate included."""

from __future__ import annotations

import contextlib
import io
from functools import partial

import prodigyopt
import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

import gradchain as gc
from gradchain import ChainOptimizer, recipes

STEPS = 120
STRUCTURAL = ("decouple", "use_bias_correction", "safeguard_warmup", "d0", "slice_p")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()


_gen = torch.Generator().manual_seed(1)
X = torch.randn(64, 6, generator=_gen, dtype=torch.float64)
Y = torch.randn(64, 2, generator=_gen, dtype=torch.float64)


def _groups(model: torch.nn.Module, second: dict) -> list[dict]:
    ps = list(model.parameters())
    return [{"params": ps[:2]}, {"params": ps[2:], **second}]


def _rel_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a.parameters(), b.parameters()))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int, zero: bool = False) -> None:
    lo = i % 8 * 8
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X[lo : lo + 8]), Y[lo : lo + 8])
    (loss * 0.0 if zero else loss).backward()
    opt.step()


def _official(params: list, **kw) -> prodigyopt.Prodigy:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line when weight decay is on
        return prodigyopt.Prodigy(params, **kw)


def _lockstep(kw: dict, second: dict, steps: int = STEPS, zero_first: bool = False) -> tuple[float, float]:
    """Largest relative param gap and relative gap of d over ``steps`` steps."""
    ref_model, model = _net(), _net()
    ref = _official(_groups(ref_model, second), **kw)
    ours = ChainOptimizer(_groups(model, second), recipes.prodigy(**kw))
    gap = d_gap = 0.0
    for i in range(steps):
        _step(ref_model, ref, i, zero=zero_first and i == 0)
        _step(model, ours, i, zero=zero_first and i == 0)
        gap = max(gap, _rel_gap(ref_model, model))
        d_ref, d = ref.param_groups[0]["d"], float(ours.global_state["prodigy.d"])
        d_gap = max(d_gap, abs(d - d_ref) / d_ref)
    assert float(ours.global_state["prodigy.k"]) == ref.param_groups[0]["k"]
    return gap, d_gap


CASES = {
    "defaults": ({}, {}),
    "weight_decay": ({"weight_decay": 0.01}, {"weight_decay": 0.05, "eps": 1e-6}),
    "coupled_weight_decay": ({"weight_decay": 0.01, "decouple": False}, {"weight_decay": 0.05}),
    "bias_correction": ({"use_bias_correction": True}, {"eps": 1e-6}),
    "safeguard_warmup": ({"safeguard_warmup": True, "weight_decay": 0.01}, {}),
    "growth_rate_d_coef": ({"growth_rate": 1.02, "d_coef": 0.5}, {}),
    "no_first_moment": ({"betas": (0.0, 0.99)}, {"weight_decay": 0.05}),
    "beta3_slice_p": ({"beta3": 0.9, "slice_p": 3}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_lockstep_with_official(name: str) -> None:
    kw, second = CASES[name]
    gap, d_gap = _lockstep(kw, second)
    assert gap <= 1e-12 and d_gap <= 1e-12, (gap, d_gap)


def test_first_step_without_gradient_signal() -> None:
    """A zero gradient (sum |s|_1 = 0): the official optimizer returns before the step; so does this one."""
    gap, d_gap = _lockstep({}, {}, steps=40, zero_first=True)
    assert gap <= 1e-12 and d_gap <= 1e-12, (gap, d_gap)


def test_d_grows_from_d0() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.prodigy())
    assert not opt.global_state
    _step(model, opt, 0)
    assert float(opt.global_state["prodigy.d"]) == 1e-6  # the first step moves p by ~d0 only
    for i in range(1, 30):
        _step(model, opt, i)
    assert float(opt.global_state["prodigy.d"]) > 1e-3
    assert opt.global_state["prodigy.d"].dtype == torch.float64


def test_frozen_group_and_lr_rules() -> None:
    """A group with lr 0 does not move (no decay either); non-zero lrs must agree."""
    ref_model, model = _net(), _net()
    ref = _official(_groups(ref_model, {"lr": 0.0}))
    ours = ChainOptimizer(_groups(model, {"lr": 0.0}), recipes.prodigy())
    frozen = [p.detach().clone() for p in list(model.parameters())[2:]]
    for i in range(30):
        _step(ref_model, ref, i)
        _step(model, ours, i)
    assert _rel_gap(ref_model, model) <= 1e-12
    assert all(torch.equal(a, b) for a, b in zip(frozen, list(model.parameters())[2:]))
    # refused when the groups are made (the constructor adds them), and at the step for a value set in place
    for key, value in (("lr", 0.5), ("betas", (0.8, 0.999))):
        model2 = _net()
        with pytest.raises(ValueError, match=key):
            ChainOptimizer(_groups(model2, {key: value}), recipes.prodigy())
        opt2 = ChainOptimizer(_groups(model2, {}), recipes.prodigy())
        opt2.param_groups[1][key] = value
        with pytest.raises(ValueError, match=key):
            _step(model2, opt2, 0)


def test_invalid() -> None:
    with pytest.raises(ValueError, match="d0"):
        recipes.prodigy(d0=0.0)
    with pytest.raises(ValueError, match="slice_p"):
        recipes.prodigy(slice_p=0)
    with pytest.raises(ValueError, match="growth_rate"):
        ChainOptimizer(_net().parameters(), recipes.prodigy(), growth_rate=0.0)
    with pytest.raises(ValueError, match="beta3"):
        ChainOptimizer(_net().parameters(), recipes.prodigy(), beta3=1.0)
    model = _net()
    with pytest.raises(ValueError, match="first moment"):
        ChainOptimizer(model.parameters(), recipes.prodigy(betas=(0.0, 0.999)), betas=(0.9, 0.999))
    opt = ChainOptimizer(model.parameters(), recipes.prodigy(betas=(0.0, 0.999)))
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    with pytest.raises(ValueError, match="first moment"):
        _step(model, opt, 0)


def test_state_per_param() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.prodigy(slice_p=3))
    _step(model, opt, 0)
    p = next(iter(model.parameters()))
    st = opt.state[p]
    assert sorted(st) == ["prodigy.exp_avg", "prodigy.exp_avg_sq", "prodigy.p0", "prodigy.s", "step"]
    assert st["prodigy.s"].shape == st["prodigy.p0"].shape == (-(-p.numel() // 3),)
    opt1 = ChainOptimizer(_net().parameters(), recipes.prodigy(betas=(0.0, 0.999)))
    q = opt1.param_groups[0]["params"][0]
    assert "prodigy.exp_avg" not in opt1.transform.init_state(q)


HARNESS = [
    # d keeps d0 over the run (its estimate stays below it even at 10 d_coef): no growth to scale or cap
    RecipeCase("prodigy", recipes.prodigy, inert=("d_coef", "growth_rate")),
    RecipeCase("prodigy_wd_bias_correction", partial(recipes.prodigy, weight_decay=0.01, use_bias_correction=True),
               inert=("d_coef", "growth_rate")),
]


@pytest.mark.parametrize("case", HARNESS, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


def test_under_apply_if_finite_the_estimate_is_kept() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), gc.apply_if_finite(recipes.prodigy(), None))
    for i in range(5):
        _step(model, opt, i)
    before = {k: v.clone() for k, v in opt.global_state.items()}
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X[:8]), Y[:8]).backward()
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in opt.global_state.items())
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


FSDP_CASES = [
    *HARNESS,
    RecipeCase(
        "prodigy_coupled_no_momentum", partial(recipes.prodigy, weight_decay=0.01, decouple=False, betas=(0.0, 0.99))
    ),
]


@pytest.mark.distributed
def test_fsdp2() -> None:
    """The d estimate's dot products and norms reduce across shards: same trajectory as one process."""
    check_fsdp2(FSDP_CASES, steps=4)


def test_sums_added_in_order() -> None:
    """The numerator's terms are added one at a time in order (one cumsum), the bits of a loop."""
    from gradchain.transforms.prodigy import _sum_in_order

    gen = torch.Generator().manual_seed(3)
    # terms that cancel: the order of the additions shows in the low bits
    terms = list(torch.randn(500, generator=gen, dtype=torch.float32) * torch.logspace(-8, 8, 500))
    start, coef = torch.tensor(1e-3, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float64)
    loop = start
    for t in terms:
        loop = loop + coef * t.to(torch.float64)
    assert torch.equal(_sum_in_order(start, terms, coef), loop)
    assert torch.equal(_sum_in_order(start, [], coef), start)
    pairwise = start + coef * torch.stack(terms).to(torch.float64).sum()
    assert not torch.equal(pairwise, loop)  # the order matters for these terms
