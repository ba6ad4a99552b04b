"""Every recipe takes zero-size and 0-d params next to ordinary ones.

A model may hold empty tensors (a layer of width 0, an empty embedding table) and 0-d gains. For
every recipe (every public function of ``gradchain.recipes`` that returns a transform), in one
param group: the empty params stay as they are, the 0-d gain moves, and the ordinary params follow
exactly the trajectory they follow without the empty ones. A new recipe that needs arguments gets
an entry in ``ARGS``; a public name that is not a recipe gets ``None``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradchain import ChainOptimizer, Transform, recipes

ARGS: dict[str, Callable[[], Transform] | None] = {
    "lookahead": lambda: recipes.lookahead(recipes.adamw(lr=1e-2), k=2),
    "muon_hidden_matrix": None,  # the routing predicate of muon, not a recipe
}
EMPTY = {"empty_rows": (0, 4), "empty_cols": (4, 0), "empty_both": (0, 0), "empty_vec": (0,)}

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipes() -> list[str]:
    return sorted(recipes.__all__)


def _factory(name: str) -> Callable[[], Transform] | None:
    if name in ARGS:
        return ARGS[name]
    return getattr(recipes, name)


def test_every_recipe_is_covered() -> None:
    unknown = []
    for name in _recipes():
        if name in ARGS:
            continue
        sig = inspect.signature(getattr(recipes, name))
        required = [p for p in sig.parameters.values() if p.default is inspect.Parameter.empty]
        if required or not isinstance(getattr(recipes, name)(), Transform):
            unknown.append(name)
    assert not unknown, f"recipes {unknown} need an entry in tests/test_zero_size.py ARGS"


class Net(nn.Module):
    def __init__(self, empty: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 3).double()
        self.gain = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
        for n, shape in EMPTY.items():
            if empty:
                self.register_parameter(n, nn.Parameter(torch.zeros(shape, dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x) * self.gain
        for n in EMPTY:
            p = getattr(self, n, None)
            if p is not None:
                out = out + p.sum()  # part of the graph: a (zero-size) gradient
        return out


def _run(name: str, empty: bool, steps: int = 4) -> Net:
    model = Net(empty)
    opt = ChainOptimizer(model.named_parameters(), _factory(name)())
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    for p, st in opt.state.items():
        for k, v in st.items():
            what = f"{name}: state {k} of a param of shape {tuple(p.shape)}"
            assert torch.isfinite(v.double()).all(), f"{what} is not finite"
    return model


@pytest.mark.parametrize("name", [n for n in _recipes() if ARGS.get(n, True) is not None])
def test_zero_size_and_scalar_params(name: str) -> None:
    model = _run(name, empty=True)
    for n, shape in EMPTY.items():
        p = getattr(model, n)
        assert tuple(p.shape) == shape and p.dtype == torch.float64, f"{name}: {n} changed"
    assert float(model.gain.detach()) != 1.5, f"{name}: the 0-d gain did not move"
    plain = _run(name, empty=False)
    for n, p in plain.named_parameters():
        q = model.get_parameter(n)
        assert torch.equal(p, q), f"{name}: {n} differs from a run without the empty params"
