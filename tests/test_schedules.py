"""Schedules (gradchain.schedules) against hand-written formulas, in an optimizer, and in checkpoints."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

from gradchain import ChainOptimizer, recipes
from gradchain import schedules as S


def test_linear_warmup_formula() -> None:
    f = S.linear_warmup(0.3, 10)
    for t in range(1, 25):
        assert f(t) == pytest.approx(0.3 * min(1.0, t / 10), abs=1e-15)
    assert f(10) == 0.3 and f(11) == 0.3
    g = S.linear_warmup(1.0, 4, init=0.2)
    assert [g(t) for t in (1, 2, 4, 9)] == pytest.approx([0.4, 0.6, 1.0, 1.0])
    # T_w = 0 means no warmup
    assert S.linear_warmup(0.5, 0)(1) == 0.5


def test_exponential_untuned_warmup_formula() -> None:
    f = S.exponential_warmup(2.0, beta2=0.99)
    for t in (1, 2, 10, 100, 1000):
        assert f(t) == pytest.approx(2.0 * (1.0 - math.exp(-(1.0 - 0.99) * t)), rel=1e-14)
    u = S.untuned_linear_warmup(1.0, beta2=0.999)  # T_w = 2 / (1 - beta2) = 2000
    assert u(1000) == pytest.approx(0.5) and u(2000) == 1.0 and u(5000) == 1.0
    v = S.untuned_linear_warmup(3.0, beta2=0.997)
    for t in (1, 100, 666, 667, 1000):
        assert v(t) == pytest.approx(3.0 * min(1.0, (1.0 - 0.997) / 2 * t), rel=1e-14)


def test_cosine_decay_formula() -> None:
    f = S.cosine_decay(1.0, 50, end=0.1)
    for t in range(0, 70):
        frac = min(t, 50) / 50
        assert f(t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)), abs=1e-15)
    assert f(50) == pytest.approx(0.1) and f(200) == pytest.approx(0.1)


def test_warmup_cosine_phases() -> None:
    f = S.warmup_cosine(1e-3, warmup_steps=5, total_steps=25, end=1e-5)
    for t in range(1, 40):
        if t <= 5:
            want = 1e-3 * t / 5
        else:
            frac = min(t - 5, 20) / 20
            want = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * frac))
        assert f(t) == pytest.approx(want, abs=1e-18)
    assert max(f(t) for t in range(1, 40)) == f(5) == 1e-3


@pytest.mark.parametrize("decay", ["linear", "cosine", "sqrt"])
def test_wsd_phases(decay: str) -> None:
    f = S.wsd(2.0, warmup_steps=4, stable_steps=6, decay_steps=8, end=0.2, decay=decay)
    shapes = {
        "linear": lambda x: 1 - x,
        "cosine": lambda x: 0.5 * (1 + math.cos(math.pi * x)),
        "sqrt": lambda x: 1 - math.sqrt(x),
    }
    for t in range(1, 30):
        if t <= 4:
            want = 2.0 * t / 4
        elif t <= 10:
            want = 2.0
        else:
            want = 0.2 + 1.8 * shapes[decay](min(t - 10, 8) / 8)
        assert f(t) == pytest.approx(want, abs=1e-14)


def test_join_local_steps_and_scaling() -> None:
    f = S.join([S.constant(1.0), S.linear(0.0, 1.0, 4), S.constant(3.0)], [2, 6])
    assert [f(t) for t in range(1, 9)] == pytest.approx([1, 1, 0.25, 0.5, 0.75, 1.0, 3, 3])
    g = 0.5 * S.linear_warmup(1.0, 2)
    assert g(1) == 0.25 and (S.linear_warmup(1.0, 2) * 4)(2) == 4.0


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        S.warmup_cosine(1.0, -1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        S.warmup_cosine(1.0, 10, 5)
    with pytest.raises(ValueError, match="beta2"):
        S.exponential_warmup(1.0, beta2=1.0)
    with pytest.raises(ValueError, match="decay"):
        S.wsd(1.0, 1, 1, 1, decay="exp")
    with pytest.raises(ValueError, match="boundaries"):
        S.join([S.constant(1.0)], [3])
    with pytest.raises(ValueError, match="peak"):
        S.linear_warmup(float("nan"), 3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)


def _train(model, opt, start: int, n: int, before_step=None) -> None:
    for i in range(start, start + n):
        x, y = _batch(i)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if before_step is not None:
            before_step(i + 1)
        opt.step()


def test_schedule_for_lr_and_weight_decay_equals_setting_them_by_hand() -> None:
    lr_s = S.warmup_cosine(0.05, 5, 30, end=0.001)
    wd_s = S.linear(0.0, 0.2, 20)
    m1, m2 = _model(), _model()
    o1 = ChainOptimizer(m1.named_parameters(), recipes.adamw(), lr=lr_s, weight_decay=wd_s)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.0, weight_decay=0.0)

    def set_by_hand(t: int) -> None:
        o2.param_groups[0]["lr"], o2.param_groups[0]["weight_decay"] = lr_s(t), wd_s(t)

    _train(m1, o1, 0, 30)
    _train(m2, o2, 0, 30, set_by_hand)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_torch_lr_scheduler_still_works_next_to_a_schedule() -> None:
    # lr by a torch scheduler, weight decay by a gradchain schedule, in one optimizer
    wd_s = S.linear_warmup(0.1, 10)
    m1, m2 = _model(), _model()
    o1 = ChainOptimizer(m1.named_parameters(), recipes.adamw(lr=0.02), weight_decay=wd_s)
    o2 = torch.optim.AdamW(m2.parameters(), lr=0.02)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 3, gamma=0.5)
    for i in range(12):
        o2.param_groups[0]["weight_decay"] = wd_s(i + 1)
        _train(m1, o1, i, 1)
        _train(m2, o2, i, 1)
        s1.step()
        s2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_schedule_value_is_validated_when_evaluated() -> None:
    m = _model()
    opt = ChainOptimizer(m.named_parameters(), recipes.sgd(), lr=S.linear(0.1, -0.1, 2))
    _train(m, opt, 0, 1)  # t=1: 0.0
    with pytest.raises(ValueError, match="lr"):
        _train(m, opt, 1, 1)  # t=2: -0.1


def test_state_dict_with_schedules_loads_with_weights_only_and_resumes() -> None:
    lr_s = S.join([S.untuned_linear_warmup(0.05, 0.9), S.wsd(0.05, 0, 4, 5, decay="sqrt")], [2])
    ref = _model()
    ref_opt = ChainOptimizer(ref.named_parameters(), recipes.adamw(lr=lr_s), weight_decay=0.5 * S.linear_warmup(0.1, 6))
    _train(ref, ref_opt, 0, 14)

    m = _model()
    opt = ChainOptimizer(m.named_parameters(), recipes.adamw(lr=lr_s), weight_decay=0.5 * S.linear_warmup(0.1, 6))
    _train(m, opt, 0, 6)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    assert isinstance(opt.param_groups[0]["lr"], S.Schedule), "state_dict() changed the live groups"
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = _model()
    m2.load_state_dict(ckpt["model"])
    opt2 = ChainOptimizer(m2.named_parameters(), recipes.adamw(lr=1.0))  # plain values: the saved ones win
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["lr"] == lr_s
    assert opt2.param_groups[0]["weight_decay"](6) == pytest.approx(0.05)
    _train(m2, opt2, 6, 8)
    for a, b in zip(ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    pickle.loads(pickle.dumps(opt2.param_groups[0]["lr"]))
    copy.deepcopy(opt2)


def test_state_dict_with_a_lambda_keeps_the_live_callable() -> None:
    def fn(t: int) -> float:
        return 0.01 / t

    m = _model()
    opt = ChainOptimizer(m.named_parameters(), recipes.sgd(), lr=fn)
    _train(m, opt, 0, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2 = ChainOptimizer(m.named_parameters(), recipes.sgd(), lr=fn)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] is fn
    opt3 = ChainOptimizer(m.named_parameters(), recipes.sgd(), lr=0.1)
    with pytest.raises(ValueError, match="callable"):
        opt3.load_state_dict(sd)



class _InvSqrt(S.Schedule):
    """A user's own schedule: ``peak / sqrt(t)``."""

    def __init__(self, peak: float) -> None:
        self.peak = peak

    def __call__(self, step: int | float) -> float:
        return self.peak / max(1.0, float(step)) ** 0.5


@pytest.mark.parametrize("scaled", [False, True])
def test_a_users_schedule_subclass_is_saved_as_a_callable(scaled: bool) -> None:
    # it has no description a load could rebuild: saved as a lambda is, the loading optimizer's kept
    lr = _InvSqrt(0.1) * 0.5 if scaled else _InvSqrt(0.1)
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ChainOptimizer([p], recipes.sgd(lr=lr))
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    assert opt.param_groups[0]["lr"] is lr
    opt.step()
    want = 1.0 - sum((0.05 if scaled else 0.1) / t ** 0.5 for t in (1, 2))
    torch.testing.assert_close(p.detach(), torch.full((3,), want, dtype=torch.float64), rtol=1e-15, atol=0)
