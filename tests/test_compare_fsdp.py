"""``--fsdp``: the char LM over 2 processes (gloo) equals one process; its DCP checkpoint loads in 1."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level recipes/ package
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_compare_resume import signalling  # noqa: E402

import gradchain  # noqa: E402

pytestmark = pytest.mark.distributed

ARGS = ["--task", "charlm", "--steps", "6", "--eval-every", "3", "--no-progress", "--diag-every", "0"]
AS_ADAMW = ["--set", "weight_decay=0.1"]  # the stopper is AdamW at the task's settings for AdamW


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, tmp: str, queue: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME="lo",
    )
    out: dict[str, Any] = {}
    try:
        import torch.distributed as dist

        from recipes import compare

        torch.set_num_threads(1)
        # one group for both commands (compare joins a group that exists and leaves it open)
        dist.init_process_group("gloo")

        # rank 0 alone gets the Ctrl-C at step 5: both processes must stop at the same step
        sent = Path(tmp) / ("ctrl_c-sent" if rank == 0 else "never")
        if rank:
            sent.write_text("")
        gradchain.recipes.stopper = signalling(signal.SIGINT, 5, sent)
        runs = compare.main(["--fsdp", "--optimizers", "adalo,adamw", "--out", f"{tmp}/fsdp", *ARGS])
        out["full"] = [r.status for r in runs]
        runs = compare.main(["--fsdp", "--optimizers", "stopper", "--out", f"{tmp}/stopped", *ARGS, *AS_ADAMW])
        out["stopped"] = (runs.interrupted, len(runs))
        dist.destroy_process_group()
    except BaseException:
        out["error"] = traceback.format_exc()
    queue.put((rank, out))


def _result(out: Path, optimizer: str) -> dict:
    (r,) = [json.loads(p.read_text()) for p in (out / "runs").glob(f"{optimizer}-*/result.json")]
    return r


def _close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


def test_fsdp_two_processes_equal_one_and_reshard_to_one(tmp_path, monkeypatch) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, res = queue.get(timeout=240)
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
    for rank, res in results.items():
        assert "error" not in res, f"rank {rank}: {res['error']}"
        assert res["full"] == ["ok", "ok"] and res["stopped"] == (True, 0), (rank, res)

    from recipes import compare

    # one process, no FSDP: the same trajectory up to float rounding (the loss is a mean of the
    # two halves' means instead of one mean, and the gradients are reduce-scattered)
    compare.main(["--optimizers", "adalo,adamw", "--out", str(tmp_path / "plain"), *ARGS])
    for name in ("adalo", "adamw"):
        a, b = _result(tmp_path / "fsdp", name), _result(tmp_path / "plain", name)
        assert a["world_size"] == 2 and b["world_size"] == 1
        assert _close([h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]])
        assert _close([e["val_loss"] for e in a["evals"]], [e["val_loss"] for e in b["evals"]])
    # AdaLo's step is set by the loss, so its params track to rounding; Adam's normalisation turns
    # rounding in near-zero gradient entries into visible update differences: compared by loss above
    pa = torch.load(next((tmp_path / "fsdp" / "runs").glob("adalo-*/model.pt")), weights_only=True)
    pb = torch.load(next((tmp_path / "plain" / "runs").glob("adalo-*/model.pt")), weights_only=True)
    assert all(torch.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-7) for k in pa)

    # the stopped run's checkpoint: written by 2 processes at step 5, resumed by 1 (DCP reshards)
    (rundir,) = (tmp_path / "stopped" / "runs").iterdir()
    progress = torch.load(rundir / "checkpoint" / "progress.pt", weights_only=True)
    assert progress["step"] == 5 and progress["world_size"] == 2
    monkeypatch.setattr(
        gradchain.recipes, "stopper", signalling(signal.SIGINT, 5, tmp_path / "ctrl_c-sent"), raising=False
    )
    argv = ["--fsdp", "--optimizers", "stopper", "--out", str(tmp_path / "stopped"), "--resume", *ARGS, *AS_ADAMW]
    runs = compare.main(argv)
    assert not runs.interrupted and runs[0].status == "ok" and runs[0].world_size == 1
    resumed, full = _result(tmp_path / "stopped", "stopper"), _result(tmp_path / "fsdp", "adamw")
    # steps 1-5 come from the 2-process run (the stopper is AdamW plus a no-op), step 6 ran in one
    assert resumed["history"][:5] == full["history"][:5]
    assert _close([h["loss"] for h in resumed["history"]], [h["loss"] for h in full["history"]])
    assert _close([e["val_loss"] for e in resumed["evals"]], [e["val_loss"] for e in full["evals"]])
    assert not (rundir / "checkpoint").exists()
