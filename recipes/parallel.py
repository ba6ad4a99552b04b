"""Run many independent runs: in this process, or in ``--jobs N`` worker processes; progress bars; stopping.

Progress: one overall bar (runs done) and one bar per running run. Stopping: the first Ctrl-C (or
SIGTERM) asks every running run to stop at its next step boundary, where it saves a checkpoint;
runs not started yet are not started. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_mod
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .runner import Run, RunSpec, Stopped, failed_run, train_run


class Bars:
    """An overall bar and one bar per running run (tqdm; nothing when disabled or not installed)."""

    def __init__(self, total_runs: int, slots: int, enabled: bool, desc: str) -> None:
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:  # pragma: no cover - tqdm is in the recipes extra
                pass
        self.overall = self._bar(total=total_runs, desc=desc, unit="run", position=0, leave=True)
        self.free = list(range(1, slots + 1))
        self.bars: dict[str, Any] = {}

    def _bar(self, **kw: Any) -> Any:
        return self.tqdm(dynamic_ncols=True, **kw) if self.tqdm is not None else None

    def start(self, run_id: str, desc: str, total: float) -> None:
        if self.tqdm is None or run_id in self.bars:
            return
        pos = self.free.pop(0) if self.free else len(self.bars) + 1
        unit = "step" if float(total).is_integer() else "s"
        self.bars[run_id] = (self._bar(total=total, desc=desc, unit=unit, position=pos, leave=False), pos)

    def update(self, run_id: str, done: float, total: float, postfix: str) -> None:
        if run_id not in self.bars:
            return
        bar = self.bars[run_id][0]
        bar.n = round(done, 1) if not float(total).is_integer() else int(done)
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    def end(self, run_id: str, finished: bool) -> None:
        if run_id in self.bars:
            bar, pos = self.bars.pop(run_id)
            bar.close()
            self.free.append(pos)
            self.free.sort()
        if finished and self.overall is not None:
            self.overall.update(1)

    def close(self) -> None:
        for run_id in list(self.bars):
            self.end(run_id, False)
        if self.overall is not None:
            self.overall.close()

    def write(self, text: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(text)
        else:
            print(text)


@contextmanager
def stop_on_signals(on_stop: Callable[[], None], hard_second: bool = True) -> Iterator[None]:
    """The first SIGINT/SIGTERM calls ``on_stop``; a second SIGINT raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = {"n": 0}

    def handler(signum: int, frame: Any) -> None:
        seen["n"] += 1
        if seen["n"] > 1 and hard_second and signum == signal.SIGINT:
            raise KeyboardInterrupt
        on_stop()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- worker processes ---------------------------------------------------------------------------------
_W: dict[str, Any] = {}


def _worker_init(stop_event: Any, progress: Any, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; workers stop at a step boundary
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    _W.update(stop=stop_event, progress=progress, tasks={})


def _task(name: str, device: Any = None) -> Any:
    from .compare import make_task

    tasks = _W.setdefault("tasks", {})
    if name not in tasks:
        tasks[name] = make_task(name)
        if device is not None:
            tasks[name].to(device)
    return tasks[name]


def _worker_run(spec: RunSpec, rundir: str, options: dict) -> dict:
    # the spec travels pickled, not as JSON: its settings arrive as the very values the parent resolved
    progress = _W["progress"]
    last = {"t": 0.0}

    def reporter(run_id: str, done: float, total: float, postfix: str) -> None:
        now = time.monotonic()
        if now - last["t"] >= 0.2 or done >= total or done == 0:
            last["t"] = now
            progress.put(("update", run_id, done, total, postfix))

    progress.put(("start", spec.run_id, f"{spec.task}/{spec.optimizer}", 0))
    run = execute(
        _task(spec.task, options.get("device")),
        spec,
        Path(rundir),
        reporter=reporter,
        stop=_W["stop"].is_set,
        **options,
    )
    # result.json leaves the diagnostics to diagnostics.csv; the parent's tables and figures need them
    return {"run": run.to_json(), "diagnostics": run.diagnostics}


def execute(task: Any, spec: RunSpec, rundir: Path | None, *, tensorboard: bool = False, **kw: Any) -> Run:
    """One run, its failures recorded (not raised) so the other runs go on; Stopped is raised."""
    if tensorboard and rundir is not None:
        kw["tb_dir"] = rundir / "tb"
    try:
        return train_run(task, spec, rundir, **kw)
    except Stopped:
        raise
    except Exception as e:
        if kw.get("ctx") is not None:  # other processes are waiting in a collective: do not go on
            raise
        return failed_run(spec, e, rundir)


def run_all(
    specs: Sequence[RunSpec],
    rundir_of: Callable[[RunSpec], Path],
    task_of: Callable[[str], Any],
    *,
    jobs: int,
    threads: int,
    progress: bool,
    options: dict,
    on_result: Callable[[Run], None],
    desc: str,
) -> bool:
    """Run ``specs``; ``on_result`` gets each run as it ends. Returns False when stopped early."""
    bars = Bars(len(specs), max(1, jobs), progress, desc)
    try:
        if jobs <= 1:
            return _run_here(specs, rundir_of, task_of, bars, options, on_result)
        return _run_pool(specs, rundir_of, bars, jobs, threads, options, on_result)
    finally:
        bars.close()


def _run_here(specs, rundir_of, task_of, bars: Bars, options: dict, on_result) -> bool:
    stop = threading.Event()
    # under --fsdp torchrun passes a Ctrl-C on to every process: no second-signal escape there
    with stop_on_signals(stop.set, hard_second="ctx" not in options):
        for spec in specs:
            if stop.is_set():
                return False
            bars.start(spec.run_id, f"{spec.task}/{spec.optimizer}", 0)

            def reporter(run_id: str, done: float, total: float, postfix: str) -> None:
                bar = bars.bars.get(run_id)
                if bar is not None and bar[0].total != total:
                    bar[0].total = total
                bars.update(run_id, done, total, postfix)

            try:
                run = execute(task_of(spec.task), spec, rundir_of(spec), reporter=reporter, stop=stop.is_set, **options)
            except Stopped:
                bars.end(spec.run_id, False)
                return False
            bars.end(spec.run_id, True)
            on_result(run)
    return True


def _run_pool(specs, rundir_of, bars: Bars, jobs: int, threads: int, options: dict, on_result) -> bool:
    # fork starts a worker at once (torch and the task already imported); CUDA cannot cross a fork
    fork = sys.platform == "linux" and not torch.cuda.is_initialized()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    stop_event = ctx.Event()
    progress = ctx.Queue()
    stopped = False
    pending: dict[Future, RunSpec] = {}
    todo = list(specs)

    def drain() -> None:
        while True:
            try:
                msg = progress.get_nowait()
            except queue_mod.Empty:
                return
            if msg[0] == "start":
                bars.start(msg[1], msg[2], 1)
            elif msg[0] == "update":
                _, run_id, done, total, postfix = msg
                bar = bars.bars.get(run_id)
                if bar is not None and bar[0].total != total:
                    bar[0].total = total
                bars.update(run_id, done, total, postfix)

    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_worker_init, initargs=(stop_event, progress, threads)
    ) as pool:
        with stop_on_signals(stop_event.set):
            while todo or pending:
                while todo and len(pending) < jobs and not stop_event.is_set():
                    spec = todo.pop(0)
                    fut = pool.submit(_worker_run, spec, str(rundir_of(spec)), options)
                    pending[fut] = spec
                if stop_event.is_set():
                    todo.clear()
                if not pending:
                    break
                done, _ = wait(list(pending), timeout=0.1, return_when=FIRST_COMPLETED)
                drain()
                for fut in done:
                    spec = pending.pop(fut)
                    try:
                        got = fut.result()
                        run = Run.from_json(got["run"], rundir_of(spec))
                        run.diagnostics = got["diagnostics"]
                        # filed under the parent's spec: its run id, swept values and sources are the command's
                        run.spec = spec
                    except Stopped:
                        stopped = True
                        bars.end(spec.run_id, False)
                        continue
                    except Exception as e:  # the worker process died
                        run = failed_run(spec, e, rundir_of(spec))
                    bars.end(spec.run_id, True)
                    on_result(run)
            drain()
    return not (stopped or stop_event.is_set())
