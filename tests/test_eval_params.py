"""gradchain.eval_params: evaluation weights in, training weights back bit for bit."""

from __future__ import annotations

import pytest
import schedulefree
import torch

import gradchain as gc
from gradchain import ChainOptimizer, recipes


def _net(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(dtype)


_gen = torch.Generator().manual_seed(2)
X = torch.randn(64, 6, generator=_gen, dtype=torch.float64)
Y = torch.randn(64, 2, generator=_gen, dtype=torch.float64)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        lo = i % 8 * 8
        opt.zero_grad()
        out = model(X[lo : lo + 8].to(dtype)).double()
        torch.nn.functional.mse_loss(out, Y[lo : lo + 8]).backward()
        opt.step()


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


SF = [
    lambda: recipes.schedule_free_adamw(lr=0.02, warmup_steps=3, weight_decay=0.01),
    lambda: recipes.schedule_free_sgd(lr=0.1, momentum=0.8),
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("make", SF, ids=["adamw", "sgd"])
def test_schedule_free_swap_and_exact_restore(make, fused: bool) -> None:
    # fused: the params and the state are views of flat buffers; the swap copies into them in place
    model = _net()
    opt = ChainOptimizer(model.parameters(), make(), fused=fused)
    _train(model, opt, 9)
    assert (opt.compile_seconds > 0) == fused
    y = _snapshot(model)
    beta = opt.param_groups[0]["betas"][0] if "betas" in opt.param_groups[0] else opt.param_groups[0]["momentum"]
    with gc.eval_params(opt):
        for p, y0 in zip(model.parameters(), y):
            z = opt.state[p]["schedule_free.z"]
            # y = (1 - beta) z + beta x, so x = (y - (1 - beta) z) / beta
            x = (y0 - (1 - beta) * z) / beta
            assert torch.allclose(p, x, rtol=0, atol=1e-14)
            assert not torch.equal(p, y0)
    assert _same(y, model.parameters())


def test_restore_on_exception_and_refusals() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.schedule_free_adamw(lr=0.02))
    _train(model, opt, 5)
    y = _snapshot(model)
    state = {k: v.clone() for k, v in opt.state[next(iter(model.parameters()))].items()}
    with pytest.raises(KeyError):
        with gc.eval_params(opt):
            raise KeyError("evaluation failed")
    assert _same(y, model.parameters())
    with pytest.raises(RuntimeError, match="eval_params"):
        with gc.eval_params(opt):
            _train(model, opt, 1)
    assert _same(y, model.parameters())
    with pytest.raises(RuntimeError, match="nested"):
        with gc.eval_params(opt):
            with gc.eval_params(opt):
                pass
    assert _same(y, model.parameters())
    after = opt.state[next(iter(model.parameters()))]
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    with gc.eval_params(opt):  # usable again after each failure
        pass
    assert _same(y, model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_evaluating_does_not_change_the_trajectory(fused: bool) -> None:
    ref, model = _net(), _net()
    ref_opt = ChainOptimizer(ref.parameters(), recipes.schedule_free_adamw(lr=0.02), fused=fused)
    opt = ChainOptimizer(model.parameters(), recipes.schedule_free_adamw(lr=0.02), fused=fused)
    _train(ref, ref_opt, 12)
    for start in range(0, 12, 3):
        _train(model, opt, 3, start)
        with gc.eval_params(opt), torch.no_grad():
            model(X)
    assert _same(_snapshot(ref), model.parameters())


def test_equals_official_eval_in_lockstep() -> None:
    ref_model, model = _net(), _net()
    ref = schedulefree.SGDScheduleFree(ref_model.parameters(), lr=0.1, momentum=0.8, warmup_steps=4)
    opt = ChainOptimizer(model.parameters(), recipes.schedule_free_sgd(lr=0.1, momentum=0.8, warmup_steps=4))
    ref.train()
    for i in range(0, 40, 10):
        _train(ref_model, ref, 10, i)
        _train(model, opt, 10, i)
        ref.eval()
        with gc.eval_params(opt):
            for a, b in zip(ref_model.parameters(), model.parameters()):
                assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-12
        ref.train()


def test_lookahead_slow_weights() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), gc.lookahead(recipes.adamw(lr=0.01), k=4))
    _train(model, opt, 6)
    fast = _snapshot(model)
    with gc.eval_params(opt):
        for p in model.parameters():
            assert torch.equal(p, opt.state[p]["lookahead.slow"])
    assert _same(fast, model.parameters())
    with gc.slow_weights(opt):  # the older name, the same swap
        assert all(torch.equal(p, opt.state[p]["lookahead.slow"]) for p in model.parameters())
    assert _same(fast, model.parameters())


def test_chain_without_evaluation_weights() -> None:
    model = _net()
    opt = ChainOptimizer(model.parameters(), recipes.adamw(lr=0.01))
    _train(model, opt, 3)
    w = _snapshot(model)
    with gc.eval_params(opt):  # documented no-op
        assert _same(w, model.parameters())
    assert _same(w, model.parameters())
    with pytest.raises(ValueError, match="no evaluation weights"):
        with gc.eval_params(opt, strict=True):
            pass
    with pytest.raises(TypeError, match="ChainOptimizer"):
        with gc.eval_params(torch.optim.SGD(model.parameters(), lr=0.1)):
            pass
    with pytest.raises(ValueError, match="lookahead"):
        with gc.slow_weights(opt):
            pass


def test_partition_swaps_only_what_has_evaluation_weights() -> None:
    model = _net()
    sf = gc.chain(gc.scale_by_rms(), gc.schedule_free(0.02))
    adam = recipes.adamw(lr=0.01).renamed({"lr": "adam_lr"})
    tr = gc.partition({"sf": sf, "adam": adam}, lambda n, p: "sf" if p.ndim == 2 else "adam")
    opt = ChainOptimizer(model.parameters(), tr)
    _train(model, opt, 4)
    y = _snapshot(model)
    with gc.eval_params(opt):
        for p, y0 in zip(model.parameters(), y):
            assert torch.equal(p, y0) == (p.ndim == 1)
    assert _same(y, model.parameters())


def test_params_without_state_and_low_precision() -> None:
    model = _net(torch.bfloat16)
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))  # never gets a grad
    opt = ChainOptimizer([*model.parameters(), extra], recipes.schedule_free_sgd(lr=0.1))
    _train(model, opt, 4)
    y = _snapshot(model)
    with gc.eval_params(opt):
        assert torch.equal(extra, torch.ones(3, dtype=torch.bfloat16))
        p = next(iter(model.parameters()))
        z = opt.state[p]["schedule_free.z"]
        assert z.dtype == torch.float32
        assert torch.equal(p, torch.lerp(y[0].float(), z, 1 - 1 / 0.9).to(torch.bfloat16))
    assert _same(y, model.parameters())
