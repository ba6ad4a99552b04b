"""cautious_mask and cautious_adamw against float64 references written here."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe

import gradchain as gc
from gradchain import ChainOptimizer, recipes

F64 = torch.float64


def _given(directions: list[torch.Tensor]) -> gc.Leaf:
    """A transform that replaces the update by fixed directions (so they can disagree with g)."""
    return gc.transform("given", {}, None, lambda u, s, hp, ctx: [d.clone() for d in directions])


def _tensors(seed: int = 0) -> tuple[list, list]:
    """Directions and gradients on a conv weight (out, in, kh, kw), a bias and a 0-d gain, with zeros."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 2, 3, 3), (7,), ()]
    d = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    gr = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    d[0][0, 0, 0, :] = 0.0  # zero update: masked
    gr[0][1, 1, 1, :] = 0.0  # zero gradient: masked
    gr[1][2] = 0.0
    return d, gr


def cautious_reference(d: torch.Tensor, g: torch.Tensor, rescale: str) -> torch.Tensor:
    """phi = 1[d g > 0], d phi s, with the named convention's s, element by element."""
    flat_d, flat_g = d.reshape(-1).tolist(), g.reshape(-1).tolist()
    phi = [1.0 if a * b > 0 else 0.0 for a, b in zip(flat_d, flat_g)]
    kept, n = sum(phi), len(phi)
    s = {
        "c_optim": n / (kept + 1),
        "timm": 1.0 / max(kept / n, 1e-3),
        "heavyball": n / max(kept, 1.0),
        "none": 1.0,
    }[rescale]
    return torch.tensor([a * f * s for a, f in zip(flat_d, phi)], dtype=F64).reshape(d.shape)


@pytest.mark.parametrize("rescale", gc.CAUTIOUS_RESCALINGS)
def test_cautious_mask_against_reference(rescale: str) -> None:
    d, g = _tensors()
    t = gc.chain(_given(d), gc.cautious_mask(rescale))
    params = [torch.zeros_like(x) for x in d]
    u = t.update(g, t.init(params), params)
    for ui, di, gi in zip(u, d, g):
        torch.testing.assert_close(ui, cautious_reference(di, gi, rescale), rtol=0, atol=1e-14)


@pytest.mark.parametrize("rescale", gc.CAUTIOUS_RESCALINGS)
def test_cautious_mask_all_masked_and_zero_gradient(rescale: str) -> None:
    d, g = _tensors(1)
    t = gc.chain(_given(d), gc.cautious_mask(rescale))
    params = [torch.zeros_like(x) for x in d]
    # every coordinate disagrees
    u = t.update([-x for x in d], t.init(params), params)
    for ui in u:
        assert torch.isfinite(ui).all() and torch.equal(ui, torch.zeros_like(ui))
    # zero gradient: nothing agrees, the update is zero and finite
    u = t.update([torch.zeros_like(x) for x in d], t.init(params), params)
    for ui in u:
        assert torch.isfinite(ui).all() and torch.equal(ui, torch.zeros_like(ui))


def test_cautious_mask_keeps_everything_when_all_agree() -> None:
    d, _ = _tensors(2)
    d = [x + (x == 0).to(F64) for x in d]  # no zeros
    t = gc.chain(_given(d), gc.cautious_mask("heavyball"))
    params = [torch.zeros_like(x) for x in d]
    u = t.update([2.0 * x for x in d], t.init(params), params)
    for ui, di in zip(u, d):
        torch.testing.assert_close(ui, di, rtol=0, atol=0)


def test_cautious_mask_rejects_unknown_rescale() -> None:
    with pytest.raises(ValueError, match="rescale"):
        gc.cautious_mask("mean")


def _c_adamw_reference(steps, grads_fn, params, lr, betas, eps, wd):
    """C-AdamW (arXiv:2411.16085, reference code): Adam direction masked on m g > 0, numel/(kept+1)."""
    b1, b2 = betas
    ps = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in ps]
    v = [torch.zeros_like(p) for p in ps]
    for t in range(1, steps + 1):
        grads = grads_fn(t)
        for i, (p, g) in enumerate(zip(ps, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            denom = (v[i] / (1 - b2**t)).sqrt() + eps
            phi = (m[i] * g > 0).to(F64)
            scale = phi.numel() / (phi.sum() + 1)
            ps[i] = p * (1 - lr * wd) - lr * mhat * phi * scale / denom
    return ps


def test_cautious_adamw_against_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(4, 3, 2, 2, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)]
    grads = {t: [torch.randn(p.shape, generator=gen, dtype=F64) for p in params] for t in range(1, 31)}
    want = _c_adamw_reference(30, grads.__getitem__, params, 0.01, (0.9, 0.99), 1e-8, 0.1)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = ChainOptimizer(ps, recipes.cautious_adamw(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1))
    for t in range(1, 31):
        for p, g in zip(ps, grads[t]):
            p.grad = g.clone()
        opt.step()
    for a, b in zip(ps, want):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-12)


CASES = [
    RecipeCase("cautious_adamw", partial(recipes.cautious_adamw, lr=1e-2)),
    RecipeCase("cautious_adamw_timm", partial(recipes.cautious_adamw, lr=1e-2, rescale="timm", amsgrad=True)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    # every rescaling reduces a mask count per tensor: all of them under FSDP2
    heavyball = RecipeCase("cautious_adamw_heavyball", partial(recipes.cautious_adamw, lr=1e-2, rescale="heavyball"))
    check_fsdp2([*CASES, heavyball])
