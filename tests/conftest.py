"""Fixtures shared by the test modules. The problems themselves are plain functions in ``problems.py``: a test that
needs several of them (other seeds, a fresh model beside a trained one) calls ``regression_problem(seed)``."""

from __future__ import annotations

import pytest
import torch
from problems import regression_problem
from torch import nn


@pytest.fixture
def regression() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A fresh ``regression_problem()``: the 2-8-1 tanh network at seed 0 and its 48 samples."""
    return regression_problem()
