"""Write a checkpoint fixture for ``tests/test_checkpoint_compat.py``.

Run it with the gradchain version whose checkpoints later versions must keep loading:

    python tests/data/make_checkpoints.py tests/data/checkpoints_<date>.pt

For each recipe below it trains a small float64 model for 3 steps, saves the model, the optimizer's
``state_dict()`` and the params after 3 more steps of that same version.
"""

from __future__ import annotations

import copy
import sys

import torch

import gradchain as gc
from gradchain import recipes

RECIPES = ("adamw", "sgd", "adafactor", "sm3", "smmf", "lookahead", "schedule_free_adamw", "prodigy",
           "fractional_adam", "adalo", "muon", "amos", "am_adamw", "adams")
LOSS_AWARE = ("adalo",)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).double()


def build(name: str) -> gc.Chain:
    if name == "lookahead":
        return recipes.lookahead(recipes.adamw())
    return getattr(recipes, name)(**({"momentum": 0.9} if name == "sgd" else {}))


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, name: str, steps: int) -> None:
    g = torch.Generator().manual_seed(1 + int(sum(p.numel() for p in m.parameters())))
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        opt.step(loss=loss) if name in LOSS_AWARE else opt.step()


def main(path: str) -> None:
    out = {}
    for name in RECIPES:
        m = model()
        opt = gc.ChainOptimizer(m.named_parameters(), build(name))
        train(m, opt, name, 3)
        entry = {"model": copy.deepcopy(m.state_dict()), "optimizer": copy.deepcopy(opt.state_dict())}
        train(m, opt, name, 3)
        entry["after"] = copy.deepcopy(m.state_dict())
        out[name] = entry
    torch.save({"version": getattr(gc, "__version__", "?"), "checkpoints": out}, path)


if __name__ == "__main__":
    main(sys.argv[1])
