"""Transforms that reduce over every bucket, compiled in two passes on the fused path (``fused_phases``).

AdamS's stable weight decay divides by one mean of Adam's v^ over every element of every param of
every group: per flat bucket a compiled ``accumulate`` (the bucket's sum of v^), one ``estimate``
(the mean), then a compiled ``finish`` that runs the decay, the lr after it and the final write.
Its trajectory equals the eager one; the mean counts real elements only (a bucket of more than
SEGMENT_UNROLL params has gaps between them, here filled with garbage); new hyperparameters do
not recompile; checkpoints move between the paths.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from test_fused import assert_same
from torch import nn

import gradchain as gc
from gradchain import recipes
from gradchain.base import SEGMENT_UNROLL
from gradchain.fused import runner

pytestmark = pytest.mark.usefixtures("one_thread")

# 40 params of odd sizes: the first group's bucket (34 params) is laid out in rows, with gaps
SHAPES = [(3, 5), (7,), (1,), (2, 3, 5), (257,), (11, 13), (4,), ()] * 5


def make(dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s, dtype=torch.float64).to(dtype)) for s in SHAPES]


def groups(ps: list, frozen: bool = True) -> list[dict]:
    # two groups that decay differently and one frozen (lr 0): its v still counts in the mean
    out = [{"params": ps[:34]}, {"params": ps[34:38], "weight_decay": 0.5}, {"params": ps[38:]}]
    out[2]["lr" if frozen else "weight_decay"] = 0.0
    return out


def set_grads(ps: list, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


def poison_gaps(opt: gc.ChainOptimizer) -> int:
    """Fill the flat buffers' gaps (elements of no param) with large values; returns their count."""
    n = 0
    for fb in opt._flats.values():
        covered = torch.zeros(fb.total, dtype=torch.bool)
        for o, k in zip(fb.offsets, fb.numels):
            covered[o:o + k] = True
        gaps = ~covered
        n += int(gaps.sum())
        for buf in (fb.flat_grads, *fb.flat_state.values()):
            if buf.numel() == fb.total:
                buf[gaps] = 1e3
    return n


def run(fused: bool, dtype: torch.dtype = torch.float64, steps: int = 5, build=None, poison: bool = True,
        **kw) -> tuple[list, gc.ChainOptimizer]:
    ps = make(dtype)
    t = build() if build is not None else recipes.adams(lr=0.05, weight_decay=0.1, **kw)
    opt = gc.ChainOptimizer(groups(ps), t, fused=fused)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the eager segment fails the test
        for i in range(steps):
            set_grads(ps, i)
            opt.step()
            if fused and poison and i == 0:
                assert poison_gaps(opt) > 0
    return ps, opt


def named(ps: list) -> list:
    return [(str(i), p) for i, p in enumerate(ps)]


def check(a: tuple, b: tuple, rtol: float, atol: float) -> None:
    assert_same(named(a[0]), a[1], named(b[0]), b[1], rtol=rtol, atol=atol)


def test_plan_runs_adam_the_decay_and_the_lr_in_one_phased_segment() -> None:
    ps = make()
    opt = gc.ChainOptimizer(ps, recipes.adams(), fused=True)
    # Adam steps in the first pass and gives its update again from its new m and v in the second
    # (from_state): one segment, no kernel and no kept buffer of its own
    assert opt.fused_plan() == [("compiled", ["adam", "swd", "lr"])]
    (seg,) = opt._fused_chain.segments
    assert [t.name for t in seg.head] == ["adam"] and seg.phased.name == "swd" and [t.name for t in seg.tail] == ["lr"]
    # Prodigy alone, and with an elementwise leaf after it (joins its second pass)
    opt = gc.ChainOptimizer(ps, recipes.prodigy(), fused=True)
    assert opt.fused_plan() == [("compiled", ["prodigy"])]
    t = gc.chain(gc.scale_by_prodigy(), gc.add_decoupled_wd(0.1).renamed({"weight_decay": "wd2"}))
    assert gc.ChainOptimizer(ps, t, fused=True).fused_plan() == [("compiled", ["prodigy", "wd"])]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adams_fused_equals_eager_float64(amsgrad: bool) -> None:
    a = run(False, amsgrad=amsgrad)
    b = run(True, amsgrad=amsgrad)
    assert len(b[0]) > SEGMENT_UNROLL and any(fb.chunked for fb in b[1]._flats.values())
    assert b[1].compile_seconds > 0
    check(a, b, rtol=1e-12, atol=1e-14)
    # the frozen group did not move; the others did
    start = make()
    moved = [not torch.equal(p.detach(), s) for p, s in zip(b[0], start)]
    assert moved[:38] == [True] * 38 and moved[38:] == [False] * 2


def test_adams_fused_equals_eager_float32() -> None:
    a = run(False, torch.float32, steps=6)
    b = run(True, torch.float32, steps=6)
    check(a, b, rtol=1e-5, atol=1e-6)


def test_adams_bfloat16_params_fused_equals_eager() -> None:
    # the decay is added to the fp32 update (no pending term): the bf16 param rounds once
    a = run(False, torch.bfloat16)
    b = run(True, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b[0])
    check(a, b, rtol=1e-2, atol=1e-2)  # a bf16 ulp: the fp32 updates may round either way


def test_masked_stable_wd_runs_eagerly_and_equals_eager() -> None:
    def build():
        return gc.chain(gc.scale_by_adam(), gc.masked(gc.add_stable_wd(0.1), lambda n, p: p.ndim >= 2),
                        gc.scale_by_lr(0.05))

    a = run(False, build=build, poison=False)
    b = run(True, build=build, poison=False)
    assert b[1].fused_plan() == [("compiled", ["adam"]), ("eager", ["masked", "lr"])]
    check(a, b, rtol=1e-12, atol=1e-14)


def test_no_decay_before_any_gradient() -> None:
    ps = make()
    opt = gc.ChainOptimizer(ps, recipes.adams(weight_decay=0.1), fused=True)
    for p in ps:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in ps]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_new_lr_weight_decay_and_betas_do_not_recompile() -> None:
    ps = make()
    opt = gc.ChainOptimizer(groups(ps), recipes.adams(lr=0.05, weight_decay=0.1), fused=True)
    ref_ps = make()
    ref = gc.ChainOptimizer(groups(ref_ps), recipes.adams(lr=0.05, weight_decay=0.1))
    for i in range(6):
        if i == 2:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            seconds = opt.compile_seconds
        if i >= 2:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 0.05 / i
                o.param_groups[1]["weight_decay"] = 0.1 * i
                o.param_groups[0]["betas"] = (0.9 - 0.01 * i, 0.999 - 0.001 * i)
        set_grads(ps, i)
        set_grads(ref_ps, i)
        opt.step()
        ref.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert opt.compile_seconds == seconds > 0
    check((ref_ps, ref), (ps, opt), rtol=1e-12, atol=1e-14)


def saved(opt: gc.ChainOptimizer) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def resume(source: list, state: bytes, fused: bool) -> tuple[list, gc.ChainOptimizer]:
    ps = make()
    for p, q in zip(ps, source):
        p.data.copy_(q.detach())
    opt = gc.ChainOptimizer(groups(ps), recipes.adams(lr=0.05, weight_decay=0.1), fused=fused)
    opt.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return ps, opt


@pytest.mark.parametrize("first", [False, True])
def test_checkpoints_move_between_paths(first: bool) -> None:
    a = run(first, steps=3, poison=False)
    b = resume(a[0], saved(a[1]), not first)
    assert set(saved(a[1])) == set(saved(b[1]))
    for i in range(3, 6):
        for ps, opt in (a, b):
            set_grads(ps, i)
            opt.step()
    check(a, b, rtol=1e-12, atol=1e-14)
    sa = torch.load(io.BytesIO(saved(a[1])), weights_only=True)
    sb = torch.load(io.BytesIO(saved(b[1])), weights_only=True)
    assert {k: sorted(v) for k, v in sa["state"].items()} == {k: sorted(v) for k, v in sb["state"].items()}


def test_prodigy_with_a_leaf_after_it_moves_a_frozen_group_as_eager() -> None:
    # the frozen group gets zero updates from Prodigy; the decoupled decay after it still acts
    def build():
        return gc.chain(gc.scale_by_prodigy(weight_decay=0.05),
                        gc.add_decoupled_wd(0.1).renamed({"weight_decay": "wd2"}))

    a = run(False, build=build, poison=False)
    b = run(True, build=build, poison=False)
    assert b[1].fused_plan() == [("compiled", ["prodigy", "wd"])]
    assert b[1].compile_seconds > 0
    check(a, b, rtol=1e-12, atol=1e-14)
    start = make()
    assert all(not torch.equal(p.detach(), s) for p, s in zip(b[0], start))


def test_a_stateful_head_steps_once_and_in_a_frozen_group() -> None:
    # Adam before Prodigy: its step in the first pass, its update again from its state in the
    # second; in the frozen group (lr 0: no first pass, zero updates from Prodigy) it still steps,
    # as on the eager path. Its state, step by step, is the eager one's
    def build():
        return gc.chain(gc.scale_by_adam(), gc.scale_by_prodigy(), share=["betas", "eps"])

    a = run(False, build=build, poison=False)
    b = run(True, build=build, poison=False)
    assert b[1].fused_plan() == [("compiled", ["adam", "prodigy"])]
    check(a, b, rtol=1e-12, atol=1e-14)
    frozen = b[0][38]
    assert torch.equal(frozen.detach(), make()[38])
    assert b[1].state[frozen]["adam.exp_avg"].abs().sum() > 0


def test_adam_from_state_is_its_update() -> None:
    # the contract: what the update returned, worked out again from the state it wrote, with the
    # state left as it is (amsgrad's running max and eps_root too)
    gen = torch.Generator().manual_seed(5)
    for kw in ({}, {"amsgrad": True}, {"eps_root": 1e-6}):
        t = gc.scale_by_adam(**kw)
        ps = [torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
        state = t.init(ps)
        for _ in range(3):
            gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
            us = t.update(gs, state, ps)
        before = [{k: v.clone() for k, v in st.items()} for st in state]
        group = {k: h.default for k, h in t.hyperparams.items()}
        lists = {k: [st[k] for st in state] for k in state[0] if k != "step"}
        b = gc.base.Bucket(ps, gs, lists, [st["step"] for st in state], [None, None], group, None)
        t.apply_from_state([b])
        again = b.materialize()
        assert all(torch.equal(w, u) for u, w in zip(us, again, strict=True)), kw
        assert all(torch.equal(st[k], was[k]) for st, was in zip(state, before) for k in st), kw


def test_inductor_kernels_equal_eager(monkeypatch) -> None:
    # the real kernels (the suite traces with aot_eager): a chunked bucket, gaps with garbage
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    a = run(False, torch.float32, steps=3)
    b = run(True, torch.float32, steps=3)
    assert b[1].compile_seconds > 0
    check(a, b, rtol=1e-5, atol=1e-6)
