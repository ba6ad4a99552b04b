"""Optimizer step time: gradchain's adamw recipe against torch.optim.AdamW, side by side.

Cases: (a) GPT-2 small parameter shapes (124M params), (b) 2000 tensors of 256-16384 elements,
(c) one 32M-element matrix. For each: the median step time (measured round-robin) of torch AdamW (for-loop, foreach,
fused) and of ``ChainOptimizer(params, recipes.adamw())``; the ratio of gradchain to torch foreach
and to fused; and the ratio to the roofline: 28 bytes per fp32 param (read p, g, m, v; write p,
m, v) over the memory bandwidth this script measures (``_timing.bandwidth``: the best of a triad,
an in-place update and torch's fused AdamW over 256 MB buffers).

    python benchmarks/step_time.py [--cases a,b,c] [--repeats 7] [--out benchmarks/step_time.md]

Absolute times on a shared machine are noisy; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import torch
from _timing import bandwidth, gpt2_small_shapes, make_params, many_small_shapes, time_round_robin

from gradchain import ChainOptimizer, recipes

Shapes = list[tuple[int, ...]]

CASES: dict[str, tuple[str, Callable[[], Shapes]]] = {
    "a": ("GPT-2 small shapes", lambda: [s for _, s in gpt2_small_shapes()]),
    "b": ("2000 tensors of 256-16384", lambda: [s for _, s in many_small_shapes()]),
    "c": ("one 32M matrix", lambda: [(4096, 8192)]),
}

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "gradchain adamw": lambda ps: ChainOptimizer(ps, recipes.adamw(lr=1e-3)),
}


def time_optimizers(shapes: Shapes, repeats: int) -> dict[str, float]:
    """Median step time of every optimizer, measured round-robin so machine noise hits all alike."""
    named = [(str(i), s) for i, s in enumerate(shapes)]

    def maker(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> Callable[[], torch.optim.Optimizer]:
        return lambda: make([p for _, p in make_params(named)])

    timings = time_round_robin({name: maker(make) for name, make in OPTIMIZERS.items()}, repeats)
    for name, t in timings.items():
        if t.error:
            raise RuntimeError(f"{name}: {t.error}")
    return {name: t.median for name, t in timings.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    bw = bandwidth()
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; measured bandwidth {bw / 1e9:.1f} GB/s.",
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
