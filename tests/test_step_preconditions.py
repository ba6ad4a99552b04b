"""A step whose inputs break its preconditions is refused before anything moves, on both paths
(``model.double()`` between backward and step: ``test_contract_hardening``).

torch's setter refuses ``p.grad = g`` of another shape or dtype, but ``p.grad.data = x`` and a
module's ``_apply`` (``model.double()`` between backward and step) get past it, and ``p.data = x``
can give a param another shape under state made for the old one. Each case here used to fail
part-way (state of other params moved), broadcast silently (SM3), or, on the fused path, drop the
grad and skip the param without a word.
"""

from __future__ import annotations

import pytest
import torch

import gradchain as gc
import gradchain.fused.runner as runner
from gradchain import recipes


@pytest.fixture(autouse=True)
def _fast_tracing(monkeypatch):
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")


def _trained(chain, fused: bool, steps: int = 2):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = gc.ChainOptimizer([a, b], chain, fused=fused)
    x = torch.randn(8)
    for _ in range(steps):
        opt.zero_grad()
        (b @ x + a).square().sum().backward()
        opt.step()
    opt.zero_grad()
    (b @ x + a).square().sum().backward()
    return a, b, opt


def _everything(opt, params):
    return [p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


def _assert_same(before, after) -> None:
    for x, y in zip(before[0], after[0]):
        assert x.shape == y.shape and torch.equal(x, y)
    for st0, st1 in zip(before[1], after[1]):
        assert st0.keys() == st1.keys()
        for k in st0:
            assert torch.equal(st0[k], st1[k]), k


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("bad, match", [
    (lambda g: torch.zeros(3, 3), r"shape \(8, 8\) \(torch.float32, cpu\) has a gradient of shape \(3, 3\)"),
    (lambda g: g.to(torch.int32), r"gradient of shape \(8, 8\) \(torch.int32, cpu\).*grad_dtype \(torch.float32\)"),
    (lambda g: g.double(), r"gradient of shape \(8, 8\) \(torch.float64, cpu\).*grad_dtype \(torch.float32\)"),
], ids=["shape", "int32", "float64"])
def test_a_grad_set_past_torchs_rule_is_refused_and_kept(fused: bool, bad, match: str) -> None:
    a, b, opt = _trained(recipes.adamw(lr=1e-2), fused)
    before = _everything(opt, [a, b])
    b.grad.data = bad(b.grad.data)
    with pytest.raises(ValueError, match=match):
        opt.step()
    _assert_same(before, _everything(opt, [a, b]))
    assert b.grad is not None  # the fused path used to set it to None and skip the param

    # put right, the step goes on as one that never saw the bad grad
    good = torch.randn(8, 8)
    b.grad = None
    b.grad = good.clone()
    a2, b2, ref = _trained(recipes.adamw(lr=1e-2), fused)
    b2.grad = None
    b2.grad = good.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(b.detach(), b2.detach(), rtol=0, atol=0)
    torch.testing.assert_close(opt.state[b]["adam.exp_avg"], ref.state[b2]["adam.exp_avg"], rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_grad_dtype_of_none_lets_any_floating_grad_in(fused: bool) -> None:
    """torch's rule, not a stricter one: ``p.grad_dtype = None`` allows a gradient of any floating dtype."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad_dtype = None
    g = torch.randn(4, 3, dtype=torch.float64)
    p.grad = g
    expected = (p.detach().double() - 0.5 * g).float()  # SGD in the grad's float64, rounded once
    opt = gc.ChainOptimizer([p], recipes.sgd(lr=0.5), fused=fused)
    opt.step()
    torch.testing.assert_close(p.detach(), expected, rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("chain, key", [(recipes.adamw, "adam.exp_avg"), (recipes.sm3, "sm3.acc_0")],
                         ids=["adamw", "sm3"])
def test_a_param_reshaped_under_its_state_is_refused(fused: bool, chain, key: str) -> None:
    """``p.data = x`` of another shape: AdamW's moments failed part-way (another param's state
    moved first) and SM3's accumulators broadcast over the new shape without a word."""
    a, b, opt = _trained(chain(), fused)
    before = _everything(opt, [a])
    b.data = torch.randn(4, 8)
    b.grad = None
    b.grad = torch.randn(4, 8)
    state_b = {k: v.clone() for k, v in opt.state[b].items()}
    with pytest.raises(ValueError, match=rf"has shape \(4, 8\), but its state '{key}' has shape"):
        opt.step()
    _assert_same(before, _everything(opt, [a]))
    assert all(torch.equal(v, opt.state[b][k]) for k, v in state_b.items())

    del opt.state[b]  # as the message says: its state afresh
    opt.step()
    assert opt.state[b][key].shape != state_b[key].shape and float(opt.state[b]["step"]) == 1.0


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_betas_changed_in_place_are_checked_again(fused: bool) -> None:
    """The checked values were the group's own list: changed in place, it still compared equal to
    what passed, and beta2 = 1 (no second moment at all) went through."""
    a, b, opt = _trained(recipes.adamw(), fused)
    opt.param_groups[0]["betas"] = [0.9, 0.999]
    opt.step()
    opt.param_groups[0]["betas"][1] = 1.0
    before = _everything(opt, [a, b])
    with pytest.raises(ValueError, match=r"betas=\(0.9, 1.0\): beta2=1.0 must be a number in \[0, 1\)"):
        opt.step()
    _assert_same(before, _everything(opt, [a, b]))


def test_a_bad_hyperparameter_names_its_group() -> None:
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = gc.ChainOptimizer([{"params": [a]}, {"params": [b]}], recipes.adamw())
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"^param group 1: invalid hyperparameter lr=-1.0"):
        opt.step()


def _runs_then_raises(gm, example_inputs):
    """A compiler that runs the graph on the real inputs and then fails: a kernel that failed part-way
    through its run (out of memory), seen from the step."""
    gm(*example_inputs)
    raise RuntimeError("a kernel failed after it wrote")


def test_a_kernel_that_failed_after_writing_is_not_run_again(monkeypatch) -> None:
    """Its first call failed, so the fused path ran the segment uncompiled over buffers the failed
    call had already updated: AdamW's moments took the gradient twice. Now only a failure that wrote
    nothing falls back; this one raises, and the step is rolled back."""
    monkeypatch.setattr(runner, "BACKEND", _runs_then_raises)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    p.grad = torch.randn(6, 5)
    opt = gc.ChainOptimizer([p], recipes.adamw(lr=1e-2), fused=True)
    before = p.detach().clone()
    with pytest.raises(Exception, match="a kernel failed after it wrote"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert not opt.state[p] or float(opt.state[p]["step"]) == 0.0


def _fails_to_compile(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_kernel_that_failed_to_compile_runs_uncompiled_once(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", _fails_to_compile)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    ref = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(6, 5)
    p.grad, ref.grad = g.clone(), g.clone()
    opt = gc.ChainOptimizer([p], recipes.adamw(lr=1e-2), fused=True)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        opt.step()
    torch.optim.AdamW([ref], lr=1e-2).step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_a_tensor_lr_without_a_value_is_refused_by_its_key() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = gc.ChainOptimizer([p], recipes.adamw())
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(1e-3, device="meta")  # was: NotImplementedError, no key named
    with pytest.raises(ValueError, match="invalid hyperparameter lr="):
        opt.step()
