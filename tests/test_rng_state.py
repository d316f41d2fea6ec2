"""Tests of moller_scg.rng_state: every generator's state survives a weights-only round trip, and a malformed
state changes no generator."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moller_scg import checkpoint
from moller_scg.rng_state import capture_rng_state, restore_rng_state


def test_rng_state_round_trip_repeats_every_generator_exactly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)

    def draw() -> tuple[torch.Tensor, list[float], np.ndarray]:
        return torch.rand(5), [random.random() for _ in range(5)], np.random.standard_normal(5)

    first = draw()
    draw()
    restore_rng_state(torch.load(path, weights_only=True))
    again = draw()

    assert torch.equal(first[0], again[0])
    assert first[1] == again[1]
    assert np.array_equal(first[2], again[2])


def test_malformed_rng_state_is_refused_before_any_generator_changes() -> None:
    state = capture_rng_state()
    state["python"] = (3, (1, 2, 3), None)  # torch's state is fine and is set first: it must not be
    torch.manual_seed(4)
    random.seed(4)
    expected = torch.rand(2), random.random()
    torch.manual_seed(4)
    random.seed(4)

    with pytest.raises(ValueError, match="RNG state cannot be restored"):
        restore_rng_state(state)

    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1]


def test_checkpoint_still_exports_the_rng_functions() -> None:
    # They lived in moller_scg.checkpoint, where the API page and older code import them from.
    assert checkpoint.capture_rng_state is capture_rng_state
    assert checkpoint.restore_rng_state is restore_rng_state
