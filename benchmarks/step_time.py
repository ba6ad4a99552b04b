"""Optimizer step time: gradchain's adamw recipe against torch.optim.AdamW, side by side.

Cases: (a) GPT-2 small parameter shapes (124M params), (b) 2000 tensors of 256-16384 elements,
(c) one 32M-element matrix. For each: the median step time (measured round-robin) of torch AdamW (for-loop, foreach,
fused) and of ``ChainOptimizer(params, recipes.adamw())``; the ratio of gradchain to torch foreach
and to fused; and the ratio to the roofline: 28 bytes per fp32 param (read p, g, m, v; write p,
m, v) over the memory bandwidth this script measures (a triad ``a = b + s*c`` on 256 MB).

    python benchmarks/step_time.py [--cases a,b,c] [--repeats 7] [--out benchmarks/step_time.md]

Absolute times on a shared machine are noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import gc as pygc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from gradchain import ChainOptimizer, recipes


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, v, n_ctx, layers = 768, 50257, 1024, 12
    shapes: list[tuple[int, ...]] = [(v, d), (n_ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def many_small_shapes(n: int = 2000) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(int(s),) for s in torch.randint(256, 16385, (n,), generator=g)]


CASES: dict[str, tuple[str, Callable[[], list[tuple[int, ...]]]]] = {
    "a": ("GPT-2 small shapes", gpt2_small_shapes),
    "b": ("2000 tensors of 256-16384", many_small_shapes),
    "c": ("one 32M matrix", lambda: [(4096, 8192)]),
}

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "gradchain adamw": lambda ps: ChainOptimizer(ps, recipes.adamw(lr=1e-3)),
}


def bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
    """Bytes per second of a triad over three fp32 buffers of ``nbytes`` each."""
    n = nbytes // 4
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        times.append(time.perf_counter() - t0)
    return 3 * nbytes / min(times)  # the best run: noise only ever slows a copy down


def time_optimizers(shapes: list[tuple[int, ...]], repeats: int) -> dict[str, float]:
    """Median step time of every optimizer, measured round-robin so machine noise hits all alike."""
    opts = {}
    for name, make in OPTIMIZERS.items():
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opts[name] = make(params)
        opts[name].step()  # allocate state
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    del opts
    pygc.collect()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    bw = bandwidth()
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; measured triad bandwidth {bw / 1e9:.1f} GB/s.",
        "",
        "| case | params | " + " | ".join(OPTIMIZERS) + " | roofline | gradchain / foreach | gradchain / fused | "
        "gradchain / roofline |",
        "|---|---|" + "---|" * (len(OPTIMIZERS) + 4),
    ]
    for key in args.cases.split(","):
        label, make_shapes = CASES[key]
        shapes = make_shapes()
        n = sum(torch.Size(s).numel() for s in shapes)
        ms = {name: 1e3 * t for name, t in time_optimizers(shapes, args.repeats).items()}
        roof = 1e3 * 28 * n / bw
        ours = ms["gradchain adamw"]
        row = " | ".join(f"{ms[k]:.1f} ms" for k in OPTIMIZERS)
        lines.append(
            f"| ({key}) {label} | {n / 1e6:.1f}M | {row} | {roof:.1f} ms | {ours / ms['torch foreach']:.2f}x | "
            f"{ours / ms['torch fused']:.2f}x | {ours / roof:.2f}x |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print()
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
