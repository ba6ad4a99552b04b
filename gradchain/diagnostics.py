"""Long-tail gradient diagnostics: per-tensor gradient and parameter statistics, read from an optimizer.

The article's advice for heavy-tailed ("long-tail") gradients starts with looking at them: gradient
and weight histograms per tensor, and how much of a tensor's gradient mass sits in a few entries.
:class:`GradientDiagnostics` hooks an optimizer (a step pre hook, which reads the statistics, and a
post hook, which keeps them once the step has happened: a step that raises leaves no record) and,
every ``every`` steps of the optimizer's own count (the ``"step"`` in its state, so a resumed run
keeps its numbers; steps since attaching for an optimizer that keeps none), records for each
parameter tensor and for the whole model (``"(all)"``). With ``opt.step(closure)`` the gradient is
read inside the step, right after the closure's first call computed it:

- ``norm``      ``||x||_2``
- ``rms``       ``||x||_2 / sqrt(n)``
- ``max_abs``   ``max |x_i|``
- ``kurtosis``  excess kurtosis ``E[(x - mean)^4] / E[(x - mean)^2]^2 - 3`` (population moments; 0 for
  a Gaussian, larger for heavier tails; NaN for a constant tensor)
- ``top_share`` the share of ``sum |x_i|`` held by the largest ``ceil(top_fraction n)`` entries
  (``top_fraction`` = 1 %: about 0.01 for a uniform-magnitude tensor, near 1 when a few entries
  dominate; NaN for an all-zero tensor)

for the gradient (``grad_*``) and the parameter (``param_*``), and with ``updates=True`` the step's
update (``update_rms``, ``update_ratio`` = ``||delta p|| / ||p||`` before the step).

The hooks only read: they never write ``p.grad``, ``p`` or the optimizer state, so a run with the
diagnostics follows the same trajectory bit for bit as a run without them. Statistics are computed
in float64 on copies. The hooks call ``.tolist()`` (one host sync per recorded step); record every
few steps on an accelerator. Under FSDP2 a DTensor is gathered with ``full_tensor()`` (a collective:
every rank runs the hook, so every rank takes part).

Records go to TensorBoard (scalars per statistic and tensor, histograms of gradients and
parameters every ``histogram_every`` recorded steps) when ``log_dir`` or ``writer`` is given
(``log_dir`` needs the ``tensorboard`` package: ``ImportError`` at construction without it), and
always to :attr:`GradientDiagnostics.records`, which :meth:`GradientDiagnostics.write_csv` writes
to a results file.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._dtensor import plain  # a DTensor is gathered: statistics are over the whole tensor

__all__ = ["STATS", "GradientDiagnostics", "state_bytes", "tensor_stats", "tensorboard_available"]

STATS = ("norm", "rms", "max_abs", "kurtosis", "top_share")


def tensorboard_available() -> bool:
    """True when ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package is installed)."""
    return importlib.util.find_spec("tensorboard") is not None


def _stats_tensor(x: Tensor, top_fraction: float) -> Tensor:
    """The STATS of a flat float64 tensor as one 1-d tensor (so a step needs a single host sync)."""
    n = x.numel()
    if n == 0:
        return torch.full((len(STATS),), float("nan"), dtype=torch.float64, device=x.device)
    a = x.abs()
    sq = torch.dot(x, x)
    c = x - x.mean()
    m2 = (c * c).mean()
    m4 = (c.square() * c.square()).mean()
    k = max(1, math.ceil(top_fraction * n))
    top = a.topk(k, sorted=False).values.sum()
    return torch.stack([sq.sqrt(), (sq / n).sqrt(), a.max(), m4 / (m2 * m2) - 3.0, top / a.sum()])


def _flat64(t: Tensor) -> Tensor:
    # MPS has no float64; everything else does
    dtype = torch.float32 if t.device.type == "mps" else torch.float64
    return plain(t.detach()).reshape(-1).to(dtype)


def tensor_stats(t: Tensor, top_fraction: float = 0.01) -> dict[str, float]:
    """``{"norm", "rms", "max_abs", "kurtosis", "top_share"}`` of one tensor (see the module doc)."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"invalid top_fraction={top_fraction!r}: must be in (0, 1]")
    return dict(zip(STATS, _stats_tensor(_flat64(t), top_fraction).tolist()))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (step counters included), also
    where a state entry nests them in dicts, lists or tuples (heavyball keeps ``state[p][0]``)."""
    seen: set[int] = set()

    def size(v: Any) -> int:
        if isinstance(v, Tensor):
            if id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, Mapping):
            return sum(size(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        return 0

    return sum(size(st) for st in optimizer.state.values())


class GradientDiagnostics:
    """Record per-tensor gradient/parameter statistics from an optimizer without touching its step.

    ``GradientDiagnostics(opt, every=10, log_dir="runs/tb")`` hooks ``opt``; ``close()`` (or a
    ``with`` block) removes the hooks and closes the TensorBoard writer. Tensor names come from the
    param groups' ``param_names`` (pass ``named_parameters()`` to the optimizer), else from
    ``names`` (a module, or a mapping param -> name), else ``"g<group>.p<index>"``.

    Each record is a dict: ``step`` (the optimizer's step, from 1: its state's ``"step"`` after the
    step, else the steps since attaching), ``tensor``, ``numel``,
    ``grad_<stat>``, ``param_<stat>`` for every stat in :data:`STATS`, and with ``updates=True``
    ``update_rms`` and ``update_ratio``. The row ``tensor="(all)"`` is over all gradients (and
    parameters) of the step concatenated.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 1,
        names: torch.nn.Module | Mapping[Tensor, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        writer: Any = None,
        histogram_every: int = 10,
        top_fraction: float = 0.01,
        params: bool = True,
        updates: bool = False,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"invalid every={every!r}: must be an int >= 1")
        if not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"invalid histogram_every={histogram_every!r}: must be an int >= 0 (0: no histograms)")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"invalid top_fraction={top_fraction!r}: must be in (0, 1]")
        if log_dir is not None and writer is not None:
            raise ValueError("pass either log_dir= or writer=, not both")
        if log_dir is not None and not tensorboard_available():
            raise ImportError(
                f"GradientDiagnostics(log_dir={str(log_dir)!r}) writes TensorBoard event files, but the "
                "tensorboard package is not installed: pip install tensorboard (or gradchain[tensorboard]), "
                "or leave log_dir out (the statistics are still kept in .records and written by write_csv())"
            )
        self.optimizer = optimizer
        self.every = every
        self.histogram_every = histogram_every
        self.top_fraction = top_fraction
        self.params = params
        self.updates = updates
        self.records: list[dict[str, Any]] = []
        self.step = 0
        if isinstance(names, torch.nn.Module):
            names = {p: n for n, p in names.named_parameters()}
        self._names: Mapping[Tensor, str] = names or {}
        self._own_writer = False
        self.writer = writer
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
            self._own_writer = True
        self._pending: list[dict[str, Any]] = []
        self._before: list[tuple[Tensor, Tensor]] = []
        self._histograms: list[tuple[str, Tensor]] = []
        self._label = 0
        self._recorded = 0
        # the post hook keeps a record: a step that raises runs none, and leaves no record
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_hook),
            optimizer.register_step_post_hook(self._post_hook),
        ]

    # -- hooks ----------------------------------------------------------------------------------
    def _named_params(self) -> Iterable[tuple[str, Tensor]]:
        for gi, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if names is not None:
                    yield names[pi], p
                else:
                    yield self._names.get(p, f"g{gi}.p{pi}"), p

    def _optimizer_steps(self) -> int | None:
        """The steps the optimizer has taken by its own count (the largest ``"step"`` in its per-param
        state, as gradchain and torch's optimizers keep), or None for an optimizer that keeps none."""
        best = None
        for st in self.optimizer.state.values():
            s = st.get("step") if isinstance(st, Mapping) else None
            if s is not None:
                v = float(plain(s)) if isinstance(s, Tensor) else float(s)
                best = v if best is None or v > best else best
        return None if best is None else int(best)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        # a step that raised ran no post hook: its record never happened
        self._pending, self._before, self._histograms = [], [], []
        taken = self._optimizer_steps()
        label = self._label = (self.step if taken is None else taken) + 1
        if label % self.every:
            return None
        # args is (optimizer, *step's positional args): the closure, if any, comes first after it
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            self._collect(label)
            return None
        # the closure computes this step's gradient inside step(): read it there, after the first call
        # (the gradient at the step's starting point, before the params move)
        done = False

        def recorded_closure() -> Any:
            nonlocal done
            out = closure()
            if not done:
                done = True
                self._collect(label)
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": recorded_closure}
        return (args[0], recorded_closure, *args[2:]), kwargs

    @torch.no_grad()
    def _collect(self, label: int) -> None:
        named = list(self._named_params())
        if not named:
            return None
        grads = [_flat64(p.grad) for _, p in named]
        rows = [_stats_tensor(g, self.top_fraction) for g in grads]
        rows.append(_stats_tensor(torch.cat(grads), self.top_fraction))
        if self.params:
            flat = [_flat64(p) for _, p in named]
            prow = [_stats_tensor(x, self.top_fraction) for x in flat]
            prow.append(_stats_tensor(torch.cat(flat), self.top_fraction))
            rows = [torch.cat([g, q]) for g, q in zip(rows, prow)]
        values = torch.stack(rows).tolist()  # the one host sync of this step
        keys = [f"grad_{s}" for s in STATS] + ([f"param_{s}" for s in STATS] if self.params else [])
        labels = [n for n, _ in named] + ["(all)"]
        numels = [p.numel() for _, p in named]
        numels.append(sum(numels))
        self._pending = [
            {"step": label, "tensor": name, "numel": numel, **dict(zip(keys, vals))}
            for name, numel, vals in zip(labels, numels, values)
        ]
        hist = self.histogram_every and self._recorded % self.histogram_every == 0
        if self.writer is not None and hist:
            # written by the post hook, once the step has happened
            for name, p in named:
                self._histograms.append((f"grad/{name}", plain(p.grad.detach()).float().cpu()))
                if self.params:
                    self._histograms.append((f"param/{name}", plain(p.detach()).float().cpu()))
        if self.updates:
            self._before = [(p, plain(p.detach()).clone()) for _, p in named]
        return None

    @torch.no_grad()
    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # the step happened: it is the one the pre hook labelled (no second read of every count)
        self.step = self._label
        if not self._pending:
            return
        self._recorded += 1
        for tag, values in self._histograms:
            self.writer.add_histogram(tag, values, self.step)
        if self._before:
            deltas = [(_flat64(p) - _flat64(b)) for p, b in self._before]
            befores = [_flat64(b) for _, b in self._before]
            sums = [torch.stack([torch.dot(d, d), torch.dot(b, b)]) for d, b in zip(deltas, befores)]
            sums.append(torch.stack(sums).sum(0))
            vals = torch.stack(sums).tolist()
            for rec, (dd, bb) in zip(self._pending, vals):
                rec["update_rms"] = math.sqrt(dd / rec["numel"]) if rec["numel"] else float("nan")
                rec["update_ratio"] = math.sqrt(dd) / math.sqrt(bb) if bb > 0 else float("nan")
            self._before = []
        self._flush()

    def _flush(self) -> None:
        self.records.extend(self._pending)
        if self.writer is not None:
            for rec in self._pending:
                for k, v in rec.items():
                    if k not in ("step", "tensor", "numel"):
                        group, _, stat = k.partition("_")
                        self.writer.add_scalar(f"{group}_{stat}/{rec['tensor']}", v, rec["step"])
        self._pending = []

    # -- output ---------------------------------------------------------------------------------
    def last(self) -> dict[str, dict[str, Any]]:
        """The latest record of each tensor, keyed by tensor name."""
        return {r["tensor"]: r for r in self.records}

    def write_csv(self, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
        """Write the records (one row per step and tensor) to ``path``; ``extra`` columns go first."""
        extra = dict(extra or {})
        fields: list[str] = list(extra)
        for r in self.records:
            fields.extend(k for k in r if k not in fields)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in self.records:
                w.writerow({**extra, **r})

    def close(self) -> None:
        """Remove the hooks and close a writer this object opened."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._own_writer and self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> GradientDiagnostics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
