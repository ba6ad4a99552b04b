"""Compare gradchain optimizer recipes on one training task, same seed, same data order.

    python -m recipes.compare --task vae --optimizers adamw,sgd,adalo --set adalo.kappa=3 --set lr=1e-3

Each name in ``--optimizers`` is a recipe in :mod:`gradchain.recipes`, looked up at run time, so
every recipe the library has can be compared. For each one the task's model is built from the same
seed (the same initial weights) and trained on the same batches (and the same sampling noise);
``opt.step(loss=loss)`` always gets the loss, so loss-aware recipes work.

Settings: a recipe runs with the task's settings for it (``Task.optimizer_defaults``, e.g. SGD's
learning rate and momentum) or else its own defaults, then ``--set key=value`` (every recipe whose
signature takes ``key``) and ``--set name.key=value`` (that recipe only) override them. Values are
Python literals (``--set adamw.betas="(0.9,0.95)"``, ``--set sgd.nesterov=True``); anything else
is passed as a string.

Writes to ``--out`` (default ``runs/<task>/``): ``results.md`` and ``results.csv`` (the table also
printed to the terminal), ``history.csv`` (per-step training loss and evaluations),
``loss_curves.png``, task plots (``latent.png`` for the VAE), ``diagnostics.csv`` and
``diagnostics.png`` (the long-tail gradient statistics of :mod:`gradchain.diagnostics`), and, when
TensorBoard is installed, event files under ``tb/<optimizer>/``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import inspect
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradchain
from gradchain import ChainOptimizer, Transform
from gradchain.diagnostics import GradientDiagnostics, state_bytes, tensorboard_available

from .common import Task

TASKS = ("digits", "vae", "charlm")
DEFAULT_TASK = "vae"
# the README's main job; names missing from gradchain.recipes are left out of the default
DEFAULT_OPTIMIZERS = ("adamw", "sgd", "adalo", "adam_atan2", "lamb")


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


# -- optimizers and their settings --------------------------------------------------------------
def available_recipes() -> list[str]:
    return sorted(getattr(gradchain.recipes, "__all__", []))


def find_recipe(name: str) -> Callable[..., Any]:
    factory = getattr(gradchain.recipes, name, None)
    if name.startswith("_") or not callable(factory):
        raise ValueError(f"unknown optimizer recipe {name!r}; gradchain.recipes has: {', '.join(available_recipes())}")
    return factory


def build_recipe(name: str, settings: dict[str, Any]) -> Transform:
    """``gradchain.recipes.<name>(**settings)``, with an error that names the recipe when it fails."""
    factory = find_recipe(name)
    try:
        t = factory(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gradchain.recipes.{name}({_settings_text(settings)}) failed: {e}") from e
    if not isinstance(t, Transform):
        raise ValueError(f"gradchain.recipes.{name} is not an optimizer recipe: it returned {type(t).__name__}")
    return t


def takes(factory: Callable[..., Any], key: str) -> bool:
    params = inspect.signature(factory).parameters
    if key in params:
        return params[key].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _recipe_values(task: Task, kw: dict[str, Any]) -> dict[str, Any]:
    """Setting values ``"recipe:NAME"`` become ``gradchain.recipes.NAME`` with the task's settings for it
    (for wrappers: ``--set lookahead.inner=recipe:sgd``)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, str) and v.startswith("recipe:"):
            inner = v.removeprefix("recipe:")
            f = find_recipe(inner)
            v = build_recipe(inner, {a: b for a, b in task.optimizer_defaults.get(inner, {}).items() if takes(f, a)})
        out[k] = v
    return out


def parse_sets(sets: Sequence[str], names: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``--set`` items -> (settings for every recipe, settings per recipe name)."""
    common: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for item in sets:
        lhs, eq, rhs = item.partition("=")
        if not eq or not lhs.strip():
            raise ValueError(f"--set {item!r}: expected key=value or optimizer.key=value")
        lhs = lhs.strip()
        if "." in lhs:
            name, _, key = lhs.partition(".")
            if name not in per:
                raise ValueError(f"--set {item!r}: {name!r} is not one of --optimizers ({', '.join(names)})")
            per[name][key] = parse_value(rhs.strip())
        else:
            common[lhs] = parse_value(rhs.strip())
    return common, per


def resolve_settings(task: Task, names: Sequence[str], sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The keyword arguments each recipe is called with; errors name a setting no recipe takes."""
    factories = {n: find_recipe(n) for n in names}
    common, per = parse_sets(sets, names)
    for key in common:
        if not any(takes(f, key) for f in factories.values()):
            raise ValueError(f"--set {key}=...: none of the recipes {', '.join(names)} takes {key!r}")
    out = {}
    for n, f in factories.items():
        kw = {k: v for k, v in task.optimizer_defaults.get(n, {}).items() if takes(f, k)}
        kw.update({k: v for k, v in common.items() if takes(f, k)})
        for k, v in per[n].items():
            if not takes(f, k):
                raise ValueError(f"--set {n}.{k}=...: gradchain.recipes.{n} takes no argument {k!r}")
            kw[k] = v
        build_recipe(n, _recipe_values(task, kw))  # fail before any training, not after the first runs
        out[n] = kw
    return out


# -- one run ------------------------------------------------------------------------------------
@dataclass
class Run:
    label: str
    settings: dict[str, Any]
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    step_ms: float = float("nan")
    state_bytes: int = 0
    nonfinite_steps: int = 0
    diverged_at: int | None = None
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def status(self) -> str:
        return "ok" if self.diverged_at is None else f"diverged at step {self.diverged_at}"


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the recipes extra
        return None
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled, leave=True)


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
    progress: bool = True,
) -> Run:
    """Train ``task``'s model with ``gradchain.recipes.<name>(**settings)``; the same seed gives the same data."""
    torch.manual_seed(seed)
    model = task.model()
    opt = ChainOptimizer(model.named_parameters(), build_recipe(name, _recipe_values(task, settings)))
    gen = torch.Generator().manual_seed(seed)
    eval_every = eval_every or task.eval_every
    diag = None
    if diag_every > 0:
        diag = GradientDiagnostics(opt, every=diag_every, log_dir=tb_dir, updates=True)
    run = Run(label=name, settings=dict(settings), steps=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    step_times: list[float] = []
    bar = _progress(steps, f"{task.name}/{name}", progress)
    t0 = time.perf_counter()
    batches = task.batches(gen)
    try:
        for step in range(1, steps + 1):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss, parts = task.loss(model, next(batches), gen)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            finite = torch.isfinite(loss) & torch.stack(torch._foreach_norm(grads)).isfinite().all()
            ts = time.perf_counter()
            opt.step(loss=loss.detach())
            if diag is None or step % diag_every:
                step_times.append(time.perf_counter() - ts)
            row = {"step": step, "loss": loss.item(), **{k: v.item() for k, v in parts.items()}}
            run.history.append(row)
            writer = diag.writer if diag is not None else None
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}", v, step)
            if not bool(finite):
                run.nonfinite_steps += 1
            if not bool(torch.stack(torch._foreach_norm(params)).isfinite().all()):
                run.diverged_at = step
                break
            if step % eval_every == 0 or step == steps:
                model.eval()
                run.evals.append({"step": step, **task.evaluate(model)})
                if writer is not None:
                    for k, v in run.evals[-1].items():
                        if k != "step":
                            writer.add_scalar(f"eval/{k}", v, step)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        if diag is not None:
            diag.close()
    run.wall_s = time.perf_counter() - t0
    run.step_ms = 1e3 * statistics.median(step_times) if step_times else float("nan")
    run.state_bytes = state_bytes(opt)
    tail = max(1, len(run.history) // 10)
    losses = [r["loss"] for r in run.history[-tail:]]
    run.final = {"train_loss": sum(losses) / len(losses)}
    if run.diverged_at is None:
        run.final.update({k: v for k, v in run.evals[-1].items() if k != "step"})
    else:
        run.final.update({k: float("nan") for k in task.metrics})
    run.diagnostics = diag.records if diag is not None else []
    run.model = model
    return run


# -- results ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _settings_text(s: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items()) or "(recipe defaults)"


def results_rows(task: Task, runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        row: dict[str, Any] = {"optimizer": r.label, "settings": _settings_text(r.settings)}
        row["train_loss"] = r.final["train_loss"]
        row.update({m: r.final.get(m, float("nan")) for m in task.metrics})
        row.update(
            {
                "wall_s": round(r.wall_s, 2),
                "step_ms": round(r.step_ms, 3),
                "state_bytes": r.state_bytes,
                "nonfinite_steps": r.nonfinite_steps,
                "status": r.status,
            }
        )
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def diagnostics_summary(runs: list[Run]) -> list[dict[str, Any]]:
    """Per run, the last recorded step: whole-model gradient statistics and the median over tensors."""
    rows = []
    for r in runs:
        if not r.diagnostics:
            continue
        last = r.diagnostics[-1]["step"]
        recs = [d for d in r.diagnostics if d["step"] == last]
        whole = next(d for d in recs if d["tensor"] == "(all)")
        per = [d for d in recs if d["tensor"] != "(all)"]
        med = lambda k: statistics.median(d[k] for d in per if not math.isnan(d[k]))  # noqa: B023
        worst = max(per, key=lambda d: d["grad_kurtosis"] if not math.isnan(d["grad_kurtosis"]) else -math.inf)
        rows.append(
            {
                "optimizer": r.label,
                "step": last,
                "grad_norm": whole["grad_norm"],
                "grad_kurtosis (all)": whole["grad_kurtosis"],
                "grad_top1%_share (all)": whole["grad_top_share"],
                "median tensor kurtosis": med("grad_kurtosis"),
                "max tensor kurtosis": f"{worst['grad_kurtosis']:.1f} ({worst['tensor']})",
                "update/param ratio": whole.get("update_ratio", float("nan")),
            }
        )
    return rows


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


def write_results(task: Task, runs: list[Run], outdir: Path, header: dict[str, str]) -> str:
    rows = results_rows(task, runs)
    table = markdown_table(rows)
    with open(outdir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(outdir / "history.csv", "w", newline="") as f:
        keys: list[str] = ["optimizer", "kind"]
        for r in runs:
            for h in r.history + r.evals:
                keys.extend(k for k in h if k not in keys)
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in runs:
            w.writerows({"optimizer": r.label, "kind": "train", **h} for h in r.history)
            w.writerows({"optimizer": r.label, "kind": "eval", **h} for h in r.evals)
    diag_rows = [{"optimizer": r.label, **d} for r in runs for d in r.diagnostics]
    if diag_rows:
        with open(outdir / "diagnostics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(diag_rows[0]))
            w.writeheader()
            w.writerows(diag_rows)
    md = [f"# {task.name}: optimizer comparison", ""]
    md += [f"- {k}: {v}" for k, v in header.items()]
    md += [
        "",
        "train_loss: mean training loss over the last 10% of steps; the other metrics are on the "
        "validation set after the last step. state_bytes: the optimizer's state tensors; "
        "step_ms: median time of `opt.step` (steps without diagnostics); nonfinite_steps: steps "
        "with a non-finite loss or gradient.",
        "",
        table,
        "",
    ]
    summary = diagnostics_summary(runs)
    if summary:
        md += [
            "## Gradient tails (gradchain.diagnostics, last recorded step)",
            "",
            "kurtosis is excess kurtosis (0 for a Gaussian); top1% share is the share of sum |g| held by "
            "the largest 1% of entries. Per-step, per-tensor values: diagnostics.csv"
            + (" and TensorBoard (tb/)." if tensorboard_available() else "."),
            "",
            markdown_table(summary),
            "",
        ]
    (outdir / "results.md").write_text("\n".join(md))
    return table


def write_plots(task: Task, runs: list[Run], outdir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no plots (pip install -e ".[recipes]")', file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [k for k in (runs[0].history[0] if runs[0].history else {}) if k not in ("step", "loss")]
    panels = ["loss", task.metrics[0]] + parts + ([task.metrics[1]] if len(task.metrics) > 1 else [])
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, panels):
        for r in runs:
            if key in task.metrics:
                xs = [e["step"] for e in r.evals]
                ys = [e[key] for e in r.evals]
                ax.plot(xs, ys, marker=".", label=r.label)
                ax.set_title(f"validation {key}")
            else:
                xs = [h["step"] for h in r.history]
                ys, ema = [], None
                for h in r.history:  # EMA only smooths the display; the table uses raw losses
                    ema = h[key] if ema is None or not math.isfinite(ema) else 0.9 * ema + 0.1 * h[key]
                    ys.append(ema)
                ax.plot(xs, ys, label=r.label)
                ax.set_title(f"train {key} (EMA 0.9)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    paths = [outdir / "loss_curves.png"]
    fig.savefig(paths[0], dpi=90)
    plt.close(fig)
    if any(r.diagnostics for r in runs):
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4), squeeze=False)
        for r in runs:
            whole = [d for d in r.diagnostics if d["tensor"] == "(all)"]
            xs = [d["step"] for d in whole]
            axes[0][0].plot(xs, [d["grad_kurtosis"] for d in whole], label=r.label)
            axes[0][1].plot(xs, [d["grad_top_share"] for d in whole], label=r.label)
        axes[0][0].set_title("gradient excess kurtosis (all params)")
        axes[0][0].set_yscale("symlog")
        axes[0][1].set_title("share of |g| in the top 1% entries")
        for ax in axes[0]:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(outdir / "diagnostics.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    paths += task.plots(runs, outdir)
    return paths


# -- command line -------------------------------------------------------------------------------
def _command_text(task: str, argv: list[str]) -> str:
    if not any(a == "--task" or a.startswith("--task=") for a in argv):
        argv = ["--task", task, *argv]
    return "python -m recipes.compare " + " ".join(shlex.quote(a) for a in argv)


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipes.compare",
        description="Compare gradchain optimizer recipes on one task (same seed, same data order).",
    )
    p.add_argument("--task", choices=TASKS, default=task or DEFAULT_TASK, help=f"default: {task or DEFAULT_TASK}")
    default = ",".join(n for n in DEFAULT_OPTIMIZERS if n in available_recipes())
    p.add_argument(
        "--optimizers",
        default=default,
        help=f"comma-separated names from gradchain.recipes (default: {default}; --list shows all)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[OPT.]KEY=VALUE",
        help="override a recipe argument for every recipe that takes it, or for OPT only; repeatable",
    )
    p.add_argument("--steps", type=int, help="training steps per run (default: the task's)")
    p.add_argument("--epochs", type=float, help="training epochs per run (digits and vae); overrides the default steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the task's)")
    p.add_argument("--diag-every", type=int, default=10, help="gradient diagnostics every N steps (0: off)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<task>)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the models are tiny, and one thread does not stall on a busy "
        "machine; 0: torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the recipes in gradchain.recipes and exit")
    return p


def main(argv: Sequence[str] | None = None, task: str | None = None) -> list[Run]:
    parser = build_parser(task)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.list:
        for n in available_recipes():
            try:
                build_recipe(n, {})
                print(n)
            except ValueError as e:
                print(f"{n}  ({e})")
        return []
    if args.eval_every is not None and args.eval_every < 1:
        parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.diag_every < 0:
        parser.error(f"--diag-every must be >= 0, got {args.diag_every}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _compare(args, parser)
    finally:
        torch.set_num_threads(threads)


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Run]:
    argv = args.argv
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if not names:
        parser.error("--optimizers is empty")
    if len(set(names)) != len(names):
        parser.error(f"--optimizers names a recipe twice: {args.optimizers}")
    t = make_task(args.task)
    try:
        settings = resolve_settings(t, names, args.set)
    except ValueError as e:
        parser.error(str(e))
    if args.steps is not None and args.epochs is not None:
        parser.error("pass --steps or --epochs, not both")
    steps = t.default_steps
    if args.epochs is not None:
        spe = t.steps_per_epoch()
        if spe is None:
            parser.error(f"task {t.name} has no epochs; use --steps")
        steps = max(1, round(args.epochs * spe))
    if args.steps is not None:
        steps = args.steps
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    outdir = args.out or Path("runs") / t.name
    outdir.mkdir(parents=True, exist_ok=True)
    tb = tensorboard_available() and args.diag_every > 0
    runs = []
    t_all = time.perf_counter()
    for n in names:
        runs.append(
            train_one(
                t,
                n,
                settings[n],
                steps=steps,
                seed=args.seed,
                eval_every=args.eval_every,
                diag_every=args.diag_every,
                tb_dir=outdir / "tb" / n if tb else None,
                progress=not args.no_progress,
            )
        )
    total = time.perf_counter() - t_all
    header = {
        "command": _command_text(t.name, argv),
        "steps per run": str(steps) + (f" ({steps / t.steps_per_epoch():.3g} epochs)" if t.steps_per_epoch() else ""),
        "seed": str(args.seed),
        "data": getattr(t, "source", "scikit-learn digits (1437 train / 360 val)"),
        "machine": machine_text(),
        "total time": f"{total:.1f} s",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    table = write_results(t, runs, outdir, header)
    plots = write_plots(t, runs, outdir)
    print(f"\n{t.name}: {steps} steps per run, seed {args.seed}, {total:.1f} s in all\n")
    print(table)
    print(f"\nwrote {outdir / 'results.md'}, {outdir / 'results.csv'}" + "".join(f", {p}" for p in plots))
    if tb:
        print(f"TensorBoard: tensorboard --logdir {outdir / 'tb'}")
    return runs


if __name__ == "__main__":
    main()
