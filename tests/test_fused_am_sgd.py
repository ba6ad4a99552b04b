"""AM-SGD on the fused path: its one beta_t is a reduction over every bucket, compiled in two passes.

Per flat bucket a compiled ``accumulate`` (``d_0 = g_0`` and the bucket's ``||g||^2`` and
``||d - g||^2``), one ``estimate`` (beta_t), then a compiled ``finish`` that runs the lerp of ``d``,
the lr after it and the final write. Its trajectory (params, ``memory``, ``beta``) equals the eager
one; several groups still make one beta; groups that disagree on it are refused before anything
moves; a bucket whose first step comes later starts from its own gradient; checkpoints move
between the paths. The eager step in pieces keeps the bits of the step over whole buckets.
"""

from __future__ import annotations

import warnings

import pytest
import test_fused_phases as phases
import test_pieces
import torch
from test_fused import assert_same, check_inductor_equals_eager, make_params, resume, saved, set_grads
from torch import Tensor

import gradchain as gc
from gradchain import pieces, recipes

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def build() -> gc.Transform:
    return recipes.am_sgd(lr=0.05, am_lambda=0.2, beta_max=0.9, weight_decay=0.1)


def _run(name: str, fused: bool, dtype: torch.dtype, steps: int = 6) -> tuple[list, gc.ChainOptimizer]:
    assert name == "am_sgd"
    named = make_params(dtype)
    opt = gc.ChainOptimizer(named, build(), fused=fused)
    with warnings.catch_warnings():
        # a segment that fails to trace falls back to eager with a RuntimeWarning: that is a failure here
        warnings.simplefilter("error", RuntimeWarning)
        for i in range(steps):
            set_grads(named, i, dtype)
            opt.step()
    return named, opt


def _betas(opt: gc.ChainOptimizer, named: list) -> set[float]:
    return {float(opt.state[p]["am.beta"]) for _, p in named}


def _snapshot(opt: gc.ChainOptimizer, ps: list) -> tuple[list, list]:
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state[p].items()} for p in ps]


def _unchanged(opt: gc.ChainOptimizer, ps: list, snap: tuple[list, list]) -> bool:
    before, state = snap
    return all(torch.equal(p, q) for p, q in zip(ps, before, strict=True)) and all(
        torch.equal(opt.state[p][k], v) for p, st in zip(ps, state, strict=True) for k, v in st.items())


# -- the plan -------------------------------------------------------------------------------------
def test_am_and_the_lr_after_it_are_one_phased_compiled_segment() -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, build(), fused=True)
    (seg,) = [s for s in opt._fused_chain.segments if s.phased is not None]
    assert seg.compiled and seg.phased.name == "am" and [t.name for t in seg.tail] == ["lr"]
    # without the coupled decay before it, the whole chain is compiled
    t = gc.chain(gc.adaptive_memory_momentum(), gc.scale_by_lr(0.05))
    assert gc.ChainOptimizer(named, t, fused=True).fused_plan() == [("compiled", ["am", "lr"])]


def test_am_sgd_plan_is_fully_compiled() -> None:
    # the coupled decay before the phased passes is stateless and elementwise: each pass runs it
    # again on the gradient, so it is no kernel of its own and no flat buffer keeps its output
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, build(), fused=True)
    assert opt.fused_plan() == [("compiled", ["l2", "am", "lr"])]
    (seg,) = opt._fused_chain.segments
    assert [t.name for t in seg.head] == ["l2"] and seg.phased.name == "am" and [t.name for t in seg.tail] == ["lr"]
    for i in range(2):
        set_grads(named, i, torch.float32)
        opt.step()
    assert all(not fb._workspaces for fb in opt._flats.values())
    # a stateful transform before a phased one keeps its own kernel unless it can give its update
    # again from its state (from_state: AdamS's Adam does, a momentum does not)
    adams = gc.ChainOptimizer(make_params(torch.float32), recipes.adams(), fused=True)
    assert adams.fused_plan() == [("compiled", ["adam", "swd", "lr"])]
    t = gc.chain(gc.trace(0.5), gc.adaptive_memory_momentum(), gc.scale_by_lr(0.1))
    assert gc.ChainOptimizer(make_params(torch.float32), t, fused=True).fused_plan() == [
        ("compiled", ["momentum"]), ("compiled", ["am", "lr"])]


# -- the trajectory -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, 1e-5, 1e-6), (F64, 1e-12, 1e-14)])
def test_fused_equals_eager(dtype: torch.dtype, rtol: float, atol: float) -> None:
    a = _run("am_sgd", False, dtype)
    b = _run("am_sgd", True, dtype)
    assert b[1].compile_seconds > 0  # the compiled passes ran, not the eager fallback
    assert_same(*a, *b, rtol=rtol, atol=atol)
    # one beta for every param, which moved away from the clip it starts at (d_0 = g_0: beta_max)
    (beta,) = _betas(b[1], b[0])
    assert 0.0 < beta < 0.9


def test_inductor_kernels_equal_eager(monkeypatch) -> None:
    check_inductor_equals_eager(_run, "am_sgd", monkeypatch, steps=4)


# -- several groups: one beta -----------------------------------------------------------------------
def build_plain() -> gc.Transform:
    # no coupled decay before AM (a decoupled one after it, in its compiled second pass)
    return gc.chain(gc.adaptive_memory_momentum(am_lambda=0.2), gc.add_decoupled_wd(0.0), gc.scale_by_lr(0.05))


@pytest.mark.parametrize("factory", [build, build_plain], ids=["am_sgd", "am_wd_lr"])
def test_groups_make_one_beta_fused_equals_eager(factory) -> None:
    # three groups (one frozen with lr 0: its params count in beta but do not move), the first a
    # chunked bucket whose gaps hold garbage that the sums must leave out (without the decay before
    # it, AM reads the flat gradients themselves, gaps included)
    a = phases.run(False, build=factory, poison=False)
    b = phases.run(True, build=factory)
    assert len({id(fb) for fb in b[1]._flats.values()}) == 3 and any(fb.chunked for fb in b[1]._flats.values())
    assert b[1].compile_seconds > 0
    if factory is build_plain:
        assert b[1].fused_plan() == [("compiled", ["am", "wd", "lr"])]
    phases.check(a, b, rtol=1e-12, atol=1e-14)
    assert len(_betas(b[1], phases.named(b[0]))) == 1
    start = phases.make()
    moved = [not torch.equal(p.detach(), s) for p, s in zip(b[0], start, strict=True)]
    assert moved == [True] * 38 + [False] * 2


@pytest.mark.parametrize("fused", [False, True])
def test_groups_that_disagree_are_refused_before_anything_moves(fused: bool) -> None:
    named = make_params(F64)
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer([{"params": ps[:3]}, {"params": ps[3:]}], build(), fused=fused)
    set_grads(named, 0, F64)
    opt.step()
    snap = _snapshot(opt, ps)
    opt.param_groups[1]["am_lambda"] = 0.3  # one beta needs one lambda
    set_grads(named, 1, F64)
    with pytest.raises(ValueError, match="am_lambda"):
        opt.step()
    assert _unchanged(opt, ps, snap), "params or state (step counts too) moved"
    # agreeing again, the step runs
    opt.param_groups[0]["am_lambda"] = 0.3
    opt.step()
    assert not _unchanged(opt, ps, snap)


def test_new_hyperparameters_do_not_recompile() -> None:
    runs = []
    for fused in (False, True):
        named = make_params(F64)
        ps = [p for _, p in named]
        opt = gc.ChainOptimizer([{"params": ps[:3]}, {"params": ps[3:]}], build(), fused=fused)
        for i in range(6):
            if i == 2 and fused:
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                seconds = opt.compile_seconds
            if i >= 2:
                for group in opt.param_groups:
                    group.update(am_lambda=0.1 * i, beta_max=0.95 - 0.01 * i, beta_min=0.01 * i, lr=0.05 / i)
            set_grads(named, i, F64)
            opt.step()
        runs.append((named, opt))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert runs[1][1].compile_seconds == seconds > 0
    assert_same(*runs[0], *runs[1], rtol=1e-12, atol=1e-14)


# -- params without a gradient ----------------------------------------------------------------------
def _late_group(fused: bool, late: int = 2) -> tuple[list, gc.ChainOptimizer, Tensor]:
    """The conv weight in a group of its own, without a grad for the first ``late`` steps: its flat
    bucket's first step is the others' third, so only it starts from its own gradient then. Returns
    the params, the optimizer, and that gradient (with the coupled decay) and its memory after it."""
    named = make_params(F64)
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer([{"params": ps[1:]}, {"params": ps[:1]}], build(), fused=fused)
    first = torch.empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # every bucket keeps one step count: no fallback
        for i in range(5):
            set_grads(named, i, F64)
            if i < late:
                ps[0].grad = None
            if i == late:
                g0 = ps[0].grad + 0.1 * ps[0].detach()
            opt.step()
            if i == late:
                first = torch.stack([g0, opt.state[ps[0]]["am.memory"].clone()])
    return named, opt, first


def test_a_bucket_whose_first_step_comes_later() -> None:
    a = _late_group(False)
    b = _late_group(True)
    assert b[1].compile_seconds > 0
    assert float(b[1].state[b[0][0][1]]["step"]) == 3.0 and float(b[1].state[b[0][1][1]]["step"]) == 5.0
    assert_same(*a[:2], *b[:2], rtol=1e-12, atol=1e-14)
    for _, _, (g0, memory) in (a, b):
        # d_0 = g_0: the lerp of g with itself is g (else a fraction (1 - beta)/(1 + lam) of it)
        torch.testing.assert_close(memory, g0, rtol=1e-14, atol=0)


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", [False, True])
def test_checkpoints_move_between_paths(first: bool) -> None:
    a_named, a_opt = _run("am_sgd", first, F64, steps=3)
    named, opt = resume(a_named, saved(a_opt), build, fused=not first)
    assert set(a_opt.state_dict()["state"][0]) == set(opt.state_dict()["state"][0]) == {"step", "am.memory", "am.beta"}
    for i in range(3, 6):
        set_grads(named, i, F64)
        set_grads(a_named, i, F64)
        opt.step()
        a_opt.step()
    assert_same(a_named, a_opt, named, opt, rtol=1e-12, atol=1e-14)
    if not first:
        assert opt.compile_seconds > 0


# -- the eager step in pieces ---------------------------------------------------------------------------
def test_pieces_keep_the_bits_in_float64(monkeypatch) -> None:
    # pass 1 over parts of a bucket adds each tensor's terms in order, as over the whole bucket: in
    # float32 a float64 sum's last bits vanish when beta is rounded, in float64 they do not
    monkeypatch.setattr(pieces, "PIECE_NUMEL", 256)
    a = test_pieces._run("am_sgd", False, F64, steps=6)
    b = test_pieces._run("am_sgd", True, F64, steps=6)
    assert b[1]._pieces is not None
    test_pieces._assert_identical(a, b)
