"""Checkpoints: one file with everything a run needs to continue bit-identically after an interruption.

A checkpoint is one ``dict`` written by ``torch.save`` (a zip archive) and read back with
``torch.load(..., weights_only=True)``, so reading a file never runs code stored in it. Its layout, version 1:

===================  =================================================================================================
key                  value
===================  =================================================================================================
``format``           ``"moller_scg.checkpoint"``: tells our files from any other ``torch.save`` file
``version``          ``1``; a file of another version is refused
``iteration``        iterations completed when the checkpoint was written (``int`` ≥ 0)
``model``            ``model.state_dict()``
``optimizer``        ``optimizer.state_dict()``; for :class:`~moller_scg.SCG` it includes the ``"scg"`` scalars
``optimizer_class``  the optimizer's qualified class name, e.g. ``"moller_scg.scg.SCG"``
``history``          the run's history so far: a ``dict`` of ``str`` → ``list``
``rng``              the random number generators' states, from :func:`capture_rng_state`
``extra``            a free-form ``dict`` for the caller
===================  =================================================================================================

Every value is a tensor or a plain Python value (``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``,
``bool``, ``None``, …), which :func:`save_checkpoint` checks before it writes anything. A file is written
atomically: a checkpoint on disk is always a complete old one or a complete new one, never half of each.

Before :func:`restore` changes anything it checks that the checkpoint fits the model (the same keys, shapes and
dtypes) and the optimizer (the same class, parameter groups and parameter counts), so a corrupt, truncated or
foreign checkpoint raises :class:`CheckpointError` and nothing is half-loaded.

The generators' states are captured and restored by :mod:`moller_scg.rng_state` (re-exported here).

Example:
    >>> import os, tempfile, torch
    >>> from moller_scg import SCG
    >>> from moller_scg.checkpoint import load_checkpoint, make_checkpoint, restore, save_checkpoint
    >>> model = torch.nn.Linear(2, 1, dtype=torch.float64)
    >>> optimizer = SCG(model.parameters())
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "run.pt")
    ...     save_checkpoint(path, make_checkpoint(model, optimizer, iteration=0, history={"loss": []}))
    ...     checkpoint = load_checkpoint(path)
    ...     restore(model, optimizer, checkpoint, source=path)
    >>> checkpoint["iteration"], checkpoint["history"]
    (0, {'loss': []})
"""

from __future__ import annotations

import collections
import copy
import io
import os
import pickle
import stat
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moller_scg.rng_state import capture_rng_state, restore_rng_state, rng_state_problem

FORMAT = "moller_scg.checkpoint"
"""The ``format`` entry of every checkpoint this module writes."""
VERSION = 1
"""The layout version this module writes and reads."""

_ENTRIES = {
    "format": str,
    "version": int,
    "iteration": int,
    "model": dict,
    "optimizer": dict,
    "optimizer_class": str,
    "history": dict,
    "rng": dict,
    "extra": dict,
}
# What torch.load(weights_only=True) rebuilds without being told about other classes.
_PLAIN_CONTAINERS = (dict, collections.OrderedDict, list, tuple, torch.Size)
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_ZIP_LOCAL_HEADER = b"PK\x03\x04"  # how every zip archive, and so every torch.save file, begins
_ZIP_END_OF_CENTRAL_DIRECTORY = b"PK\x05\x06"  # how a zip archive's last record begins
_ZIP_END_SEARCH = 22 + 65535  # that record is 22 bytes plus a comment of at most 65535 bytes, at the very end
_ZIP_DOS_FOLDER_FLAG = 0x10  # the MS-DOS "directory" bit of a zip record's external attributes
_REMEDY = "Delete or move the file, or pass resume=False to start afresh."


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupt, truncated, foreign, unsafe, or made for another model or optimizer."""


# ----------------------------------------------------------------------------------------------------------------
# Writing


def make_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    iteration: int,
    history: Mapping[str, list[Any]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint of a run after ``iteration`` iterations, in the layout of this module's docstring.

    Also captures the random number generators (:func:`capture_rng_state`). The tensors are the model's and the
    optimizer's own, as with ``state_dict()``: save the checkpoint before training on.

    Raises:
        TypeError: ``iteration``, ``history`` or ``extra`` is not of the documented type.
        ValueError: ``iteration`` is negative.
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise TypeError(f"iteration must be an int, got {type(iteration).__name__}: {iteration!r:.80}")
    if iteration < 0:
        raise ValueError(f"iteration must be ≥ 0, got {iteration}")
    if not isinstance(history, Mapping) or not all(
        isinstance(key, str) and isinstance(value, list) for key, value in history.items()
    ):
        raise TypeError(f"history must be a dict of str → list, got {history!r:.120}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}: {extra!r:.80}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "iteration": iteration,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "optimizer_class": _qualified_name(type(optimizer)),
        "history": dict(history),
        "rng": capture_rng_state(),
        "extra": {} if extra is None else dict(extra),
    }


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` (from :func:`make_checkpoint`) to ``path`` atomically, creating missing folders.

    The file is first written to a temporary file in the same folder, flushed and ``fsync``-ed, then moved onto
    ``path`` with ``os.replace``, and the folder is ``fsync``-ed where the system allows it. If anything fails, or
    the run is interrupted, the temporary file is removed and a checkpoint already at ``path`` is left as it was.

    Raises:
        ValueError: ``checkpoint`` does not have this module's layout.
        TypeError: it holds a value that ``torch.load(weights_only=True)`` would refuse (named in the message).
        OSError: the file cannot be written.
    """
    problem = _layout_problem(checkpoint)
    if problem is not None:
        raise ValueError(f"save_checkpoint needs a checkpoint from make_checkpoint: {problem}")
    location = _first_unsafe_value(checkpoint, "checkpoint")
    if location is not None:
        raise TypeError(
            f"{location} cannot be saved in a checkpoint: a checkpoint holds only tensors and plain Python values "
            f"(dict, list, tuple, str, int, float, bool, None) so that it loads with weights_only=True"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # O_EXCL: never write into someone else's file; mode 0o666 lets the umask decide, as for any new file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def check_writable_file(path: str | os.PathLike[str], what: str = "checkpoint") -> None:
    """Check, before a run starts, that a file can later be written at ``path``, creating missing parent folders.

    A run that trains for hours and then cannot write its checkpoint (or its figure) loses the hours; this finds
    the problem first. ``path`` must not be a folder or anything but a regular file (a FIFO would block the run),
    its parent folders are created as :func:`save_checkpoint` would create them, and a probe file is written and
    removed in the folder.

    Raises:
        ValueError: ``path`` is a folder, a FIFO, socket or device, or its folder cannot be created or written to;
            the message names the path, the reason and what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"the {what} path {os.fspath(path)!r} is a folder; pass the path of a file, e.g. "
            f"{os.fspath(path / 'run.pt')!r}"
        )
    if path.exists() and not path.is_file():
        raise ValueError(
            f"the {what} path {os.fspath(path)!r} exists but is not a regular file (a FIFO, socket or device); pass "
            f"the path of a regular file"
        )
    folder = path.parent
    probe = folder / f".{path.name}.{uuid.uuid4().hex}.probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write the {what} {os.fspath(path)!r}: its folder {os.fspath(folder)!r} cannot be created or "
            f"written to ({error.strerror or error}); choose a writable folder"
        ) from error


def check_checkpoint_target(path: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> None:
    """Check, before a run starts, that its checkpoint can be written and that no checkpoint is lost silently.

    Raises:
        ValueError: ``path`` cannot be written (see :func:`check_writable_file`).
        FileExistsError: a file exists at ``path`` and neither ``resume`` (continue it) nor ``overwrite`` (replace
            it) was asked for.
    """
    check_writable_file(path)
    if Path(path).exists() and not resume and not overwrite:
        raise FileExistsError(
            f"the checkpoint {os.fspath(path)!r} already exists and this run would overwrite it: pass resume=True "
            f"(CLI: --resume) to continue that run, or overwrite=True (CLI: --overwrite) to start afresh and "
            f"replace it, or choose another checkpoint path"
        )


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable: ``fsync`` the folder that holds the new file, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its rename is already durable
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on a folder; the file itself is already on disk
        pass
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with ``weights_only=True`` and every tensor on the CPU.

    The file is checked as a whole before anything is unpickled: it must be a complete zip archive whose records
    pass their CRC checks. Then it must hold a ``dict`` with this module's format marker, version and layout.

    Raises:
        FileNotFoundError: there is no file at ``path`` (nothing to resume from).
        CheckpointError: ``path`` is not a regular file (a folder, or a FIFO that would block), the file is not a
            checkpoint, is truncated or corrupt, holds objects other than tensors
            and plain Python values (refused for safety, without running any of its code), was written by
            another program, or has another version or layout.
        OSError: the file cannot be read.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):  # os.stat raises FileNotFoundError when there is no file
        # open() on a FIFO blocks until a writer comes; a folder or device is no checkpoint either.
        raise _error("load", path, "it is not a regular file (a folder, FIFO, socket or device)")
    with open(path, "rb") as file:
        data = file.read()
    # From here on every failure is about the bytes read, not about the file system.
    problem = _archive_problem(data)
    if problem is not None:
        raise _error("load", path, problem)
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _error(
            "load",
            path,
            f"it holds objects other than tensors and plain Python values, so it was refused for safety "
            f"(torch.load with weights_only=True: {_unpickler_reason(error)}); load it with weights_only=False "
            f"only if you trust where it came from",
        ) from error
    except Exception as error:  # whatever torch.load raises about these bytes means "corrupt"
        raise _error("load", path, f"it is corrupt: torch.load failed ({_summary(error)})") from error
    problem = _layout_problem(checkpoint)
    if problem is not None:
        raise _error("load", path, problem)
    return checkpoint


def _archive_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete, intact zip archive as ``torch.save`` writes, or ``None``."""
    if not data:
        return "the file is empty"
    if not data.startswith(_ZIP_LOCAL_HEADER):
        return "it is not a checkpoint file: checkpoints are zip archives written by torch.save, this is not one"
    if _ZIP_END_OF_CENTRAL_DIRECTORY not in data[-_ZIP_END_SEARCH:]:
        return (
            "it is truncated: it begins like a checkpoint but its end is missing "
            "(was the write interrupted, the disk full, or the copy incomplete?)"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
            # torch.save writes CRCs unless torch.serialization.set_crc32_options(False); then every CRC is 0.
            damaged = archive.testzip() if any(record.CRC for record in records) else None
    except Exception as error:  # any failure to read the archive in memory means "corrupt"
        return f"it is corrupt: its zip structure is damaged ({_summary(error)})"
    if damaged is not None:
        return f"it is corrupt: its record {damaged!r} fails its CRC check"
    # torch's zip reader returns uninitialised memory, without an error, for a record marked as a folder.
    folders = [record.filename for record in records if record.external_attr & _ZIP_DOS_FOLDER_FLAG]
    if folders:
        return f"it is corrupt: its record {folders[0]!r} is marked as a folder"
    return None


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only error that says what was refused, without its advice to trust the file."""
    for line in str(error).splitlines():
        if "unsupported" in line.lower():
            return line.replace("WeightsUnpickler error:", "").strip().split(". Please")[0].rstrip(".")
    return "refused"


# ----------------------------------------------------------------------------------------------------------------
# Restoring


def restore(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint: Mapping[str, Any],
    *,
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Load a checkpoint's model state, optimizer state and random number generators, all or nothing.

    Everything is checked first (layout, :func:`check_model_state`, the optimizer's class and parameter groups,
    the RNG states); only then are ``model.load_state_dict``, ``optimizer.load_state_dict`` and
    :func:`restore_rng_state` called. Should one of them still fail, the model, optimizer and generators are put
    back as they were. The optimizer may keep tensors of ``checkpoint`` (as ``load_state_dict`` does): use a
    loaded checkpoint once.

    Args:
        model: the model to load into; it must be built like the one that was saved.
        optimizer: the optimizer to load into, of the saved class, over the same parameters.
        checkpoint: from :func:`load_checkpoint`.
        source: the checkpoint's path, named in error messages.

    Raises:
        CheckpointError: the checkpoint does not fit the model or the optimizer; nothing was changed.
    """
    problem = (
        _layout_problem(checkpoint)
        or _model_state_problem(model, checkpoint["model"])
        or _optimizer_problem(optimizer, checkpoint["optimizer"], checkpoint["optimizer_class"])
    )
    if problem is not None:
        raise _error("restore", source, problem)
    backup = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), capture_rng_state()
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng_state(checkpoint["rng"])
    except Exception as error:
        model.load_state_dict(backup[0])
        optimizer.load_state_dict(backup[1])
        restore_rng_state(backup[2])
        raise _error("restore", source, f"loading it failed ({_summary(error)}); nothing was changed") from error


def check_model_state(
    model: torch.nn.Module, state: Mapping[str, Any], *, source: str | os.PathLike[str] | None = None
) -> None:
    """Check that ``state`` has exactly ``model``'s state keys, and for each tensor its shape and dtype.

    ``model.load_state_dict`` copies the matching entries before it reports a mismatch; this check comes first,
    so a checkpoint of another model is refused before anything is loaded.

    Raises:
        CheckpointError: naming the first key that differs.
    """
    problem = _model_state_problem(model, state)
    if problem is not None:
        raise _error("restore", source, problem)


def _model_state_problem(model: torch.nn.Module, state: Any) -> str | None:
    if not isinstance(state, Mapping):
        return f"its model state is a {type(state).__name__}, not a state_dict"
    expected = model.state_dict()
    another = "it holds the state of another model"
    for key, value in expected.items():
        if key not in state:
            return f"{another}: the model has {key!r} but the checkpoint does not"
        saved = state[key]
        if not isinstance(value, torch.Tensor):
            continue  # extra state of a module: its own load_state_dict judges it
        if not isinstance(saved, torch.Tensor):
            return f"{another}: {key!r} is a {type(saved).__name__} in the checkpoint but a tensor in the model"
        if saved.shape != value.shape:
            shapes = f"shape {tuple(saved.shape)} in the checkpoint but {tuple(value.shape)} in the model"
            return f"{another}: {key!r} has {shapes}"
        if saved.dtype != value.dtype:
            return f"{another}: {key!r} has dtype {saved.dtype} in the checkpoint but {value.dtype} in the model"
    for key in state:
        if key not in expected:
            return f"{another}: the checkpoint has {key!r} but the model does not"
    return None


def _optimizer_problem(optimizer: torch.optim.Optimizer, state: dict[str, Any], saved_class: str) -> str | None:
    expected_class = _qualified_name(type(optimizer))
    if saved_class != expected_class:
        return f"it was written by a {saved_class} optimizer, not a {expected_class}"
    groups = state.get("param_groups")
    if (
        not isinstance(state.get("state"), dict)
        or not isinstance(groups, list)
        or not all(isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups)
    ):
        return "its optimizer state is not an optimizer state_dict (a 'state' dict and a 'param_groups' list)"
    if len(groups) != len(optimizer.param_groups):
        return f"its optimizer has {len(groups)} parameter groups, this one has {len(optimizer.param_groups)}"
    for index, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(group["params"]):
            return (
                f"parameter group {index} of its optimizer holds {len(saved['params'])} parameters, "
                f"this optimizer's holds {len(group['params'])}"
            )
    return None


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def _summary(error: BaseException) -> str:
    """The error's type and first sentence: torch's messages go on with advice that does not apply here."""
    return f"{type(error).__name__}: {str(error).split('. ')[0].strip()}"


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _error(action: str, source: str | os.PathLike[str] | None, problem: str) -> CheckpointError:
    where = "the checkpoint" if source is None else f"checkpoint {os.fspath(source)!r}"
    return CheckpointError(f"Cannot {action} {where}: {problem}. {_REMEDY}")


def _layout_problem(checkpoint: Any) -> str | None:
    """Why ``checkpoint`` is not a checkpoint in this module's layout, or ``None``."""
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != FORMAT:
        held = f"a {type(checkpoint).__name__}"
        if isinstance(checkpoint, Mapping):
            held += f" with the keys {', '.join(map(repr, list(checkpoint)[:8]))}"
        return f"it was not made by moller_scg (it holds {held}, without the entry 'format': {FORMAT!r})"
    if checkpoint.get("version") != VERSION:
        return f"it has layout version {checkpoint.get('version')!r}, but this moller_scg reads version {VERSION}"
    for key, kind in _ENTRIES.items():
        if key not in checkpoint:
            return f"it is incomplete: it has no {key!r} entry"
        if not isinstance(checkpoint[key], kind) or isinstance(checkpoint[key], bool):
            return f"its {key!r} entry is a {type(checkpoint[key]).__name__}, not a {kind.__name__}"
    unexpected = [key for key in checkpoint if key not in _ENTRIES]
    if unexpected:
        return f"it has the unexpected entry {unexpected[0]!r} (free-form values belong in 'extra')"
    if checkpoint["iteration"] < 0:
        return f"its iteration {checkpoint['iteration']} is negative"
    if not all(isinstance(key, str) and isinstance(value, list) for key, value in checkpoint["history"].items()):
        return "its history is not a dict of str → list"
    return rng_state_problem(checkpoint["rng"])


def _first_unsafe_value(value: Any, location: str) -> str | None:
    """Where in ``value`` the first object is that ``torch.load(weights_only=True)`` would refuse, with its type."""
    kind = type(value)
    if kind in _PLAIN_TENSORS or kind in _PLAIN_VALUES:
        return None
    if kind not in _PLAIN_CONTAINERS:
        return f"{location} (a {kind.__module__}.{kind.__qualname__})"
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        inner = f"{location}[{key!r}]"
        found = _first_unsafe_value(key, f"the key {inner}") or _first_unsafe_value(item, inner)
        if found is not None:
            return found
    return None
