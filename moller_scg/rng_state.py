"""The random number generators' states, captured and restored, so a resumed run draws the same numbers.

A run may draw from four generators: torch's CPU generator, CUDA's (one per device), Python's ``random`` and
numpy's global ``RandomState``. :func:`capture_rng_state` returns their states as tensors and plain Python values,
so a checkpoint that holds them loads with ``torch.load(..., weights_only=True)``; :func:`restore_rng_state` sets
the generators back, all or none: a state is first tried on throwaway generators (:func:`rng_state_problem`).

Example:
    >>> import random, torch
    >>> from moller_scg.rng_state import capture_rng_state, restore_rng_state
    >>> state = capture_rng_state()
    >>> first = torch.rand(2), random.random()
    >>> restore_rng_state(state)
    >>> again = torch.rand(2), random.random()
    >>> bool(torch.equal(first[0], again[0])) and first[1] == again[1]
    True
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

try:
    import numpy
except ImportError:  # numpy is optional: without it there is no numpy RNG to save
    numpy = None  # type: ignore[assignment]

__all__ = ["capture_rng_state", "restore_rng_state", "rng_state_problem"]

logger = logging.getLogger(__name__)

_RNG_ENTRIES = ("torch", "cuda", "python", "numpy")


def capture_rng_state() -> dict[str, Any]:
    """The states of the random number generators a run may draw from, in a form ``weights_only=True`` loads.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device], "python": (version, tuple of ints, gauss),
        "numpy": {"bit_generator", "keys": int64 tensor, "pos", "has_gauss", "cached_gaussian"} or None}``:
        torch's CPU generator, CUDA's (only if CUDA was initialised, so capturing never creates CUDA contexts), Python's
        ``random`` and numpy's global ``RandomState`` (``None`` without numpy).
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators to a state from :func:`capture_rng_state`; the next draws repeat those after capture.

    CUDA states are restored only on a machine with as many CUDA devices (otherwise a warning is logged), and
    numpy's only if numpy is installed.

    Raises:
        ValueError: ``state`` is not from :func:`capture_rng_state`; no generator was changed.
    """
    problem = rng_state_problem(state)
    if problem is not None:
        raise ValueError(f"not a state from capture_rng_state: {problem}")
    torch.set_rng_state(state["torch"])
    random.setstate(_python_rng_tuple(state["python"]))
    if state["numpy"] is not None and numpy is not None:
        numpy.random.set_state(_numpy_rng_tuple(state["numpy"]))
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        logger.warning(
            "the RNG state holds %d CUDA generators but this machine has %d CUDA devices: CUDA random numbers "
            "will differ from those of the saved run",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


def _numpy_rng_state() -> dict[str, Any] | None:
    if numpy is None:
        return None
    state = numpy.random.get_state(legacy=True)
    if not isinstance(state, tuple):  # the global generator is no longer MT19937 (numpy.random.set_bit_generator)
        logger.warning("numpy's global generator is not MT19937: its state is not saved in checkpoints")
        return None
    name, keys, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(numpy.int64)),  # uint32 words as int64: exact, and any torch loads it
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_rng_tuple(state: Mapping[str, Any]) -> tuple[Any, ...]:
    keys = state["keys"].numpy().astype(numpy.uint32)
    return state["bit_generator"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def _python_rng_tuple(state: Any) -> tuple[Any, ...]:
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


def rng_state_problem(state: Any) -> str | None:
    """Why ``state`` cannot be restored, found by setting throwaway generators to it, or ``None``."""
    if not isinstance(state, Mapping) or set(state) != set(_RNG_ENTRIES):
        return f"the RNG state must be a dict with the entries {', '.join(_RNG_ENTRIES)}"
    if not isinstance(state["cuda"], list) or not all(isinstance(s, torch.Tensor) for s in state["cuda"]):
        return "the CUDA RNG state must be a list of tensors"
    try:
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(_python_rng_tuple(state["python"]))
        if state["numpy"] is not None and numpy is not None:
            numpy.random.RandomState().set_state(_numpy_rng_tuple(state["numpy"]))
    except Exception as error:  # the generators' own checks say what is wrong, in one sentence
        return f"the RNG state cannot be restored ({type(error).__name__}: {error})"
    return None
