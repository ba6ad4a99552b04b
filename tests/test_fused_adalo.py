"""AdaLo on the fused path: the whole chain is one compiled segment. Its loss EMA (one scalar for
the whole optimizer) works out the step's lr before the kernel (``step_scales``), which takes it as
a 0-d tensor.

The fused trajectory equals the eager one in
float32, non-finite losses included (the float64 check of every recipe is in ``test_fused.py``;
recipes that compile whole are in ``test_fused_whole.py``). The ``aot_eager`` backend traces the
graphs (conftest.py); one test compiles the real inductor kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_fused import assert_same, check_inductor_equals_eager, make_params, run, set_grads

import gradchain as gc
from gradchain import recipes
from gradchain.transforms._declared import Declared

# recipe -> the transforms of it that compile
PORTED = {"adalo": ["ema", "wd", "loss_ema", "lr"]}


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_transform_runs_compiled(name: str) -> None:
    opt = gc.ChainOptimizer(make_params(torch.float32), getattr(recipes, name)(), fused=True)
    assert opt.fused_plan() == [("compiled", PORTED[name])]


def test_loss_ema_advances_once_per_step_and_keeps_no_workspace() -> None:
    # the lr is worked out once per step for every bucket (two groups: two buckets, one EMA), and the
    # chain is one kernel per bucket: no flat buffer is kept for updates between segments
    losses = [0.5, 0.4, 0.3]
    out = []
    for fused in (False, True):
        named = make_params(torch.float32)
        half = len(named) // 2
        groups = [{"params": [p for _, p in named[:half]]}, {"params": [p for _, p in named[half:]], "kappa": 2.0}]
        opt = gc.ChainOptimizer(groups, recipes.adalo(), fused=fused)
        emas = []
        for i, loss in enumerate(losses):
            set_grads(named, i, torch.float32)
            opt.step(loss=torch.tensor(loss))
            emas.append(opt.global_state["loss_ema.loss_ema"].item())
        if fused:
            assert len(opt._flats) == 2
            assert all(not fb._workspaces for fb in opt._flats.values())
        out.append((named, opt, emas))
    # a = 0.999 a + 0.001 / (2 + L), from a = 0, in float32 as the eager path keeps it
    a, expected = torch.tensor(0.0), []
    for loss in losses:
        a = a + (1.0 / (2.0 + torch.tensor(loss)) - a) * torch.tensor(0.001)
        expected.append(a.item())
    for _, _, emas in out:
        assert emas == pytest.approx(expected, rel=1e-6)
    assert_same(out[0][0], out[0][1], out[1][0], out[1][1], rtol=1e-5, atol=1e-6)


def test_missing_loss_raises_before_any_kernel() -> None:
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.adalo(), fused=True)
    set_grads(named, 0, torch.float32)
    opt.step(loss=torch.tensor(0.5))
    before = [p.detach().clone() for _, p in named]
    ema = opt.global_state["loss_ema.loss_ema"].clone()
    with pytest.raises(ValueError, match="loss_ema: the loss sets the step"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for (_, p), b in zip(named, before))
    assert torch.equal(opt.global_state["loss_ema.loss_ema"], ema)


@pytest.mark.parametrize("name", sorted(PORTED))
def test_fused_equals_eager_float32(name: str) -> None:
    a = run(name, False, torch.float32)
    b = run(name, True, torch.float32)
    assert b[1].compile_seconds > 0  # the compiled segment ran, not an eager fallback
    assert_same(*a, *b, rtol=1e-5, atol=1e-6)


def test_adalo_nonfinite_loss_holds_the_compiled_ema() -> None:
    # the gate on the loss is traced (isfinite, where): a NaN loss keeps params and the EMA, as eagerly
    losses = [0.5, 0.4, float("nan"), 0.3, float("inf"), 0.2]
    out = []
    for fused in (False, True):
        named = make_params(torch.float32)
        opt = gc.ChainOptimizer(named, recipes.adalo(kappa=0.5), fused=fused)
        for i, loss in enumerate(losses):
            set_grads(named, i, torch.float32)
            before = [p.detach().clone() for _, p in named]
            ema = [opt.state[p]["ema.ema"].clone() for _, p in named] if i else None
            opt.step(loss=torch.tensor(loss))
            if not torch.isfinite(torch.tensor(loss)):
                for (_, p), p0, m0 in zip(named, before, ema):
                    assert torch.equal(p.detach(), p0)
                    assert torch.equal(opt.state[p]["ema.ema"], m0)
        out.append((named, opt))
    assert_same(*out[0], *out[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PORTED))
def test_inductor_kernels_equal_eager(name: str, monkeypatch) -> None:
    check_inductor_equals_eager(run, name, monkeypatch, steps=3)


class _HalveEagerly(Declared):
    """A user's transform with no fused form: it only leaves a scale pending (eagerly, every bucket)."""

    def __init__(self) -> None:
        self._declare("halve", {})

    def init_state(self, param, name=None):
        return {}

    def apply(self, buckets) -> None:
        for b in buckets:
            b.defer_scale(0.5)


def test_eager_last_segment_writes_the_flat_buffer_in_one_op(monkeypatch) -> None:
    # an eager last segment that only leaves a scale pending on the flat update it got: the final
    # write is one op over the flat params, not a list op per param
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, gc.chain(gc.ema(0.9), _HalveEagerly(), gc.scale_by_lr(0.1)), fused=True)
    assert [kind for kind, _ in opt.fused_plan()] == ["compiled", "eager"]
    seen = []
    real = gc.Bucket.write

    def spy(self) -> None:
        seen.append(len(self.params))
        real(self)

    monkeypatch.setattr(gc.Bucket, "write", spy)
    for i in range(2):
        set_grads(named, i, torch.float32)
        opt.step()
    assert len(named) > 1 and seen == [1, 1]
    # updates an eager transform replaced (the global clip multiplies them) keep the per-param write
    seen.clear()
    opt = gc.ChainOptimizer(named, gc.chain(gc.scale_by_adam(), gc.clip_by_global_norm(1.0), gc.scale_by_lr(0.1)),
                            fused=True)
    opt.step()
    assert seen == [len(named)]


def test_loss_ema_advances_once_per_step_over_routes_by_shape() -> None:
    # SM3 routes params by shape (vectors over one flat buffer, a large matrix alone, a small one
    # eagerly): three chains, one loss EMA, advanced once per step for all of them, as eagerly
    def build() -> gc.Transform:
        return gc.chain(gc.scale_by_sm3(), gc.scale_by_loss_ema(0.9).renamed({"eps": "lr_floor"}), gc.scale_by_lr(0.1))

    out = []
    for fused in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in ((512, 512), (8, 16), (32,))]
        opt = gc.ChainOptimizer(ps, build(), fused=fused)
        if fused:
            assert {p.split("]")[0] for _, names in opt.fused_plan() for p in names} == {
                "[flat", "[tensor", "[eager"}
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(loss=torch.tensor(1.0 + i))
        out.append((list(zip("abc", ps)), opt))
    a = torch.tensor(0.0)
    for i in range(3):
        a = a + (1.0 / (2.0 + torch.tensor(1.0 + i)) - a) * torch.tensor(0.1)
    for _, opt in out:
        assert opt.global_state["loss_ema.loss_ema"].item() == pytest.approx(a.item(), rel=1e-6)
    assert_same(*out[0], *out[1], rtol=1e-5, atol=1e-6)
