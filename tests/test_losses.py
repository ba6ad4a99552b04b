"""Loss reducers for long tails: soft median limits (median, mean), trimmed mean, gradients, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import gradchain as gc
from gradchain.losses import soft_median, trimmed_mean

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: a second intra-op thread only spins, and on a shared CPU that costs seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _losses(n: int, seed: int = 0) -> torch.Tensor:
    # distinct values with a long right tail, in random order
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dtype=F64, generator=g).exp()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 10, 255, 256])
def test_small_tau_is_the_median(n: int) -> None:
    x = _losses(n, seed=n)
    # the quantile at 0.5 interpolates: the mean of the two middle values for even n
    assert float(soft_median(x, 1e-3)) == pytest.approx(float(torch.quantile(x, 0.5)), rel=1e-12)
    if n % 2:
        assert float(soft_median(x, 1e-3)) == pytest.approx(float(torch.median(x)), rel=1e-12)
    else:  # torch.median returns the lower middle value; the soft median centres between the two
        s = torch.sort(x).values
        assert float(soft_median(x, 1e-3)) == pytest.approx(float(s[n // 2 - 1] + s[n // 2]) / 2, rel=1e-12)


def test_the_article_example() -> None:
    # the article pads even counts with a zero, which gives the lower median 2.0; the median is 2.5
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    for tau in (1e-3, 0.5, 3.0, 1e3):
        assert float(soft_median(x, tau)) == pytest.approx(2.5, abs=1e-12)


@pytest.mark.parametrize("n", [2, 5, 64])
def test_large_tau_is_the_mean(n: int) -> None:
    x = _losses(n, seed=100 + n)
    assert float(soft_median(x, 1e9)) == pytest.approx(float(x.mean()), rel=1e-7)


def test_between_the_limits_and_robust() -> None:
    x = torch.cat([torch.linspace(1.0, 2.0, 253, dtype=F64), torch.tensor([500.0, 900.0], dtype=F64)])
    med, mean = float(torch.quantile(x, 0.5)), float(x.mean())
    soft = float(soft_median(x, 0.05 * x.numel()))
    assert med < soft < mean and soft - med < 0.1 * (mean - med)
    # monotone in tau between the two limits for this right-skewed sample
    values = [float(soft_median(x, t)) for t in (0.1, 1.0, 10.0, 100.0, 1e4)]
    # (at tau 0.1 and 1 both are the median to the last bits: one rounding apart, in either order)
    assert all(a <= b * (1 + 4 * torch.finfo(F64).eps) for a, b in zip(values, values[1:]))
    assert values[-1] - values[0] > 5.0


def test_scale_equivariant() -> None:
    # the temperature is in ranks, so rescaling the losses rescales the result and nothing else
    x = _losses(31)
    for c in (1e-3, 1.0, 1e4):
        assert float(soft_median(c * x, 2.0)) == pytest.approx(c * float(soft_median(x, 2.0)), rel=1e-12)


def test_shape_is_flattened_and_dtype_kept() -> None:
    x = _losses(12).reshape(3, 4).float()
    out = soft_median(x, 1.0)
    assert out.shape == () and out.dtype == torch.float32
    assert float(out) == pytest.approx(float(soft_median(x.reshape(-1), 1.0)))


def _ref_trimmed(x: torch.Tensor, q: float) -> float:
    s = sorted(x.reshape(-1).tolist())
    k = math.floor(q * len(s))
    kept = s[k : len(s) - k]
    return sum(kept) / len(kept)


@pytest.mark.parametrize(
    "n,q", [(1, 0.0), (1, 0.4), (10, 0.0), (10, 0.1), (10, 0.25), (10, 0.49), (37, 0.2), (100, 0.05)]
)
def test_trimmed_mean_against_a_sorted_slice(n: int, q: float) -> None:
    x = _losses(n, seed=7 * n)
    assert float(trimmed_mean(x, q)) == pytest.approx(_ref_trimmed(x, q), rel=1e-12)


def test_trimmed_mean_limits_and_scipy() -> None:
    x = _losses(41, seed=3)
    assert float(trimmed_mean(x, 0.0)) == pytest.approx(float(x.mean()), rel=1e-12)
    assert float(trimmed_mean(x, 0.49)) == pytest.approx(float(torch.median(x)), rel=1e-12)  # odd n: one left
    stats = pytest.importorskip("scipy.stats")
    for q in (0.1, 0.2, 0.3):
        assert float(trimmed_mean(x, q)) == pytest.approx(float(stats.trim_mean(x.numpy(), q)), rel=1e-12)


@pytest.mark.parametrize("n,tau", [(5, 0.7), (8, 1.5), (9, 4.0)])
def test_soft_median_gradcheck_and_weights(n: int, tau: float) -> None:
    x = _losses(n, seed=20 + n).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: soft_median(t, tau), (x,))
    (g,) = torch.autograd.grad(soft_median(x, tau), x)
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (g > 0).all()
    # the weight is the rank's: largest at the middle, symmetric around it
    ranks = torch.argsort(torch.argsort(x.detach()))
    by_rank = g[torch.argsort(ranks)]
    assert torch.allclose(by_rank, by_rank.flip(0), rtol=1e-12, atol=0)
    assert int(torch.argmax(by_rank)) in ((n - 1) // 2, n // 2)


def test_temperature_is_not_differentiated() -> None:
    x = _losses(6).requires_grad_()
    tau = torch.tensor(2.0, dtype=F64, requires_grad=True)
    out = soft_median(x, tau)
    out.backward()
    assert tau.grad is None  # a constant: no gradient flows into or through the temperature
    assert float(x.grad.sum()) == pytest.approx(1.0, abs=1e-12)


def test_trimmed_mean_gradcheck() -> None:
    x = _losses(10, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: trimmed_mean(t, 0.2), (x,))
    (g,) = torch.autograd.grad(trimmed_mean(x, 0.2), x)
    ranks = torch.argsort(torch.argsort(x.detach()))
    kept = (ranks >= 2) & (ranks < 8)
    assert torch.allclose(g[kept], torch.full((6,), 1 / 6, dtype=F64), rtol=1e-14)
    assert torch.equal(g[~kept], torch.zeros(4, dtype=F64))


def test_bad_input() -> None:
    x = _losses(5)
    with pytest.raises(ValueError, match="empty"):
        soft_median(torch.empty(0), 1.0)
    with pytest.raises(ValueError, match="empty"):
        trimmed_mean(torch.empty(0, 3), 0.1)
    for tau in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau_ranks"):
            soft_median(x, tau)
    with pytest.raises(TypeError, match="tau_ranks"):
        soft_median(x, "1")
    with pytest.raises(ValueError, match="tau_ranks"):
        soft_median(x, torch.ones(2))
    for q in (-0.1, 0.5, 0.7, float("nan")):
        with pytest.raises(ValueError, match="q="):
            trimmed_mean(x, q)
    with pytest.raises(TypeError, match="floating"):
        soft_median(torch.arange(4), 1.0)
    with pytest.raises(TypeError, match="tensor"):
        trimmed_mean([1.0, 2.0], 0.1)


def test_exported() -> None:
    assert gc.losses.soft_median is soft_median and "losses" in gc.__all__
