"""Lookahead: against the paper's loop around torch.optim inner optimizers, resume, slow-weight eval."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from harness import RecipeCase, check_fsdp2, check_recipe, peak_bytes

import gradchain as gc
from gradchain import ChainOptimizer, lookahead, recipes, slow_weights


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).double()


_gen = torch.Generator().manual_seed(0)
X = torch.randn(128, 6, dtype=torch.float64, generator=_gen)
Y = torch.randn(128, 3, dtype=torch.float64, generator=_gen)


def _grad(model: torch.nn.Module, i: int) -> None:
    model.zero_grad()
    xb, yb = X[i % 16 * 8 :][:8], Y[i % 16 * 8 :][:8]
    torch.nn.functional.mse_loss(model(xb), yb).backward()


def paper_loop(model, inner, k: int, alpha: float, steps: int, pullback: str = "none") -> list[torch.Tensor]:
    """Algorithm 1 of arXiv:1907.08610 around a torch optimizer: phi_0 = theta_0; every k inner steps
    phi <- phi + alpha (theta - phi), theta <- phi; momentum reset / pulled back as pytorch_optimizer."""
    params = list(model.parameters())
    slow = [p.detach().clone() for p in params]
    slow_m = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        _grad(model, t - 1)
        inner.step()
        if t % k == 0:
            with torch.no_grad():
                for p, phi, sm in zip(params, slow, slow_m):
                    phi += alpha * (p - phi)
                    p.copy_(phi)
                    st = inner.state[p]
                    if pullback == "reset":
                        st["momentum_buffer"].zero_()
                    elif pullback == "pullback":
                        st["momentum_buffer"].mul_(alpha).add_(sm, alpha=1 - alpha)
                        sm.copy_(st["momentum_buffer"])
    return [p.detach().clone() for p in params]


def _ours(model, transform, steps: int, start: int = 0, opt=None) -> ChainOptimizer:
    opt = opt or ChainOptimizer(model.parameters(), transform)
    for i in range(start, steps):
        _grad(model, i)
        opt.step()
    return opt


def _gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("pullback", ["none", "reset", "pullback"])
def test_sgd_momentum_matches_paper_loop(pullback) -> None:
    m1, m2 = _model(), _model()
    ref = paper_loop(m1, torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9), 4, 0.5, 30, pullback)
    _ours(m2, recipes.lookahead(recipes.sgd(lr=0.05, momentum=0.9), k=4, alpha=0.5, pullback_momentum=pullback), 30)
    assert _gap(ref, m2.parameters()) <= 1e-12


@pytest.mark.parametrize("k,alpha", [(5, 0.5), (3, 0.8), (1, 0.3), (4, 1.0), (2, 0.0)])
def test_adamw_matches_paper_loop(k, alpha) -> None:
    m1, m2 = _model(), _model()
    ref = paper_loop(m1, torch.optim.AdamW(m1.parameters(), lr=0.01), k, alpha, 23)
    _ours(m2, lookahead(recipes.adamw(lr=0.01), k=k, alpha=alpha), 23)
    assert _gap(ref, m2.parameters()) <= 1e-12


def test_prodigy_with_decoupled_decay_matches_paper_loop() -> None:
    # Prodigy's decoupled decay handed its updates over as a tuple, which Lookahead's sync writes
    # into: TypeError at the first sync
    import contextlib

    import prodigyopt

    m1, m2 = _model(), _model()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line when weight decay is on
        inner = prodigyopt.Prodigy(m1.parameters(), weight_decay=0.05)
    ref = paper_loop(m1, inner, 2, 0.5, 9)
    _ours(m2, lookahead(recipes.prodigy(weight_decay=0.05), k=2, alpha=0.5), 9)
    assert _gap(ref, m2.parameters()) <= 1e-12


def test_resume_mid_cycle() -> None:
    k, steps, cut = 5, 17, 7  # the save lands 2 steps into the second 5-step cycle
    m_ref = _model()
    ref = paper_loop(m_ref, torch.optim.SGD(m_ref.parameters(), lr=0.05, momentum=0.9), k, 0.5, steps, "pullback")

    def make(model):
        return ChainOptimizer(
            model.parameters(), recipes.lookahead(recipes.sgd(lr=0.05, momentum=0.9), k, 0.5, "pullback")
        )

    m1 = _model()
    o1 = _ours(m1, None, cut, opt=make(m1))
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    m2 = _model()
    m2.load_state_dict(ckpt["model"])
    o2 = make(m2)
    o2.load_state_dict(ckpt["opt"])
    st = o2.state[next(iter(m2.parameters()))]
    assert float(st["step"]) == cut and st["lookahead.slow"].dtype == torch.float64
    assert not torch.equal(st["lookahead.slow"], next(iter(m2.parameters())))  # slow != fast mid-cycle
    _ours(m2, None, steps, start=cut, opt=o2)
    assert _gap(ref, m2.parameters()) <= 1e-12


def test_slow_weights_swap_and_restore() -> None:
    model = _model()
    opt = _ours(model, lookahead(recipes.adamw(lr=0.01), k=5), 7)
    fast = [p.detach().clone() for p in model.parameters()]
    slow = [opt.state[p]["lookahead.slow"].clone() for p in model.parameters()]
    assert _gap(fast, slow) > 0
    with slow_weights(opt):
        assert _gap(model.parameters(), slow) == 0
    assert _gap(model.parameters(), fast) == 0
    with pytest.raises(KeyError):
        with slow_weights(opt):
            raise KeyError("evaluation failed")
    assert _gap(model.parameters(), fast) == 0
    with pytest.raises(RuntimeError, match="slow_weights"):
        with slow_weights(opt):
            _grad(model, 0)
            opt.step()
    assert _gap(model.parameters(), fast) == 0
    plain = ChainOptimizer(model.parameters(), recipes.adamw())
    with pytest.raises(ValueError, match="lookahead"):
        with slow_weights(plain):
            pass


def test_slow_weights_low_precision() -> None:
    model = _model().to(torch.bfloat16)
    opt = ChainOptimizer(model.parameters(), lookahead(recipes.adamw(lr=0.01), k=3))
    for _ in range(4):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(X[:8].bfloat16()).float(), Y[:8].float()).backward()
        opt.step()
    p = next(iter(model.parameters()))
    assert opt.state[p]["lookahead.slow"].dtype == torch.float32
    fast = p.detach().clone()
    with slow_weights(opt):
        assert torch.equal(p, opt.state[p]["lookahead.slow"].to(torch.bfloat16))
    assert torch.equal(p, fast)


@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_sync_reads_the_unrounded_fast_weights(fused: bool, monkeypatch) -> None:
    # a step's math is fp32 and only the write rounds a bf16 param: a sync pulls the fp32 slow weights
    # toward the fast weights p + u before they are rounded, on both paths (the fused path read them
    # from the param, rounded: up to half a bf16 ulp off at every sync)
    from gradchain import scale_by_lr
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    p0 = torch.randn(256, dtype=torch.float64).to(torch.bfloat16).double()
    grads = [torch.randn(256, dtype=torch.float64).to(torch.bfloat16).double() for _ in range(4)]
    p = torch.nn.Parameter(p0.to(torch.bfloat16))
    opt = ChainOptimizer([p], lookahead(scale_by_lr(0.25), k=2, alpha=0.5), fused=fused)
    held, slow = p0.clone(), p0.clone()  # what the param holds; the slow weights
    for t, g in enumerate(grads, 1):
        p.grad = g.to(torch.bfloat16)
        opt.step()
        fast = held - 0.25 * g
        if t % 2 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow
        held = fast.to(torch.bfloat16).double()
        assert torch.equal(p.detach().double(), held), t
    torch.testing.assert_close(opt.state[p]["lookahead.slow"].double(), slow, rtol=0, atol=1e-6)


def test_invalid() -> None:
    model = _model()
    with pytest.raises(ValueError, match="lookahead_k"):
        ChainOptimizer(model.parameters(), lookahead(recipes.adamw(), k=0))
    with pytest.raises(ValueError, match="lookahead_alpha"):
        ChainOptimizer(model.parameters(), lookahead(recipes.adamw()), lookahead_alpha=1.5)
    with pytest.raises(ValueError, match="pullback_momentum"):
        lookahead(recipes.adamw(), pullback_momentum="bogus")
    opt = ChainOptimizer(model.parameters(), lookahead(recipes.sgd(lr=0.1), pullback_momentum="reset"))
    _grad(model, 0)
    with pytest.raises(ValueError, match="momentum buffer"):
        opt.step()
    with pytest.raises(ValueError, match="lookahead_k"):
        lookahead(lookahead(recipes.adamw()))
    assert lookahead(recipes.adamw()).prefixed("la_").hyperparams.keys() >= {"la_lookahead_k", "la_lr"}


def la_adamw():
    return recipes.lookahead(recipes.adamw(lr=1e-2), k=3, alpha=0.5)


def la_sgd_pullback():
    return recipes.lookahead(recipes.sgd(lr=0.05, momentum=0.9), k=2, alpha=0.6, pullback_momentum="pullback")


def la_muon_reset():
    return recipes.lookahead(recipes.muon(lr=0.02, ns_dtype=torch.float64), k=3, pullback_momentum="reset")


# lookahead around adamw is checked numerically above; the harness takes momentum and a partition
CASES = [
    RecipeCase("lookahead_sgd_pullback", la_sgd_pullback),
    RecipeCase("lookahead_muon_reset", la_muon_reset),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_harness(case: RecipeCase) -> None:
    check_recipe(case)


@pytest.mark.distributed
def test_fsdp2() -> None:
    check_fsdp2(CASES)


def test_deepcopy_keeps_slow_state() -> None:
    model = _model()
    opt = _ours(model, la_adamw(), 4)
    clone = copy.deepcopy(opt)
    for st, st2 in zip(opt.state.values(), clone.state.values()):
        assert torch.equal(st["lookahead.slow"], st2["lookahead.slow"])


def test_inside_apply_if_finite_and_accumulate() -> None:
    from gradchain import accumulate, apply_if_finite

    model = _model()
    opt = _ours(model, apply_if_finite(lookahead(recipes.adamw(lr=0.01), k=2)), 3)
    p = next(iter(model.parameters()))
    before, slow = p.detach().clone(), opt.state[p]["lookahead.slow"].clone()
    _grad(model, 3)
    p.grad[0, 0] = float("inf")
    opt.step()  # step 4 would sync: skipped, so neither the params nor the slow weights move
    assert torch.equal(p, before) and torch.equal(opt.state[p]["lookahead.slow"], slow)
    assert float(opt.state[p]["step"]) == 3

    # accumulate outside: the k-cycle counts real (large-batch) steps
    m1, m2 = _model(), _model()
    o1 = ChainOptimizer(m1.parameters(), accumulate(lookahead(recipes.sgd(lr=0.1), k=2), 2))
    o2 = ChainOptimizer(m2.parameters(), lookahead(recipes.sgd(lr=0.1), k=2))
    for i in range(8):
        _grad(m1, i)
        o1.step()
        if i % 2 == 1:  # the mean of the two micro-batch gradients, as the large batch
            _grad(m2, i - 1)
            g0 = [q.grad.clone() for q in m2.parameters()]
            _grad(m2, i)
            for q, g in zip(m2.parameters(), g0):
                q.grad = (q.grad + g) / 2
            o2.step()
    assert _gap(m1.parameters(), m2.parameters()) <= 1e-12


def test_nothing_may_follow_lookahead_or_schedule_free_in_a_chain() -> None:
    # (accepted before: the lr after a lookahead scaled its sync too, 0.83 where the rule gives 0.9)
    with pytest.raises(ValueError, match=r"lookahead is followed by lr in a chain, but nothing may follow it.*inside"):
        gc.chain(gc.lookahead(gc.scale(1.0), k=2), gc.scale_by_lr(0.1))
    with pytest.raises(ValueError, match="lookahead is followed by partition"):
        gc.chain(gc.partition({"a": gc.lookahead(gc.chain(gc.scale_by_adam(), gc.scale_by_lr(0.1)))},
                              lambda n, p: "a"), gc.partition({"a": gc.scale(2.0)}, lambda n, p: "a"))
    with pytest.raises(ValueError, match="schedule_free is followed by wd in a chain.*before it"):
        gc.chain(gc.schedule_free(0.1), gc.add_decoupled_wd(0.1))
    # around it, or last: as before
    gc.apply_if_finite(gc.lookahead(gc.chain(gc.scale_by_adam(), gc.scale_by_lr(0.1))))
    gc.chain(gc.add_decoupled_wd(0.1), gc.lookahead(gc.chain(gc.scale_by_adam(), gc.scale_by_lr(0.1))))
    gc.chain(gc.add_decoupled_wd(0.1), gc.schedule_free(0.1))


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_a_sync_step_holds_the_update_and_nothing_more(inner: str) -> None:
    # the eager sync formed theta = p + u and phi - p as new tensors beside the update: 3x the
    # params on every k-th step, where the steps between hold a cache-sized piece; now theta and
    # phi - p are formed in the update's own buffer
    w = torch.nn.Parameter(torch.randn(512, 512) * 0.02)
    opt = ChainOptimizer([w], recipes.lookahead(getattr(recipes, inner)(lr=1e-3), k=2))
    w.grad = torch.randn_like(w) * 1e-3
    opt.step()
    before = w.detach().clone()
    slow = opt.state[w]["lookahead.slow"].clone()
    peak = peak_bytes(opt.step) / (512 * 512 * 4)  # step 2: a sync
    assert float(opt.state[w]["step"]) == 2 and not torch.equal(slow, opt.state[w]["lookahead.slow"])
    assert torch.equal(w.detach(), opt.state[w]["lookahead.slow"]) and not torch.equal(w.detach(), before)
    assert peak < 1.5, peak
