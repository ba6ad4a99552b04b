"""gradchain.testing: every check passes a sound transform and fails a transform broken its way.

Each broken transform (a "mutant") is what a user could plausibly write: hidden state outside the
state dict, a momentum buffer returned as a view, a NaN swallowed by a guard, state kept in bf16.
A check that a mutant passes could not fail, and would be worth nothing.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import gradchain as gc
from gradchain import ChainOptimizer
from gradchain.testing import (
    Case,
    CheckSkipped,
    Report,
    check_aliasing,
    check_contract,
    check_dtypes,
    check_fused,
    check_gradscaler,
    check_hyperparams_used,
    check_nonfinite,
    check_pieces,
    check_resume,
    check_skipped_steps,
    check_transform,
    check_zero_size,
)


def sound() -> gc.Transform:
    return gc.chain(gc.trace(0.9), gc.scale_by_lr(1e-2))


def _descent(t: gc.Transform) -> gc.Transform:
    return gc.chain(t, gc.scale_by_lr(1e-2))


# -- the mutants ----------------------------------------------------------------------------------
def _counting() -> gc.Transform:
    calls = [0]  # hidden state: not in the state dict, so a resumed run starts it again

    def update(u, state, hp, ctx):
        calls[0] += 1
        return list(torch._foreach_mul(u, float(calls[0])))

    return _descent(gc.transform("counting", None, None, update))


def _view_of_buffer(u, state, hp, ctx):
    torch._foreach_mul_(state["buf"], 0.9)
    torch._foreach_add_(state["buf"], u)
    return [b.view_as(b) for b in state["buf"]]  # another tensor object on the same memory


def _buffer_view() -> gc.Transform:
    return _descent(gc.transform("viewtrace", None, lambda p: {"buf": gc.zeros_state(p)}, _view_of_buffer))


def _grad_writer() -> gc.Transform:
    def update(u, state, hp, ctx):
        torch._foreach_mul_(ctx.grads, 2.0)  # writes into p.grad
        return list(torch._foreach_mul(ctx.grads, 1.0))

    return _descent(gc.transform("gradwriter", None, None, update))


def _param_writer() -> gc.Transform:
    def update(u, state, hp, ctx):
        torch._foreach_add_(ctx.params, 1e-3)  # writes into p behind the optimizer's back
        return u

    return _descent(gc.transform("paramwriter", None, None, update))


def _nan_swallower() -> gc.Transform:
    # SM3's old bug: the accumulator takes the NaN, a `> 0` guard keeps the update finite
    def update(u, state, hp, ctx):
        torch._foreach_add_(state["acc"], torch._foreach_mul(u, u))
        return [torch.where(a > 0, x / a.sqrt(), torch.zeros_like(x)).nan_to_num(0.0) for x, a in zip(u, state["acc"])]

    return _descent(gc.transform("swallow", None, lambda p: {"acc": gc.zeros_state(p)}, update))


def _rounded_update() -> gc.Transform:
    def update(u, state, hp, ctx):  # rounds the update to the param's dtype: a second rounding in bf16
        return [x.to(p.dtype).to(x.dtype) for x, p in zip(u, ctx.params)]

    return gc.chain(gc.scale_by_adam(), gc.scale_by_lr(1e-2), gc.transform("rounding", None, None, update))


def _empty_breaker() -> gc.Transform:
    def update(u, state, hp, ctx):
        return [x * (1.0 / x.numel()) for x in u]  # ZeroDivisionError on an empty param

    return _descent(gc.transform("perelem", None, None, update))


def _add_1e6() -> gc.Transform:
    return gc.transform("evil", None, None, lambda u, s, hp, ctx: [x + 1e6 for x in u])


def _factory_decay(decay: float = 0.9) -> gc.Transform:
    """Declares ``decay`` but reads the factory's value: a param group's value or a scheduler never reaches it."""

    def update(u, state, hp, ctx):
        torch._foreach_mul_(state["buf"], decay)  # should be hp["decay"]
        torch._foreach_add_(state["buf"], u)
        return list(state["buf"])

    spec = {"decay": gc.Hyperparam(decay)}
    return _descent(gc.transform("factorydecay", spec, lambda p: {"buf": gc.zeros_state(p)}, update))


def _declared_decay(decay: float = 0.9) -> gc.Transform:
    """The same transform, reading the group's value."""

    def update(u, state, hp, ctx):
        torch._foreach_mul_(state["buf"], hp["decay"])
        torch._foreach_add_(state["buf"], u)
        return list(state["buf"])

    spec = {"decay": gc.Hyperparam(decay)}
    return _descent(gc.transform("declareddecay", spec, lambda p: {"buf": gc.zeros_state(p)}, update))


class _AmpAwareIgnoringFoundInf(ChainOptimizer):
    """Claims GradScaler support (as torch's fused optimizers do), then steps on found-inf steps too."""

    _step_supports_amp_scaling = True

    def step(self, closure=None, *, loss=None):  # type: ignore[override]
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(scale.to(p.grad.dtype))
        return super().step(closure, loss=loss)


class _RefusesFused(ChainOptimizer):
    def __init__(self, params, transform, *, fused: bool = False, **kw):
        if fused:
            raise TypeError("fused=True is not supported here")
        super().__init__(params, transform, **kw)


class _FaithfulFused(ChainOptimizer):
    def __init__(self, params, transform, *, fused: bool = False, **kw):
        super().__init__(params, transform, **kw)


class _SloppyFused(ChainOptimizer):
    """Accepts fused=True and runs 1% hotter: the fused check must see it."""

    def __init__(self, params, transform, *, fused: bool = False, **kw):
        super().__init__(params, transform, **kw)
        self._hot = fused

    def step(self, closure=None, *, loss=None):  # type: ignore[override]
        if self._hot:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(1.01)
        return super().step(closure, loss=loss)


# -- each check passes the sound transform, fails its mutant --------------------------------------
@pytest.mark.parametrize(
    ("check", "mutant", "words"),
    [
        (check_resume, _counting, "resume"),
        (check_aliasing, _grad_writer, "wrote into the gradient"),
        (check_skipped_steps, _param_writer, "param"),
        (check_nonfinite, _nan_swallower, "entered state 'swallow.acc'"),
        (check_dtypes, _rounded_update, "entries differ"),
        (check_zero_size, _empty_breaker, "division by zero"),
        (check_gradscaler, _add_1e6, "overflows"),
    ],
    ids=lambda x: getattr(x, "__name__", None) if callable(x) else None,
)
def test_check_fails_its_mutant(check, mutant, words: str) -> None:
    check(Case("sound", sound))
    with pytest.raises((AssertionError, ZeroDivisionError), match=words):
        check(Case(mutant.__name__, mutant))


def test_hyperparams_used_fails_a_transform_that_reads_its_factory_value() -> None:
    check_hyperparams_used(Case("declared", _declared_decay))
    with pytest.raises(AssertionError, match=r"change nothing .*decay \(tried 1\.35"):
        check_hyperparams_used(Case("factory", _factory_decay))


def test_hyperparams_used_keeps_its_inert_list_true() -> None:
    # a name in inert that does change the run fails (else the list could hide a real fault), and so
    # does a name that is no hyperparameter (a typo would exempt nothing)
    with pytest.raises(AssertionError, match="inert names hyperparameter.*that do change the run: decay"):
        check_hyperparams_used(Case("declared", _declared_decay, inert=("decay",)))
    with pytest.raises(AssertionError, match=r"names no hyperparameter of the optimizer: \['dekay'\]"):
        check_hyperparams_used(Case("declared", _declared_decay, inert=("dekay",)))
    with pytest.raises(ValueError, match="sequence of names"):
        Case("declared", _declared_decay, inert="decay")


def test_a_view_of_a_state_buffer_is_protected_by_the_core() -> None:
    # returning another tensor object on a state buffer's memory: the bucket copies it before any
    # in-place work, so the aliasing check passes and the state reads right
    check_aliasing(Case("view", _buffer_view))


def test_gradscaler_check_fails_an_optimizer_that_steps_on_found_inf() -> None:
    with pytest.raises(AssertionError, match="the step GradScaler skipped"):
        check_gradscaler(Case("amp", sound, optimizer=_AmpAwareIgnoringFoundInf))


def test_aliasing_in_a_chain_is_checked_without_the_standalone_part() -> None:
    # optimizer-level state: the standalone part is skipped with a note, the in-chain part runs
    note = check_aliasing(Case("adalo", gc.recipes.adalo))
    assert note is not None and "optimizer-level state" in note


def test_contract_names_the_bad_state_key() -> None:
    class NoPrefix(gc.Leaf):
        def init_state(self, param, name=None):
            return {"buf": torch.zeros_like(param)}

    bad = NoPrefix("noprefix", None, None, lambda u, s, hp, ctx: u)
    with pytest.raises(AssertionError, match="state key 'buf'"):
        check_contract(Case("noprefix", lambda: _descent(bad)))


def test_fused_check_skips_when_refused_and_fails_when_required() -> None:
    case = Case("refuses", sound, optimizer=_RefusesFused)
    with pytest.raises(CheckSkipped, match="fused=True"):
        check_fused(case)
    with pytest.raises(AssertionError, match=r"fused=True\) was refused"):
        check_fused(case, required=True)
    with pytest.raises(AssertionError, match="fused"):
        check_fused(Case("sloppy", sound, optimizer=_SloppyFused))
    check_fused(Case("faithful", sound, optimizer=_FaithfulFused), required=True)


def test_check_transform_reports_and_names_what_failed() -> None:
    report = check_transform(sound, fsdp2=False, fused=False, steps=4, skip=("aliasing", "nonfinite"))
    assert isinstance(report, Report) and "resume" in report.passed and "dtypes" in report.passed
    assert report.skipped == {} and "aliasing" not in report.passed
    with pytest.raises(AssertionError) as info:
        check_transform(_nan_swallower, fsdp2=False, fused=False, steps=4,
                        skip=("contract", "resume", "dtypes", "aliasing", "gradscaler", "zero_size"))
    assert "nonfinite" in str(info.value) and "swallow.acc" in str(info.value)


def test_fsdp2_is_skipped_with_a_reason_for_a_factory_that_does_not_pickle() -> None:
    report = check_transform(lambda: sound(), fused=False, skip=tuple(
        ["contract", "invalid_hyperparams", "resume", "skipped_steps", "gradscaler", "aliasing", "dtypes",
         "zero_size", "nonfinite", "sparse"]))
    assert "pickle" in report.skipped["fsdp2"]


def test_importing_gradchain_does_not_import_the_harness_nor_the_harness_pytest() -> None:
    code = (
        "import sys, gradchain; assert 'gradchain.testing' not in sys.modules; "
        "import gradchain.testing; assert 'pytest' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _mean_square_momentum(step_scalars: bool) -> gc.Transform:
    """Momentum divided by the root of an EMA of each tensor's mean square (a 0-d state per tensor),
    declared rightly (segmented: whole tensors) or wrongly (step_scalars: any slice would do)."""

    def init(p):
        return {"m": gc.zeros_state(p), "v": gc.scalar_state(p)}

    def update(updates, state, hp, ctx):
        gc.ops.update_moment(state["m"], updates, 0.9)
        ms = ctx.tensor_norms(updates) ** 2 / ctx.tensor_numels(updates).clamp_min(1.0)
        v = ctx.state_vector(state["v"]) * 0.99 + ms * 0.01
        ctx.store_state_vector(state["v"], v)
        return torch._foreach_mul(state["m"], ctx.per_tensor(1.0 / (v.sqrt() + 1e-8)))

    return _descent(gc.transform("msm", {}, init, update, segmented=True, step_scalars=step_scalars))


def test_check_pieces_catches_a_declaration_that_lets_the_eager_pieces_cut_a_reduction() -> None:
    # the 0-d state depends on the whole tensor's values: step_scalars lets the eager step in pieces
    # give each slice its own, which no other check sees on tensors smaller than a piece
    check_pieces(Case("right", lambda: _mean_square_momentum(False)))
    with pytest.raises(AssertionError, match="pieces .*differs from the run over whole buckets"):
        check_pieces(Case("wrong", lambda: _mean_square_momentum(True)))
    report = check_transform(lambda: _mean_square_momentum(False), fsdp2=False)
    assert "pieces" in report.passed


def test_a_transform_subclass_needs_no_extra_defaults_of_its_own() -> None:
    # the documented way past one bucket (subclass Transform: apply, init_state, hyperparams)
    class Halve(gc.Transform):
        name = "halve"
        hyperparams: dict = {}

        def init_state(self, param, name=None):
            return {}

        def apply(self, buckets):
            for b in buckets:
                b.updates = torch._foreach_mul(b.updates, 0.5)

    p = torch.nn.Parameter(torch.ones(3))
    opt = ChainOptimizer([p], gc.chain(Halve(), gc.scale_by_lr(0.1)))
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.95))


def test_the_harness_keeps_its_own_grad_copy_warning_to_itself(monkeypatch) -> None:
    # the harness sets new grads at every step on purpose: the fused path's advice about that
    # (use this optimizer's zero_grad) is not about the user's code
    from gradchain.fused import runner
    from gradchain.optimizer import FusedGradientCopyWarning

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_fused(Case("sound", sound), required=True)
    assert not [w for w in seen if issubclass(w.category, FusedGradientCopyWarning)]


def test_the_fused_check_names_the_run_it_compares_with(monkeypatch) -> None:
    # a scale that reads the param's shape, declared elementwise: the fused kernel sees one flat buffer
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")

    def fan_in_scale():
        def update(updates, state, hp, ctx):
            return [u / (p.shape[1] if p.dim() >= 2 else 1) ** 0.5 for u, p in zip(updates, ctx.params)]

        return gc.chain(gc.transform("fanin", {}, update=update, elementwise=True), gc.scale_by_lr(1e-2))

    with pytest.raises(AssertionError, match="differs from the eager run"):
        check_fused(Case("fanin", fan_in_scale), required=True)
