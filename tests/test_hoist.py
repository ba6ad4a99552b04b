"""Scalar hoisting (``gradchain.fused.hoist``): 0-d math leaves the per-element kernel, results do not change.

The pass may move a 0-d computation only when nothing in the graph writes what it reads; the
checks below trace small functions with a backend that records the rewritten graph, and compare
the compiled result with the same function run eagerly.
"""

from __future__ import annotations

import torch
from torch._inductor.utils import run_and_get_code

import gradchain as gc
from gradchain import recipes
from gradchain.fused import hoist, runner
from gradchain.fused.hoist import hoist_scalars


def compile_recording(fn, graph_pass=hoist_scalars):
    """``fn`` compiled with a pass then aot_eager; the list receives the pass's count per graph."""
    from torch._dynamo.backends.registry import lookup_backend

    counts: list[int] = []

    def backend(gm, example_inputs):
        counts.append(graph_pass(gm))
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False), counts


def bias_corrected(x, m, lr, b1, step):
    m.lerp_(x, 1 - b1)
    return x - m * (lr / (1 - b1**step))


def test_scalar_math_is_hoisted_and_equal() -> None:
    fn, counts = compile_recording(bias_corrected)
    x, m = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    m2 = m.clone()
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (0.1, 0.9, 3.0)]
    out = fn(x, m, *scalars)
    expected = bias_corrected(x, m2, *scalars)
    # 1 - b1 for the lerp weight, lr / (1 - b1^t) for the product (dynamo may trace a frame twice)
    assert counts and all(c == 2 for c in counts)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(m, m2, rtol=0, atol=0)


def written_then_read(x, s):
    s.add_(1.0)
    return x * (s * 2.0)


def read_then_written(x, s):
    y = x * (s**2)
    s.mul_(3.0)
    return y + s


def test_written_scalars_stay_in_place() -> None:
    for f in (written_then_read, read_then_written):
        fn, counts = compile_recording(f)
        x = torch.randn(7)
        s1, s2 = torch.tensor(1.5), torch.tensor(1.5)
        out = fn(x, s1)
        expected = f(x, s2)
        # hoisting s * 2 or s ** 2 would read s before (or after) its write
        assert counts and not any(counts), f.__name__
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert s1.item() == s2.item()


def scaled_then_written(x, b, t):
    out = x * (1 - b**t)
    out.add_(1.0)  # a write to a fresh intermediate: the scalars it was made from stay movable
    return out


def test_writes_to_fresh_values_do_not_block_hoisting() -> None:
    fn, counts = compile_recording(scaled_then_written)
    x = torch.randn(9, dtype=torch.float64)
    b, t = torch.tensor(0.9, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    torch.testing.assert_close(fn(x, b, t), scaled_then_written(x, b, t), rtol=0, atol=0)
    assert counts and all(c == 1 for c in counts)


def per_segment_scale(x, v, w):
    norms = torch.stack([part.norm() for part in x.split([3000, 2 * hoist.SMALL])])
    ratio = w / norms  # a fresh per-tensor vector: realized once
    y = x * torch.cat([ratio[0].expand(3000), ratio[1].expand(2 * hoist.SMALL)])
    v.mul_(2.0)
    return y + v[:1]  # a view of a written input: left alone


def test_small_fresh_vectors_are_realized_once_and_views_are_not() -> None:
    fn, counts = compile_recording(per_segment_scale, hoist.realize_small_values)
    n = 3000 + 2 * hoist.SMALL
    x, v = torch.randn(n, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    v2, w = v.clone(), torch.tensor([0.5, 2.0], dtype=torch.float64)
    out = fn(x, v, w)
    torch.testing.assert_close(out, per_segment_scale(x, v2, w), rtol=0, atol=0)
    torch.testing.assert_close(v, v2, rtol=0, atol=0)
    # the ratio only: norms feed nothing large but it, and v[:1] is a view of a written input
    assert counts and all(c == 1 for c in counts)


def test_adamw_kernel_does_not_evaluate_step_scalars_per_element(monkeypatch) -> None:
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(64, 32))
    p.grad = torch.randn(64, 32)
    opt = gc.ChainOptimizer([p], recipes.adamw(), fused=True)
    _, codes = run_and_get_code(opt.step)
    code = "\n".join(codes)
    assert "gradchain.hoist" in code
    # the per-element kernel is the one that loops over the 2048 elements of the flat buffer
    kernels = [k.split("''')")[0] for k in code.split("async_compile.cpp_pybinding")[1:]]
    kernels = [k for k in kernels if "2048L" in k]
    assert kernels and not any("pow" in k for k in kernels)
