"""Bad settings get an error (or a warning) that names them, where the user made them.

- ``betas=0.9`` (a float) for any recipe or transform taking a pair of betas: an error naming the
  argument at construction, both a ``TypeError`` (torch's type for it) and a ``ValueError``;
- ``recipes.adafactor(d=0.5)``: ``ValueError`` as ``torch.optim.Adafactor`` (``d >= 1``);
- ``GradientDiagnostics(log_dir=...)`` without TensorBoard: ``ImportError`` at construction;
- ``muon`` given unnamed params: a ``UserWarning`` (once) that says to pass ``named_parameters()``;
- ``OneCycleLR`` with momentum cycling works on ``adalo``, whose ``betas`` key it cycles;
- a checkpoint taken under ``swa_utils.SWALR`` (which adds ``swa_lr`` to the groups) loads and resumes;
- ``recipes.adam(decoupled_weight_decay=True)`` follows ``torch.optim.Adam(decoupled_weight_decay=True)``;
- a param listed twice in one group (torch warns, and steps it twice): ``ValueError`` naming both places;
- a key the chain does not declare set in a group after construction (a typo): ``ValueError`` at the
  next step, nothing moved; another tool's ``initial_<key>`` record is kept, and its checkpoint loads.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import numpy as np
import pytest
import torch
from harness import lockstep_gap

import gradchain as gc
from gradchain import ChainOptimizer, diagnostics, recipes, transforms
from gradchain.diagnostics import GradientDiagnostics
from gradchain.hyperparams import HyperparamTypeError


def _pair_args() -> list:
    out = []
    for module, names in ((recipes, recipes.__all__), (transforms, transforms.__all__)):
        for name in sorted(names):
            fn = getattr(module, name)
            if not inspect.isfunction(fn):
                continue
            for arg in inspect.signature(fn).parameters:
                if arg == "betas" or arg.endswith("_betas"):
                    out.append(pytest.param(module, name, arg, id=f"{name}.{arg}"))
    return out


@pytest.mark.parametrize(("module", "name", "arg"), _pair_args())
def test_betas_must_be_a_pair(module, name: str, arg: str) -> None:
    fn = getattr(module, name)
    extra = {"inner": recipes.adamw()} if name == "lookahead" else {}
    with pytest.raises(HyperparamTypeError, match=arg) as info:
        fn(**extra, **{arg: 0.9})
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=arg):
        fn(**extra, **{arg: (0.9, 1.5)})


def test_adafactor_refuses_d_below_one_as_torch_does() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="d"):
        torch.optim.Adafactor(p, d=0.5)
    with pytest.raises(ValueError, match=r"\bd=0.5.*>= 1"):
        recipes.adafactor(d=0.5)
    opt = ChainOptimizer(p, recipes.adafactor(d=1.0))
    with pytest.raises(ValueError, match=r"\bd=0.9"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "d": 0.9})
    recipes.adafactor(d=2.0)
    gc.clip_by_block_rms(0.5)  # the transform alone keeps optax's range (any d > 0)


def test_tensorboard_log_dir_without_tensorboard_is_an_import_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(diagnostics, "tensorboard_available", lambda: False)
    opt = ChainOptimizer(torch.nn.Linear(2, 2).parameters(), recipes.adamw())
    with pytest.raises(ImportError, match="tensorboard"):
        GradientDiagnostics(opt, log_dir=tmp_path)
    assert not opt._optimizer_step_pre_hooks, "a refused GradientDiagnostics left a hook behind"
    GradientDiagnostics(opt).close()  # records only: no TensorBoard needed


class _Embedded(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(4, 4)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.embed(i))


def _steps(model, opt, n: int = 3) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.tensor([1, 2, 3])).pow(2).sum().backward()
        opt.step()


def test_muon_warns_once_about_unnamed_matrices() -> None:
    model = _Embedded()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt = ChainOptimizer(model.parameters(), recipes.muon(lr=0.01))  # (params are routed here)
        _steps(model, opt)
    mine = [w for w in seen if "muon" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, UserWarning)
    assert "named_parameters()" in str(mine[0].message)
    # named params (or an explicit routing) route by name: no warning
    for params, kw in ((model.named_parameters(), {}), (model.parameters(), {"muon_params": lambda n, p: False})):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = ChainOptimizer(params, recipes.muon(lr=0.01, **kw))
            _steps(model, opt, 1)
    opt = ChainOptimizer(model.named_parameters(), recipes.muon(lr=0.01))
    _steps(model, opt, 1)
    assert "adam.exp_avg" in opt.state[model.embed.weight]  # the embedding takes AdamW by its name
    assert "momentum.ema" in opt.state[model.hidden.weight]


@pytest.mark.parametrize("fused", [False, True])
def test_swa_lr_resumes_from_a_checkpoint(fused: bool, monkeypatch) -> None:
    """SWALR writes ``swa_lr`` into the param groups: a checkpoint taken under it loads (it was
    refused as an unknown hyperparameter) and the run goes on as the one that was not stopped."""
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        opt = ChainOptimizer(model.parameters(), recipes.adamw(lr=1e-2), fused=fused)
        return model, opt, torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=3)

    def train(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
            sched.step()

    model, opt, sched = setup()
    train(model, opt, sched, 2)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    train(model, opt, sched, 3)
    model2, opt2, sched2 = setup()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert opt2.param_groups[0]["swa_lr"] == 0.05
    train(model2, opt2, sched2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_one_cycle_lr_cycles_adalo_beta1() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = ChainOptimizer([p], recipes.adalo(weight_decay=0.0, kappa=3.0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
    group = opt.param_groups[0]
    assert group["betas"] == (0.95, 0.999)  # torch's max_momentum, written into betas[0]
    p0 = p.detach().clone()
    p.grad = torch.randn(4, dtype=torch.float64)
    loss = 0.7
    opt.step(loss=loss)
    # the first step from m = 0 and a zero loss EMA, by hand:
    # m = (1 - b1) g, a = (1 - b2) / (2 + L), p <- p - lr_0 max(a / kappa, eps) m
    lr0, b1, b2 = 0.5 / 25, 0.95, 0.999
    want = p0 - lr0 * max((1 - b2) / (2 + loss) / 3.0, 1e-8) * (1 - b1) * p.grad
    torch.testing.assert_close(p.detach(), want, rtol=1e-14, atol=0)  # float64, a few roundings apart
    sched.step()
    assert group["betas"][0] < 0.95 and group["betas"][1] == 0.999
    opt.step(loss=loss)  # the cycled value is a valid hyperparameter


def _groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": list(model[0].parameters()), "lr": 0.02, "weight_decay": 0.05},
        {"params": list(model[2].parameters())},
    ]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_decoupled_weight_decay_matches_torch(amsgrad: bool) -> None:
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
    m2 = copy.deepcopy(m1)
    hp = {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1, "amsgrad": amsgrad, "decoupled_weight_decay": True}
    o1 = torch.optim.Adam(_groups(m1), **hp)
    o2 = ChainOptimizer(_groups(m2), recipes.adam(**hp))
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=40)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=40)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    assert lockstep_gap((m1, o1, s1), (m2, o2, s2), x, y, steps=60) <= 1e-12
    assert o2.param_groups[0]["decoupled_weight_decay"] is True
    # coupled L2 is a different trajectory: the flag is not ignored
    m3 = copy.deepcopy(m1)
    o3 = ChainOptimizer(_groups(m3), recipes.adam(**{**hp, "decoupled_weight_decay": False}))
    m4 = copy.deepcopy(m1)
    o4 = ChainOptimizer(_groups(m4), recipes.adam(**hp))
    assert lockstep_gap((m3, o3, None), (m4, o4, None), x, y, steps=5) > 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_a_param_listed_twice_in_a_group_is_an_error(fused: bool) -> None:
    # torch.optim warns ("in future, this will cause an error") and steps such a param twice per step
    shared = torch.nn.Parameter(torch.ones(3))
    other = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"lists 1 param\(s\) more than once \(#2 repeats #0\)"):
        ChainOptimizer([shared, other, shared], recipes.sgd(lr=0.1), fused=fused)
    opt = ChainOptimizer([("bias", other)], recipes.sgd(lr=0.1), fused=fused)
    named = [("embed.weight", shared), ("head.weight", shared)]
    with pytest.raises(ValueError, match=r"#1 repeats 'embed.weight' \(#0\)"):
        opt.add_param_group({"params": named})
    assert len(opt.param_groups) == 1  # the refused group was not added
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warning is not shown next to the error
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [("a", shared), ("b", shared)]})
    other.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(other.detach(), torch.full((2,), 0.9))


def _tensor_betas(kind: str, b1: float, b2: float):
    if kind == "1-element":
        return (torch.tensor([b1], dtype=torch.float64), torch.tensor([b2], dtype=torch.float64))
    if kind == "0-d":
        return (torch.tensor(b1, dtype=torch.float64), torch.tensor(b2, dtype=torch.float64))
    return (np.float32(b1), np.float32(b2))  # (numpy's float64 is a float; its float32 is not)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("kind", ["1-element", "0-d", "numpy"])
@pytest.mark.parametrize("name, key", [("adamw", "betas"), ("lamb", "betas"), ("adanorm", "betas"),
                                       ("adamomentum", "betas"), ("sadam", "betas"),
                                       ("schedule_free_adamw", "betas"), ("muon", "adamw_betas")])
def test_betas_as_tensors_or_numpy_scalars_step_as_numbers(name: str, key: str, kind: str, fused: bool,
                                                           monkeypatch) -> None:
    """torch.optim takes ``betas=(tensor([0.9]), tensor([0.999]))`` and numpy scalars. gradchain's
    check took them too, and then a step after the first raised inside the transforms, after some
    state had moved. Now such values are numbers by the time the transforms see them: the run
    equals the one with float betas, bit for bit, whether they come in at construction or later."""
    import gradchain.fused.runner as runner
    from gradchain import recipes

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")

    def run(betas):
        torch.manual_seed(0)
        named = [("w", torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))),
                 ("b", torch.nn.Parameter(torch.randn(3, dtype=torch.float64)))]
        opt = gc.ChainOptimizer(named, getattr(recipes, name)(), fused=fused)
        for i in range(4):
            if i == 1:
                opt.param_groups[0][key] = betas
            for _, p in named:
                p.grad = torch.cos(p.detach() * (i + 1))
            opt.step()
        return [p.detach() for _, p in named]

    # values a float32 holds exactly
    want = run((0.75, 0.9921875))
    got = run(_tensor_betas(kind, 0.75, 0.9921875))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_numpy_scalars_are_numbers(fused: bool, monkeypatch) -> None:
    """``lr=np.float32(1e-3)`` was refused ("must be a finite number >= 0") where torch.optim takes it."""
    import gradchain.fused.runner as runner
    from gradchain import recipes

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")

    def run(lr, warmup):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        opt = gc.ChainOptimizer([p], recipes.schedule_free_adamw(lr=lr, warmup_steps=warmup), fused=fused)
        for i in range(3):
            p.grad = torch.sin(p.detach() + i)
            opt.step()
        return p.detach()

    assert torch.equal(run(np.float32(1e-2), np.int64(2)), run(float(np.float32(1e-2)), 2))


@pytest.mark.parametrize("build, message", [
    (lambda r: r.muon(momentum=-1), r"hyperparameter momentum=-1"),
    (lambda r: r.muon(adamw_eps=-1), r"hyperparameter adamw_eps=-1"),
    (lambda r: r.adafactor(momentum=1.5), r"hyperparameter momentum=1.5"),
    (lambda r: r.sm3(momentum=-1), r"hyperparameter momentum=-1"),
    (lambda r: r.nsgda(beta=2), r"hyperparameter beta=2"),
    (lambda r: r.nsgda(eps=-1), r"hyperparameter eps=-1"),
    (lambda r: r.adalo(betas=(0.9, 1.0)), r"hyperparameter betas="),
    (lambda r: r.sgd(momentum=torch.tensor([0.9, 0.9])), r"hyperparameter momentum=tensor"),
    (lambda r: r.prodigy(growth_rate=torch.tensor([2.0, 2.0])), r"hyperparameter growth_rate=tensor"),
    (lambda r: r.am_adamw(am_lambda="0.1"), r"hyperparameter am_lambda='0.1'"),
    (lambda r: r.adafactor(min_dim_size_to_factor="128"), r"min_dim_size_to_factor='128': must be an int >= 0"),
    (lambda r: r.adafactor(min_dim_size_to_factor=-1), r"min_dim_size_to_factor=-1: must be an int >= 0"),
    (lambda r: r.fractional_sgd(seed=1.5), r"seed=1.5: must be an int"),
    (lambda r: r.muon(ns_dtype="torch.float32"), r"ns_dtype='torch.float32': must be a floating torch.dtype"),
    (lambda r: r.muon(ns_dtype=torch.int32), r"ns_dtype=torch.int32: must be a floating torch.dtype"),
], ids=["muon-momentum", "muon-adamw_eps", "adafactor-momentum", "sm3-momentum", "nsgda-beta", "nsgda-eps",
        "adalo-betas", "sgd-tensor-momentum", "prodigy-tensor-growth", "am_adamw-str-lambda",
        "adafactor-str-min-dim", "adafactor-negative-min-dim", "fractional-float-seed", "muon-str-dtype",
        "muon-int-dtype"])
def test_a_recipe_names_a_refused_argument_by_its_own_name(build, message: str) -> None:
    """A recipe's argument refused at construction is named as the recipe (and the param group)
    names it: ``muon(momentum=-1)`` said "decay=-1", the name of the inner EMA's own key; some bad
    values gave Python's errors (``Boolean value of Tensor...``, ``can't multiply sequence``) or
    went through to the first step."""
    from gradchain import recipes

    with pytest.raises(ValueError, match=message):
        build(recipes)


def test_differentiable_true_is_refused() -> None:
    """A group with ``differentiable=True`` (torch.optim's meta-learning switch) was accepted and
    ignored: no gradient flows through a gradchain step."""
    from gradchain import recipes

    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="differentiable=True: gradchain steps without autograd"):
        gc.ChainOptimizer([{"params": [p], "differentiable": True}], recipes.adamw())
    opt = gc.ChainOptimizer([{"params": [p], "differentiable": False}], recipes.adamw())
    opt.param_groups[0]["differentiable"] = True
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="differentiable=True"):
        opt.step()
    assert torch.equal(p, torch.ones(3))


@pytest.mark.parametrize("fused", [False, True])
def test_a_typo_set_in_a_group_is_refused_at_the_step(fused: bool) -> None:
    # (accepted at the step before, then refused by load_state_dict: a run could not resume from its
    # own checkpoint, and the typo's value had changed nothing)
    p = torch.nn.Parameter(torch.ones(3))
    opt = ChainOptimizer([p], recipes.adamw(lr=0.1), fused=fused)
    opt.param_groups[0]["weight_decya"] = 0.5
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['weight_decya'\]"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and not opt.state[p]
    del opt.param_groups[0]["weight_decya"]
    opt.param_groups[0]["initial_weight_decay"] = 0.01  # a scheduler's record of a starting value
    opt.step()
    again = ChainOptimizer([torch.nn.Parameter(torch.ones(3))], recipes.adamw(lr=0.1), fused=fused)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert again.param_groups[0]["initial_weight_decay"] == 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
def test_a_state_dtype_that_underflows_adams_moments_is_refused(dtype: torch.dtype) -> None:
    # (float16 state: the eager AdamW step of a 1e-4 gradient set the params to inf, the fused one not)
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=r"state_dtype=torch\.float(16|8_e4m3fn) cannot hold optimizer state"):
        ChainOptimizer([p], recipes.adamw(), state_dtype=dtype)
    ChainOptimizer([p], recipes.adamw(), state_dtype=torch.bfloat16)


def test_a_bad_value_names_its_group_when_built_and_when_added() -> None:
    # with several groups, the message starts with the group's index, as at a step
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"^param group 1: invalid hyperparameter lr=-1"):
        ChainOptimizer([{"params": [a]}, {"params": [b], "lr": -1}], recipes.adamw())
    with pytest.raises(ValueError, match=r"^param group 0: invalid hyperparameter betas"):
        ChainOptimizer(iter([{"params": [a], "betas": (1.0, 0.9)}, {"params": [b]}]), recipes.adamw())
    opt = ChainOptimizer([a], recipes.sgd(momentum=0.9))
    with pytest.raises(ValueError, match=r"^param group 1: Nesterov momentum requires momentum > 0"):
        opt.add_param_group({"params": [b], "nesterov": True, "momentum": 0.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"^invalid hyperparameter lr=-1"):  # one group: no index
        ChainOptimizer([a], recipes.adamw(), lr=-1)


@pytest.mark.parametrize("flag", ["amsgrad", "nesterov"])
def test_a_flag_that_chooses_the_code_takes_no_schedule(flag: str) -> None:
    # a callable is truthy: amsgrad=lambda t: False made the running max, and lambda t: t >= 3 switched it on
    p = torch.nn.Parameter(torch.ones(3))
    chain = recipes.adamw() if flag == "amsgrad" else recipes.sgd(momentum=0.9)
    with pytest.raises(ValueError, match=f"{flag}=.*takes a value, not a schedule"):
        ChainOptimizer([p], chain, **{flag: lambda t: False})
    opt = ChainOptimizer([p], chain)
    p.grad = torch.ones(3)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0][flag] = lambda t: t >= 3
    with pytest.raises(ValueError, match="takes a value, not a schedule"):
        opt.step()
    assert before.keys() == opt.state[p].keys() and all(torch.equal(v, opt.state[p][k]) for k, v in before.items())
