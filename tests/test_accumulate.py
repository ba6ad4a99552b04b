"""accumulate(): k micro-batch steps equal one step on the large batch, to float64 rounding."""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, make_model

import gradchain as gc
from gradchain import ChainOptimizer, recipes
from gradchain import schedules as S
from gradchain.base import Bucket
from gradchain.hyperparams import Hyperparam, unit_interval

TOL = 1e-13  # float64: the large batch's gradient is summed in another order


def loss_scaled(decay: float = 0.5) -> gc.Leaf:
    """A tiny loss-aware transform: ``u <- a u`` with ``a = EMA of the loss`` (decay 0.5)."""

    def init(p: torch.Tensor) -> dict:
        return {"loss_ema": torch.zeros((), dtype=gc.compute_dtype(p.dtype))}

    def update(updates: list, state: dict, hp: dict, ctx: Bucket) -> list:
        ema = state["loss_ema"]
        torch._foreach_lerp_(ema, [ctx.loss.to(e.dtype) for e in ema], 1.0 - float(hp["loss_decay"]))
        return torch._foreach_mul(updates, ema)

    return gc.transform("loss_scaled", {"loss_decay": Hyperparam(decay, unit_interval)}, init, update)


def adamw_sched() -> gc.Transform:
    return recipes.adamw(lr=S.linear_warmup(0.02, 3), weight_decay=0.1)


def loss_aware() -> gc.Transform:
    return gc.chain(gc.trace(0.9), loss_scaled(), gc.add_decoupled_wd(0.05), gc.scale_by_lr(0.05))


RECIPES: dict[str, Callable[[], gc.Transform]] = {"adamw": adamw_sched, "loss_aware": loss_aware}
if hasattr(recipes, "adalo"):
    RECIPES["adalo"] = partial(recipes.adalo, kappa=0.5)


def _data(r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + r)
    x = torch.randn(16, 2, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(16, 3, generator=g, dtype=torch.float64)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()  # a mean over the samples: the large batch weighs each sample


def _large_batch_run(factory, real_steps: int) -> torch.nn.Module:
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), factory())
    for r in range(real_steps):
        opt.zero_grad()
        loss = _loss(model, *_data(r))
        loss.backward()
        opt.step(loss=loss.detach())
    return model


def _micro_steps(model, opt, r: int, sizes: list[int], weighted: bool, tensor_size: bool = False, only=None):
    x, y = _data(r)
    edges = [0]
    for n in sizes:
        edges.append(edges[-1] + n)
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        if only is not None and i not in only:
            continue
        opt.zero_grad()
        loss = _loss(model, x[a:b], y[a:b])
        loss.backward()
        n = torch.tensor(b - a) if tensor_size else (b - a)
        opt.step(loss=loss.detach(), batch_size=n if weighted else None)


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("sizes", [[4, 4, 4, 4], [3, 5, 8]], ids=["equal_mean", "unequal_weighted"])
def test_accumulate_equals_the_large_batch(name: str, sizes: list[int]) -> None:
    factory, real = RECIPES[name], 3
    ref = _large_batch_run(factory, real)
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.accumulate(factory(), len(sizes)))
    weighted = len(set(sizes)) > 1
    for r in range(real):
        _micro_steps(model, opt, r, sizes, weighted, tensor_size=weighted and r % 2 == 1)
    for (pname, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=TOL, msg=lambda m, pname=pname: f"{pname}: {m}")
    # the inner transforms counted real steps only, the optimizer every call
    st = opt.state[model.fc1.weight]
    assert float(st["accumulate.step"]) == real and float(st["step"]) == real * len(sizes)


def test_plain_mean_of_unequal_micro_batches_is_not_the_large_batch() -> None:
    """Without batch_size the micro-batch means are averaged: the weighting above is what matters."""
    ref = _large_batch_run(adamw_sched, 2)
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.accumulate(adamw_sched(), 3))
    for r in range(2):
        _micro_steps(model, opt, r, [3, 5, 8], weighted=False)
    assert max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.parameters())) > 1e-6


def _snapshot(opt: ChainOptimizer) -> dict:
    return {(id(p), k): v.clone() for p, st in opt.state.items() for k, v in st.items()}


def test_mini_steps_change_no_param_and_no_inner_state() -> None:
    for dtype in (torch.float64, torch.bfloat16):
        model = make_model(dtype)
        opt = ChainOptimizer(model.named_parameters(), gc.accumulate(recipes.adamw(lr=0.1), 3))
        x, y = _data(0)
        for call in range(7):
            before, state = [p.detach().clone() for p in model.parameters()], _snapshot(opt)
            opt.zero_grad()
            _loss(model, x[:4].to(dtype), y[:4].to(dtype)).backward()
            opt.step()
            moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert moved == (call % 3 == 2), f"{dtype} call {call}: moved={moved}"
            if call % 3 != 2 and call > 0:
                for (pid, k), v in state.items():
                    if not k.startswith("accumulate.") and k != "step":
                        p_state = next(st for p, st in opt.state.items() if id(p) == pid)
                        assert torch.equal(p_state[k], v), f"mini-step changed inner state {k}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_resume_in_the_middle_of_a_cycle(name: str) -> None:
    factory, sizes = RECIPES[name], [3, 5, 8]
    ref = _large_batch_run(factory, 3)
    whole = make_model()
    whole_opt = ChainOptimizer(whole.named_parameters(), gc.accumulate(factory(), 3))
    for r in range(3):
        _micro_steps(whole, whole_opt, r, sizes, weighted=True)

    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.accumulate(factory(), 3))
    _micro_steps(model, opt, 0, sizes, weighted=True)
    _micro_steps(model, opt, 1, sizes, weighted=True, only={0})  # one micro-step into the cycle
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model(seed=7)
    model2.load_state_dict(ckpt["model"])
    opt2 = ChainOptimizer(model2.named_parameters(), gc.accumulate(factory(), 3))
    opt2.load_state_dict(ckpt["opt"])
    _micro_steps(model2, opt2, 1, sizes, weighted=True, only={1, 2})
    _micro_steps(model2, opt2, 2, sizes, weighted=True)
    for a, b, c in zip(whole.parameters(), model2.parameters(), ref.parameters()):
        assert torch.equal(a, b), "resume mid-cycle differs from the uninterrupted run"
        torch.testing.assert_close(b, c, rtol=0, atol=TOL)


def test_inner_sees_weighted_mean_loss_and_mean_gradient() -> None:
    seen = {}

    def update(updates, state, hp, ctx):
        seen["loss"], seen["step"], seen["grad"] = float(ctx.loss), ctx.step, ctx.grads[0].clone()
        return updates

    spy = gc.transform("spy", {}, None, update)
    acc = gc.accumulate(spy, 3)
    p = torch.zeros(2, dtype=torch.float64)
    state = acc.init([p])
    grads = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, -1.0]), torch.tensor([0.0, 3.0])]
    for i, (g, n, loss) in enumerate(zip(grads, (2, 1, 5), (1.0, 4.0, 2.0))):
        u = acc.update([g.double()], state, [p], loss=loss, batch_size=n)
        assert ("loss" in seen) == (i == 2)
        if i < 2:
            assert torch.equal(u[0], torch.zeros(2, dtype=torch.float64))
    assert seen["loss"] == pytest.approx((2 * 1.0 + 4.0 + 5 * 2.0) / 8, abs=1e-15)
    assert seen["step"] == 1.0
    torch.testing.assert_close(seen["grad"], torch.tensor([6.0 / 8, 18.0 / 8], dtype=torch.float64))
    torch.testing.assert_close(u[0], seen["grad"])


def test_nested_accumulate_and_bad_arguments() -> None:
    # accumulate of accumulate: 2 x 3 micro-steps per real step (the inner needs its own name)
    seen = []
    spy = gc.transform("spy", {}, None, lambda u, s, hp, ctx: seen.append(ctx.step) or u)
    t = gc.accumulate(gc.accumulate(spy, 3, name="inner_acc"), 2)
    p = torch.zeros(1)
    st = t.init([p])
    for _ in range(12):
        t.update([torch.ones(1)], st, [p])
    assert seen == [1.0, 2.0]
    with pytest.raises(ValueError, match="duplicate"):
        gc.accumulate(gc.accumulate(spy, 3), 2)
    with pytest.raises(ValueError, match="steps"):
        gc.accumulate(spy, 0)
    with pytest.raises(ValueError, match="batch_size"):
        gc.accumulate(spy, 2).update([torch.ones(1)], gc.accumulate(spy, 2).init([p]), [p], batch_size=-1)
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw())
    with pytest.raises(ValueError, match="accumulate"):
        opt.step(batch_size=3)


def test_gradscaler_skip_inside_a_cycle_drops_only_that_micro_batch() -> None:
    """GradScaler skips the whole step() of an inf micro-batch: the cycle goes on without it."""

    def run(model, opt, scaler, bad: set[int], calls: range) -> None:
        x, y = _data(0)
        for i in calls:
            opt.zero_grad()
            scaler.scale(_loss(model, x[i : i + 4].float(), y[i : i + 4].float())).backward()
            if i in bad:
                model.fc1.weight.grad[0, 0] = float("inf")
            scaler.step(opt, batch_size=4)
            scaler.update()

    m1, m2 = make_model(torch.float32), make_model(torch.float32)
    o1 = ChainOptimizer(m1.named_parameters(), gc.accumulate(recipes.adamw(lr=0.01), 2))
    o2 = ChainOptimizer(m2.named_parameters(), gc.accumulate(recipes.adamw(lr=0.01), 2))
    # the skipped step halves the scale: a power of 2, so the unscaled grads are the same
    run(m1, o1, torch.amp.GradScaler("cpu", init_scale=2.0**4), {1}, range(3))
    run(m2, o2, torch.amp.GradScaler("cpu", init_scale=2.0**4), set(), range(0, 3, 2))
    assert float(o1.state[m1.fc1.weight]["accumulate.step"]) == 1.0
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def acc1_adamw() -> gc.Transform:
    return gc.accumulate(recipes.adamw(lr=1e-2), 1)


def acc2_adamw() -> gc.Transform:
    return gc.accumulate(recipes.adamw(lr=1e-2), 2)


def acc2_loss_aware() -> gc.Transform:
    return gc.accumulate(loss_aware(), 2)


def if_finite_acc2_adamw() -> gc.Transform:
    return gc.apply_if_finite(gc.accumulate(recipes.adamw(lr=1e-2), 2))


def acc2_if_finite_sgd() -> gc.Transform:
    return gc.accumulate(gc.apply_if_finite(recipes.sgd(lr=0.05, momentum=0.9), 1), 2)


CASES = [
    RecipeCase("accumulate1_adamw", acc1_adamw),
    # the first call of a 2-step cycle moves nothing: the contract check expects a move
    # nonfinite: a mini-step writes nothing (its update is 0 * the running sum), so a NaN gradient
    # shows at the cycle's real step; wrap accumulate in apply_if_finite to skip it there
    RecipeCase("accumulate2_adamw", acc2_adamw, skip=("contract", "nonfinite")),
]
# under FSDP2 (one spawn for both combinators): accumulate's DTensor sums and loss, and
# apply_if_finite's finiteness test and torch.where on DTensors, nested both ways
FSDP_CASES = [
    RecipeCase("accumulate2_loss_aware", acc2_loss_aware),
    RecipeCase("if_finite_accumulate2_adamw", if_finite_acc2_adamw),
    RecipeCase("accumulate2_if_finite_sgd", acc2_if_finite_sgd),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(FSDP_CASES, steps=4)


@pytest.mark.parametrize("fused", [False, True])
def test_an_inner_value_refused_at_the_real_step_moves_nothing(fused: bool) -> None:
    # the inner chain's schedules are checked at its real step count before anything moves: the
    # accumulation buffers, the inner state and the step counts stay, and a retry ends as a clean run
    def run(bad: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        opt = gc.ChainOptimizer([p], gc.accumulate(gc.chain(gc.scale_by_adam(), gc.scale_by_lr()), 2),
                                lr=1e-2, fused=fused)
        gs = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
        for call in range(1, 7):
            p.grad = gs[call - 1].clone()
            if bad and call in (3, 4):
                # fine at calls 3 and 4, not at real step 2, which they accumulate for
                opt.param_groups[0]["lr"] = lambda t: 1e-2 if t >= 3 else -1.0
                before = ({k: v.clone() for k, v in opt.state[p].items()}, p.detach().clone())
                with pytest.raises(ValueError, match="lr=-1.0"):
                    opt.step()
                assert all(torch.equal(v, before[0][k]) for k, v in opt.state[p].items())
                assert torch.equal(p.detach(), before[1])
                opt.param_groups[0]["lr"] = 1e-2
                p.grad = gs[call - 1].clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize("fused", [False, True])
def test_a_schedule_over_the_real_steps_runs_to_its_end(fused: bool) -> None:
    # lr decays to 0 over the 4 real steps of 8 calls: checked at the call count, it went negative at call 5
    lr = lambda t: 1e-2 * (1 - t / 4)  # noqa: E731
    gs = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    p, q = (torch.nn.Parameter(torch.ones(4, dtype=torch.float64)) for _ in range(2))
    acc = gc.ChainOptimizer([p], gc.accumulate(gc.chain(gc.scale_by_adam(), gc.scale_by_lr()), 2), lr=lr, fused=fused)
    ref = gc.ChainOptimizer([q], gc.chain(gc.scale_by_adam(), gc.scale_by_lr()), lr=lr)
    for call, g in enumerate(gs, start=1):
        p.grad = g.clone()
        acc.step()
        if call % 2 == 0:
            q.grad = (gs[call - 2] + g) / 2
            ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-15)
