"""What a training task provides to :mod:`recipes.compare`, and the data helpers the tasks share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class Task:
    """One training problem: data, model, loss and evaluation.

    ``compare`` builds the model after ``torch.manual_seed(seed)`` and draws batches (and any
    sampling noise, e.g. the VAE's) from a ``torch.Generator`` seeded with ``seed``; tasks must use
    no other randomness, so every optimizer sees the same initial weights and the same data order.
    """

    name: str = ""
    # where the data comes from, for the results header
    source: str = ""
    default_steps: int = 1000
    eval_every: int = 100
    # columns of the results table filled by evaluate(), in order; the first is the headline metric
    metrics: tuple[str, ...] = ("val_loss",)
    # per recipe name: the settings this task uses unless the command line overrides them
    # (recipes not listed here run with their own defaults)
    optimizer_defaults: dict[str, dict[str, Any]] = {}
    # ``--fsdp`` splits each batch across processes along dim 0; a task whose loss is a mean over
    # equal-sized, independent rows (no sampling noise drawn per row) sets this to True
    supports_fsdp: bool = False

    def steps_per_epoch(self) -> int | None:
        """Steps in one pass over the training set, or None for a task without epochs."""
        return None

    def model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, gen: torch.Generator) -> Stream:
        """An endless stream of training batches in an order fixed by ``gen``.

        Its ``state_dict()`` together with ``gen``'s state must fix the rest of the stream, so a run
        resumed from a checkpoint sees the same batches as one that was never stopped.
        """
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Submodules that ``--fsdp`` shards one by one (the root is always sharded last)."""
        return []

    def to(self, device: torch.device) -> Task:
        """Move the task's data tensors to ``device`` (batches and evaluation then run there)."""
        for k, v in vars(self).items():
            if isinstance(v, Tensor):
                setattr(self, k, v.to(device))
        return self

    def loss(self, model: nn.Module, batch: Any, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss (a 0-d tensor to backpropagate) and named parts to log (0-d tensors)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """The validation metrics named in :attr:`metrics`."""
        raise NotImplementedError

    def plots(self, runs: list[Any], outdir: Path) -> list[Path]:
        """Task-specific figures (e.g. the VAE's latent scatter) written to ``outdir``."""
        return []


class Stream:
    """An endless iterator of batches whose position can be saved and restored."""

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FnStream(Stream):
    """A stream with no position of its own: each batch is ``fn()`` (which draws from the run's generator)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn

    def __next__(self) -> Any:
        return self.fn()


class EpochBatches(Stream):
    """Batches over ``range(n)``: a fresh permutation from ``gen`` each epoch, last batch kept; each
    batch is ``fetch(indices)``. The permutation is drawn when the epoch's first batch is taken."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator, fetch: Callable[[Tensor], Any]) -> None:
        self.n, self.batch_size, self.gen, self.fetch = n, batch_size, gen, fetch
        self.perm: Tensor | None = None
        self.pos = 0

    def __next__(self) -> Any:
        if self.perm is None or self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        return self.fetch(idx)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


class DigitsDataTask(Task):
    """A task on scikit-learn's digits: a fixed split, epochs of ``batch_size`` shuffled images."""

    epochs: int = 1
    batch_size: int = 128
    val_fraction: float = 0.2

    def __init__(self) -> None:
        self.x, self.y, self.x_val, self.y_val = load_digits_split(self.val_fraction)
        self.default_steps = self.epochs * self.steps_per_epoch()
        self.source = f"scikit-learn digits ({len(self.y)} train / {len(self.y_val)} val)"

    def steps_per_epoch(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def epoch_batches(self, fetch: Callable[[Tensor], Any], gen: torch.Generator) -> EpochBatches:
        return EpochBatches(len(self.y), self.batch_size, gen, fetch)


def load_digits_split(val_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits as ``(x_train, y_train, x_val, y_val)``.

    Images are ``(N, 1, 8, 8)`` float32 in [0, 1] (the raw values are 0..16). The split is fixed
    (its own generator, seed 0) so it does not change with the run's seed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('the digits tasks need scikit-learn: pip install -e ".[recipes]"') from e
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = int(round(val_fraction * len(y)))
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def defaults_for(lr_adam: float, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Task settings: the Adam-family recipes (and LAMB, Adam-atan2) at one learning rate, so a
    comparison changes the algorithm and not the step size; Lookahead wraps AdamW. Recipes not
    named keep their own defaults (AdaLo sets its step from the loss; Muon, Adafactor, SM3, ... have
    their own scales)."""
    same = {"lr": lr_adam}
    out: dict[str, dict[str, Any]] = {
        n: dict(same)
        for n in (
            "adam",
            "adamw",
            "nadam",
            "adam_atan2",
            "lamb",
            "cautious_adamw",
            "cwd_adamw",
            "gc_adamw",
            "softclip_adamw",
            "adams",
            "adanorm",
            "adamomentum",
            "diffgrad",
            "sadam",
        )
    }
    out["lookahead"] = {"inner": "recipe:adamw"}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v}
    return out
