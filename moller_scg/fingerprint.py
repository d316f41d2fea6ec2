"""A cheap fingerprint of a training set, so that a resumed run can tell whether it trains on the same data.

SCG's saved state holds the loss E(w) and the residual r = −E'(w) of the data it was computed on. Resumed on other
data, that E and r no longer belong to the objective, every trial looks like a failure (Δ < 0) and λ climbs to its
bound. :func:`data_fingerprint` summarises the data in a few hundred bytes — its size N, the shapes and dtypes of
its tensors, and a SHA-256 of :data:`SAMPLE_COUNT` samples spread evenly over it — without a pass over it.

A fingerprint can miss a change to samples it does not look at; it is a guard against resuming on another data set,
another split or another preprocessing, not a proof that no sample changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, default_convert

SAMPLE_COUNT = 16
"""How many samples, evenly spaced from the first to the last, go into the hash."""


def data_fingerprint(data: Any) -> dict[str, Any] | None:
    """``{"samples": N, "layout": [...], "sha256": ...}`` for tensors, a map-style Dataset or a DataLoader over one.

    ``layout`` lists each tensor of one sample as ``"dtype[shape]"``; ``sha256`` hashes the bytes of the sampled
    items (moved to the CPU). NumPy arrays count as the tensors they are converted to. A DataLoader whose
    ``collate_fn`` is its own (not torch's default) adds ``"collated_sha256"``, the hash of what that function makes
    of each sampled item, so that a changed preprocessing there is noticed. ``None`` when the data cannot be
    fingerprinted without a pass (an ``IterableDataset``, a Dataset whose items are not tensors, arrays, numbers or
    tuples of them).
    """
    collate = None
    if isinstance(data, DataLoader):
        if data.collate_fn not in (default_collate, default_convert):
            collate = data.collate_fn
        data = data.dataset
    if isinstance(data, IterableDataset):
        return None
    if isinstance(data, (tuple, list)) and data and all(isinstance(part, (torch.Tensor, np.ndarray)) for part in data):
        samples = len(data[0])
        try:
            columns = tuple(torch.as_tensor(part) for part in data)  # no copy
        except (TypeError, RuntimeError):  # an array torch cannot hold (strings, objects): no fingerprint, as before
            return None

        def get(index: int) -> tuple[torch.Tensor, ...]:
            return tuple(column[index] for column in columns)
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        samples = len(data)
        get = data.__getitem__  # type: ignore[assignment]
    else:
        return None
    digest, collated = hashlib.sha256(), hashlib.sha256()
    layout: list[str] = []
    for index in _sample_indices(samples):
        item = get(index)
        tensors = _as_tensors(item)
        if tensors is None:
            return None
        layout = [f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors]
        _update(digest, tensors)
        if collate is not None:
            collated_tensors = _as_tensors(collate([item]))
            if collated_tensors is None:
                return None
            _update(collated, collated_tensors)
    fingerprint = {"samples": samples, "layout": layout, "sha256": digest.hexdigest()}
    if collate is not None:
        fingerprint["collated_sha256"] = collated.hexdigest()
    return fingerprint


def fingerprints_match(saved: Any, current: dict[str, Any]) -> bool:
    """Whether a checkpoint's fingerprint ``saved`` is that of the data ``current`` fingerprints.

    A fingerprint written before a DataLoader's own ``collate_fn`` was part of it (no ``"collated_sha256"``) is
    compared on the rest, as it was then; one written with a ``collate_fn`` of its own differs from data without one.
    """
    if not isinstance(saved, dict) or any(saved.get(key) != current[key] for key in ("samples", "layout", "sha256")):
        return False
    return saved.get("collated_sha256", current.get("collated_sha256")) == current.get("collated_sha256")


def describe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """What differs between two fingerprints, in words (the first difference found)."""
    if saved.get("samples") != current["samples"]:
        return f"it has {current['samples']} samples where the checkpoint's run had {saved.get('samples')}"
    if saved.get("layout") != current["layout"]:
        return f"its samples are {current['layout']} where the checkpoint's were {saved.get('layout')}"
    if saved.get("sha256") == current["sha256"]:
        return "the same samples, but the DataLoader's collate_fn makes other batches of them"
    return f"the same {current['samples']} samples of the same shapes, but their values differ"


def _update(digest: Any, tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _sample_indices(samples: int) -> list[int]:
    if samples <= SAMPLE_COUNT:
        return list(range(samples))
    return sorted({round(i * (samples - 1) / (SAMPLE_COUNT - 1)) for i in range(SAMPLE_COUNT)})


def _as_tensors(item: Any) -> list[torch.Tensor] | None:
    """The tensors of one sample (numbers and NumPy arrays become tensors), or ``None`` for items of another kind."""
    parts: Sequence[Any] = item if isinstance(item, (tuple, list)) else (item,)
    tensors = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensors.append(part)
        elif isinstance(part, (np.ndarray, np.generic)):
            try:
                tensors.append(torch.as_tensor(part))
            except (TypeError, RuntimeError):  # an array torch cannot hold (strings, objects)
                return None
        elif isinstance(part, (bool, int, float)):
            tensors.append(torch.tensor(part))
        else:
            return None
    return tensors
