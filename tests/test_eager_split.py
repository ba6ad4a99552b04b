"""The eager step splits a group's params into buckets once and reuses the split (with each step's
new grads) while the params, their storages, which of them have a grad, their state dicts and names
stay the same; any change is a full split again, as if nothing had been kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradchain as gc
from gradchain import recipes


def _named() -> list[tuple[str, nn.Parameter]]:
    torch.manual_seed(0)
    shapes = {"w1": (6, 5), "b1": (6,), "w2": (3, 6), "b2": (3,), "late": (4,)}
    return [(k, nn.Parameter(torch.randn(s, dtype=torch.float64))) for k, s in shapes.items()]


def _run(chain, events: dict[int, str], reuse: bool, monkeypatch) -> tuple[list, gc.ChainOptimizer]:
    named = _named()
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer(named, chain())
    if not reuse:
        monkeypatch.setattr(opt, "_collected_eager_again", lambda *a: None)
    for i in range(9):
        g = torch.Generator().manual_seed(100 + i)
        for name, p in named:
            d = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name != "late" or i >= 4:  # a param whose first grad comes at step 4: its state is made then
                p.grad = d  # a new tensor each step, as backward after zero_grad(set_to_none=True)
        event = events.get(i)
        if event == "no grad":
            ps[1].grad = None
        elif event == "rebound data":
            ps[0].data = ps[0].data.clone()
        elif event == "cleared state":
            opt.state[ps[2]].clear()
        elif event == "loaded state":
            opt.load_state_dict(opt.state_dict())
        opt.step()
        if reuse and i in (1, 7):
            # nothing changed since the last step: the split is reused, with this step's grads
            again = opt._collected_eager_again(0, opt.param_groups[0], ps)
            assert again is not None
            assert [[x[1] for x in items] for items in again] == [[p.grad for p in ps if p.grad is not None]]
    return named, opt


@pytest.mark.parametrize("chain", [recipes.adamw, recipes.schedule_free_sgd, recipes.lamb])
@pytest.mark.parametrize("events", [{}, {2: "no grad", 5: "rebound data"}, {3: "cleared state", 6: "loaded state"}])
def test_a_kept_split_steps_as_a_full_one(chain, events, monkeypatch) -> None:
    (named_a, opt_a), (named_b, opt_b) = (_run(chain, events, reuse, monkeypatch) for reuse in (True, False))
    for (_, a), (_, b) in zip(named_a, named_b, strict=True):
        assert torch.equal(a.detach(), b.detach())
        for k, v in opt_a.state[a].items():
            assert torch.equal(v, opt_b.state[b][k]), k


def test_a_kept_split_still_refuses_a_sparse_grad() -> None:
    named = _named()
    opt = gc.ChainOptimizer(named, recipes.adamw())
    for _ in range(2):
        for _, p in named:
            p.grad = torch.ones_like(p)
        opt.step()
    named[1][1].grad = torch.ones_like(named[1][1]).to_sparse()
    before = [p.detach().clone() for _, p in named]
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param b1\)"):
        opt.step()
    assert all(torch.equal(b, p) for b, (_, p) in zip(before, named, strict=True))


def test_a_kept_split_follows_renamed_params_and_new_storage() -> None:
    # the names route params (here Muon's matrices by name): a renamed param is routed again; a
    # param's data on another storage (which may be of another device or dtype) is split again
    named = [("h.weight", nn.Parameter(torch.randn(4, 3, dtype=torch.float64))),
             ("embed.weight", nn.Parameter(torch.randn(5, 3, dtype=torch.float64)))]
    ps = [p for _, p in named]
    opt = gc.ChainOptimizer(named, recipes.muon(ns_dtype=torch.float64))
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    group = opt.param_groups[0]
    assert opt._collected_eager_again(0, group, ps) is not None
    group["param_names"] = ["h.weight", "h2.weight"]
    assert opt._collected_eager_again(0, group, ps) is None
    group["param_names"] = ["h.weight", "embed.weight"]
    assert opt._collected_eager_again(0, group, ps) is not None
    ps[1].data = ps[1].data.clone()
    assert opt._collected_eager_again(0, group, ps) is None
