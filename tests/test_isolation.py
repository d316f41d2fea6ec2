"""Tests do not leak torch's global settings into the tests after them (``tests/conftest.py``).

The two tests run in this order (pytest keeps a module's order): the first changes the thread count as a
benchmark's ``main`` does, the second finds the count the session started with.
"""

from __future__ import annotations

import torch


def test_a_test_may_change_torchs_thread_count(starting_threads):
    torch.set_num_threads(starting_threads + 1)
    assert torch.get_num_threads() == starting_threads + 1


def test_the_next_test_runs_with_the_sessions_starting_thread_count(starting_threads):
    assert torch.get_num_threads() == starting_threads
