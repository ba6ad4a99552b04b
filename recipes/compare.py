"""Compare optimizers on one training task: same seeds, same initial weights, same data, same budget.

    python -m recipes.compare --task vae --optimizers adamw,sgd,adalo,adam_atan2,lamb
    python -m recipes.compare --task digits --defaults --sweep adamw.lr=3e-4,1e-3,3e-3,1e-2 --seeds 5
    python -m recipes.compare --task vae --optimizers adamw,torch.AdamW,pytorch_optimizer.Lamb
    torchrun --nproc_per_node 2 -m recipes.compare --task charlm --fsdp --optimizers adamw

Optimizers: recipes of :mod:`gradchain.recipes` by name (``all``: every one), ``torch.NAME`` for
``torch.optim.NAME``, ``module.NAME`` for another package's optimizer class (``heavyball.AdamW``).
Settings and where they come from (recipe default, task, ``--set``, ``--sweep``): see
:mod:`recipes.optimizers`. Every (optimizer, setting, seed) is one run (:mod:`recipes.runner`);
runs are independent and ``--jobs N`` runs N at once (:mod:`recipes.parallel`).

Writes to ``--out`` (default ``runs/<task>/``), after every run: ``results.md`` (the tables),
``summary.csv`` (one row per setting), ``results.csv`` (one row per run), ``history.csv`` (every
step's loss and every evaluation), ``diagnostics.csv``; at the end the figures ``loss_curves.png``,
``lr_sensitivity.png`` (with ``--sweep``), ``diagnostics.png`` and the task's (``latent.png``).
Each run keeps its own folder under ``runs/``; ``--resume`` skips finished runs and continues
stopped or killed ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradchain.diagnostics import tensorboard_available

from .common import Task
from .optimizers import (
    SET,
    available_recipes,
    build_recipe,
    find_optimizer,
    find_recipe,
    optimizer_recipes,
    peer_listing,
    resolve_configs,
)
from .parallel import run_all
from .plots import write_plots
from .results import write_results
from .runner import RESULT, Run, RunSpec, has_checkpoint, read_run, train_run

__all__ = ["available_recipes", "build_recipe", "find_recipe", "main", "make_task", "train_one"]

TASKS = ("digits", "vae", "charlm")
DEFAULT_TASK = "vae"
# the README's main job; names missing from gradchain.recipes are left out of the default
DEFAULT_OPTIMIZERS = ("adamw", "sgd", "adalo", "adam_atan2", "lamb")
DEFAULT_REFERENCE = "adamw"


def make_task(name: str) -> Task:
    if name == "digits":
        from .digits import DigitsTask

        return DigitsTask()
    if name == "vae":
        from .vae import VAETask

        return VAETask()
    if name == "charlm":
        from .charlm import CharLMTask

        return CharLMTask()
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def train_one(
    task: Task,
    name: str,
    settings: dict[str, Any],
    *,
    steps: int,
    seed: int = 0,
    eval_every: int | None = None,
    diag_every: int = 10,
    tb_dir: Path | None = None,
) -> Run:
    """One run in memory (no files): ``name`` with exactly ``settings``, the task's data and seed."""
    spec = RunSpec(
        task.name,
        name,
        dict(settings),
        {k: SET for k in settings},
        seed=seed,
        steps=steps,
        eval_every=eval_every or task.eval_every,
        diag_every=diag_every,
    )
    return train_run(task, spec, tb_dir=tb_dir)


# -- budget -----------------------------------------------------------------------------------------
@dataclass
class Budget:
    steps: int | None = None
    seconds: float | None = None

    def text(self, task: Task) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s of wall time per run"
        spe = task.steps_per_epoch()
        return f"{self.steps} steps" + (f" ({self.steps / spe:.3g} epochs)" if spe else "")


def parse_budget(text: str, task: Task, shown: str | None = None) -> Budget:
    """``600`` or ``600steps``: steps; ``20epochs``; ``90s``; ``2min``. Errors name the flag as
    ``shown`` (default ``--budget <text>``)."""
    shown = shown or f"--budget {text}"
    t = text.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+)(steps?)?", t)
    if m:
        return Budget(steps=int(m.group(1)))
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)(epochs?)", t)
    if m:
        spe = task.steps_per_epoch()
        if spe is None:
            raise ValueError(f"{shown}: task {task.name} has no epochs; give steps or seconds")
        steps = round(float(m.group(1)) * spe)
        if steps < 1:
            raise ValueError(
                f"{shown}: {float(m.group(1)) * spe:.3g} steps ({spe} steps per epoch on {task.name}) "
                f"rounds to 0; give at least {1 / spe:.2g} epochs"
            )
        return Budget(steps=steps)
    m = re.fullmatch(r"(\d+(?:\.\d*)?)(s|sec|seconds?|min|minutes?)", t)
    if m:
        v = float(m.group(1)) * (60.0 if m.group(2).startswith("min") else 1.0)
        return Budget(seconds=v)
    raise ValueError(f"--budget {text!r}: expected steps (600), epochs (20epochs) or wall time (90s, 2min)")


# -- command line ---------------------------------------------------------------------------------
def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.compare",
        description="Compare optimizers on one task: same seeds, initial weights, data and budget.",
    )
    p.add_argument("--task", choices=TASKS, default=task or DEFAULT_TASK, help=f"default: {task or DEFAULT_TASK}")
    p.add_argument(
        "--optimizers",
        help="comma-separated: gradchain recipes (all: every one), torch.NAME (torch.optim), module.NAME "
        f"(e.g. pytorch_optimizer.Lamb); default: {','.join(DEFAULT_OPTIMIZERS)}, or all with --defaults",
    )
    p.add_argument(
        "--defaults",
        action="store_true",
        help="every optimizer at its own defaults (no task settings): what 'untuned' means",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[OPT.]KEY=VALUE",
        help="a setting for every optimizer that takes KEY, or for OPT only; repeatable",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="[OPT.]KEY=V1,V2,...",
        help="one run per value (the product over several --sweep), e.g. --sweep adamw.lr=3e-4,1e-3,3e-3",
    )
    p.add_argument("--seeds", type=int, default=1, help="seeds per setting: --seed, --seed+1, ... (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--budget", help="per run: steps (600), epochs (20epochs) or wall time (90s, 2min)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the task's)")
    p.add_argument("--epochs", type=float, help="training epochs per run (digits and vae)")
    p.add_argument(
        "--reference", help=f"the tuned reference of the tuned-vs-untuned table (default: {DEFAULT_REFERENCE})"
    )
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the task's)")
    p.add_argument("--diag-every", type=int, default=10, help="gradient diagnostics every N steps (0: off)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<task>)")
    p.add_argument("--resume", action="store_true", help="skip finished runs in --out, continue stopped ones")
    p.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps (0: only on stop)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: the models are tiny, and one thread does not stall on a "
        "busy machine; 0: torch's default)",
    )
    p.add_argument("--device", default=None, help="cpu (default) or cuda; --fsdp picks one GPU per process")
    p.add_argument("--fsdp", action="store_true", help="shard each run over the processes of torchrun (FSDP2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the optimizers that can be named, and exit")
    return p


class RunList(list):
    """The runs of one invocation; ``interrupted`` when Ctrl-C (or SIGTERM) stopped it early."""

    interrupted: bool = False


def print_list() -> None:
    print("gradchain recipes (--optimizers NAME; all: every one):")
    for n in optimizer_recipes():
        ref = find_optimizer(n)
        need = ref.required()
        print(f"  {n}" + (f"  (wraps a recipe: --set {n}.{need[0]}=recipe:adamw)" if need else ""))
    for prefix, names in peer_listing().items():
        if isinstance(names, str):
            print(f"{prefix}: {names}")
        else:
            print(f"{prefix} (--optimizers {prefix}.NAME):")
            for n in names:
                print(f"  {n}")


def main(argv: Sequence[str] | None = None, task: str | None = None) -> RunList:
    parser = build_parser(task)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.list:
        print_list()
        return RunList()
    for flag, value, low in (
        ("--eval-every", args.eval_every, 1),
        ("--diag-every", args.diag_every, 0),
        ("--threads", args.threads, 0),
        ("--seeds", args.seeds, 1),
        ("--jobs", args.jobs, 1),
        ("--checkpoint-every", args.checkpoint_every, 0),
    ):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not (0 <= args.seed and args.seed + args.seeds <= 2**63):
        # a torch generator takes a 64-bit seed: a larger one failed when its run started
        parser.error(f"--seed must be in [0, 2**63 - --seeds], got {args.seed}")
    if args.fsdp and args.jobs > 1:
        parser.error("--fsdp runs one run at a time over all processes: leave --jobs at 1")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = None
    try:
        if args.fsdp:
            from .distributed import init_distributed

            ctx = init_distributed()
        return _compare(args, parser, ctx)
    finally:
        if ctx is not None:
            ctx.close()
        torch.set_num_threads(threads)


def check_out(outdir: Path) -> None:
    """Fail before any training when ``outdir`` cannot hold the results."""
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"--out {outdir}: exists and is not a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {outdir}: cannot write there ({e.strerror or e})") from e


def _names(args: argparse.Namespace, t: Task, parser: argparse.ArgumentParser) -> list[str]:
    text = args.optimizers or ("all" if args.defaults else ",".join(DEFAULT_OPTIMIZERS))
    names: list[str] = []
    for n in (s.strip() for s in text.split(",")):
        if not n:
            continue
        if n == "all":
            for r in optimizer_recipes():
                ref = find_optimizer(r)
                have = set() if args.defaults else set(t.optimizer_defaults.get(r, {}))
                have |= {item.partition("=")[0].strip().removeprefix(f"{r}.") for item in args.set}
                if any(k not in have for k in ref.required()):
                    print(f"(all: leaving out {r}, which wraps a recipe: name it with --set {r}.inner=recipe:NAME)")
                    continue
                if r not in names:
                    names.append(r)
        elif n in names:
            parser.error(f"--optimizers names {n!r} twice: {text}")
        else:
            names.append(n)
    if not names:
        parser.error("--optimizers is empty")
    if args.optimizers is None and not args.defaults:
        names = [n for n in names if n in available_recipes()]
    return names


def _budget(args: argparse.Namespace, t: Task, parser: argparse.ArgumentParser) -> Budget:
    # "is not None": --steps 0 is a budget given (and refused below), not one left out
    flags = (("--budget", args.budget), ("--steps", args.steps), ("--epochs", args.epochs))
    given = [(f, v) for f, v in flags if v is not None]
    if len(given) > 1:
        parser.error(f"pass one of --budget, --steps, --epochs, not {' and '.join(f for f, _ in given)}")
    flag, value = given[0] if given else ("--steps", t.default_steps)
    if flag != "--budget" and value <= 0:
        parser.error(f"{flag} must be positive, got {value:g}")
    try:
        if flag == "--budget":
            b = parse_budget(value, t)
        elif flag == "--epochs":
            b = parse_budget(f"{value:g}epochs", t, shown=f"--epochs {value:g}")
        else:
            b = Budget(steps=value)
    except ValueError as e:
        parser.error(str(e))
    if (b.steps is not None and b.steps < 1) or (b.seconds is not None and b.seconds <= 0):
        parser.error(f"{flag} must be positive, got {value}")
    return b


def _device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device | None:
    """``--device`` as a device this torch can put a tensor on; None when not given."""
    if args.device is None or args.fsdp:  # --fsdp picks each process's device itself
        return None
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:
        cuda = "built with CUDA" if torch.backends.cuda.is_built() else "a CPU-only build"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        parser.error(f"--device {args.device}: not usable here ({msg}); this torch is {cuda}; try --device cpu")
    return device


def _reference(args: argparse.Namespace, names: list[str], parser: argparse.ArgumentParser) -> str:
    # the default reference may be absent (no tuned table then); one the user names must be in the run
    if args.reference is None:
        return DEFAULT_REFERENCE
    if args.reference not in names:
        parser.error(f"--reference {args.reference}: not one of the run's optimizers ({', '.join(names)})")
    return args.reference


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser, ctx: Any) -> RunList:
    main_proc = ctx is None or ctx.main
    t = make_task(args.task)
    if args.fsdp and not t.supports_fsdp:
        parser.error(f"--fsdp: task {t.name} cannot split its batches over processes (charlm can)")
    names = _names(args, t, parser)
    try:
        configs = resolve_configs(t, names, args.set, args.sweep, task_settings=not args.defaults)
    except ValueError as e:
        parser.error(str(e))
    budget = _budget(args, t, parser)
    reference = _reference(args, names, parser)
    device = _device(args, parser)
    outdir = args.out or Path("runs") / t.name
    if main_proc:
        try:
            check_out(outdir)
        except ValueError as e:
            parser.error(str(e))
    if device is not None and ctx is None:
        t.to(device)
    elif ctx is not None:
        t.to(ctx.device)
    diag_every = 0 if args.fsdp else args.diag_every
    seeds = list(range(args.seed, args.seed + args.seeds))
    specs = [
        RunSpec(
            t.name,
            c.name,
            c.settings,
            c.sources,
            seed=s,
            steps=budget.steps,
            seconds=budget.seconds,
            eval_every=args.eval_every or t.eval_every,
            diag_every=diag_every,
            task_settings=not args.defaults,
            fsdp=args.fsdp,
            swept=c.swept,
            base=c.base,
        )
        for s in seeds
        for c in configs
    ]
    rundir_of = lambda spec: outdir / "runs" / spec.run_id
    done: dict[str, Run] = {}
    if args.resume:
        for spec in specs:
            r = read_run(rundir_of(spec))
            if r is not None and r.finished:
                # the same run (same id); its place in this command (swept values, base, sources) is this command's
                r.spec = spec
                done[spec.run_id] = r
    elif main_proc:
        old = sum((rundir_of(s) / RESULT).exists() or has_checkpoint(rundir_of(s)) for s in specs)
        if old:
            print(
                f"({old} of these runs already have results or a checkpoint in {outdir}; they run again. "
                "--resume would keep them.)"
            )
    todo = [s for s in specs if s.run_id not in done]
    header = {
        "command": _command_text(t.name, args.argv),
        "budget per run": budget.text(t),
        "seeds": ", ".join(map(str, seeds)),
        "data": t.source or t.name,
        "machine": machine_text() + (f"; --fsdp over {ctx.world} processes ({ctx.device.type})" if ctx else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    tb = tensorboard_available() and diag_every > 0
    t_all = time.perf_counter()

    def finished_runs() -> RunList:
        return RunList(done[s.run_id] for s in specs if s.run_id in done)

    def on_result(run: Run) -> None:
        done[run.spec.run_id] = run
        if main_proc:
            write_results(
                t,
                finished_runs(),
                outdir,
                {**header, "time": f"{time.perf_counter() - t_all:.1f} s"},
                reference=reference,
            )

    if done and main_proc:
        print(f"--resume: {len(done)} of {len(specs)} runs already finished in {outdir}")
    options = {"checkpoint_every": args.checkpoint_every, "resume": args.resume or bool(done)}
    if ctx is not None:
        options["ctx"] = ctx
    elif device is not None:
        options["device"] = device
    complete = True
    if todo:
        complete = run_all(
            todo,
            rundir_of,
            lambda name: t,
            jobs=args.jobs,
            threads=args.threads,
            progress=main_proc and not args.no_progress,
            options={**options, "tensorboard": tb},
            on_result=on_result,
            desc=f"{t.name}: {len(todo)} runs",
        )
    total = time.perf_counter() - t_all
    runs = finished_runs()
    runs.interrupted = not complete
    if not main_proc:
        return runs
    header["time"] = f"{total:.1f} s"
    if args.resume:
        header["time"] += f" ({len(todo)} runs now, {len(specs) - len(todo)} resumed)"
    if len(runs) > 1:
        header["time"] += f"; the runs' own wall time: {sum(r.wall_s for r in runs):.0f} s in all"
    if not runs:
        print("\nno run finished" + ("; --resume continues from the checkpoints" if not complete else ""))
        return runs
    table = write_results(t, runs, outdir, header, reference=reference)
    if device is not None or ctx is not None:
        t.to(torch.device("cpu"))  # the figures use the saved models, on the CPU
        for r in runs:
            r.model = None
    try:
        plots = write_plots(t, runs, outdir)
    except Exception as e:  # the tables are written; a figure must not end the command with a traceback
        print(f"could not draw the figures: {type(e).__name__}: {e}", file=sys.stderr)
        plots = []
    print(f"\n{t.name}: {budget.text(t)} per run, seeds {header['seeds']}, {total:.1f} s in all\n")
    print(table)
    tuned = (outdir / "results.md").read_text().split("## Tuned vs untuned", 1)
    if len(tuned) > 1:
        print("\n## Tuned vs untuned" + tuned[1].split("\n## ", 1)[0].rstrip())
    if not complete:
        print(
            f"\nstopped: {len(runs)} of {len(specs)} runs finished; the rest continue with --resume "
            "(the same command plus --resume)"
        )
    print(
        f"\nwrote {outdir / 'results.md'}, {outdir / 'summary.csv'}, {outdir / 'results.csv'}"
        + "".join(f", {p}" for p in plots)
    )
    return runs


def machine_text() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def _command_text(task: str, argv: list[str]) -> str:
    if not any(a == "--task" or a.startswith("--task=") for a in argv):
        argv = ["--task", task, *argv]
    return "python -m recipes.compare " + " ".join(shlex.quote(a) for a in argv)


def cli(task: str | None = None) -> None:
    """The command line: exit status 130 when Ctrl-C (or SIGTERM) stopped the comparison."""
    runs = main(task=task)
    if runs.interrupted:
        sys.exit(130)


if __name__ == "__main__":
    cli()
