"""The training recipes in recipes/: each task for a few steps, and the compare command end to end."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level recipes/ package

pytest.importorskip("sklearn")  # the digits tasks' data; in the test extra
pytest.importorskip("matplotlib")

import gradchain  # noqa: E402
from gradchain import Chain, chain, scale_by_lr, transform  # noqa: E402
from recipes import compare  # noqa: E402
from recipes.charlm import CharLMTask, stdlib_text  # noqa: E402
from recipes.digits import DigitsTask  # noqa: E402
from recipes.optimizers import resolve_configs  # noqa: E402
from recipes.vae import VAETask  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tasks() -> dict:
    return {"digits": DigitsTask(), "vae": VAETask(), "charlm": CharLMTask()}


@pytest.mark.parametrize("name", ["digits", "vae", "charlm"])
def test_task_trains_a_few_steps(tasks, name: str) -> None:
    task = tasks[name]
    a = compare.train_one(task, "adamw", {"lr": 1e-3}, steps=4, eval_every=2, diag_every=2)
    assert [h["step"] for h in a.history] == [1, 2, 3, 4]
    assert [e["step"] for e in a.evals] == [2, 4]
    assert set(task.metrics) <= set(a.final) and all(math.isfinite(v) for v in a.final.values())
    assert a.status == "ok" and a.nonfinite_steps == 0
    assert a.state_bytes == sum(8 * p.numel() + 4 for p in a.model.parameters())  # m, v fp32 + step
    assert {d["step"] for d in a.diagnostics} == {2, 4}
    # the same seed: the same initial weights and batches, so the first loss (before any step) agrees
    # across optimizers, and a rerun is identical
    b = compare.train_one(task, "sgd", {"lr": 0.01}, steps=2, diag_every=0)
    assert b.history[0]["loss"] == a.history[0]["loss"]
    assert b.history[1]["loss"] != a.history[1]["loss"]
    c = compare.train_one(task, "adamw", {"lr": 1e-3}, steps=4, eval_every=2, diag_every=0)
    assert c.history == a.history and c.evals == a.evals
    if name == "vae":
        assert {"recon", "kl"} <= set(a.history[0]) and a.history[0]["kl"] >= 0
    if name == "digits":
        assert 0.0 <= a.final["val_acc"] <= 1.0
    if name == "charlm":
        assert a.final["val_bpc"] == pytest.approx(a.final["val_loss"] / math.log(2))


def test_stdlib_text_is_deterministic_and_split_by_file() -> None:
    tr1, va1, files1 = stdlib_text(50_000, 5_000)
    tr2, va2, files2 = stdlib_text(50_000, 5_000)
    assert torch.equal(tr1, tr2) and torch.equal(va1, va2) and files1 == files2
    assert files1 == sorted(files1) and len(va1) == 5_000 and len(tr1) == 50_000
    assert int(tr1.max()) < 256 and tr1.dtype == torch.long


def _settings(task, names, sets=(), sweeps=(), task_settings=True) -> dict:
    configs = resolve_configs(task, names, sets, sweeps, task_settings=task_settings)
    return {c.name: (c.settings, c.sources) for c in configs}


def test_settings_resolution_and_sources(tasks) -> None:
    task = tasks["digits"]
    s = _settings(task, ["adamw", "sgd"], ["lr=0.02", "sgd.nesterov=True", "adamw.betas=(0.9, 0.95)"])
    assert s["adamw"] == ({"lr": 0.02, "betas": (0.9, 0.95)}, {"lr": "--set", "betas": "--set"})
    # the task's momentum stays, and says it is the task's
    assert s["sgd"] == (
        {"lr": 0.02, "momentum": 0.9, "nesterov": True},
        {"lr": "--set", "momentum": "task", "nesterov": "--set"},
    )
    # a setting for one optimizer beats one for all, whatever the order on the command line
    assert _settings(task, ["adamw"], ["adamw.lr=0.1", "lr=0.2"])["adamw"][0] == {"lr": 0.1}
    # a common setting only goes to the optimizers that take it
    assert _settings(task, ["adamw", "sgd"], ["dampening=0.1"])["adamw"] == ({"lr": 3e-3}, {"lr": "task"})
    # --defaults: no task settings at all
    assert _settings(task, ["adamw", "sgd"], task_settings=False) == {"adamw": ({}, {}), "sgd": ({}, {})}
    charlm = _settings(tasks["charlm"], ["adamw"])["adamw"]
    assert charlm == ({"lr": 3e-3, "weight_decay": 0.1}, {"lr": "task", "weight_decay": "task"})
    for bad, match in [
        (["nosuchkey=1"], "none of the optimizers"),
        (["adamw.momentum=0.9"], "takes no argument 'momentum'"),
        (["lamb_x.lr=1"], "not one of --optimizers"),
        (["lr"], "expected key=value"),
        (["adamw.lr=-1"], "lr"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_configs(task, ["adamw", "sgd"], bad)
    with pytest.raises(ValueError, match="unknown optimizer recipe 'nosuch'.*adamw"):
        resolve_configs(task, ["nosuch"])
    with pytest.raises(ValueError, match="unknown optimizer recipe 'muon_hidden_matrix'"):
        resolve_configs(task, ["muon_hidden_matrix"])  # a routing predicate, not an optimizer


def _loss_probe(lr: float = 0.01) -> Chain:
    """A loss-aware recipe for the test: records the loss each step gets, then plain SGD."""

    def update(updates, state, hp, ctx):
        assert ctx.loss is not None, "compare must pass the loss to opt.step"
        SEEN.append(ctx.loss.item())
        return updates

    return chain(transform("probe", {}, lambda p: {}, update), scale_by_lr(lr))


SEEN: list[float] = []


def test_compare_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gradchain.recipes, "loss_probe", _loss_probe, raising=False)
    SEEN.clear()
    out = tmp_path / "digits"
    runs = compare.main(
        "--task digits --optimizers adamw,sgd,loss_probe --steps 5 --eval-every 2 --diag-every 2 "
        "--set adamw.lr=1e-3 --set weight_decay=0 --no-progress".split()
        + ["--out", str(out)]
    )
    # the loss-aware recipe saw exactly the training losses
    probe = runs[2]
    assert SEEN == [h["loss"] for h in probe.history]
    assert probe.settings == {} and probe.state_bytes == 8 * 4  # no buffers: one step counter per param
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["optimizer"] for r in rows] == ["adamw", "sgd", "loss_probe"]
    assert rows[0]["settings"] == "lr=0.001, weight_decay=0"
    assert rows[1]["settings"] == "lr=0.05, momentum=0.9, weight_decay=0"
    assert {"train_loss", "val_loss", "val_acc", "wall_s", "state_bytes", "nonfinite_steps", "status"} <= set(rows[0])
    assert int(rows[0]["state_bytes"]) == 2 * int(rows[1]["state_bytes"]) - 4 * 8  # m, v vs one momentum buffer
    md = (out / "results.md").read_text()
    assert "| adamw | lr=0.001 (--set), weight_decay=0 (--set) |" in md and "Gradient tails" in md
    assert "| sgd | lr=0.05 (task), momentum=0.9 (task), weight_decay=0 (--set) |" in md
    # every setting with its source, recipe defaults included
    assert "betas=(0.9, 0.999) [default]; eps=1e-08 [default]; weight_decay=0 [set]" in md
    for png in ["loss_curves.png", "diagnostics.png"]:
        assert (out / png).read_bytes()[:8] == PNG
    with open(out / "diagnostics.csv") as f:
        diag = list(csv.DictReader(f))
    assert {r["step"] for r in diag} == {"2", "4"} and {r["optimizer"] for r in diag} == {"adamw", "sgd", "loss_probe"}
    printed = capsys.readouterr().out
    assert "| optimizer | settings | train_loss" in printed and "results.md" in printed


def test_compare_vae_plots_latents(tmp_path) -> None:
    argv = "--task vae --optimizers sgd --steps 3 --diag-every 0 --no-progress".split()
    runs = compare.main([*argv, "--out", str(tmp_path)])
    assert (tmp_path / "latent.png").read_bytes()[:8] == PNG
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == PNG
    assert not (tmp_path / "diagnostics.csv").exists()
    assert runs[0].final["val_kl"] >= 0 and 0 <= runs[0].final["latent_knn_acc"] <= 1


def test_divergence_is_reported(tasks) -> None:
    run = compare.train_one(tasks["digits"], "sgd", {"lr": 1e30}, steps=20, diag_every=0)
    assert run.diverged_at is not None and run.diverged_at <= 20
    assert run.status.startswith("diverged at step")
    assert len(run.history) == run.diverged_at
    assert all(math.isnan(run.final[m]) for m in tasks["digits"].metrics)


def test_command_line_errors(capsys) -> None:
    for argv in (
        "--optimizers adamw,adamw",
        "--optimizers nosuch",
        "--steps 3 --epochs 1",
        "--task charlm --epochs 1",
        "--threads -1",
        "--eval-every 0",
        "--diag-every -1",
        "--set nosuchkey=1",
        "--seeds 0",
        "--jobs 0",
        "--budget 3x",
        "--budget 3 --steps 3",
        "--budget 0",
        "--fsdp --jobs 2",
        "--optimizers torch.NoSuchOptimizer",
        "--optimizers nosuchpackage.Adam",
        "--defaults --optimizers lookahead",
        "--sweep adamw.lr=",
    ):
        with pytest.raises(SystemExit):
            compare.main(argv.split())
        assert "error:" in capsys.readouterr().err, argv
    assert "sgd" in compare.available_recipes() and "adamw" in compare.available_recipes()
    assert compare.main(["--list"]) == []
    listed = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
    assert "adamw" in listed and "sgd" in listed and "torch.AdamW" in listed and "torch.Adafactor" in listed
    # optimizers only: no routing predicate, and the wrapper is listed with what it needs
    assert not any("muon_hidden_matrix" in ln for ln in listed)
    assert "lookahead  (wraps a recipe: --set lookahead.inner=recipe:adamw)" in listed


def _wrapper(inner: gradchain.Transform, factor: float = 1.0) -> gradchain.Transform:
    """A stand-in for a wrapping recipe (like lookahead): takes another recipe as ``inner``."""
    assert isinstance(inner, gradchain.Transform)
    return inner


def test_recipe_valued_settings(tasks, monkeypatch) -> None:
    monkeypatch.setattr(gradchain.recipes, "wrapper_probe", _wrapper, raising=False)
    task = tasks["digits"]
    s = _settings(task, ["wrapper_probe"], ["wrapper_probe.inner=recipe:sgd"])
    assert s["wrapper_probe"][0] == {"inner": "recipe:sgd"}
    run = compare.train_one(task, "wrapper_probe", s["wrapper_probe"][0], steps=2, diag_every=0)
    plain = compare.train_one(task, "sgd", {"lr": 0.05, "momentum": 0.9}, steps=2, diag_every=0)
    assert run.history == plain.history  # the inner sgd got the task's settings for sgd
    with pytest.raises(ValueError, match="wrapper_probe needs inner"):
        resolve_configs(task, ["wrapper_probe"])
