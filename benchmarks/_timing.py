"""Shared pieces of the benchmarks: parameter shapes, a memory-bandwidth probe, round-robin step timing."""

from __future__ import annotations

import gc as pygc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int, ...]
NamedShapes = list[tuple[str, Shape]]


def gpt2_small_shapes(scale: float = 1.0, layers: int = 12) -> NamedShapes:
    """(name, shape) of GPT-2 small's params (124.4M at scale 1; HF ``Conv1D`` layout (in, out)).

    ``scale`` shrinks d_model, vocab and context for quick runs.
    """
    d = max(8, int(768 * scale) // 8 * 8)
    v, n_ctx = max(16, int(50257 * scale)), max(16, int(1024 * scale))
    shapes: NamedShapes = [("transformer.wte.weight", (v, d)), ("transformer.wpe.weight", (n_ctx, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]


def many_small_shapes(n: int = 2000, lo: int = 256, hi: int = 16384) -> NamedShapes:
    """``n`` vectors of ``lo``-``hi`` elements (a fixed draw), the case where per-tensor overhead shows."""
    g = torch.Generator().manual_seed(0)
    return [(f"p{i}", (int(s),)) for i, s in enumerate(torch.randint(lo, hi + 1, (n,), generator=g))]


def numel(shapes: NamedShapes) -> int:
    return sum(torch.Size(s).numel() for _, s in shapes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth_probes(nbytes: int = 256 * 2**20, repeats: int = 7,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Bytes per second of three memory-bound kernels over fp32 buffers of ``nbytes`` each, on
    ``device`` (the best of ``repeats``: noise only ever slows a copy down):

    - ``triad``: ``a = b + 0.5 c`` (12 bytes an element counted; a CPU also reads ``a``'s lines
      before writing them, so it moves more than it is credited with);
    - ``in place``: ``b += 0.5 c`` (12 bytes), the pattern of an optimizer step, which updates in
      place;
    - ``fused adamw``: a step of torch's hand-written fused AdamW over one param (28 bytes an
      element: p, g, m and v read, p, m and v written): seven streams at once, which a core keeps
      more of its memory bandwidth busy with than three.
    """
    device = torch.device(device)
    n = nbytes // 4

    def best(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        fn(*args, **kwargs)  # first touch and, on a GPU, kernel load
        times = []
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    a = torch.zeros(n, device=device)
    b, c = torch.rand(n, device=device), torch.rand(n, device=device)
    out = {"triad": 3 * nbytes / best(torch.add, b, c, alpha=0.5, out=a),
           "in place": 3 * nbytes / best(b.add_, c, alpha=0.5)}
    del a, b, c
    p = torch.nn.Parameter(torch.rand(n, device=device))
    p.grad = torch.rand(n, device=device) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-6, fused=True)
    out["fused adamw"] = 7 * nbytes / best(opt.step)
    del opt, p
    return out


def bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7, device: torch.device | str = "cpu") -> float:
    """The memory bandwidth a step can reach: the best of :func:`bandwidth_probes`."""
    return max(bandwidth_probes(nbytes, repeats, device).values())


def make_params(shapes: Sequence[tuple[str, Shape]], device: torch.device | str = "cpu", seed: int = 1,
                dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.nn.Parameter]]:
    """Named fp32 params with random values and a fixed random grad each (the same for every seed)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device))
        p.grad = (torch.randn(s, generator=g, dtype=dtype) * 1e-2).to(device)
        out.append((name, p))
    return out


@dataclass
class Timing:
    """Step times of one optimizer in seconds: ``first`` (state allocation, compilation) and the rest."""

    first: float = float("nan")
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:100] if lines else ''}"


def time_round_robin(
    makers: dict[str, Callable[[], Any]],
    repeats: int = 7,
    warmup: int = 0,
    device: torch.device | str = "cpu",
    prepare: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Median step times of several optimizers, stepped round-robin so machine noise hits all alike.

    ``makers[name]()`` builds an object with ``step()`` over params of its own. Each is built and
    stepped once (timed: ``first``), then ``warmup`` untimed steps each (for anything that compiles
    or specializes on its second call), then ``repeats`` rounds in which every optimizer steps once.
    ``prepare(name)``, if given, runs before every step of ``name``, untimed (e.g. to give back grads
    that an optimizer cleared, as a backward pass would). One that fails to build or step is
    reported with its ``error`` and left out of later rounds.
    """
    prep = prepare or (lambda name: None)
    device = torch.device(device)
    opts: dict[str, Any] = {}
    out = {name: Timing() for name in makers}
    for name, make in makers.items():
        try:
            opt = make()
            prep(name)
            synchronize(device)
            t0 = time.perf_counter()
            opt.step()
            synchronize(device)
            out[name].first = time.perf_counter() - t0
            opts[name] = opt
        except Exception as e:  # a peer that cannot run here is reported, not hidden
            out[name].error = _error(e)
    for _ in range(warmup):
        for name in list(opts):
            try:
                prep(name)
                opts[name].step()
            except Exception as e:
                out[name].error = _error(e)
                del opts[name]
    for _ in range(repeats):
        for name in list(opts):
            try:
                prep(name)
                synchronize(device)
                t0 = time.perf_counter()
                opts[name].step()
                synchronize(device)
                out[name].times.append(time.perf_counter() - t0)
            except Exception as e:
                out[name].error, out[name].times = _error(e), []
                del opts[name]
    del opts
    pygc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
