"""``fit``: full-batch training in one call, with the stopping rules of MATLAB's ``trainscg`` and safe checkpoints.

Each iteration is one ``optimizer.step`` on the exact full-batch objective, streamed by a
:class:`~moller_scg.GradientAccumulator`. The run stops for the first of the reasons in
:data:`moller_scg.history.STOP_REASONS` and says which in the returned :class:`~moller_scg.History`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moller_scg import distributed as _dist
from moller_scg.accumulate import HVP_METHODS, GradientAccumulator
from moller_scg.annealing import Annealer, AnnealingRestarts
from moller_scg.default_optimizer import check_preconditioner, default_optimizer
from moller_scg.fingerprint import data_fingerprint
from moller_scg.history import History
from moller_scg.run_checkpoint import RunCheckpoint, check_checkpoint_path, resume_run
from moller_scg.scg import SCG, SCGTrace
from moller_scg.stopping import (
    EarlyStopping,
    StopRequests,
    agreed,
    budget_exhausted,
    callback_says_stop,
    converged,
    restart_instead,
)
from moller_scg.subsampling import validate_fraction, validate_subset

logger = logging.getLogger(__name__)

Callback = Callable[[History], Any]
"""Called after every iteration with the History so far; a true return value (``True``, ``numpy.True_``, a one-element
tensor holding true, …) stops the run (reason "callback")."""

DEFAULT_MAX_FAIL: int | None = 50
"""``fit``'s default ``max_fail``: stop after this many successful steps without a new best validation loss.

MATLAB's ``trainscg`` uses 6, which on small regressions stops on noise: in ``benchmarks/early_stopping.py`` (3 problems
× 5 seeds, 300 iterations of ``fit``'s default optimizer), with H₀ = γI (the default until K-FAC's H₀,
``benchmarks/results/early_stopping_gamma.txt``) 6 stopped after 9–210 iterations with a restored validation loss
1.04–6.0× the best of the run, 25 lost up to 1.86× on one run, and 50 at most 1.011× while still stopping the
overfitting problem after a median of 173 of 300 iterations. With K-FAC's H₀ (``early_stopping.txt``), which reaches its
best validation loss sooner, 6 lost up to 4.3×, 50 lost more than 1 % on four of the 15 runs (1.01×, 1.06×, 1.45× and
1.45×) and 100 on one (1.45×, the overfitting problem's seed 0, whose late best only ``None`` keeps), the overfitting
problem stopped after a median of 92 (50) or 153 (100) iterations. 50 stays the default; pass ``max_fail=100`` to wait
longer. A stop costs ``max_fail`` iterations past the best; the weights of the best come back either way."""


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: Any,
    *,
    reduction: str | None = None,
    val_data: Any = None,
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    max_iter: int,
    goal: float | None = None,
    min_grad: float | None = None,
    max_time: float | None = None,
    max_fail: int | None = DEFAULT_MAX_FAIL,
    max_stall: int = 50,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    annealing: AnnealingRestarts | None = None,
    curvature_fraction: float = 1.0,
    curvature_subset: str = "rotating",
    curvature_seed: int = 0,
    weight_decay: float = 0.0,
    hvp_method: str = "double-backward",
    preconditioner: str = "auto",
) -> History:
    """Train ``model`` by full-batch SCG (or another closure optimizer) until a stopping rule fires.

    Args:
        model: the network; moved to ``device`` when one is given.
        loss_fn: ``loss_fn(outputs, targets)`` with ``reduction="mean"`` or ``"sum"``; the objective E(w) is this
            loss over the whole training set.
        train_data: ``(inputs, targets)`` tensors, a map-style ``Dataset`` or a ``DataLoader`` (see
            :class:`~moller_scg.GradientAccumulator`).
        reduction: ``"mean"`` or ``"sum"`` for a ``loss_fn`` without a ``reduction`` attribute.
        val_data: validation data in the same forms; its loss is computed after every successful step.
        metric: ``metric(outputs, targets)`` → the batch mean of a score (for example :func:`accuracy`), reported
            on the validation data as ``val_metric``.
        optimizer: default ``SCG(params, memory=20)`` with the H₀ ``preconditioner`` chooses over the model's
            trainable parameters (``requires_grad``; frozen ones are left alone): Møller's trust scaling on a
            quasi-Newton preconditioned direction, one gradient pass per step (:class:`~moller_scg.SCG`'s
            ``memory``; ``SCG(params)`` for Møller's SCG with exact curvature from the accumulator). Any optimizer
            whose ``step`` takes a closure works (``torch.optim.LBFGS``); then only E is recorded per iteration, at
            the weights after the step (one more loss-only pass, since such optimizers return the loss from before
            it). An SCG holding frozen parameters is a ``ValueError``.
        batch_size: samples per streamed minibatch (memory, not the objective: every batch size gives the same
            E, E' and E''p). Default: the accumulator's.
        device: where the model and batches go.
        max_iter: the iteration budget (total, counting iterations before a resume).
        goal: stop when the training loss is ≤ ``goal``.
        min_grad: stop when |E'(w)| ≤ ``min_grad`` (SCG only). A zero gradient always stops.
        max_time: stop after this many seconds of training (total, counting time before a resume).
        max_fail: stop when the validation loss has not improved on its best for this many successful steps in a
            row, and restore the weights of the best validation loss. ``None`` disables it. Default
            :data:`DEFAULT_MAX_FAIL` (50; ``trainscg``'s 6 stops small problems on noise). To continue past such a
            stop, resume from the checkpoint with a larger ``max_fail`` (or ``None``) and a larger ``max_iter``.
        max_stall: stop when the training loss has not decreased for this many iterations in a row, or once λ
            reaches its bound (SCG only): progress has stopped.
        checkpoint: a file to write the run's state to every ``checkpoint_every`` iterations and when it stops,
            atomically. Loaded with ``weights_only=True``. Checked before training starts: a folder, a FIFO or an
            unwritable folder is a ``ValueError``, and an existing file is never replaced silently (see
            ``resume`` and ``overwrite``). Missing parent folders are created.
        checkpoint_every: iterations between checkpoints.
        resume: continue from ``checkpoint`` if it exists, so that the run ends bit-identical to one that was
            never interrupted; without a file the run starts afresh. SCG's saved loss E and residual r are reused
            only when the checkpoint shows they belong to its weights and to this training data (the same
            :func:`~moller_scg.fingerprint.data_fingerprint`); otherwise SCG restarts from the loaded weights (one
            more evaluation), and other training data is also warned about.
        overwrite: start afresh even though ``checkpoint`` already exists, replacing it. Without ``resume`` or
            ``overwrite`` an existing checkpoint is a ``FileExistsError``.
        progress: show a tqdm bar over iterations with the loss, validation loss, λ and success rate.
        callbacks: called after every iteration with the :class:`History`, each of them every time; one returning a
            true value stops the run. If one raises, the checkpoint is written (the weights are those of the last
            iteration) and the exception carries the run's :class:`History` as its ``history`` attribute.
        annealing: SAGRAD-style restarts (SCG only, see :mod:`moller_scg.annealing`): when SCG stalls, perturb the
            weights by a short simulated-annealing chain evaluated with the loss-only pass, and restart SCG from
            the best point it found, at most ``annealing.max_restarts`` times; until then a stall does not stop
            the run. Each restart is in :attr:`History.restarts`. ``None`` (default): no annealing.
        curvature_fraction: f ∈ (0, 1]: SCG's exact curvature s = E''(w)p is taken over a rotating f of the
            training samples (Byrd et al. 2011; see :class:`~moller_scg.GradientAccumulator`), while E and E' stay
            exact. Default 1: the full-batch product. Only SCG with double-backward curvature uses it; with f < 1 the
            default optimizer is Møller's ``SCG(params)`` instead of ``SCG(params, memory=20)``. A given optimizer
            that does not ask for exact curvature is refused before any data is touched.
        curvature_subset: with f < 1, ``"rotating"`` (default): each product takes the next ⌈f·N⌉ samples of a
            seeded permutation; ``"fixed"``: always the same ones (:mod:`moller_scg.subsampling`).
        curvature_seed: seeds that permutation (an int; default 0). The checkpoint holds the next window, so a
            resumed run takes the same subsets when it is given the same seed.
        weight_decay: ν ≥ 0: train on E(w) = L(w) + (ν/2)|w|², L the training loss, over the trainable
            parameters (:mod:`moller_scg.weight_decay`; added once per pass, to the loss, the gradient and every
            Hessian-vector product, so SCG's Δ test sees it). The History's ``loss`` is this E; the validation loss
            and metric stay the loss alone. Needs a loss that is a mean over samples. The checkpoint records ν, and a
            resume with another ν recomputes E and r (with a warning). Default 0.
        hvp_method: how the training accumulator forms the curvature products SCG's exact mode asks for
            (:class:`~moller_scg.GradientAccumulator`'s ``hvp_method``): ``"double-backward"`` (default) or
            ``"forward-over-reverse"`` for E''(w)p, ``"gauss-newton"`` for the Gauss–Newton product G p, positive
            semi-definite for a loss convex in the outputs (cross-entropy on logits, MSE), so SCG never repairs a
            δ ≤ 0. With a method other than the default, the default optimizer is Møller's ``SCG(params)``, which
            asks for the products, and a given optimizer that does not ask for them is refused before any data is
            touched.
        preconditioner: the initial matrix H₀ of the default optimizer's secant preconditioner
            (:mod:`moller_scg.default_optimizer`): ``"auto"`` (default), ``"kronecker"`` where the loss is the
            cross-entropy or the squared error and the factors take the model (every trained parameter in an
            ``nn.Linear`` or ``nn.Conv2d`` layer, the training inputs drawable by index, and a trial forward and
            backward on 8 of them passing the first refresh's checks, among them that the loss reaches each weight
            only through its layer's outputs, which a physics-informed model's Δu does not), ``"diagonal"``
            otherwise; ``"kronecker"``, H₀ = γ_K K⁻¹ from K-FAC's factors of the model's ``nn.Linear`` and
            ``nn.Conv2d`` layers over 5 % of the training inputs (at most 512) every 5 accepted steps, the labels
            drawn from the distribution of ``loss_fn`` (the cross-entropy, the squared error or the binary
            cross-entropy with logits; :class:`~moller_scg.KroneckerFactors`); ``"diagonal"``, H₀ = γ_D Λ from the
            gradients' second moments (``diagonal_scaling=True``); ``"scalar"``, H₀ = γI, plain
            ``SCG(params, memory=20)``. Only for the optimizer ``fit`` builds in its secant mode: with a given
            ``optimizer``, or with curvature products asked for (``curvature_fraction`` < 1, ``hvp_method``),
            ``"auto"`` asks for nothing and ``"diagonal"`` or ``"kronecker"`` is a ``ValueError``, before any data is
            touched. The factors' state is in the checkpoint, so a resumed run ends bit-identical to one that was
            never interrupted; resume with the same ``preconditioner`` (a checkpoint of another H₀ is refused by
            name). Under ``torch.distributed`` every rank forms the same factors from the whole training set and
            takes rank 0's bits of them, so the ranks keep one trajectory.

    Distributed (under ``torchrun``, or any initialised ``torch.distributed`` process group; see
    :mod:`moller_scg.distributed`): call ``fit`` on every rank with the same arguments and the same initial
    weights. Each rank streams its shard of ``train_data`` and ``val_data``, every pass is all-reduced, so all ranks
    take the same steps; only rank 0 shows the progress bar and writes the checkpoint (every rank reads it on
    ``resume``, so it must be on a file system all ranks share). The stop before an iteration (``max_iter``,
    ``max_time``, a signal) is agreed between the ranks; ``callbacks`` run on every rank and must decide alike.
    The checkpoint records the world size, and resuming with another one is a ``CheckpointError``.

    Returns:
        The :class:`History` of the run, with ``stop_reason`` set.

    Raises:
        ValueError: a bad argument (named in the message), ``resume=True`` without ``checkpoint``, ``resume`` and
            ``overwrite`` together, a ``checkpoint`` path that cannot be written, or ``annealing`` with an optimizer
            other than SCG.
        FileExistsError: ``checkpoint`` exists and neither ``resume`` nor ``overwrite`` is set; nothing was run.
        TypeError: ``annealing`` is not an :class:`~moller_scg.annealing.AnnealingRestarts`, or a callback is not
            callable.
        moller_scg.checkpoint.CheckpointError: the checkpoint to resume from is corrupt, belongs to another
            model or optimizer, or was written by a run with another world size; nothing was loaded.
        moller_scg.distributed.DistributedError: distributed, another rank raised, died or timed out.
    """
    _validate_arguments(
        max_iter, goal, min_grad, max_time, max_fail, max_stall, checkpoint, checkpoint_every, resume, overwrite
    )
    _validate_callbacks(callbacks)
    _check_curvature_subsampling(curvature_fraction, curvature_subset, curvature_seed, optimizer)
    _check_hvp_method(hvp_method, optimizer)
    asks_for_products = curvature_fraction < 1.0 or hvp_method != "double-backward"
    check_preconditioner(preconditioner, optimizer, asks_for_products)
    if checkpoint is not None:
        check_checkpoint_path(checkpoint, resume, overwrite)
    if device is not None:
        model.to(device)
    # A non-finite trial is SCG's to reject (it shrinks the step), so the training pass returns it instead of raising.
    train = GradientAccumulator(
        model,
        loss_fn,
        train_data,
        batch_size,
        device,
        reduction=reduction,
        on_non_finite="return",
        curvature_fraction=curvature_fraction,
        curvature_subset=curvature_subset,
        curvature_seed=curvature_seed,
        weight_decay=weight_decay,
        hvp_method=hvp_method,
    )
    validation = None
    if val_data is not None:
        validation = GradientAccumulator(model, loss_fn, val_data, batch_size, device, reduction=reduction)
    if optimizer is None:
        # The accumulator differentiates only the trainable parameters; SCG must hold the same w. Subsampled
        # curvature, or a method chosen for the products, asks for Møller's SCG, which takes them; otherwise the
        # quasi-Newton preconditioned mode with the H₀ preconditioner names.
        optimizer = default_optimizer(
            train.params, model, loss_fn, train_data, preconditioner, asks_for_products, train.distributed
        )
    _check_no_frozen_parameters(optimizer)
    if min_grad is not None and not isinstance(optimizer, SCG):
        raise ValueError("min_grad needs the gradient norm, which only SCG reports; drop min_grad or use SCG")
    annealer = None
    if annealing is not None:
        if not isinstance(annealing, AnnealingRestarts):
            raise TypeError(f"annealing must be an AnnealingRestarts or None, got {type(annealing).__name__}")
        if not isinstance(optimizer, SCG):
            raise ValueError(
                f"annealing restarts SCG and reads its λ; it does not work with {type(optimizer).__name__}"
            )
        annealer = Annealer(annealing, optimizer, train.loss)

    history, early, elapsed_before, optimizer_trusted = History(), EarlyStopping(), 0.0, False
    saved_stop_reason: str | None = None
    fingerprint = data_fingerprint(train_data) if checkpoint is not None else None
    found = resume and checkpoint is not None and Path(checkpoint).exists()
    if _dist.is_distributed() and resume:
        # A rank that cannot see rank 0's file would start afresh while the others resume.
        _dist.check_same_on_every_rank({f"whether the checkpoint {checkpoint} exists": found})
    if found and checkpoint is not None:  # found implies a checkpoint; the second test narrows its type
        history, saved, optimizer_trusted, same_objective = resume_run(
            model, optimizer, checkpoint, train, fingerprint, annealer
        )
        early, elapsed_before, saved_stop_reason = saved.early_stopping, saved.elapsed, saved.stop_reason
        if same_objective and len(history):
            # A run that had stopped by a rule stops again by it, before any step, if this call's rules say so too
            # (a finished run resumed with the same arguments is finished); looser rules let it go on. (On another
            # objective the saved losses are not this run's: it goes on.)
            _apply_stop_rules(history, goal, min_grad, max_fail, max_stall, early, annealer)
        logger.info("resumed from %s after %d iterations", checkpoint, len(history))
    elif resume:
        logger.info("no checkpoint at %s yet: starting afresh", checkpoint)

    started = time.perf_counter() - elapsed_before
    state = RunCheckpoint(checkpoint, model, optimizer, train, history, early, fingerprint, annealer)
    if optimizer_trusted:
        state.stepped()  # the loaded optimizer state belongs to the loaded weights, as after a step
    bar = _progress_bar(progress and _dist.is_main_process(), max_iter, initial=len(history))
    stops = StopRequests()
    steps_taken = 0
    try:
        with stops.installed():
            while history.stop_reason is None:
                history.stop_reason = agreed(budget_exhausted(history, max_iter, max_time, started, stops))
                if history.stop_reason is not None:
                    break
                # Weights written since the last step (by a callback, say) need their validation loss evaluated even
                # if this step's trial fails and leaves them as they are.
                # (Counted from this call's first step: right after a resume the weights are the saved ones.)
                written_outside = steps_taken > 0 and not state.optimizer_at_weights()
                try:
                    # An annealing chain cut short leaves the weights where it found them (Annealer._anneal).
                    annealed = annealer is not None and annealer.before_iteration(history)
                    # torch types a closure as returning a float; a loss tensor is what its optimizers take
                    optimizer.step(train)  # type: ignore[arg-type]
                    state.stepped()
                    steps_taken += 1
                except KeyboardInterrupt:
                    history.stop_reason = "interrupted"
                    break
                except FloatingPointError as error:
                    history.stop_reason, history.detail = "non_finite", str(error)
                    logger.warning("stopping: %s", error)
                    break
                row = _row(optimizer, history, started, train)
                moved = row["success"] or annealed or written_outside
                row |= _validation_row(validation, metric, history, weights_moved=moved)
                history.append(**row)
                if validation is not None:
                    early.update(model, row["k"], row["val_loss"], moved=moved)
                    history.best_iteration = early.best_iteration
                _update_bar(bar, history)
                _apply_stop_rules(history, goal, min_grad, max_fail, max_stall, early, annealer)
                if history.stop_reason is None and _callbacks_ask_to_stop(callbacks, state, started):
                    history.stop_reason = "callback"
                if history.stop_reason is None and len(history) % checkpoint_every == 0:
                    state.save(started)
    finally:
        if bar is not None:
            bar.close()
    best_weights = early.best_weights if history.stop_reason == "max_fail" else None
    restores_best = best_weights is not None
    if best_weights is not None:
        model.load_state_dict(best_weights)  # SCG's E and r now belong to other weights: state.save says so
    if steps_taken or restores_best or not found or history.stop_reason != saved_stop_reason:
        # A resume that changed nothing (no step, the same stop) leaves its checkpoint as it found it: rewritten, it
        # would take this call's data fingerprint and distrust SCG's saved state, though nothing was trained on it.
        state.save(started)
    logger.info("stopped after %d iterations: %s", len(history), history.message)
    return history


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of samples whose largest output is at the target class (a ``metric`` for :func:`fit`)."""
    return (outputs.argmax(dim=-1) == targets).to(torch.float64).mean()


# --------------------------------------------------------------------------------------------------------------
# Helpers of fit, each one rule


def _apply_stop_rules(
    history: History,
    goal: float | None,
    min_grad: float | None,
    max_fail: int | None,
    max_stall: int,
    early: EarlyStopping,
    annealer: Annealer | None,
) -> None:
    """Set ``history.stop_reason`` by the rules that read the History after its latest row (``converged``); with
    annealing, a stall or a stationary point restarts instead while restarts are left (``restart_instead``)."""
    stall_since = 0 if annealer is None else annealer.since(history)
    history.stop_reason = converged(history, goal, min_grad, max_fail, max_stall, early, stall_since)
    if annealer is not None:
        history.stop_reason = restart_instead(annealer, history, min_grad)


def _row(
    optimizer: torch.optim.Optimizer, history: History, started: float, train: GradientAccumulator
) -> dict[str, Any]:
    """One History row: SCG's trace, or for other optimizers the loss E at the weights after their step."""
    trace = getattr(optimizer, "trace", None)
    if isinstance(trace, SCGTrace):  # SCG's step returns, and traces, E at the weights it leaves
        return dataclasses.asdict(trace) | {"time": time.perf_counter() - started}
    # Other optimizers (LBFGS, …) return the loss of their first evaluation, before the step moved the weights:
    # one loss-only pass gives E at the weights the model holds.
    after = float(train.loss())
    return {"k": len(history) + 1, "loss": after, "success": True, "time": time.perf_counter() - started}


def _validation_row(
    validation: GradientAccumulator | None,
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    history: History,
    weights_moved: bool,
) -> dict[str, float]:
    """Validation loss and metric, evaluated only when the weights moved (a failed SCG trial leaves them be)."""
    if validation is None:
        return {}
    if not weights_moved and len(history):
        return {"val_loss": history["val_loss"][-1], "val_metric": history["val_metric"][-1]}
    if metric is None:
        return {"val_loss": float(validation.loss())}
    values = validation.evaluate({"val_metric": metric})  # one forward pass per batch for both
    return {"val_loss": values["loss"], "val_metric": values["val_metric"]}


def _progress_bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="SCG", unit="it", dynamic_ncols=True)


def _update_bar(bar: Any, history: History) -> None:
    if bar is None:
        return
    row = history.last
    successes = history["success"]
    postfix = {
        "loss": f"{row['loss']:.4g}",
        "λ": f"{row['lambd']:.2g}",
        "success": f"{sum(successes) / len(successes):.0%}",
    }
    if math.isfinite(row["val_loss"]):
        postfix["val"] = f"{row['val_loss']:.4g}"
    bar.set_postfix(postfix, refresh=False)
    bar.update(1)


def _check_no_frozen_parameters(optimizer: torch.optim.Optimizer) -> None:
    """SCG's w must be the accumulator's: the trainable parameters (``requires_grad``), not the frozen ones."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    frozen = sum(not p.requires_grad for p in held)
    if isinstance(optimizer, SCG) and frozen:
        raise ValueError(
            f"the SCG optimizer holds {frozen} frozen parameter(s) (requires_grad=False), which fit does not "
            f"differentiate: build it over the trainable ones, SCG(p for p in model.parameters() if p.requires_grad), "
            f"or leave optimizer=None"
        )


def _takes_exact_curvature(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer asks the accumulator for Hessian-vector products (SCG with exact curvature)."""
    return isinstance(optimizer, SCG) and optimizer.uses_exact_curvature


def _callbacks_ask_to_stop(callbacks: Sequence[Callback], state: RunCheckpoint, started: float) -> bool:
    """Call every callback; whether any returned a true value. One that raises leaves a checkpoint and the
    History (as the exception's ``history``) before its exception goes on."""
    try:
        answers = [(callback, callback(state.history)) for callback in callbacks]
        return any([callback_says_stop(callback, answer) for callback, answer in answers])
    except Exception as error:
        state.save(started)
        error.history = state.history  # type: ignore[attr-defined]
        if hasattr(error, "add_note"):  # Python ≥ 3.11
            where = "" if state.path is None else f"; the checkpoint {os.fspath(state.path)!r} holds it"
            error.add_note(f"fit stopped after iteration {len(state.history)}: its History is error.history{where}")
        raise


def _validate_callbacks(callbacks: Any) -> None:
    if callable(callbacks) or isinstance(callbacks, (str, bytes)):
        raise TypeError(f"callbacks must be a list of functions, got {callbacks!r:.80}: pass callbacks=[function]")
    for index, callback in enumerate(callbacks):
        if not callable(callback):
            raise TypeError(
                f"callbacks[{index}] is not callable: {callback!r:.80}; each callback is a function called with the "
                f"History after every iteration"
            )


def _check_curvature_subsampling(
    fraction: Any, subset: Any, seed: Any, optimizer: torch.optim.Optimizer | None
) -> None:
    """Before any accumulator is built: f, the subset mode and the seed are valid, and a given optimizer with
    f < 1 asks for exact curvature (otherwise the subsampled products would never be used)."""
    fraction = validate_fraction(fraction)
    validate_subset(subset, seed)
    if fraction < 1.0 and optimizer is not None and not _takes_exact_curvature(optimizer):
        raise ValueError(
            f"curvature_fraction={fraction!r} subsamples the Hessian-vector products of SCG's exact "
            f"curvature, which this {type(optimizer).__name__} does not ask for: drop curvature_fraction, or use "
            f"SCG(params, hvp='double-backward')"
        )


def _check_hvp_method(method: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """Before any accumulator is built: ``method`` is one of the accumulator's, and a method other than the
    default comes with an optimizer that asks for the products (otherwise it would never be used)."""
    if method not in HVP_METHODS:
        raise ValueError(f"Invalid hvp_method {method!r}; choose one of {', '.join(map(repr, HVP_METHODS))}")
    if method != "double-backward" and optimizer is not None and not _takes_exact_curvature(optimizer):
        raise ValueError(
            f"hvp_method={method!r} sets how the curvature products of SCG's exact mode are formed, but this "
            f"{type(optimizer).__name__} does not ask for them: drop hvp_method, or use SCG(params, "
            f"hvp='double-backward') (or leave the optimizer to fit)"
        )


def _validate_arguments(
    max_iter: Any,
    goal: Any,
    min_grad: Any,
    max_time: Any,
    max_fail: Any,
    max_stall: Any,
    checkpoint: Any,
    checkpoint_every: Any,
    resume: Any,
    overwrite: Any,
) -> None:
    def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int ≥ 1{' or None' if allow_none else ''}, got {value!r}")

    def non_negative(name: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number ≥ 0 or None, got {value!r}")

    positive_int("max_iter", max_iter)
    positive_int("max_fail", max_fail, allow_none=True)
    positive_int("max_stall", max_stall)
    positive_int("checkpoint_every", checkpoint_every)
    non_negative("min_grad", min_grad)
    non_negative("max_time", max_time)
    if goal is not None and (isinstance(goal, bool) or not isinstance(goal, (int, float)) or math.isnan(goal)):
        raise ValueError(f"goal must be a number or None, got {goal!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH: the file to resume from")
    if resume and overwrite:
        raise ValueError(
            "resume=True continues the run in checkpoint, overwrite=True replaces it: pass one of them, not both"
        )
