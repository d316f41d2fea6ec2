"""The user's model, parameters, device and data, checked at the boundary: NumPy arrays become tensors, and a
dtype mismatch is named up front.

A float64 NumPy array (NumPy's default) fed to a float32 model fails deep inside the first layer with PyTorch's
``mat1 and mat2 must have the same dtype``, which names neither the data nor the fix. The accumulator therefore

* converts an ``(inputs, targets)`` pair of NumPy arrays to tensors (:func:`as_tensor_pair`): floating arrays to
  the model's dtype, integer arrays (class indices) to int64;
* refuses floating inputs whose dtype differs from the model's (:func:`check_input_dtype`), naming both dtypes and
  the two ways to make them agree.

It also checks the accumulator's arguments whose type alone decides (:func:`check_model_loss_and_progress`,
:func:`check_cache_bytes`), resolves which parameters w the accumulator differentiates (:func:`trainable_params`),
by which names ``torch.func`` knows them (:func:`param_names`) and on which device batches are evaluated
(:func:`resolve_device`), and checks the vectors v of a Hessian-vector product against the parameters
(:func:`hvp_vectors`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


def check_model_loss_and_progress(model: Any, loss_fn: Any, progress: Any) -> None:
    """A ``TypeError`` naming the value unless ``model`` is an ``nn.Module``, ``loss_fn`` is callable as
    ``loss_fn(outputs, targets)`` and ``progress`` is a bool."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {describe_value(model)}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {describe_value(loss_fn)}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")


def check_cache_bytes(device_cache_bytes: Any) -> None:
    """A ``ValueError`` naming the value unless ``device_cache_bytes`` (a byte budget) is an int ≥ 0."""
    if isinstance(device_cache_bytes, bool) or not isinstance(device_cache_bytes, int) or device_cache_bytes < 0:
        raise ValueError(f"Invalid device_cache_bytes {device_cache_bytes!r}; it must be an int ≥ 0")


def model_dtype(params: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype every parameter shares, or ``None`` (complex or mixed parameters: nothing to check)."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    return dtype if dtype.is_floating_point else None


def as_tensor_pair(data: Any, dtype: torch.dtype | None) -> Any:
    """``data`` with the NumPy arrays of an ``(inputs, targets)`` pair converted to tensors; anything else as is.

    Floating arrays become tensors of ``dtype`` (the model's; their own when ``None``), integer arrays int64 (what
    ``nn.CrossEntropyLoss`` and ``nn.Embedding`` take), other arrays keep their dtype. The conversion copies only
    when the dtype changes.
    """
    if not isinstance(data, (tuple, list)) or not any(_is_numpy_array(item) for item in data):
        return data
    items = [_array_to_tensor(item, dtype) if _is_numpy_array(item) else item for item in data]
    return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)  # a namedtuple takes its fields


def check_input_dtype(inputs: torch.Tensor, dtype: torch.dtype | None, where: str) -> None:
    """Refuse floating ``inputs`` whose dtype is not the model's floating ``dtype``, naming both and the fix."""
    if dtype is None or not inputs.is_floating_point() or inputs.dtype == dtype:
        return
    raise ValueError(
        f"{where} are {inputs.dtype} but the model's parameters are {dtype}: PyTorch would stop in the first layer "
        f"with 'mat1 and mat2 must have the same dtype'. Convert the inputs (inputs.to({dtype})) or the model "
        f"(model.to({inputs.dtype})); NumPy arrays given as an (inputs, targets) pair are converted to the model's "
        f"dtype automatically"
    )


def trainable_params(model: nn.Module, params: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
    """w: the given parameters (each must require grad), or the model's that require grad; never none."""
    if params is None:
        chosen: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, not a single tensor (wrap it in a list)")
        chosen = list(params)
        for index, p in enumerate(chosen):
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError(f"params[{index}] must be a tensor that requires grad, got {describe_value(p)}")
    if not chosen:
        raise ValueError(
            f"the model ({type(model).__name__}) has no trainable parameters (none requires grad): "
            f"there is nothing to differentiate"
        )
    return chosen


def param_names(model: nn.Module, params: list[torch.Tensor], method: str = "forward-over-reverse") -> list[str]:
    """The names ``torch.func.functional_call`` knows the parameters by (``method``: the ``hvp_method`` that needs
    them, for the error message)."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    missing = [index for index, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(
            f"hvp_method={method!r} needs parameters of the model itself, but params{missing} are not "
            f"among model.named_parameters(); use hvp_method='double-backward'"
        )
    return [by_id[id(p)] for p in params]


def resolve_device(device: torch.device | str | None, params: list[torch.Tensor]) -> torch.device:
    """Where batches are evaluated: ``device``, or the first parameter's; a bare ``"cuda"`` is the current GPU."""
    if device is None:
        return params[0].device
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Invalid device {device!r}: {error}") from None
    if resolved.type == "cuda" and resolved.index is None and torch.cuda.is_available():
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def hvp_vectors(vectors: Any, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """v for a Hessian-vector product: one tensor per parameter of ``params``, each of its parameter's shape,
    detached and moved to the parameter's device and dtype.

    Raises:
        TypeError: ``vectors`` is not a sequence (a single tensor is not one).
        ValueError: the number of vectors, or a vector's shape, differs from the parameters'.
    """
    if isinstance(vectors, torch.Tensor) or not isinstance(vectors, Sequence):
        raise TypeError(f"vectors must be a sequence of tensors, one per parameter, got {describe_value(vectors)}")
    if len(vectors) != len(params):
        raise ValueError(f"hvp got {len(vectors)} vectors for {len(params)} parameters")
    prepared = []
    for index, (p, v) in enumerate(zip(params, vectors)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"hvp vector {index} has shape {shape}, but parameter {index} has {tuple(p.shape)}")
        prepared.append(v.detach().to(device=p.device, dtype=p.dtype))
    return prepared


def describe_value(value: Any) -> str:
    """A short description of a bad argument for an error message: a tensor's shape and dtype, or a cut repr."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'…' if len(text) > 80 else ''}"


def _is_numpy_array(value: Any) -> bool:
    # Without importing NumPy: if no module has imported it, no value can be one of its arrays.
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def _array_to_tensor(array: Any, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    if tensor.is_floating_point() and dtype is not None:
        return tensor.to(dtype)
    if not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool:
        return tensor.to(torch.int64)
    return tensor
