"""Every transform of the library: a skipped step advances no state at all.

Three kinds of skipped step, for each public transform (``gradchain.transforms.__all__`` and the
combinators):

- an accumulation mini-step (``accumulate(T, 2)``): no param and no state of ``T`` changes;
- a non-finite update (``apply_if_finite(chain(T, poison))`` with the poison on): no param and no
  state changes, the step counters included (only ``apply_if_finite``'s own counters move);
- a GradScaler run with an injected inf batch: equal, bit for bit, to a plain run without it.

A public name needs no entry when calling it with no arguments builds a transform that runs
alone on a small model. A transform that needs arguments (or a partner, or only matrices) gets
an entry in ``REGISTRY`` (a factory); a public name that is not a transform gets ``None``. A new
public name that is neither fails ``test_every_public_name_is_covered``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from harness import make_model

import gradchain as gc
from gradchain import ChainOptimizer, combinators, transforms
from gradchain.hyperparams import Hyperparam
from gradchain.testing import Case, check_gradscaler


def _matrices(name: str | None, p: torch.Tensor) -> bool:
    return p.ndim >= 2


REGISTRY: dict[str, Callable[[], gc.Transform] | None] = {
    # transforms that need arguments
    "scale": lambda: gc.scale(0.5),
    "lookahead": lambda: gc.lookahead(gc.chain(gc.scale_by_adam(), gc.scale_by_lr(1e-2))),
    "masked": lambda: gc.masked(gc.trace(0.9), _matrices),
    "partition": lambda: gc.partition(
        {"m": gc.scale_by_adam(), "v": gc.trace(0.9)}, lambda n, p: "m" if p.ndim >= 2 else "v"
    ),
    # transforms that need a partner, or matrices
    "add_scheduled_wd": lambda: gc.chain(gc.scale_by_lr(0.1), gc.add_scheduled_wd(0.1)),
    "add_switched_wd": lambda: gc.chain(
        gc.add_switched_wd(0.1, placement="coupled", name="l2"), gc.scale_by_adam(),
        gc.add_switched_wd(0.1, placement="decoupled", name="wd"), gc.scale_by_lr(0.1),
        share=["weight_decay", "decoupled_weight_decay"],
    ),
    "add_stable_wd": lambda: gc.chain(gc.scale_by_adam(), gc.add_stable_wd(0.1)),
    "orthogonalize": lambda: gc.masked(gc.orthogonalize(), _matrices),
    "scale_by_shape": lambda: gc.masked(gc.scale_by_shape(), _matrices),
    "accumulate": lambda: gc.accumulate(gc.scale_by_adam(), 3, name="inner_accumulate"),
    "apply_if_finite": lambda: gc.apply_if_finite(gc.scale_by_adam(), 2, name="inner_if_finite"),
    # learning-rate-free: the AdamW form of schedule-free (warmup on), Prodigy with decay and correction
    "schedule_free": lambda: gc.chain(
        gc.scale_by_rms(betas=(0.9, 0.999)), gc.schedule_free(1e-2, betas=(0.9, 0.999), warmup_steps=3),
        share=["betas"]
    ),
    "scale_by_prodigy": lambda: gc.scale_by_prodigy(weight_decay=0.01, use_bias_correction=True),
    # public names that are not transforms (helpers and constants)
    "CAUTIOUS_RESCALINGS": None,
    "KAPPA_INITS": None,
    "amos_default_eta": None,
    "factored_dims": None,
    "gl_coefficients": None,
    "gl_weights": None,
    "newton_schulz": None,
    "pack_signs": None,
    "slow_weights": None,
    "square_shape": None,
    "unpack_signs": None,
}


def _public() -> dict[str, object]:
    out = {n: getattr(transforms, n) for n in transforms.__all__}
    out.update({n: getattr(combinators, n) for n in combinators.__all__})
    return out


def _factory(name: str) -> Callable[[], gc.Transform] | None:
    if name in REGISTRY:
        return REGISTRY[name]
    return getattr(gc, name) if name in transforms.__all__ else getattr(combinators, name)


def _auto_builds(obj: object) -> bool:
    if not callable(obj):
        return False
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    required = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return not required and isinstance(obj(), gc.Transform)


def test_every_public_name_is_covered() -> None:
    missing = sorted(n for n, obj in _public().items() if n not in REGISTRY and not _auto_builds(obj))
    assert not missing, (
        f"public names {missing} build no transform without arguments and have no entry in "
        "tests/test_skipped_steps.py REGISTRY: add a factory (or None if it is not a transform)"
    )
    stale = sorted(set(REGISTRY) - set(_public()))
    assert not stale, f"REGISTRY entries {stale} are no longer public names"


NAMES = sorted(n for n in _public() if REGISTRY.get(n, True) is not None)


def _descent() -> gc.Leaf:
    """A small descent step after a transform (a probe's: allowed after lookahead and schedule-free)."""
    t = gc.scale(-1e-2, name="descent")
    t.may_follow_final = True
    return t


def poison() -> gc.Leaf:
    """Multiplies the update by the group's ``poison`` (1.0; a test sets NaN for one step)."""
    spec = {"poison": Hyperparam(1.0)}
    t = gc.transform("poison", spec, None, lambda u, s, hp, ctx: torch._foreach_mul(u, hp["poison"]))
    t.may_follow_final = True  # a probe: allowed after lookahead and schedule-free, which end their chain
    return t


def _train_step(model, opt, i: int, dtype=torch.float64, scaler=None, inf=False) -> None:
    g = torch.Generator().manual_seed(40 + i)
    x = torch.randn(6, 2, 4, 4, generator=g).to(dtype)
    y = torch.randn(6, 3, generator=g).to(dtype)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    if scaler is None:
        loss.backward()
        opt.step(loss=loss.detach())
        return
    scaler.scale(loss).backward()
    if inf:
        model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt, loss=loss.detach())
    scaler.update()


def _snapshot(model, opt) -> tuple[list, dict, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state.get(p, {}).items()}
    glob = {k: v.clone() for k, v in getattr(opt, "global_state", {}).items()}
    return params, state, glob


def _assert_nothing_moved(model, opt, before, allowed: tuple[str, ...], what: str) -> None:
    params, state, glob = before
    after = _snapshot(model, opt)
    for (n, _), a, b in zip(model.named_parameters(), params, after[0]):
        assert torch.equal(a, b), f"{what}: param {n} changed"
    assert state.keys() == after[1].keys(), f"{what}: the set of state entries changed"
    for key, v in state.items():
        if key[1] == "step" and "step" in allowed:
            continue
        if key[1].split(".", 1)[0] in allowed:
            continue
        assert torch.equal(v, after[1][key]), f"{what}: state {key[1]} changed"
    for k, v in glob.items():
        assert torch.equal(v, after[2][k]), f"{what}: global state {k} changed"


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_mini_step_advances_nothing(name: str) -> None:
    model = make_model()
    opt = ChainOptimizer(model.named_parameters(), gc.accumulate(_factory(name)(), 2, name="skip_acc"))
    for i in range(2):  # one real step, so the state is not all zeros
        _train_step(model, opt, i)
    before = _snapshot(model, opt)
    _train_step(model, opt, 2)  # a mini-step
    _assert_nothing_moved(model, opt, before, ("skip_acc", "step"), f"{name} accumulation mini-step")


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_update_advances_nothing(name: str) -> None:
    model = make_model()
    tr = gc.apply_if_finite(gc.chain(_factory(name)(), poison()), None, name="skip_if_finite")
    opt = ChainOptimizer(model.named_parameters(), tr)
    _train_step(model, opt, 0)
    before = _snapshot(model, opt)
    opt.param_groups[0]["poison"] = float("nan")
    _train_step(model, opt, 2)
    _assert_nothing_moved(model, opt, before, ("skip_if_finite",), f"{name} non-finite update")
    opt.param_groups[0]["poison"] = 1.0
    _train_step(model, opt, 3)
    assert float(opt.state[model.fc1.weight]["skip_if_finite.notfinite_count"]) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_gradscaler_inf_batch_leaves_the_trajectory(name: str) -> None:
    # torch's GradScaler does not call step() on a found-inf step, so comparing the state around that
    # step alone tests torch; the whole run must equal a plain run that never saw the inf batch.
    # A small descent step after the transform keeps the run from overflowing under the loss scale.
    factory = _factory(name)
    check_gradscaler(Case(name, lambda: gc.chain(factory(), _descent()), steps=4))
