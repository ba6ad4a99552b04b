"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    On small tensors a second thread only spins; on a shared 2-core machine that made such tests
    about ten times slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _fused_graphs_without_codegen():
    """The fused path's graphs are traced with ``aot_eager`` (the same graph, no kernel generation).

    Compiling real kernels for every recipe would cost minutes; ``test_fused.py`` checks the
    inductor kernels themselves on a few recipes.
    """
    from gradchain.fused import runner

    runner.BACKEND = "aot_eager"
    yield
    runner.BACKEND = "inductor"
