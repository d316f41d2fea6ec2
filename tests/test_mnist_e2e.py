"""The main job end to end: the README's MNIST command reaches its accuracy target on a fixed seed.

Both runs use the thread count a user's process gets (torch's default, as the README command): the float32
result's bits depend on it, and until 2026-12-04 these tests ran with the one thread that a benchmark test had left
behind (``tests/conftest.py`` now restores the count after every test).

The default, ``SCG(memory=20)``, fits the 4,000 embedded training digits to a loss below 1e-5 within its 60
iterations. Its test accuracy at seed 0 depends on how the CPU rounds float32: 95.1 % (the machine of 2026-12-01),
95.3 % (the AVX-512 machines of 2026-12-02 and 12-03), 94.8 % (2026-12-04's AVX2 machine, 2 threads; its 1-thread
run reaches 95.2 %); seeds 1–3 on that machine (1 thread) give 94.6, 95.7 and 95.3 %. So the pin is 94.5 %, below
the spread rounding alone makes (a broken step or a lost gradient pass ends far lower, and the loss check catches
an optimizer that stops fitting). Møller's SCG with exact curvature over a rotating 10 % of the images
(``memory=0``, the default before issue #14) stops at a loss of 0.0013 after 60 iterations, slower, and reaches
96.1–96.2 % at seed 0 on all of those machines (seeds 1 and 2: 94.7 and 95.5 %); it stays pinned at 96 %.
"""

from __future__ import annotations

import pytest
import torch

from moller_scg.mnist import train_mnist


@pytest.mark.slow
def test_mnist_cnn_fits_the_digits_and_tests_near_95_percent_with_the_default_settings(starting_threads):
    assert torch.get_num_threads() == starting_threads  # the README command's thread count
    result = train_mnist(progress=False)
    assert result.train_size == 4000 and result.test_size == 1000
    assert result.stop_reason == "max_iter"
    assert result.train_loss < 1e-5, result.summary()
    assert result.test_accuracy >= 0.945, result.summary()


@pytest.mark.slow
def test_mnist_cnn_reaches_96_percent_test_accuracy_with_moller_scg_and_subsampled_curvature(starting_threads):
    assert torch.get_num_threads() == starting_threads
    result = train_mnist(progress=False, memory=0)
    assert result.stop_reason == "max_iter"
    assert result.hvp_calls > 0
    assert result.test_accuracy >= 0.96, result.summary()
