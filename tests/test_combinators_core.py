"""masked and partition against hand-written references."""

from __future__ import annotations

import copy

import pytest
import torch

import gradchain as gc
from gradchain import ChainOptimizer, recipes


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)).double()


def _step(model, opt, i):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_masked_weight_decay_skips_biases_and_norms() -> None:
    m1, m2 = _model(), _model()
    decay = [p for p in m1.parameters() if p.ndim >= 2]
    no_decay = [p for p in m1.parameters() if p.ndim < 2]
    ref = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.01, weight_decay=0.3)
    decay_matrices = gc.masked(gc.add_decoupled_wd(0.3), lambda name, p: p.ndim >= 2)
    tr = gc.chain(gc.scale_by_adam(), decay_matrices, gc.scale_by_lr(0.01))
    opt = ChainOptimizer(m2.named_parameters(), tr)
    for i in range(20):
        _step(m1, ref, i)
        _step(m2, opt, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_masked_by_glob_keeps_state_only_for_selected() -> None:
    m = _model()
    opt = ChainOptimizer(m.named_parameters(), gc.chain(gc.masked(gc.trace(0.9), "*.weight"), gc.scale_by_lr(0.1)))
    _step(m, opt, 0)
    for name, p in m.named_parameters():
        assert ("momentum.buffer" in opt.state[p]) == name.endswith("weight")


def test_masked_needs_names() -> None:
    # refused when the optimizer is built (at its first step before), as is a param no route takes,
    # even one that gets its first gradient later
    m = _model()
    with pytest.raises(ValueError, match="named_parameters"):
        ChainOptimizer(m.parameters(), gc.chain(gc.masked(gc.trace(0.9), "*.weight"), gc.scale_by_lr(0.1)))
    named = list(m.named_parameters())
    routes = {n: "w" for n, p in named if p.ndim == 2}
    part = gc.partition({"w": gc.scale_by_lr(0.1), "b": gc.scale(-0.1)}, routes)
    with pytest.raises(ValueError, match=r"partition\(\): param \S+bias has label None, which is none of \['b', 'w'\]"):
        ChainOptimizer(named, part)
    opt = ChainOptimizer(named[:1], part)
    with pytest.raises(ValueError, match="has label None"):
        opt.add_param_group({"params": [named[1][1]], "param_names": [named[1][0]]})
    assert len(opt.param_groups) == 1


def test_partition_equals_two_torch_optimizers() -> None:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    matrices = [p for p in m1.parameters() if p.ndim == 2]
    rest = [p for p in m1.parameters() if p.ndim != 2]
    o_sgd = torch.optim.SGD(matrices, lr=0.05, momentum=0.9)
    o_adam = torch.optim.AdamW(rest, lr=0.01)
    tr = gc.partition(
        {"matrix": recipes.sgd(lr=0.05, momentum=0.9).prefixed("sgd_"), "rest": recipes.adamw(lr=0.01)},
        lambda name, p: "matrix" if p.ndim == 2 else "rest",
    )
    opt = ChainOptimizer(m2.named_parameters(), tr)
    assert opt.param_groups[0]["sgd_lr"] == 0.05 and opt.param_groups[0]["lr"] == 0.01

    class Both:
        def zero_grad(self):
            o_sgd.zero_grad()
            o_adam.zero_grad()

        def step(self):
            o_sgd.step()
            o_adam.step()

    for i in range(20):
        _step(m1, Both(), i)
        _step(m2, opt, i)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


def test_partition_unlabelled_param_is_named() -> None:
    m = _model()
    tr = gc.partition({"a": recipes.sgd()}, {"0.weight": "a"})
    with pytest.raises(ValueError, match="0.bias"):
        ChainOptimizer(m.named_parameters(), tr)


def test_partition_conflicting_defaults_need_renaming() -> None:
    with pytest.raises(ValueError, match="renamed"):
        gc.partition({"a": recipes.sgd(lr=0.1), "b": recipes.adamw(lr=0.01)}, lambda n, p: "a")


def test_partition_labels_kept_per_bucket_only_for_the_same_params() -> None:
    # the labels of a bucket are reused only while it holds the same params (by identity) under the
    # same names: a new param in the same place, or names that moved, are routed afresh
    from types import SimpleNamespace

    part = gc.partition({"mat": gc.scale(2.0), "vec": gc.scale(3.0)},
                        lambda name, p: "mat" if p.ndim == 2 and name != "head" else "vec")
    m, v = torch.zeros(2, 2), torch.zeros(2)
    assert part._routes(SimpleNamespace(names=["a", "b"], params=[m, v])) == ["mat", "vec"]
    assert part._routes(SimpleNamespace(names=["a", "b"], params=[m, v])) == ["mat", "vec"]
    assert part._routes(SimpleNamespace(names=["a", "b"], params=[m, torch.zeros(3, 3)])) == ["mat", "mat"]
    assert part._routes(SimpleNamespace(names=["head", "b"], params=[m, v])) == ["vec", "vec"]


def test_masked_and_partition_take_transforms_only() -> None:
    # (an AttributeError about .paths before)
    with pytest.raises(TypeError, match=r"masked\(\) takes a transform, got function \(a factory not called\?\)"):
        gc.masked(gc.scale_by_adam, "*")
    with pytest.raises(TypeError, match=r"partition\(\) takes a transform per label, got \{'a': 'function'\}"):
        gc.partition({"a": gc.scale_by_adam}, lambda n, p: "a")
    with pytest.raises(TypeError, match="'b': 'NoneType'"):
        gc.partition({"a": gc.scale_by_adam(), "b": None}, lambda n, p: "a")


def test_the_different_defaults_error_does_not_lead_to_the_shared_key_error() -> None:
    # (it said "give them the same default", which chain() then refused as a key declared twice)
    with pytest.raises(ValueError, match=r"default 0.0 by 'l2' and 0.1 by 'wd': rename one.*share=\['weight_decay'\]"):
        gc.chain(gc.add_l2(0.0), gc.scale_by_adam(), gc.add_decoupled_wd(0.1), gc.scale_by_lr())
    gc.chain(gc.add_l2(0.1), gc.scale_by_adam(), gc.add_decoupled_wd(0.1), gc.scale_by_lr(), share=["weight_decay"])
