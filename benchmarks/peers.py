"""Step time of every gradchain recipe that has a peer, eager and fused, against its fastest peer.

For each recipe with a peer in torch.optim (``fused=True`` and ``foreach``), heavyball,
pytorch_optimizer, adam-atan2-pytorch (pinned in the ``bench`` extra), schedulefree or prodigyopt
(the official packages, pinned in the ``test`` extra), and for each case
((a) GPT-2 small shapes, (b) 2000 tensors of 256-16384 elements, (c) one 32M-element matrix),
every optimizer gets params of its own (same values, same fixed grads) and all are stepped
round-robin in one process, fp32; the table gives medians. Before each step, untimed, a grad the
optimizer cleared is given back (heavyball drops grads, as a backward pass would replace them), and
an optimizer whose last step moved no param is reported as an error instead of timed. Columns:

- gradchain eager: ``ChainOptimizer(params, recipe)``; gradchain fused: the same with
  ``fused=True`` ("n/a" when this gradchain has no fused path); compile: the fused path's first
  step minus its median step (compilation plus state allocation). Compile caches start empty in
  a full-size run (a fresh ``TORCHINDUCTOR_CACHE_DIR``) unless ``--warm-cache``, and dynamo is
  reset before each recipe and case, so every compile time is a cold one. Quick runs (``--sizes
  small``/``tiny``) keep inductor's cache, so a rerun compiles little.
- best peer: the fastest peer in the same round-robin, and the ratios eager / peer and fused / peer.
- roofline: the bytes a step must move over the memory bandwidth measured in the same run: that
  of torch's fused AdamW over one param of the case's size, stepped in each recipe's round-robin
  as a reference (the host's bandwidth moves during a run; three probes before and after the
  cases, a triad, an in-place update and the same AdamW step, are reported too). Bytes per step:
  read p and g, write p (12 bytes per fp32 param), plus every state buffer of the eager gradchain
  optimizer read and written once (its per-tensor 0-d step counters left out; state a step only
  reads, such as the older slots of the fractional gradient's ring, counted once:
  ``Spec.read_only``). A recipe whose
  state moves less often than every step (lookahead's slow weights) or whose step is
  compute-bound (muon's Newton-Schulz matmuls) can sit well above this floor.
- floor: the roofline plus the bytes a step must read again because a reduction over a tensor
  (LAMB's trust ratio, the cautious mask's mean, Adafactor's statistics, a per-tensor norm) or
  over every tensor (AdamS, Prodigy) finishes before any of its elements can be written, counted
  for tensors of over ``LARGE`` elements, which do not stay in a core's cache between the passes
  (``Spec.reread`` bytes per element). Equal to the roofline for a one-pass rule.

    python benchmarks/peers.py                       # full sizes; writes benchmarks/peers.md and .png
    python benchmarks/peers.py --sizes small         # smaller shapes (prints; --out to write)
    python benchmarks/peers.py --recipes adamw,lamb --cases a --libs torch,pytorch_optimizer
    python benchmarks/peers.py --device cuda         # GPU run (torch.cuda.synchronize around each step)

Absolute times on a shared machine are noisy; compare ratios within one run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile


def _full_sizes(argv: list[str]) -> bool:
    for i, a in enumerate(argv):
        if a.startswith("--sizes="):
            return a == "--sizes=full"
        if a == "--sizes" and i + 1 < len(argv):
            return argv[i + 1] == "full"
    return True


# cold compiles for the full run: inductor must not find kernels from an earlier run (set before
# torch loads); quick runs keep the cache, so a rerun does not compile everything again
if (__name__ == "__main__" and _full_sizes(sys.argv[1:]) and "--warm-cache" not in sys.argv
        and "TORCHINDUCTOR_CACHE_DIR" not in os.environ):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradchain-peers-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from _timing import (  # noqa: E402
    NamedShapes,
    Timing,
    bandwidth_probes,
    gpt2_small_shapes,
    make_params,
    many_small_shapes,
    numel,
    time_round_robin,
)

from gradchain import ChainOptimizer, recipes  # noqa: E402

Named = list[tuple[str, torch.nn.Parameter]]
LIBS = ("torch", "heavyball", "pytorch_optimizer", "adam_atan2_pytorch", "schedulefree", "prodigyopt")

# (label, shapes) per case and size; "small" and "tiny" keep the three kinds at a fraction of the size
CASES: dict[str, dict[str, tuple[str, Callable[[], NamedShapes]]]] = {
    "full": {
        "a": ("GPT-2 small shapes", lambda: gpt2_small_shapes()),
        "b": ("2000 tensors of 256-16384", lambda: many_small_shapes(2000)),
        "c": ("one 32M matrix", lambda: [("w", (4096, 8192))]),
    },
    "small": {
        "a": ("GPT-2 shapes, d_model 192", lambda: gpt2_small_shapes(0.25)),
        "b": ("500 tensors of 256-16384", lambda: many_small_shapes(500)),
        "c": ("one 4M matrix", lambda: [("w", (2048, 2048))]),
    },
    "tiny": {
        "a": ("GPT-2 shapes, d_model 32, 2 layers", lambda: gpt2_small_shapes(1 / 24, layers=2)),
        "b": ("20 tensors of 16-256", lambda: many_small_shapes(20, 16, 256)),
        "c": ("one 64x128 matrix", lambda: [("w", (64, 128))]),
    },
}
BANDWIDTH_BYTES = {"full": 256 * 2**20, "small": 256 * 2**20, "tiny": 16 * 2**20}


# -- peers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    label: str
    lib: str
    make: Callable[[Named], Any]


@dataclass(frozen=True)
class Spec:
    """A recipe's arguments for the benchmark and its peers, set to do the same work."""

    peers: list[Peer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    build: Callable[[], Any] | None = None  # instead of ``recipes.<name>(**kwargs)``
    # bytes per element of a large tensor that every implementation reads again: a reduction over
    # the tensor (or over all tensors) finishes before any of its elements can be written
    reread: int = 0
    # bytes per element of state that a step reads but never writes (a ring's older slots): the
    # roofline counts them once, not as a read and a write
    read_only: int = 0
    # the recipe takes the loss at every step (AdaLo): each step gets the same loss value
    loss: bool = False


def _plain(named: Named) -> list[torch.nn.Parameter]:
    return [p for _, p in named]


def _torch(cls: str, impl: str, **kw: Any) -> Peer:
    flag = {"fused": {"fused": True}, "foreach": {"foreach": True}}[impl]
    label = f"torch {cls} {impl}"
    return Peer(label, "torch", lambda named: getattr(torch.optim, cls)(_plain(named), **kw, **flag))


def _lib(lib: str, cls: str, label: str | None = None, *, train: bool = False, **kw: Any) -> Peer:
    def make(named: Named) -> Any:
        opt = getattr(importlib.import_module(lib), cls)(_plain(named), **kw)
        if train:  # schedule-free optimizers step only in train mode
            opt.train()
        return opt

    short = {"adam_atan2_pytorch": "adam-atan2-pytorch"}.get(lib, lib)
    return Peer(f"{short} {label or cls}", lib, make)


class _Both:
    """Two optimizers stepped as one (torch's Muon takes only matrices; the rest goes to AdamW)."""

    def __init__(self, *opts: Any) -> None:
        self.opts = [o for o in opts if o is not None]

    def step(self) -> None:
        for o in self.opts:
            o.step()


def _split_muon(named: Named) -> tuple[list, list]:
    mats = [p for n, p in named if recipes.muon_hidden_matrix(n, p)]
    rest = [p for n, p in named if not recipes.muon_hidden_matrix(n, p)]
    return mats, rest


def _torch_muon(impl: str) -> Peer:
    def make(named: Named) -> _Both:
        mats, rest = _split_muon(named)
        muon = torch.optim.Muon(mats, lr=1e-3, weight_decay=0.1) if mats else None
        flag = {"fused": True} if impl == "fused" else {"foreach": True}
        adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1, **flag) if rest else None
        return _Both(muon, adamw)

    return Peer(f"torch Muon + AdamW {impl}", "torch", make)


def _po_muon(named: Named) -> Any:
    import pytorch_optimizer

    mats, rest = _split_muon(named)
    groups = [g for g in ({"params": mats, "use_muon": True}, {"params": rest, "use_muon": False}) if g["params"]]
    return pytorch_optimizer.Muon(groups, lr=1e-3, weight_decay=0.1, adamw_lr=1e-3, adamw_wd=0.1,
                                  adamw_betas=(0.9, 0.999), adamw_eps=1e-8)


def _po_lookahead(impl: str) -> Peer:
    def make(named: Named) -> Any:
        import pytorch_optimizer

        flag = {"fused": True} if impl == "fused" else {"foreach": True}
        return pytorch_optimizer.Lookahead(torch.optim.AdamW(_plain(named), lr=1e-3, **flag), k=5, alpha=0.5)

    return Peer(f"pytorch_optimizer Lookahead(torch AdamW {impl})", "pytorch_optimizer", make)


ADAMW = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}

# recipe -> its peers, with hyperparameters matched to the recipe's defaults (or to ``kwargs``)
SPECS: dict[str, Spec] = {
    "adam": Spec([_torch("Adam", "fused"), _torch("Adam", "foreach"),
                  _lib("heavyball", "AdamW", "AdamW (wd 0)", **{**ADAMW, "weight_decay": 0.0})]),
    "adamw": Spec([_torch("AdamW", "fused"), _torch("AdamW", "foreach"), _lib("heavyball", "AdamW", **ADAMW)]),
    "sgd": Spec([_torch("SGD", "fused", lr=1e-3, momentum=0.9), _torch("SGD", "foreach", lr=1e-3, momentum=0.9),
                 _lib("heavyball", "SGD", lr=1e-3, beta=0.9)], kwargs={"momentum": 0.9}),
    "nadam": Spec([_torch("NAdam", "foreach"), _lib("heavyball", "NAdam", lr=2e-3, betas=(0.9, 0.999))]),
    # a factored matrix: g for the row and column sums, g and p again for the update's RMS and
    # the param's RMS, then g and p for the write
    "adafactor": Spec([_torch("Adafactor", "foreach"),
                       _lib("pytorch_optimizer", "AdaFactor", lr=1e-2, betas=(None, 0.999))], reread=12),
    "adam_atan2": Spec([_lib("adam_atan2_pytorch", "AdamAtan2")]),
    # the trust ratio's norms of p and u, then m, v and p read again for the write
    "lamb": Spec([_lib("pytorch_optimizer", "Lamb", lr=1e-3, weight_decay=1e-2, eps=1e-6)], reread=12),
    "sm3": Spec([_lib("pytorch_optimizer", "SM3")]),
    "diffgrad": Spec([_lib("pytorch_optimizer", "DiffGrad")]),
    "adanorm": Spec([_lib("pytorch_optimizer", "AdaNorm", betas=(0.9, 0.999))], reread=4),  # |g| per tensor first
    "adams": Spec([_lib("pytorch_optimizer", "AdamS")], reread=8),  # the mean of v^ over all, then m and v again
    "amos": Spec([_lib("pytorch_optimizer", "Amos")], reread=4),  # the mean of g^2 per tensor first
    "muon": Spec([_torch_muon("fused"), _torch_muon("foreach"),
                  Peer("pytorch_optimizer Muon", "pytorch_optimizer", _po_muon)]),
    # the mask's mean per tensor, then g, m and v read again for the write
    "cautious_adamw": Spec([_lib("heavyball", "AdamW", "AdamW(caution=True)", caution=True, **ADAMW)], reread=12),
    "cwd_adamw": Spec([_lib("heavyball", "AdamW", "AdamW(cautious_weight_decay=True)",
                            cautious_weight_decay=True, **ADAMW)]),
    # the estimate of d sums over every tensor, then g and p read again for the write
    "prodigy": Spec([_lib("prodigyopt", "Prodigy"), _lib("pytorch_optimizer", "Prodigy")], reread=8),
    "schedule_free_adamw": Spec([_lib("schedulefree", "AdamWScheduleFree", train=True),
                                 _lib("pytorch_optimizer", "ScheduleFreeAdamW", train=True),
                                 _lib("heavyball", "SFAdamW", betas=(0.9, 0.999), eps=1e-8)]),
    "schedule_free_sgd": Spec([_lib("schedulefree", "SGDScheduleFree", train=True),
                               _lib("pytorch_optimizer", "ScheduleFreeSGD", train=True)]),
    "lookahead": Spec([_po_lookahead("fused"), _po_lookahead("foreach")],
                      build=lambda: recipes.lookahead(recipes.adamw(), k=5, alpha=0.5)),
}

# recipes with no peer in these libraries, measured against their own roofline only (``--recipes``
# names them, ``--peerless`` adds them all)
PEERLESS: dict[str, Spec] = {
    "adalo": Spec([], loss=True),
    "adamomentum": Spec([]),
    "sadam": Spec([]),
    "smmf": Spec([]),
    "agc_sgd": Spec([], kwargs={"momentum": 0.9}, reread=8),  # the unit norms of p and g first
    "gc_adamw": Spec([], reread=4),  # the row means of g first
    "nsgda": Spec([], reread=8),  # the norm of the new momentum first (g and m)
    "softclip_adamw": Spec([], reread=8),  # the unit RMS of p and g first
    "cpr_adamw": Spec([], reread=16),  # the norm of p + u per matrix first (p, g, m and v)
    # the ring's 9 older slots (of 10) are only read: the newest gradient overwrites the oldest
    "fractional_adam": Spec([], read_only=36),
    "fractional_sgd": Spec([], kwargs={"momentum": 0.9}, read_only=36),
    # two rounds of power iteration and the norm, over W and over the step u, per matrix: five
    # matrix-vector products each, the first of each riding on the pass that forms u. Left: four
    # more reads of W, u written once and read four more times, then again by the write
    "adamw_spectral": Spec([], reread=40),
    "am_adamw": Spec([], reread=12),  # the per-tensor sums over g, v and d first
    "am_sgd": Spec([], reread=8),  # the global inner products of g and d first
}
SPECS.update(PEERLESS)


# not a peer: torch's fused AdamW over one param of the case's size, stepped in every round-robin; the
# bandwidth it reaches there is the roofline's (the host's bandwidth moves during a run)
REFERENCE = "reference: torch AdamW fused"

# elements: a tensor above this size (1 MB of fp32) does not stay in a core's L2 cache between two
# passes over it, so a pass that must follow a reduction over it reads it from memory again
LARGE = 1 << 18


def no_peer_recipes(measured: list[str] = ()) -> list[str]:
    """Recipes with no peer here, other than those ``measured`` against their own roofline."""
    return [n for n in recipes.__all__ if (n not in SPECS or not SPECS[n].peers) and n not in measured
            and n != "muon_hidden_matrix"]


def installed(lib: str) -> bool:
    return importlib.util.find_spec(lib) is not None


def lib_version(lib: str) -> str:
    dist = {"adam_atan2_pytorch": "adam-atan2-pytorch"}.get(lib, lib)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- gradchain ----------------------------------------------------------------------------------------


def fused_supported() -> bool:
    """Whether this gradchain's ``ChainOptimizer`` takes ``fused=True`` (a TypeError means it does not)."""
    try:
        ChainOptimizer([torch.nn.Parameter(torch.zeros(1))], recipes.sgd(), fused=True)
    except TypeError:
        return False
    return True


def cold_cache() -> bool:
    """Whether this run compiles into the fresh, empty inductor cache it made for itself."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").startswith(
        os.path.join(tempfile.gettempdir(), "gradchain-peers-inductor-")
    )


def build_recipe(name: str) -> Any:
    spec = SPECS[name]
    return spec.build() if spec.build else getattr(recipes, name)(**spec.kwargs)


class _WithLoss:
    """An optimizer that takes the loss, stepped with one fixed value (a step's work does not depend on it)."""

    def __init__(self, opt: Any, device: torch.device) -> None:
        self.opt = opt
        self.loss = torch.tensor(0.5, device=device)

    def step(self) -> None:
        self.opt.step(loss=self.loss)


def state_bytes(opt: Any) -> int:
    """Bytes of the per-element state (0-d counters left out), each storage counted once."""
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                key = v.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += v.untyped_storage().nbytes()
    return total


# -- measurement ----------------------------------------------------------------------------------------


@dataclass
class Row:
    recipe: str
    eager: Timing
    fused: Timing | None  # None: no fused path in this gradchain, or --no-fused
    peers: dict[str, Timing]
    bytes_per_step: int | None
    numel: int
    floor_bytes: int | None = None  # bytes_per_step plus what a reduction makes every step read again
    bw: float | None = None  # bytes per second of torch's fused AdamW stepped in the same round-robin


def measure(name: str, shapes: NamedShapes, device: torch.device, libs: set[str], fused: bool,
            repeats: int, warmup: int) -> Row:
    torch._dynamo.reset()  # every recipe and case compiles from scratch: cold, comparable compile times
    peers = [p for p in SPECS[name].peers if p.lib in libs and installed(p.lib)]

    # Before every step, untimed: each param gets its grad back if the optimizer cleared it
    # (heavyball sets p.grad = None after a step, where a backward pass would write a new one),
    # and a few of its values are noted, so that a last step which moved no param (a skipped
    # step) is reported instead of timed as if it had done the work.
    grads: dict[str, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
    probes: dict[str, list[torch.Tensor]] = {}

    def on_params(label: str, make: Callable[[Named], Any]) -> Callable[[], Any]:
        def build() -> Any:
            named = make_params(shapes, device)
            grads[label] = [(p, p.grad) for _, p in named]
            return make(named)

        return build

    def prepare(label: str) -> None:
        for p, g in grads[label]:
            if p.grad is None:
                p.grad = g
        probes[label] = [p.detach().flatten()[:8].clone() for p, _ in grads[label]]

    eager_opt: dict[str, Any] = {}

    def gradchain(named: Named, fused: bool) -> Any:
        opt = ChainOptimizer(named, build_recipe(name), fused=fused)
        return _WithLoss(opt, device) if SPECS[name].loss else opt

    def make_eager(named: Named) -> Any:
        opt = gradchain(named, False)
        eager_opt["opt"] = getattr(opt, "opt", opt)
        return opt

    makers = {"gradchain eager": on_params("gradchain eager", make_eager)}
    if fused:
        makers["gradchain fused"] = on_params("gradchain fused", lambda named: gradchain(named, True))
    makers.update({p.label: on_params(p.label, p.make) for p in peers})

    def make_reference() -> Any:  # the bandwidth a hand-written kernel reaches, in this round-robin
        p = torch.nn.Parameter(torch.rand(numel(shapes), device=device))
        p.grad = torch.rand_like(p)
        grads[REFERENCE] = [(p, p.grad)]
        return torch.optim.AdamW([p], lr=1e-3, fused=True)

    makers[REFERENCE] = make_reference
    timings = time_round_robin(makers, repeats, warmup, device, prepare)
    ref = timings.pop(REFERENCE)
    for label, t in timings.items():
        if t.error is None and label in probes:
            pairs = zip(grads[label], probes[label])
            if all(torch.equal(p.detach().flatten()[:8], before) for (p, _), before in pairs):
                t.error, t.times = "its last step left every param unchanged", []
    grads.clear()
    probes.clear()
    nbytes = floor = None
    if "opt" in eager_opt and timings["gradchain eager"].error is None:
        p_bytes = 4 * numel(shapes)
        nbytes = 3 * p_bytes + 2 * state_bytes(eager_opt["opt"]) - SPECS[name].read_only * numel(shapes)
        floor = nbytes + SPECS[name].reread * sum(n for _, s in shapes if (n := torch.Size(s).numel()) > LARGE)
    eager_opt.clear()
    bw = 28 * numel(shapes) / ref.median if not ref.error and ref.times else None
    return Row(name, timings.pop("gradchain eager"), timings.pop("gradchain fused", None), timings, nbytes,
               numel(shapes), floor, bw)


# -- report ----------------------------------------------------------------------------------------------


def _fmt_ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{ms:.1f} ms" if ms >= 1 else f"{ms:.3f} ms"


def _ms(t: Timing | None) -> str:
    if t is None:
        return "n/a"
    if t.error:
        return f"error ({t.error})"
    return _fmt_ms(t.median)


def _ratio(a: Timing | None, b: float | None) -> str:
    if a is None or a.error or not a.times or not b or math.isnan(b):
        return "–"
    return f"{a.median / b:.2f}x"


def best_peer(row: Row) -> tuple[str, Timing] | None:
    ok = [(k, t) for k, t in row.peers.items() if not t.error and t.times]
    return min(ok, key=lambda kt: kt[1].median) if ok else None


def compile_time(t: Timing | None) -> float | None:
    if t is None or t.error or not t.times:
        return None
    return max(0.0, t.first - t.median)


def case_table(rows: list[Row]) -> list[str]:
    lines = [
        "| recipe | gradchain eager | gradchain fused | compile (fused) | best peer | peer | eager / peer | "
        "fused / peer | bytes / param | roofline | eager / roofline | fused / roofline | floor | fused / floor | "
        "other peers |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        best = best_peer(r)
        peer_s = best[1].median if best else None
        ct = compile_time(r.fused)
        roof = r.bytes_per_step / r.bw if r.bytes_per_step and r.bw else None
        floor = r.floor_bytes / r.bw if r.floor_bytes and r.bw else None
        others = []
        for k, t in r.peers.items():
            if best and k == best[0]:
                continue
            text = f"{k} {_ms(t)}"
            if not t.error and t.times and t.first > 0.5 and t.first > 10 * t.median:
                text += f" (first step {t.first:.1f} s)"
            others.append(text)
        peer_name = best[0] if best else "none ran" if r.peers else "no peer"
        lines.append(
            f"| {r.recipe} | {_ms(r.eager)} | {_ms(r.fused)} | "
            f"{'n/a' if r.fused is None else ('–' if ct is None else f'{ct:.1f} s')} | "
            f"{'–' if not best else _fmt_ms(best[1].median)} | {peer_name} | "
            f"{_ratio(r.eager, peer_s)} | {_ratio(r.fused, peer_s)} | "
            f"{'–' if not r.bytes_per_step else f'{r.bytes_per_step / r.numel:.1f}'} | "
            f"{'–' if roof is None else _fmt_ms(roof)} | {_ratio(r.eager, roof)} | {_ratio(r.fused, roof)} | "
            f"{'–' if floor is None else _fmt_ms(floor)} | {_ratio(r.fused, floor)} | "
            f"{'; '.join(others) or '–'} |"
        )
    return lines


def plot(results: dict[str, tuple[str, list[Row]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig, axes = plt.subplots(len(results), 1, figsize=(max(8.0, 0.7 * max(len(r) for _, r in results.values()) + 2),
                                                        3.2 * len(results)), squeeze=False)
    for ax, (key, (label, rows)) in zip(axes[:, 0], results.items()):
        names, eager, fused = [], [], []
        for r in rows:
            best = best_peer(r)
            if best is None:
                continue
            names.append(r.recipe)
            eager.append(r.eager.median / best[1].median if not r.eager.error and r.eager.times else math.nan)
            ok = r.fused is not None and not r.fused.error and r.fused.times
            fused.append(r.fused.median / best[1].median if ok else math.nan)
        x = range(len(names))
        bars = ax.bar([i - 0.2 for i in x], eager, 0.4, label="gradchain eager")
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
        no_fused = all(math.isnan(f) for f in fused)
        bars = ax.bar([i + 0.2 for i in x], fused, 0.4, label="gradchain fused" + (" (n/a)" if no_fused else ""))
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x), names, rotation=30, ha="right")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel("time / best peer")
        ax.set_title(f"({key}) {label}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=sorted(CASES), default="full", help="full, small (quick check) or tiny (tests)")
    ap.add_argument("--cases", default="a,b,c")
    ap.add_argument("--recipes", default="", help=f"comma-separated subset of: {','.join(SPECS)}")
    ap.add_argument("--peerless", action="store_true",
                    help=f"also the recipes without a peer ({','.join(PEERLESS)}), against their roofline only")
    ap.add_argument("--libs", default=",".join(LIBS), help="peer libraries to use (those not installed are skipped)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiled peers settle)")
    ap.add_argument("--no-fused", action="store_true", help="skip gradchain's fused path")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (compile times not cold)")
    ap.add_argument("--out", default=None,
                    help="markdown file to write, a PNG chart beside it (default: benchmarks/peers.md if --sizes full)")
    args = ap.parse_args(argv)

    names = [n for n in args.recipes.split(",") if n] or [n for n in SPECS if hasattr(recipes, n) and
                                                           (SPECS[n].peers or args.peerless)]
    unknown = [n for n in names if n not in SPECS or not hasattr(recipes, n)]
    if unknown:
        ap.error(f"no peer is registered for recipe(s) {unknown}; choose from {list(SPECS)}")
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES[args.sizes]]
    if bad:
        ap.error(f"unknown case(s) {bad}; choose from {list(CASES[args.sizes])}")
    libs = {lib for lib in args.libs.split(",") if lib}
    if libs - set(LIBS):
        ap.error(f"unknown peer libraries {sorted(libs - set(LIBS))}; choose from {list(LIBS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: this torch sees no CUDA device")
    out = Path(args.out) if args.out else (Path(__file__).with_name("peers.md") if args.sizes == "full" else None)

    torch.set_num_threads(args.threads)
    # every (recipe, case) compiles its own graphs; keep dynamo from falling back to eager silently
    for key in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 256))
    fused = not args.no_fused and fused_supported()
    bw_bytes = BANDWIDTH_BYTES[args.sizes]
    probes0 = bandwidth_probes(bw_bytes, device=device)
    bw0 = max(probes0.values())
    print(f"bandwidth {bw0 / 1e9:.1f} GB/s; gradchain fused path: {'yes' if fused else 'n/a'}", flush=True)

    results: dict[str, tuple[str, list[Row]]] = {}
    for key in cases:
        label, make_shapes = CASES[args.sizes][key]
        shapes = make_shapes()
        rows = []
        for name in names:
            if SPECS[name].peers and not any(p.lib in libs and installed(p.lib) for p in SPECS[name].peers):
                continue
            row = measure(name, shapes, device, libs, fused, args.repeats, args.warmup)
            rows.append(row)
            best = best_peer(row)
            print(f"({key}) {name:16s} eager {_ms(row.eager):>12s}  fused {_ms(row.fused):>12s}  "
                  f"best peer {best[0] + ' ' + _ms(best[1]) if best else '-'}", flush=True)
        results[key] = (label, rows)
    probes1 = bandwidth_probes(bw_bytes, device=device)

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    skipped = [n for n in names if SPECS[n].peers and not any(p.lib in libs and installed(p.lib)
                                                              for p in SPECS[n].peers)]
    cmd = "python benchmarks/peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Step time against the peers",
        "",
        f"Generated by `{cmd.strip()}` on {datetime.date.today().isoformat()}.",
        "",
        f"Device: {args.device} ({dev}), {os.cpu_count()} CPU cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; fp32; medians of {args.repeats} round-robin steps after "
        f"{args.warmup} warm-up steps; sizes `{args.sizes}`. Peers: "
        + ", ".join(f"{lib} {lib_version(lib) if lib != 'torch' else torch.__version__}" for lib in LIBS if lib in libs)
        + ".",
        "",
        f"Bandwidth over {bw_bytes // 2**20} MB buffers, best of 7, before and after the cases: "
        + ", ".join(f"{k} {probes0[k] / 1e9:.1f} and {probes1[k] / 1e9:.1f} GB/s" for k in probes0)
        + " (`_timing.bandwidth_probes`; the host's bandwidth moves during a run). Each recipe's roofline uses "
        "the bandwidth that torch's fused AdamW, over one param of the case's size, reaches in that recipe's own "
        "round-robin (a reference stepped with the others, not a peer). Bytes per step: read p and g, "
        "write p, and read and write every per-element state buffer of the eager gradchain optimizer once "
        "(read once where a step never writes it: the fractional gradient's older slots, `Spec.read_only`). "
        f"Floor: the roofline plus what a reduction makes a step read again from a tensor of over {LARGE} "
        "elements, which does not stay in a core's cache between the passes (LAMB's trust ratio, the cautious "
        "mask's mean, Adafactor's factored statistics and RMS, AdaNorm's and Amos's per-tensor norms, the "
        "global sums of AdamS and Prodigy, spectral AdamW's power iterations; see `Spec.reread`). "
        "Compile (fused): the fused path's first step minus its median step, "
        + ("inductor's on-disk cache empty at the start (a cold compile)" if cold_cache()
           else "inductor's on-disk cache as found (compiles may be warm)")
        + ". gradchain fused is n/a where `ChainOptimizer` has no `fused` argument.",
        "",
    ]
    if device.type == "cpu":
        lines += ["CUDA numbers need a GPU run: `python benchmarks/peers.py --device cuda`.", ""]
    for key, (label, rows) in results.items():
        n = numel(CASES[args.sizes][key][1]())
        row_bws = [r.bw for r in rows if r.bw]
        span = f"{min(row_bws) / 1e9:.0f}-{max(row_bws) / 1e9:.0f} GB/s" if row_bws else "n/a"
        lines += [f"## ({key}) {label}: {n / 1e6:.2f}M params, roofline at {span} (each recipe's reference)", ""]
        lines += case_table(rows) + [""]
    lines += [
        "Recipes without a peer in these libraries (not benchmarked here): " + ", ".join(no_peer_recipes(names)) + ".",
    ]
    if skipped:
        lines += ["", "Skipped (no peer library installed or selected): " + ", ".join(skipped) + "."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        plot(results, out.with_suffix(".png"), f"gradchain / best peer, {args.device}, sizes {args.sizes} "
             "(below the dashed line: faster than the peer)")
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
