"""sgd, adam, adamw: torch.optim parity in float64 and the recipe harness."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, lockstep_gap

from gradchain import ChainOptimizer, recipes

CASES = [
    RecipeCase("sgd", partial(recipes.sgd, lr=0.05)),
    RecipeCase("sgd_momentum", partial(recipes.sgd, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    RecipeCase("sgd_nesterov", partial(recipes.sgd, lr=0.05, momentum=0.9, nesterov=True)),
    RecipeCase("adam", partial(recipes.adam, lr=1e-2, weight_decay=1e-3)),
    # no weight decay here, so whether it would be decoupled changes nothing
    RecipeCase("adam_amsgrad", partial(recipes.adam, lr=1e-2, amsgrad=True), inert=("decoupled_weight_decay",)),
    RecipeCase("adamw", partial(recipes.adamw, lr=1e-2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)
    ).double()


def _groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 0.02, "weight_decay": 0.05},
        {"params": model[4].parameters()},
    ]


def _trajectory_gap(torch_cls, recipe, hp: dict, steps: int = 200, scheduler=None, maximize=False) -> float:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch_cls(_groups(m1), maximize=maximize, **hp)
    o2 = ChainOptimizer(_groups(m2), recipe(maximize=maximize, **hp))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, dtype=torch.float64, generator=g)
    y = torch.randn(256, 2, dtype=torch.float64, generator=g)
    gap = lockstep_gap((m1, o1, scheduler(o1, hp)), (m2, o2, scheduler(o2, hp)), x, y, steps)
    for a, b in zip(o1.param_groups, o2.param_groups):
        assert a["lr"] == b["lr"]
    return gap


SCHEDULERS = {
    "cosine": lambda o, hp: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
    # cycles betas[0] for Adam and momentum for SGD with momentum (plain SGD keeps no buffer)
    "onecycle": lambda o, hp: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[0.05, 0.02], total_steps=200, cycle_momentum="lr" in hp and hp.get("momentum", 1) != 0
    ),
}

PARITY = [
    (torch.optim.SGD, recipes.sgd, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, recipes.sgd, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.SGD, recipes.sgd, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    (torch.optim.SGD, recipes.sgd, {"lr": 0.05, "momentum": 0.0}),
    (torch.optim.Adam, recipes.adam, {"lr": 0.01, "weight_decay": 0.01}),
    (torch.optim.Adam, recipes.adam, {"lr": 0.01, "amsgrad": True, "eps": 1e-6}),
    (torch.optim.AdamW, recipes.adamw, {"lr": 0.01, "betas": (0.8, 0.99)}),
    (torch.optim.AdamW, recipes.adamw, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
]


@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
@pytest.mark.parametrize("torch_cls,recipe,hp", PARITY, ids=lambda x: getattr(x, "__name__", None))
def test_matches_torch_optim(torch_cls, recipe, hp, sched) -> None:
    assert _trajectory_gap(torch_cls, recipe, hp, scheduler=SCHEDULERS[sched]) <= 1e-12


def test_maximize_matches_torch() -> None:
    sched = SCHEDULERS["cosine"]
    assert _trajectory_gap(torch.optim.AdamW, recipes.adamw, {"lr": 0.01}, 50, sched, maximize=True) <= 1e-12
    assert _trajectory_gap(torch.optim.SGD, recipes.sgd, {"lr": 0.01, "momentum": 0.5}, 50, sched, True) <= 1e-12


def test_reduce_lr_on_plateau() -> None:
    m = _model()
    opt = ChainOptimizer(m.parameters(), recipes.adamw(lr=0.1))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_ema_against_float64_reference() -> None:
    import gradchain as gc

    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(4, 3, dtype=torch.float64, generator=g) for _ in range(5)]
    for debias in (False, True):
        t = gc.ema(0.8, debias=debias)
        p = torch.zeros(4, 3, dtype=torch.float64)
        state = t.init([p])
        m = torch.zeros_like(p)
        for step, gr in enumerate(grads, 1):
            (u,) = t.update([gr], state, [p])
            m = 0.8 * m + 0.2 * gr
            want = m / (1 - 0.8**step) if debias else m
            torch.testing.assert_close(u, want, rtol=0, atol=1e-15)
