"""A tiny byte-level transformer language model on Python's own standard library source.

The text ships with Python: the top-level ``.py`` files of ``sysconfig.get_paths()["stdlib"]``,
in sorted name order, read as bytes (the standard library is almost all ASCII, so a byte is a
character), at most 6000 bytes from each; every tenth file is held out for validation, so
validation is on unseen files. The selection is deterministic for one Python version (the files
differ between versions; the results file names the version).

Model: a GPT-style decoder (pre-LayerNorm blocks, causal attention, 4x MLP, learned positions).
Metric: validation loss in bits per byte on fixed windows.

Run alone: ``python -m recipes.charlm --optimizers adamw,sgd``.
"""

from __future__ import annotations

import math
import os
import sys
import sysconfig
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import FnStream, Task, defaults_for


def stdlib_text(train_bytes: int, val_bytes: int, per_file: int = 6000) -> tuple[Tensor, Tensor, list[str]]:
    """(train, val) byte tensors from the stdlib's top-level .py files, and the files used.

    Files are taken in sorted name order, at most ``per_file`` bytes from the start of each (so no
    single large file dominates); every tenth file goes to validation, the others to training,
    until both budgets are filled.
    """
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    train, val, used = bytearray(), bytearray(), []
    for i, f in enumerate(names):
        if len(train) >= train_bytes and len(val) >= val_bytes:
            break
        part = val if i % 10 == 9 else train
        if len(part) >= (val_bytes if part is val else train_bytes):
            continue
        with open(os.path.join(root, f), "rb") as fh:
            part.extend(fh.read(per_file))
        used.append(f)
    if len(train) < train_bytes or len(val) < val_bytes:
        raise RuntimeError(f"not enough standard library source under {root} for {train_bytes}+{val_bytes} bytes")
    to_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()
    return to_t(train[:train_bytes]), to_t(val[:val_bytes]), used


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class CharLMTask(Task):
    name = "charlm"
    batch_size = 32
    ctx = 64
    default_steps = 600
    eval_every = 100
    train_bytes = 300_000
    val_bytes = 30_000
    val_windows = 64
    metrics = ("val_loss", "val_bpc")
    supports_fsdp = True  # windows are independent rows; the loss is a mean over equal-sized shards
    optimizer_defaults = defaults_for(3e-3, sgd={"lr": 0.3, "momentum": 0.9}, adamw={"weight_decay": 0.1})

    def __init__(self) -> None:
        self.train, self.val, self.files = stdlib_text(self.train_bytes, self.val_bytes)
        self.source = (
            f"Python {sys.version.split()[0]} stdlib, {len(self.files)} files ({self.files[0]} .. {self.files[-1]})"
        )
        starts = torch.linspace(0, len(self.val) - self.ctx - 1, self.val_windows).long()
        self.val_x = torch.stack([self.val[s : s + self.ctx] for s in starts])
        self.val_y = torch.stack([self.val[s + 1 : s + self.ctx + 1] for s in starts])

    def model(self) -> nn.Module:
        return TinyGPT(ctx=self.ctx)

    def batches(self, gen: torch.Generator) -> FnStream:
        off = torch.arange(self.ctx + 1)

        def batch() -> tuple[Tensor, Tensor]:
            starts = torch.randint(0, len(self.train) - self.ctx - 1, (self.batch_size,), generator=gen)
            w = self.train[(starts[:, None] + off).to(self.train.device)]
            return w[:, :-1], w[:, 1:]

        return FnStream(batch)

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def loss(self, model: nn.Module, batch: Any, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten()), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss = F.cross_entropy(model(self.val_x).flatten(0, 1), self.val_y.flatten()).item()
        return {"val_loss": loss, "val_bpc": loss / math.log(2)}


if __name__ == "__main__":
    from .compare import cli

    cli(task="charlm")
