"""AdaLo on the fused path: its loss-gated EMA compiles, its loss EMA (one scalar for the whole
optimizer) runs eagerly after it.

The compiled part runs in a compiled segment, and the fused trajectory equals the eager one in
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

# recipe -> the transform of it that now compiles
PORTED = {"adalo": "ema"}


@pytest.mark.parametrize("name", sorted(PORTED))
def test_ported_transform_runs_compiled(name: str) -> None:
    opt = gc.ChainOptimizer(make_params(torch.float32), getattr(recipes, name)(), fused=True)
    plan = opt.fused_plan()
    compiled = [t for kind, ts in plan if kind == "compiled" for t in ts]
    eager = [t for kind, ts in plan if kind == "eager" for t in ts]
    assert PORTED[name] in compiled and PORTED[name] not in eager, plan


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


def test_eager_last_segment_writes_the_flat_buffer_in_one_op(monkeypatch) -> None:
    # AdaLo's loss EMA runs eagerly after the compiled EMA and only leaves a scale pending on the
    # flat update: the final write is one op over the flat params, not a list op per param
    named = make_params(torch.float32)
    opt = gc.ChainOptimizer(named, recipes.adalo(), fused=True)
    seen = []
    real = gc.Bucket.write

    def spy(self) -> None:
        seen.append(len(self.params))
        real(self)

    monkeypatch.setattr(gc.Bucket, "write", spy)
    for i in range(2):
        set_grads(named, i, torch.float32)
        opt.step(loss=torch.tensor(0.5))
    assert len(named) > 1 and seen == [1, 1]
    # updates an eager transform replaced (the global clip multiplies them) keep the per-param write
    seen.clear()
    opt = gc.ChainOptimizer(named, gc.chain(gc.scale_by_adam(), gc.clip_by_global_norm(1.0), gc.scale_by_lr(0.1)),
                            fused=True)
    opt.step()
    assert seen == [len(named)]
