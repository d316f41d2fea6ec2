"""The SCG that :func:`~moller_scg.fit` builds when it is given no optimizer, and the initial matrix H₀ of its
secant preconditioner, ``fit``'s ``preconditioner``.

``SCG(params, memory=m)`` preconditions its direction by the m latest secant pairs over an initial inverse Hessian
H₀ (:mod:`moller_scg.quasi_newton`). ``preconditioner`` chooses H₀:

* ``"auto"`` (the default): ``"kronecker"`` where the loss is the cross-entropy or the squared error and the factors
  take the model and its data (:meth:`~moller_scg.KroneckerFactors.refusal` answers ``None``: every trained
  parameter a weight or bias of an ``nn.Linear`` or ``nn.Conv2d`` layer they take, and a trial forward and backward
  on 8 training inputs passes the first refresh's checks, among them that the loss reaches each weight only through
  its layer's outputs, and no factor formed whole is wider than :data:`AUTO_FACTOR_WIDTH_MAX`), ``"diagonal"``
  everywhere else. Where ``fit`` builds Møller's ``SCG(params)`` (curvature
  products asked for) or is given an optimizer, there is no H₀ to choose and ``"auto"`` asks for nothing;
* ``"scalar"``: H₀ = γI, ``SCG(params, memory=20)``;
* ``"diagonal"``: H₀ = γ_D Λ from the gradients' second moments, ``SCG(params, memory=20, diagonal_scaling=True)``;
* ``"kronecker"``: H₀ = γ_K K⁻¹ from K-FAC's factors of the model's layers over a share of the training inputs,
  ``SCG(params, memory=20, kronecker_factors=KroneckerFactors(model, inputs, loss=…))``, the loss's distribution read
  from ``loss_fn`` (:func:`kronecker_loss`).

Why ``"auto"`` chooses so, and why it is the default (docs/performance.md, levers 71–74): K-FAC's H₀ took the fewest
passes of every mode on the race's problems whose loss is the cross-entropy or the squared error of the model's
output (the MNIST CNN, the logistic and the regression problem) and the least time on the first two; the diagonal
H₀ took the least time on the two others, the physics-informed net (its loss holds Δu, no likelihood of the output:
the factors refuse it) and the autoencoder, whose binary cross-entropy over 784 outputs makes K-FAC's output factor
dense and 784 wide (its factors lost in time there, lever 71). Raced as one row, that choice met issue #14's goal
on the AVX-512 machine type, in the races of its rows and in full races of the whole table (levers 73 and 74).

Under ``torch.distributed`` every rank is given the whole training set (``fit`` shards it for the passes), so every
rank draws the same samples for K-FAC's factors, forms the same factors, and then takes rank 0's bits of them
(:func:`moller_scg.distributed.broadcast_from_main`), so the damping, the inverses and the ranks' steps stay bitwise
equal and follow one process's trajectory. The refresh is not sharded: each rank forms the factors over all of the draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import default_collate

from moller_scg import distributed as _dist
from moller_scg.input_checks import as_tensor_pair
from moller_scg.kronecker import LOW_RANK_ABOVE, KroneckerFactors
from moller_scg.scg import DEFAULT_MEMORY, SCG

PRECONDITIONERS = ("scalar", "diagonal", "kronecker", "auto")
"""The values of ``fit``'s ``preconditioner``: the H₀ of the secant mode it builds (the module's docstring)."""

AUTO_KRONECKER_LOSSES = ("cross_entropy", "mse")
"""The losses for which ``"auto"`` chooses K-FAC's H₀ (not the binary cross-entropy: lever 71's autoencoder)."""

AUTO_FACTOR_WIDTH_MAX = LOW_RANK_ABOVE
"""The widest factor ``"auto"`` lets K-FAC form whole: a layer's output factor G (its C outputs) and a convolution's
input factor A (C_in·k·k + 1, formed whole since its positions give it more rows than columns) are dense float64
matrices inverted at every refresh, so a wider one takes the diagonal H₀ instead (a 50,000-class head's G alone would
hold 20 GB). ``"kronecker"`` forms them whatever their width."""


def check_preconditioner(preconditioner: Any, optimizer: torch.optim.Optimizer | None, asks_for_products: bool) -> None:
    """Before any data is touched: ``preconditioner`` is one of :data:`PRECONDITIONERS`, and an H₀ named outright
    (``"diagonal"`` or ``"kronecker"``) is asked for only where ``fit`` builds the secant mode (no optimizer given, no
    curvature products asked for)."""
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(
            f"Invalid preconditioner {preconditioner!r}; choose one of {', '.join(map(repr, PRECONDITIONERS))}"
        )
    if preconditioner in ("scalar", "auto"):  # "auto": where fit builds no secant mode, it asks for nothing
        return
    if optimizer is not None:
        raise ValueError(
            f"preconditioner={preconditioner!r} chooses the H₀ of the SCG that fit builds, but an optimizer was given: "
            "drop preconditioner, or build the SCG with diagonal_scaling=True or kronecker_factors=…"
        )
    if asks_for_products:
        raise ValueError(
            f"preconditioner={preconditioner!r} chooses the H₀ of SCG's secant mode, but curvature_fraction < 1 or "
            "hvp_method asks for Møller's SCG with curvature products, which has no preconditioner: drop one of them"
        )


def kronecker_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str | None:
    """The predictive distribution behind ``loss_fn``, by the name :class:`~moller_scg.KroneckerFactors` takes, or
    ``None`` when it is none of them: ``"cross_entropy"`` for ``nn.CrossEntropyLoss`` without class weights or label
    smoothing and for ``F.cross_entropy``; ``"mse"`` for ``nn.MSELoss`` and ``F.mse_loss``;
    ``"binary_cross_entropy"`` for ``nn.BCEWithLogitsLoss`` without weights and for
    ``F.binary_cross_entropy_with_logits``. Any other function (a sum of a loss and a penalty too) is ``None``."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0.0
        return "cross_entropy" if plain else None
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is functional.mse_loss:
        return "mse"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        plain = loss_fn.weight is None and loss_fn.pos_weight is None
        return "binary_cross_entropy" if plain else None
    if loss_fn is functional.cross_entropy:
        return "cross_entropy"
    if loss_fn is functional.binary_cross_entropy_with_logits:
        return "binary_cross_entropy"
    return None


class _ArrayInputs(torch.utils.data.Dataset):
    """The rows of a NumPy array of training inputs, each converted as the accumulator converts the whole array
    (floating rows to the model's dtype) when K-FAC's factors draw it: a refresh draws a few hundred, so the array is
    not copied a second time beside the accumulator's tensor."""

    def __init__(self, array: Any, dtype: torch.dtype | None) -> None:
        self.array, self.dtype = array, dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> torch.Tensor:
        return as_tensor_pair((self.array[index : index + 1],), self.dtype)[0][0]


def training_inputs(train_data: Any, dtype: torch.dtype | None = None) -> torch.Tensor | torch.utils.data.Dataset:
    """The inputs K-FAC's factors draw their samples from: the first tensor of ``(inputs, targets)`` (a NumPy array
    converted row by row as the factors draw it, as the accumulator converts it: floating rows to ``dtype``), a
    ``DataLoader``'s dataset, or the map-style ``Dataset`` itself (whose items' first elements are the inputs).

    Raises:
        ValueError: ``train_data`` is a ``DataLoader`` with a ``collate_fn`` of its own: the factors collate the
            dataset's items with torch's ``default_collate``, so they would see other inputs than the training's.
    """
    if isinstance(train_data, (tuple, list)):
        inputs = train_data[0]
        return _ArrayInputs(inputs, dtype) if isinstance(inputs, np.ndarray) else inputs
    if isinstance(train_data, torch.utils.data.DataLoader):
        if train_data.collate_fn is not default_collate:
            raise ValueError(
                "KroneckerFactors collate the dataset's items with torch's default_collate, but this DataLoader has "
                f"a collate_fn of its own ({train_data.collate_fn!r}), so the factors would see other inputs than "
                "the training's: use preconditioner='diagonal', or build KroneckerFactors over the inputs yourself"
            )
        return train_data.dataset
    return train_data


def _auto_factors(
    model: nn.Module, train_data: Any, params: Sequence[torch.Tensor], loss: str, seed: int, distributed: bool | None
) -> KroneckerFactors | None:
    """``"auto"``'s K-FAC factors over the model and its training inputs, or ``None`` where they cannot take them: a
    factor wider than :data:`AUTO_FACTOR_WIDTH_MAX`, an ``IterableDataset`` (no samples to draw by index), a
    ``DataLoader`` with its own ``collate_fn``, or a :meth:`~moller_scg.KroneckerFactors.refusal`."""
    factors: KroneckerFactors | None = None
    if _widest_factor(model, params) <= AUTO_FACTOR_WIDTH_MAX:
        try:
            inputs = training_inputs(train_data, params[0].dtype)
            factors = KroneckerFactors(model, inputs, loss=loss, seed=seed, distributed=distributed)
        except (TypeError, ValueError):
            factors = None
    refused = factors is None or factors.refusal(list(params)) is not None
    if _dist.resolve_distributed(distributed, None):
        # Every rank asks the same of the same data; the ranks still agree, so that none is left with other steps
        # than the rest if its rounding put a gap on the other side of the tolerance.
        refused = bool(_dist.agree_on_max(int(refused), "the choice of H₀"))
    return None if refused else factors


def _widest_factor(model: nn.Module, params: Sequence[torch.Tensor]) -> int:
    """The widest factor K-FAC would form whole for the layers that hold ``params``: each layer's output factor, and
    each convolution's input factor (:data:`AUTO_FACTOR_WIDTH_MAX`)."""
    held = {id(p) for p in params}
    widths = [0]
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module.weight) in held:
            widths.append(module.weight.shape[0])
            if isinstance(module, nn.Conv2d):
                widths.append(module.weight[0].numel() + (module.bias is not None))
    return max(widths)


def secant_optimizer(
    params: Sequence[torch.Tensor],
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: Any,
    preconditioner: str,
    *,
    memory: int = DEFAULT_MEMORY,
    hvp: str = "secant",
    seed: int = 0,
    distributed: bool | None = None,
) -> SCG:
    """``SCG(params, hvp=hvp, memory=m)``, m ≥ 1, with the H₀ ``preconditioner`` names (the module's docstring).
    ``seed`` seeds the draws of K-FAC's factors and ``distributed`` says whether they are formed alike on every rank
    (:class:`~moller_scg.KroneckerFactors`' ``seed`` and ``distributed``: the training accumulator's).

    Raises:
        ValueError: m < 1 (no secant pairs, no H₀); ``"kronecker"`` with a loss whose distribution the factors do not
            know; what :class:`~moller_scg.KroneckerFactors` or ``SCG`` refuse.
    """
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(
            f"secant_optimizer builds SCG's secant mode, whose H₀ preconditioner chooses: memory=m must be an int ≥ 1, "
            f"got {memory!r} (memory=0 is Møller's SCG, SCG(params))"
        )
    loss = kronecker_loss(loss_fn)
    if preconditioner == "kronecker":
        if loss is None:
            raise ValueError(
                f"preconditioner='kronecker' needs a loss whose distribution K-FAC's factors know "
                f"(nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss or their functions), got {loss_fn!r}: use "
                "preconditioner='diagonal', or build SCG(params, memory=m, kronecker_factors=KroneckerFactors(model, "
                "inputs, loss=…)) yourself"
            )
        inputs = training_inputs(train_data, params[0].dtype)
        factors = KroneckerFactors(model, inputs, loss=loss, seed=seed, distributed=distributed)
        return SCG(params, hvp=hvp, memory=memory, kronecker_factors=factors)
    if preconditioner == "auto" and loss in AUTO_KRONECKER_LOSSES:
        auto_factors = _auto_factors(model, train_data, params, loss, seed, distributed)
        if auto_factors is not None:
            return SCG(params, hvp=hvp, memory=memory, kronecker_factors=auto_factors)
    diagonal = preconditioner in ("diagonal", "auto")
    return SCG(params, hvp=hvp, memory=memory, diagonal_scaling=diagonal)


def default_optimizer(
    params: Sequence[torch.Tensor],
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: Any,
    preconditioner: str,
    asks_for_products: bool,
    distributed: bool | None = None,
) -> SCG:
    """The SCG ``fit`` trains with when given none: Møller's ``SCG(params)`` where curvature products are asked for
    (``asks_for_products``), else the secant mode ``SCG(params, memory=20)`` with the H₀ ``preconditioner`` names
    (checked by :func:`check_preconditioner`; :func:`secant_optimizer`, ``distributed`` the training accumulator's)."""
    if asks_for_products:
        return SCG(params)
    return secant_optimizer(params, model, loss_fn, train_data, preconditioner, distributed=distributed)
