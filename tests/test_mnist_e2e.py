"""The main job end to end: the README's MNIST command reaches its accuracy target on a fixed seed.

Both runs use the thread count a user's process gets (torch's default, as the README command): the float32
result's bits depend on it, and until 2026-12-04 these tests ran with the one thread that a benchmark test had left
behind (``tests/conftest.py`` now restores the count after every test).

The main job trains on the cross-entropy + (ν/2)|w|², ν = 3·10⁻⁴ (``moller_scg.mnist.DEFAULT_WEIGHT_DECAY``), with the
CNN laid out as ``torch.channels_last`` (``moller_scg.mnist.DEFAULT_MEMORY_FORMAT``) and pooling before its first tanh
(both since 2026-12-06). The default optimizer, ``SCG(memory=20)`` with K-FAC's H₀ (``preconditioner="auto"``, since
2026-12-08), brings that objective from 2.3 to about 0.018 in its 60 iterations and tested at 97.1 / 96.3 / 96.3 % on
seeds 0 / 1 / 2 (``python benchmarks/weight_decay_accuracy.py --preconditioner kronecker``, 2 threads, AVX-512); with H₀
= γI, the default before, about 0.02 and 96.7 / 96.4 / 96.1 % (AVX2, 2026-12-06; 96.8 / 96.6 / 96.3 % in PyTorch's
default layout, 2026-12-04). Before the weight decay, γI's optimizer drove the cross-entropy alone to 10⁻⁹ and tested at
94.5–95.7 %, moving with the seed and the CPU's float rounding (94.8–95.3 % at seed 0), so this test was pinned at 94.5
% then; it is pinned at the issue's 96 % again. Møller's SCG with exact curvature over a rotating 10 % of the images
(``memory=0``, the default before issue #14) stops further from its minimum (E ≈ 10⁻³ without weight decay), and weight
decay does not change its accuracy much (seeds 0 / 1 / 2: 96.1 / 94.8 / 95.3 % without, 96.1 / 94.7 / 95.4 % with ν =
3·10⁻⁴ in channels_last; 96.2 / 94.7 / 95.5 and 96.1 / 94.6 / 95.5 % before; ``--memory 0`` rows of the same benchmark).
It is checked as it was before the weight decay, on the cross-entropy alone at seed 0, where it tested 96.1–96.2 % on
every machine and in both layouts so far, and stays pinned at 96 %.
"""

from __future__ import annotations

import pytest
import torch

from moller_scg.mnist import train_mnist


@pytest.mark.slow
def test_mnist_cnn_reaches_96_percent_test_accuracy_with_the_default_settings(starting_threads):
    assert torch.get_num_threads() == starting_threads  # the README command's thread count
    result = train_mnist(progress=False)
    assert result.train_size == 4000 and result.test_size == 1000
    assert result.stop_reason == "max_iter"
    assert result.history["loss"][0] > 0.5 and result.train_loss < 0.025, result.summary()
    assert result.test_accuracy >= 0.96, result.summary()


@pytest.mark.slow
def test_mnist_cnn_reaches_96_percent_test_accuracy_with_moller_scg_and_subsampled_curvature(starting_threads):
    assert torch.get_num_threads() == starting_threads
    result = train_mnist(progress=False, memory=0, weight_decay=0.0)
    assert result.stop_reason == "max_iter"
    assert result.hvp_calls > 0
    assert result.test_accuracy >= 0.96, result.summary()
