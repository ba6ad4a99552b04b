"""gradchain.diagnostics: statistics against a float64 reference, the hooks, and that they never disturb a step."""

from __future__ import annotations

import math

import pytest
import torch

from gradchain import ChainOptimizer, recipes
from gradchain.diagnostics import STATS, GradientDiagnostics, state_bytes, tensor_stats


def ref_stats(t: torch.Tensor, top_fraction: float = 0.01) -> dict[str, float]:
    """The statistics from their definitions, in float64 with plain Python sums."""
    xs = [float(v) for v in t.detach().double().flatten()]
    n = len(xs)
    norm = math.sqrt(sum(v * v for v in xs))
    mean = sum(xs) / n
    m2 = sum((v - mean) ** 2 for v in xs) / n
    m4 = sum((v - mean) ** 4 for v in xs) / n
    mags = sorted((abs(v) for v in xs), reverse=True)
    k = max(1, math.ceil(top_fraction * n))
    total = sum(mags)
    return {
        "norm": norm,
        "rms": norm / math.sqrt(n),
        "max_abs": mags[0],
        "kurtosis": m4 / m2**2 - 3 if m2 > 0 else math.nan,
        "top_share": sum(mags[:k]) / total if total > 0 else math.nan,
    }


def assert_close(got: dict[str, float], want: dict[str, float], rel: float = 1e-12) -> None:
    assert set(want) <= set(got)
    for k, w in want.items():
        g = got[k]
        if math.isnan(w):
            assert math.isnan(g), (k, g)
        else:
            assert g == pytest.approx(w, rel=rel, abs=1e-300), (k, g, w)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heavy = torch.distributions.StudentT(2.5).sample((37, 23))  # heavy tails: large kurtosis
    heavy[3, 4] = 80.0
    sparse = torch.randn(1000, generator=g, dtype=torch.float64)
    sparse[torch.randperm(1000, generator=g)[:900]] = 0.0
    return {
        "gaussian": torch.randn(64, 50, generator=g, dtype=torch.float64),
        "heavy_fp32": heavy,
        "sparse": sparse,
        "bf16": torch.randn(8, 3, 5, 5, generator=g).to(torch.bfloat16),
        "three": torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64),
        "exactly_100": torch.linspace(-3, 5, 100, dtype=torch.float64),  # k = 1
        "101": torch.linspace(-3, 5, 101, dtype=torch.float64) ** 3,  # k = 2
    }


@pytest.mark.parametrize("name", list(_tensors()))
def test_tensor_stats_match_reference(name: str) -> None:
    torch.manual_seed(0)
    t = _tensors()[name]
    assert_close(tensor_stats(t), ref_stats(t))
    assert_close(tensor_stats(t, top_fraction=0.1), ref_stats(t, 0.1))


def test_kurtosis_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(1)
    t = torch.distributions.StudentT(3.0).sample((5000,)).double()
    want = float(stats.kurtosis(t.numpy(), fisher=True, bias=True))
    assert tensor_stats(t)["kurtosis"] == pytest.approx(want, rel=1e-10)


def test_tensor_stats_edge_cases() -> None:
    const = tensor_stats(torch.full((10,), 2.0))
    assert math.isnan(const["kurtosis"]) and const["top_share"] == pytest.approx(0.1)
    zero = tensor_stats(torch.zeros(7))
    assert zero["norm"] == 0.0 and math.isnan(zero["top_share"])
    one = tensor_stats(torch.tensor(3.0))  # 0-d
    assert one["norm"] == 3.0 and one["top_share"] == 1.0
    assert all(math.isnan(v) for v in tensor_stats(torch.zeros(0)).values())
    with pytest.raises(ValueError, match="top_fraction"):
        tensor_stats(torch.ones(3), top_fraction=0.0)


def _model(dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(dtype)


def _data(i: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32, 6, generator=g, dtype=dtype)
    return x, (x[:, :3] * 2).sin()


def test_records_match_reference_and_names() -> None:
    model = _model()
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2))
    diag = GradientDiagnostics(opt, every=2, updates=True)
    expected = []
    for i in range(5):
        opt.zero_grad()
        x, y = _data(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step(loss=loss)
        if (i + 1) % 2 == 0:
            expected.append((i + 1, grads, before, {n: p.detach().clone() for n, p in model.named_parameters()}))
    diag.close()
    assert sorted({r["step"] for r in diag.records}) == [2, 4]
    for step, grads, before, after in expected:
        recs = {r["tensor"]: r for r in diag.records if r["step"] == step}
        assert set(recs) == {"0.weight", "0.bias", "2.weight", "2.bias", "(all)"}
        for n, g in grads.items():
            assert recs[n]["numel"] == g.numel()
            assert_close(
                {k.removeprefix("grad_"): v for k, v in recs[n].items() if k.startswith("grad_")}, ref_stats(g)
            )
            assert_close(
                {k.removeprefix("param_"): v for k, v in recs[n].items() if k.startswith("param_")},
                ref_stats(before[n]),
            )
            d = (after[n] - before[n]).flatten()
            assert recs[n]["update_rms"] == pytest.approx(math.sqrt(float(d @ d) / d.numel()), rel=1e-12)
            assert recs[n]["update_ratio"] == pytest.approx(
                math.sqrt(float(d @ d)) / float(before[n].norm()), rel=1e-12
            )
        allg = torch.cat([g.flatten() for g in grads.values()])
        assert_close(
            {k.removeprefix("grad_"): v for k, v in recs["(all)"].items() if k.startswith("grad_")}, ref_stats(allg)
        )
    # names: fallback g<group>.p<index>, or from a module
    m = _model()
    plain = ChainOptimizer(m.parameters(), recipes.sgd(lr=0.1))
    by_module = GradientDiagnostics(plain, names=m, params=False)
    fallback = GradientDiagnostics(plain, params=False)
    x, y = _data(0)
    torch.nn.functional.mse_loss(m(x), y).backward()
    plain.step()
    assert {r["tensor"] for r in by_module.records} == {"0.weight", "0.bias", "2.weight", "2.bias", "(all)"}
    assert {r["tensor"] for r in fallback.records} == {"g0.p0", "g0.p1", "g0.p2", "g0.p3", "(all)"}
    assert not any(k.startswith("param_") for k in fallback.records[0])


def _train(make_opt, diagnostics: bool, steps: int = 12, dtype: torch.dtype = torch.float32):
    model = _model(dtype)
    opt = make_opt(model)
    diag = None
    if diagnostics:
        diag = GradientDiagnostics(opt, every=1, updates=True, writer=FakeWriter(), histogram_every=1)
    for i in range(steps):
        opt.zero_grad()
        x, y = _data(i, dtype)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step(loss=loss) if isinstance(opt, ChainOptimizer) else opt.step()
        # the hooks never write the gradients
        assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    if diag is not None:
        assert len(diag.records) == steps * 5
        diag.close()
    return model, opt


class FakeWriter:
    """Stands in for a SummaryWriter: records what would be written."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.histograms: list[tuple[str, torch.Tensor, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def add_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.histograms.append((tag, values.clone(), step))


@pytest.mark.parametrize(
    "label, make_opt",
    [
        ("adamw", lambda m: ChainOptimizer(m.named_parameters(), recipes.adamw(lr=1e-2))),
        ("sgd_momentum", lambda m: ChainOptimizer(m.parameters(), recipes.sgd(lr=0.05, momentum=0.9, nesterov=True))),
        ("torch_adam", lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
    ],
)
def test_diagnostics_do_not_disturb_the_step(label: str, make_opt) -> None:
    m1, o1 = _train(make_opt, diagnostics=False)
    m2, o2 = _train(make_opt, diagnostics=True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, st in s1["state"].items():
        assert st.keys() == s2["state"][k].keys()
        assert all(torch.equal(v, s2["state"][k][n]) for n, v in st.items())
    # hooks are removed by close(): no more records
    assert not o2._optimizer_step_pre_hooks and not o2._optimizer_step_post_hooks


def test_writer_gets_scalars_and_histograms() -> None:
    model = _model()
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2))
    w = FakeWriter()
    with GradientDiagnostics(opt, every=1, writer=w, histogram_every=2) as diag:
        for i in range(3):
            opt.zero_grad()
            x, y = _data(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            g = model[0].weight.grad.clone()
            opt.step()
    tags = {t for t, _, _ in w.scalars}
    assert {f"grad_{s}/0.weight" for s in STATS} <= tags and {f"param_{s}/(all)" for s in STATS} <= tags
    assert {s for t, _, s in w.scalars} == {1, 2, 3}
    rec = diag.last()["0.weight"]
    assert ("grad_kurtosis/0.weight", rec["grad_kurtosis"], 3) in w.scalars
    hist_steps = sorted({s for t, _, s in w.histograms if t == "grad/0.weight"})
    assert hist_steps == [1, 3]
    last = next(v for t, v, s in w.histograms if t == "grad/0.weight" and s == 3)
    assert torch.equal(last, g.float())


def test_tensorboard_event_files(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _model()
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2))
    with GradientDiagnostics(opt, every=1, log_dir=tmp_path) as diag:
        for i in range(2):
            opt.zero_grad()
            x, y = _data(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    assert "grad_top_share/2.weight" in acc.Tags()["scalars"]
    assert "grad/2.weight" in acc.Tags()["histograms"]
    ev = acc.Scalars("grad_norm/(all)")
    assert [e.step for e in ev] == [1, 2]
    assert ev[-1].value == pytest.approx(diag.last()["(all)"]["grad_norm"], rel=1e-6)


def test_state_bytes_and_bad_arguments() -> None:
    lin = torch.nn.Linear(3, 2)
    opt = ChainOptimizer(lin.parameters(), recipes.adamw())
    assert state_bytes(opt) == 0
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    # m and v for 6 + 2 fp32 entries, plus one fp32 step counter per param
    assert state_bytes(opt) == 2 * (6 + 2) * 4 + 2 * 4
    for kw, match in [
        ({"every": 0}, "every"),
        ({"histogram_every": -1}, "histogram_every"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"log_dir": "x", "writer": FakeWriter()}, "log_dir"),
    ]:
        with pytest.raises(ValueError, match=match):
            GradientDiagnostics(opt, **kw)


def test_low_precision_grads() -> None:
    model = _model(torch.bfloat16)
    opt = ChainOptimizer(model.named_parameters(), recipes.adamw(lr=1e-2))
    diag = GradientDiagnostics(opt)
    x, y = _data(0, torch.bfloat16)
    torch.nn.functional.mse_loss(model(x), y).backward()
    g = model[2].weight.grad.clone()
    opt.step()
    assert_close(
        {k.removeprefix("grad_"): v for k, v in diag.last()["2.weight"].items() if k.startswith("grad_")}, ref_stats(g)
    )


def test_state_bytes_counts_tensors_nested_in_a_state_entry() -> None:
    """heavyball keeps a param's tensors one level down (``state[p][0]``): they counted as 0 bytes,
    and the main job's state/params column read 0 for heavyball peers. A tensor held twice counts once."""
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    m = torch.zeros(2, 3)
    opt.state[lin.weight] = {0: {"exp_avg": m, "exp_avg_sq": torch.zeros(2, 3)}, "also": [m, (torch.zeros(2),)]}
    assert state_bytes(opt) == (6 + 6 + 2) * 4
