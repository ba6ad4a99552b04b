"""ChainOptimizer: a torch.optim.Optimizer that runs a transform over buckets of params."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from .base import Bucket, Transform
from .schedules import decode_groups, encode_groups

__all__ = ["ChainOptimizer"]

# keys torch's LR schedulers write into param groups
_SCHEDULER_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "base_lr", "initial_momentum"}
)
_GROUP_KEYS = frozenset({"params", "param_names"})
# optimizer-level state travels in the state dict as entries of the first param's state, so that
# torch.distributed.checkpoint (which keeps only "state" and "param_groups") carries it too
_GLOBAL = "@global."


class ChainOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is a gradchain transform.

    ``ChainOptimizer(params, transform, **overrides)``: ``params`` as tensors, param-group dicts
    or ``named_parameters()``; ``overrides`` set any hyperparameter the transform declares
    (``lr``, ``betas``, ``weight_decay``, ...) for every group, and groups may override them
    again. Hyperparameters live in ``param_groups`` and are read every step, so torch LR
    schedulers work. ``maximize`` is a group option as in torch.optim.

    State per parameter is keyed ``"<transform name>.<buffer>"`` plus ``"step"`` (a 0-d fp32
    tensor). For fp16/bf16 params the state and the math are fp32; ``state_dtype`` sets another
    dtype for both (e.g. bf16 state to save memory). A param whose grad is None gets no state and
    is not touched.
    """

    def __init__(
        self,
        params: Iterable[Any],
        transform: Transform,
        *,
        state_dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(transform, Transform):
            raise TypeError(f"ChainOptimizer needs a gradchain Transform, got {type(transform).__name__}")
        self.transform = transform
        self.state_dtype = state_dtype
        defaults = {k: spec.default for k, spec in transform.hyperparams.items()}
        defaults["maximize"] = False
        defaults.update(transform.extra_defaults)
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise TypeError(
                f"unknown hyperparameters {unknown} for this chain; it declares {sorted(defaults)}"
            )
        defaults.update(overrides)
        # optimizer-level state (one for the whole optimizer, not per param), for transforms that
        # define ``init_global_state(device)``; transforms reach it as ``bucket.shared["global_state"]``
        self.global_state: dict[str, Tensor] = {}
        super().__init__(params, defaults)

    # -- groups -------------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        unknown = sorted(set(group) - set(self.defaults) - _GROUP_KEYS - _SCHEDULER_KEYS - {"differentiable"})
        if unknown:
            raise ValueError(
                f"param group has unknown hyperparameters {unknown}; this chain declares "
                f"{sorted(k for k in self.defaults if k != 'differentiable')}"
            )
        if not isinstance(group.get("maximize", False), bool):
            raise ValueError(f"invalid hyperparameter maximize={group['maximize']!r}: must be a bool")
        self.transform.validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated (``ValueError`` names a bad one)."""
        if isinstance(param_group, dict):
            self._check_group({k: v for k, v in param_group.items()})
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()
            raise

    # -- state --------------------------------------------------------------------------------
    def _init_param_state(self, p: Tensor, name: str | None) -> dict[str, Tensor]:
        st = self.transform.init_state(p, name)
        if self.state_dtype is not None:
            st = {k: v.to(self.state_dtype) if v.is_floating_point() and v.dim() > 0 else v for k, v in st.items()}
        st["step"] = torch.zeros((), dtype=torch.float32)
        self.state[p] = st
        return st

    @staticmethod
    def _names(group: dict[str, Any]) -> list[str | None]:
        names = group.get("param_names")
        return list(names) if names is not None else [None] * len(group["params"])

    def init_state(self) -> None:
        """Allocate the state of every param now (needed before a distributed checkpoint load)."""
        for group in self.param_groups:
            for p, name in zip(group["params"], self._names(group), strict=False):
                if not self.state.get(p):
                    self._init_param_state(p, name)
                self._init_global_state(p.device)

    def _init_global_state(self, device: torch.device) -> dict[str, Tensor]:
        if not self.global_state:
            for t in self.transform.leaves():
                init = getattr(t, "init_global_state", None)
                if init is not None:
                    self.global_state.update(init(device))
        return self.global_state

    # -- the step -----------------------------------------------------------------------------
    def _buckets(self, loss: Tensor | None, batch_size: Any = None) -> tuple[list[Bucket], list[list[dict]]]:
        shared: dict[str, Any] = {}
        buckets, states = [], []
        for group in self.param_groups:
            split: dict[tuple, list] = defaultdict(list)
            for p, name in zip(group["params"], self._names(group), strict=False):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"gradchain does not support sparse gradients (param {name or tuple(p.shape)}); "
                        "use a dense embedding or torch.optim.SparseAdam"
                    )
                if p.is_complex():
                    raise RuntimeError(
                        f"gradchain does not support complex params yet (param {name or tuple(p.shape)})"
                    )
                st = self.state.get(p) or self._init_param_state(p, name)
                split[(p.device, p.dtype)].append((p, g, st, name))
            for items in split.values():
                params = [x[0] for x in items]
                grads = [x[1] for x in items]
                if group["maximize"]:
                    grads = torch._foreach_neg(grads)
                sts = [x[2] for x in items]
                keys = {k for st in sts for k in st if k != "step"}
                lists = {k: [st.get(k) for st in sts] for k in keys}
                steps = [st["step"] for st in sts]
                torch._foreach_add_(steps, 1.0)
                buckets.append(
                    Bucket(params, grads, lists, steps, [x[3] for x in items], group, loss, shared, self.state_dtype,
                           batch_size=batch_size)
                )
                states.append(sts)
        if buckets:
            shared["global_state"] = self._init_global_state(buckets[0].params[0].device)
        return buckets, states

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: Any = None, batch_size: Any = None
    ) -> Any:
        """One optimizer step.

        ``closure`` (re-evaluates the model and returns the loss) runs under ``enable_grad``;
        ``loss=`` passes the loss without a closure (also through ``GradScaler.step(opt, loss=loss)``).
        Either way loss-aware transforms see it, and it is returned. ``batch_size=`` (a number or a
        0-d tensor: this micro-batch's sample or token count) weighs the micro-batches of
        ``accumulate()``; a chain without one refuses it.
        """
        if batch_size is not None and not any(getattr(t, "reads_batch_size", False) for t in self.transform.leaves()):
            raise ValueError("step(batch_size=) is read by accumulate(); this chain has no accumulate()")
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either a closure or loss=, not both")
            with torch.enable_grad():
                loss = closure()
        loss_t = None
        if loss is not None:
            loss_t = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
        buckets, states = self._buckets(loss_t, batch_size)
        if buckets:
            self.transform.apply(buckets)
            for b, sts in zip(buckets, states, strict=False):
                b.write()
                for k, lst in b.state.items():
                    for st, t in zip(sts, lst, strict=False):
                        if t is not None and st.get(k) is not t:
                            st[k] = t
        return loss

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, plus ``"gradchain"``: the chain's transform names, checked on load."""
        sd = super().state_dict()
        encode_groups(sd["param_groups"])  # schedules as plain descriptions (torch.load weights_only)
        sd["gradchain"] = {"transforms": self.transform.signature()}
        if self.global_state and sd["param_groups"] and sd["param_groups"][0]["params"]:
            holder = sd["param_groups"][0]["params"][0]
            entry = dict(sd["state"].get(holder, {}))  # a copy: the live state stays as it is
            entry.update({_GLOBAL + k: v for k, v in self.global_state.items()})
            sd["state"][holder] = entry
        return sd

    def _expected_keys(self, p: Tensor, name: str | None) -> set[str] | None:
        try:
            meta = torch.empty(tuple(p.shape), dtype=p.dtype, device="meta")
            return set(self.transform.init_state(meta, name)) | {"step"}
        except Exception:
            return None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved state dtypes (torch would cast them to the param's).

        Raises ``ValueError`` when it comes from a different chain: other transform names, other
        state buffers, other group structure or hyperparameters this chain does not declare.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        mine = self.transform.signature()
        meta = state_dict.get("gradchain")
        if meta is not None and list(meta.get("transforms", [])) != mine:
            raise ValueError(
                f"state dict is from a different chain: it has transforms {list(meta['transforms'])}, "
                f"this optimizer has {mine}"
            )
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        decode_groups(saved_groups, groups)
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=False)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {i} has {len(g['params'])} params, the state dict's has {len(sg['params'])}"
                )
        id_map, name_map = {}, {}
        for g, sg in zip(groups, saved_groups, strict=False):
            for pid, p, name in zip(sg["params"], g["params"], self._names(g), strict=False):
                id_map[pid], name_map[pid] = p, name
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        saved_global: dict[str, Tensor] = {}
        for k, v in state_dict["state"].items():
            if isinstance(v, dict) and any(isinstance(key, str) and key.startswith(_GLOBAL) for key in v):
                saved_global.update({key[len(_GLOBAL):]: val for key, val in v.items() if key.startswith(_GLOBAL)})
                v = {key: val for key, val in v.items() if not key.startswith(_GLOBAL)}
                if not v:
                    continue
            if k not in id_map:
                state[k] = deepcopy(v)
                continue
            p = id_map[k]
            expected = self._expected_keys(p, name_map[k])
            if expected is not None and set(v) != expected:
                raise ValueError(
                    f"state dict is from a different chain: param {name_map[k] or k} has state "
                    f"{sorted(v)}, this chain keeps {sorted(expected)}"
                )
            # copies: the optimizer must not share buffers with the dict (or with another optimizer)
            state[p] = {
                key: (val.to(device=p.device, copy=True) if key != "step" else val.clone())
                if isinstance(val, Tensor)
                else deepcopy(val)
                for key, val in v.items()
            }
        new_groups = []
        for g, sg in zip(groups, saved_groups, strict=False):
            sg["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                sg["param_names"] = g["param_names"]
            self._check_group(sg)
            new_groups.append(sg)
        self.__setstate__({"state": state, "param_groups": new_groups})
        # a state dict saved before the first step has none: it is then made at the next step
        device = groups[0]["params"][0].device if groups and groups[0]["params"] else None
        self.global_state = {k: v.detach().clone().to(device) for k, v in saved_global.items()}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["transform"] = self.transform
        d["state_dtype"] = self.state_dtype
        d["global_state"] = self.global_state
        return d
