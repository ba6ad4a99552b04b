"""The benchmark scripts run end to end on tiny sizes and write the tables they promise (no timing checks)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradchain as gc
from gradchain import pieces
from gradchain.fused import runner

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
COLUMNS = [
    "recipe", "gradchain eager", "gradchain fused", "compile (fused)", "best peer", "peer", "eager / peer",
    "fused / peer", "bytes / param", "roofline", "eager / roofline", "fused / roofline", "floor", "fused / floor",
    "other peers",
]


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Rows of every markdown table, keyed by the ``## (case)`` heading above it."""
    out: dict[str, list[list[str]]] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("## ("):
            key = line[4]
            out[key] = []
        elif key and line.startswith("|"):
            out[key].append([c.strip() for c in line.strip("|").split("|")])
    return out


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("peers")


def test_peers_tiny_writes_table_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "peers.md"
    cmd = [sys.executable, str(BENCH / "peers.py"), "--sizes", "tiny", "--cases", "b,c", "--recipes", "adamw,sgd",
           "--libs", "torch", "--repeats", "2", "--warmup", "0", "--no-fused", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert out.with_suffix(".png").stat().st_size > 0
    tables = _tables(text)
    assert sorted(tables) == ["b", "c"]
    for rows in tables.values():
        assert rows[0] == COLUMNS
        body = {r[0]: dict(zip(COLUMNS, r)) for r in rows[2:]}
        assert sorted(body) == ["adamw", "sgd"]
        for r in body.values():
            assert r["gradchain eager"].endswith(" ms"), r
            assert r["gradchain fused"] == "n/a"  # --no-fused
            assert r["peer"].startswith("torch "), r
            assert r["eager / peer"].endswith("x") and r["eager / roofline"].endswith("x"), r
        # read p, g, m, v; write p, m, v: 7 fp32 buffers per param; SGD with momentum: 5
        assert body["adamw"]["bytes / param"] == "28.0"
        assert body["sgd"]["bytes / param"] == "20.0"
    assert "CUDA numbers need a GPU run" in text


def test_peers_fused_and_compile_columns(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused column and the compile time come from ``ChainOptimizer(..., fused=True)``."""

    class SlowFirstStep(bench.ChainOptimizer):  # stands in for a path that compiles on its first step
        def __init__(self, params, transform, fused: bool = False, **kw):
            super().__init__(params, transform, **kw)
            self.pending = fused

        def step(self, *a, **k):
            if self.pending:
                time.sleep(0.5)
                self.pending = False
            return super().step(*a, **k)

    monkeypatch.setattr(bench, "ChainOptimizer", SlowFirstStep)
    out = tmp_path / "peers.md"
    bench.main(["--sizes", "tiny", "--cases", "c", "--recipes", "adamw", "--libs", "torch", "--repeats", "2",
                "--warmup", "0", "--out", str(out)])
    row = dict(zip(COLUMNS, _tables(out.read_text())["c"][2]))
    assert row["gradchain fused"].endswith(" ms") and row["fused / peer"].endswith("x"), row
    assert float(row["compile (fused)"].removesuffix(" s")) >= 0.4, row


def test_floor_adds_the_reread_of_large_tensors(bench) -> None:
    # LAMB's trust ratio reads m, v and p again (12 bytes an element) in a tensor too large for the
    # cache; a small tensor's second pass is served from the cache; AdamW has one pass
    shapes = [("big", (600, 500)), ("small", (100,))]
    lamb = bench.measure("lamb", shapes, torch.device("cpu"), set(), False, 1, 0)
    assert lamb.bytes_per_step == 28 * 300_100
    assert lamb.floor_bytes - lamb.bytes_per_step == 12 * 300_000
    adamw = bench.measure("adamw", shapes, torch.device("cpu"), set(), False, 1, 0)
    assert adamw.floor_bytes == adamw.bytes_per_step == 28 * 300_100


def test_peerless_recipes_are_measured_against_their_roofline(bench, tmp_path: Path) -> None:
    # not in a default run; named (or --peerless) they get a row with no peer and a roofline
    assert "gc_adamw" in bench.PEERLESS and not bench.SPECS["gc_adamw"].peers
    out = tmp_path / "peers.md"
    bench.main(["--sizes", "tiny", "--cases", "c", "--recipes", "gc_adamw", "--libs", "torch", "--repeats", "1",
                "--warmup", "0", "--no-fused", "--out", str(out)])
    text = out.read_text()
    row = dict(zip(COLUMNS, _tables(text)["c"][2]))  # after the header and the rule
    assert row["recipe"] == "gc_adamw" and row["peer"] == "no peer" and row["eager / peer"] == "–", row
    assert row["bytes / param"] == "28.0" and row["eager / roofline"].endswith("x"), row
    assert "gc_adamw" not in text.split("not benchmarked here")[1]
    # the row means of g first: 4 bytes an element more, on a tensor too large for the cache
    shapes = [("big", (600, 500))]
    assert bench.measure("gc_adamw", shapes, torch.device("cpu"), set(), False, 1, 0).floor_bytes == 32 * 300_000


def test_ring_slots_count_once_and_adalo_gets_a_loss(bench) -> None:
    # the fractional gradient's 9 older slots (of 10) are read, never written: counted once
    shapes = [("big", (600, 500))]
    frac = bench.measure("fractional_adam", shapes, torch.device("cpu"), set(), False, 1, 0)
    assert frac.bytes_per_step == (12 + 2 * 4 * 12 - 36) * 300_000
    # AdaLo takes the loss at every step: measured (a step without it would raise), and it moved
    adalo = bench.measure("adalo", shapes, torch.device("cpu"), set(), True, 1, 0)
    assert adalo.eager.error is None and adalo.fused.error is None, (adalo.eager.error, adalo.fused.error)
    assert adalo.bytes_per_step == 20 * 300_000


def test_peers_rejects_unknown_recipe(bench) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "tiny", "--recipes", "adamw,no_such_recipe"])


class _SGDThatClearsGrads:
    """Steps once per grad and then drops it, as heavyball does; idle without a grad."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
                p.grad = None


def test_peers_regrads_between_steps_and_flags_a_skipped_step(bench) -> None:
    idle = bench.Peer("idle", "torch", lambda named: type("Idle", (), {"step": lambda self: None})())
    clears = bench.Peer("clears", "torch", lambda named: _SGDThatClearsGrads([p for _, p in named]))
    bench.SPECS["adamw"].peers.extend([idle, clears])
    try:
        row = bench.measure("adamw", [("w", (8, 8))], torch.device("cpu"), {"torch"}, False, 3, 1)
    finally:
        bench.SPECS["adamw"].peers.remove(idle)
        bench.SPECS["adamw"].peers.remove(clears)
    assert row.peers["idle"].error == "its last step left every param unchanged"
    assert row.peers["clears"].error is None and len(row.peers["clears"].times) == 3
    assert bench.best_peer(row)[0] != "idle"


def test_step_time_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    step_time = importlib.import_module("step_time")
    ms = step_time.time_optimizers([(64,), (16, 8)], repeats=2)
    assert sorted(ms) == sorted(step_time.OPTIMIZERS) and all(t > 0 for t in ms.values())


def test_memory_reports_what_the_fused_path_keeps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a buffer passed from a compiled segment to an eager one, which a CPU keeps, counts (here a
    # momentum's, handed to an update that declares nothing); AdamW, AdaLo, AdamS (whose decay pass
    # gets Adam's update again from its state) and Muon (whose momentum runs with its eager
    # Newton-Schulz, in pieces) keep only the gaps between params
    monkeypatch.syspath_prepend(str(BENCH))
    memory = importlib.import_module("memory")
    shapes = memory.gpt2_shapes(scale=0.02, layers=2)
    undeclared = gc.transform("doubled", None, None, lambda u, state, hp, ctx: [x * 2 for x in u])
    build = memory.build
    monkeypatch.setattr(memory, "build", lambda name: gc.chain(gc.trace(0.9), undeclared, gc.scale_by_lr(0.1))
                        if name == "momentum_then_undeclared" else build(name))
    extra = memory.measure_fused(["adamw", "adalo", "adams", "muon", "momentum_then_undeclared"], shapes)
    assert extra["momentum_then_undeclared"] >= 1.0
    assert max(extra["adamw"], extra["adalo"], extra["adams"], extra["muon"]) < 0.05, extra
    md = memory.table([{"recipe": "muon", "state_bytes": 8, "ratio": 2.0}], 4, 0.02, False, extra)
    assert "fused keeps besides / params" in md and f"{extra['muon']:.4f}" in md


def test_memory_reports_step_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    # --peak: the most a step holds at once besides params, grads and state, from the profiler's
    # allocation events. Muon's matrices run a piece of whole matrices at a time, on both paths
    # (here pieces of 1024 elements: a few matrices each); before, a step held its momentum mix
    # for every matrix, plus a second set of updates eagerly (1.37x and 0.69x of the params here)
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(runner, "BACKEND", "inductor")  # AdamW's kernel, not its ops one by one
    monkeypatch.setattr(pieces, "PIECE_NUMEL", 1 << 10)
    memory = importlib.import_module("memory")
    eager, fused = memory.measure_peaks(["muon"], memory.gpt2_shapes(scale=0.05, layers=2))["muon"]
    assert 0 < eager < 0.35 and 0 < fused < 0.35, (eager, fused)
    md = memory.table([{"recipe": "muon", "state_bytes": 8, "ratio": 2.0}], 4, 0.05, False, None,
                      {"muon": (eager, fused)})
    assert "step peak / params (eager)" in md and f"{eager:.4f} | {fused:.4f} |" in md


@pytest.fixture
def compile_time(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("compile_time")


def test_compile_time_child_times_the_fused_first_step(compile_time) -> None:
    threads = torch.get_num_threads()
    try:
        got = compile_time.child("adalo", "c", "tiny", threads=1, steps=2)  # adalo: the step takes a loss
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == ["compile", "compiling", "start", "step"]
    assert got["start"] > 0 and got["step"] > 0
    # the first step traces the chain (the suite's backend skips code generation, not tracing),
    # which dynamo's own account of the step's compiling sees
    assert got["compile"] > 10 * got["step"], got
    assert 0 < got["compiling"] < got["compile"] + got["step"], got


def test_compile_time_writes_cold_and_warm_per_case(compile_time, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str, str]] = []

    def fake(name: str, case: str, args, cache: str) -> dict[str, float] | str:
        calls.append((name, case, cache))
        if name == "sgd" and case == "c":
            return "failed: RuntimeError: boom"
        warm = sum(1 for n, c, _ in calls if (n, c) == (name, case)) == 2
        return {"start": 4.0 if warm else 9.0, "compile": 0.5 if warm else 3.0, "compiling": 0.3 if warm else 2.0,
                "step": 0.01}

    monkeypatch.setattr(compile_time, "run_child", fake)
    out = tmp_path / "ct.md"
    compile_time.main(["--sizes", "tiny", "--recipes", "adamw,sgd", "--cases", "a,c", "--out", str(out)])
    # cold then warm, over one cache directory per recipe and case, removed afterwards
    assert [(n, c) for n, c, _ in calls] == [("adamw", "a")] * 2 + [("adamw", "c")] * 2 + [("sgd", "a")] * 2 \
        + [("sgd", "c")] * 2
    assert all(calls[i][2] == calls[i + 1][2] for i in range(0, 8, 2)) and len({c for *_, c in calls}) == 4
    assert not any(Path(c).exists() for *_, c in calls)
    text = out.read_text()
    assert "| adamw | 3.0 s (2.0 s) | 0.5 s (0.3 s) | 3.0 s (2.0 s) | 0.5 s (0.3 s) |" in text
    assert "| sgd | 3.0 s (2.0 s) | 0.5 s (0.3 s) | – | – |" in text
    assert "cold 9.0-9.0 s; warm 4.0-4.0 s" in text
    assert "Failed: sgd (c): failed: RuntimeError: boom; sgd (c): failed: RuntimeError: boom" in text
    with pytest.raises(SystemExit):
        compile_time.main(["--sizes", "tiny", "--recipes", "adamw,no_such_recipe"])


def test_compile_time_reports_a_child_that_times_out(compile_time, monkeypatch: pytest.MonkeyPatch) -> None:
    def hangs(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(compile_time.subprocess, "run", hangs)
    args = compile_time.argparse.Namespace(sizes="tiny", threads=1, steps=1, timeout=7.0)
    assert compile_time.run_child("adamw", "c", args, "/nonexistent") == "failed: no result within 7 s"


def test_a_fresh_fused_step_holds_no_second_copy_of_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # a new bucket's state is made a param at a time inside its flat buffers: the first step holds
    # params, grads and AdamW's two moments (4.00), plus the largest param's two moments for a
    # moment (2 x 0.2 here), and with atomic="first" a snapshot of the params (5.00). Made whole
    # first, the state was held twice while it was copied in: 5.00 without the snapshot too
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(pieces, "_primed", True)
    memory = importlib.import_module("memory")
    shapes = [(f"w{i}", (64, 64)) for i in range(8)] + [("big", (128, 64))]  # the largest: 0.2 of the bucket
    assert memory.first_step_peak("adamw", shapes, True, False, atomic="never") == pytest.approx(4.4, abs=0.05)
    assert memory.first_step_peak("adamw", shapes, True, False) == pytest.approx(5.0, abs=0.05)


def test_memory_reports_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # --first: the first step's peak, params, grads and state included. AdamW holds 4 params' worth
    # between steps; its first step adds the atomic snapshot (a copy of the params, and after a
    # resume of the loaded moments too) and, fused, one flat buffer in the making, never both at once
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(runner, "BACKEND", "inductor")  # AdamW's kernel, not its ops one by one
    monkeypatch.setattr(pieces, "_primed", True)  # the allocator's one-time 16 MB block, not counted
    memory = importlib.import_module("memory")
    shapes = memory.gpt2_shapes(scale=0.05, layers=2)
    cells = memory.measure_first_steps(["adamw"], shapes)["adamw"]
    # the eager step's own temporaries (a model this small runs in one piece) come on top of the snapshot
    extra = memory.measure_peaks(["adamw"], shapes)["adamw"][0]
    assert cells == pytest.approx((5.0 + extra, 5.0, 7.0 + extra, 7.0, 5.0), abs=0.1), (cells, extra)
    assert memory.torch_first_step_peak(shapes, resumed=True) == pytest.approx(4.0, abs=0.1)
    md = memory.first_step_table({"adamw": cells}, (4.0, 4.0))
    assert "resumed, fused" in md and f"| adamw | {cells[0]:.2f} |" in md
