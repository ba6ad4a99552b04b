"""Newton–Schulz orthogonalization, Muon's shape scaling, EMA-Nesterov momentum and the muon recipe."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch
import torch.optim._muon as torch_muon
from harness import RecipeCase, check_fsdp2, check_recipe, make_model, peak_bytes

from gradchain import ChainOptimizer, ema, newton_schulz, orthogonalize, pieces, recipes, scale_by_shape
from gradchain.fused import runner

A, B, C = 3.4445, -4.7750, 2.0315


def ns_reference(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Float64 Newton–Schulz from the spec: flatten, normalize, transpose if tall, quintic steps."""
    x = g.reshape(g.shape[0], -1).double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.t()
    x = x / max(x.norm().item(), eps)
    for _ in range(steps):
        gram = x @ x.t()
        x = A * x + B * (gram @ x) + C * (gram @ gram @ x)
    return (x.t() if tall else x).reshape(g.shape)


@pytest.mark.parametrize("shape", [(13, 20), (20, 13), (7, 7), (5, 2, 3, 3)])
def test_newton_schulz_fp64_reference(shape) -> None:
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = newton_schulz(g, dtype=torch.float64)
    assert out.shape == g.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ns_reference(g), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(13, 20), (20, 13), (32, 32)])
def test_newton_schulz_bf16_matches_torch(shape) -> None:
    g = torch.randn(*shape, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    ours = newton_schulz(g)
    theirs = torch_muon._zeropower_via_newtonschulz(g, (A, B, C), 5, 1e-7)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(13, 20), (64, 32), (5, 18), (12, 13)])
def test_newton_schulz_singular_value_band(shape) -> None:
    # the quintic iterated 5 times maps every normalized singular value in [3e-3, 1] into
    # [0.6818, 1.2024] (checked on a dense grid below); these matrices' values are all above 3e-3
    s = torch.logspace(math.log10(3e-3), 0, 4000, dtype=torch.float64)
    x = s.clone()
    for _ in range(5):
        x = A * x + B * x**3 + C * x**5
    assert 0.68 <= x.min() and x.max() <= 1.21
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert (torch.linalg.svdvals(g) / g.norm()).min() > 3e-3
    sv = torch.linalg.svdvals(newton_schulz(g, dtype=torch.float64))
    assert sv.min() >= 0.68 and sv.max() <= 1.21, (sv.min(), sv.max())
    sv16 = torch.linalg.svdvals(newton_schulz(g).double())  # bf16: a few bf16 ulps (2^-8) wider
    assert sv16.min() >= 0.6 and sv16.max() <= 1.3, (sv16.min(), sv16.max())


def test_orthogonalize_transform_edges() -> None:
    t = orthogonalize(dtype=torch.float64)
    p = torch.zeros(4, 6, dtype=torch.float64)
    u = t.update([torch.zeros(4, 6, dtype=torch.float64)], t.init([p]), [p])
    assert torch.equal(u[0], torch.zeros(4, 6, dtype=torch.float64))  # eps keeps 0 -> 0, no NaN
    g = torch.randn(5, 3, 2, dtype=torch.float32)
    out = orthogonalize(dtype=torch.float64).update([g], [{"step": torch.zeros(())}], [g])[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ns_reference(g.double()), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="matrix"):
        t.update([torch.ones(3, dtype=torch.float64)], t.init([torch.ones(3)]), [torch.ones(3)])
    with pytest.raises(ValueError, match="not a matrix"):
        scale_by_shape().update([torch.ones(3)], [{"step": torch.zeros(())}], [torch.ones(3)])
    for bad in ({"ns_steps": 0}, {"ns_steps": 100}, {"ns_coefficients": (1.0, 2.0)}, {"eps": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            t.update([p], t.init([p]), [p], **bad)


@pytest.mark.parametrize(
    "rule,shape,want",
    [
        (None, (20, 13), math.sqrt(20 / 13)),
        ("original", (13, 20), 1.0),
        ("original", (5, 2, 3, 3), math.sqrt(max(1, 5 / 18))),
        ("match_rms_adamw", (13, 20), 0.2 * math.sqrt(20)),
        ("match_rms_adamw", (5, 2, 3, 3), 0.2 * math.sqrt(18)),
    ],
)
def test_scale_by_shape(rule, shape, want) -> None:
    t = scale_by_shape(rule)
    g = torch.randn(*shape, dtype=torch.float64)
    u = t.update([g], t.init([g]), [g])
    torch.testing.assert_close(u[0], want * g, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        t.update([g], t.init([g]), [g], adjust_lr_fn="bogus")


def test_ema_nesterov_reference() -> None:
    mu = 0.9
    t = ema(mu, nesterov=True)
    gen = torch.Generator().manual_seed(4)
    p = torch.zeros(6, dtype=torch.float64)
    state = t.init([p])
    buf = torch.zeros(6, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(6, dtype=torch.float64, generator=gen)
        buf = mu * buf + (1 - mu) * g
        u = t.update([g], state, [p])[0]
        torch.testing.assert_close(u, (1 - mu) * g + mu * buf, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        ema(0.9, debias=True, nesterov=True)


# -- the recipe against torch.optim.Muon (+ torch AdamW for the rest) ---------------------------
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)
    ).double()


def _ns_fp64(grad, ns_coefficients, ns_steps, eps):
    """torch's own Newton–Schulz with its bf16 cast replaced by float64 (the only change)."""
    a, b, c = ns_coefficients
    x = grad.double()
    if grad.size(0) > grad.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def _muon_gap(adjust_lr_fn, ns_dtype, steps: int, nesterov: bool = True) -> float:
    m1 = _model()
    m2 = copy.deepcopy(m1)
    hp = dict(momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    w1 = [[m1[0].weight, m1[2].weight], [m1[4].weight]]
    b1 = [[m1[0].bias, m1[2].bias], [m1[4].bias]]
    o_muon = torch.optim.Muon(
        [{"params": w1[0], "lr": 0.02, "weight_decay": 0.05}, {"params": w1[1]}], lr=0.01, weight_decay=0.1, **hp
    )
    o_adam = torch.optim.AdamW(
        [{"params": b1[0], "lr": 0.003, "weight_decay": 0.01}, {"params": b1[1]}], lr=0.002, weight_decay=0.1
    )
    groups = [
        {"params": [*m2[0].parameters(), *m2[2].parameters()], "lr": 0.02, "weight_decay": 0.05,
         "adamw_lr": 0.003, "adamw_weight_decay": 0.01},
        {"params": m2[4].parameters()},
    ]
    ours = ChainOptimizer(
        groups,
        recipes.muon(lr=0.01, weight_decay=0.1, adamw_lr=0.002, adamw_weight_decay=0.1, ns_dtype=ns_dtype, **hp),
    )
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o_muon, T_max=50)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=50)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, dtype=torch.float64, generator=gen)
    y = torch.randn(256, 5, dtype=torch.float64, generator=gen)
    gap = 0.0
    for i in range(steps):
        xb, yb = x[i % 32 * 8 :][:8], y[i % 32 * 8 :][:8]
        for m, opts, s in ((m1, (o_muon, o_adam), s1), (m2, (ours,), s2)):
            for o in opts:
                o.zero_grad()
            torch.nn.functional.mse_loss(m(xb), yb).backward()
            for o in opts:
                o.step()
            s.step()
        gap = max(gap, max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters())))
    return gap


@pytest.mark.parametrize("adjust_lr_fn,nesterov", [(None, True), ("original", False), ("match_rms_adamw", True)])
def test_muon_matches_torch_fp64(monkeypatch, adjust_lr_fn, nesterov) -> None:
    # torch.optim.Muon always iterates in bf16; give both sides float64 Newton–Schulz
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _ns_fp64)
    assert _muon_gap(adjust_lr_fn, torch.float64, steps=200, nesterov=nesterov) <= 1e-12


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_muon_matches_torch_bf16(adjust_lr_fn) -> None:
    # same precision on both sides (bf16 Newton–Schulz, as torch ships it): identical op sequence
    assert _muon_gap(adjust_lr_fn, torch.bfloat16, steps=8) <= 1e-12


def test_muon_scheduler_moves_the_adamw_part_too() -> None:
    model = make_model()
    opt = ChainOptimizer(list(model.named_parameters()), recipes.muon(lr=0.01, weight_decay=0.0))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr 0 from the start: nothing may move
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_muon_routing() -> None:
    model = make_model()
    opt = ChainOptimizer(list(model.named_parameters()), recipes.muon(lr=0.01))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    names = dict(model.named_parameters())
    muon_names = {n for n, p in names.items() if "momentum.ema" in opt.state.get(p, {})}
    adam_names = {n for n, p in names.items() if "adam.exp_avg" in opt.state.get(p, {})}
    assert muon_names == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert adam_names == set(names) - muon_names
    # by default both parts read the shared "lr" / "weight_decay": a scheduler moves both
    assert "adamw_lr" not in opt.defaults and "adamw_weight_decay" not in opt.defaults
    assert opt.defaults["lr"] == 0.01 and opt.defaults["adamw_betas"] == (0.9, 0.999)
    apart = ChainOptimizer(list(model.named_parameters()), recipes.muon(lr=0.01, adamw_lr=3e-4))
    assert apart.defaults["adamw_lr"] == 3e-4 and apart.defaults["lr"] == 0.01
    assert not recipes.muon_hidden_matrix("embed.weight", torch.zeros(3, 3))
    assert not recipes.muon_hidden_matrix("lm_head.weight", torch.zeros(3, 3))
    assert recipes.muon_hidden_matrix("blocks.0.attn.weight", torch.zeros(3, 3))


CASES = [
    # bf16 Newton–Schulz, torch's default: the matrix steps carry bf16 rounding at every dtype
    RecipeCase("muon", partial(recipes.muon, lr=0.02), dtype_rtol=2**-8),
    RecipeCase(
        "muon_moonlight_fp64", partial(recipes.muon, lr=1e-2, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float64)
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    # fc1 (13 x 20) is sharded 7/6 and fc2 (12 x 13) 6/6: Newton–Schulz on the gathered matrix
    # must give the one-process result to float64 rounding
    check_fsdp2(CASES)


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_holds_one_matrix_of_newton_schulz_at_a_time(fused: bool, monkeypatch) -> None:
    # Newton–Schulz writes each result into its own update, and the eager step runs the matrices'
    # chain a piece of whole matrices at a time (here one matrix a piece): a step holds one
    # matrix's momentum mix and iteration (the fused path: beside the momentum mix in a buffer it
    # keeps), not model-sized updates (2.17x and 1.17x the matrices' bytes before). The fused
    # kernel is inductor's (aot_eager would run the momentum's ops one by one, each with a
    # model-sized output)
    monkeypatch.setattr(runner, "BACKEND", "inductor")
    monkeypatch.setattr(pieces, "PIECE_NUMEL", 64 * 96)
    named = [(f"h{i}.weight", torch.nn.Parameter(torch.randn(64, 96))) for i in range(16)]
    named.append(("h.bias", torch.nn.Parameter(torch.randn(64))))
    opt = ChainOptimizer(named, recipes.muon(), fused=fused)
    for _, p in named:
        p.grad = torch.randn_like(p)
    for _ in range(2):
        opt.step()
    matrices = 16 * 64 * 96 * 4
    peak = peak_bytes(opt.step) / matrices
    assert 0 < peak < 0.5, peak
