"""The eager step in cache-sized pieces (``gradchain.pieces``).

Every recipe stepped in pieces (pieces made small here, so that small tensors are cut into
slices and grouped) leaves the same params and state, bit for bit, as the same recipe stepped
over whole buckets; gradients and lent tensors are never written; a transform that rebinds its
state writes into the slice; only what may be cut is cut.
"""

from __future__ import annotations

import pytest
import torch
from harness import peak_bytes
from torch import nn

import gradchain as gc
from gradchain import pieces, recipes
from gradchain.base import Bucket

RECIPES = sorted(n for n in recipes.__all__ if n != "muon_hidden_matrix")
FACTORIES = {"lookahead": lambda: recipes.lookahead(recipes.adamw())}
# sizes that cut into several slices with a short last one, small tensors that group, a 0-d gain
SHAPES = [(40, 30), (17,), (300,), (64, 64), (5, 7, 9), (), (3, 200)]


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(pieces, "PIECE_NUMEL", 256)
    return 256


def _params(dtype: torch.dtype, transposed: bool = False) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, s in enumerate(SHAPES):
        t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if transposed and len(s) == 2:
            t = t.t().contiguous().t()  # a non-contiguous param: stepped whole
        out.append((f"p{i}", nn.Parameter(t)))
    return out


def _run(name: str, in_pieces: bool, dtype: torch.dtype = torch.float32, steps: int = 4, transposed: bool = False,
         skip: int | None = None, **kw):
    named = _params(dtype, transposed)
    factory = FACTORIES[name] if name in FACTORIES else getattr(recipes, name)
    opt = gc.ChainOptimizer(named, factory(), **kw)
    if not in_pieces:
        opt._pieces = None
    for k in range(steps):
        g = torch.Generator().manual_seed(100 + k)
        for j, (_, p) in enumerate(named):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            if k == 1 and j == skip:
                p.grad = None  # this param skips a step: its step count differs from its neighbours'
        opt.step(loss=torch.tensor(1.0 / (k + 2)))
    return named, opt


def _assert_identical(a, b, rounding: bool = False) -> None:
    (a_named, a_opt), (b_named, b_opt) = a, b
    for (n, x), (_, y) in zip(a_named, b_named, strict=True):
        if rounding:
            torch.testing.assert_close(y.detach(), x.detach(), rtol=2e-6, atol=1e-6)
            continue
        assert torch.equal(x.detach(), y.detach()), f"param {n} differs by {(x - y).abs().max().item()}"
        sa, sb = a_opt.state[x], b_opt.state[y]
        assert sorted(sa) == sorted(sb), n
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, torch.Tensor) and rounding:
                torch.testing.assert_close(vb, va, rtol=2e-6, atol=1e-6)
            elif isinstance(va, torch.Tensor):
                assert va.shape == vb.shape and torch.equal(va, vb), f"state {k} of {n} differs"  # noqa: PT018


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_same_bits_in_pieces(name: str, small_pieces: int) -> None:
    _assert_identical(_run(name, False), _run(name, True))


@pytest.mark.parametrize("name", RECIPES)
def test_same_bits_when_step_counts_differ(name: str, small_pieces: int) -> None:
    # schedule-free takes a cheaper form of its rule when every tensor of its bucket has one step
    # count: a piece of tensors that agree takes it where the whole bucket does not (fp32 rounding)
    rounding = name.startswith("schedule_free")
    _assert_identical(_run(name, False, skip=2), _run(name, True, skip=2), rounding)


@pytest.mark.parametrize("name", ["adamw", "nadam", "lamb", "schedule_free_adamw", "adafactor"])
def test_bf16_params_and_non_contiguous(name: str, small_pieces: int) -> None:
    _assert_identical(_run(name, False, torch.bfloat16), _run(name, True, torch.bfloat16))
    _assert_identical(_run(name, False, transposed=True), _run(name, True, transposed=True))


def _record(monkeypatch: pytest.MonkeyPatch) -> list:
    seen: list = []
    subset = Bucket.subset

    def spy(self, indices, slices=None, keys=None, **kw):
        seen.append((list(indices), list(slices or [None] * len(indices))))
        return subset(self, indices, slices, keys, **kw)

    monkeypatch.setattr(Bucket, "subset", spy)
    return seen


def test_what_is_cut(small_pieces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record(monkeypatch)
    _run("adamw", True, steps=1)
    sliced = [(i, s) for idx, sl in seen for i, s in zip(idx, sl) if s is not None]
    # (40, 30) is 1200 elements: slices of 256, the last one short; (3, 200) likewise
    assert [s for i, s in sliced if i == 0] == [slice(a, min(a + 256, 1200)) for a in range(0, 1200, 256)]
    assert {i for i, _ in sliced} == {i for i, s in enumerate(SHAPES) if torch.Size(s).numel() > 256}
    assert all(sum(torch.Size(SHAPES[i]).numel() for i in idx) <= 256 for idx, sl in seen if sl == [None] * len(idx)
               if len(idx) > 1)
    # LAMB's trust ratio is a norm per tensor: its run keeps whole tensors
    seen.clear()
    _run("lamb", True, steps=1)
    assert seen and all(s is None for _, sl in seen for s in sl)


@pytest.mark.parametrize("name", ["gc_adamw", "agc_sgd", "softclip_adamw"])
def test_rowwise_runs_cut_whole_rows(name: str, small_pieces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # per-row reductions (row means, unit norms): a large matrix goes in blocks of whole rows, each
    # viewed with the matrix's trailing shape; a large vector (one unit for AGC) stays whole
    seen = _record(monkeypatch)
    _run(name, True, steps=1)
    sliced = [(i, s) for idx, sl in seen for i, s in zip(idx, sl) if s is not None]
    for i, shape in enumerate(SHAPES):
        n = torch.Size(shape).numel()
        if len(shape) < 2 or n <= small_pieces:
            assert all(j != i for j, _ in sliced), (name, shape)
            continue
        row = n // shape[0]
        step = max(1, small_pieces // row) * row
        assert [s for j, s in sliced if j == i] == [slice(a, min(a + step, n)) for a in range(0, n, step)], shape
    _assert_identical(_run(name, False), _run(name, True))


def test_phased_transform_in_pieces(small_pieces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prodigy: pass 1 (sums per tensor) over whole tensors in groups, pass 2 (elementwise) sliced
    seen = _record(monkeypatch)
    _run("prodigy", True, steps=1)
    whole = [idx for idx, sl in seen if sl == [None] * len(idx)]
    sliced = [(i, s) for idx, sl in seen for i, s in zip(idx, sl) if s is not None]
    big = {i for i, s in enumerate(SHAPES) if torch.Size(s).numel() > 256}
    assert sorted({i for idx in whole for i in idx}) == list(range(len(SHAPES)))  # pass 1: every tensor whole
    assert {i for i, _ in sliced} == big  # pass 2: the large ones sliced
    assert [s for i, s in sliced if i == 0] == [slice(a, min(a + 256, 1200)) for a in range(0, 1200, 256)]


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_lookahead_inner_chain_in_pieces(small_pieces: int, monkeypatch: pytest.MonkeyPatch, pullback: str) -> None:
    # k=2 over 5 steps: steps without a sync let the inner chain write in slices; sync steps keep
    # its updates for the sync; the same bits as over whole buckets either way
    FACTORIES["la2"] = lambda: recipes.lookahead(recipes.adamw(), k=2, alpha=0.5, pullback_momentum=pullback)
    try:
        _assert_identical(_run("la2", False, steps=5), _run("la2", True, steps=5))
        seen = _record(monkeypatch)
        _run("la2", True, steps=1)
        assert any(s is not None for _, sl in seen for s in sl)  # step 1: no sync, sliced
    finally:
        del FACTORIES["la2"]


def _inplace_double() -> gc.Transform:
    def update(updates, state, hp, ctx):
        for u in updates:
            u.mul_(2.0)  # in place: the bucket must hand over a tensor it owns
        return updates

    return gc.transform("double", {}, None, update, inplace=True, elementwise=True)


def _rebinding_ema() -> gc.Transform:
    def init(p):
        return {"ema": torch.zeros_like(p)}

    def update(updates, state, hp, ctx):
        state["ema"] = [0.5 * e + 0.5 * u for e, u in zip(state["ema"], updates)]  # new tensors, not in place
        return list(state["ema"])

    return gc.transform("ema", {}, init, update, elementwise=True)


# (chain, the step it must take from p0 with gradient g)
NEVER_WRITTEN = {
    "in-place transform": (lambda: gc.chain(_inplace_double(), gc.scale_by_lr(0.1)), lambda p0, g: p0 - 0.2 * g),
    # a run before the last whose slices' updates are the gradient's (a pending param term only)
    # hands over the gradient itself as the update; the global clip after it forms u = g + wd p
    # without writing into p.grad
    "handed over": (lambda: gc.chain(gc.add_l2(0.1), gc.clip_by_global_norm(1e30), gc.trace(0.0), gc.scale_by_lr(0.1)),
                    lambda p0, g: p0 - 0.1 * (g + 0.1 * p0)),
}


@pytest.mark.parametrize("case", list(NEVER_WRITTEN))
def test_gradients_never_written(case: str, small_pieces: int) -> None:
    make, expected = NEVER_WRITTEN[case]
    named = _params(torch.float32)
    opt = gc.ChainOptimizer(named, make())
    assert opt._pieces is not None and opt._pieces.runs[0][0] == "pieced"
    grads = []
    for _, p in named:
        p.grad = torch.randn_like(p)
        grads.append(p.grad.clone())
    before = [p.detach().clone() for _, p in named]
    opt.step()
    for (_, p), g, p0 in zip(named, grads, before, strict=True):
        assert torch.equal(p.grad, g)
        torch.testing.assert_close(p.detach(), expected(p0, g), rtol=0, atol=1e-6)


def test_rebound_state_goes_into_the_slice(small_pieces: int) -> None:
    def run(in_pieces: bool):
        named = _params(torch.float32)
        opt = gc.ChainOptimizer(named, gc.chain(_rebinding_ema(), gc.scale_by_lr(0.1)))
        if not in_pieces:
            opt._pieces = None
        for k in range(3):
            g = torch.Generator().manual_seed(k)
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return named, opt

    _assert_identical(run(False), run(True))
    named, opt = run(True)
    big = named[0][1]
    assert opt.state[big]["ema.ema"].shape == big.shape


def test_not_on_gpu_or_for_non_chains() -> None:
    # a partition (Muon) runs each child's chain in pieces, Lookahead its inner chain; a chain of
    # scales alone gains nothing
    assert pieces.PiecewiseChain(recipes.lookahead(recipes.adamw())).useful
    assert pieces.PiecewiseChain(recipes.muon()).useful
    assert not pieces.PiecewiseChain(gc.chain(gc.add_decoupled_wd(0.1), gc.scale_by_lr(0.1))).useful
    assert pieces.PiecewiseChain(recipes.adamw()).useful


def test_partition_and_mask_children_in_pieces(small_pieces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # each child of a partition or a mask runs its chain in pieces over its own params, its large
    # tensors in slices: the partition's children hand their updates back as whole tensors (the views
    # they are: the lent momentum, Adam's numerator and its divisor formed from state), the mask (the
    # chain's last run) lets its child write its params; the bits are kept
    def mixed() -> gc.Transform:
        adam = gc.chain(gc.scale_by_adam(), gc.add_decoupled_wd(0.1))
        sgd = gc.chain(gc.trace(0.9), gc.scale(2.0))
        return gc.chain(gc.partition({"adam": adam, "sgd": sgd}, lambda name, p: "adam" if p.ndim == 2 else "sgd"),
                        gc.masked(gc.chain(gc.add_decoupled_wd(0.1, name="wd2").renamed({"weight_decay": "wd2"}),
                                           gc.scale_by_lr(0.5)), ["p1", "p3"]))

    FACTORIES["mixed"] = mixed
    try:
        _assert_identical(_run("mixed", False), _run("mixed", True))
        seen = _record(monkeypatch)
        _run("mixed", True, steps=1)
        # the partition's two sub-buckets and the mask's, then the children's pieces (of 256
        # elements): the adam child's p0, p3 and p6 in 5 + 16 + 3 slices; the sgd child's p1 and the
        # 0-d p5 whole, p2 and p4 in 2 slices each; the mask's child p1 whole and p3 in 16 slices;
        # then the 5 params the mask did not take, written together
        sliced = [idx for idx, sl in seen if sl[0] is not None]
        assert len(sliced) == (5 + 16 + 3) + (2 + 2) + 16
        assert sorted(len(idx) for idx, _ in seen) == [1] * (24 + 6 + 17) + [2, 3, 4, 5]
    finally:
        del FACTORIES["mixed"]


@pytest.mark.parametrize("head", ["trace", "adam", "adam_eps_root"])
def test_updates_of_slices_handed_over(head: str, small_pieces: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a run that is not the chain's last cuts large tensors too and hands the next run whole tensors:
    # the momentum buffer itself where the slices' updates are its views (trace lends it: the clip
    # after it must not scale it in place), Adam's numerator and its divisor formed from state (views
    # of v). Adam with eps_root forms its divisor in the transform: piece-sized tensors, copied
    # together on the first step, after which that run goes over whole tensors. The bits are kept
    def make() -> gc.Transform:
        first = {"trace": lambda: gc.trace(0.9), "adam": gc.scale_by_adam,
                 "adam_eps_root": lambda: gc.scale_by_adam(eps_root=1e-8)}[head]()
        return gc.chain(first, gc.clip_by_global_norm(0.5), gc.scale_by_lr(0.1))

    FACTORIES["handed_over"] = make
    try:
        _assert_identical(_run("handed_over", False), _run("handed_over", True))
        seen = _record(monkeypatch)
        _run("handed_over", True, steps=2)
        # the 5 tensors over 256 elements are 5 + 2 + 16 + 2 + 3 = 28 slices, in the first run and
        # in the last (which writes them), on both steps; with eps_root the first run is cut once
        runs_cut = 3 if head == "adam_eps_root" else 4
        assert sum(1 for _, sl in seen if sl[0] is not None) == runs_cut * 28
    finally:
        del FACTORIES["handed_over"]



def test_a_global_clip_before_a_later_run_is_handed_over(small_pieces: int) -> None:
    # the clip replaced the updates with the tuple torch's list ops return, and the slices of the run
    # after it (the decay's) could not be handed back into it: TypeError at the first step
    FACTORIES["clip_then_decay"] = lambda: gc.chain(gc.scale_by_adam(), gc.clip_by_global_norm(0.5),
                                                    gc.scale_by_lr(0.05), gc.add_scheduled_wd(0.05))
    try:
        _assert_identical(_run("clip_then_decay", False), _run("clip_then_decay", True))
    finally:
        del FACTORIES["clip_then_decay"]


def _prefixed_chains() -> dict[str, gc.Transform]:
    # leaves, then a routing as the chain's last run: a mask (CPR-AdamW's shape) taking some, all
    # or none of the params, and a partition
    def masked(select):
        cpr = gc.cpr(kappa_init="uniform", kappa_init_param=1.0)
        return lambda: gc.chain(gc.scale_by_adam(), gc.scale_by_lr(0.1), gc.masked(cpr, select))
    return {
        "mask_some": masked(lambda name, p: p.ndim >= 2),
        "mask_all": masked(lambda name, p: True),
        "mask_none": masked(lambda name, p: False),
        "partition": lambda: gc.chain(gc.trace(0.9), gc.partition(
            {"lamb": gc.chain(gc.scale_by_trust_ratio(), gc.scale_by_lr(0.1)), "sgd": gc.scale(0.2)},
            lambda name, p: "lamb" if p.ndim == 2 else "sgd")),
    }


@pytest.mark.parametrize("name", list(_prefixed_chains()))
def test_leaves_before_a_last_routing_run_with_each_child(name: str, small_pieces: int) -> None:
    # the leaves before a last partition or mask run in pieces with each child's chain over its
    # params (the rest alone): the bits of the two runs over whole buckets, state included
    FACTORIES[name] = _prefixed_chains()[name]
    try:
        assert pieces.PiecewiseChain(FACTORIES[name]())._routed_last[2] is not None  # the leaves' own chain
        _assert_identical(_run(name, False), _run(name, True))
        _assert_identical(_run(name, False, skip=2), _run(name, True, skip=2))
    finally:
        del FACTORIES[name]


def test_no_model_sized_updates_before_a_last_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPR-AdamW (Adam, lr, then CPR masked to the matrices): each matrix's Adam update and CPR's
    # p + u are piece-sized; the step held every matrix's update and its p + u at once before (32
    # matrices' bytes here), now two matrices' worth
    monkeypatch.setattr(pieces, "PIECE_NUMEL", 64 * 96)
    named = [(f"h{i}.weight", nn.Parameter(torch.randn(64, 96))) for i in range(16)]
    named.append(("h.bias", nn.Parameter(torch.randn(64))))
    opt = gc.ChainOptimizer(named, recipes.cpr_adamw(kappa_init="uniform", kappa_init_param=1.0))
    for _, p in named:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    peak = peak_bytes(opt.step) / (64 * 96 * 4)
    assert 1.0 < peak < 2.5, peak  # at least a matrix's update: the profiler saw the step


@pytest.mark.parametrize("k", [1, 2])
def test_lookahead_around_a_partition_same_bits_in_pieces(k: int, small_pieces: int) -> None:
    # Muon's per-matrix scales stay pending on each piece (one matrix of the same shape each, larger
    # than a piece); handed back to the bucket for Lookahead's sync, one piece's list of one scale
    # stood for the whole bucket's (it raised: a list op with one scalar for three tensors)
    def run(in_pieces: bool) -> tuple:
        g = torch.Generator().manual_seed(0)
        named = [(f"w{i}", nn.Parameter(torch.randn(20, 20, generator=g))) for i in range(3)]
        named.append(("b", nn.Parameter(torch.randn(20, generator=g))))
        opt = gc.ChainOptimizer(named, recipes.lookahead(recipes.muon(ns_dtype=torch.float32), k=k))
        if not in_pieces:
            opt._pieces = None
        for _ in range(3):
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return named, opt

    _assert_identical(run(False), run(True))
