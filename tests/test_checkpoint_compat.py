"""Checkpoints written by an earlier gradchain load into this one and resume on the same trajectory.

``data/checkpoints_2026-11-30.pt`` was written by gradchain 0.1.0 at commit 1ad44d2 (2026-11-30)
with ``data/make_checkpoints.py``: per recipe, a small float64 model after 3 steps, the optimizer's
``state_dict()`` then, and the params after 3 more steps of that version. Loaded here, 3 steps on
either path must land on those params (float64: to 1e-12). A change of the state's format must
keep this test passing (convert old checkpoints on load) or say loudly that it does not.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import gradchain as gc

DATA = Path(__file__).with_name("data")
_spec = importlib.util.spec_from_file_location("make_checkpoints", DATA / "make_checkpoints.py")
make = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make)
FIXTURE = torch.load(DATA / "checkpoints_2026-11-30.pt", weights_only=True)["checkpoints"]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_a_checkpoint_of_an_earlier_version_resumes_on_its_trajectory(name: str, fused: bool) -> None:
    entry = FIXTURE[name]
    m = make.model()
    m.load_state_dict(entry["model"])
    opt = gc.ChainOptimizer(m.named_parameters(), make.build(name), fused=fused)
    opt.load_state_dict(entry["optimizer"])
    make.train(m, opt, name, 3)
    for key, want in entry["after"].items():
        got = m.state_dict()[key]
        assert not torch.equal(want, entry["model"][key]) or "running" in key
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"{name}: {key}")


def test_the_fixture_holds_every_recipe_it_was_made_for() -> None:
    assert sorted(FIXTURE) == sorted(make.RECIPES)
