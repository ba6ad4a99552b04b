"""Schedule-free SGD and AdamW: float64 lockstep with the official ``schedulefree`` optimizers (train mode)."""

from __future__ import annotations

from functools import partial

import pytest
import schedulefree
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, make_model, train

import gradchain as gc
from gradchain import ChainOptimizer, recipes

STEPS = 120


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


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    lo = i % 8 * 8
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X[lo : lo + 8]), Y[lo : lo + 8]).backward()
    opt.step()


def _lockstep(official: type, recipe, hp: dict, second: dict, scheduler: bool = False):
    ref_model, model = _net(), _net()
    ref = official(_groups(ref_model, second), **hp)
    ours = ChainOptimizer(_groups(model, second), recipe(**hp))
    ref.train()
    decay = lambda t: 1.0 / (1.0 + 0.02 * t)  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (ref, ours)] if scheduler else []
    gap = 0.0
    for i in range(STEPS):
        _step(ref_model, ref, i)
        _step(model, ours, i)
        for s in scheds:
            s.step()
        gap = max(gap, _rel_gap(ref_model, model))
    return ref_model, ref, model, ours, gap


SF_CASES = [
    ({}, {}, False),
    ({"lr": 0.05, "warmup_steps": 10, "weight_decay": 0.01}, {"lr": 0.02, "weight_decay": 0.1}, False),
    ({"lr": 0.03, "warmup_steps": 7, "r": 0.5, "weight_lr_power": 1.0}, {"warmup_steps": 20}, True),
]


@pytest.mark.parametrize("hp,second,scheduler", SF_CASES, ids=["defaults", "warmup_wd", "r_power_scheduler"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_lockstep_with_official(kind: str, hp: dict, second: dict, scheduler: bool) -> None:
    official = schedulefree.AdamWScheduleFree if kind == "adamw" else schedulefree.SGDScheduleFree
    recipe = recipes.schedule_free_adamw if kind == "adamw" else recipes.schedule_free_sgd
    *_, gap = _lockstep(official, recipe, hp, second, scheduler)
    assert gap <= 1e-12, gap


def test_eval_weights_equal_official_eval() -> None:
    hp, second = {"lr": 0.05, "warmup_steps": 10, "weight_decay": 0.01}, {"weight_decay": 0.1}
    ref_model, ref, model, ours, _ = _lockstep(schedulefree.AdamWScheduleFree, recipes.schedule_free_adamw, hp, second)
    ref.eval()
    with gc.eval_params(ours):
        assert _rel_gap(ref_model, model) <= 1e-12
    # bit for bit: the official eval() applied to our own y and z gives our x
    clone = _net()
    with torch.no_grad():
        for c, p in zip(clone.parameters(), model.parameters()):
            c.copy_(p)
    official = schedulefree.AdamWScheduleFree(_groups(clone, second), **hp)
    official.train()
    for c, p in zip(clone.parameters(), model.parameters()):
        official.state[c]["z"] = ours.state[p]["schedule_free.z"].clone()
    official.eval()
    with gc.eval_params(ours):
        for c, p in zip(clone.parameters(), model.parameters()):
            assert torch.equal(c, p)


def test_state_is_per_param_and_checkpointed() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.schedule_free_sgd(lr=0.1, warmup_steps=4))
    for i in range(6):
        _step(model, opt, i)
    st = opt.state[next(iter(model.parameters()))]
    assert sorted(st) == ["schedule_free.lr_max", "schedule_free.weight_sum", "schedule_free.z", "step"]
    # lr_max = 0.1 after warmup; weight_sum = sum of lr_max_t^2 over t = 1..6 (warmup lr_t = 0.1 t/4)
    lr_max = [min(0.1 * t / 4, 0.1) for t in range(1, 7)]
    assert float(st["schedule_free.lr_max"]) == pytest.approx(0.1, rel=1e-15)
    assert float(st["schedule_free.weight_sum"]) == pytest.approx(sum(x**2 for x in lr_max), rel=1e-14)
    assert st["schedule_free.weight_sum"].dtype == torch.float64 and st["schedule_free.weight_sum"].device.type == "cpu"


CASES = [
    RecipeCase("schedule_free_adamw", partial(recipes.schedule_free_adamw, lr=1e-2, warmup_steps=2, weight_decay=0.1),
               skip=("dtypes",)),
    RecipeCase("schedule_free_sgd", partial(recipes.schedule_free_sgd, lr=1e-2, weight_decay=0.1), skip=("dtypes",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_dtypes(case: RecipeCase) -> None:
    """The harness's dtype check, except that lr_max and weight_sum are float64 host scalars by design."""
    host = ("schedule_free.lr_max", "schedule_free.weight_sum")
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        model = make_model(dtype)
        before = [p.detach().clone() for p in model.parameters()]
        opt = ChainOptimizer(list(model.named_parameters()), case.factory())
        train(model, opt, 0, 3, dtype)
        assert all(torch.isfinite(p).all() and p.dtype == dtype for p in model.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
        want = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        for st in opt.state.values():
            for k, v in st.items():
                if k in host:
                    assert v.dtype == torch.float64 and v.dim() == 0 and v.device.type == "cpu", k
                elif k != "step" and v.is_floating_point():
                    assert v.dtype == want, f"{dtype}: {k} is {v.dtype}"
        with gc.eval_params(opt):
            assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_param_that_skips_steps_keeps_its_own_count() -> None:
    """Counts are per param: a param without a grad on a step skips it, like its step count.

    Reference: one official optimizer per param, stepped only when that param has a gradient.
    """
    init = torch.linspace(-1.0, 2.0, 3, dtype=torch.float64)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ra, rb = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    hp = {"lr": 0.1, "warmup_steps": 3, "weight_decay": 0.01}
    opt = ChainOptimizer([a, b], recipes.schedule_free_sgd(**hp))
    ref_a, ref_b = schedulefree.SGDScheduleFree([ra], **hp), schedulefree.SGDScheduleFree([rb], **hp)
    ref_a.train()
    ref_b.train()
    for i in range(7):
        both = i % 3 == 0
        opt.zero_grad()
        (a.pow(3).sum() + (b.pow(3).sum() if both else 0.0)).backward()
        opt.step()  # a and b share a bucket with different step counts from step 2 on
        for p, ref, on in ((ra, ref_a, True), (rb, ref_b, both)):
            if on:
                ref.zero_grad()
                p.pow(3).sum().backward()
                ref.step()
    assert float(opt.state[a]["step"]) == 7 and float(opt.state[b]["step"]) == 3
    assert torch.allclose(a, ra, rtol=1e-13, atol=0) and torch.allclose(b, rb, rtol=1e-13, atol=0)
    for p, ref_p, ref in ((a, ra, ref_a), (b, rb, ref_b)):
        want = ref.param_groups[0]["weight_sum"]
        assert float(opt.state[p]["schedule_free.weight_sum"]) == pytest.approx(want, rel=1e-15)
        ref.eval()
        with gc.eval_params(opt):
            assert torch.allclose(p, ref_p, rtol=1e-13, atol=0)


def test_invalid_hyperparams() -> None:
    model = _net()
    with pytest.raises(ValueError, match="momentum"):
        ChainOptimizer(model.parameters(), recipes.schedule_free_sgd(momentum=0.0))
    with pytest.raises(ValueError, match="momentum"):
        ChainOptimizer(model.parameters(), recipes.schedule_free_sgd(), momentum=1.0)
    with pytest.raises(ValueError, match="betas"):
        ChainOptimizer(model.parameters(), recipes.schedule_free_adamw(betas=(0.0, 0.999)))
    with pytest.raises(ValueError, match="warmup_steps"):
        ChainOptimizer(model.parameters(), recipes.schedule_free_adamw(), warmup_steps=-1)
    with pytest.raises(ValueError, match="lr"):
        ChainOptimizer(model.parameters(), recipes.schedule_free_adamw(lr=-1.0))


def test_rms_alone_is_adam_without_momentum() -> None:
    """scale_by_rms == torch Adam with betas=(0, b2) (a zero first-moment decay: m = g)."""
    torch.manual_seed(3)
    ref_model, model = _net(), _net()
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    ours = ChainOptimizer(model.parameters(), gc.chain(gc.scale_by_rms(0.99), gc.scale_by_lr(1e-2)))
    for i in range(50):
        _step(ref_model, ref, i)
        _step(model, ours, i)
    assert _rel_gap(ref_model, model) <= 1e-12


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES, steps=4)


LR_FACTORS = {
    # ends at lr 0 (and near it): y still moves toward z, with alpha 0
    "ends at 0": lambda t: [1.0, 1e-14, 0.0][min(t // 20, 2)],
    # starts at lr 0: no weight yet (c = 0), so no interpolation toward z
    "starts at 0": lambda t: 0.0 if t < 7 else 1.0,
}


@pytest.mark.parametrize("schedule", sorted(LR_FACTORS))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_lockstep_with_official_when_lr_is_zero(kind: str, schedule: str) -> None:
    """Schedules through lr 0, in lockstep with the official optimizer."""
    official = schedulefree.AdamWScheduleFree if kind == "adamw" else schedulefree.SGDScheduleFree
    recipe = recipes.schedule_free_adamw if kind == "adamw" else recipes.schedule_free_sgd
    ref_model, model = _net(), _net()
    hp = {"lr": 0.05, "warmup_steps": 5}
    ref = official(_groups(ref_model, {}), **hp)
    ours = ChainOptimizer(_groups(model, {}), recipe(**hp))
    ref.train()
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, LR_FACTORS[schedule]) for o in (ref, ours)]
    moved = [p.detach().clone() for p in model.parameters()]
    for i in range(60):
        _step(ref_model, ref, i)
        _step(model, ours, i)
        for s in scheds:
            s.step()
        assert _rel_gap(ref_model, model) <= 1e-12, i
    assert any(not torch.equal(p, m) for p, m in zip(model.parameters(), moved))


def _sf_state_is_one_vector(opt: ChainOptimizer, params: list) -> bool:
    lr_max = [opt.state[p]["schedule_free.lr_max"] for p in params]
    wsum = [opt.state[p]["schedule_free.weight_sum"] for p in params]
    base = lr_max[0]._base
    return base is not None and all(t._base is base for t in lr_max + wsum)


def test_host_scalars_one_vector_checkpoint_and_skipped_grads() -> None:
    """The per-param sums are 0-d views of one host vector (read and written as one op): the state
    dict keeps 0-d float64 host tensors, a resumed run is bit-exact, and a param that skips a step
    (the vector is made again) keeps its own count, as one official optimizer per param does."""
    torch.manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2), (4,)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(10)]
    hp = {"lr": 0.1, "warmup_steps": 3, "weight_decay": 0.01}

    def run(steps: range, opt: ChainOptimizer, ps: list) -> None:
        for i in steps:
            for j, p in enumerate(ps):
                # the third param skips steps 2 and 5: its count, and the bucket's vector, differ
                p.grad = None if j == 2 and i in (2, 5) else grads[i][j].clone()
            opt.step()

    ps = [torch.nn.Parameter(x.clone()) for x in init]
    opt = ChainOptimizer(ps, recipes.schedule_free_sgd(**hp))
    run(range(4), opt, ps)
    assert _sf_state_is_one_vector(opt, ps)
    sd = opt.state_dict()
    for st in sd["state"].values():
        for k in ("schedule_free.lr_max", "schedule_free.weight_sum"):
            assert st[k].dim() == 0 and st[k].dtype == torch.float64 and st[k].device.type == "cpu"
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = ChainOptimizer(resumed, recipes.schedule_free_sgd(**hp))
    opt2.load_state_dict(sd)
    run(range(4, 10), opt, ps)
    run(range(4, 10), opt2, resumed)
    assert _sf_state_is_one_vector(opt2, resumed)
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, opt2.state[b][k]), k
    # one official optimizer per param, stepped when that param has a gradient
    for j, x in enumerate(init):
        p = torch.nn.Parameter(x.clone())
        ref = schedulefree.SGDScheduleFree([p], **hp)
        ref.train()
        for i in range(10):
            if j == 2 and i in (2, 5):
                continue
            p.grad = grads[i][j].clone()
            ref.step()
        assert torch.allclose(ps[j], p, rtol=1e-13, atol=1e-15)
        assert float(opt.state[ps[j]]["schedule_free.weight_sum"]) == pytest.approx(ref.param_groups[0]["weight_sum"],
                                                                                    rel=1e-15)
