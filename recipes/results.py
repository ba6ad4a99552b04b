"""Tables from runs: mean ± std over seeds per (optimizer, setting), the best setting per optimizer,
tuned vs untuned against a reference optimizer, every setting with its source; CSV and markdown files.

The headline metric is the task's first (validation loss for every task here; lower is better).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradchain.diagnostics import tensorboard_available

from .common import Task
from .optimizers import DEFAULT, TASK, Config, find_optimizer, settings_text
from .runner import Run

# "no more optimizer state than the params": state bytes at most this many times the param bytes
# (the step counters, 4 bytes per tensor, sit on top of one buffer per param)
STATE_LIMIT = 1.01
WITHIN = 0.02  # the tuned-vs-untuned goal: final validation loss at most 2% above the tuned reference


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def pm(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "nan"
    return fmt(mean) if n < 2 or math.isnan(std) else f"{fmt(mean)} ± {std:.2g}"


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan")), len(vals)


@dataclass
class Group:
    """The runs of one optimizer at one setting, over seeds."""

    optimizer: str
    config: str
    runs: list[Run] = field(default_factory=list)
    best: bool = False

    @property
    def spec(self) -> Any:
        return self.runs[0].spec

    @property
    def base(self) -> bool:
        return self.spec.base

    @property
    def swept(self) -> dict[str, Any]:
        return self.spec.swept

    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.finished and r.status == "ok"]

    def stat(self, key: str) -> tuple[float, float, int]:
        return mean_std([r.final.get(key, float("nan")) for r in self.runs if r.finished])

    def by_seed(self, key: str) -> dict[int, float]:
        return {r.spec.seed: r.final.get(key, float("nan")) for r in self.runs if r.finished}

    @property
    def state_ratio(self) -> float:
        r = next((r for r in self.runs if r.param_bytes), None)
        return r.state_bytes / r.param_bytes if r is not None else float("nan")

    @property
    def status(self) -> str:
        bad = [r.status for r in self.runs if r.status != "ok"]
        if not bad:
            return "ok"
        if len(self.runs) == 1:
            return bad[0]
        return f"{len(bad)}/{len(self.runs)} not ok: {bad[0]}"

    @property
    def label(self) -> str:
        """The optimizer, with its swept values when it has several settings."""
        if not self.swept:
            return self.optimizer
        return f"{self.optimizer} " + ", ".join(f"{k}={v}" for k, v in self.swept.items())


def group_runs(runs: Sequence[Run], task: Task) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for r in runs:
        key = (r.spec.optimizer, r.spec.config)
        groups.setdefault(key, Group(*key)).runs.append(r)
    out = list(groups.values())
    headline = task.metrics[0]
    by_opt: dict[str, list[Group]] = {}
    for g in out:
        by_opt.setdefault(g.optimizer, []).append(g)
    for gs in by_opt.values():
        ranked = [g for g in gs if g.stat(headline)[2] and g.status == "ok"]
        if len(gs) > 1 and ranked:
            min(ranked, key=lambda g: g.stat(headline)[0]).best = True
    return out


def best_of(groups: Sequence[Group], optimizer: str, task: Task) -> Group | None:
    gs = [g for g in groups if g.optimizer == optimizer]
    if len(gs) == 1:
        return gs[0] if gs[0].stat(task.metrics[0])[2] else None
    return next((g for g in gs if g.best), None)


def summary_rows(groups: Sequence[Group], task: Task) -> list[dict[str, Any]]:
    rows = []
    seeds = max((len(g.runs) for g in groups), default=1)
    for g in groups:
        row: dict[str, Any] = {"optimizer": g.optimizer + (" ★" if g.best else ""), "settings": g.config}
        if seeds > 1:
            row["seeds"] = len(g.ok())
        for key in ("train_loss", *task.metrics):
            row[key] = pm(*g.stat(key))
        wall = mean_std([r.wall_s for r in g.runs if r.finished])[0]
        row["wall_s"] = round(wall, 2) if not math.isnan(wall) else float("nan")
        row["state/params"] = round(g.state_ratio, 3) if not math.isnan(g.state_ratio) else float("nan")
        row["nonfinite_steps"] = sum(r.nonfinite_steps for r in g.runs)
        row["status"] = g.status
        rows.append(row)
    return rows


@dataclass
class Untuned:
    """One optimizer at its base setting against the tuned reference."""

    optimizer: str
    config: str
    mean: float
    std: float
    n: int
    ratio: float  # mean over seeds / the reference's mean
    seed_ratio: tuple[float, float, int]  # the same ratio seed by seed: mean, std, count
    state_ratio: float
    status: str
    best_ratio: float | None = None  # its best swept setting, when it was swept
    best_config: str = ""

    @property
    def within(self) -> bool:
        return self.ratio <= 1 + WITHIN


def untuned(groups: Sequence[Group], task: Task, reference: str) -> tuple[list[Untuned], Group] | None:
    """Each optimizer at its base setting (its defaults under ``--defaults``) against the best
    setting of ``reference``, by the headline metric; None without runs of ``reference``."""
    headline = task.metrics[0]
    ref = best_of(groups, reference, task)
    if ref is None:
        return None
    ref_mean = ref.stat(headline)[0]
    ref_seed = ref.by_seed(headline)
    out = []
    for opt in dict.fromkeys(g.optimizer for g in groups):
        base = next((g for g in groups if g.optimizer == opt and g.base), None)
        if base is None:
            continue
        mean, std, n = base.stat(headline)
        paired = [v / ref_seed[s] for s, v in base.by_seed(headline).items() if s in ref_seed and ref_seed[s] > 0]
        u = Untuned(
            opt,
            base.config,
            mean,
            std,
            n,
            mean / ref_mean if ref_mean > 0 else float("nan"),
            mean_std(paired),
            base.state_ratio,
            base.status,
        )
        best = best_of(groups, opt, task)
        if best is not None and best is not base:
            u.best_ratio, u.best_config = best.stat(headline)[0] / ref_mean, best.config
        out.append(u)
    return out, ref


def tuned_rows(groups: Sequence[Group], task: Task, reference: str) -> tuple[list[dict[str, Any]], str] | None:
    """The tuned-vs-untuned table's rows, and a line naming the reference setting."""
    found = untuned(groups, task, reference)
    if found is None:
        return None
    headline = task.metrics[0]
    rows = []
    for u in found[0]:
        pr_mean, pr_std, pr_n = u.seed_ratio
        rows.append(
            {
                "optimizer": u.optimizer,
                "untuned settings": u.config,
                headline: pm(u.mean, u.std, u.n),
                f"/ tuned {reference}": fmt(u.ratio)
                + (f" (per seed {pr_mean:.3f} ± {pr_std:.2g})" if pr_n > 1 else ""),
                f"within {WITHIN:.0%}": "yes" if u.within else "no",
                "state/params": round(u.state_ratio, 3) if not math.isnan(u.state_ratio) else float("nan"),
                "best tuned": f"{fmt(u.best_ratio)} at {u.best_config}" if u.best_ratio is not None else "",
                "status": u.status,
            }
        )
    ref = found[1]
    return rows, f"{reference} tuned: {ref.config}, {headline} {pm(*ref.stat(headline))}"


def settings_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per setting: every argument with its value and where it came from."""
    rows = []
    seen = set()
    for g in groups:
        if (g.optimizer, g.config) in seen:
            continue
        seen.add((g.optimizer, g.config))
        try:
            ref = find_optimizer(g.optimizer)
        except ValueError:
            continue
        c = Config(ref, g.spec.settings, g.spec.sources)
        tag = {DEFAULT: "default", TASK: "task"}
        parts = [f"{k}={v!r} [{tag.get(src, src.lstrip('-'))}]" for k, v, src in c.all_settings()]
        rows.append({"optimizer": g.optimizer, "settings": "; ".join(parts) or "(none)"})
    return rows


def run_rows(runs: Sequence[Run], task: Task) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "optimizer": r.spec.optimizer,
            "settings": settings_text(r.spec.settings),
            "sources": ", ".join(f"{k}:{v}" for k, v in r.spec.sources.items()),
            "seed": r.spec.seed,
            "train_loss": r.final.get("train_loss", float("nan")),
        }
        row.update({m: r.final.get(m, float("nan")) for m in task.metrics})
        row.update(
            {
                "steps": r.steps_done,
                "wall_s": round(r.wall_s, 2),
                "step_ms": round(r.step_ms, 3) if not math.isnan(r.step_ms) else float("nan"),
                "state_bytes": r.state_bytes,
                "param_bytes": r.param_bytes,
                "nonfinite_steps": r.nonfinite_steps,
                "status": r.status,
                "run": r.spec.run_id,
            }
        )
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def diagnostics_summary(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """Per optimizer (its best or only setting, first seed), the last recorded step's gradient tails."""
    rows = []
    for g in groups:
        if len([h for h in groups if h.optimizer == g.optimizer]) > 1 and not g.best:
            continue
        r = next((r for r in g.runs if r.diagnostics), None)
        if r is None:
            continue
        last = r.diagnostics[-1]["step"]
        recs = [d for d in r.diagnostics if d["step"] == last]
        whole = next(d for d in recs if d["tensor"] == "(all)")
        per = [d for d in recs if d["tensor"] != "(all)"]
        kurt = [d["grad_kurtosis"] for d in per if not math.isnan(d["grad_kurtosis"])]
        worst = max(per, key=lambda d: d["grad_kurtosis"] if not math.isnan(d["grad_kurtosis"]) else -math.inf)
        rows.append(
            {
                "optimizer": g.label,
                "step": last,
                "grad_norm": whole["grad_norm"],
                "grad_kurtosis (all)": whole["grad_kurtosis"],
                "grad_top1%_share (all)": whole["grad_top_share"],
                "median tensor kurtosis": statistics.median(kurt) if kurt else float("nan"),
                "max tensor kurtosis": f"{worst['grad_kurtosis']:.1f} ({worst['tensor']})",
                "update/param ratio": whole.get("update_ratio", float("nan")),
            }
        )
    return rows


def write_results(
    task: Task, runs: Sequence[Run], outdir: Path, header: dict[str, str], reference: str = "adamw"
) -> str:
    """results.md, summary.csv (per setting), results.csv (per run), history.csv, diagnostics.csv;
    returns the summary table (markdown)."""
    groups = group_runs(runs, task)
    summary = summary_rows(groups, task)
    table = markdown_table(summary)
    _write_csv(outdir / "summary.csv", summary)
    _write_csv(outdir / "results.csv", run_rows(runs, task))
    hist = []
    for r in runs:
        base = {"optimizer": r.spec.optimizer, "settings": settings_text(r.spec.settings), "seed": r.spec.seed}
        hist += [{**base, "kind": "train", **h} for h in r.history]
        hist += [{**base, "kind": "eval", **h} for h in r.evals]
    _write_csv(outdir / "history.csv", hist)
    diag = [
        {"optimizer": r.spec.optimizer, "settings": settings_text(r.spec.settings), "seed": r.spec.seed, **d}
        for r in runs
        for d in r.diagnostics
    ]
    _write_csv(outdir / "diagnostics.csv", diag)
    headline = task.metrics[0]
    seeds = max((len(g.runs) for g in groups), default=1)
    md = [f"# {task.name}: optimizer comparison", ""]
    md += [f"- {k}: {v}" for k, v in header.items()]
    md += [
        "",
        (f"Mean ± sample std over {seeds} seeds (same seeds for every setting). " if seeds > 1 else "")
        + f"train_loss: mean training loss over the last 10% of steps; the other metrics on the validation "
        f"set after the last step. ★: the best setting of an optimizer by {headline}. Settings: (task) is "
        "the task's setting, (--set) the command line's, (swept) a --sweep value; others are the recipe's "
        "own defaults (all of them, with sources, at the end). state/params: optimizer state bytes over "
        "parameter bytes. nonfinite_steps: steps with a non-finite loss or gradient.",
        "",
        table,
        "",
    ]
    tuned = tuned_rows(groups, task, reference)
    # "tuned" needs a sweep of the reference
    if tuned is not None and len([g for g in groups if g.optimizer == reference]) > 1:
        rows, note = tuned
        md += [
            f"## Tuned vs untuned: each optimizer at its base setting against the best {reference}",
            "",
            f"Reference: {note}. Ratio: mean {headline} over seeds divided by the reference's (per seed: the "
            f"mean and std of the same ratio taken seed by seed). within {WITHIN:.0%}: ratio <= {1 + WITHIN}. "
            "The base setting is the one before any --sweep: the recipe's own defaults under --defaults. "
            f"best tuned: the best swept setting's ratio. No run uses warmup.",
            "",
            markdown_table(rows),
            "",
        ]
    diag_rows = diagnostics_summary(groups)
    if diag_rows:
        md += [
            "## Gradient tails (gradchain.diagnostics, last recorded step)",
            "",
            "kurtosis is excess kurtosis (0 for a Gaussian); top1% share is the share of sum |g| held by "
            "the largest 1% of entries. Per-step, per-tensor values: diagnostics.csv"
            + (" and TensorBoard (runs/*/tb)." if tensorboard_available() else "."),
            "",
            markdown_table(diag_rows),
            "",
        ]
    md += [
        "## Every setting and where it came from",
        "",
        "[default]: the recipe's (or class's) own default; [task]: the task's setting; [set]: --set; [sweep]: --sweep.",
        "",
        markdown_table(settings_rows(groups)),
        "",
        "Per run (every seed): results.csv; per step: history.csv; each run's files: runs/<run id>/.",
        "",
    ]
    tmp = outdir / "results.md.tmp"
    tmp.write_text("\n".join(md))
    tmp.replace(outdir / "results.md")
    return table
