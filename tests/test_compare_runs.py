"""recipes.compare as a benchmark: sweeps, seeds, --defaults, peers, budgets, --out checks, --jobs."""

from __future__ import annotations

import csv
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level recipes/ package

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from recipes import compare  # noqa: E402
from recipes import summary as cross_task  # noqa: E402
from recipes.optimizers import parse_values, resolve_configs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
QUIET = ["--no-progress", "--diag-every", "0"]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _results(out: Path) -> dict[str, dict]:
    """Each run's result.json by run folder name."""
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")}


def test_parse_values() -> None:
    assert parse_values("1e-4,3e-4") == [1e-4, 3e-4]
    assert parse_values("(0.9,0.95),(0.9,0.99)") == [(0.9, 0.95), (0.9, 0.99)]
    assert parse_values("adversarial,paper") == ["adversarial", "paper"]
    assert parse_values("True") == [True]


def test_sweep_configs_and_base() -> None:
    task = compare.make_task("digits")
    cs = resolve_configs(task, ["adamw", "sgd"], sweeps=["adamw.lr=3e-4,1e-3,3e-3"], task_settings=False)
    adamw = [c for c in cs if c.name == "adamw"]
    assert [c.settings for c in adamw] == [{"lr": 3e-4}, {}, {"lr": 3e-3}]
    # the swept value equal to the recipe default is the base setting, and keeps its source
    assert [c.base for c in adamw] == [False, True, False] and adamw[1].swept == {"lr": 1e-3}
    assert adamw[0].sources == {"lr": "--sweep"}
    # with the task's lr (3e-3) as the base, a sweep without it runs the base as well, first
    cs = resolve_configs(task, ["adamw"], sweeps=["lr=1e-2,1e-1"])
    assert [(c.settings, c.base) for c in cs] == [({"lr": 3e-3}, True), ({"lr": 1e-2}, False), ({"lr": 1e-1}, False)]
    # a product over two swept keys
    cs = resolve_configs(task, ["adamw"], sweeps=["lr=1e-3,1e-2", "adamw.weight_decay=0,0.1"], task_settings=False)
    assert len([c for c in cs if not c.base]) == 4 and len(cs) == 5  # 4 + the base (wd 0.01)


def test_sweep_seeds_tuned_table_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = "--task digits --defaults --optimizers adamw,sgd,torch.AdamW --sweep adamw.lr=1e-3,3e-3 --seeds 2 --steps 6"
    runs = compare.main([*argv.split(), "--eval-every", "3", "--out", str(out), *QUIET])
    assert len(runs) == 2 * 4 and not runs.interrupted
    per_run = _rows(out / "results.csv")
    assert sorted({r["seed"] for r in per_run}) == ["0", "1"]
    summary = _rows(out / "summary.csv")
    assert [r["optimizer"].rstrip(" ★") for r in summary] == ["adamw", "adamw", "sgd", "torch.AdamW"]
    # mean ± std over the seeds, from the per-run rows
    a3 = [float(r["val_loss"]) for r in per_run if r["optimizer"] == "adamw" and r["settings"] == "lr=0.003"]
    a1 = [float(r["val_loss"]) for r in per_run if r["optimizer"] == "adamw" and r["settings"] == "(own defaults)"]
    row3 = next(r for r in summary if r["settings"] == "lr=0.003 (swept)")
    mean, std = (float(x) for x in row3["val_loss"].split(" ± "))
    assert mean == pytest.approx(statistics.fmean(a3), rel=1e-3)
    assert std == pytest.approx(statistics.stdev(a3), rel=0.05)
    best = next(r for r in summary if r["optimizer"].endswith("★"))
    assert best["settings"] == ("lr=0.003 (swept)" if statistics.fmean(a3) < statistics.fmean(a1) else "(own defaults)")
    # torch.AdamW at its defaults follows recipes.adamw at its defaults (same seed, weights, data)
    t = [float(r["val_loss"]) for r in per_run if r["optimizer"] == "torch.AdamW"]
    assert t == pytest.approx(a1, rel=1e-5)
    md = (out / "results.md").read_text()
    assert "## Tuned vs untuned" in md
    tuned = md.split("## Tuned vs untuned", 1)[1]
    ref = min(statistics.fmean(a3), statistics.fmean(a1))
    sgd = statistics.fmean(float(r["val_loss"]) for r in per_run if r["optimizer"] == "sgd")
    sgd_row = next(ln for ln in tuned.splitlines() if ln.startswith("| sgd |"))
    assert f"| {sgd / ref:.4g} (per seed" in sgd_row and "| no |" in sgd_row
    assert "(own defaults)" in sgd_row
    for png in ("loss_curves.png", "lr_sensitivity.png"):
        assert (out / png).read_bytes()[:8] == PNG
    printed = capsys.readouterr().out
    assert "## Tuned vs untuned" in printed and "| optimizer | settings | seeds |" in printed
    # the same ratio in the cross-task summary, read back from the run folders
    text = cross_task.main([str(out)])
    assert f"| sgd | {sgd / ref:.3f} ± " in text and "| adamw | " in text


def test_defaults_say_where_settings_come_from(tmp_path) -> None:
    out = tmp_path / "o"
    compare.main(["--task", "charlm", "--optimizers", "adamw", "--steps", "2", "--out", str(out), *QUIET])
    md = (out / "results.md").read_text()
    assert "| adamw | lr=0.003 (task), weight_decay=0.1 (task) |" in md
    assert "lr=0.003 [task]; betas=(0.9, 0.999) [default]; eps=1e-08 [default]; weight_decay=0.1 [task]" in md
    out = tmp_path / "d"
    compare.main(["--task", "charlm", "--defaults", "--optimizers", "adamw", "--steps", "2", "--out", str(out), *QUIET])
    md = (out / "results.md").read_text()
    assert "| adamw | (own defaults) |" in md and "weight_decay=0.01 [default]" in md


def test_wall_time_budget(tmp_path) -> None:
    runs = compare.main(
        "--task digits --optimizers sgd --budget 0.3s --eval-every 1000".split() + ["--out", str(tmp_path), *QUIET]
    )
    r = runs[0]
    assert r.wall_s >= 0.3 and r.steps_done == len(r.history) >= 1
    assert [e["step"] for e in r.evals] == [r.steps_done]  # the final evaluation, at the last step


@pytest.mark.parametrize("peer", ["pytorch_optimizer.Lamb", "heavyball.AdamW"])
def test_installed_peers_run_in_the_same_table(tmp_path, monkeypatch, peer: str) -> None:
    if importlib.util.find_spec(peer.split(".")[0]) is None:
        pytest.skip(f"{peer.split('.')[0]} is not installed (bench extra)")
    if peer.startswith("heavyball"):
        import heavyball.utils

        monkeypatch.setattr(heavyball.utils, "compile_mode", None)  # eager: no minutes of compiling in a test
    runs = compare.main(
        ["--task", "digits", "--optimizers", f"adamw,{peer}", "--steps", "3", "--out", str(tmp_path), *QUIET]
    )
    assert [r.spec.optimizer for r in runs] == ["adamw", peer]
    assert all(r.status == "ok" for r in runs), [r.status for r in runs]
    # same initial weights and first batch: the loss before the first step is the same
    assert runs[1].history[0]["loss"] == runs[0].history[0]["loss"]
    assert runs[1].spec.settings == {"lr": 3e-3}  # the task's setting for its lowercase namesake


def test_out_must_be_a_writable_directory(tmp_path, capsys) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, match in ((f, "exists and is not a directory"), (f / "sub", "cannot write there")):
        with pytest.raises(SystemExit):
            compare.main(["--task", "digits", "--optimizers", "sgd", "--steps", "2", "--out", str(out), *QUIET])
        err = capsys.readouterr().err
        assert match in err and str(out) in err
    assert f.read_text() == "x"


def test_a_failing_run_does_not_stop_the_others(tmp_path, monkeypatch) -> None:
    import gradchain

    def broken(lr: float = 1e-3) -> gradchain.Transform:
        def update(updates, state, hp, ctx):
            raise RuntimeError("broken on purpose")

        return gradchain.chain(gradchain.transform("broken", {}, lambda p: {}, update), gradchain.scale_by_lr(lr))

    monkeypatch.setattr(gradchain.recipes, "broken", broken, raising=False)
    runs = compare.main(
        ["--task", "digits", "--optimizers", "broken,sgd", "--steps", "2", "--out", str(tmp_path), *QUIET]
    )
    assert [r.status for r in runs] == ["failed: RuntimeError: broken on purpose", "ok"]
    assert "broken on purpose" in next((tmp_path / "runs").glob("broken*/error.txt")).read_text()
    assert "failed: RuntimeError" in (tmp_path / "results.md").read_text()


def test_jobs_run_in_parallel_processes_with_the_same_results(tmp_path) -> None:
    argv = ["--task", "digits", "--optimizers", "adamw,sgd,adam", "--steps", "4", "--eval-every", "2", *QUIET]
    two = compare.main([*argv, "--jobs", "2", "--out", str(tmp_path)])
    assert [r.spec.optimizer for r in two] == ["adamw", "sgd", "adam"] and all(r.status == "ok" for r in two)
    task = compare.make_task("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (--threads 1): the same reduction order, the same bits
    try:
        alone_runs = [
            compare.train_one(task, r.spec.optimizer, r.spec.settings, steps=4, eval_every=2, diag_every=0) for r in two
        ]
    finally:
        torch.set_num_threads(threads)
    for r, alone in zip(two, alone_runs):
        assert r.history == alone.history and r.evals == alone.evals
        saved = torch.load(r.rundir / "model.pt", weights_only=True)
        assert all(torch.equal(saved[k], v) for k, v in alone.model.state_dict().items())
    assert len(_rows(tmp_path / "results.csv")) == 3


def test_evaluation_uses_the_weights_to_evaluate() -> None:
    # Lookahead (k=3) syncs at step 6 (fast = slow); at step 7 the fast weights move on, the slow
    # ones (what to evaluate) stay: a 7-step run must evaluate and save the 6-step weights
    task = compare.make_task("digits")
    kw = {"inner": "recipe:adamw", "k": 3, "alpha": 0.5}
    six, seven = (compare.train_one(task, "lookahead", kw, steps=n, eval_every=100, diag_every=0) for n in (6, 7))
    assert six.history == seven.history[:6] and seven.history[6] != seven.history[5]
    assert seven.final["val_loss"] == six.final["val_loss"]
    assert all(torch.equal(a, b) for a, b in zip(six.model.parameters(), seven.model.parameters()))
