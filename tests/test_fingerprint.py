"""data_fingerprint: the same data in every form gives the same fingerprint; other data gives another."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from moller_scg.fingerprint import data_fingerprint, describe_difference


def data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=generator), torch.randint(0, 5, (n,), generator=generator)


def test_tensors_dataset_and_loader_of_the_same_data_agree():
    x, y = data()
    expected = data_fingerprint((x, y))
    assert expected is not None and expected["samples"] == 100 and expected["layout"] == ["float32[3]", "int64[]"]
    assert data_fingerprint(TensorDataset(x, y)) == expected
    assert data_fingerprint(DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)) == expected
    assert data_fingerprint((x.clone(), y.clone())) == expected


def test_other_values_sizes_and_dtypes_change_the_fingerprint_and_are_described():
    x, y = data()
    expected = data_fingerprint((x, y))
    changed = x.clone()
    changed[-1, 0] += 1.0  # the last sample is always among those hashed
    for other, words in [
        ((changed, y), "values differ"),
        ((x[:99], y[:99]), "99 samples"),
        ((x.double(), y), "float64[3]"),
    ]:
        fingerprint = data_fingerprint(other)
        assert fingerprint != expected
        assert words in describe_difference(expected, fingerprint)


def test_an_iterable_dataset_has_no_fingerprint():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*data())

    assert data_fingerprint(Stream()) is None
