"""data_fingerprint: the same data in every form gives the same fingerprint; other data gives another."""

from __future__ import annotations

import numpy
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from moller_scg import fit
from moller_scg.fingerprint import data_fingerprint, describe_difference, fingerprints_match


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


def test_numpy_arrays_are_fingerprinted_as_the_tensors_they_become():
    x, y = data()
    expected = data_fingerprint((x, y))
    assert data_fingerprint((x.numpy(), y.numpy())) == expected

    class NumpyItems(Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, index):
            return x[index].numpy(), y[index].numpy()

    assert data_fingerprint(NumpyItems()) == expected


def test_a_loaders_own_collate_fn_is_part_of_the_fingerprint():
    x, y = data()

    def scaled(factor):
        def collate(items):
            inputs, targets = default_collate(items)
            return inputs * factor, targets

        return collate

    dataset = TensorDataset(x, y)
    once, tenfold = (data_fingerprint(DataLoader(dataset, batch_size=7, collate_fn=scaled(f))) for f in (1.0, 10.0))
    assert once is not None and not fingerprints_match(once, tenfold)
    assert "collate_fn makes other batches" in describe_difference(once, tenfold)
    # A checkpoint written before the collate_fn was part of the fingerprint is judged on the samples, as then; one
    # written with a collate_fn of its own is not the data without it.
    written_before = {key: value for key, value in once.items() if key != "collated_sha256"}
    assert fingerprints_match(written_before, tenfold) and not fingerprints_match(once, written_before)
    assert data_fingerprint(DataLoader(dataset, batch_size=7, collate_fn=scaled(1.0))) == once


def test_a_resume_on_numpy_data_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    generator = numpy.random.default_rng(0)
    inputs, targets = generator.standard_normal((64, 4)), generator.standard_normal((64, 1))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    options = {"progress": False, "max_fail": None}
    uninterrupted = fit(model(), nn.MSELoss(), (inputs, targets), max_iter=8, **options)
    interrupted, path = model(), tmp_path / "run.pt"
    fit(interrupted, nn.MSELoss(), (inputs, targets), max_iter=4, checkpoint=path, **options)
    resumed = fit(interrupted, nn.MSELoss(), (inputs, targets), max_iter=8, checkpoint=path, resume=True, **options)
    assert list(resumed["loss"]) == list(uninterrupted["loss"])


def test_arrays_torch_cannot_hold_have_no_fingerprint_as_before():
    x, _ = data(10)
    assert data_fingerprint((x.numpy(), numpy.array(["a"] * 10))) is None
