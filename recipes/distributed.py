"""``--fsdp``: one run across processes with torch's FSDP2 and distributed checkpoints (DCP).

Launch with ``torchrun`` (``torchrun --nproc_per_node 2 -m recipes.compare --task charlm --fsdp``);
without it ``--fsdp`` runs in one process (a group of one, e.g. to resume a checkpoint that more
processes wrote: DCP reshards on load). Every process builds the same model from the same seed,
draws the same global batch and trains on its slice of the rows; FSDP2 averages the gradients, so
the trajectory equals a one-process run up to float rounding. Backend: NCCL when CUDA is there
(one GPU per process, ``LOCAL_RANK``), else gloo on the CPU. Scaling out is torch's own launcher:
``torchrun --nnodes N --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT ...`` on each
node, with ``--out`` on a filesystem every node sees.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    created: bool  # whether we made the process group (and so destroy it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard_batch(self, batch: Any) -> Any:
        """This process's rows of a global batch (tensors split along dim 0, equal sizes)."""
        if isinstance(batch, Tensor):
            if batch.shape[0] % self.world:
                raise ValueError(
                    f"--fsdp: the batch of {batch.shape[0]} rows does not split evenly over {self.world} processes"
                )
            return batch.chunk(self.world)[self.rank]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard_batch(b) for b in batch)
        return batch

    def all_sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        t = t.detach().to(self.device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_max(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        t = t.detach().to(self.device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> DistContext:
    """Join torchrun's process group (or make a group of one); pick the device."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("--fsdp needs torch.distributed, which this torch build lacks")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timedelta(minutes=10))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    return DistContext(dist.get_rank(), dist.get_world_size(), device, created)


def shard_model(model: nn.Module, units: list[nn.Module]) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # the tasks' losses read the model's output without in-place ops, which is all the warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    for m in units:
        fully_shard(m)
    fully_shard(model)
    return model


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    # DCP loads into existing state: a ChainOptimizer allocates it; torch.optim's own are
    # initialised by get_optimizer_state_dict
    init = getattr(opt, "init_state", None)
    if init is not None:
        init()


def save_dcp(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=str(path))


def load_dcp(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    init_optimizer_state(opt)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on the CPU (collective; every process gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
