"""AdaLo: the loss EMA transform against a float64 reference, its one fp32 scalar of state,
checkpoints, GradScaler, closures, missing and non-finite losses, and the recipe harness."""

from __future__ import annotations

import copy
import io
import math
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

import gradchain as gc
from gradchain import ChainOptimizer, recipes

LOSSES = [2.3, 1.7, 0.4, 5.0, 0.0, 0.9, -0.5, -3.0, 1.1, 0.2]


def ref_lrs(losses, decay=0.999, kappa=3.0, eps=1e-8, mode="adversarial", debias=False):
    """lr_t per step, in float64, from the spec (the article's tanh form for the article's modes)."""
    a, out = 0.0, []
    for k, L in enumerate(losses, 1):
        if mode == "paper":
            x = L
        else:
            Lc = max(L, -1.0)  # the limit of the article's formula at L -> -1
            x = (math.tanh(-0.5 * math.log1p(Lc)) + 1) / 2 if Lc > -1 else 1.0
        a = decay * a + (1 - decay) * x
        ah = a / (1 - decay**k) if debias else a
        lr = (1 - ah) / kappa if mode == "compliant" else ah / kappa
        out.append(max(lr, eps))
    return out


def _run_alone(t, losses, shapes=((), (5,), (3, 4), (4, 2, 3, 3)), dtype=torch.float64, kappas=(3.0, 3.0)):
    """The transform alone in an optimizer: p <- p + lr_t g; two groups (their own kappa)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    half = len(ps) // 2
    opt = ChainOptimizer([{"params": ps[:half], "kappa": kappas[0]}, {"params": ps[half:], "kappa": kappas[1]}],
                         gc.chain(t))
    steps = []
    for L in losses:
        grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
        before = [p.detach().clone() for p in ps]
        for p, gr in zip(ps, grads):
            p.grad = gr
        opt.step(loss=torch.tensor(L))
        steps.append([(p.detach() - b, gr) for p, b, gr in zip(ps, before, grads)])
    return opt, ps, steps


@pytest.mark.parametrize("mode", ["adversarial", "compliant", "paper"])
@pytest.mark.parametrize("debias", [False, True])
def test_loss_ema_against_float64_reference(mode: str, debias: bool) -> None:
    kw = dict(decay=0.9, kappa=2.0, eps=1e-3, mode=mode, debias=debias)
    t = gc.scale_by_loss_ema(0.9, 2.0, 1e-3, mode=mode, debias=debias)
    opt, ps, steps = _run_alone(t, LOSSES, kappas=(2.0, 0.5))
    want = ref_lrs(LOSSES, **kw)
    want_b = ref_lrs(LOSSES, **{**kw, "kappa": 0.5})
    for k, per in enumerate(steps):
        for i, (du, g) in enumerate(per):
            lr = want[k] if i < 2 else want_b[k]
            # the EMA is one fp32 scalar by design: fp32 rounding is the tolerance
            torch.testing.assert_close(du, lr * g, rtol=2e-6, atol=1e-12, msg=f"step {k + 1} tensor {i}")
    keys = sorted(opt.global_state)
    assert keys == (["loss_ema.loss_ema", "loss_ema.norm"] if debias else ["loss_ema.loss_ema"])
    for v in opt.global_state.values():
        assert v.dim() == 0 and v.dtype == torch.float32
    for p in ps:
        assert set(opt.state[p]) == {"step"}, "the loss EMA must not be kept per tensor"


def test_adversarial_is_one_over_two_plus_loss() -> None:
    # the article's (tanh(-log1p(L)/2) + 1)/2 is 1/(2 + L); with decay 0 lr_t = 1/(kappa (2 + L))
    t = gc.scale_by_loss_ema(0.0, kappa=1.0, eps=0.0)
    losses = [0.0, 1.0, 10.0, 1e6]
    _, _, steps = _run_alone(t, losses, shapes=((3,),) * 2, kappas=(1.0, 1.0))
    for L, per in zip(losses, steps):
        du, g = per[0]
        torch.testing.assert_close(du, g / (2.0 + L), rtol=1e-6, atol=0)


def test_one_scalar_advancing_once_per_step_with_bf16_and_missing_grads() -> None:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3).bfloat16()) for _ in range(3)]
    opt = ChainOptimizer([{"params": ps[:2]}, {"params": ps[2:]}], recipes.adalo(betas=(0.9, 0.99)))
    losses = [2.0, 1.5, 1.0, 0.7, 0.5, 0.4]
    for k, L in enumerate(losses):
        for i, p in enumerate(ps):
            # params drop out of steps: a per-tensor EMA would desynchronize
            p.grad = None if (i + k) % 3 == 0 else torch.ones_like(p)
        opt.step(loss=torch.tensor(L, dtype=torch.bfloat16))
    (ema,) = opt.global_state.values()
    assert ema.dtype == torch.float32 and ema.dim() == 0
    a = 0.0
    for L in losses:
        a = 0.99 * a + 0.01 / (2 + float(torch.tensor(L, dtype=torch.bfloat16)))
    assert float(ema) == pytest.approx(a, rel=1e-6)
    for p in ps:
        assert all(k in ("step", "ema.ema") for k in opt.state[p])


def test_bf16_ema_does_not_stall() -> None:
    # the article keeps the EMA in the param dtype: in bf16 it stalls far below its target
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = ChainOptimizer([p], recipes.adalo(weight_decay=0.0))
    for _ in range(1000):
        p.grad = torch.zeros_like(p)
        opt.step(loss=torch.tensor(2.3, dtype=torch.bfloat16))
    target = 1 / (2 + float(torch.tensor(2.3, dtype=torch.bfloat16)))
    assert float(opt.global_state["loss_ema.loss_ema"]) == pytest.approx(target * (1 - 0.999**1000), rel=1e-4)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)


def _train(model, opt, steps, how="loss", scaler=None, start=0):
    for i in range(start, start + steps):
        x, y = _data(i)
        if how == "closure":
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            continue
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step(loss=loss.detach())
        else:
            scaler.scale(loss).backward()
            scaler.step(opt, loss=loss.detach())
            scaler.update()


@pytest.mark.parametrize("how", ["closure", "gradscaler"])
def test_closure_and_gradscaler_follow_the_plain_run(how: str) -> None:
    ref = _net()
    ref_opt = ChainOptimizer(ref.parameters(), recipes.adalo(mode="compliant"))
    _train(ref, ref_opt, 8)
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adalo(mode="compliant"))
    if how == "closure":
        _train(model, opt, 8, how="closure")
    else:
        # a power-of-two scale unscales exactly: the trajectory must be the plain run's
        _train(model, opt, 8, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ref_opt.global_state["loss_ema.loss_ema"], opt.global_state["loss_ema.loss_ema"])


def test_gradscaler_inf_batch_leaves_the_loss_ema_and_the_trajectory() -> None:
    # torch's GradScaler never calls step() on a found-inf step, so looking at that step alone tests
    # torch: the run with the inf batch must equal, bit for bit, a plain run that never saw it (a
    # power-of-two scale unscales exactly), loss EMA included
    ref = _net()
    ref_opt = ChainOptimizer(ref.parameters(), recipes.adalo())
    _train(ref, ref_opt, 6)
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adalo())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    _train(model, opt, 3, scaler=scaler)
    x, y = _data(99)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    scaler.step(opt, loss=loss.detach())
    scaler.update()
    assert scaler.get_scale() < scale  # the scaler saw the inf
    _train(model, opt, 3, scaler=scaler, start=3)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(ref_opt.global_state["loss_ema.loss_ema"], opt.global_state["loss_ema.loss_ema"])
    for p, q in zip(ref.parameters(), model.parameters()):
        assert all(torch.equal(v, opt.state[q][k]) for k, v in ref_opt.state[p].items())


def test_missing_loss_is_a_clear_error() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adalo())
    torch.nn.functional.mse_loss(model(_data(0)[0]), _data(0)[1]).backward()
    with pytest.raises(ValueError, match="loss"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("bad_grads", [False, True])
def test_non_finite_loss_skips_the_step(bad: float, bad_grads: bool) -> None:
    model = _net()
    # NaN gradients must show in the update (not hide behind the zero step of a bad loss), so
    # apply_if_finite can skip the whole step; a bad loss alone is skipped by AdaLo itself
    chain = gc.apply_if_finite(recipes.adalo(mode="paper")) if bad_grads else recipes.adalo(mode="paper")
    opt = ChainOptimizer(model.parameters(), chain)
    _train(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    ema = opt.global_state["loss_ema.loss_ema"].clone()
    moments = [opt.state[p]["ema.ema"].clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan")) if bad_grads else torch.ones_like(p)
    opt.step(loss=torch.tensor(bad))
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.global_state["loss_ema.loss_ema"], ema)
    for p, m in zip(model.parameters(), moments):  # the gated first moment holds still too
        assert torch.equal(opt.state[p]["ema.ema"], m)


def test_loss_gated_ema_against_float64_reference() -> None:
    t = gc.loss_gated_ema(0.8)
    shapes = [(), (5,), (3, 4), (4, 2, 3, 3)]
    ps = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    st = t.init(ps)
    g = torch.Generator().manual_seed(1)
    ms = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for L in [1.0, 2.0, float("nan"), 0.5, float("inf"), 3.0]:
        grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        got = t.update(grads, st, ps, loss=L)
        if L == L and abs(L) != float("inf"):
            ms = [0.8 * m + 0.2 * gr for m, gr in zip(ms, grads)]
        for u, m in zip(got, ms):
            torch.testing.assert_close(u, m, rtol=1e-15, atol=1e-16)
    with pytest.raises(ValueError, match="loss"):
        t.update([torch.ones(s, dtype=torch.float64) for s in shapes], st, ps)


def test_state_dict_round_trip_is_bit_identical() -> None:
    ref = _net()
    ref_opt = ChainOptimizer(ref.parameters(), recipes.adalo(debias=True))
    _train(ref, ref_opt, 10)
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adalo(debias=True))
    _train(model, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _net()
    model2.load_state_dict(ckpt["model"])
    opt2 = ChainOptimizer(model2.parameters(), recipes.adalo(debias=True))
    opt2.load_state_dict(ckpt["opt"])
    for k, v in opt.global_state.items():
        assert opt2.global_state[k].dtype == torch.float32 and torch.equal(opt2.global_state[k], v)
        assert opt2.global_state[k] is not v
    _train(model2, opt2, 6, start=4)
    for a, b in zip(ref.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for k, v in ref_opt.global_state.items():
        assert torch.equal(opt2.global_state[k], v)
    clone = copy.deepcopy(opt2)
    assert torch.equal(clone.global_state["loss_ema.loss_ema"], opt2.global_state["loss_ema.loss_ema"])


def test_loading_a_state_dict_from_before_any_step_resets_the_loss_ema() -> None:
    fresh = ChainOptimizer(_net().parameters(), recipes.adalo()).state_dict()
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adalo())
    _train(model, opt, 3)
    opt.load_state_dict(fresh)
    assert opt.global_state == {}
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(model(_data(3)[0]), _data(3)[1]))
    _train(model, opt, 1, start=3)
    # one update from a zero EMA, not a continuation of the 3 steps before the load
    assert float(opt.global_state["loss_ema.loss_ema"]) == pytest.approx(0.001 / (2 + loss), rel=1e-6)


def test_loss_decay_must_agree_across_groups_and_modes_are_checked() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"betas\[1\]"):  # when a group is added (the constructor adds them)
        ChainOptimizer([{"params": [a]}, {"params": [b], "betas": (0.9, 0.9)}], recipes.adalo())
    opt = ChainOptimizer([{"params": [a]}, {"params": [b]}], recipes.adalo())
    opt.param_groups[1]["betas"] = (0.9, 0.9)  # and at the step, for a value set in place
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step(loss=1.0)
    with pytest.raises(ValueError, match="mode"):
        gc.scale_by_loss_ema(mode="inverse")
    with pytest.raises(ValueError, match="kappa"):
        ChainOptimizer([a], recipes.adalo(), kappa=0.0)
    with pytest.raises(RuntimeError, match="ChainOptimizer"):
        t = gc.scale_by_loss_ema()
        t.update([torch.ones(2)], t.init([a]), [a], loss=1.0)


def test_decay_is_scaled_by_the_adaptive_lr() -> None:
    # one step from m = 0: u = lr_t ((1 - b1) g + wd p), the article's p (1 - lr_t wd) - lr_t m
    p = torch.nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64))
    opt = ChainOptimizer([p], recipes.adalo(weight_decay=0.1, betas=(0.9, 0.5), mode="paper", kappa=1.0))
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step(loss=4.0)
    lr = 0.5 * 4.0
    torch.testing.assert_close(p.detach(), torch.full((3,), 2.0 - lr * (0.1 * 1.0 + 0.1 * 2.0), dtype=torch.float64))


CASES = [
    RecipeCase("adalo", partial(recipes.adalo, weight_decay=0.05)),
    RecipeCase("adalo_compliant_debias", partial(recipes.adalo, mode="compliant", debias=True, kappa=10.0)),
    RecipeCase("adalo_paper", partial(recipes.adalo, mode="paper", kappa=2.0, lr=0.5)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)
