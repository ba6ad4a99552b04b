"""The reusable test harness every recipe goes through.

Use from a test module::

    from harness import RecipeCase, check_recipe, check_fsdp2

    CASES = [RecipeCase("adamw", partial(recipes.adamw, lr=1e-2))]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
    def test_harness(case):
        check_recipe(case)

    @pytest.mark.distributed
    def test_fsdp2():
        check_fsdp2(CASES)          # one 2-process spawn for the whole list

``RecipeCase.factory`` must be picklable (a recipe, or ``functools.partial`` of one, or a
module-level function) because the FSDP2 check sends it to spawned processes.
"""

from __future__ import annotations

import copy
import io
import math
import multiprocessing
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from gradchain import ChainOptimizer, Transform, chain, scale_by_lr


@dataclass
class RecipeCase:
    """A recipe under test: ``factory()`` returns a transform; ``overrides`` go to ChainOptimizer."""

    label: str
    factory: Callable[[], Transform]
    overrides: dict[str, Any] = field(default_factory=dict)
    steps: int = 6
    # a transform that needs all params sharing one step count, etc. can opt out of checks here
    skip: tuple[str, ...] = ()


class TinyNet(nn.Module):
    """Conv (4-d), linear (2-d), norm gains (1-d), biases, a 0-d gain, and a param with no grad."""

    def __init__(self, scalar: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.fc1 = nn.Linear(20, 13)
        self.fc2 = nn.Linear(13, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)
        self.gain = nn.Parameter(torch.tensor(1.0)) if scalar else None
        self.unused = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x)).flatten(1)
        x = torch.tanh(self.fc1(x))
        x = self.norm(torch.tanh(self.fc2(x)))
        out = self.head(x)
        return out * self.gain if self.gain is not None else out


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0, scalar: bool = True) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(scalar).to(dtype)


def batch(i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(8, 2, 4, 4, generator=g).to(dtype)
    y = torch.randn(8, 3, generator=g).to(dtype)
    return x, y


def loss_fn(model: nn.Module, i: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = batch(i, dtype)
    return ((model(x).float() - y.float()) ** 2).mean()


def make_optimizer(case: RecipeCase, model: nn.Module, **extra: Any) -> ChainOptimizer:
    named = [(n, p) for n, p in model.named_parameters()]
    return ChainOptimizer(named, case.factory(), **{**case.overrides, **extra})


def train(model: nn.Module, opt: ChainOptimizer, start: int, steps: int, dtype: torch.dtype) -> None:
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_fn(model, i, dtype)
        loss.backward()
        opt.step(loss=loss.detach())


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _state_snapshot(opt: ChainOptimizer) -> dict:
    return {
        id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in st.items()}
        for p, st in opt.state.items()
        if isinstance(p, torch.Tensor)
    }


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different params with state"
    for pid in a:
        assert a[pid].keys() == b[pid].keys(), f"{what}: state keys differ"
        for k in a[pid]:
            x, y = a[pid][k], b[pid][k]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype, f"{what}: {k} dtype {x.dtype} != {y.dtype}"
                assert torch.equal(x, y), f"{what}: {k} differs"
            else:
                assert x == y, f"{what}: {k} differs"


# -- the single-process checks ----------------------------------------------------------------
def check_contract(case: RecipeCase) -> None:
    """State keys, no state for grad-None params, closure/loss= return, hooks, deepcopy, groups."""
    dtype = torch.float64
    model = make_model(dtype)
    opt = make_optimizer(case, model)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    unused_before = model.unused.detach().clone()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, 0, dtype)
        loss.backward()
        return loss

    before = _params(model)
    ret = opt.step(closure)
    assert isinstance(ret, torch.Tensor), "step(closure) did not return the closure's loss"
    assert calls == ["pre", "post"], f"step hooks not called once: {calls}"
    assert torch.equal(model.unused, unused_before), "a param with grad None was changed"
    assert model.unused not in opt.state or not opt.state[model.unused], "a param with grad None got state"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "step changed nothing"
    for st in opt.state.values():
        for k in st:
            assert k == "step" or "." in k, f"state key {k!r} is not '<transform>.<buffer>'"
        assert st["step"].dim() == 0 and st["step"].dtype == torch.float32
        assert float(st["step"]) == 1.0
    loss = loss_fn(model, 1, dtype)
    opt.zero_grad()
    loss.backward()
    assert opt.step(loss=loss.detach()) is not None
    clone = copy.deepcopy(opt)
    assert clone.state_dict()["gradchain"] == opt.state_dict()["gradchain"]
    # a different chain's state is refused with a message
    other = ChainOptimizer(list(model.named_parameters()), chain(scale_by_lr(0.1)))
    try:
        other.load_state_dict(opt.state_dict())
    except ValueError as e:
        assert "different chain" in str(e)
    else:
        raise AssertionError("loading another chain's state dict did not raise")


def check_invalid_hyperparams(case: RecipeCase) -> None:
    """A negative lr (when declared) raises ValueError naming it, at construction and add_param_group."""
    model = make_model()
    opt = make_optimizer(case, model)
    if "lr" not in opt.defaults:
        return
    try:
        make_optimizer(case, model, lr=-1.0)
    except ValueError as e:
        assert "lr" in str(e)
    else:
        raise AssertionError("lr=-1 did not raise")
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    try:
        opt.add_param_group({"params": [extra], "lr": -0.5})
    except ValueError as e:
        assert "lr" in str(e)
    else:
        raise AssertionError("add_param_group with lr=-0.5 did not raise")
    assert len(opt.param_groups) == 1


def check_resume(case: RecipeCase, dtype: torch.dtype = torch.float64) -> None:
    """Save -> torch.load(weights_only=True) -> load into a fresh optimizer -> continue == uninterrupted."""
    n1, n2 = case.steps // 2 + 1, case.steps - case.steps // 2 + 1
    ref = make_model(dtype)
    ref_opt = make_optimizer(case, ref)
    train(ref, ref_opt, 0, n1 + n2, dtype)

    model = make_model(dtype)
    opt = make_optimizer(case, model)
    train(model, opt, 0, n1, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved_state = _state_snapshot(opt)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = make_model(dtype, seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = make_optimizer(case, model2)
    opt2.load_state_dict(ckpt["opt"])
    remap = dict(zip([id(p) for p in model.parameters()], [id(p) for p in model2.parameters()]))
    _assert_same_state({remap[k]: v for k, v in saved_state.items()}, _state_snapshot(opt2), "after load")
    train(model2, opt2, n1, n2, dtype)
    for (name, a), b in zip(ref.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), f"resume differs from an uninterrupted run at {name}: {(a - b).abs().max()}"
    remap = dict(zip([id(p) for p in ref.parameters()], [id(p) for p in model2.parameters()]))
    _assert_same_state({remap[k]: v for k, v in _state_snapshot(ref_opt).items()}, _state_snapshot(opt2), "resumed")


def check_dtypes(case: RecipeCase) -> None:
    """fp64, fp32, bf16, fp16 params: finite, moving, with fp32 state for the low-precision ones."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        model = make_model(dtype)
        before = _params(model)
        opt = make_optimizer(case, model)
        train(model, opt, 0, 3, dtype)
        for name, p in model.named_parameters():
            assert p.dtype == dtype
            assert torch.isfinite(p).all(), f"{dtype}: {name} not finite"
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), f"{dtype}: nothing moved"
        want = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        for st in opt.state.values():
            for k, v in st.items():
                if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert v.dtype == want, f"{dtype} params: state {k} is {v.dtype}, expected {want}"


def check_gradscaler_skip(case: RecipeCase) -> None:
    """Under GradScaler, a step with an inf gradient changes no param and no state."""
    dtype = torch.float32
    model = make_model(dtype)
    opt = make_optimizer(case, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    train(model, opt, 0, 2, dtype)
    before, state = _params(model), _state_snapshot(opt)
    opt.zero_grad()
    loss = loss_fn(model, 5, dtype)
    scaler.scale(loss).backward()
    model.fc1.weight.grad[0, 0] = float("inf")
    scaler.step(opt, loss=loss.detach())
    scaler.update()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b), "a skipped GradScaler step changed a param"
    _assert_same_state(state, _state_snapshot(opt), "skipped GradScaler step")


def check_sparse_rejected(case: RecipeCase) -> None:
    emb = nn.Embedding(10, 4, sparse=True).double()
    opt = ChainOptimizer(list(emb.named_parameters()), case.factory(), **case.overrides)
    emb(torch.tensor([1, 2])).sum().backward()
    try:
        opt.step(loss=torch.tensor(1.0))
    except RuntimeError as e:
        assert "sparse" in str(e)
    else:
        raise AssertionError("a sparse gradient did not raise")


CHECKS = {
    "contract": check_contract,
    "invalid_hyperparams": check_invalid_hyperparams,
    "resume": check_resume,
    "dtypes": check_dtypes,
    "gradscaler": check_gradscaler_skip,
    "sparse": check_sparse_rejected,
}


def check_recipe(case: RecipeCase) -> None:
    """Every single-process check of the harness (those in ``case.skip`` excepted)."""
    for name, fn in CHECKS.items():
        if name not in case.skip:
            fn(case)


# -- FSDP2: 2 processes, gloo on 127.0.0.1, float64 --------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_case(case: RecipeCase, steps: int) -> float:
    from torch.distributed.fsdp import fully_shard

    dtype = torch.float64
    ref = make_model(dtype, scalar=False)
    model = copy.deepcopy(ref)
    for mod in (model.conv, model.fc1, model.fc2, model.head):
        fully_shard(mod)
    fully_shard(model)
    ref_opt = make_optimizer(case, ref)
    opt = make_optimizer(case, model)
    train(ref, ref_opt, 0, steps, dtype)
    train(model, opt, 0, steps, dtype)
    err = 0.0
    for a, b in zip(ref.parameters(), model.parameters()):
        full = b.full_tensor() if hasattr(b, "full_tensor") else b
        err = max(err, (a - full).abs().max().item())
    return err


def _fsdp_worker(rank: int, world: int, port: int, cases: list, steps: int, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        for case in cases:
            try:
                results[case.label] = _fsdp_case(case, steps)
            except Exception:
                results[case.label] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        results["<setup>"] = traceback.format_exc()
    queue.put((rank, results))


def check_fsdp2(cases: list[RecipeCase], steps: int = 3, tol: float = 1e-12, timeout: float = 240.0) -> None:
    """Run every case under FSDP2 (2 ranks, uneven shards) and against one process, in float64."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        import pytest

        pytest.skip("gloo is not available")
    cases = [c for c in cases if "fsdp2" not in c.skip]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, cases, steps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, res = queue.get(timeout=timeout)
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failures = []
    for rank, res in sorted(results.items()):
        for label, value in res.items():
            if isinstance(value, str):
                failures.append(f"rank {rank} {label}:\n{value}")
            elif not (value <= tol) or math.isnan(value):
                failures.append(f"rank {rank} {label}: FSDP2 differs from one process by {value:.3e}")
    assert not failures, "\n".join(failures)


# -- lockstep parity with a torch.optim optimizer ----------------------------------------------
def lockstep_gap(
    pair_a: tuple[nn.Module, torch.optim.Optimizer, Any],
    pair_b: tuple[nn.Module, torch.optim.Optimizer, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 200,
    batch_size: int = 8,
) -> float:
    """Train two (model, optimizer, scheduler or None) on the same MSE batches in lockstep.

    Returns the largest parameter difference seen over the run (compare it with float64 rounding).
    """
    n_batches = x.shape[0] // batch_size
    gap = 0.0
    for i in range(steps):
        lo = i % n_batches * batch_size
        xb, yb = x[lo : lo + batch_size], y[lo : lo + batch_size]
        for model, opt, sched in (pair_a, pair_b):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
            if sched is not None:
                sched.step()
        gap = max(gap, max((a - b).abs().max().item() for a, b in zip(pair_a[0].parameters(), pair_b[0].parameters())))
    return gap
