"""DDP and torch.distributed.checkpoint with FSDP2: 2 processes, gloo on 127.0.0.1, float64."""

from __future__ import annotations

import copy
import multiprocessing
import os
import traceback
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
import torch
from harness import _free_port, make_model, train

from gradchain import ChainOptimizer, FusedGradientCopyWarning, recipes

pytestmark = pytest.mark.distributed


def _ddp(rank: int) -> float:
    from torch.nn.parallel import DistributedDataParallel

    ref = make_model(torch.float64)
    model = DistributedDataParallel(copy.deepcopy(ref), find_unused_parameters=True)
    ref_opt = ChainOptimizer(ref.named_parameters(), recipes.adamw(lr=1e-2))
    opt = ChainOptimizer(model.module.named_parameters(), recipes.adamw(lr=1e-2))
    train(ref, ref_opt, 0, 3, torch.float64)
    train(model, opt, 0, 3, torch.float64)
    return max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.module.parameters()))


def _ddp_fused(rank: int, bucket_view: bool) -> tuple[float, list[str]]:
    """DDP with the fused path: the one-process eager trajectory, and the copy warnings it gave."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    import gradchain.fused.runner as runner

    runner.BACKEND = "aot_eager"  # (a spawned process: the suite's conftest does not run here)
    ref = make_model(torch.float64)
    model = DistributedDataParallel(copy.deepcopy(ref), find_unused_parameters=True,
                                    gradient_as_bucket_view=bucket_view)
    ref_opt = ChainOptimizer(ref.named_parameters(), recipes.adamw(lr=1e-2))
    opt = ChainOptimizer(model.module.named_parameters(), recipes.adamw(lr=1e-2), fused=True)
    train(ref, ref_opt, 0, 5, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 0, 5, torch.float64)
    assert opt.fused_plan(), "the fused path did not run"
    gap = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.module.parameters()))
    return gap, [str(w.message) for w in caught if w.category is FusedGradientCopyWarning]


def _zero(rank: int) -> dict[str, Any]:
    """ZeroRedundancyOptimizer over ChainOptimizer (bound with functools.partial), eager and fused,
    with and without its bucket views of the params: each against the one-process eager run."""
    import warnings

    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    import gradchain.fused.runner as runner

    runner.BACKEND = "aot_eager"
    out: dict[str, Any] = {}
    ref = make_model(torch.float64)
    ref_opt = ChainOptimizer(ref.named_parameters(), recipes.adamw(lr=1e-2))
    train(ref, ref_opt, 0, 4, torch.float64)
    for bucket_view in (False, True):
        for fused in (False, True):
            model = DistributedDataParallel(make_model(torch.float64), find_unused_parameters=True)
            opt = ZeroRedundancyOptimizer(
                model.module.parameters(), partial(ChainOptimizer, transform=recipes.adamw(lr=1e-2), fused=fused),
                parameters_as_bucket_view=bucket_view)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(model, opt, 0, 4, torch.float64)
            gap = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), model.module.parameters()))
            out[f"view={bucket_view},fused={fused}"] = (
                gap, [str(w.message) for w in caught if "ChainOptimizer" in str(w.message)])
    return out


def _dcp(rank: int, path: str, recipe) -> float:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded():
        m = make_model(torch.float64, scalar=False)
        for mod in (m.conv, m.fc1, m.fc2, m.head):
            fully_shard(mod)
        fully_shard(m)
        # a param that never gets a gradient has no state to checkpoint: leave it out of the optimizer
        named = [(n, p) for n, p in m.named_parameters() if n != "unused"]
        return m, ChainOptimizer(named, recipe())

    model, opt = sharded()
    train(model, opt, 0, 2, torch.float64)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    train(model, opt, 2, 2, torch.float64)

    model2, opt2 = sharded()
    opt2.init_state()  # DCP loads into existing state; without it torch runs a dummy step
    sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model2, sd["model"])
    set_optimizer_state_dict(model2, opt2, sd["optim"])
    train(model2, opt2, 2, 2, torch.float64)
    return max((a.full_tensor() - b.full_tensor()).abs().max().item()
               for a, b in zip(model.parameters(), model2.parameters()))


def _fsdp_fused_mixed(rank: int) -> float:
    """fused=True under FSDP2 with plain params beside the sharded ones (``ignored_params``, listed
    first): the memory-overlap check read a DTensor's storage and every step raised."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    import gradchain.fused.runner as runner

    runner.BACKEND = "aot_eager"
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 6)).double()
    model = copy.deepcopy(ref)
    fully_shard(model, ignored_params={model[0].weight, model[0].bias})
    ref_opt = ChainOptimizer(ref.parameters(), recipes.adamw(lr=1e-2))
    opt = ChainOptimizer(model.parameters(), recipes.adamw(lr=1e-2), fused=True)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the sharded params' eager fallback is said once)
        for m, o in ((ref, ref_opt), (model, opt)):
            for _ in range(3):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
    return max((a - (b.full_tensor() if hasattr(b, "full_tensor") else b)).abs().max().item()
               for a, b in zip(ref.parameters(), model.parameters()))


def _worker(rank: int, port: int, path: str, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
        cases = (
            ("ddp", lambda: _ddp(rank)),
            ("ddp_fused", lambda: _ddp_fused(rank, bucket_view=False)),
            ("ddp_fused_bucket_view", lambda: _ddp_fused(rank, bucket_view=True)),
            ("zero", lambda: _zero(rank)),
            ("fsdp_fused_mixed", lambda: _fsdp_fused_mixed(rank)),
            ("dcp", lambda: _dcp(rank, path + "-adamw", partial(recipes.adamw, lr=1e-2))),
            # AdaLo's loss EMA is optimizer-level state: it must travel through DCP too
            ("dcp_adalo", lambda: _dcp(rank, path + "-adalo", partial(recipes.adalo, kappa=0.5))),
        )
        for name, fn in cases:
            try:
                out[name] = fn()
            except Exception:
                out[name] = traceback.format_exc()
        dist.destroy_process_group()
    except Exception:
        out["setup"] = traceback.format_exc()
    queue.put((rank, out))


def test_ddp_and_distributed_checkpoint(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("gloo is not available")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path / "ckpt"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, out = queue.get(timeout=240)
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, out in results.items():
        assert "setup" not in out, out.get("setup")
        assert isinstance(out["ddp"], float), out["ddp"]
        assert out["ddp"] <= 1e-12, f"rank {rank}: DDP differs from one process by {out['ddp']}"
        for case in ("ddp_fused", "ddp_fused_bucket_view"):
            assert isinstance(out[case], tuple), out[case]
            assert out[case][0] <= 1e-12, f"rank {rank}: {case} differs from one process by {out[case][0]}"
        # the optimizer's zero_grad keeps the grads views of the flat buffer: nothing to warn about
        assert out["ddp_fused"][1] == [], out["ddp_fused"][1]
        # DDP's bucket views come back at every backward: the warning names the option, not zero_grad
        (message,) = out["ddp_fused_bucket_view"][1]
        assert "gradient_as_bucket_view=False" in message and "zero_grad" not in message, message
        assert isinstance(out["zero"], dict), out["zero"]
        for case, (gap, _) in out["zero"].items():
            assert gap <= 1e-12, f"rank {rank}: ZeRO {case} differs from one process by {gap}"
        # ZeRO's own params are views of its buckets: the fused path leaves them there and steps
        # eagerly (moved into flat buffers, they would miss ZeRO's broadcasts: the ranks drifted apart)
        (message,) = [m for m in out["zero"]["view=True,fused=True"][1] if "eager path" in m]
        assert "parameters_as_bucket_view=True" in message, message
        for case in ("view=False,fused=True", "view=False,fused=False", "view=True,fused=False"):
            assert not [m for m in out["zero"][case][1] if "eager path" in m], out["zero"][case]
        # ZeRO's zero_grad() sets the grads to None: copied in at every step, and the warning says how not to
        (copied,) = [m for m in out["zero"]["view=False,fused=True"][1] if "arrived as new tensors" in m]
        assert "zero_grad(set_to_none=False) (ZeroRedundancyOptimizer's)" in copied, copied
        assert isinstance(out["fsdp_fused_mixed"], float), out["fsdp_fused_mixed"]
        assert out["fsdp_fused_mixed"] <= 1e-12, f"rank {rank}: {out['fsdp_fused_mixed']}"
        for case in ("dcp", "dcp_adalo"):
            assert isinstance(out[case], float), out[case]
            assert out[case] == 0.0, f"rank {rank}: {case} resume differs by {out[case]}"


def test_an_empty_shard_is_found_as_torch_chunks_a_dim() -> None:
    # (only rows < ranks counted before: 4 rows on 3 ranks chunk 2, 2, 0, and SM3 and apply_if_finite
    # failed on the empty rank while the others waited in a collective)
    from gradchain._dtensor import _chunks_short

    for rows in range(1, 24):
        for ranks in range(1, 10):
            parts = [c for c in torch.arange(rows).chunk(ranks) if c.numel()]
            assert _chunks_short(rows, ranks) == (len(parts) < ranks), (rows, ranks)
