"""Fixtures shared by the test modules. The problems themselves are plain functions in ``problems.py``: a test that
needs several of them (other seeds, a fresh model beside a trained one) calls ``regression_problem(seed)``."""

from __future__ import annotations

import pytest
import torch
from problems import regression_problem
from torch import nn

from moller_scg import pair_arithmetic


@pytest.fixture
def regression() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A fresh ``regression_problem()``: the 2-8-1 tanh network at seed 0 and its 48 samples."""
    return regression_problem()


STARTING_THREADS = torch.get_num_threads()
"""torch's thread count when the test session started: what a user's process gets (the README command's)."""


@pytest.fixture
def starting_threads() -> int:
    """:data:`STARTING_THREADS`."""
    return STARTING_THREADS


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Every test leaves torch's thread count as it found it. A benchmark's ``main`` sets it (``--threads``); without
    this, every later test ran with the count the last benchmark test chose, and ``tests/test_mnist_e2e.py``, which
    checks the README command's float32 result (its bits depend on the count), ran with one thread where the README
    command runs with torch's default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["numpy", "torch"])
def arithmetic_path(request, monkeypatch) -> str:
    """Run the test with the secant pairs' small CPU blocks worked on in NumPy (as they are), then in torch (as a GPU
    block or a large one is: ``HOST_ARITHMETIC_MAX`` set to 0)."""
    if request.param == "torch":
        monkeypatch.setattr(pair_arithmetic, "HOST_ARITHMETIC_MAX", 0)
    return request.param
