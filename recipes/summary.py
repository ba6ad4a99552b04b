"""Tuned vs untuned across tasks, from the output folders of finished comparisons.

    python -m recipes.summary runs/digits runs/vae runs/charlm [--reference adamw] [--out summary.md]

For each optimizer: its base setting's final validation loss (its own defaults when the runs
used ``--defaults``) over the best setting of the reference (a swept AdamW), per task, with the
seed-by-seed spread; whether it is within 2% on every task; its optimizer state over its params.
Each folder contributes the runs its last command listed (its ``results.csv``).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from pathlib import Path

from .results import STATE_LIMIT, WITHIN, Untuned, group_runs, markdown_table, untuned
from .runner import Run, read_run


def load_out(path: Path) -> tuple[str, list[Run]]:
    """(task name, the runs of the folder's last comparison)."""
    table = path / "results.csv"
    if not table.exists():
        raise ValueError(f"{path}: no results.csv (not the --out folder of a finished comparison)")
    with open(table) as f:
        ids = [row["run"] for row in csv.DictReader(f)]
    runs = [r for r in (read_run(path / "runs" / i, diagnostics=False) for i in ids) if r is not None]
    if not runs:
        raise ValueError(f"{path}: none of the runs in results.csv has a result.json")
    return runs[0].spec.task, runs


def cross_rows(outs: Sequence[Path], reference: str = "adamw") -> tuple[list[dict[str, str]], list[str]]:
    from .compare import make_task

    per_task: dict[str, dict[str, Untuned]] = {}
    notes = []
    loaded = [(out, *load_out(out)) for out in outs]
    names = [name for _, name, _ in loaded]
    for out, name, runs in loaded:
        task = make_task(name)
        # two folders of one task (say two budgets) are two columns, told apart by their folder
        label = name if names.count(name) == 1 else f"{name} ({out})"
        if label in per_task:
            raise ValueError(f"{out} is given twice: name each folder once")
        found = untuned(group_runs(runs, task), task, reference)
        if found is None:
            raise ValueError(f"{out}: no runs of the reference {reference!r}")
        rows, ref = found
        per_task[label] = {u.optimizer: u for u in rows}
        seeds = len(ref.runs)
        notes.append(f"{label}: {reference} tuned at {ref.config}, {seeds} seeds")
    tasks = list(per_task)
    optimizers = list(dict.fromkeys(o for t in tasks for o in per_task[t]))
    out_rows = []
    for o in optimizers:
        row = {"optimizer": o}
        ok_all, state = True, math.nan
        for t in tasks:
            u = per_task[t].get(o)
            if u is None or math.isnan(u.ratio):
                row[t] = "n/a" if u is None else u.status
                ok_all = False
                continue
            pm, ps, pn = u.seed_ratio
            row[t] = f"{u.ratio:.3f}" + (f" ± {ps:.2g}" if pn > 1 and not math.isnan(ps) else "")
            ok_all &= u.within and u.status == "ok"
            state = u.state_ratio if math.isnan(state) else max(state, u.state_ratio)
        row[f"within {WITHIN:.0%} on all"] = "yes" if ok_all else "no"
        row["state/params"] = f"{state:.2f}" if not math.isnan(state) else "n/a"
        row["state <= params"] = "yes" if state <= STATE_LIMIT else "no"
        out_rows.append(row)
    return out_rows, notes


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m recipes.summary", description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+", type=Path, help="--out folders of finished comparisons, one per task")
    p.add_argument("--reference", default="adamw")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    try:
        rows, notes = cross_rows(args.outs, args.reference)
    except ValueError as e:
        p.error(str(e))
    text = "\n".join(
        [
            f"Final validation loss at the optimizer's base setting over the best-tuned {args.reference} "
            f"(mean over seeds; ± the seed-by-seed spread of the same ratio). Tuned: " + "; ".join(notes) + ".",
            "",
            markdown_table(rows),
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
