"""accumulate() refuses a cycle it cannot average, and the refused call changes nothing.

Two cases: the batch sizes of a cycle sum to 0 (the mean gradient would be 0/0, i.e. NaN params),
and ``batch_size=`` passed on some micro-steps of a cycle but not on others (sample counts would be
mixed with the weight 1 of an unsized call). Both raise ``ValueError`` naming ``batch_size``; the
params and every state entry, the optimizer's step counters included, are as before the call, so
the call can be made again with a valid ``batch_size``.
"""

from __future__ import annotations

import pytest
import torch
from harness import make_model

import gradchain as gc
from gradchain import ChainOptimizer, recipes

pytestmark = pytest.mark.usefixtures("one_thread")


def _backward(model, i: int) -> None:
    g = torch.Generator().manual_seed(300 + i)
    x = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()


def _call(model, opt, i: int, batch_size=None) -> None:
    _backward(model, i)
    opt.step(batch_size=batch_size)


def _snapshot(model, opt) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], {
        (id(p), k): v.clone() for p, st in opt.state.items() for k, v in st.items()
    }


def _assert_unchanged(model, opt, before) -> None:
    params, state = before
    for (n, p), q in zip(model.named_parameters(), params):
        assert torch.equal(p, q), f"param {n} changed"
    now = _snapshot(model, opt)[1]
    assert now.keys() == state.keys()
    for key, v in state.items():
        assert torch.equal(v, now[key].to(v.device)), f"state {key[1]} changed"


def _optimizer(model) -> ChainOptimizer:
    return ChainOptimizer(model.named_parameters(), gc.accumulate(recipes.adamw(lr=0.01), 3))


@pytest.mark.parametrize("zero", [0, 0.0, torch.tensor(0.0)], ids=["int", "float", "tensor"])
def test_batch_sizes_summing_to_zero_are_refused(zero) -> None:
    model = make_model()
    opt = _optimizer(model)
    for i in range(3):  # one good cycle first
        _call(model, opt, i, 4)
    _call(model, opt, 3, zero)
    _call(model, opt, 4, zero)
    before = _snapshot(model, opt)
    _backward(model, 5)
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(batch_size=zero)
    _assert_unchanged(model, opt, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the same call again with a real batch: the cycle's mean is that micro-batch's gradient
    opt.step(batch_size=2)
    # the reference: plain AdamW on the first cycle's mean gradient, then on micro-batch 5's
    ref = make_model()
    ref_opt = ChainOptimizer(ref.named_parameters(), recipes.adamw(lr=0.01))
    total: dict = {}
    for i in range(3):
        _backward(ref, i)
        for n, p in ref.named_parameters():
            if p.grad is not None:
                total[n] = total.get(n, 0) + p.grad
    for n, p in ref.named_parameters():
        p.grad = total[n] / 3 if n in total else None
    ref_opt.step()
    _backward(ref, 5)
    ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("first_sized", [True, False], ids=["sized_then_not", "not_then_sized"])
def test_batch_size_on_some_micro_steps_only_is_refused(first_sized: bool) -> None:
    model = make_model()
    opt = _optimizer(model)
    # a sized cycle and an unsized one first: each kind of call has run before
    for i in range(3):
        _call(model, opt, i, 4)
    for i in range(3, 6):
        _call(model, opt, i)
    _call(model, opt, 6, 4 if first_sized else None)
    before = _snapshot(model, opt)
    _backward(model, 7)
    with pytest.raises(ValueError, match="batch_size"):
        opt.step(batch_size=None if first_sized else 4)
    _assert_unchanged(model, opt, before)
    # the cycle goes on as it began, and the optimizer still counts 7 calls
    opt.step(batch_size=4 if first_sized else None)
    assert float(opt.state[model.fc1.weight]["step"]) == 8.0


def test_standalone_update_refuses_a_zero_cycle() -> None:
    spy = gc.transform("spy", {}, None, lambda u, s, hp, ctx: u)
    acc = gc.accumulate(spy, 2)
    p = torch.zeros(2, dtype=torch.float64)
    state = acc.init([p])
    acc.update([torch.ones(2, dtype=torch.float64)], state, [p], batch_size=0)
    with pytest.raises(ValueError, match="sum to 0"):
        acc.update([torch.ones(2, dtype=torch.float64)], state, [p], batch_size=0)
    assert float(state[0]["step"]) == 1.0
    u = acc.update([torch.full((2,), 3.0, dtype=torch.float64)], state, [p], batch_size=1)
    assert torch.equal(u[0], torch.full((2,), 3.0, dtype=torch.float64))
