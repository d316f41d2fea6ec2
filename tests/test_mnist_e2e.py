"""The main job end to end: the README's MNIST command reaches the accuracy target on a fixed seed."""

from __future__ import annotations

import pytest

from moller_scg.mnist import train_mnist


@pytest.mark.slow
def test_mnist_cnn_reaches_96_percent_test_accuracy_with_the_default_settings():
    result = train_mnist(progress=False)
    assert result.train_size == 4000 and result.test_size == 1000
    assert result.stop_reason == "max_iter"
    assert result.test_accuracy >= 0.96, result.summary()
