"""Figures of a comparison: loss curves with a band over seeds, sensitivity to swept settings,
gradient tails, and the task's own (the VAE's latent scatter)."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .common import Task
from .results import Group, group_runs
from .runner import Run

MAX_CURVES = 16  # more than this: each optimizer's best (or only) setting


def _ema(values: Sequence[float], decay: float = 0.9) -> list[float]:
    out, e = [], None
    for v in values:  # the EMA only smooths the display; the tables use raw losses
        e = v if e is None or not math.isfinite(e) else decay * e + (1 - decay) * v
        out.append(e)
    return out


def _band(series: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds, on the steps every seed has."""
    n = min(len(xs) for xs, _ in series)
    xs = series[0][0][:n]
    cols = [[ys[i] for _, ys in series if math.isfinite(ys[i])] for i in range(n)]
    nan = float("nan")
    mean = [statistics.fmean(c) if c else nan for c in cols]
    return xs, mean, [min(c) if c else nan for c in cols], [max(c) if c else nan for c in cols]


def shown_groups(groups: Sequence[Group]) -> list[Group]:
    if len(groups) <= MAX_CURVES:
        return list(groups)
    opts = list(dict.fromkeys(g.optimizer for g in groups))
    out = []
    for o in opts:
        gs = [g for g in groups if g.optimizer == o]
        out.append(next((g for g in gs if g.best), next((g for g in gs if g.base), gs[0])))
    return out


def _style(i: int) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors if i < 10 else plt.get_cmap("tab20").colors
    return {"color": colors[i % len(colors)], "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}


def write_plots(task: Task, runs: Sequence[Run], outdir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib is not installed: no plots (pip install -e ".[recipes]")', file=sys.stderr)
        return []
    matplotlib.use("Agg")
    runs = [r for r in runs if r.history]
    if not runs:
        return []
    groups = group_runs(runs, task)
    paths = [loss_curves(task, shown_groups(groups), outdir / "loss_curves.png")]
    p = sensitivity(task, groups, outdir / "lr_sensitivity.png")
    if p is not None:
        paths.append(p)
    p = diagnostics_plot(shown_groups(groups), outdir / "diagnostics.png")
    if p is not None:
        paths.append(p)
    reps = []
    for g in shown_groups(groups):
        r = next((r for r in g.runs if r.finished), None)
        if r is not None and r.load_model(task) is not None:
            final = {k: g.stat(k)[0] for k in r.final}
            reps.append(SimpleNamespace(label=g.label, model=r.model, final=final, spec=r.spec))
    if reps:
        paths += task.plots(reps, outdir)
    return paths


def loss_curves(task: Task, groups: Sequence[Group], path: Path) -> Path:
    import matplotlib.pyplot as plt

    first = groups[0].runs[0].history[0]
    parts = [k for k in first if k not in ("step", "loss")]
    panels = ["loss", task.metrics[0], *parts] + ([task.metrics[1]] if len(task.metrics) > 1 else [])
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False, layout="constrained")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    seeds = max(len(g.runs) for g in groups)
    for ax, key in zip(axes.flat, panels):
        means: list[float] = []
        for i, g in enumerate(groups):
            series = []
            for r in g.runs:
                if key in task.metrics:
                    series.append(([e["step"] for e in r.evals], [e[key] for e in r.evals]))
                else:
                    series.append(([h["step"] for h in r.history], _ema([h[key] for h in r.history])))
            series = [s for s in series if s[0]]
            if not series:
                continue
            xs, mean, lo, hi = _band(series)
            style = _style(i)
            ax.plot(xs, mean, label=g.label, marker="." if key in task.metrics else None, **style)
            means += [m for m in mean if math.isfinite(m)]
            if len(series) > 1:
                ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15 if len(groups) <= 8 else 0.07, lw=0)
        ax.set_title(f"validation {key}" if key in task.metrics else f"train {key} (EMA 0.9)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if "loss" in key and means and min(means) > 0 and max(means) / min(means) > 20:
            ax.set_yscale("log")  # losses spanning decades
    if seeds > 1:
        fig.suptitle(f"mean over {seeds} seeds; band: lowest to highest seed", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) > 8:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, ncol=-(-len(labels) // 18))
    else:
        axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sensitivity(task: Task, groups: Sequence[Group], path: Path) -> Path | None:
    """Final headline metric against each swept value, one line per optimizer swept over it."""
    import matplotlib.pyplot as plt

    headline = task.metrics[0]
    keys = list(dict.fromkeys(k for g in groups for k in g.swept))
    lines: dict[str, dict[str, list[tuple[Any, float, float]]]] = {}
    for key in keys:
        for opt in dict.fromkeys(g.optimizer for g in groups):
            pts = [g for g in groups if g.optimizer == opt and key in g.swept]
            if len({repr(g.swept[key]) for g in pts}) < 2:
                continue
            for g in pts:
                m, s, n = g.stat(headline)
                if n:
                    lines.setdefault(key, {}).setdefault(opt, []).append((g.swept[key], m, 0.0 if n < 2 else s))
    if not lines:
        return None
    fig, axes = plt.subplots(1, len(lines), figsize=(5.2 * len(lines), 3.8), squeeze=False, layout="constrained")
    for ax, (key, per) in zip(axes[0], lines.items()):
        numeric = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for pts in per.values() for v, _, _ in pts
        )
        for i, (opt, pts) in enumerate(per.items()):
            if numeric:
                pts = sorted(pts, key=lambda t: t[0])
            xs = [v if numeric else str(v) for v, _, _ in pts]
            ax.errorbar(
                xs, [m for _, m, _ in pts], yerr=[s for _, _, s in pts], marker="o", capsize=3, label=opt, **_style(i)
            )
        if numeric:
            vals = [v for pts in per.values() for v, _, _ in pts]
            if min(vals) > 0 and max(vals) / min(vals) >= 10:
                from matplotlib.ticker import FixedLocator, NullFormatter

                ax.set_xscale("log")
                ticks = sorted(set(vals))
                ax.xaxis.set_major_locator(FixedLocator(ticks))
                ax.set_xticklabels([f"{v:g}" for v in ticks])
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {headline}")
        ax.set_title(f"sensitivity to {key}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def diagnostics_plot(groups: Sequence[Group], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    shown = [(g, next((r for r in g.runs if r.diagnostics), None)) for g in groups]
    shown = [(g, r) for g, r in shown if r is not None]
    if not shown:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.5), squeeze=False, layout="constrained")
    for i, (g, r) in enumerate(shown):
        whole = [d for d in r.diagnostics if d["tensor"] == "(all)"]
        xs = [d["step"] for d in whole]
        axes[0][0].plot(xs, [d["grad_kurtosis"] for d in whole], label=g.label, **_style(i))
        axes[0][1].plot(xs, [d["grad_top_share"] for d in whole], label=g.label, **_style(i))
    axes[0][0].set_title("gradient excess kurtosis (all params)")
    axes[0][0].set_yscale("symlog")
    axes[0][1].set_title("share of |g| in the top 1% entries")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
