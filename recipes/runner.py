"""One training run: a task, an optimizer at one setting, one seed, one budget; checkpointed and resumable.

A run lives in its own folder ``<out>/runs/<run id>/``; the id names the optimizer, setting and seed
and ends in a hash of everything that fixes the trajectory, so a changed command never picks up the
wrong run. While it trains, ``checkpoint.pt`` (``checkpoint/`` with a DCP folder under ``--fsdp``)
holds the model, the optimizer, the data stream's position, both random generators and the history
so far, written every ``--checkpoint-every`` steps and when the run is stopped (Ctrl-C, SIGTERM);
a resumed run continues from it bit for bit. When the run ends, ``result.json`` (settings, final
metrics, history, evaluations), ``model.pt`` and ``diagnostics.csv`` are written and the
checkpoint removed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradchain import eval_params
from gradchain.diagnostics import GradientDiagnostics, state_bytes

from . import distributed as dd
from .common import Task
from .optimizers import find_optimizer, parse_value, recipe_values, settings_text

RESULT, CHECKPOINT, DCP_DIR, MODEL = "result.json", "checkpoint.pt", "checkpoint", "model.pt"


class Stopped(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM); its checkpoint is saved."""


@dataclass
class RunSpec:
    """Everything that fixes one run's trajectory (and its records)."""

    task: str
    optimizer: str
    settings: dict[str, Any]
    sources: dict[str, str]
    seed: int = 0
    steps: int | None = None
    seconds: float | None = None
    eval_every: int = 100
    diag_every: int = 0
    task_settings: bool = True  # "recipe:NAME" values get the task's settings for NAME
    fsdp: bool = False
    swept: dict[str, Any] = field(default_factory=dict)
    base: bool = True

    @property
    def config(self) -> str:
        return settings_text(self.settings, self.sources)

    def identity(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "optimizer": self.optimizer,
            "settings": {k: repr(v) for k, v in sorted(self.settings.items())},
            "seed": self.seed,
            "steps": self.steps,
            "seconds": self.seconds,
            "eval_every": self.eval_every,
            "diag_every": self.diag_every,
            "task_settings": self.task_settings,
            "fsdp": self.fsdp,
        }

    @property
    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]
        parts = "-".join(f"{k}={v}" for k, v in self.settings.items())
        slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", f"{self.optimizer}-{parts}" if parts else self.optimizer)
        return f"{slug[:80]}-seed{self.seed}-{digest}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings"] = {k: repr(v) for k, v in self.settings.items()}
        d["swept"] = {k: repr(v) for k, v in self.swept.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        d["settings"] = {k: parse_value(v) for k, v in d["settings"].items()}
        d["swept"] = {k: parse_value(v) for k, v in d.get("swept", {}).items()}
        return cls(**d)


@dataclass
class Run:
    """A finished (or stopped) run as the results and plots see it."""

    spec: RunSpec
    status: str = "ok"
    finished: bool = True
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0
    wall_s: float = 0.0
    step_ms: float = float("nan")
    state_bytes: int = 0
    param_bytes: int = 0
    nonfinite_steps: int = 0
    diverged_at: int | None = None
    world_size: int = 1
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    model: torch.nn.Module | None = None
    rundir: Path | None = None

    @property
    def label(self) -> str:
        return self.spec.optimizer

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec.settings

    def to_json(self) -> dict[str, Any]:
        skip = {"spec", "diagnostics", "model", "rundir"}
        d = {k: v for k, v in self.__dict__.items() if k not in skip}
        return {"spec": self.spec.to_json(), **d}

    @classmethod
    def from_json(cls, d: dict[str, Any], rundir: Path | None = None) -> Run:
        d = dict(d)
        spec = RunSpec.from_json(d.pop("spec"))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(spec=spec, rundir=rundir, **known)

    def load_model(self, task: Task) -> torch.nn.Module | None:
        """The final model (built by the task, weights from ``model.pt``)."""
        if self.model is None and self.rundir is not None and (self.rundir / MODEL).exists():
            m = task.model()
            m.load_state_dict(torch.load(self.rundir / MODEL, weights_only=True))
            self.model = m.eval()
        return self.model


# -- files ----------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_run(run: Run, rundir: Path) -> None:
    rundir.mkdir(parents=True, exist_ok=True)

    def dump(p: Path) -> None:
        p.write_text(json.dumps(run.to_json(), allow_nan=True))

    if run.diagnostics:
        with open(rundir / "diagnostics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(run.diagnostics[0]))
            w.writeheader()
            w.writerows(run.diagnostics)
    _atomic_write(rundir / RESULT, dump)


def read_run(rundir: Path, diagnostics: bool = True) -> Run | None:
    try:
        run = Run.from_json(json.loads((rundir / RESULT).read_text()), rundir)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    path = rundir / "diagnostics.csv"
    if diagnostics and path.exists():
        with open(path) as f:
            run.diagnostics = [
                {k: (v if k == "tensor" else (int(v) if k in ("step", "numel") else float(v))) for k, v in r.items()}
                for r in csv.DictReader(f)
            ]
    return run


# -- training -------------------------------------------------------------------------------------
Reporter = Callable[[str, float, float, str], None]  # (run id, done, total, postfix)


def _finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    loc = [dd.local(t) for t in tensors]
    if not loc:
        return torch.tensor(True)
    return torch.stack([n.to(loc[0].device) for n in torch._foreach_norm(loc)]).isfinite().all()


def _bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor], ctx: dd.DistContext | None) -> tuple[int, int]:
    if ctx is None:
        sb = state_bytes(opt)
    else:  # the local shards, summed over the processes below
        sb = sum(
            dd.local(v).numel() * v.element_size()
            for st in opt.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )
    pb = sum(dd.local(p).numel() * p.element_size() for p in params)
    if ctx is not None:
        sb, pb = (int(v) for v in ctx.all_sum(torch.tensor([sb, pb], dtype=torch.float64)).tolist())
    return sb, pb


def train_run(
    task: Task,
    spec: RunSpec,
    rundir: Path | None = None,
    *,
    checkpoint_every: int = 0,
    resume: bool = False,
    reporter: Reporter | None = None,
    stop: Callable[[], bool] | None = None,
    ctx: dd.DistContext | None = None,
    device: torch.device | None = None,
    tb_dir: Path | None = None,
) -> Run:
    """Train one run; with ``rundir`` it is checkpointed there and its results written there.

    ``stop()`` is asked before every step; when it says so the run saves a checkpoint and raises
    :class:`Stopped`. ``resume=True`` continues from the run's checkpoint if it has one.
    """
    ref = find_optimizer(spec.optimizer)
    main = ctx is None or ctx.main
    device = ctx.device if ctx is not None else device
    torch.manual_seed(spec.seed)
    model = task.model()
    if device is not None:
        model.to(device)
    if ctx is not None:
        dd.shard_model(model, task.fsdp_units(model))
    opt = ref.build(model, recipe_values(task, spec.settings, spec.task_settings))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(spec.seed)
    stream = task.batches(gen)
    diag = None
    if spec.diag_every > 0 and ctx is None:
        diag = GradientDiagnostics(opt, every=spec.diag_every, log_dir=tb_dir if main else None, updates=True)
    run = Run(spec=spec, world_size=ctx.world if ctx else 1, rundir=rundir)
    step_times: list[float] = []
    start = 0
    if resume and rundir is not None:
        start = _load_checkpoint(rundir, model, opt, gen, stream, run, step_times, diag, ctx)
    if ref.peer and callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None)):
        # schedulefree's optimizers start in eval mode and refuse to step until switched to train mode
        opt.train()
    total = float(spec.seconds) if spec.seconds is not None else float(spec.steps or task.default_steps)
    steps = spec.steps or task.default_steps
    step_fn = _stepper(opt, ref)
    t0 = time.perf_counter() - run.wall_s
    if reporter is not None:
        reporter(spec.run_id, start if spec.seconds is None else run.wall_s, total, "")
    step = start
    done = spec.seconds is None and step >= steps
    try:
        while not done:
            stopping = bool(stop()) if stop is not None else False
            if ctx is not None:  # every process stops at the same step
                stopping = bool(ctx.all_max(torch.tensor([float(stopping)]))[0])
            if stopping:
                if rundir is not None:
                    run.wall_s = time.perf_counter() - t0
                    _save_checkpoint(rundir, step, model, opt, gen, stream, run, step_times, diag, ctx)
                raise Stopped(f"stopped at step {step}")
            step += 1
            model.train()
            # torch's default (grads to None); a fused ChainOptimizer zeroes its flat gradient views in place
            opt.zero_grad()
            batch = next(stream)
            if ctx is not None:
                batch = ctx.shard_batch(batch)
            loss, parts = task.loss(model, batch, gen)
            loss.backward()
            # before the step: a transform may work on the gradients in place
            grads_bad = ~_finite([p.grad for p in params if p.grad is not None])
            logged = torch.stack(
                [loss.detach().float(), *(v.detach().float() for v in parts.values()), grads_bad.float()]
            )
            if ctx is not None:
                logged = ctx.all_sum(logged) / ctx.world
                # every process steps with the loss of the whole batch, as one process would
                loss_for_step = logged[0].to(loss.dtype)
            else:
                loss_for_step = loss.detach()
            ts = time.perf_counter()
            step_fn(loss_for_step)
            if diag is None or step % spec.diag_every:
                step_times.append(time.perf_counter() - ts)
            values = logged.tolist()
            row = {"step": step, "loss": values[0], **dict(zip(parts, values[1:-1]))}
            run.history.append(row)
            run.nonfinite_steps += values[-1] > 0 or not math.isfinite(values[0])
            run.wall_s = time.perf_counter() - t0
            time_up = spec.seconds is not None and run.wall_s >= spec.seconds
            flags = torch.stack([(~_finite(params)).float(), torch.tensor(float(time_up))])
            if ctx is not None:  # one decision for all processes (their clocks differ)
                flags = ctx.all_max(flags)
            params_bad, time_up = bool(flags[0]), bool(flags[1])
            writer = diag.writer if diag is not None else None
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
            if params_bad:
                run.diverged_at = step
                break
            done = step >= steps if spec.seconds is None else time_up
            if step % spec.eval_every == 0 or done:
                model.eval()
                with eval_weights(opt):
                    run.evals.append({"step": step, **task.evaluate(model)})
                if writer is not None:
                    for k, v in run.evals[-1].items():
                        if k != "step":
                            writer.add_scalar(f"eval/{k}", v, step)
            if reporter is not None:
                reporter(spec.run_id, step if spec.seconds is None else run.wall_s, total, f"loss={row['loss']:.4g}")
            if rundir is not None and checkpoint_every and step % checkpoint_every == 0 and not done:
                run.wall_s = time.perf_counter() - t0
                _save_checkpoint(rundir, step, model, opt, gen, stream, run, step_times, diag, ctx)
    finally:
        if diag is not None:
            diag.close()
    run.wall_s = time.perf_counter() - t0
    run.steps_done = step
    run.step_ms = 1e3 * statistics.median(step_times) if step_times else float("nan")
    run.state_bytes, run.param_bytes = _bytes(opt, params, ctx)
    tail = max(1, len(run.history) // 10)
    losses = [r["loss"] for r in run.history[-tail:]]
    run.final = {"train_loss": sum(losses) / len(losses)} if losses else {}
    if run.diverged_at is None and run.evals:
        run.final.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    else:
        run.status = f"diverged at step {run.diverged_at}" if run.diverged_at is not None else "no steps"
        run.final.update({k: float("nan") for k in task.metrics})
    run.diagnostics = diag.records if diag is not None else []
    # the final model as evaluated (schedule-free's average, Lookahead's slow weights), on the CPU
    with eval_weights(opt):
        if ctx is not None:
            weights = dd.full_model_state(model)
        else:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if main:
        run.model = task.model()
        run.model.load_state_dict(weights)
        run.model.eval()
    if rundir is not None and main:
        rundir.mkdir(parents=True, exist_ok=True)
        torch.save(run.model.state_dict(), rundir / MODEL)
        write_run(run, rundir)
        _remove_checkpoint(rundir)
    return run


@contextlib.contextmanager
def eval_weights(opt: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to evaluate in the params for the block: :func:`gradchain.eval_params` for a
    gradchain chain; a peer's own ``eval()``/``train()`` where it has them (schedulefree's)."""
    if getattr(opt, "transform", None) is not None:
        with eval_params(opt):
            yield
        return
    swap = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
    if swap:
        opt.eval()
    try:
        yield
    finally:
        if swap:
            opt.train()


def _stepper(opt: torch.optim.Optimizer, ref: Any) -> Callable[[torch.Tensor], Any]:
    """``opt.step(loss=loss)`` for a recipe (loss-aware ones read it); a peer's plain ``step()``."""
    if not ref.peer:
        return lambda loss: opt.step(loss=loss)
    if ref.needs_closure():
        raise ValueError(f"{ref.name} needs a closure that re-evaluates the model (e.g. LBFGS); compare cannot run it")
    return lambda loss: opt.step()


def failed_run(spec: RunSpec, err: BaseException, rundir: Path | None) -> Run:
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    run = Run(spec=spec, status=f"failed: {msg}", finished=False, rundir=rundir)
    if rundir is not None:
        rundir.mkdir(parents=True, exist_ok=True)
        (rundir / "error.txt").write_text("".join(traceback.format_exception(err)))
        write_run(run, rundir)
    return run


# -- checkpoints ----------------------------------------------------------------------------------
def _progress(step: int, gen: torch.Generator, stream: Any, run: Run, step_times: list[float], diag: Any) -> dict:
    return {
        "format": 1,
        "spec_id": run.spec.run_id,
        "step": step,
        "gen": gen.get_state(),
        "rng": torch.get_rng_state(),
        "stream": stream.state_dict(),
        "history": run.history,
        "evals": run.evals,
        "wall_s": run.wall_s,
        "nonfinite_steps": run.nonfinite_steps,
        "step_times": step_times,
        "diagnostics": diag.records if diag is not None else [],
        "diag_step": diag.step if diag is not None else 0,
    }


def _save_checkpoint(
    rundir: Path,
    step: int,
    model: Any,
    opt: Any,
    gen: Any,
    stream: Any,
    run: Run,
    step_times: list,
    diag: Any,
    ctx: Any,
) -> None:
    rundir.mkdir(parents=True, exist_ok=True)
    progress = _progress(step, gen, stream, run, step_times, diag)
    if ctx is None:
        payload = {**progress, "model": model.state_dict(), "optim": opt.state_dict()}
        _atomic_write(rundir / CHECKPOINT, lambda p: torch.save(payload, p))
        return
    # DCP writes a folder; a new one per checkpoint, and progress.pt names the complete one, so a
    # process killed while writing leaves the previous checkpoint usable
    ckdir = rundir / DCP_DIR
    ckdir.mkdir(exist_ok=True)
    name = f"dcp-{step}"
    dd.save_dcp(ckdir / name, model, opt)
    if ctx.main:
        progress.update(dcp=name, world_size=ctx.world)
        _atomic_write(ckdir / "progress.pt", lambda p: torch.save(progress, p))
        for old in ckdir.glob("dcp-*"):
            if old.name != name:
                dd.remove_tree(old)
    ctx.barrier()


def _load_checkpoint(
    rundir: Path, model: Any, opt: Any, gen: Any, stream: Any, run: Run, step_times: list, diag: Any, ctx: Any
) -> int:
    plain, dist_dir = rundir / CHECKPOINT, rundir / DCP_DIR
    if ctx is None:
        if not plain.exists():
            if (dist_dir / "progress.pt").exists():
                raise ValueError(f"{rundir}: the checkpoint was written by an --fsdp run; resume it with --fsdp")
            return 0
        ck = _torch_load(plain)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
    else:
        if not (dist_dir / "progress.pt").exists():
            if plain.exists():
                raise ValueError(f"{rundir}: the checkpoint was written without --fsdp; resume it without --fsdp")
            return 0
        ck = _torch_load(dist_dir / "progress.pt")
        dd.load_dcp(dist_dir / ck["dcp"], model, opt)
    if ck.get("spec_id") != run.spec.run_id:
        raise ValueError(f"{rundir}: the checkpoint belongs to another run ({ck.get('spec_id')})")
    gen.set_state(ck["gen"])
    torch.set_rng_state(ck["rng"])
    stream.load_state_dict(ck["stream"])
    run.history, run.evals = list(ck["history"]), list(ck["evals"])
    run.wall_s, run.nonfinite_steps = float(ck["wall_s"]), int(ck["nonfinite_steps"])
    step_times.extend(ck["step_times"])
    if diag is not None:
        diag.records = list(ck["diagnostics"])
        diag.step = int(ck["diag_step"])
    return int(ck["step"])


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # a peer optimizer's state may hold other objects; the file is our own
        return torch.load(path, weights_only=False)


def _remove_checkpoint(rundir: Path) -> None:
    (rundir / CHECKPOINT).unlink(missing_ok=True)
    dd.remove_tree(rundir / DCP_DIR)


def has_checkpoint(rundir: Path) -> bool:
    return (rundir / CHECKPOINT).exists() or (rundir / DCP_DIR / "progress.pt").exists()
