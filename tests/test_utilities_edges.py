"""Edges of the utilities: schedules under torch schedulers and in checkpoints, schedule-free's evaluation
point under accumulate(), GradientDiagnostics' step labels and closures, check_transform's skip names."""

from __future__ import annotations

import io
import math

import pytest
import torch

import gradchain as gc
from gradchain import recipes
from gradchain import schedules as S
from gradchain.diagnostics import GradientDiagnostics
from gradchain.testing import CHECKS, Case, check_recipe, check_transform


# -- schedule-free: the evaluation point under accumulate() ---------------------------------------
def _sf_run(chain: gc.Transform, calls: int, **group: object) -> tuple[torch.nn.Linear, gc.ChainOptimizer]:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1).double()
    opt = gc.ChainOptimizer(m.named_parameters(), chain, **group)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    for _ in range(calls):
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
    return m, opt


def _eval_weights(m: torch.nn.Module, opt: gc.ChainOptimizer) -> list[torch.Tensor]:
    with gc.eval_params(opt):
        return [p.detach().clone() for p in m.parameters()]


def _reference_x(m: torch.nn.Module, opt: gc.ChainOptimizer, beta: float) -> list[torch.Tensor]:
    """``x = y + (1 - 1/beta) (z - y)`` from the training weights ``y`` and the state's ``z``, in float64."""
    out = []
    for p in m.parameters():
        y = p.detach().double()
        z = opt.state[p]["schedule_free.z"].double()
        out.append(y + (1.0 - 1.0 / beta) * (z - y))
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_eval_point_under_accumulate_uses_the_real_step_of_a_momentum_schedule(nested: bool) -> None:
    beta = S.linear(0.5, 0.9, 4)
    sf = recipes.schedule_free_sgd(lr=0.1, momentum=beta)
    chain = gc.accumulate(gc.accumulate(sf, 2, name="inner"), 3) if nested else gc.accumulate(sf, 2)
    calls = 12 if nested else 4  # 2 real steps either way
    m, opt = _sf_run(chain, calls)
    st = opt.state[m.weight]
    assert float(st["inner.step" if nested else "accumulate.step"]) == 2.0 and float(st["step"]) == calls
    want = _reference_x(m, opt, 0.5 + 0.4 * 2 / 4)  # beta at the real step 2, not at call 4 (0.9)
    for got, ref in zip(_eval_weights(m, opt), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    plain_m, plain_opt = _sf_run(recipes.schedule_free_sgd(lr=0.1, momentum=beta), 2)
    for got, ref in zip(_eval_weights(m, opt), _eval_weights(plain_m, plain_opt), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_eval_point_under_accumulate_uses_the_real_step_of_callable_betas() -> None:
    m, opt = _sf_run(gc.accumulate(recipes.schedule_free_adamw(lr=0.1), 2), 4,
                     betas=lambda t: (0.5 + 0.1 * t, 0.999))
    want = _reference_x(m, opt, 0.5 + 0.1 * 2)
    for got, ref in zip(_eval_weights(m, opt), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_a_plain_chain_sharing_the_leaf_keeps_the_optimizer_step() -> None:
    sf = recipes.schedule_free_sgd(lr=0.1, momentum=S.linear(0.5, 0.9, 4))
    gc.accumulate(sf, 2)  # wrapped elsewhere: the plain chain below has no accumulate state
    m, opt = _sf_run(sf, 3)
    for got, ref in zip(_eval_weights(m, opt), _reference_x(m, opt, 0.5 + 0.4 * 3 / 4), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


# -- schedules under torch's LR schedulers ---------------------------------------------------------
def test_repeated_scaling_folds_into_one_factor() -> None:
    s = S.linear_warmup(0.1, 100)
    for _ in range(3000):  # one more level per multiplication overflowed the stack at ~500
        s = s * 0.999
    assert isinstance(s, S._Scaled) and not isinstance(s.schedule, S._Scaled)
    factor = 1.0
    for _ in range(3000):
        factor *= 0.999
    for t in (1, 50, 100, 200):
        assert math.isclose(s(t), factor * 0.1 * min(t, 100) / 100, rel_tol=1e-12)
    assert S.from_description(s.describe()) == s


def _sched_opt(lr: S.Schedule) -> tuple[torch.nn.Linear, gc.ChainOptimizer]:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2).double()
    return m, gc.ChainOptimizer(m.named_parameters(), recipes.sgd(lr=0.1), lr=lr)


def _one_step(m: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    m(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()


def test_multiplying_scheduler_on_a_schedule_and_its_state_dict() -> None:
    m, opt = _sched_opt(S.linear_warmup(0.1, 4))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(5):
        _one_step(m, opt)
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, S._Scaled) and isinstance(lr.schedule, S._Linear)
    assert math.isclose(lr(6), 0.5**5 * 0.1, rel_tol=1e-12)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    with torch.serialization.safe_globals(S.SAFE_GLOBALS):
        loaded = torch.load(buf, weights_only=True)
    assert loaded["base_lrs"] == [S.linear_warmup(0.1, 4)]


@pytest.mark.parametrize("make", [
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 5),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
])
def test_scheduler_doing_other_arithmetic_is_refused_with_a_clear_message(make) -> None:
    m, opt = _sched_opt(S.linear_warmup(0.1, 4))
    with pytest.raises(TypeError, match="supports only multiplication by a number.*number lr"):
        sched = make(opt)
        for _ in range(3):
            _one_step(m, opt)
            sched.step(1.0) if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) else sched.step()


def test_join_boundary_convention_is_documented() -> None:
    j = S.join([S.constant(1.0), S.constant(2.0)], [3])
    assert [j(t) for t in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 2.0]  # optax: 2.0 at t = 3
    assert "join_schedules" in S.__doc__ and "boundary" in S.__doc__
    assert "This equals optax's\nschedule of the same name" not in S.__doc__


# -- messages ---------------------------------------------------------------------------------------
def _saved() -> tuple[gc.ChainOptimizer, dict]:
    m = torch.nn.Linear(3, 2)
    opt = gc.ChainOptimizer(m.parameters(), recipes.adamw(), lr=S.linear_warmup(1e-3, 5),
                            weight_decay=S.linear(0.0, 0.1, 5))
    return opt, opt.state_dict()


def test_corrupted_schedule_description_names_group_and_key() -> None:
    opt, sd = _saved()
    sd["param_groups"][0]["weight_decay"]["steps"] = -2
    with pytest.raises(ValueError, match=r"param group 0: the state dict's 'weight_decay'.*steps=-2"):
        opt.load_state_dict(sd)
    opt, sd = _saved()
    del sd["param_groups"][0]["lr"]["steps"]
    with pytest.raises(ValueError, match=r"param group 0: the state dict's 'lr'.*expected \['end', 'init', 'steps'\]"):
        opt.load_state_dict(sd)


def test_linear_warmup_names_warmup_steps() -> None:
    with pytest.raises(ValueError, match="invalid warmup_steps=-5"):
        S.linear_warmup(1.0, -5)


# -- GradientDiagnostics ------------------------------------------------------------------------------
def _grad_norm_ref(x: torch.Tensor) -> float:
    # loss = sum(W x) for a bias-free Linear(3, 1): dL/dW = x
    return math.sqrt(sum(float(v) ** 2 for v in x.flatten()))


@pytest.mark.parametrize("kind", ["chain", "torch_sgd"])
def test_closure_step_records_the_gradient_the_step_used(kind: str) -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1, bias=False).double()
    opt = (gc.ChainOptimizer(m.named_parameters(), recipes.sgd(lr=0.1)) if kind == "chain"
           else torch.optim.SGD(m.parameters(), lr=0.1))
    d = GradientDiagnostics(opt, names=m)
    xs = [torch.full((1, 3), float(t), dtype=torch.float64) for t in (1, 2, 3)]
    for x in xs:
        def closure(x=x):
            opt.zero_grad()
            loss = m(x).sum()
            loss.backward()
            return loss
        assert opt.step(closure) is not None
    got = [(r["step"], r["grad_norm"]) for r in d.records if r["tensor"] == "weight"]
    assert [s for s, _ in got] == [1, 2, 3]
    for (_, g), x in zip(got, xs, strict=True):
        assert math.isclose(g, _grad_norm_ref(x), rel_tol=1e-12)
    d.close()


def test_refused_step_leaves_no_record_and_labels_follow_the_optimizer() -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 1, bias=False).double()
    opt = gc.ChainOptimizer(m.named_parameters(), recipes.sgd(lr=0.1))
    d = GradientDiagnostics(opt, every=2, updates=True, params=False)
    _one_step_1 = lambda: (opt.zero_grad(), m(torch.ones(1, 3, dtype=torch.float64)).sum().backward(), opt.step())  # noqa: E731
    _one_step_1()  # step 1
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr=-1.0"):
        _one_step_1()  # refused: no step
    assert d.records == []
    opt.param_groups[0]["lr"] = 0.1
    _one_step_1()  # the real step 2: recorded, with its own update (sgd: 0.1 * grad of ones)
    assert [(r["tensor"], r["step"]) for r in d.records] == [("weight", 2), ("(all)", 2)]
    assert math.isclose(d.records[0]["update_rms"], 0.1, rel_tol=1e-12)
    _one_step_1()  # step 3: not recorded
    assert len(d.records) == 2 and d.step == 3 == int(opt.state[m.weight]["step"])


def test_attached_after_a_resume_labels_by_the_optimizer_step() -> None:
    m = torch.nn.Linear(3, 1)
    opt = gc.ChainOptimizer(m.named_parameters(), recipes.sgd(lr=0.01))
    for _ in range(5):
        _one_step(m.double(), opt)
    resumed = gc.ChainOptimizer(m.named_parameters(), recipes.sgd(lr=0.01))
    resumed.load_state_dict(opt.state_dict())
    d = GradientDiagnostics(resumed, every=2)
    _one_step(m, resumed)  # step 6
    _one_step(m, resumed)  # step 7: not recorded
    assert {r["step"] for r in d.records} == {6}
    adam = torch.optim.Adam(m.parameters(), lr=0.01)
    _one_step(m, adam)
    d2 = GradientDiagnostics(adam)
    _one_step(m, adam)
    assert {r["step"] for r in d2.records} == {2}


# -- check_transform / Case / check_recipe: skip names --------------------------------------------------
def _sound() -> gc.Transform:
    return gc.chain(gc.trace(0.9), gc.scale_by_lr(1e-2))


def test_unknown_skip_names_are_refused() -> None:
    with pytest.raises(ValueError, match=r"no such check: \['aliasng'\].*'aliasing'.*'fsdp2'"):
        check_transform(_sound, skip=["aliasng"], fsdp2=False, fused=False)
    with pytest.raises(ValueError, match="no such check"):
        Case("t", _sound, skip=("dtype",))
    with pytest.raises(ValueError, match="sequence of check names"):
        Case("t", _sound, skip="dtypes")  # type: ignore[arg-type]
    case = Case("t", _sound, skip=tuple(CHECKS))
    case.skip = ("nonfinte",)
    with pytest.raises(ValueError, match="no such check"):
        check_recipe(case, fused=False)


def test_check_transform_docstring_says_how_to_call_it_from_a_script() -> None:
    assert 'if __name__ == "__main__":' in check_transform.__doc__
