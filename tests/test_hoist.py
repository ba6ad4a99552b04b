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
from gradchain.fused import runner
from gradchain.fused.hoist import hoist_scalars


def compile_recording(fn):
    """``fn`` compiled with hoisting then aot_eager; the list receives the hoisted count per graph."""
    from torch._dynamo.backends.registry import lookup_backend

    counts: list[int] = []

    def backend(gm, example_inputs):
        counts.append(hoist_scalars(gm))
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
