"""Every recipe against an independent float64 reference of the WHOLE chain.

The recipes that carry a torch.optim name (and those built around torch.optim) are held against
torch.optim in their own files (``ELSEWHERE`` says where). Every other recipe runs here at its
defaults, plus a non-default weight decay (or the option that stands in for one), on a matrix, a
vector and a conv weight for 40 steps of deterministic random gradients in float64, and its
params and key state are compared with ``recipe_references`` (plain per-tensor loops written from
each paper's rule) to 1e-12 relative: the displacement ``p - p_0`` of every tensor, so the test
sees the update itself and not only the initial values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import recipe_references as refs
import torch

from gradchain import ChainOptimizer, recipes

F64 = torch.float64
STEPS = 40
RTOL = 1e-12

SHAPES = {"fc.weight": (6, 5), "fc.bias": (5,), "conv.weight": (4, 3, 3, 3)}
# Adafactor factors only tensors whose two largest dims are >= 128 (its default): a matrix, a 3-d
# tensor whose factored dims are not adjacent (dim 1 is a batch dim), and the small ones unfactored
ADAFACTOR_SHAPES = {"fc.weight": (128, 130), "attn.weight": (130, 2, 128), **SHAPES}


def initial_params(shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.5 * torch.randn(s, generator=gen, dtype=F64) for n, s in shapes.items()}


def random_grads(init: dict[str, torch.Tensor], steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(1, steps + 1):
        # the scale drops after 5 steps, so AdaNorm's norm history exceeds the current norm (its boost)
        scale = 2.0 if t <= 5 else 0.5
        out.append({n: scale * torch.randn(p.shape, generator=gen, dtype=F64) for n, p in init.items()})
    return out


def outward_grads(init: dict[str, torch.Tensor], steps: int, seed: int = 2) -> list[dict[str, torch.Tensor]]:
    """Gradients that grow every norm, more slowly with time: CPR's bound bites and its inflection shows."""
    gen = torch.Generator().manual_seed(seed)
    return [
        {n: -p.sign() / math.sqrt(t) + 0.3 * torch.randn(p.shape, generator=gen, dtype=F64) for n, p in init.items()}
        for t in range(1, steps + 1)
    ]


def dead_grads(init: dict[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
    """A dead row and a dead column in the factored matrix: Adafactor's eps1 keeps them finite."""
    out = random_grads(init, steps)
    for gs in out:
        gs["fc.weight"][0, :] = 0.0
        gs["fc.weight"][:, 0] = 0.0
    return out


def small_grads(init: dict[str, torch.Tensor], steps: int) -> list[dict[str, torch.Tensor]]:
    """Gradients of scale 1e-2: AdamS's normaliser sqrt(v_bar) is then small, and its form shows."""
    return [{n: 1e-2 * g for n, g in gs.items()} for gs in random_grads(init, steps)]


LOSSES = [1.0 + 0.8 * math.sin(0.7 * t) + 2.0 / t for t in range(1, STEPS + 1)]


@dataclass
class Case:
    recipe: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=lambda: SHAPES)
    grads: Any = random_grads
    xfail: str | None = None

    @property
    def label(self) -> str:
        return self.recipe + "".join(f"-{k}={v}" for k, v in self.kwargs.items())



CPR_ON = {"lr": 1e-2}  # a step large enough for the norms to grow past the bound in 40 steps
CASES = [
    Case("adam_atan2"),
    Case("adam_atan2", {"weight_decay": 0.1}),
    Case("sadam"),
    Case("sadam", {"weight_decay": 0.1}),
    Case("adamomentum"),
    Case("adamomentum", {"weight_decay": 0.1}),
    Case("diffgrad"),
    Case("diffgrad", {"weight_decay": 0.1}),
    Case("adanorm"),
    Case("adanorm", {"weight_decay": 0.1}),
    Case("adalo"),
    Case("adalo", {"weight_decay": 0.1}),
    Case("adalo", {"mode": "paper"}),
    Case("adafactor", shapes=ADAFACTOR_SHAPES, grads=dead_grads),
    Case("adafactor", {"weight_decay": 0.1}, shapes=ADAFACTOR_SHAPES),
    Case("adafactor", {"momentum": 0.9}, shapes=ADAFACTOR_SHAPES),
    Case("adafactor", {"lr": 0.5}, shapes=ADAFACTOR_SHAPES),  # the relative step min(lr, 1/sqrt(t)) moves
    Case("sm3"),
    Case("sm3", {"momentum": 0.9}),
    Case("amos"),
    Case("amos", {"momentum": 0.9}),
    Case("smmf"),
    Case("smmf", {"weight_decay": 0.1}),
    Case("adams", grads=small_grads),
    Case("adams", {"weight_decay": 0.1}, grads=small_grads),
    Case("cpr_adamw"),  # the default inflection-point bound cannot be set before step 800: Adam alone
    Case("cpr_adamw", {**CPR_ON, "reg_step_size": 4}, grads=outward_grads),
    Case("cpr_adamw", {**CPR_ON, "kappa_init": "uniform", "kappa_init_param": 2.0}, grads=outward_grads),
    Case("cpr_adamw", {**CPR_ON, "kappa_init": "dependent", "kappa_init_param": 0.9}, grads=outward_grads),
    Case("cpr_adamw", {**CPR_ON, "kappa_init": "warm_start", "kappa_init_param": 10}, grads=outward_grads),
    Case(
        "cpr_adamw",
        {**CPR_ON, "kappa_init": "uniform", "kappa_init_param": 2.0, "reg_by_lr": True, "matrices_only": False},
        grads=outward_grads,
    ),
    Case("fractional_adam"),
    Case("fractional_adam", {"weight_decay": 0.1}),
    Case("fractional_adam", {"drop": 0}),
    Case("fractional_sgd"),
    Case("fractional_sgd", {"weight_decay": 0.1}),
    Case("fractional_sgd", {"momentum": 0.9, "nesterov": True}),
]

# recipes held against torch.optim (or a reference already written for the whole recipe) elsewhere
ELSEWHERE = {
    "sgd": "test_recipes_core.py::test_matches_torch_optim",
    "adam": "test_recipes_core.py::test_matches_torch_optim",
    "adamw": "test_recipes_core.py::test_matches_torch_optim",
    "nadam": "test_adam_variants.py::test_nadam_matches_torch",
    "adafactor": "test_factored.py::test_matches_torch_adafactor",  # torch_compat=True; default numerics: here
    "muon": "test_muon.py::test_muon_matches_torch_fp64",
    "lookahead": "test_lookahead.py::test_adamw_matches_paper_loop",
    "lamb": "test_normalization.py::test_lamb_against_the_paper",
    "gc_adamw": "test_normalization.py::test_gc_adamw_matches_torch_adamw_on_centralized_grads",
    "nsgda": "test_normalization.py::test_nsgda_against_reference",
    "agc_sgd": "test_clipping.py::test_agc_sgd_matches_torch_sgd_on_clipped_grads",
    "softclip_adamw": "test_clipping.py::test_softclip_adamw_matches_torch_adamw_on_clipped_grads",
    "cautious_adamw": "test_cautious.py::test_cautious_adamw_against_reference",
    "cwd_adamw": "test_decay.py::test_cwd_adamw_against_reference",
}
# recipes that arrive with their own reference tests
WITH_OWN_TESTS = {"am_sgd", "am_adamw", "adamw_spectral", "schedule_free_adamw", "schedule_free_sgd", "prodigy"}
NOT_RECIPES = {"muon_hidden_matrix"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second intra-op thread only spins, and on a shared CPU that costs seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_recipe(case: Case, init: dict, grads: list[dict]) -> tuple[ChainOptimizer, dict[str, torch.Tensor]]:
    params = {n: torch.nn.Parameter(p.clone()) for n, p in init.items()}
    opt = ChainOptimizer(list(params.items()), getattr(recipes, case.recipe)(**case.kwargs))
    for t, gs in enumerate(grads):
        for n, p in params.items():
            p.grad = gs[n].clone()
        opt.step(loss=torch.tensor(LOSSES[t], dtype=F64))
    return opt, params


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Element 8k + j is bit j of byte k (the documented packing)."""
    bits = [(packed.to(torch.int64) >> j) & 1 for j in range(8)]
    return torch.stack(bits, dim=1).reshape(-1)[:numel].bool()


def recipe_state(opt: ChainOptimizer, recipe: str, param: torch.Tensor, key: str) -> torch.Tensor:
    st = opt.state[param]
    if recipe == "smmf":
        if key == "sign":
            r, c = refs.most_square(param.numel())
            return unpack_bits(st["smmf.sign"], r * c).reshape(r, c)
        prefix = {"abs_m": "smmf.m_", "v": "smmf.v_"}[key]
        return torch.outer(st[prefix + "row"], st[prefix + "col"])
    return st[key]


def assert_moved_as(got: torch.Tensor, want: torch.Tensor, start: torch.Tensor, what: str) -> None:
    moved, want_moved = got - start, want - start
    scale = float(want_moved.abs().max())
    assert scale > 0, f"{what}: the reference did not move"
    err = float((moved - want_moved).abs().max())
    assert err <= RTOL * scale, f"{what}: displacement off by {err / scale:.3g} relative"


def assert_state(got: torch.Tensor, want: torch.Tensor, what: str, scale: float = 0.0) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.dtype == torch.bool:
        assert torch.equal(got, want), f"{what}: differs"
        return
    scale = max(scale, float(want.abs().max()))
    err = float((got.to(F64) - want).abs().max())
    assert err <= RTOL * scale, f"{what}: off by {err} (scale {scale})"


def _params(case: Case) -> list:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return [pytest.param(case, id=case.label, marks=marks)]


@pytest.mark.parametrize("case", [p for c in CASES for p in _params(c)])
def test_recipe_matches_reference(case: Case) -> None:
    init = initial_params(case.shapes)
    grads = case.grads(init, STEPS)
    ref = getattr(refs, case.recipe)
    out = ref(init, grads, LOSSES, **case.kwargs) if case.recipe == "adalo" else ref(init, grads, **case.kwargs)
    want, want_state = out[0], out[1]
    opt, params = run_recipe(case, init, grads)
    for n, p in params.items():
        assert_moved_as(p.detach(), want[n], init[n], f"{case.label} {n}")
        for key, value in want_state[n].items():
            scale = 0.0
            if key == "cpr.lagmul":
                # lam sums kappa_update/numel (R - kappa) over the steps: its rounding is that of R, not of lam
                scale = case.kwargs.get("kappa_update", 1.0) * float(want_state[n]["cpr.kappa"]) / init[n].numel()
            assert_state(recipe_state(opt, case.recipe, p, key), value, f"{case.label} {n} {key}", scale)
    if case.recipe == "adalo":
        assert_state(opt.global_state["loss_ema.loss_ema"], torch.tensor(out[2]), f"{case.label} loss EMA")
    if case.recipe == "cpr_adamw" and case.kwargs:
        # the bound was set and bit on every regularised tensor: the projection is part of what was compared
        assert all(out[2]["bit"].values()), f"CPR never bit: {out[2]['bit']}"
        if case.kwargs.get("reg_step_size"):
            assert out[2]["set_at"].keys() == out[2]["bit"].keys(), "the inflection point was never found"


def test_every_recipe_has_a_reference() -> None:
    here = {c.recipe for c in CASES}
    tests = Path(__file__).parent
    for name in sorted(set(recipes.__all__) - NOT_RECIPES):
        if name in here or name in WITH_OWN_TESTS:
            continue
        assert name in ELSEWHERE, f"recipe {name!r} has no recipe-level reference test"
        file, test = ELSEWHERE[name].split("::")
        assert f"def {test}(" in (tests / file).read_text(), f"{ELSEWHERE[name]} is gone"
