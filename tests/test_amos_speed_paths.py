"""Amos's eager step over a bucket: per-tensor v and b as vectors, no model-sized temporaries.

The eager step (the default ``shape_fn``) runs the same vector form as the fused path: a norm per
tensor (no square of g), v and b advanced as one vector per bucket, and the update ``a g + c theta``
formed into one new buffer per tensor. Checked against the float64 reference of the rule
(``recipe_references.amos``), bit for bit against each tensor stepped alone (the eager step in
pieces groups tensors differently from a whole bucket), and by counting the large buffers a step
makes.
"""

from __future__ import annotations

import recipe_references as refs
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradchain as gc
from gradchain import pieces, recipes

SHAPES = {"w": (40, 30), "b": (17,), "gain": (), "empty": (0,), "conv": (4, 3, 3, 3), "row": (3, 200)}


def _grads(shapes: dict, steps: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for k in range(steps):
        step = {n: torch.randn(s, generator=g, dtype=torch.float64) * (0.5 + k) for n, s in shapes.items()}
        step["b"] = step["b"] * 0 if k == 1 else step["b"]  # a zero gradient: gamma = 0, no step
        out.append({n: x.to(dtype) for n, x in step.items()})
    return out


def _params(shapes: dict, dtype: torch.dtype) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
            for n, s in shapes.items()}


def _step(named: dict, opt: gc.ChainOptimizer, grads: list[dict]) -> None:
    for gs in grads:
        for n, p in named.items():
            p.grad = gs[n].clone()
        opt.step()


def test_eager_bucket_matches_the_float64_reference(monkeypatch) -> None:
    shapes = {n: s for n, s in SHAPES.items() if n != "empty"}  # the reference takes 0/0 for an empty mean
    grads = _grads(shapes, 6, torch.float64)
    init = {n: p.detach().clone() for n, p in _params(shapes, torch.float64).items()}
    want, want_state = refs.amos(init, grads, lr=0.05, beta=0.9)
    for piece in (pieces.PIECE_NUMEL, 256, 0):  # in pieces (grouped, alone) and over the whole bucket
        monkeypatch.setattr(pieces, "PIECE_NUMEL", piece)
        named = _params(shapes, torch.float64)
        opt = gc.ChainOptimizer(list(named.items()), recipes.amos(lr=0.05, beta=0.9))
        _step(named, opt, grads)
        for n, p in named.items():
            torch.testing.assert_close(p.detach() - init[n], want[n] - init[n], rtol=1e-12, atol=1e-15)
            for k in ("amos.v", "amos.b"):
                torch.testing.assert_close(opt.state[p][k], want_state[n][k], rtol=1e-12, atol=0.0)


def test_a_bucket_equals_each_tensor_alone_bit_for_bit() -> None:
    # a tensor's step must not depend on its neighbours: the eager step in pieces groups tensors
    # differently from a whole bucket, and both must leave the same bits
    t = gc.scale_by_amos(0.05, beta=0.9)
    grads = _grads(SHAPES, 3, torch.float32)
    ps = list(_params(SHAPES, torch.float32).values())
    state = t.init(ps)
    together = [t.update(list(gs.values()), state, ps) for gs in grads]
    for j, p in enumerate(ps):
        alone_state = t.init([p])
        for k, gs in enumerate(grads):
            (u,) = t.update([list(gs.values())[j]], alone_state, [p])
            assert torch.equal(u, together[k][j])
        assert all(torch.equal(alone_state[0][k], state[j][k]) for k in ("amos.v", "amos.b"))


class _LargeOutputs(TorchDispatchMode):
    """Counts the new buffers of at least ``numel`` elements that ops make (in-place ops make none)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func._schema.name.endswith("_"):
            for x in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(x, torch.Tensor) and x.numel() >= self.numel:
                    self.made.append(func._schema.name)
        return out


def test_one_model_sized_buffer_per_step() -> None:
    # on a CPU every fresh model-sized buffer costs page faults at every step: the update is the
    # only one (the old step made five: g^2, the two products, their difference and its damping)
    shape = (1024, 768)
    named = _params({"w": shape, "v": (9,)}, torch.float32)
    opt = gc.ChainOptimizer(list(named.items()), recipes.amos())
    for p in named.values():
        p.grad = torch.randn_like(p)
    opt.step()  # state made
    with _LargeOutputs(torch.Size(shape).numel()) as seen:
        opt.step()
    assert len(seen.made) <= 1, seen.made


def test_fused_equals_eager_on_a_chunked_bucket() -> None:
    # more than 32 tensors: the fused bucket is laid out in rows, v and b are one vector; an empty
    # tensor, a 0-d one and a zero gradient among them
    shapes = {f"p{i}": (i % 7 + 1, 3 * i + 1) for i in range(36)} | {"gain": (), "empty": (0,)}
    grads = _grads(shapes | {"b": (5,)}, 4, torch.float32)
    runs = []
    for fused in (False, True):
        named = _params(shapes | {"b": (5,)}, torch.float32)
        opt = gc.ChainOptimizer(list(named.items()), recipes.amos(lr=0.05, beta=0.9), fused=fused)
        _step(named, opt, grads)
        runs.append((named, opt))
    (ea, eo), (fa, fo) = runs
    assert fo.fused_plan() == [("compiled", ["amos"])]
    for n in ea:
        torch.testing.assert_close(fa[n].detach(), ea[n].detach(), rtol=1e-5, atol=1e-6)
        for k in ("amos.v", "amos.b"):
            torch.testing.assert_close(fo.state[fa[n]][k], eo.state[ea[n]][k], rtol=1e-5, atol=1e-7)


def test_compiled_user_step_equals_eager() -> None:
    # torch.compile of a step that calls opt.step() traces the same vector form with tensor scalars
    grads = _grads(SHAPES, 4, torch.float64)
    runs = []
    for compiled in (False, True):
        named = _params(SHAPES, torch.float64)
        opt = gc.ChainOptimizer(list(named.items()), recipes.amos(lr=0.05, beta=0.9))
        _step(named, opt, grads[:1])  # state exists before tracing, as torch's own optimizers need
        step = torch.compile(opt.step, fullgraph=True, backend="eager") if compiled else opt.step
        for gs in grads[1:]:
            for n, p in named.items():
                p.grad = gs[n].clone()
            step()
        runs.append((named, opt))
    (ea, eo), (ca, co) = runs
    for n in ea:
        torch.testing.assert_close(ca[n].detach(), ea[n].detach(), rtol=1e-12, atol=1e-14)
        for k in ("amos.v", "amos.b"):
            torch.testing.assert_close(co.state[ca[n]][k], eo.state[ea[n]][k], rtol=1e-12, atol=1e-14)
