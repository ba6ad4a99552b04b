"""recipes.compare's command line: bad input refused before training, --jobs keeping everything, peers."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the top-level recipes/ package

pytest.importorskip("sklearn")

from recipes import compare  # noqa: E402
from recipes import summary as cross_task  # noqa: E402
from recipes.optimizers import parse_values, resolve_configs  # noqa: E402
from recipes.runner import RunSpec  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["--no-progress", "--diag-every", "0"]


@pytest.fixture(scope="module")
def digits():
    return compare.make_task("digits")


@pytest.fixture
def no_plots(monkeypatch):
    """The figures cost seconds each and are not what these tests check."""
    monkeypatch.setattr(compare, "write_plots", lambda task, runs, outdir: [])


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _refused(argv: list[str], out: Path, capsys) -> str:
    """Run the command, expect the parser to refuse it before --out exists, return the message."""
    with pytest.raises(SystemExit) as exc:
        compare.main([*argv, "--out", str(out), *QUIET])
    assert exc.value.code == 2
    assert not out.exists(), "refused only after --out was created"
    return capsys.readouterr().err


# -- fake peer optimizers: no extra package needed -------------------------------------------------
class KwargsPeer(torch.optim.Optimizer):
    """Takes lr by name and swallows any other keyword (as pytorch_optimizer and heavyball classes do)."""

    def __init__(self, params, lr: float = 1e-2, **kwargs) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


class ModalPeer(KwargsPeer):
    """Steps only in train mode and starts in eval mode, as schedulefree's optimizers do."""

    def __init__(self, params, lr: float = 1e-2) -> None:
        super().__init__(params, lr)
        self.training = False

    def train(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False

    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("not in train mode")
        return super().step(closure)


@pytest.fixture
def fakepeers(monkeypatch):
    mod = types.ModuleType("fakepeers")
    mod.KwargsPeer, mod.ModalPeer = KwargsPeer, ModalPeer
    monkeypatch.setitem(sys.modules, "fakepeers", mod)
    return mod


# -- 1, 2: --jobs ------------------------------------------------------------------------------------
def test_jobs_keep_diagnostics_and_nonliteral_settings(tmp_path, no_plots) -> None:
    # growth_rate=1e999 is inf: its repr is not a Python literal; the runs record gradient diagnostics
    argv = "--task digits --optimizers prodigy,sgd --set prodigy.growth_rate=1e999 --steps 4 --diag-every 2"
    outs = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        runs = compare.main([*argv.split(), "--no-progress", "--jobs", str(jobs), "--out", str(out)])
        assert [r.status for r in runs] == ["ok", "ok"], (jobs, [r.status for r in runs])
        assert runs[0].spec.settings == {"growth_rate": math.inf}
        outs[jobs] = (out, runs)
    (one, runs1), (two, runs2) = outs[1], outs[2]
    assert [r.spec.run_id for r in runs2] == [r.spec.run_id for r in runs1]
    for name in ("summary.csv", "results.csv"):
        assert [r["optimizer"] for r in _rows(two / name)] == ["prodigy", "sgd"]
    assert (two / "diagnostics.csv").read_text() == (one / "diagnostics.csv").read_text()
    assert all(r.diagnostics for r in runs2)
    assert "## Gradient tails" in (two / "results.md").read_text()


def test_run_spec_round_trips_nonfinite_settings() -> None:
    settings = {"growth_rate": math.inf, "d0": -math.inf, "x": math.nan, "b": (0.9, math.inf)}
    spec = RunSpec("digits", "prodigy", settings, {})
    back = RunSpec.from_json(spec.to_json())
    assert back.settings["growth_rate"] == math.inf and back.settings["d0"] == -math.inf
    assert math.isnan(back.settings["x"]) and back.settings["b"] == (0.9, math.inf)
    assert back.run_id == spec.run_id


# -- 3: peers whose __init__ takes **kwargs ---------------------------------------------------------
def test_kwargs_peer_takes_only_its_named_parameters(digits, fakepeers, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match=r"fakepeers.KwargsPeer takes no argument 'lrr'; it takes: lr"):
        resolve_configs(digits, ["fakepeers.KwargsPeer"], ["fakepeers.KwargsPeer.lrr=10"])
    with pytest.raises(ValueError, match="none of the optimizers adamw, fakepeers.KwargsPeer takes 'momentum'"):
        resolve_configs(digits, ["adamw", "fakepeers.KwargsPeer"], ["momentum=0.5"])
    # a key for every optimizer goes only to those that name it
    cs = resolve_configs(digits, ["sgd", "fakepeers.KwargsPeer"], ["momentum=0.5"], task_settings=False)
    assert [c.settings for c in cs] == [{"momentum": 0.5}, {}]
    err = _refused(
        ["--task", "digits", "--optimizers", "fakepeers.KwargsPeer", "--set", "fakepeers.KwargsPeer.lrr=10"],
        tmp_path / "out",
        capsys,
    )
    assert "takes no argument 'lrr'" in err


# -- 4: optimizers with train()/eval() modes -------------------------------------------------------
@pytest.mark.parametrize("name", ["fakepeers.ModalPeer", "schedulefree.SGDScheduleFree"])
def test_peer_with_train_and_eval_modes_is_put_in_train_mode(digits, fakepeers, name: str) -> None:
    run = compare.train_one(digits, name, {}, steps=3, eval_every=2, diag_every=0)
    assert run.status == "ok" and run.steps_done == 3
    assert [e["step"] for e in run.evals] == [2, 3]


# -- 5: --reference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["adamW", "lamb"])
def test_reference_must_be_one_of_the_optimizers(tmp_path, capsys, ref: str) -> None:
    argv = ["--task", "digits", "--optimizers", "adamw,sgd", "--steps", "2", "--reference", ref]
    err = _refused(argv, tmp_path / "out", capsys)
    assert f"--reference {ref}: not one of the run's optimizers (adamw, sgd)" in err


# -- 6: budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget, message",
    [
        ("--epochs 0", "--epochs must be positive, got 0"),
        ("--budget 0epochs", "--budget 0epochs: 0 steps"),
        ("--budget 0.001epochs", "rounds to 0; give at least"),
        ("--epochs 0.001", "--epochs 0.001: 0.015 steps"),
        ("--steps 0", "--steps must be positive, got 0"),
        ("--steps 0 --budget 3", "pass one of --budget, --steps, --epochs, not --budget and --steps"),
    ],
)
def test_budgets_of_no_steps_are_refused(tmp_path, capsys, budget: str, message: str) -> None:
    err = _refused(["--task", "digits", "--optimizers", "sgd", *budget.split()], tmp_path / "out", capsys)
    assert message in err


# -- 7, 8: --sweep values ---------------------------------------------------------------------------
def test_sweep_refuses_a_repeated_key_and_empty_values(digits) -> None:
    with pytest.raises(ValueError, match=r"--sweep lr is given twice"):
        resolve_configs(digits, ["adamw"], sweeps=["lr=1e-2,2e-2", "lr=5e-2"])
    with pytest.raises(ValueError, match=r"--sweep adamw.lr is given twice"):
        resolve_configs(digits, ["adamw"], sweeps=["adamw.lr=1e-2", "adamw.lr=5e-2"])
    for rhs in ("1e-3,,2e-3", "1e-3,", ",1e-3"):
        with pytest.raises(ValueError, match=r"--sweep lr=.*empty value"):
            resolve_configs(digits, ["adamw"], sweeps=[f"lr={rhs}"])
    # one general and one named sweep of a key: the named one wins for its optimizer, as with --set
    cs = resolve_configs(digits, ["adamw", "lamb"], sweeps=["lr=1e-2", "adamw.lr=5e-2"], task_settings=False)
    assert [c.swept for c in cs if not c.base] == [{"lr": 5e-2}, {"lr": 1e-2}]


def test_sweep_list_values_are_tuples(digits) -> None:
    assert parse_values("[0.9,0.95],[0.9,0.99]") == [(0.9, 0.95), (0.9, 0.99)]
    cs = resolve_configs(digits, ["adamw"], sweeps=["betas=[0.9,0.95],[0.9,0.99]"], task_settings=False)
    assert [c.swept for c in cs if not c.base] == [{"betas": (0.9, 0.95)}, {"betas": (0.9, 0.99)}]
    # one list of two learning rates is one (bad) value: refused by name, not a TypeError
    with pytest.raises(ValueError, match=r"adamw\(lr=\(0.001, 0.01\)\) failed"):
        resolve_configs(digits, ["adamw"], sweeps=["lr=[1e-3,1e-2]"])
    with pytest.raises(ValueError, match=r"--sweep lr=\{1: 2\},\{3: 4\}: a dict cannot be a setting"):
        resolve_configs(digits, ["adamw"], sweeps=["lr={1: 2},{3: 4}"])


# -- 9: --device ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["nope", "cuda"])
def test_bad_device_is_refused_before_anything_is_written(tmp_path, capsys, device: str) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    argv = ["--task", "digits", "--optimizers", "sgd", "--steps", "2", "--device", device]
    err = _refused(argv, tmp_path / "out", capsys)
    assert f"--device {device}: not usable here" in err


# -- 10, 11: the summary across folders of one task; the header; LBFGS ------------------------------
def test_summary_keeps_two_folders_of_the_same_task(tmp_path, no_plots) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out, other in ((a, "sgd"), (b, "adam")):
        argv = ["--task", "digits", "--optimizers", f"adamw,{other}", "--steps", "2", "--out", str(out), *QUIET]
        compare.main(argv)
    # a fresh run without --resume resumed nothing, and does not say so
    assert "resumed" not in (a / "results.md").read_text()
    rows, notes = cross_task.cross_rows([a, b])
    assert [r["optimizer"] for r in rows] == ["adamw", "sgd", "adam"]
    cols = [f"digits ({a})", f"digits ({b})"]
    assert all(c in rows[0] for c in cols) and len(notes) == 2
    assert rows[1][cols[1]] == "n/a" and rows[2][cols[0]] == "n/a"
    assert rows[1][cols[0]] != "n/a" and rows[2][cols[1]] != "n/a"


def test_closure_optimizer_is_refused_before_training(digits, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="torch.LBFGS needs a closure"):
        resolve_configs(digits, ["sgd", "torch.LBFGS"])
    err = _refused(["--task", "digits", "--optimizers", "sgd,torch.LBFGS", "--steps", "2"], tmp_path / "out", capsys)
    assert "torch.LBFGS needs a closure" in err


@pytest.mark.parametrize("seed", ["-1", str(2**63)])
def test_a_seed_a_generator_cannot_take_is_refused_before_training(tmp_path, capsys, seed: str) -> None:
    """A seed of 2**63 or more failed only when its run started ("Overflow when unpacking long long")."""
    argv = ["--task", "digits", "--optimizers", "sgd", "--steps", "2", "--seed", seed]
    err = _refused(argv, tmp_path / "out", capsys)
    assert "--seed must be in [0, 2**63 - --seeds]" in err
