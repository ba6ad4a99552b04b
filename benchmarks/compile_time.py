"""Compile time of ``ChainOptimizer(..., fused=True)``, cold and warm, each in a fresh process.

For every recipe and case, two child processes share one new inductor cache directory:

- **cold**: the cache is empty, as on a machine's first run of a model;
- **warm**: the same process started again (a restarted or resumed job), which finds the kernels
  the cold run wrote, so dynamo traces the step again but inductor loads its code from disk.

Each child first starts the compiler on a trivial function (inductor's one-time start in a process:
imports, the C++ toolchain check), reported apart, then builds the case's params and the optimizer,
times its first step and the median of the next steps. Reported: the first step minus that median
(what a user waits for: compiling, and building the flat buffers and the state), and the part of it
spent compiling by torch's own account (dynamo's ``_compile.compile_inner``: tracing, and inductor
generating or loading the kernels). The optimizer is built as in ``peers.py`` (same
hyperparameters). Writes a markdown table.

    python benchmarks/compile_time.py                                  # every recipe, GPT-2 small's shapes
    python benchmarks/compile_time.py --recipes smmf,adafactor --cases a,b,c
    python benchmarks/compile_time.py --sizes tiny --recipes adamw     # seconds: does it run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _compiling() -> float:
    """Seconds this process has spent in dynamo's compiles so far (inductor's included)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return float(dict(zip(names, values, strict=True)).get("_compile.compile_inner", 0.0))


def child(name: str, case: str, sizes: str, threads: int, steps: int) -> dict[str, float]:
    """One process's measurement (run with ``--child``); returns seconds."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch.compile(lambda x: x * 2.0 + 1.0, fullgraph=True)(torch.ones(8))
    start = time.perf_counter() - t0
    before = _compiling()

    sys.path.insert(0, str(HERE))
    from _timing import make_params
    from peers import CASES, SPECS, build_recipe

    from gradchain import ChainOptimizer

    named = make_params(CASES[sizes][case][1]())
    opt = ChainOptimizer(named, build_recipe(name), fused=True)
    kw = {"loss": torch.tensor(0.5)} if SPECS[name].loss else {}
    times = []
    for _ in range(1 + steps):
        for _, p in named:  # the same grad each step (a cleared one is given back)
            if p.grad is None:
                raise RuntimeError(f"{name}: the fused step cleared a grad")
        t = time.perf_counter()
        opt.step(**kw)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[1:])
    return {"start": start, "compile": times[0] - median, "compiling": _compiling() - before, "step": median}


def run_child(name: str, case: str, args: argparse.Namespace, cache: str) -> dict[str, float] | str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--cases", case, "--sizes", args.sizes,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return f"failed: no result within {args.timeout:.0f} s"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {tail[:200]}"
    return json.loads(lines[-1])


def _cell(x: dict[str, float] | str) -> str:
    return "–" if isinstance(x, str) else f"{x['compile']:.1f} s ({x['compiling']:.1f} s)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=("full", "small", "tiny"), default="full")
    ap.add_argument("--cases", default="a", help="of peers.py's: a (GPT-2 small), b (2000 small), c (one matrix)")
    ap.add_argument("--recipes", default="", help="comma-separated subset (default: every recipe)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    ap.add_argument("--out", default=str(HERE / "compile_time.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.cases, args.sizes, args.threads, args.steps)))
        return

    sys.path.insert(0, str(HERE))
    from peers import CASES, SPECS

    names = [n for n in args.recipes.split(",") if n] or list(SPECS)
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        ap.error(f"unknown recipes {unknown}; choose from {','.join(SPECS)}")
    cases = [c for c in args.cases.split(",") if c]
    if not set(cases) <= set(CASES[args.sizes]):
        ap.error(f"--cases: choose from {','.join(CASES[args.sizes])}")
    import torch

    rows: list[tuple[str, list[tuple[dict | str, dict | str]]]] = []
    began = time.perf_counter()
    for name in names:
        results = []
        for case in cases:
            cache = tempfile.mkdtemp(prefix="gradchain-compile-time-")
            try:
                cold = run_child(name, case, args, cache)
                warm = run_child(name, case, args, cache)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            results.append((cold, warm))
            print(name, case, "cold", _cell(cold), "warm", _cell(warm),
                  "" if not isinstance(cold, str) else cold, flush=True)
        rows.append((name, results))

    starts = [[r["start"] for _, res in rows for r in (pair[k] for pair in res) if not isinstance(r, str)]
              for k in (0, 1)]
    labels = [f"({c}) {CASES[args.sizes][c][0]}" for c in cases]
    start_ranges = "; ".join(f"{k} {min(v):.1f}-{max(v):.1f} s" for k, v in zip(("cold", "warm"), starts) if v)
    out = [
        "# Compile time of the fused path, cold and warm",
        "",
        f"Generated by `python benchmarks/compile_time.py{'' if args.sizes == 'full' else ' --sizes ' + args.sizes}"
        f"{' --cases ' + args.cases if args.cases != 'a' else ''}"
        f"{' --recipes ' + args.recipes if args.recipes else ''}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {args.threads} threads; "
        f"{(time.perf_counter() - began) / 60:.0f} min in all).",
        "",
        "Each cell is `ChainOptimizer(params, recipe, fused=True)`'s first step minus its median step, in a fresh "
        "process: **cold** with an empty inductor cache, **warm** in a second process over the cache the cold one "
        "wrote (a restarted job). In parentheses, the part of it spent compiling by torch's own account (dynamo's "
        "`_compile.compile_inner`: tracing, and inductor generating or loading kernels); the rest is building the "
        "flat buffers and allocating and filling the state. Not included: inductor's one-time start in a process, "
        f"measured apart on a trivial function: {start_ranges}.",
        "",
        "| recipe | " + " | ".join(f"{lab}: cold | warm" for lab in labels) + " |",
        "|---|" + "--:|--:|" * len(cases),
    ]
    for name, results in rows:
        out.append(f"| {name} | " + " | ".join(f"{_cell(c)} | {_cell(w)}" for c, w in results) + " |")
    failed = [(name, case, r) for name, res in rows for case, pair in zip(cases, res) for r in pair
              if isinstance(r, str)]
    if failed:
        out += ["", "Failed: " + "; ".join(f"{n} ({c}): {r}" for n, c, r in failed)]
    Path(args.out).write_text("\n".join(out) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
