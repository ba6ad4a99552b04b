"""Never lose a run: a killed run resumes bit for bit; Ctrl-C stops cleanly and --resume goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the top-level recipes/ package

pytest.importorskip("sklearn")

import gradchain  # noqa: E402
from recipes import compare  # noqa: E402

ARGS = [
    "--task",
    "digits",
    "--steps",
    "12",
    "--eval-every",
    "4",
    "--checkpoint-every",
    "5",
    "--no-progress",
    "--diag-every",
    "0",
]


def signalling(sig: int, at: int, marker: Path):
    """A recipe for the tests: AdamW that sends ``sig`` to its own process at step ``at``, once
    (the marker file remembers it did), so the same recipe then runs undisturbed."""

    def factory(lr: float = 3e-3, weight_decay: float = 1e-2) -> gradchain.Transform:
        def update(updates, state, hp, ctx):
            if ctx.step == at and not marker.exists():
                marker.write_text("sent")
                os.kill(os.getpid(), sig)
            return updates

        stop = gradchain.transform("signal", {}, lambda p: {}, update)
        return gradchain.chain(stop, gradchain.recipes.adamw(lr=lr, weight_decay=weight_decay))

    return factory


def _result(out: Path, optimizer: str) -> dict:
    found = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    (result,) = [r for r in found if r["spec"]["optimizer"] == optimizer]
    return result


def _model(out: Path, optimizer: str) -> dict:
    (path,) = [p for p in (out / "runs").glob(f"{optimizer}-*/model.pt")]
    return torch.load(path, weights_only=True)


def _same_run(a: Path, b: Path, optimizer: str) -> None:
    ra, rb = _result(a, optimizer), _result(b, optimizer)
    assert ra["history"] == rb["history"] and len(ra["history"]) == 12
    assert ra["evals"] == rb["evals"] and [e["step"] for e in ra["evals"]] == [4, 8, 12]
    assert ra["final"] == rb["final"]
    ma, mb = _model(a, optimizer), _model(b, optimizer)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_killed_run_resumes_bit_exactly(tmp_path, monkeypatch) -> None:
    marker, out, ref = tmp_path / "killed", tmp_path / "out", tmp_path / "ref"
    script = textwrap.dedent(
        f"""
        import signal, sys
        from pathlib import Path
        sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
        import gradchain
        from test_compare_resume import signalling
        gradchain.recipes.killer = signalling(signal.SIGKILL, 7, Path({str(marker)!r}))
        from recipes import compare
        compare.main({[*ARGS, "--optimizers", "sgd,killer", "--out", str(out)]!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed hard, no cleanup ran
    assert marker.exists()
    (rundir,) = [p for p in (out / "runs").iterdir() if p.name.startswith("killer")]
    assert (rundir / "checkpoint.pt").exists() and not (rundir / "result.json").exists()
    assert torch.load(rundir / "checkpoint.pt", weights_only=True)["step"] == 5
    sgd_result = next((out / "runs").glob("sgd-*/result.json"))
    sgd_before = sgd_result.read_text()

    monkeypatch.setattr(gradchain.recipes, "killer", signalling(signal.SIGKILL, 7, marker), raising=False)
    runs = compare.main([*ARGS, "--optimizers", "sgd,killer", "--out", str(out), "--resume"])
    assert [r.status for r in runs] == ["ok", "ok"] and not runs.interrupted
    assert sgd_result.read_text() == sgd_before  # finished: skipped, not run again
    assert not (rundir / "checkpoint.pt").exists()  # removed once the run finished
    compare.main([*ARGS, "--optimizers", "killer", "--out", str(ref)])  # never interrupted
    _same_run(out, ref, "killer")


def test_ctrl_c_stops_cleanly_and_resume_continues(tmp_path, monkeypatch, capsys) -> None:
    marker, out, ref = tmp_path / "interrupted", tmp_path / "out", tmp_path / "ref"
    monkeypatch.setattr(gradchain.recipes, "ctrl_c", signalling(signal.SIGINT, 7, marker), raising=False)
    handler = signal.getsignal(signal.SIGINT)
    runs = compare.main([*ARGS, "--optimizers", "sgd,ctrl_c,adam", "--out", str(out)])
    assert signal.getsignal(signal.SIGINT) is handler  # put back
    assert runs.interrupted and [r.spec.optimizer for r in runs] == ["sgd"]
    printed = capsys.readouterr().out
    assert "| sgd |" in printed and "stopped: 1 of 3 runs finished" in printed and "--resume" in printed
    # what finished is saved; the stopped run has a checkpoint at the step where it stopped
    md = (out / "results.md").read_text()
    assert "| sgd |" in md and "| ctrl_c |" not in md
    (rundir,) = [p for p in (out / "runs").iterdir() if p.name.startswith("ctrl_c")]
    assert torch.load(rundir / "checkpoint.pt", weights_only=True)["step"] == 7
    assert not list((out / "runs").glob("adam-*"))  # never started

    runs = compare.main([*ARGS, "--optimizers", "sgd,ctrl_c,adam", "--out", str(out), "--resume"])
    assert not runs.interrupted and [r.status for r in runs] == ["ok", "ok", "ok"]
    assert "--resume: 1 of 3 runs already finished" in capsys.readouterr().out
    compare.main([*ARGS, "--optimizers", "ctrl_c", "--out", str(ref)])
    _same_run(out, ref, "ctrl_c")
