"""Shared plumbing: renamed hyperparameter keys of the transforms that are not a single Leaf, and
the routing cache of masked()/partition(), which must not outlive the params it routes."""

from __future__ import annotations

import gc as pygc

import pytest
import torch

import gradchain as gc
from gradchain import ChainOptimizer, recipes


def _run(transform: gc.Transform, group: dict, steps: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = ChainOptimizer([{"params": [p], **group}], transform)
    for i in range(steps):
        p.grad = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        opt.step(loss=torch.tensor(1.0 + i))
    return p.detach()


# (transform, its key, another value for it): each is a Declared transform, not a Leaf
CASES = {
    "clip_by_global_norm": (lambda: gc.chain(gc.clip_by_global_norm(1.0), gc.scale_by_lr(0.1)), "max_norm", 0.01),
    "normalize_global": (lambda: gc.chain(gc.normalize(scope="global"), gc.scale_by_lr(0.1)), "normalize_eps", 10.0),
    "scale_by_loss_ema": (lambda: gc.chain(gc.scale_by_loss_ema(0.5), gc.scale_by_lr(0.1)), "kappa", 0.2),
    "add_stable_wd": (lambda: gc.chain(gc.scale_by_adam(), gc.add_stable_wd(0.1), gc.scale_by_lr(0.1)),
                      "weight_decay", 0.9),
    "lookahead": (lambda: gc.lookahead(gc.chain(gc.scale_by_adam(), gc.scale_by_lr(0.1)), k=2), "lookahead_alpha",
                  0.9),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_renamed_key_is_read_from_the_group(name: str) -> None:
    build, key, value = CASES[name]
    base = build()
    moved = base.renamed({key: "other"})
    assert key in base.hyperparams and key not in moved.hyperparams and "other" in moved.hyperparams
    assert key in base.renamed({}).hyperparams  # renaming made a copy: the original keeps its key
    want = _run(base, {key: value})
    got = _run(moved, {"other": value})
    assert torch.equal(got, want), f"{name}: the renamed key does not drive the transform"
    assert not torch.equal(_run(base, {}), want), f"{name}: the value under test changes nothing"
    with pytest.raises(ValueError, match="other"):
        ChainOptimizer([torch.nn.Parameter(torch.zeros(2))], moved, other=-1.0)


def test_adalo_betas_are_one_key() -> None:
    t = recipes.adalo()
    assert {"betas"} <= set(t.hyperparams) and not {"beta1", "beta2"} & set(t.hyperparams)
    a = _run(recipes.adalo(betas=(0.5, 0.9)), {})
    b = _run(recipes.adalo(), {"betas": (0.5, 0.9)})
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="betas"):
        ChainOptimizer([torch.nn.Parameter(torch.zeros(2))], recipes.adalo(), betas=(0.9, 1.0))


def test_routing_cache_lets_params_go() -> None:
    t = gc.masked(gc.trace(0.9), lambda name, p: p.ndim >= 2)
    for _ in range(20):
        model = torch.nn.Linear(3, 2)
        opt = ChainOptimizer(model.named_parameters(), t)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        del model, opt
    pygc.collect()
    assert len(t._cache) == 0, f"masked() still holds routes for {len(t._cache)} freed params"
