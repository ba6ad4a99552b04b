"""Every public transform lets a non-finite gradient show in its update, or refuses it.

A transform that turns a NaN or inf input into a finite update (a ``where(x > 0, ..., 0)`` guard,
a clamp, an ``atan2``) hides it from :func:`gradchain.apply_if_finite`, while the NaN may already
sit in its state: the tensor then stops training, or moves at a constant rate, with no error.

For each public transform and combinator, built as ``tests/test_skipped_steps.py``'s registry
builds it (a public name it cannot build fails the coverage test there), bad steps are put
between good ones: one gradient entry NaN or +-inf (in a matrix, a vector, the 0-d gain), once
with a NaN loss too. Inside ``apply_if_finite`` each bad step must raise, or count as non-finite
and leave every param and state entry as it was; at the end the run equals, bit for bit, a run
that never saw the bad batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import make_model
from test_skipped_steps import NAMES, _factory

import gradchain as gc
from gradchain import ChainOptimizer

# which param gets the bad entry: a matrix, a 1-d norm gain, the 0-d gain
WHERE = {
    "matrix": lambda m: (m.fc1.weight, (0, 0)),
    "vector": lambda m: (m.norm.weight, (1,)),
    "scalar": lambda m: (m.gain, ()),
}
VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, opt, i: int, poison: tuple | None = None, bad_loss: bool = False) -> None:
    g = torch.Generator().manual_seed(70 + i)
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    if poison is not None:
        where, value = poison
        p, idx = WHERE[where](model)
        p.grad[idx] = value
    opt.step(loss=torch.tensor(math.nan) if bad_loss else loss.detach())


def _snapshot(model, opt) -> tuple[list, dict, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state.get(p, {}).items()}
    glob = {k: v.clone() for k, v in opt.global_state.items()}
    return params, state, glob


def _non_finite(model, opt) -> list[str]:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    for st in opt.state.values():
        bad += [k for k, v in st.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    bad += [k for k, v in opt.global_state.items() if not torch.isfinite(v).all()]
    return bad


def _build(name: str) -> gc.Transform:
    # a small constant step after the transform keeps the run finite (some take no lr of their own)
    small = gc.scale(0.01, name="small")
    small.may_follow_final = True  # a probe's scale: allowed after lookahead and schedule-free
    return gc.apply_if_finite(gc.chain(_factory(name)(), small), None, name="guard")


def _counters(state: dict) -> bool:
    # apply_if_finite's own counters (the outer guard's, and the inner one's when it is under test)
    return state.endswith(".notfinite_count") or state.endswith(".total_notfinite")


# (where, value, NaN loss too): loss-aware transforms skip a NaN-loss step, but must not hide the NaN gradient
CASES = [("matrix", "nan", False), ("vector", "inf", False), ("scalar", "-inf", False), ("matrix", "inf", False),
         ("vector", "nan", False), ("matrix", "nan", True)]


def _check(name: str, cases: list[tuple[str, str, bool]]) -> None:
    """Bad steps (one per case) between good ones: each is skipped whole, and the run equals one without them."""
    model, ref = make_model(), make_model()
    opt = ChainOptimizer(model.named_parameters(), _build(name))
    ref_opt = ChainOptimizer(ref.named_parameters(), _build(name))
    for i in range(2):
        _step(model, opt, i)
        _step(ref, ref_opt, i)
    i = 2
    for k, (where, value, bad_loss) in enumerate(cases, 1):
        what = f"{name}, a {value} gradient entry in the {where}" + (" and a NaN loss" if bad_loss else "")
        assert not _non_finite(model, opt), f"{what}: the run was not finite before the bad step"
        params, state, glob = _snapshot(model, opt)
        try:
            _step(model, opt, i, (where, VALUES[value]), bad_loss)
        except (ValueError, RuntimeError):
            return  # refused, with an error
        counted = sum(float(v) for key, v in opt.state[model.fc1.weight].items() if key.endswith(".total_notfinite"))
        assert counted == k, f"{what}: the update stayed finite (apply_if_finite cannot see it)"
        for (n, _), a, p in zip(model.named_parameters(), params, model.parameters()):
            assert torch.equal(a, p), f"{what}: param {n} changed on a skipped step"
        after = _snapshot(model, opt)
        assert state.keys() == after[1].keys(), f"{what}: the set of state entries changed on a skipped step"
        for key, v in state.items():
            assert _counters(key[1]) or torch.equal(v, after[1][key]), f"{what}: state {key[1]} changed"
        for key, v in glob.items():
            assert torch.equal(v, after[2][key]), f"{what}: global state {key} changed"
        _step(model, opt, i + 1)
        _step(ref, ref_opt, i + 1)
        i += 2
    # nothing was poisoned: the run went on exactly as one that never saw the bad batches
    bad = _non_finite(model, opt)
    assert not bad, f"{name}: not finite after the skipped steps: {bad}"
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{name}: param {n} differs from a run without the bad batches"
    got, want = _snapshot(model, opt)[1], _snapshot(ref, ref_opt)[1]
    for key, v in want.items():
        assert _counters(key[1]) or torch.equal(v, got[key]), f"{name}: state {key[1]} differs from a run without them"


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_is_caught(name: str) -> None:
    _check(name, CASES)


@pytest.mark.parametrize("name", ["adam", "nadam", "diffgrad", "am_sgd", "fractional_sgd"])
def test_a_weight_decay_of_zero_adds_no_term_on_the_fused_path(name: str) -> None:
    """With ``weight_decay=0`` torch adds no decay term, so a param element that holds inf or NaN
    leaves the state finite; so does the eager path. The fused path, whose weight decay is a 0-d
    tensor, added ``0 * p``: NaN in the moments (for diffgrad's previous gradient, for good). Both
    paths now keep every state entry of a finite gradient finite, and equal."""
    from gradchain import recipes

    def run(fused: bool):
        w = torch.nn.Parameter(torch.tensor([[math.inf, 1.0, -2.0], [0.5, math.nan, 3.0]], dtype=torch.float64))
        b = torch.nn.Parameter(torch.tensor([-math.inf, 2.0], dtype=torch.float64))
        opt = ChainOptimizer([("w", w), ("b", b)], getattr(recipes, name)(weight_decay=0.0), fused=fused)
        for i in range(3):
            w.grad = torch.full_like(w, 0.1 * (i + 1))
            b.grad = torch.full_like(b, -0.2)
            opt.step()
        return {(n, k): v.clone() for n, p in (("w", w), ("b", b)) for k, v in opt.state[p].items()}

    eager, fused = run(False), run(True)
    for key, v in eager.items():
        assert torch.isfinite(v).all(), f"eager {key}"
        torch.testing.assert_close(fused[key], v, rtol=0, atol=1e-15, msg=f"fused {key}")
