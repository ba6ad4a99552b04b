"""Adam-atan2: which published form each configuration reproduces.

- ``m_correction="inside"`` (default): the paper's form ``a atan2(m^, b sqrt(v^))`` (2407.05872),
  computed by ``adam-atan2-pytorch`` ``AdamAtan2`` (installed peer, compared in float64 lockstep).
- ``m_correction="outside"``: the ``adam-atan2`` CUDA package's ``(1/(1-b1^t)) atan2(m, sqrt(v^))``
  (a = b = 1), compared with a float64 transcription of that kernel's arithmetic (it needs CUDA).
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
from harness import lockstep_gap
from torch.utils._python_dispatch import TorchDispatchMode

import gradchain as gc
from gradchain import ChainOptimizer, recipes

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second intra-op thread only spins, and on a shared CPU that costs seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 6, dtype=F64, generator=g), torch.randn(128, 2, dtype=F64, generator=g)


def _paper_form(grads, b1, b2, a, b):
    """The paper's form: u = a atan2(m / (1 - b1^t), b sqrt(v / (1 - b2^t)))."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(a * torch.atan2(m / (1 - b1**t), b * torch.sqrt(v / (1 - b2**t))))
    return out


def _cuda_package_form(grads, b1, b2, a, b):
    """The adam-atan2 CUDA kernel's direction, a and b added: (a/(1 - b1^t)) atan2(m, b sqrt(v)/sqrt(1 - b2^t))."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(a / (1 - b1**t) * torch.atan2(m, b * torch.sqrt(v) / math.sqrt(1 - b2**t)))
    return out


def _grads(steps: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, dtype=F64, generator=gen) * (3.0 if t % 3 else 0.1) for t in range(steps)]


@pytest.mark.parametrize("where,ref", [("inside", _paper_form), ("outside", _cuda_package_form)])
@pytest.mark.parametrize("b1,b2,a,b", [(0.9, 0.99, 1.27, 1.0), (0.8, 0.95, 2.0, 0.5)])
def test_each_form_against_its_reference(where, ref, b1, b2, a, b) -> None:
    t = gc.scale_by_adam_atan2((b1, b2), a, b, m_correction=where)
    p = torch.zeros(4, 3, dtype=F64)
    state = t.init([p])
    grads = _grads(15, seed=1)
    for u, want in zip((t.update([g], state, [p])[0] for g in grads), ref(grads, b1, b2, a, b)):
        torch.testing.assert_close(u, want, rtol=1e-13, atol=1e-15)


def test_the_two_forms_differ_and_agree_where_they_should() -> None:
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=F64)
    inside, outside = _paper_form([g], 0.9, 0.99, 1.0, 1.0)[0], _cuda_package_form([g], 0.9, 0.99, 1.0, 1.0)[0]
    # step 1: atan(1) = pi/4 per coordinate against 10 atan(0.1) = 0.9967
    assert torch.allclose(inside.abs(), torch.full((3,), math.pi / 4, dtype=F64))
    assert torch.allclose(outside.abs(), torch.full((3,), 10 * math.atan(0.1), dtype=F64))
    for where, want in (("inside", inside), ("outside", outside)):
        t = gc.scale_by_adam_atan2((0.9, 0.99), 1.0, 1.0, m_correction=where)
        p = torch.zeros(3, dtype=F64)
        torch.testing.assert_close(t.update([g], t.init([p]), [p])[0], want, rtol=1e-14, atol=0)
    # |m| << b sqrt(v) (b large): both approach (a/b) m^/sqrt(v^), Adam without eps
    grads = _grads(10, seed=2)
    b = 1e6
    m = v = 0.0
    for gr in grads:
        m = 0.9 * m + 0.1 * gr
        v = 0.99 * v + 0.01 * gr * gr
    adam = (m / (1 - 0.9**10)) / torch.sqrt(v / (1 - 0.99**10)) / b
    for form in (_paper_form, _cuda_package_form):
        torch.testing.assert_close(form(grads, 0.9, 0.99, 1.0, b)[-1], adam, rtol=1e-9, atol=0)


def test_invalid_m_correction() -> None:
    with pytest.raises(ValueError, match="m_correction"):
        gc.scale_by_adam_atan2(m_correction="middle")
    with pytest.raises(ValueError, match="m_correction"):
        recipes.adam_atan2(m_correction="before")


# -- the recipe against the installed peer, weight decay included -----------------------------------
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_recipe_is_adam_atan2_pytorch(wd: float) -> None:
    peer = pytest.importorskip("adam_atan2_pytorch")
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = peer.AdamAtan2(m1.parameters(), lr=1e-2, weight_decay=wd)  # decoupled_wd=False, its default
    o2 = ChainOptimizer(m2.parameters(), recipes.adam_atan2(lr=1e-2, weight_decay=wd))
    x, y = _data()
    assert lockstep_gap((m1, o1, None), (m2, o2, None), x, y, steps=200) <= 1e-12


def test_peer_decoupled_wd_is_wd_over_initial_lr() -> None:
    # AdamAtan2(decoupled_wd=True) decays by lr wd / lr_0: this recipe with weight_decay = wd / lr_0,
    # also while a scheduler moves lr
    peer = pytest.importorskip("adam_atan2_pytorch")
    lr0, wd = 1e-2, 1e-3
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = peer.AdamAtan2(m1.parameters(), lr=lr0, weight_decay=wd, decoupled_wd=True)
    o2 = ChainOptimizer(m2.parameters(), recipes.adam_atan2(lr=lr0, weight_decay=wd / lr0))
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=50)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=50)
    x, y = _data()
    assert lockstep_gap((m1, o1, s1), (m2, o2, s2), x, y, steps=120) <= 1e-12


def test_recipe_outside_is_the_cuda_package_rule() -> None:
    # adam-atan2 (CUDA) kernel: p *= 1 - lr wd; p -= (lr / c1) atan2(m, sqrt(v) / sqrt(c2)); defaults
    # lr 1e-3, betas (0.9, 0.999), weight_decay 1e-2
    lr, b1, b2, wd = 1e-3, 0.9, 0.999, 1e-2
    model = _model()
    ref = copy.deepcopy(model)
    opt = ChainOptimizer(
        model.parameters(),
        recipes.adam_atan2(lr=lr, betas=(b1, b2), weight_decay=wd, a=1.0, b=1.0, m_correction="outside"),
    )
    ms = [torch.zeros_like(p) for p in ref.parameters()]
    vs = [torch.zeros_like(p) for p in ref.parameters()]
    x, y = _data()
    for t in range(1, 61):
        xb, yb = x[(t % 16) * 8 :][:8], y[(t % 16) * 8 :][:8]
        for mod in (model, ref):
            mod.zero_grad()
            torch.nn.functional.mse_loss(mod(xb), yb).backward()
        opt.step()
        with torch.no_grad():
            for p, m, v in zip(ref.parameters(), ms, vs):
                p.mul_(1 - lr * wd)
                m.lerp_(p.grad, 1 - b1)
                v.lerp_(p.grad * p.grad, 1 - b2)
                p.sub_(lr / (1 - b1**t) * torch.atan2(m, v.sqrt() / math.sqrt(1 - b2**t)))
        gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
        assert gap <= 1e-12


# -- the eager step over many small tensors -------------------------------------------------------
class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_eager_step_passes_per_tensor() -> None:
    # on small tensors every pass is a per-tensor op of a few us, the step's whole cost: m (1), v (2),
    # sqrt, its scaling, the inf check, atan2 and the write, 8 in all (adam-atan2-pytorch takes 8).
    # A number multiplies as one 0-d tensor, not wrapped again per tensor (a foreach op's .Scalar form)
    n = 6
    params = [torch.nn.Parameter(torch.randn(50)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(50)
    opt = ChainOptimizer(params, recipes.adam_atan2())
    opt.step()
    with _OpCounter() as counter:
        opt.step()
    ops = counter.ops
    per_list = sum(k for op, k in ops.items() if op.startswith("aten._foreach_"))
    per_tensor = sum(k for op, k in ops.items() if op.startswith("aten.") and not op.startswith("aten._foreach_")
                     and k % n == 0)
    assert per_list + per_tensor // n == 8, ops
    assert not any(op.startswith(("aten._foreach_mul_.Scalar", "aten._foreach_div")) for op in ops), ops


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_eager_step_in_float32_agrees_with_float64_reference(where: str) -> None:
    # the fp32 eager step (pieces, per-step scalars as 0-d tensors) against the float64 forms
    ref = _paper_form if where == "inside" else _cuda_package_form
    grads = _grads(12, seed=3)
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = ChainOptimizer([p], recipes.adam_atan2(lr=1.0, a=1.3, b=0.7, m_correction=where))
    want = torch.zeros(4, 3, dtype=F64)
    for g, u in zip(grads, ref(grads, 0.9, 0.99, 1.3, 0.7)):
        p.grad = g.float()
        opt.step()
        want -= u
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-5)


def _ulps(got: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|got - exact| in units of the float32 spacing at the exact value."""
    near = exact.float().abs()
    spacing = (torch.nextafter(near, torch.tensor(math.inf)) - near).double()
    return (got.double() - exact).abs() / spacing


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_atan2_polynomial_is_within_2_ulp(compiled: bool) -> None:
    # the fused path's atan2 (denominators >= 0): arguments spread over many decades, both orders
    g = torch.Generator().manual_seed(0)
    n = 200_000
    y = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    x = (torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))).abs()
    f = torch.compile(gc.ops.atan2_nonneg_polynomial, fullgraph=True) if compiled else gc.ops.atan2_nonneg_polynomial
    err = _ulps(f(y, x), torch.atan2(y.double(), x.double()))
    assert err.max() <= 2.0, err.max()
    assert err.mean() < 0.5  # most results correctly rounded, not merely within the bound


def test_fused_atan2_polynomial_special_values() -> None:
    inf, nan = math.inf, math.nan
    y = torch.tensor([0.0, -0.0, 0.0, 3.0, -3.0, 2.0, -inf, inf, inf, nan, 1.0, 1e-40, 1e38])
    x = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 2.0, 1.0, 1.0, inf, 1.0, nan, 1e-40, 1e-38])
    got = gc.ops.atan2_nonneg_polynomial(y, x)
    want = torch.atan2(y.double(), x.double()).float()
    want[8] = nan  # atan2(inf, inf) = pi/4; two infinite arguments give NaN instead
    torch.testing.assert_close(got, want, rtol=3e-7, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(got[:2]), torch.tensor([False, True]))  # signed zeros kept
