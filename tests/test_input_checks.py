"""Input checks: NumPy arrays are accepted as tensors of the model's dtype; a dtype mismatch is named up front."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moller_scg.accumulate import GradientAccumulator
from moller_scg.input_checks import as_tensor_pair, hvp_vectors, model_dtype

SAMPLES, FEATURES, CLASSES = 30, 4, 3


def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 inputs, float64 regression targets and int32 class labels, as NumPy makes them by default."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, SAMPLES).astype(np.int32)
    return rng.standard_normal((SAMPLES, FEATURES)), rng.standard_normal((SAMPLES, 1)), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_regression_data_is_accepted_in_the_models_dtype(dtype):
    inputs, targets, _ = arrays()
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1).to(dtype)
    acc = GradientAccumulator(model, nn.MSELoss(), (inputs, targets), batch_size=8)
    loss = acc()
    with torch.no_grad():
        reference = nn.MSELoss()(model(torch.from_numpy(inputs).to(dtype)), torch.from_numpy(targets).to(dtype))
    assert float(loss) == pytest.approx(float(reference), rel=1e-6 if dtype == torch.float32 else 1e-12)
    assert all(p.grad.dtype == dtype for p in model.parameters())


def test_numpy_class_labels_become_int64():
    inputs, _, labels = arrays()
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, CLASSES)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), [inputs, labels], batch_size=8)
    with torch.no_grad():
        reference = nn.CrossEntropyLoss()(model(torch.from_numpy(inputs).float()), torch.from_numpy(labels).long())
    assert float(acc.loss()) == pytest.approx(float(reference), rel=1e-6)


def test_conversion_leaves_tensors_and_other_data_alone():
    pair = (torch.zeros(2, 1), torch.zeros(2, 1))
    assert as_tensor_pair(pair, torch.float32) is pair
    dataset = TensorDataset(*pair)
    assert as_tensor_pair(dataset, torch.float32) is dataset
    converted = as_tensor_pair((np.zeros((2, 1), dtype=np.float64), pair[1]), torch.float32)
    assert converted[0].dtype == torch.float32 and converted[1] is pair[1]


def test_a_namedtuple_of_arrays_is_converted_and_keeps_its_type():
    pair_type = collections.namedtuple("Pair", "inputs targets")
    inputs, _, labels = arrays()
    converted = as_tensor_pair(pair_type(inputs, labels), torch.float32)
    assert type(converted) is pair_type and converted.inputs.dtype == torch.float32
    assert converted.targets.dtype == torch.int64
    model = nn.Linear(FEATURES, CLASSES)
    acc = GradientAccumulator(model, nn.CrossEntropyLoss(), pair_type(inputs, labels), batch_size=8)
    with torch.no_grad():
        reference = nn.CrossEntropyLoss()(model(converted.inputs), converted.targets)
    assert float(acc.loss()) == pytest.approx(float(reference), rel=1e-6)


def test_float64_tensor_inputs_against_a_float32_model_name_both_dtypes():
    inputs, targets, _ = arrays()
    with pytest.raises(
        ValueError,
        match=r"inputs are torch.float64 but the model's parameters are torch.float32.*"
        r"inputs.to\(torch.float32\).*model.to\(torch.float64\)",
    ):
        GradientAccumulator(nn.Linear(FEATURES, 1), nn.MSELoss(), (torch.from_numpy(inputs), torch.from_numpy(targets)))


def test_float64_batches_of_a_dataloader_against_a_float32_model_name_both_dtypes():
    inputs, targets, _ = arrays()
    loader = DataLoader(list(zip(inputs, targets)), batch_size=8)  # NumPy items, collated into float64 tensors
    model = nn.Linear(FEATURES, 1)
    acc = GradientAccumulator(model, nn.MSELoss(), loader)
    with pytest.raises(
        ValueError,
        match=r"inputs of batch 0 are torch.float64 but the model's parameters are "
        r"torch.float32",
    ):
        acc()
    assert all(p.grad is None for p in model.parameters())


def test_model_dtype_is_none_for_mixed_or_complex_parameters():
    assert model_dtype([torch.zeros(1), torch.zeros(1)]) == torch.float32
    assert model_dtype([torch.zeros(1), torch.zeros(1, dtype=torch.float64)]) is None
    assert model_dtype([torch.zeros(1, dtype=torch.complex64)]) is None


def test_hvp_vectors_are_detached_in_each_parameters_dtype_and_a_single_tensor_is_refused():
    params = [torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float32)]
    source = torch.ones(2, 3, dtype=torch.float32, requires_grad=True)
    vectors = hvp_vectors([source, torch.arange(4)], params)
    assert [v.dtype for v in vectors] == [torch.float64, torch.float32]
    assert not vectors[0].requires_grad and torch.equal(vectors[1], torch.arange(4.0))

    with pytest.raises(TypeError, match="vectors must be a sequence of tensors, one per parameter, got a tensor"):
        hvp_vectors(torch.ones(6), params)
    with pytest.raises(ValueError, match=r"hvp vector 0 has shape list, but parameter 0 has \(2, 3\)"):
        hvp_vectors([[1.0] * 6, torch.ones(4)], params)
