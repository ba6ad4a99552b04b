"""The core's contract under hostile use: state safety, all-or-nothing steps, explicit sharing,
nested defaults, picklable optimizers, and state dicts checked when they load."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import gradchain as gc
from gradchain import recipes


def momentum_returning_its_buffer(beta: float = 0.9) -> gc.Leaf:
    """What optax code naturally does: return the state buffer itself, with no lend()."""

    def init(p):
        return {"buf": torch.zeros_like(p, dtype=gc.compute_dtype(p.dtype))}

    def update(updates, state, hp, ctx):
        torch._foreach_mul_(state["buf"], beta)
        torch._foreach_add_(state["buf"], updates)
        return state["buf"]

    return gc.transform("mom", {}, init, update)


@pytest.mark.parametrize(
    "dtype,tail",
    [
        (torch.bfloat16, lambda: [gc.scale_by_lr(0.1)]),
        (torch.float32, lambda: [gc.scale(0.5), gc.clip_by_norm(1e6), gc.scale_by_lr(0.1)]),
    ],
    ids=["bf16-lr", "fp32-scale-clip-lr"],
)
@pytest.mark.parametrize("fused", [False, True])
def test_a_returned_state_buffer_is_never_written(dtype, tail, fused, monkeypatch) -> None:
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = gc.ChainOptimizer([p], gc.chain(momentum_returning_its_buffer(), *tail()), fused=fused)
    seen = []
    for _ in range(3):
        p.grad = torch.ones(4, dtype=dtype)
        opt.step()
        seen.append(float(opt.state[p]["mom.buf"][0]))
    assert seen == pytest.approx([1.0, 1.9, 2.71], rel=1e-6)


def test_standalone_update_returns_no_state_buffer() -> None:
    for t in (gc.trace(0.9), gc.ema(0.9), momentum_returning_its_buffer()):
        params = [torch.zeros(3)]
        state = t.init(params)
        out = t.update([torch.ones(3)], state, params)
        for st in state:
            assert all(o is not v and o.data_ptr() != v.data_ptr() for o in out for v in st.values())
        out[0].add_(100.0)  # the caller owns it
        assert all(float(v.abs().max()) < 10 for st in state for v in st.values())


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params
    }


def _assert_unchanged(opt, params, snap):
    ps, sts = snap
    for p, before in zip(params, ps):
        assert torch.equal(p.detach(), before)
        for k, v in sts[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k


def failing_transform(at_step: int) -> gc.Leaf:
    def update(updates, state, hp, ctx):
        if ctx.step == at_step:
            raise RuntimeError("boom")
        return updates

    return gc.transform("boom", {}, None, update)


@pytest.mark.parametrize("atomic", ["first", "always"])
def test_a_failing_transform_leaves_params_and_state_as_before(atomic: str) -> None:
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    # fails on its first step (first time this structure is seen) or later ("always" snapshots every step)
    at = 1 if atomic == "first" else 3
    opt = gc.ChainOptimizer(params, gc.chain(gc.scale_by_adam(), failing_transform(at), gc.scale_by_lr(0.1)),
                            atomic=atomic)
    for _ in range(1, at):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if opt.state.get(p)}
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        if id(p) in states:
            for k, v in states[id(p)].items():
                assert torch.equal(opt.state[p][k], v), k
        else:
            assert not opt.state.get(p)  # no state appears for a step that did not happen


def raising_once(raises: bool = True) -> gc.Leaf:
    """Raises at its first call only: the step is then taken again, as a caller who caught it would."""
    raised = [] if raises else [False]

    def update(updates, state, hp, ctx):
        if not raised:
            raised.append(True)
            raise RuntimeError("boom")
        return updates

    return gc.transform("boom", {}, None, update)


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_a_first_step_that_raises_leaves_the_run_as_if_it_had_not_happened(fused: bool, resumed: bool) -> None:
    # the fused path moves params and state into its flat buffers before it writes: the rollback
    # must restore those buffers (not the tensors they replaced) and forget a bucket made over
    # state that the failed step created
    def run(fail: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))]
        chain = gc.chain(gc.scale_by_adam(), raising_once(fail), gc.scale_by_lr(0.1))
        opt = gc.ChainOptimizer(params, chain, fused=fused)
        gen = torch.Generator().manual_seed(1)
        if resumed:
            saved = gc.ChainOptimizer(params, gc.chain(gc.scale_by_adam(), raising_once(False), gc.scale_by_lr(0.1)))
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            saved.step()
            opt.load_state_dict(saved.state_dict())
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if fail and _ == 0:
                with pytest.raises(RuntimeError, match="boom"):
                    opt.step()
            opt.step()
        state = opt.state_dict()["state"]
        return [p.detach().clone() for p in params] + [v for st in state.values() for v in st.values()]

    for got, want in zip(run(fail=True), run(fail=False), strict=True):
        assert torch.equal(got, want)


def _reset_moment(opt, p):
    opt.state[p]["adam.exp_avg"] = torch.zeros_like(p)


def _reset_step(opt, p):
    opt.state[p]["step"] = torch.tensor(0.0)


def _copy_dict(opt, p):
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}


def _del_state(opt, p):
    del opt.state[p]


def _update_entries(opt, p):
    opt.state[p].update({"adam.exp_avg_sq": torch.ones_like(p)})


@pytest.mark.parametrize("edit", [_reset_moment, _reset_step, _copy_dict, _del_state, _update_entries,
                                  lambda opt, p: opt.state.clear()],
                         ids=["set-entry", "set-step", "new-dict", "del-state", "update", "clear"])
def test_state_edited_by_hand_between_steps_is_what_the_next_step_reads(edit) -> None:
    # the fused path keeps state in flat buffers whose views the state dicts hold: an entry or a
    # dict replaced by hand must reach the kernels, as the eager path reads it (it was ignored, and
    # a later state_dict() returned the replaced tensors)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
                  torch.nn.Parameter(torch.randn(2, 3, dtype=torch.float64))]
        opt = gc.ChainOptimizer(params, recipes.adamw(lr=0.1), fused=fused)
        gen = torch.Generator().manual_seed(1)
        for i in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if i == 2:
                edit(opt, params[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a reset step count: the bucket's counts differ
                opt.step()
        runs.append((params, opt.state_dict()))
    (pe, se), (pf, sf) = runs
    for a, b in zip(pe, pf, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-14)
    for i, st in se["state"].items():
        assert type(sf["state"][i]) is dict and sf["state"][i].keys() == st.keys()
        for k, v in st.items():
            torch.testing.assert_close(sf["state"][i][k], v, rtol=1e-12, atol=1e-14)


def test_atomic_never_takes_no_snapshot() -> None:
    # torch.optim's behaviour, for a step that cannot afford a copy: what ran before the raise stays
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = gc.ChainOptimizer(params, gc.chain(gc.scale_by_adam(), raising_once(), gc.scale_by_lr(0.1)),
                            atomic="never")
    params[0].grad = torch.randn(5)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert float(opt.state[params[0]]["step"]) == 1.0
    assert torch.equal(opt.state[params[0]]["adam.exp_avg"], 0.1 * params[0].grad)
    with pytest.raises(ValueError, match="atomic must be 'first', 'always' or 'never'"):
        gc.ChainOptimizer(params, recipes.adamw(), atomic="sometimes")


def test_an_invalid_schedule_value_moves_nothing() -> None:
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = gc.ChainOptimizer(params, recipes.adamw())
    params[0].grad = torch.randn(5)
    opt.step()
    snap = _snapshot(opt, params)
    opt.param_groups[0]["lr"] = lambda step: -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    _assert_unchanged(opt, params, snap)

    def raising(step):
        raise KeyError("schedule bug")

    opt.param_groups[0]["lr"] = raising
    with pytest.raises(KeyError):
        opt.step()
    _assert_unchanged(opt, params, snap)



def test_a_value_set_by_hand_is_checked_at_the_next_step() -> None:
    # values that passed at one step are not checked again; a changed one is, in any group
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
    opt = gc.ChainOptimizer([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.1}], recipes.adamw())
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    snap = _snapshot(opt, params)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr=-1.0"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    opt.param_groups[1]["lr"] = 0.1
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    _assert_unchanged(opt, params, snap)
    opt.param_groups[0]["betas"] = (0.9, 0.999)
    opt.step()
    assert not torch.equal(params[0].detach(), snap[0][0])


def test_nested_chain_keeps_maximize() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    opt = gc.ChainOptimizer([p], gc.chain(recipes.sgd(lr=0.1, maximize=True)))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), 0.1))


def test_two_transforms_with_one_key_must_say_so() -> None:
    with pytest.raises(ValueError, match=r"weight_decay.*renamed.*share="):
        gc.chain(gc.add_l2(0.01), gc.scale_by_adam(), gc.add_decoupled_wd(0.01))
    renamed = gc.chain(gc.add_l2(0.01).renamed({"weight_decay": "l2"}), gc.scale_by_adam(), gc.add_decoupled_wd(0.01))
    assert {"l2", "weight_decay"} <= set(renamed.hyperparams)
    shared = gc.chain(gc.add_l2(0.01), gc.scale_by_adam(), gc.add_decoupled_wd(0.01), share=["weight_decay"])
    assert "weight_decay" in shared.hyperparams
    # a nested chain keeps what it shares
    assert "weight_decay" in gc.chain(shared, gc.scale_by_lr()).hyperparams


def _every_recipe():
    for name in recipes.__all__:
        if name == "muon_hidden_matrix":
            continue
        fn = getattr(recipes, name)
        yield name, (fn(recipes.adamw()) if name == "lookahead" else fn())


@pytest.mark.parametrize("name,chain", list(_every_recipe()), ids=lambda x: x if isinstance(x, str) else "")
def test_optimizers_pickle_and_copy(name: str, chain) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = gc.ChainOptimizer([("w", p)], chain)
    p.grad = torch.randn(4, 3)
    opt.step(loss=torch.tensor(1.0))
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert clone.transform.signature() == opt.transform.signature()
        (q,) = clone.param_groups[0]["params"]
        assert torch.equal(q.detach(), p.detach())
        for k, v in opt.state[p].items():
            assert torch.equal(clone.state[q][k], v)
        q.grad = p.grad.clone()
        clone.step(loss=torch.tensor(1.0))  # the copy steps on its own
    assert pickle.loads(pickle.dumps(chain)).signature() == chain.signature()


def test_unpicklable_transform_says_how_to_fix() -> None:
    t = gc.transform("mine", {}, None, lambda u, s, hp, ctx: u)
    with pytest.raises(TypeError, match="gradchain.factory"):
        pickle.dumps(t)

    @gc.factory
    def my_scale(f: float = 2.0) -> gc.Leaf:
        return gc.transform("my_scale", {}, None, lambda u, s, hp, ctx: torch._foreach_mul(u, f))

    # a decorated module-level factory pickles; this local one shows the recorded call
    assert my_scale(3.0)._built_by[1] == (3.0,)


def _trained(chain_fn=recipes.adamw, steps=2):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = gc.ChainOptimizer([p], chain_fn())
    for _ in range(steps):
        p.grad = torch.randn(4, 3)
        opt.step()
    return p, opt


def test_old_state_dicts_load() -> None:
    p, opt = _trained()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["maximize"]  # saved before the option existed
    for st in sd["state"].values():
        st["step"] = 2  # older torch checkpoints: a Python number
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = gc.ChainOptimizer([q], recipes.adamw())
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["maximize"] is False
    assert isinstance(opt2.state[q]["step"], torch.Tensor) and float(opt2.state[q]["step"]) == 2.0
    q.grad = torch.randn(4, 3)
    opt2.step()
    assert float(opt2.state[q]["step"]) == 3.0


@pytest.mark.parametrize("damage,match", [
    (lambda st: st.__setitem__("adam.exp_avg", torch.zeros(3, 4)), "shape"),
    (lambda st: st.__setitem__("adam.exp_avg_sq", torch.zeros(4, 3, dtype=torch.int64)), "dtype"),
    (lambda st: st.__setitem__("step", torch.tensor(-1.0)), "step"),
])
def test_state_that_does_not_fit_is_refused_at_load(damage, match) -> None:
    p, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    damage(next(iter(sd["state"].values())))
    opt2 = gc.ChainOptimizer([torch.nn.Parameter(torch.randn(4, 3))], recipes.adamw())
    with pytest.raises(ValueError, match=match):
        opt2.load_state_dict(sd)


@pytest.mark.parametrize("bad", ["bf16", torch.int32])
def test_state_dtype_is_checked(bad) -> None:
    with pytest.raises(TypeError, match="state_dtype"):
        gc.ChainOptimizer([torch.nn.Parameter(torch.zeros(2))], recipes.adamw(), state_dtype=bad)


def test_checkpoint_round_trip_through_bytes() -> None:
    p, opt = _trained()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = gc.ChainOptimizer([q], recipes.adamw())
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    g = torch.randn(4, 3)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p.detach(), q.detach())


def test_torch_options_per_group() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    groups = lambda ps: [  # noqa: E731
        {"params": [ps[0]]},
        {"params": [ps[1]], "nesterov": True, "momentum": 0.5},
        {"params": [ps[2]], "momentum": 0.0, "dampening": 0.3},
    ]
    oa = torch.optim.SGD(groups(a), lr=0.1, momentum=0.9)
    ob = gc.ChainOptimizer(groups(b), recipes.sgd(lr=0.1, momentum=0.9))
    for _ in range(5):
        for x, y in zip(a, b):
            g = torch.randn(5)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    # structural options: a group may repeat the constructor's value; changing it says what to do
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="momentum"):
        gc.ChainOptimizer([{"params": [p], "momentum": 0.9}], recipes.sgd())
    assert gc.ChainOptimizer([p], recipes.adam()).param_groups[0]["amsgrad"] is False


def _state_of(opt: gc.ChainOptimizer) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]


def _same_state(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("how", ["by_hand", "one_cycle"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_fixed_option_changed_after_construction_is_refused_at_the_step(how: str, fused: bool,
                                                                          monkeypatch) -> None:
    # sgd() without momentum keeps no buffer: a group that switches momentum on later (by hand, or a
    # scheduler cycling it) is refused at the step, as at add_param_group, and nothing moves (it
    # stepped plain SGD, where torch's SGD takes the momentum)
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    p = torch.nn.Parameter(torch.ones(3))
    opt = gc.ChainOptimizer([p], recipes.sgd(lr=0.1), fused=fused)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    if how == "by_hand":
        opt.param_groups[0]["momentum"] = 0.9
    else:
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5)  # cycle_momentum=True sets it
    before, state = p.detach().clone(), _state_of(opt)
    with pytest.raises(ValueError, match="momentum=0.*cycle_momentum=False"):
        opt.step()
    assert torch.equal(p.detach(), before) and _same_state(_state_of(opt), state)


def test_one_cycle_without_momentum_cycling_runs_sgd_as_torch() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    oa, ob = torch.optim.SGD([a], lr=0.1), gc.ChainOptimizer([b], recipes.sgd(lr=0.1))
    sa, sb = (torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=5, cycle_momentum=False)
              for o in (oa, ob))
    for i in range(4):
        a.grad, b.grad = torch.full((3,), 1.0 + i), torch.full((3,), 1.0 + i)
        oa.step(), ob.step(), sa.step(), sb.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("refused", ["amsgrad_switched_on", "vector_loss"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_refused_after_the_first_moves_nothing(refused: str, fused: bool, monkeypatch) -> None:
    # the refusal comes from inside a transform, after the first step of this structure (no snapshot
    # of its own): a new value of an option that chooses the code, or a loss of a new shape, is a first
    # step again, so its snapshot restores the step counts and moments; the run then goes on exactly
    # as one that never made the call (torch's Adam raises before its step count moves)
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    recipe = recipes.adam(lr=0.1) if refused == "amsgrad_switched_on" else recipes.adalo()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen) for _ in range(4)]

    def run(refuse: bool) -> tuple[gc.ChainOptimizer, torch.Tensor]:
        p = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
        opt = gc.ChainOptimizer([p], recipe, fused=fused)
        for i, g in enumerate(grads):
            p.grad = g.clone()
            if refuse and i == 2:
                before, state = p.detach().clone(), _state_of(opt)
                if refused == "amsgrad_switched_on":
                    opt.param_groups[0]["amsgrad"] = True
                    with pytest.raises(ValueError, match="amsgrad was switched on"):  # not dynamo's error
                        opt.step(loss=torch.tensor(1.0 + i))
                    opt.param_groups[0]["amsgrad"] = False
                else:
                    with pytest.raises(ValueError, match="the loss must be a scalar"):
                        opt.step(loss=torch.tensor([1.0, 2.0]))
                assert torch.equal(p.detach(), before) and _same_state(_state_of(opt), state)
            opt.step(loss=torch.tensor(1.0 + i))
        return opt, p.detach()

    (plain, p), (refusing, q) = run(False), run(True)
    assert torch.equal(p, q) and _same_state(_state_of(plain), _state_of(refusing))


@pytest.mark.parametrize("name", ["Adam", "NAdam"])
@pytest.mark.parametrize("fused", [False, True])
def test_decoupled_weight_decay_per_group_as_torch(name: str, fused: bool, monkeypatch) -> None:
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, dtype=torch.float64)) for _ in range(2)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "decoupled_weight_decay": True}]  # noqa: E731
    oa = getattr(torch.optim, name)(groups(a), lr=0.05, weight_decay=0.1)
    ob = gc.ChainOptimizer(groups(b), getattr(recipes, name.lower())(lr=0.05, weight_decay=0.1), fused=fused)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch's NAdam keeps its mu product in the default dtype
    try:
        for _ in range(6):
            for x, y in zip(a, b):
                g = torch.randn(6, dtype=torch.float64)
                x.grad, y.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
    finally:
        torch.set_default_dtype(default)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True])
def test_amsgrad_per_group_as_torch(fused: bool, monkeypatch) -> None:
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, dtype=torch.float64)) for _ in range(2)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    groups = lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]], "amsgrad": True}]  # noqa: E731
    oa = torch.optim.Adam(groups(a), lr=0.1)
    ob = gc.ChainOptimizer(groups(b), recipes.adam(lr=0.1), fused=fused)
    for i in range(6):
        for x, y in zip(a, b):
            g = torch.randn(6, dtype=torch.float64) * (3.0 if i == 1 else 0.1)  # v peaks early: amsgrad matters
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-14)
    assert "adam.max_exp_avg_sq" in ob.state[b[1]] and "adam.max_exp_avg_sq" not in ob.state[b[0]]
    # the checkpoint keeps each group's state and loads back
    sd = ob.state_dict()
    oc = gc.ChainOptimizer(groups([torch.nn.Parameter(x.detach().clone()) for x in b]), recipes.adam(lr=0.1))
    oc.load_state_dict(sd)


@pytest.mark.parametrize("after_backward", [False, True], ids=["before_backward", "after_backward"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_param_whose_dtype_changed_under_its_state_gets_a_clear_error(fused: bool, after_backward: bool,
                                                                        monkeypatch) -> None:
    """``model.double()`` during a run leaves AdamW's float32 moments under float64 params: the step
    fails on the mixed dtypes (torch.optim's own AdamW with a cryptic lerp error). Here it is a
    ValueError that names the param, the entry and the dtypes, the step moves nothing, and once the
    state is cast as it says, the run goes on as one that loaded the cast state. Cast between
    backward and step, the grads are cast too: the fused path used to find they no longer fit its
    flat buffer, drop them and step nothing, silently; it keeps them now."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = gc.ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2), fused=fused)
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    if after_backward:
        opt.zero_grad()
        model(x).square().sum().backward()
        model.double()
    else:
        model.double()
        opt.zero_grad()
        model(x.double()).square().sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(ValueError, match=r"param weight is torch.float64 and its state 'adam.exp_avg' torch.float32, "
                                         r"where this chain keeps torch.float64.*dtype changed") as info:
        opt.step()
    assert "rolled back" in str(info.value)
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())
    after = opt.state_dict()["state"]
    for i, st in state.items():
        for key, v in st.items():
            assert after[i][key].dtype == v.dtype and torch.equal(after[i][key], v), (i, key)

    for p in model.parameters():
        for key, v in opt.state[p].items():
            if key != "step" and v.is_floating_point():
                opt.state[p][key] = v.to(torch.float64)
    reference = copy.deepcopy(model)
    ref_opt = gc.ChainOptimizer(reference.named_parameters(), recipes.adamw(lr=1e-2))
    ref_opt.load_state_dict(opt.state_dict())
    for _ in range(2):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x.double()).square().sum().backward()
            o.step()
    assert all(v.dtype == torch.float64 for v in opt.state[model.weight].values() if v.dim())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _into_one_vector(model: torch.nn.Module):
    vec = torch.nn.utils.parameters_to_vector(model.parameters())
    torch.nn.utils.vector_to_parameters(vec, model.parameters())  # params are views of vec now

    def check() -> None:
        assert torch.equal(vec, torch.nn.utils.parameters_to_vector(model.parameters())), "cut off from the vector"

    return check


def _into_shared_memory(model: torch.nn.Module):
    model.share_memory()
    seen_elsewhere = [p.detach() for p in model.parameters()]  # another process's handle on each storage

    def check() -> None:
        for p, other in zip(model.parameters(), seen_elsewhere):
            assert p.is_shared() and torch.equal(p, other), "left the shared memory"

    return check


@pytest.mark.parametrize("held, message", [
    (_into_one_vector, "4 of its params (0.weight, 0.bias, 2.weight, ...) are views into a larger buffer"),
    (_into_shared_memory, "in shared memory (model.share_memory()"),
], ids=["vector_to_parameters", "share_memory"])
def test_params_held_elsewhere_stay_where_they_are(held, message: str, monkeypatch) -> None:
    """Params that other code holds and reads: views into one vector (``vector_to_parameters``, like
    ZeRO's bucket views and FSDP1's flat parameter), or params in shared memory (``share_memory()``,
    Hogwild training, where the other processes hold the same storages). Moved into flat buffers,
    they would be cut off from that code, which would go on with the first values. The fused path
    steps them eagerly instead, where they are, with a warning, on the same trajectory as the eager
    path."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")

    def run(fused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
        check = held(model)
        opt = gc.ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2), fused=fused)
        x = torch.randn(5, 4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                model(x).square().sum().backward()
                opt.step()
        check()
        return [p.detach().clone() for p in model.parameters()], [str(w.message) for w in caught]

    eager, _ = run(False)
    fused, messages = run(True)
    assert all(torch.equal(a, b) for a, b in zip(eager, fused))
    (said,) = [m for m in messages if "eager path" in m]
    assert message in said, said


@pytest.mark.parametrize("link", ["view", "slice", "other_group"])
def test_params_that_share_memory_stay_linked_on_the_fused_path(link: str, monkeypatch) -> None:
    """A param made a view or a slice of another (``nn.Parameter(w.data.view(...))``): torch.optim
    steps them one after the other, each seeing the other's writes. Moved into flat buffers of their
    own they were cut apart, silently, and the run left torch's. Such a group steps eagerly, with a
    warning, on torch's trajectory."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")

    def run(make):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
        other = torch.nn.Parameter(w.data.view(5, 4) if link != "slice" else w.data[1:3])
        free = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        groups = ([{"params": [w, free]}, {"params": [other], "lr": 2e-2}] if link == "other_group"
                  else [{"params": [w, other, free]}])
        opt = make(groups)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(3):
                for p in (w, other, free):
                    p.grad = torch.full_like(p, 0.1 * (i + 1)) - 0.05 * p.detach()
                opt.step()
        linked = other.data_ptr() == (w.data_ptr() if link != "slice" else w[1].data_ptr())
        return [p.detach().clone() for p in (w, other, free)], linked, [str(m.message) for m in caught]

    ref, ref_linked, _ = run(lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=True))
    eager, _, _ = run(lambda g: gc.ChainOptimizer(g, recipes.adamw(lr=1e-2)))
    fused, linked, messages = run(lambda g: gc.ChainOptimizer(g, recipes.adamw(lr=1e-2), fused=True))
    assert ref_linked and linked, "cut apart"
    for a, b, c in zip(ref, eager, fused):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-15)
        assert torch.equal(b, c)
    said = [m for m in messages if "eager path" in m]
    assert said and all("share memory with another param" in m for m in said), messages


def test_constructor_options_in_a_param_group_say_how_to_bind_them() -> None:
    """ZeroRedundancyOptimizer(params, ChainOptimizer, transform=..., fused=True) puts its keyword
    arguments into every param group it hands to the optimizer class: the error says which keys are
    ChainOptimizer's own arguments and how to bind them instead."""
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['fused', 'transform'\].*fused, transform: "
                                         r"arguments of ChainOptimizer.*functools.partial"):
        gc.ChainOptimizer([{"params": [p], "transform": recipes.adamw(), "fused": True}], recipes.adamw())


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_model_saved_with_flat_params_steps_fused_again(with_optimizer: bool, monkeypatch) -> None:
    """A model pickled after fused steps loads with its params as views of one flat buffer, now
    held by them alone: a new fused optimizer (here with the biases in a group of their own) moves
    them into its flat buffers as any params, and an optimizer pickled with its model goes on
    fused. Neither is taken for a buffer something else holds (no eager step, no warning)."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    opt = gc.ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2), fused=True)
    x = torch.randn(5, 4, dtype=torch.float64)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()

    train(model, opt, 2)
    buf = io.BytesIO()
    torch.save((model, opt) if with_optimizer else model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    if with_optimizer:
        model2, opt2 = loaded
    else:
        model2 = loaded
        named = list(model2.named_parameters())
        groups = [{"params": [p for n, p in named if n.endswith(suffix)],
                   "param_names": [n for n, _ in named if n.endswith(suffix)]} for suffix in ("weight", "bias")]
        opt2 = gc.ChainOptimizer(groups, recipes.adamw(lr=1e-2), fused=True)
    storage = model2[0].weight.untyped_storage()
    assert storage.nbytes() > model2[0].weight.numel() * 8  # views of the saved flat buffer
    reference = copy.deepcopy(model2)
    ref_opt = gc.ChainOptimizer(reference.parameters(), recipes.adamw(lr=1e-2))
    if with_optimizer:
        ref_opt.load_state_dict(opt2.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model2, opt2, 3)
    assert not [w for w in caught if "ChainOptimizer" in str(w.message)], [str(w.message) for w in caught]
    assert opt2._flats, "the loaded params did not take the fused path"
    train(reference, ref_opt, 3)
    for a, b in zip(model2.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _steps_under_inference_mode(recipe: str, fused: bool, inference: tuple[int, ...]) -> tuple[list, gc.ChainOptimizer]:
    """Six float64 steps of a small net, those in ``inference`` called under ``torch.inference_mode()``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    opt = gc.ChainOptimizer(model.parameters(), getattr(recipes, recipe)(), fused=fused)
    for i in range(6):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        loss = model(x).square().mean()  # the forward pass uses the params with autograd
        opt.zero_grad()
        loss.backward()
        if i in inference:
            with torch.inference_mode():
                opt.step(loss=loss)
        else:
            opt.step(loss=loss)
    return list(model.parameters()), opt


@pytest.mark.parametrize("recipe", ["adamw", "adalo", "prodigy"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_under_inference_mode_makes_no_inference_tensors(recipe: str, fused: bool, monkeypatch) -> None:
    # torch.optim's steps work under torch.inference_mode() (they update params in place). The
    # state, and on the fused path the flat buffers that the params become views of, are made as
    # normal tensors: made as inference tensors, the next forward pass could not use the params
    # with autograd (fused) and a step outside inference mode could not update the state (eager)
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    ref_params, ref_opt = _steps_under_inference_mode(recipe, fused, ())
    params, opt = _steps_under_inference_mode(recipe, fused, (0, 1, 3))
    for p, q in zip(params, ref_params):
        assert not p.is_inference() and not p.grad.is_inference()
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key, t in opt.state[p].items():
            if isinstance(t, torch.Tensor):
                assert not t.is_inference(), key
                torch.testing.assert_close(t, ref_opt.state[q][key], rtol=0, atol=0)
    assert not any(t.is_inference() for t in opt.global_state.values())


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_hooks_see_what_torch_hooks_see(fused: bool, monkeypatch) -> None:
    # torch.optim's hooks: a state-dict post hook gets the finished state dict and may replace it
    # (a hook that offloads or converts the checkpoint); here that includes the chain's signature
    # and the optimizer-level state (Prodigy's d), which a hook run before they were added missed
    from gradchain.fused import runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = gc.ChainOptimizer(model.parameters(), recipes.prodigy(), fused=fused)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step post"))
    model(torch.randn(5, 4, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert calls == ["step pre", "step post"]

    def offload(o, sd):
        calls.append("state_dict post")
        assert "gradchain" in sd and "@global.prodigy.d" in sd["state"][0]
        return {**sd, "state": {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
                                for k, s in sd["state"].items()}, "offloaded": True}

    opt.register_state_dict_pre_hook(lambda o: calls.append("state_dict pre"))
    opt.register_state_dict_post_hook(offload)
    sd = opt.state_dict()
    assert calls[2:] == ["state_dict pre", "state_dict post"] and sd["offloaded"]
    d = opt.global_state["prodigy.d"]
    assert sd["state"][0]["@global.prodigy.d"] is not d and torch.equal(sd["state"][0]["@global.prodigy.d"], d)

    opt.register_load_state_dict_pre_hook(lambda o, s: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt.load_state_dict(sd)
    assert calls[4:] == ["load pre", "load post"]
    assert torch.equal(opt.global_state["prodigy.d"], d)


@pytest.mark.parametrize("to", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["sgd", "sm3", "prodigy", "schedule_free_adamw"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_cast_that_the_ops_would_take_is_refused_too(fused: bool, name: str, to: torch.dtype, monkeypatch) -> None:
    """The chains whose ops take mixed dtypes (a float64 update added into float32 momentum, SM3's
    accumulators) went on silently with the old dtype's state after ``model.to(dtype)``; the
    error above came only where an op failed. The state's dtype is now checked before the step."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    start = torch.float32 if to == torch.float64 else torch.float64
    model = torch.nn.Linear(4, 3).to(start)
    chain = recipes.sgd(lr=1e-2, momentum=0.9) if name == "sgd" else getattr(recipes, name)()
    opt = gc.ChainOptimizer(model.named_parameters(), chain, fused=fused)
    x = torch.randn(5, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x.to(start)).square().sum().backward()
        opt.step()
    model.to(to)
    opt.zero_grad()
    model(x.to(to)).square().sum().backward()
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"is {to} and its state '[\w.]+' {start}, where this chain keeps {to}"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
