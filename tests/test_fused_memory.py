"""What the fused path allocates per step: updates passed between segments go into buffers kept
from step to step, and an update read twice in a kernel (a norm, then the write) is computed
twice rather than stored in a fresh full-size buffer (on CPU each one costs page faults, every step)."""

from __future__ import annotations

import gc as pygc
import weakref

import pytest
import torch
from test_fused import assert_same
from torch import nn
from torch._inductor.utils import run_and_get_code

import gradchain as gc
from gradchain import recipes
from gradchain.fused import flat as flat_module
from gradchain.fused import runner
from gradchain.fused.flat import FlatBucket


def params(dtype: torch.dtype, shapes=((6, 5), (4, 3), (7,))) -> list:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]


def steps(ps: list, opt: gc.ChainOptimizer, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        opt.step()


def chain() -> gc.Transform:
    # compiled, eager in place, compiled with state, eager last: the second compiled segment reads
    # the first one's buffer, so it must write its own into the other
    return gc.chain(gc.scale_by_adam(), gc.add_norm_loss(0.1), gc.ema(0.5), gc.clip_by_norm(0.5),
                    gc.scale_by_lr(0.1))


def test_segments_pass_updates_through_kept_buffers(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    seen = []
    original = FlatBucket.workspace

    def workspace(self, dtype, avoid=None):
        ws = original(self, dtype, avoid=avoid)
        seen.append((None if avoid is None else avoid.untyped_storage().data_ptr(), ws.untyped_storage().data_ptr()))
        return ws

    monkeypatch.setattr(FlatBucket, "workspace", workspace)
    a, b = params(torch.float64), params(torch.float64)
    oa = gc.ChainOptimizer(a, chain())
    ob = gc.ChainOptimizer(b, chain(), fused=True)
    assert [k for k, _ in ob.fused_plan()] == ["compiled", "eager", "compiled", "eager"]
    steps(a, oa, 5)
    steps(b, ob, 5)
    assert_same(list(zip("abc", a)), oa, list(zip("abc", b)), ob, rtol=1e-12, atol=1e-14)
    (fb,) = ob._flats.values()
    kept = {ws.untyped_storage().data_ptr() for ws in fb._workspaces[torch.float64]}
    assert len(kept) == 2 and {out for _, out in seen} == kept  # two buffers, the same ones every step
    assert all(out != avoid for avoid, out in seen)
    assert any(avoid in kept for avoid, _ in seen)  # the eager norm loss handed the first buffer on


@pytest.mark.parametrize("name", ["lamb", "cautious_adamw", "adams"])
def test_inductor_stores_no_full_size_update(name: str, monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    torch._dynamo.reset()
    n = 4099  # a size of its own, so the kernel compiles here (no cache hit)
    ps = params(torch.float32, shapes=((n,),))
    opt = gc.ChainOptimizer(ps, getattr(recipes, name)(), fused=True)
    ps[0].grad = torch.randn(n)
    _, codes = run_and_get_code(opt.step)
    assert codes, "nothing was compiled"
    # LAMB's and the cautious update are read by a reduction and by the write, and AdamS's Adam
    # update by its mean's pass and by the decay's: computed in both kernels, never stored
    assert not any(f"(({n}, ), (1, ), torch.float32)" in code for code in codes)
    ref = params(torch.float32, shapes=((n,),))
    eager = gc.ChainOptimizer(ref, getattr(recipes, name)())
    ref[0].grad = ps[0].grad.clone()
    eager.step()
    torch.testing.assert_close(ps[0].detach(), ref[0].detach(), rtol=1e-5, atol=1e-6)


def test_views_of_the_buckets_own_buffers_are_made_once() -> None:
    # an eager segment over many params splits the flat grads and updates at every step: the views
    # of buffers the bucket keeps are reused (a fresh list each time), any other tensor's are new
    # and not kept (its memory is freed with it)
    ps = params(torch.float32)
    for p in ps:
        p.grad = torch.ones_like(p)
    fb = FlatBucket(ps, [{"step": torch.zeros(())} for _ in ps], [None] * len(ps))
    ws = fb.workspace(torch.float32)
    for flat in (fb.flat_grads, fb.flat_params, ws):
        a, b = fb.split(flat), fb.split(flat)
        assert a is not b and all(x is y for x, y in zip(a, b, strict=True))
        assert all(v.data_ptr() == flat[o:].data_ptr() for v, o in zip(a, fb.offsets, strict=True))
        a[0] = torch.zeros(1)  # a caller rebinding an entry changes only its own list
        assert fb.split(flat)[0] is b[0]
    other = torch.randn(fb.total)
    views = fb.split(other)
    assert views[1].data_ptr() == other[fb.offsets[1]:].data_ptr() and views[0] is not fb.split(other)[0]
    ref = weakref.ref(other)
    del other, views
    pygc.collect()
    assert ref() is None


def test_workspaces_are_freed_after_each_step_off_the_cpu(monkeypatch) -> None:
    # on a GPU the buffers for updates between segments go back to the caching allocator after each
    # step (the forward and backward passes can use that memory); on a CPU they are kept (a fresh
    # one costs page faults). The CPU stands in for a device that does not keep them here.
    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    kept, freed, ref = params(torch.float64), params(torch.float64), params(torch.float64)
    ok, of, oe = (gc.ChainOptimizer(kept, chain(), fused=True), gc.ChainOptimizer(freed, chain(), fused=True),
                  gc.ChainOptimizer(ref, chain()))
    steps(kept, ok, 3)
    assert all(fb._workspaces for fb in ok._flats.values())
    monkeypatch.setattr(flat_module, "KEEP_WORKSPACES", frozenset())
    for i in range(3):
        steps(freed, of, 1, start=i)
        (fb,) = of._flats.values()
        assert not fb._workspaces and not fb._workspace_views
    steps(ref, oe, 3)
    assert_same(list(zip("abc", freed)), of, list(zip("abc", ref)), oe, rtol=1e-12, atol=1e-14)
    assert_same(list(zip("abc", freed)), of, list(zip("abc", kept)), ok, rtol=0, atol=0)


def test_the_first_fused_step_frees_the_tensors_its_flat_buffers_replace() -> None:
    # at the first step the fused path copies params and grads into flat buffers; the storages they
    # replace must not stay alive through the optimizer (a params' worth of memory each)
    from torch.multiprocessing.reductions import StorageWeakRef

    ps = [nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(32))]
    opt = gc.ChainOptimizer(ps, recipes.adamw(), fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    old = [StorageWeakRef(t.untyped_storage()) for p in ps for t in (p, p.grad)]
    assert not any(r.expired() for r in old)
    opt.step()
    assert all(r.expired() for r in old)
    (fb,) = opt._flats.values()
    assert ps[0].grad.data_ptr() == fb.flat_grads.data_ptr() and ps[0].data_ptr() == fb.flat_params.data_ptr()
