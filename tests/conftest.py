"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import torch

# pytest-xdist workers (``-n auto``): at most this many, each with its share of the cores. Each
# worker is a process of its own holding torch and its compiled graphs (1-1.5 GB); past four
# the suite is bound by its longest file (``--dist loadfile`` keeps a file's compiled graphs in
# one worker).
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config) -> None:
    # whole files to a worker (xdist's --dist loadfile) unless another mode is asked for: a file's
    # tests share compiled graphs and module fixtures
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") == "no":
        config.option.dist = "loadfile"


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # the intra-op threads of all workers together at most the cores, not each worker as many
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
