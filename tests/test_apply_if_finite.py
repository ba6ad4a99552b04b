"""apply_if_finite(): a non-finite update changes nothing; failures are counted; too many raise."""

from __future__ import annotations

import pytest
import torch
from harness import RecipeCase, check_recipe, make_model

import gradchain as gc
from gradchain import ChainOptimizer, recipes


def _data(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(900 + i)
    x = torch.randn(8, 2, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(8, 3, generator=g, dtype=torch.float64)


def _step(model, opt, i: int, poison: bool = False, **kw) -> None:
    opt.zero_grad()
    x, y = _data(i)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    if poison:
        model.fc2.weight.grad[1, 2] = float("nan")
    if isinstance(opt, ChainOptimizer):
        opt.step(loss=loss.detach(), **kw)
    else:
        opt.step()


def _snapshot(model, opt) -> tuple[list, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {(id(p), k): v.clone() for p, st in opt.state.items() for k, v in st.items()}
    return params, state


def _assert_unchanged(model, opt, snap, ignore: tuple = ("apply_if_finite.",)) -> None:
    params, state = snap
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b), "a skipped step changed a param"
    now = {(id(p), k): v for p, st in opt.state.items() for k, v in st.items()}
    assert now.keys() == state.keys()
    for key, v in state.items():
        if not key[1].startswith(ignore):
            assert torch.equal(now[key], v), f"a skipped step changed state {key[1]}"


def _factories() -> dict:
    out = {
        "adamw": lambda: recipes.adamw(lr=1e-2),
        "sgd_nesterov": lambda: recipes.sgd(lr=0.05, momentum=0.9, nesterov=True),
    }
    if hasattr(recipes, "adalo"):
        out["adalo"] = lambda: recipes.adalo(kappa=0.5)
    return out


@pytest.mark.parametrize("name", sorted(_factories()))
def test_non_finite_step_changes_nothing(name: str) -> None:
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.apply_if_finite(_factories()[name](), 3))
    for i in range(3):
        _step(model, opt, i)
    snap = _snapshot(model, opt)
    glob = {k: v.clone() for k, v in getattr(opt, "global_state", {}).items()}
    _step(model, opt, 3, poison=True)
    _assert_unchanged(model, opt, snap)
    for k, v in glob.items():
        assert torch.equal(opt.global_state[k], v), f"a skipped step changed global state {k}"
    st = opt.state[model.fc1.weight]
    assert float(st["step"]) == 3.0
    assert float(st["apply_if_finite.notfinite_count"]) == 1.0
    assert float(st["apply_if_finite.total_notfinite"]) == 1.0


def test_skipped_steps_equal_not_stepping_and_counters() -> None:
    """A run with poisoned steps equals a run that never took them, bit for bit."""
    poisoned = {2, 5, 6}
    m1, m2 = make_model(), make_model()
    o1 = ChainOptimizer(m1.named_parameters(), gc.apply_if_finite(recipes.adamw(lr=1e-2), 2))
    o2 = ChainOptimizer(m2.named_parameters(), gc.apply_if_finite(recipes.adamw(lr=1e-2), 2))
    counts = []
    for i in range(10):
        _step(m1, o1, i, poison=i in poisoned)
        if i not in poisoned:
            _step(m2, o2, i)
        counts.append(float(o1.state[m1.head.weight]["apply_if_finite.notfinite_count"]))
    assert counts == [0, 0, 1, 0, 0, 1, 2, 0, 0, 0]
    assert float(o1.state[m1.head.weight]["apply_if_finite.total_notfinite"]) == 3.0
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_finite_path_matches_torch_adamw() -> None:
    m1, m2 = make_model(), make_model()
    o1 = ChainOptimizer(m1.named_parameters(), gc.apply_if_finite(recipes.adamw(lr=1e-2, weight_decay=0.1)))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, weight_decay=0.1)
    for i in range(15):
        _step(m1, o1, i)
        _step(m2, o2, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_raises_after_too_many_in_a_row_and_keeps_the_last_finite_state() -> None:
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.apply_if_finite(recipes.adamw(lr=1e-2), 2))
    _step(model, opt, 0)
    snap = _snapshot(model, opt)
    _step(model, opt, 1, poison=True)
    _step(model, opt, 2, poison=True)
    with pytest.raises(RuntimeError, match="3 consecutive"):
        _step(model, opt, 3, poison=True)
    _assert_unchanged(model, opt, snap)
    _step(model, opt, 4)  # a finite step recovers
    assert float(opt.state[model.fc1.weight]["apply_if_finite.notfinite_count"]) == 0.0
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        gc.apply_if_finite(recipes.adamw(), -1)
    never = gc.apply_if_finite(gc.scale_by_lr(0.1), None)
    p = torch.zeros(2)
    st = never.init([p])
    for _ in range(20):
        assert torch.equal(never.update([torch.full((2,), float("inf"))], st, [p])[0], torch.zeros(2))
    assert float(st[0]["apply_if_finite.total_notfinite"]) == 20.0 and float(st[0]["step"]) == 0.0


def test_inside_accumulate_skips_the_real_step() -> None:
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.accumulate(gc.apply_if_finite(recipes.adamw(lr=1e-2)), 2))
    for i in range(2):
        _step(model, opt, i)
    snap = _snapshot(model, opt)
    _step(model, opt, 2, poison=True)
    _step(model, opt, 3)  # the real step of a cycle holding a NaN micro-batch is skipped
    _assert_unchanged(model, opt, snap, ignore=("accumulate.", "apply_if_finite.", "step"))
    st = opt.state[model.fc1.weight]
    assert float(st["accumulate.step"]) == 1.0 and float(st["step"]) == 4.0
    assert float(st["accumulate.weight"]) == 0.0  # the cycle is over either way


def test_outside_accumulate_drops_the_bad_micro_batch() -> None:
    m1, m2 = make_model(), make_model()
    o1 = ChainOptimizer(m1.named_parameters(), gc.apply_if_finite(gc.accumulate(recipes.adamw(lr=1e-2), 2)))
    o2 = ChainOptimizer(m2.named_parameters(), gc.apply_if_finite(gc.accumulate(recipes.adamw(lr=1e-2), 2)))
    for i in range(8):
        _step(m1, o1, i, poison=i == 3)
        if i != 3:
            _step(m2, o2, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def aif_adamw() -> gc.Transform:
    return gc.apply_if_finite(recipes.adamw(lr=1e-2))


def aif_sgd() -> gc.Transform:
    return gc.apply_if_finite(recipes.sgd(lr=0.05, momentum=0.9), 1)


# (its FSDP2 check runs with accumulate's, in tests/test_accumulate.py: one spawn for both)
CASES = [RecipeCase("apply_if_finite_adamw", aif_adamw), RecipeCase("apply_if_finite_sgd", aif_sgd)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


def test_pickled_optimizer_keeps_skipping_exactly() -> None:
    """The copies kept between steps are workspace, not state: a pickled optimizer goes on alike."""
    import pickle

    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.apply_if_finite(recipes.adamw(lr=1e-2), 3))
    for i in range(2):
        _step(model, opt, i)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), (model2, opt2)):
        snap = _snapshot(m, o)
        _step(m, o, 2, poison=True)
        _assert_unchanged(m, o, snap)
        _step(m, o, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
