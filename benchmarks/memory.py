"""Optimizer-state memory of every recipe in ``gradchain.recipes``, as bytes of state / bytes of params.

GPT-2 small parameter shapes (124M params, tied head; torch ``Linear`` layout (out, in)), fp32.
Each recipe is built with its defaults (a wrapper such as ``lookahead(inner)`` gets ``adamw()``),
its state is allocated up front by ``ChainOptimizer.init_state()`` (transforms allocate all their
state in ``init``), and every state tensor is counted once (shared storage counted once; the
per-param ``step`` counters included). ``--step`` also takes one real step on random gradients
and reports any recipe whose state grew. ``--fused`` also reports what ``ChainOptimizer(fused=True)``
keeps beyond params, grads and state after two steps: the flat buffers that pass updates between
segments of a chain cut into several (a CPU keeps them from step to step; a GPU frees them after
each step) and the gaps between params in a bucket of many (each param starts a row of 256 elements
there). The steps run uncompiled (``torch.compiler.set_stance("force_eager")``): the buffers are the
same, and nothing compiles. ``--peak`` also reports the most a step holds at once beyond params,
grads and state, eagerly and fused (compiled): the allocations and frees the torch profiler records
during the third step (CPU memory), summed in order.

    python benchmarks/memory.py                 # full GPT-2 small shapes, writes benchmarks/memory.md
    python benchmarks/memory.py --scale 0.25    # d_model, vocab and context scaled by 0.25 (quick)
    python benchmarks/memory.py --fused         # and what the fused path keeps besides
    python benchmarks/memory.py --peak          # and each step's peak, eager and fused
"""

from __future__ import annotations

import argparse
import inspect
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradchain import ChainOptimizer, Transform, pieces, recipes  # noqa: E402

# what the issues ask for (multiples of the param bytes)
TARGETS = {
    "adafactor": ("<=", 0.01), "sm3": ("<=", 0.01), "smmf": ("<=", 0.05),
    "adalo": ("==", 1.0), "nsgda": ("==", 1.0),
    "adam": ("==", 2.0), "adamw": ("==", 2.0), "nadam": ("==", 2.0), "adam_atan2": ("==", 2.0),
    "sadam": ("==", 2.0), "adamomentum": ("==", 2.0),
}
# how to fill a recipe's required arguments
DEFAULT_ARGS = {"inner": lambda: recipes.adamw()}


def gpt2_shapes(scale: float = 1.0, layers: int = 12) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of GPT-2 small's params; ``scale`` shrinks d_model, vocab and context."""
    d = max(8, int(768 * scale) // 8 * 8)
    vocab, ctx = max(16, int(50257 * scale)), max(16, int(1024 * scale))
    out = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        out += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (3 * d, d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (4 * d, d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (d, 4 * d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    return out + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def build(name: str) -> Transform | None:
    """The recipe with its defaults, or None when it is not an optimizer (a helper predicate)."""
    fn = getattr(recipes, name)
    kwargs = {}
    for p in inspect.signature(fn).parameters.values():
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if p.name not in DEFAULT_ARGS:
                return None
            kwargs[p.name] = DEFAULT_ARGS[p.name]()
    t = fn(**kwargs)
    return t if isinstance(t, Transform) else None


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                key = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


def fused_extra_bytes(opt: ChainOptimizer) -> int:
    """Bytes a fused optimizer keeps beyond params, grads and state: its buckets' workspaces and the
    gaps between params in their flat buffers (params, grads and per-element state alike)."""
    total = 0
    for fb in opt._flats.values():
        total += sum(ws.untyped_storage().nbytes() for spaces in fb._workspaces.values() for ws in spaces)
        gap = fb.total - sum(fb.numels)
        flats = [fb.flat_params, fb.flat_grads, *(b for b in fb.flat_state.values() if b.numel() == fb.total)]
        total += gap * sum(b.element_size() for b in flats)
    return total


def measure_fused(names: list[str], shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, float]:
    """``fused_extra_bytes`` over the param bytes, per recipe, after two uncompiled fused steps."""
    out = {}
    with torch.compiler.set_stance("force_eager"):
        for name in names:
            transform = build(name)
            if transform is None:
                continue
            params = [(n, torch.nn.Parameter(torch.randn(s) * 0.02)) for n, s in shapes]  # named: Muon routes by name
            param_bytes = sum(p.numel() * p.element_size() for _, p in params)
            opt = ChainOptimizer(params, transform, fused=True)
            for _ in range(2):
                for _, p in params:
                    p.grad = torch.randn_like(p) * 1e-3
                opt.step(loss=torch.tensor(2.0))
            out[name] = fused_extra_bytes(opt) / param_bytes
            print(f"{name:24s} fused keeps {out[name]:8.4f} x params besides", flush=True)
            del opt, params
    return out


def step_peak(name: str, shapes: list[tuple[str, tuple[int, ...]]], fused: bool) -> float | None:
    """The most bytes the third step of ``name`` holds at once beyond what it started with, over the
    param bytes (None: not an optimizer): the profiler's allocation (+) and free (-) events in order."""
    transform = build(name)
    if transform is None:
        return None
    params = [(n, torch.nn.Parameter(torch.randn(s) * 0.02)) for n, s in shapes]  # named: Muon routes by name
    opt = ChainOptimizer(params, transform, fused=fused)
    for _ in range(2):  # state made and kernels compiled before the step measured
        for _, p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step(loss=torch.tensor(2.0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step(loss=torch.tensor(2.0))
    return held_peak(prof) / sum(p.numel() * p.element_size() for _, p in params)


def held_peak(prof: torch.profiler.profile, start: int | None = None) -> int:
    """The most bytes held at once, from the profiler's allocation (+) and free (-) events summed
    in order; with ``start``, counted from the free of that many bytes on (a marker's)."""
    held = highest = 0
    started = start is None
    for event in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
        held += event.nbytes()
        started = started or event.nbytes() == -start
        if started:
            highest = max(highest, held)
    return highest


def first_step_peak(name: str, shapes: list[tuple[str, tuple[int, ...]]], fused: bool, resumed: bool,
                    atomic: str = "first") -> float | None:
    """The most bytes held at once during the first step of ``name`` (the fused path compiled as in
    a run), counting params, grads and state, over the param bytes (None: not an optimizer).
    ``resumed``: the state is loaded from a checkpoint first (one eager step of another optimizer)."""
    if build(name) is None:
        return None
    return profile_first_step(lambda ps: ChainOptimizer(ps, build(name), fused=fused, atomic=atomic),
                              lambda ps: ChainOptimizer(ps, build(name)), shapes, resumed)


def torch_first_step_peak(shapes: list[tuple[str, tuple[int, ...]]], resumed: bool) -> float:
    """:func:`first_step_peak` of ``torch.optim.AdamW(fused=True)``, the reference."""
    def make(ps: list) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in ps], fused=True)

    return profile_first_step(make, make, shapes, resumed)


_MARKER = 3_000_017  # fp32 elements: a size no param or state buffer has


def profile_first_step(make: Callable[[list], torch.optim.Optimizer],
                       make_saved: Callable[[list], torch.optim.Optimizer],
                       shapes: list[tuple[str, tuple[int, ...]]], resumed: bool) -> float:
    """Everything is allocated while the profiler records, so that the frees of params and grads the
    fused path copies into its flat buffers count too; the peak is read from the step on."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        params = [(n, torch.nn.Parameter(torch.randn(s) * 0.02)) for n, s in shapes]  # named: Muon routes by name
        for _, p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(params)
        if resumed:
            saved = make_saved(params)
            saved.step(lambda: torch.tensor(2.0))
            opt.load_state_dict(saved.state_dict())
            del saved
        marker = torch.empty(_MARKER)  # its free marks the start of the step measured
        del marker
        opt.step(lambda: torch.tensor(2.0))
    return held_peak(prof, start=_MARKER * 4) / sum(p.numel() * p.element_size() for _, p in params)


def measure_first_steps(names: list[str], shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple]:
    """Per recipe: first-step peaks (:func:`first_step_peak`) fresh and resumed, eager and fused, and
    resumed fused with ``atomic="never"``. The eager path's one-time 16 MB allocator block is made
    first, so that it does not count toward the first recipe measured."""
    pieces._prime_allocator()
    out = {}
    for name in names:
        cells = (first_step_peak(name, shapes, False, False), first_step_peak(name, shapes, True, False),
                 first_step_peak(name, shapes, False, True), first_step_peak(name, shapes, True, True),
                 first_step_peak(name, shapes, True, True, atomic="never"))
        if None not in cells:
            out[name] = cells
            print(f"{name:24s} first-step peak " + " ".join(f"{c:6.2f}" for c in cells) + " x params", flush=True)
    return out


def first_step_table(first: dict[str, tuple], reference: tuple[float, float]) -> str:
    lines = [
        "## The first step",
        "",
        "The most memory the first step holds at once, params, grads and state included, over the param "
        "bytes (AdamW holds 4.00 between steps: params, grads and two moments), from a fresh start and "
        "resumed from a checkpoint (state loaded first), each path as a run takes it (the fused path "
        "compiles and makes its flat buffers then). A first step runs under a snapshot of the params "
        "and of the state it did not create (`atomic=\"first\"`), so that a step that raises leaves "
        "nothing half-updated: after a resume that is a copy of the loaded state; `atomic=\"never\"` "
        f"takes none. torch.optim.AdamW(fused=True), the reference: {reference[0]:.2f} fresh, "
        f"{reference[1]:.2f} resumed.",
        "",
        "| recipe | fresh, eager | fresh, fused | resumed, eager | resumed, fused | resumed, fused, atomic=\"never\" |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, cells in first.items():
        lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def measure_peaks(names: list[str], shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[float, float]]:
    """``(eager, fused)`` step peaks per recipe (:func:`step_peak`)."""
    out = {}
    for name in names:
        eager, fused = step_peak(name, shapes, False), step_peak(name, shapes, True)
        if eager is not None and fused is not None:
            out[name] = (eager, fused)
            print(f"{name:24s} step peak {eager:8.4f} eager, {fused:8.4f} fused x params", flush=True)
    return out


def measure(names: list[str], params: list[tuple[str, torch.nn.Parameter]], step: bool = False) -> list[dict]:
    param_bytes = sum(p.numel() * p.element_size() for _, p in params)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = {"recipe": name}
        try:
            transform = build(name)
            if transform is None:
                continue
            opt = ChainOptimizer(params, transform)
            opt.init_state()
            row["state_bytes"] = state_bytes(opt)
            if step:
                opt.step(loss=torch.tensor(2.0))
                grown = state_bytes(opt) - row["state_bytes"]
                if grown:
                    row["error"] = f"state grew by {grown} bytes in the first step"
            row["ratio"] = row["state_bytes"] / param_bytes
            del opt
        except Exception as e:  # a recipe that cannot run here is reported, not hidden
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name:24s} {row.get('ratio', float('nan')):8.4f}  {row.get('error', '')}", flush=True)
    return rows


def verdict(name: str, ratio: float | None) -> str:
    if name not in TARGETS:
        return ""
    op, x = TARGETS[name]
    text = f"{'≤ ' if op == '<=' else ''}{x:g}"
    if ratio is None:
        return text
    ok = ratio <= x if op == "<=" else abs(ratio - x) < 0.005
    return f"{text} {'✓' if ok else '✗'}"


def table(rows: list[dict], param_count: int, scale: float, step: bool, fused: dict[str, float] | None = None,
          peaks: dict[str, tuple[float, float]] | None = None) -> str:
    extra = fused is not None
    lines = [
        f"Optimizer state / param bytes, GPT-2 small shapes (scale {scale:g}: {param_count / 1e6:.1f}M fp32 "
        f"params), state allocated by init_state(){', checked after one step' if step else ''}"
        f"{'; fused: what fused=True keeps besides after two steps, on a CPU' if extra else ''}"
        f"{'; step peak: the most a step holds at once besides params, grads and state' if peaks else ''}; "
        f"torch {torch.__version__}, {platform.machine()}.",
        "",
        "| recipe | state (MB) | state / params | target |" + (" fused keeps besides / params |" if extra else "")
        + (" step peak / params (eager) | step peak / params (fused) |" if peaks else ""),
        "|---|---:|---:|---|" + ("---:|" if extra else "") + ("---:|---:|" if peaks else ""),
    ]
    for r in rows:
        more = ""
        if extra:
            more = f" {fused[r['recipe']]:.4f} |" if r["recipe"] in fused else " – |"
        if peaks:
            more += " {:.4f} | {:.4f} |".format(*peaks[r["recipe"]]) if r["recipe"] in peaks else " – | – |"
        if "state_bytes" not in r:
            lines.append(f"| {r['recipe']} | – | – | {verdict(r['recipe'], None)} (not run: {r['error']}) |" + more)
        else:
            note = f" ({r['error']})" if "error" in r else ""
            lines.append(f"| {r['recipe']} | {r['state_bytes'] / 2**20:.1f} | {r['ratio']:.4f} | "
                         f"{verdict(r['recipe'], r['ratio'])}{note} |" + more)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="shrink d_model, vocab and context (1.0 = GPT-2 small)")
    ap.add_argument("--recipes", default="", help="comma-separated subset (default: all of recipes.__all__)")
    ap.add_argument("--step", action="store_true", help="also take one step and check the state did not grow")
    ap.add_argument("--fused", action="store_true", help="also report what fused=True keeps besides params and state")
    ap.add_argument("--peak", action="store_true", help="also report each step's peak besides params, grads and state")
    ap.add_argument("--first", action="store_true",
                    help="also report the first step's peak, fresh and resumed, eager and fused")
    ap.add_argument("--out", default=str(Path(__file__).with_name("memory.md")))
    args = ap.parse_args()
    torch.manual_seed(0)
    params = []
    for name, shape in gpt2_shapes(args.scale):
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape) * 1e-3
        params.append((name, p))
    count = sum(p.numel() for _, p in params)
    names = [n for n in args.recipes.split(",") if n] or list(recipes.__all__)
    rows = measure(names, params, args.step)
    del params
    fused = measure_fused(names, gpt2_shapes(args.scale)) if args.fused else None
    peaks = measure_peaks(names, gpt2_shapes(args.scale)) if args.peak else None
    md = table(rows, count, args.scale, args.step, fused, peaks)
    if args.first:
        shapes = gpt2_shapes(args.scale)
        reference = (torch_first_step_peak(shapes, False), torch_first_step_peak(shapes, True))
        md += "\n" + first_step_table(measure_first_steps(names, shapes), reference)
    print()
    print(md)
    flags = "".join(f" --{k}" for k in ("step", "fused", "peak", "first") if getattr(args, k))
    head = f"# Optimizer-state memory\n\nGenerated by `python benchmarks/memory.py{flags}`.\n\n"
    Path(args.out).write_text(head + md)


if __name__ == "__main__":
    main()
