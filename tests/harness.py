"""The project's tests run the public contract checks of :mod:`gradchain.testing`.

This module only re-exports them for the test files and turns a check that cannot run here
(:class:`gradchain.testing.CheckSkipped`: no gloo, no fused path) into a pytest skip::

    from harness import RecipeCase, check_fsdp2, check_recipe

    CASES = [RecipeCase("adamw", partial(recipes.adamw, lr=1e-2))]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
    def test_harness(case):
        check_recipe(case)

    @pytest.mark.distributed
    def test_fsdp2():
        check_fsdp2(CASES)          # one 2-process spawn for the whole list
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from gradchain import testing
from gradchain.testing import (  # noqa: F401
    CHECKS,
    Case,
    CheckSkipped,
    RecipeCase,
    Report,
    TinyNet,
    _free_port,
    batch,
    check_aliasing,
    check_contract,
    check_dtypes,
    check_fused,
    check_gradscaler,
    check_hyperparams_used,
    check_invalid_hyperparams,
    check_nonfinite,
    check_recipe,
    check_resume,
    check_skipped_steps,
    check_sparse_rejected,
    check_transform,
    check_zero_size,
    lockstep_gap,
    loss_fn,
    make_model,
    make_optimizer,
    train,
)


def check_fsdp2(cases: Sequence[Case], **kwargs: Any) -> None:
    """:func:`gradchain.testing.check_fsdp2`, a pytest skip where it cannot run."""
    try:
        testing.check_fsdp2(cases, **kwargs)
    except CheckSkipped as e:
        pytest.skip(str(e))


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes ``fn`` holds at once beyond what it started with: the torch profiler's
    allocation and free events, summed in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
