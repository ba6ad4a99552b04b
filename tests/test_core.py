"""The core contract: Transform, chain, ChainOptimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import gradchain as gc
from gradchain import ChainOptimizer, Hyperparam, recipes


def test_transform_alone_matches_float64_adam_reference() -> None:
    """A transform is testable on plain tensors: scale_by_adam against the rule written out."""
    t = gc.scale_by_adam(betas=(0.8, 0.9), eps=1e-6)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, dtype=torch.float64, generator=g), torch.randn((), dtype=torch.float64, generator=g)]
    state = t.init(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for step in range(1, 8):
        grads = [torch.randn_like(p) for p in params]
        if step == 3:
            grads[0] = torch.zeros_like(grads[0])
        out = t.update(grads, state, params)
        for i, gr in enumerate(grads):
            m[i] = 0.8 * m[i] + 0.2 * gr
            v[i] = 0.9 * v[i] + 0.1 * gr * gr
            want = (m[i] / (1 - 0.8**step)) / ((v[i] / (1 - 0.9**step)).sqrt() + 1e-6)
            torch.testing.assert_close(out[i], want, rtol=1e-14, atol=1e-15)
        assert float(state[0]["step"]) == step


def test_eps_root_inside_the_root() -> None:
    t = gc.scale_by_adam(eps=0.0, eps_root=1e-4)
    p = torch.zeros(5, dtype=torch.float64)
    gr = torch.linspace(-1, 1, 5, dtype=torch.float64)
    (u,) = t.update([gr], t.init([p]), [p])
    torch.testing.assert_close(u, gr / (gr * gr + 1e-4).sqrt(), rtol=1e-14, atol=0)


def test_trace_alone_matches_torch_sgd_rule() -> None:
    t = gc.trace(0.9, dampening=0.2)
    p = torch.zeros(6, dtype=torch.float64)
    state = t.init([p])
    buf = None
    for _ in range(5):
        gr = torch.randn(6, dtype=torch.float64)
        (u,) = t.update([gr], state, [p])
        buf = gr.clone() if buf is None else 0.9 * buf + 0.8 * gr
        torch.testing.assert_close(u, buf, rtol=0, atol=1e-15)


def test_update_does_not_write_grads_or_state_through_outputs() -> None:
    model = torch.nn.Linear(3, 2).double()
    opt = ChainOptimizer(model.parameters(), gc.chain(gc.trace(0.9), gc.scale(2.0), gc.scale_by_lr(0.1)))
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
        assert torch.equal(opt.state[p]["momentum.buffer"], g)


class _Recorder:
    """A loss-aware transform that records the loss it sees (test-only)."""

    def __init__(self) -> None:
        self.seen: list = []
        rec = self

        def update(updates, state, hp, ctx):
            rec.seen.append(None if ctx.loss is None else float(ctx.loss))
            return updates

        self.t = gc.transform("recorder", update=update)


def test_loss_reaches_transforms_by_closure_loss_and_gradscaler() -> None:
    rec = _Recorder()
    model = torch.nn.Linear(3, 1)
    opt = ChainOptimizer(model.parameters(), gc.chain(rec.t, gc.scale_by_lr(0.01)))
    x = torch.randn(8, 3)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        ret = opt.step(closure)
    assert rec.seen[-1] == pytest.approx(float(ret.detach()))
    loss = closure()
    assert opt.step(loss=loss) is loss and rec.seen[-1] == pytest.approx(float(loss.detach()))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt, loss=loss.detach())
    scaler.update()
    assert rec.seen[-1] == pytest.approx(float(loss.detach()))
    with pytest.raises(ValueError, match="either"):
        opt.step(closure, loss=loss)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda p: ChainOptimizer(p, recipes.adamw(lr=-1e-3)), "lr"),
        (lambda p: ChainOptimizer(p, recipes.adamw(), lr=-1.0), "lr"),
        (lambda p: ChainOptimizer(p, recipes.adamw(betas=(0.9, 1.0))), "betas"),
        (lambda p: ChainOptimizer(p, recipes.adam(), betas=(-0.1, 0.9)), "betas"),
        (lambda p: ChainOptimizer(p, recipes.adam(eps=-1e-8)), "eps"),
        (lambda p: ChainOptimizer(p, recipes.adamw(weight_decay=-0.1)), "weight_decay"),
        (lambda p: ChainOptimizer(p, recipes.sgd(momentum=-0.5)), "momentum"),
        (lambda p: ChainOptimizer(p, recipes.sgd(lr=float("nan"))), "lr"),
        (lambda p: ChainOptimizer(p, recipes.sgd(momentum=0.9, dampening=0.5, nesterov=True)), "Nesterov"),
        (lambda p: ChainOptimizer(p, recipes.sgd(), maximize="yes"), "maximize"),
    ],
)
def test_invalid_hyperparameters_are_named(make, key) -> None:
    with pytest.raises(ValueError, match=key):
        make([torch.nn.Parameter(torch.zeros(2))])


def test_unknown_hyperparameters_are_errors() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="lrr"):
        ChainOptimizer([p], recipes.adamw(), lrr=0.1)
    opt = ChainOptimizer([p], recipes.sgd())
    with pytest.raises(ValueError, match="betas"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (0.9, 0.99)})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -3.0})
    assert len(opt.param_groups) == 1


def test_duplicate_names_and_conflicting_defaults() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        gc.chain(gc.scale_by_adam(), gc.scale_by_adam())
    # two transforms reading one key: an error unless shared on purpose
    with pytest.raises(ValueError, match="share="):
        gc.chain(gc.scale_by_adam(), gc.scale_by_adam(name="adam2"))
    gc.chain(gc.scale_by_adam(), gc.scale_by_adam(name="adam2"), share=["betas", "eps", "eps_root", "amsgrad"])
    with pytest.raises(ValueError, match="lr"):
        gc.chain(gc.scale_by_lr(0.1), gc.scale_by_lr(0.2, name="lr2"))


def _train(model, opt, steps, start=0, dtype=torch.float64):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(5, 4, generator=g).to(dtype)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step(loss=loss)


def test_bf16_state_stays_fp32_through_save_and_load() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = ChainOptimizer(model.parameters(), recipes.adamw(lr=1e-2))
    _train(model, opt, 3, dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = ChainOptimizer(model.parameters(), recipes.adamw(lr=1e-2))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert opt2.state[p][k].dtype == v.dtype
            assert torch.equal(opt2.state[p][k], v)
        assert opt2.state[p]["adam.exp_avg"].dtype == torch.float32


def test_load_rejects_other_chain_and_other_structure() -> None:
    model = torch.nn.Linear(4, 3).double()
    opt = ChainOptimizer(model.parameters(), recipes.adamw())
    _train(model, opt, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="different chain"):
        ChainOptimizer(model.parameters(), recipes.sgd(momentum=0.9)).load_state_dict(sd)
    sd_no_meta = {k: v for k, v in sd.items() if k != "gradchain"}
    with pytest.raises(ValueError, match="different chain"):
        ChainOptimizer(model.parameters(), recipes.nadam()).load_state_dict(sd_no_meta)
    # a group's options decide the state it needs: amsgrad=True without its running max is refused
    bad = {**sd, "param_groups": [{**g, "amsgrad": True} for g in sd["param_groups"]]}
    with pytest.raises(ValueError, match="different chain"):
        ChainOptimizer(model.parameters(), recipes.adamw()).load_state_dict(bad)
    with pytest.raises(ValueError, match="param groups"):
        ChainOptimizer([{"params": [model.weight]}, {"params": [model.bias]}], recipes.adamw()).load_state_dict(sd)
    # a failed load leaves the optimizer as it was
    target = ChainOptimizer(model.parameters(), recipes.sgd(momentum=0.9))
    with pytest.raises(ValueError):
        target.load_state_dict(sd)
    assert not target.state and target.param_groups[0]["lr"] == 1e-3


def test_named_parameters_deepcopy_state_dtype_and_init_state() -> None:
    model = torch.nn.Linear(4, 3).double()
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw(), state_dtype=torch.float32)
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    opt.init_state()
    assert all(float(opt.state[p]["step"]) == 0 for p in model.parameters())
    assert opt.state[model.weight]["adam.exp_avg"].dtype == torch.float32
    _train(model, opt, 2)
    model2 = copy.deepcopy(model)
    clone = copy.deepcopy(opt)
    assert clone.transform is not None and len(clone.state) == len(opt.state)
    clone2 = ChainOptimizer(model2.named_parameters(), recipes.adamw(), state_dtype=torch.float32)
    clone2.load_state_dict(opt.state_dict())
    _train(model, opt, 2, start=2)
    _train(model2, clone2, 2, start=2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "nadam", "schedule_free_adamw"])
def test_state_dtype_covers_a_scalar_param(name: str) -> None:
    # a 0-d param (a learnable gain) gets its buffers in state_dtype too; per-tensor scalars keep theirs
    gain, w = torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.randn(3, 2))
    opt = ChainOptimizer([gain, w], getattr(recipes, name)(), state_dtype=torch.bfloat16)
    for _ in range(2):
        gain.grad, w.grad = torch.tensor(0.3), torch.ones(3, 2)
        opt.step()
    # the buffers: what a 1-element vector param gets as vectors
    buffers = {k for k, v in getattr(recipes, name)().init_state(torch.zeros(1)).items() if v.dim() > 0}
    for p in (gain, w):
        for k, v in opt.state[p].items():
            assert v.dtype == (torch.bfloat16 if k in buffers else opt.state[w][k].dtype), (name, k)
    assert torch.isfinite(gain) and torch.isfinite(w).all()


def test_uneven_step_counts_match_torch_adam() -> None:
    """A param that misses steps (grad None) keeps its own count: per-tensor bias corrections."""
    torch.manual_seed(0)
    a = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)]).double()
    b = copy.deepcopy(a)
    ta = torch.optim.Adam(a.parameters(), lr=0.05)
    tb = ChainOptimizer(b.parameters(), recipes.adam(lr=0.05))
    for i in range(12):
        x = torch.randn(4, 3, dtype=torch.float64)
        for m, o in ((a, ta), (b, tb)):
            o.zero_grad()
            h = m[0](x)
            out = m[1](h) if i % 3 else h.sum(1, keepdim=True)
            out.pow(2).mean().backward()
            o.step()
    assert {float(tb.state[p]["step"]) for p in b.parameters()} == {12.0, 8.0}
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_step_counts_are_views_of_one_vector_and_survive_a_checkpoint() -> None:
    """The eager path advances a bucket's step counts with one add: state["step"] are 0-d views of
    one vector. A param that misses a step keeps its count, and a loaded checkpoint continues."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(5)]
    opt = ChainOptimizer(params, recipes.adam(lr=0.1))
    for i in range(3):
        for j, p in enumerate(params):
            p.grad = None if (i == 1 and j == 0) else torch.randn(4)
        opt.step()
    steps = [opt.state[p]["step"] for p in params]
    assert [float(t) for t in steps] == [2.0, 3.0, 3.0, 3.0, 3.0]
    assert len({t.untyped_storage().data_ptr() for t in steps}) == 1 and all(t.dim() == 0 for t in steps)
    steps[2].fill_(7.0)  # a user's in-place edit of one count is that param's count
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = ChainOptimizer(copies, recipes.adam(lr=0.1))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for q, p in zip(copies, params):
        q.grad = torch.ones(4)
        p.grad = torch.ones(4)
    opt.step()
    other.step()
    assert [float(other.state[q]["step"]) for q in copies] == [3.0, 4.0, 8.0, 4.0, 4.0]
    for p, q in zip(params, copies):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        assert float(opt.state[p]["step"]) == float(other.state[q]["step"])


def test_grad_none_param_untouched_and_sparse_error() -> None:
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = ChainOptimizer([used, unused], recipes.adamw(lr=0.1))
    used.grad = torch.ones(2)
    opt.step()
    assert torch.equal(unused, torch.ones(2)) and unused not in opt.state
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = ChainOptimizer(emb.parameters(), recipes.sgd())
    emb(torch.tensor([0])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_callable_hyperparameter_is_a_schedule_of_the_step() -> None:
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ChainOptimizer([p], gc.chain(gc.scale_by_lr(lambda step: 0.1 * step)))
    for _ in range(3):
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    assert p.item() == pytest.approx(-(0.1 + 0.2 + 0.3))


@pytest.mark.parametrize("how", ["update", "decay"])
def test_low_precision_write_rounds_once(how: str) -> None:
    # bf16 params: the new value p + u (decay folded in) is formed in fp32 and rounded once. The
    # numbers sit where a second rounding changes the result: bf16 holds 1.0 and 1.0078125 (below:
    # 0.99609375); 1.00390625 is the midpoint, a tie that rounds to even (1.0).
    bf16 = torch.bfloat16
    p = torch.nn.Parameter(torch.ones(4, dtype=bf16))
    if how == "update":
        # u = lr * 2^-8 = 0.00391016: 1 + u rounds up; u rounded to bf16 first is 2^-8, then 1 + 2^-8 ties to 1.0
        lr = 1.001
        opt = ChainOptimizer([p], gc.chain(gc.scale_by_lr(lr)))
        p.grad = torch.full((4,), -(2.0**-8), dtype=bf16)
        exact = 1.0 + lr * 2.0**-8
        twice = 1.0 + float(torch.tensor(lr * 2.0**-8).to(bf16))
    else:
        # AdamW's first step: p (1 - lr wd) + lr g/(|g| + eps) = 1 - 0.002 + 0.0065 = 1.0045 rounds up;
        # decaying first rounds 0.998 down to 0.99609375, and 0.99609375 + 0.0065 rounds to 1.0
        lr, wd = 0.0065, 0.002 / 0.0065
        opt = ChainOptimizer([p], recipes.adamw(lr=lr, weight_decay=wd))
        p.grad = torch.full((4,), -1.0, dtype=bf16)
        exact = 1.0 - lr * wd + lr / (1 + 1e-8)
        twice = float(torch.tensor(1.0 - lr * wd).to(bf16)) + lr / (1 + 1e-8)
    once = torch.tensor(exact, dtype=torch.float64).to(bf16)
    assert once != torch.tensor(twice, dtype=torch.float64).to(bf16)  # so this test can fail
    assert once != 1.0  # and the step moves the param
    opt.step()
    assert torch.equal(p.detach(), once.expand(4))


def test_hyperparam_spec_validates_defaults() -> None:
    with pytest.raises(ValueError, match="decay"):
        gc.ema(decay=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        gc.transform("x", {"a": Hyperparam(1.0)})



def test_same_value_tells_apart_what_makes_another_tensor() -> None:
    from gradchain.hyperparams import same_value

    assert same_value(0.9, 0.9) and same_value((0.9, 0.999), (0.9, 0.999)) and same_value(None, None)
    assert same_value("two_largest", "two_largest") and same_value(3, 3)
    assert not same_value(0.0, -0.0)  # a zero's sign reaches the math (1 / -0.0)
    assert not same_value(1, 1.0) and not same_value(True, 1) and not same_value((0.9, 0.99), [0.9, 0.99])
    assert not same_value((0.9, 0.999), (0.9, 0.99)) and not same_value(float("nan"), float("nan"))
    t = torch.tensor(0.5)
    assert not same_value(t, t)  # a tensor's value may change in place: never taken as the same


def test_eager_division_reuses_only_buffers_the_step_made(monkeypatch) -> None:
    # a large quotient goes into its divisor when the step made that buffer (no fresh model-sized
    # buffer); a divisor that is state, a gradient or shared by two tensors is never written
    n = gc.base._DIVIDE_IN_PLACE

    def init(p):
        return {"d": torch.full_like(p, 2.0)}

    def by_state(updates, state, hp, ctx):
        ctx.defer_divide(state["d"])  # a state buffer: must survive the division
        return updates

    def by_grad(updates, state, hp, ctx):
        ctx.defer_divide([g.abs() + 1.0 for g in ctx.grads][:1] + [ctx.grads[1]])  # fresh, then the grad
        return updates

    def by_shared(updates, state, hp, ctx):
        d = torch.full_like(updates[0], 4.0)
        ctx.defer_divide([d, d])  # one buffer for two tensors
        return updates

    for rule, keep in ((by_state, "state"), (by_grad, "grad"), (by_shared, "shared")):
        results = []
        for limit in (1 << 62, n):  # never in place, then in place where it may
            monkeypatch.setattr(gc.base, "_DIVIDE_IN_PLACE", limit)
            torch.manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(n)) for _ in range(2)]
            t = gc.transform("div", {}, init if keep == "state" else None, rule)
            opt = gc.ChainOptimizer(ps, gc.chain(t, gc.clip_by_block_rms(0.5), gc.scale_by_lr(0.1)))
            for i in range(3):
                for p in ps:
                    p.grad = torch.full_like(p, 0.5 + i)
                grads = [p.grad.clone() for p in ps]
                opt.step()
                assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))  # grads untouched
            if keep == "state":
                assert all(torch.equal(opt.state[p]["div.d"], torch.full_like(p, 2.0)) for p in ps)
            results.append([p.detach().clone() for p in ps])
        assert all(torch.equal(a, b) for a, b in zip(*results)), keep  # the same bits either way


# -- a pending interpolation (Bucket.defer_lerp) ------------------------------------------------
def _toward(weight: float, scale: float) -> gc.Leaf:
    """``p <- p + weight (t - p) + scale g`` with ``t`` a buffer of its own: the final write's
    interpolation, as schedule-free's step toward ``z`` uses it."""

    def init(p: torch.Tensor) -> dict:
        return {"t": 2.0 * p.detach() + 1.0}

    def update(updates: list, state: dict, hp: dict, ctx) -> list:
        ctx.defer_scale(scale)
        ctx.defer_lerp(state["t"], weight)
        return updates

    return gc.transform("toward", None, init, update, elementwise=True)


@pytest.mark.parametrize("how", ["written", "materialized", "in slices", "scaled after"])
def test_pending_interpolation(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the write moves p toward t with one lerp and adds the scaled update; a transform after it that
    # needs the values (a clip), or defers a scale of its own, sees it materialized: the same step
    from gradchain import pieces

    w, s = 0.3, -0.05
    tail = {"materialized": [gc.clip_by_global_norm(1e30)], "scaled after": [gc.scale(0.5)]}.get(how, [])
    if how == "in slices":
        monkeypatch.setattr(pieces, "PIECE_NUMEL", 16)
    p = torch.nn.Parameter(torch.randn(10, 10, dtype=torch.float64))
    opt = ChainOptimizer([p], gc.chain(_toward(w, s), *tail))
    want, t = p.detach().clone(), 2.0 * p.detach() + 1.0
    for k in range(3):
        g = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        p.grad = g
        opt.step()
        step = w * (t - want) + s * g
        want = want + (0.5 * step if how == "scaled after" else step)
    torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=1e-13)


def _per_step_forms(form: str) -> gc.Leaf:
    """A pending form whose factor is ``ctx.per_step(...)``: one value per tensor once the params'
    step counts differ. ``lerp``: ``p <- p + (0.2 / t) (a - p) + u`` toward a buffer ``a``;
    ``decay``: ``u + 0.1 min(1, t / 4) p`` (a param term), then scaled by 0.5 after it."""
    if form == "decay":
        ramp = gc.transform("ramp", None, param_term=lambda hp, ctx: ctx.per_step(lambda t: 0.1 * min(1.0, t / 4)))
        return gc.chain(ramp, gc.scale(0.5))

    def update(updates: list, state: dict, hp: dict, ctx) -> list:
        ctx.defer_lerp(state["a"], ctx.per_step(lambda t: 0.2 / t))
        return updates

    return gc.transform("pull", None, lambda p: {"a": 3.0 * p.detach() - 1.0}, update, elementwise=True)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("form", ["lerp", "decay"])
def test_pending_forms_take_one_factor_per_tensor(form: str, fused: bool) -> None:
    # a per-step factor is a list where the params' step counts differ (one skipped a step): the
    # pending interpolation and param term take it per tensor, as the rule of each param's own count
    g0 = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(4, 3, generator=g0, dtype=torch.float64)),
          torch.nn.Parameter(torch.randn(5, generator=g0, dtype=torch.float64))]
    want = [p.detach().clone() for p in ps]
    anchors = [3.0 * w - 1.0 for w in want]
    counts = [0, 0]
    opt = ChainOptimizer(ps, _per_step_forms(form), fused=fused)
    for k in range(4):
        for j, p in enumerate(ps):
            p.grad = None if (k, j) == (0, 1) else torch.full_like(p, 0.1 * (k + 1))
            if p.grad is None:
                continue
            counts[j] += 1
            t, g = counts[j], p.grad.detach()
            if form == "lerp":
                want[j] = want[j] + (0.2 / t) * (anchors[j] - want[j]) + g
            else:
                want[j] = want[j] + 0.5 * (g + 0.1 * min(1.0, t / 4) * want[j])
        opt.step()
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=1e-13)


def test_root_divisor_formed_when_needed() -> None:
    # Adam's pending denominator sqrt(v) / c + eps is formed from v by the write or by materialize,
    # with the bits of forming it in the transform; a sub-bucket takes views of v and its entries
    # of a per-tensor c; pieces join back into one over whole tensors only where eps agrees
    from gradchain.base import Bucket, RootDivisor

    gen = torch.Generator().manual_seed(5)
    v = [torch.rand(6, 5, generator=gen, dtype=torch.float32) for _ in range(3)]
    m = [torch.randn(6, 5, generator=gen, dtype=torch.float32) for _ in range(3)]
    c, eps = [0.3, 0.5, 0.7], 1e-3
    want = [mi / (vi.sqrt() / ci + eps) for mi, vi, ci in zip(m, v, c, strict=True)]
    params = [torch.zeros(6, 5) for _ in range(3)]

    def bucket() -> Bucket:
        b = Bucket(params, [x.clone() for x in m], {"adam.exp_avg_sq": v}, [torch.tensor(1.0)] * 3, [None] * 3, {})
        b.defer_divide(RootDivisor(v, c, eps))
        return b

    for got, w in zip(bucket().materialize(), want, strict=True):
        assert torch.equal(got, w)
    sub = bucket().subset([2, 0], [slice(4, 20), None], carry_pending=True)
    assert isinstance(sub.divisor, RootDivisor) and sub.divisor.c == [0.7, 0.3]
    assert sub.divisor.v[0].data_ptr() == v[2].view(-1)[4:].data_ptr()
    assert torch.equal(sub.materialize()[0], want[2].view(-1)[4:20])
    b = bucket()
    b.write()
    for p, w in zip(params, want, strict=True):
        assert torch.equal(p, w)
    d = RootDivisor(v, c, eps)
    joined = RootDivisor.joined([(d, 1), (d, 1)], v[:2])
    assert joined is not None and joined.c == 0.5 and joined.eps == eps
    assert RootDivisor.joined([(d, 0), (RootDivisor(v, c, 1e-8), 1)], v[:2]) is None


def test_addcdiv_with_a_cpu_tensor_factor() -> None:
    # a 0-d CPU factor takes the one list op of a number (its value read on the host, free on the
    # CPU): the bits of the number's addcdiv, and the tensor form's values
    from gradchain import ops

    gen = torch.Generator().manual_seed(7)
    a = [torch.randn(50, generator=gen) for _ in range(3)]
    b = [torch.rand(50, generator=gen) + 0.5 for _ in range(3)]
    s = torch.tensor(-0.37, dtype=torch.float32)
    with_tensor, with_number = [torch.ones(50) for _ in range(3)], [torch.ones(50) for _ in range(3)]
    ops.addcdiv_(with_tensor, a, b, s)
    torch._foreach_addcdiv_(with_number, a, b, float(s))
    for x, y, ai, bi in zip(with_tensor, with_number, a, b, strict=True):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, 1.0 + (ai / bi) * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_ops_with_a_number_keep_the_bits_of_torch_foreach(dtype: torch.dtype) -> None:
    # on CPU a number becomes one 0-d tensor of the list's dtype (not one per tensor): the bits
    # of torch's list op with the number, for awkward factors, divisors and terms
    from gradchain import ops

    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=gen, dtype=dtype) * 1e3 for n in (1, 7, 300)]
    for s in (0.1, 1.0 / 3.0, 1e-30, 7.0e20, -2.5):
        for ours, theirs in ((ops.mul_, torch._foreach_mul_), (ops.div_, torch._foreach_div_),
                             (ops.add_, torch._foreach_add_)):
            a, b = [x.clone() for x in xs], [x.clone() for x in xs]
            ours(a, s)
            theirs(b, s)
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (ours.__name__, s)


def test_sums_of_nonnegative_tensors() -> None:
    # each tensor's sum (what the list L1 norm gives for entries >= 0), in the list's dtype
    from gradchain import ops

    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xs = [torch.rand(n, generator=gen).to(dtype) for n in (1, 5, 4097)] + [torch.zeros(0, dtype=dtype)]
        got = ops.sums_nonneg(xs)
        assert [g.dtype for g in got] == [dtype] * 4
        want = [x.double().sum() for x in xs]
        tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=0.0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["lamb", "adafactor", "agc_sgd", "adanorm"])
def test_state_dtype_narrower_than_the_params_takes_per_tensor_norms(name: str, fused: bool, monkeypatch) -> None:
    # fp32 params, bf16 state: a norm of the params accumulates in fp32 and is then cast (torch refuses
    # a norm of fp32 tensors with dtype=bf16: these recipes raised at the first step). Each update is
    # the fp32-state one to bf16 precision: a few bf16 ulps of the largest move per step
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    build = {"lamb": lambda: recipes.lamb(lr=0.01), "adafactor": lambda: recipes.adafactor(min_dim_size_to_factor=8),
             "agc_sgd": lambda: recipes.agc_sgd(lr=0.01, momentum=0.9),
             "adanorm": lambda: recipes.adanorm(lr=0.01)}[name]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(16, 12, generator=gen), torch.randn(16, generator=gen)]
    grads = [[torch.randn(x.shape, generator=gen) for x in start] for _ in range(3)]

    def run(state_dtype):
        ps = [torch.nn.Parameter(x.clone()) for x in start]
        opt = ChainOptimizer(ps, build(), fused=fused, state_dtype=state_dtype)
        moves = []
        for gs in grads:
            before = [p.detach().clone() for p in ps]
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
            moves.append(max((p.detach() - b).abs().max().item() for p, b in zip(ps, before)))
        return ps, moves

    (narrow, _), (exact, moves) = run(torch.bfloat16), run(None)
    bound = 4 * torch.finfo(torch.bfloat16).eps * sum(moves)
    assert sum(moves) > 0
    for a, b in zip(narrow, exact):
        assert (a.detach() - b.detach()).abs().max().item() <= bound, (name, bound)


class _GlobalClip(gc.Transform):
    """A user's whole-step transform: ``u <- u c / max(c, ||u||)`` over every bucket's updates."""

    name = "gclip"

    def __init__(self, max_norm: float = 1.0) -> None:
        self._max_norm = max_norm

    @property
    def hyperparams(self) -> dict:
        return {"max_norm": Hyperparam(self._max_norm, lambda v: None if v > 0 else "must be > 0")}

    def init_state(self, param: torch.Tensor, name: str | None = None) -> dict:
        return {}

    def apply(self, buckets: list) -> None:
        live = [b for b in buckets if len(b)]
        for b in live:
            b.materialize()
        total = torch.stack([torch.stack(torch._foreach_norm(b.updates)).square().sum() for b in live]).sum().sqrt()
        for b in live:
            c = self.resolved_hyperparams(b)["max_norm"]
            b.updates = torch._foreach_mul(b.updates, (c / torch.clamp(total, min=c)).to(b.dtype))


@pytest.mark.parametrize("value", ["number", "schedule", "1-element tensor"])
def test_a_subclass_reads_its_hyperparameters_resolved(value: str) -> None:
    # a schedule is evaluated at the group's step and a 1-element tensor read as a number, as a leaf's hp
    given = {"number": 0.5, "schedule": gc.schedules.linear(0.5, 0.1, 10),
             "1-element tensor": torch.tensor([0.5], dtype=torch.float64)}[value]
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    opt = ChainOptimizer([p], gc.chain(_GlobalClip(), gc.scale_by_lr(0.1)), max_norm=given)
    want = p.detach().clone()
    for k in range(1, 4):
        g = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        c = 0.5 + (0.1 - 0.5) * k / 10 if value == "schedule" else 0.5  # linear(0.5, 0.1, 10) at step k
        want = want - 0.1 * g * c / max(c, g.norm().item())
        p.grad = g
        opt.step()
    torch.testing.assert_close(p.detach(), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("fused", [False, True])
def test_updates_of_another_dtype_are_refused_naming_the_transform(fused: bool) -> None:
    # a float64 update for float32 params would fail in Adam's own op, naming Adam, with the step half made
    wide = gc.transform("widen", None, update=lambda u, st, hp, ctx: [x.to(torch.float64) for x in u])
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = ChainOptimizer([p], gc.chain(wide, gc.scale_by_adam(), gc.scale_by_lr(0.1)), fused=fused)
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="'widen' returned updates of dtype torch.float64 for torch.float32"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.state[p] == {}
