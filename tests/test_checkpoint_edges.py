"""Checkpoints and param groups at their edges: an empty first group, entries left by reading
``opt.state``, step counts in other numeric forms, state of other dtypes, a torch.optim state dict,
params listed twice by editing ``param_groups``, cross-group checks at ``add_param_group``."""

from __future__ import annotations

import copy

import pytest
import torch

import gradchain as gc
from gradchain import recipes


@pytest.fixture(autouse=True)
def _trace_quickly(monkeypatch):
    import gradchain.fused.runner as runner

    monkeypatch.setattr(runner, "BACKEND", "aot_eager")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


X = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _train(model, opt, steps: int, loss_aware: bool) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss = model(X).square().mean()
        loss.backward()
        opt.step(loss=loss) if loss_aware else opt.step()


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", ["prodigy", "adalo"])
def test_optimizer_level_state_travels_when_the_first_group_is_empty(name: str, fused: bool) -> None:
    """Prodigy's d and AdaLo's loss EMA ride on the first param's state entry; with an empty first
    group (a no-decay group a filter left empty) they were not saved, and a resumed run went off the
    uninterrupted one with no error."""
    def build(model):
        return gc.ChainOptimizer([{"params": []}, {"params": list(model.parameters())}],
                                 getattr(recipes, name)(), fused=fused)

    model = _model()
    opt = build(model)
    _train(model, opt, 3, name == "adalo")
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train(model, opt, 3, name == "adalo")

    resumed = _model()
    resumed.load_state_dict(weights)
    opt2 = build(resumed)
    opt2.load_state_dict(saved)
    assert opt2.global_state.keys() == opt.global_state.keys() and opt2.global_state
    _train(resumed, opt2, 3, name == "adalo")
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_entries_left_by_reading_opt_state_load(fused: bool) -> None:
    """``opt.state[p].get("step")`` on a param without a grad yet leaves an empty entry (torch's
    defaultdict), which torch saves and loads; gradchain refused its own checkpoint then, as "from a
    different chain"."""
    model, frozen = _model(), torch.nn.Linear(2, 2).double()
    params = list(model.parameters()) + list(frozen.parameters())
    opt = gc.ChainOptimizer(params, recipes.adamw(), fused=fused)
    _train(model, opt, 2, False)
    assert all(opt.state[p].get("step") is None for p in frozen.parameters())
    sd = copy.deepcopy(opt.state_dict())
    assert sum(1 for v in sd["state"].values() if not v) == 2
    opt2 = gc.ChainOptimizer(params, recipes.adamw(), fused=fused)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for key, v in opt.state[p].items():
            assert torch.equal(opt2.state[p][key], v)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("form", ["int64", "one-element", "float64", "python"])
def test_a_step_count_in_another_numeric_form_loads_as_the_optimizer_makes_it(form: str, fused: bool) -> None:
    """A step saved as an int64 or 1-element tensor passed the load check and then crashed the eager
    step (torch's AdamW steps with either); now every form loads as a 0-d float32 count."""
    def run(convert):
        model = _model()
        opt = gc.ChainOptimizer(model.parameters(), recipes.adamw(), fused=fused)
        _train(model, opt, 2, False)
        sd = copy.deepcopy(opt.state_dict())
        for entry in sd["state"].values():
            entry["step"] = convert(entry["step"])
        opt2 = gc.ChainOptimizer(model.parameters(), recipes.adamw(), fused=fused)
        opt2.load_state_dict(sd)
        assert all(st["step"].dtype == torch.float32 and st["step"].dim() == 0 for st in opt2.state.values())
        _train(model, opt2, 2, False)
        return [p.detach().clone() for p in model.parameters()]

    forms = {"int64": lambda s: s.to(torch.int64), "one-element": lambda s: s.reshape(1),
             "float64": lambda s: s.double(), "python": lambda s: int(s)}
    assert all(torch.equal(a, b) for a, b in zip(run(lambda s: s), run(forms[form])))


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("case", ["fp32 state into fp64 params", "fp64 state into fp32 params",
                                  "fp32 state into state_dtype=bf16", "bf16 state into the default"])
def test_state_of_another_dtype_loads_in_the_dtype_this_optimizer_keeps(case: str, fused: bool) -> None:
    """Such a load was accepted and the next step refused the state (this chain keeps another dtype),
    so changing a model's dtype or ``state_dtype`` on resume meant casting every entry by hand. The
    state now loads cast to what this optimizer keeps (as torch casts to the param's dtype), and
    the run goes on as one that was given those values in that dtype."""
    src_dtype, dst_dtype, src_state, dst_state = {
        "fp32 state into fp64 params": (torch.float32, torch.float64, None, None),
        "fp64 state into fp32 params": (torch.float64, torch.float32, None, None),
        "fp32 state into state_dtype=bf16": (torch.float32, torch.float32, None, torch.bfloat16),
        "bf16 state into the default": (torch.float32, torch.float32, torch.bfloat16, None),
    }[case]
    torch.manual_seed(0)
    start = [torch.randn(3, 4), torch.randn(3)]
    grads = [[torch.randn(3, 4), torch.randn(3)] for _ in range(4)]

    def params(dtype):
        return [torch.nn.Parameter(x.to(dtype)) for x in start]

    def steps(ps, opt, gs):
        for g in gs:
            for p, x in zip(ps, g):
                p.grad = x.to(p.dtype)
            opt.step()

    src = params(src_dtype)
    opt = gc.ChainOptimizer(src, recipes.adamw(lr=0.1), fused=fused, state_dtype=src_state)
    steps(src, opt, grads[:2])
    sd = copy.deepcopy(opt.state_dict())

    dst = [torch.nn.Parameter(p.detach().to(dst_dtype)) for p in src]
    opt2 = gc.ChainOptimizer(dst, recipes.adamw(lr=0.1), fused=fused, state_dtype=dst_state)
    opt2.load_state_dict(sd)
    want_dtype = dst_state or dst_dtype
    assert all(v.dtype == want_dtype for st in opt2.state.values() for k, v in st.items() if k != "step")
    # the reference: the same values put into that optimizer's own state by hand
    ref = [torch.nn.Parameter(p.detach().to(dst_dtype)) for p in src]
    opt3 = gc.ChainOptimizer(ref, recipes.adamw(lr=0.1), fused=fused, state_dtype=dst_state)
    opt3.init_state()
    for p, q in zip(src, ref):
        for key, v in opt.state[p].items():
            opt3.state[q][key].copy_(v)
    steps(dst, opt2, grads[2:])
    steps(ref, opt3, grads[2:])
    assert all(torch.equal(a, b) for a, b in zip(dst, ref))


def test_a_torch_optim_state_dict_is_refused_as_one() -> None:
    """A torch AdamW checkpoint from before its first step was refused for "unknown hyperparameters
    ['capturable', 'foreach', ...]" with a hint about ZeroRedundancyOptimizer."""
    model = _model()
    sd = torch.optim.AdamW(model.parameters()).state_dict()
    opt = gc.ChainOptimizer(model.parameters(), recipes.adamw())
    with pytest.raises(ValueError, match=r"from a torch.optim optimizer .* does not\s+convert"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("where", ["same group", "other group"])
def test_a_param_listed_twice_by_editing_param_groups_is_refused_at_the_step(where: str, fused: bool) -> None:
    """``add_param_group`` refuses a param listed twice, but ``param_groups[i]["params"].append(p)``
    got past it: torch steps such a param twice, the eager path once, the fused path on yet another
    trajectory, all with no error. The step now refuses it before anything moves."""
    model = _model()
    opt = gc.ChainOptimizer([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}],
                            recipes.adamw(), fused=fused)
    _train(model, opt, 2, False)
    before = [p.detach().clone() for p in model.parameters()]
    state = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    opt.param_groups[0 if where == "same group" else 1]["params"].append(model[0].weight)
    with pytest.raises(ValueError, match="more than once" if where == "same group" else "list the same param"):
        _train(model, opt, 1, False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(opt.state[p][k], v) for p, st in state.items() for k, v in st.items())


@pytest.mark.parametrize("name, override", [("adalo", {"betas": (0.8, 0.99)}), ("prodigy", {"lr": 0.5})])
def test_checks_across_groups_run_when_a_group_is_added(name: str, override: dict) -> None:
    """AdaLo's one loss EMA and Prodigy's one estimate need one value across groups; a group added
    with another was accepted and refused only at the next step (the docs promise the check when a
    group is added). Refused now, and the group is not added."""
    model = _model()
    opt = gc.ChainOptimizer(model[0].parameters(), getattr(recipes, name)())
    with pytest.raises(ValueError, match="param groups set"):
        opt.add_param_group({"params": list(model[2].parameters()), **override})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(model[2].parameters())})
    _train(model, opt, 1, name == "adalo")


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("name", ["prodigy", "adalo"])
def test_optimizer_level_state_loaded_into_the_param_entries_is_taken_back(name: str, fused: bool) -> None:
    """ZeroRedundancyOptimizer's load_state_dict writes the saved entries straight into opt.state
    (not through ChainOptimizer.load_state_dict): the optimizer-level state packed into the first
    param's entry stayed there as stray keys, and the resumed run started Prodigy's d or AdaLo's loss
    EMA afresh. It is taken back at the next step."""
    ref = _model()
    ref_opt = gc.ChainOptimizer(ref.parameters(), getattr(recipes, name)(), fused=fused)
    _train(ref, ref_opt, 5, name == "adalo")
    model = _model()
    opt = gc.ChainOptimizer(model.parameters(), getattr(recipes, name)(), fused=fused)
    _train(model, opt, 3, name == "adalo")
    saved = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = gc.ChainOptimizer(model2.parameters(), getattr(recipes, name)(), fused=fused)
    for i, p in enumerate(model2.parameters()):  # as ZeroRedundancyOptimizer.load_state_dict does
        opt2.state[p] = dict(saved["state"][i])
    assert any(k.startswith("@global.") for st in opt2.state.values() for k in st) and not opt2.global_state
    _train(model2, opt2, 2, name == "adalo")
    assert not any(k.startswith("@global.") for st in opt2.state.values() for k in st)
    for a, b in zip(ref.parameters(), model2.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert opt2.global_state.keys() == ref_opt.global_state.keys()
