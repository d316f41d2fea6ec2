"""Tests of moller_scg.checkpoint: atomic writes, refusal of hostile files, all-or-nothing restore, exact resume."""

from __future__ import annotations

import copy
import doctest
import os
import pickle
import random
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moller_scg import SCG, checkpoint
from moller_scg.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    check_model_state,
    load_checkpoint,
    make_checkpoint,
    restore,
    save_checkpoint,
)

HVP_MODES = ("double-backward", "finite-difference")
_code_ran: list[str] = []


def _record_that_code_ran(message: str) -> None:
    """What a hostile pickle would call on loading: harmless, but visible."""
    _code_ran.append(message)


class _CarriesCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return _record_that_code_ran, ("the checkpoint ran code on load",)


def _make_model(
    seed: int = 0, dtype: torch.dtype = torch.float64, outputs: int = 1, bias: bool = True
) -> torch.nn.Module:
    """A 2-3-``outputs`` tanh network; the defaults give the model every checkpoint here is written from."""
    torch.manual_seed(seed)
    layers = torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, outputs, bias=bias)
    return torch.nn.Sequential(*layers).to(dtype)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 2, dtype=torch.float64, generator=generator)
    return inputs, torch.sin(inputs.sum(dim=1, keepdim=True))


def _closure(model: torch.nn.Module, optimizer: SCG) -> Any:
    dtype = next(model.parameters()).dtype
    inputs, targets = (tensor.to(dtype) for tensor in _data())
    create_graph = optimizer.param_groups[0]["hvp"] == "double-backward"

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (model(inputs) - targets).pow(2).mean()
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def _seed_every_generator(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _trained(steps: int, hvp: str = "finite-difference") -> tuple[torch.nn.Module, SCG]:
    """An SCG run of ``steps`` iterations from the same start every time; no generator is drawn from."""
    model = _make_model()
    optimizer = SCG(model.parameters(), hvp=hvp)
    closure = _closure(model, optimizer)
    for _ in range(steps):
        optimizer.step(closure)
    return model, optimizer


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_same(actual: Any, expected: Any) -> None:
    """Bit-identical nested structures: tensors by torch.equal and dtype, floats by repr (exact, NaN-safe)."""
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert repr(actual) == repr(expected)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A real checkpoint of an SCG run after 3 iterations."""
    model, optimizer = _trained(3)
    path = tmp_path / "run.pt"
    save_checkpoint(path, make_checkpoint(model, optimizer, iteration=3, history={"loss": [1.0, 0.5, 0.25]}))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Round trips


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(checkpoint, raise_on_error=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_checkpoint_round_trips_every_entry_and_loads_with_plain_weights_only(tmp_path: Path) -> None:
    model, optimizer = _trained(4)
    written = make_checkpoint(
        model, optimizer, iteration=4, history={"loss": [3.0, 2.0], "success": [True, False]}, extra={"seed": 7}
    )
    path = tmp_path / "run.pt"
    save_checkpoint(path, written)

    loaded = load_checkpoint(path)

    _assert_same(loaded, written)
    assert loaded["format"] == FORMAT and loaded["version"] == VERSION
    assert loaded["optimizer_class"] == "moller_scg.scg.SCG"
    assert set(loaded["optimizer"]["scg"]["scalars"]) >= {"k", "lambd", "lambd_bar", "delta", "success"}
    # Anyone can read it with torch alone, safely.
    _assert_same(torch.load(path, weights_only=True), written)


@pytest.mark.parametrize("hvp", HVP_MODES)
def test_resumed_scg_run_ends_bit_identical_to_uninterrupted_run(tmp_path: Path, hvp: str) -> None:
    total, interrupted_at = 12, 5
    _seed_every_generator(0)
    model, optimizer = _trained(total, hvp)
    draws_after = torch.rand(3), random.random(), np.random.random_sample()

    _seed_every_generator(0)
    first_model, first_optimizer = _trained(interrupted_at, hvp)
    path = tmp_path / "run.pt"
    save_checkpoint(path, make_checkpoint(first_model, first_optimizer, iteration=interrupted_at, history={}))
    # A new process: other weights, another optimizer object, other random numbers.
    _seed_every_generator(99)
    resumed_model = _make_model(seed=42)
    resumed_optimizer = SCG(resumed_model.parameters(), hvp=hvp)
    restore(resumed_model, resumed_optimizer, load_checkpoint(path), source=path)
    closure = _closure(resumed_model, resumed_optimizer)
    for _ in range(total - interrupted_at):
        resumed_optimizer.step(closure)
    resumed_draws = torch.rand(3), random.random(), np.random.random_sample()

    for resumed, uninterrupted in zip(resumed_model.parameters(), model.parameters()):
        assert torch.equal(resumed, uninterrupted)
    scalars = optimizer.state_dict()["scg"]["scalars"]
    resumed_scalars = resumed_optimizer.state_dict()["scg"]["scalars"]
    if hvp == "double-backward":
        # SCG re-evaluates once after load_state_dict to rebuild the autograd graph that cannot be saved.
        assert resumed_scalars.pop("closure_calls") == scalars.pop("closure_calls") + 1
    assert repr(resumed_scalars) == repr(scalars)
    assert torch.equal(resumed_draws[0], draws_after[0])
    assert resumed_draws[1:] == draws_after[1:]


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "KeyboardInterrupt"])
def test_failed_write_leaves_previous_checkpoint_intact_and_no_temporary_file(
    saved: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    before = saved.read_bytes()
    model, optimizer = _trained(5)
    real_save = torch.save

    def save_half_then_fail(obj: Any, file: Any) -> None:
        real_save(obj, file)
        file.seek(file.tell() // 2)
        file.truncate()
        raise failure

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(type(failure)):
        save_checkpoint(saved, make_checkpoint(model, optimizer, iteration=5, history={}))

    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]
    assert load_checkpoint(saved)["iteration"] == 3


def test_save_syncs_the_file_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(descriptor).st_mode) else "fsync file")
        real_fsync(descriptor)

    def replace(source: Any, target: Any) -> None:
        events.append("replace")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, optimizer = _trained(1)
    save_checkpoint(tmp_path / "run.pt", make_checkpoint(model, optimizer, iteration=1, history={}))

    assert events == ["fsync file", "replace", "fsync folder"]


def test_save_replaces_previous_checkpoint_and_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "a" / "run.pt"
    model, optimizer = _trained(2)
    save_checkpoint(path, make_checkpoint(model, optimizer, iteration=1, history={}))
    save_checkpoint(path, make_checkpoint(model, optimizer, iteration=2, history={}))

    assert load_checkpoint(path)["iteration"] == 2
    assert os.listdir(path.parent) == ["run.pt"]


def test_save_refuses_values_weights_only_would_not_load_and_writes_nothing(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    path = tmp_path / "run.pt"
    written = make_checkpoint(model, optimizer, iteration=1, history={"loss": [1.0, np.float64(0.5)]})

    with pytest.raises(TypeError, match=r"history'\]\['loss'\]\[1\] \(a numpy.float64\)"):
        save_checkpoint(path, written)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("arguments", "error", "problem"),
    [
        ({"iteration": -1, "history": {}}, ValueError, "iteration must be ≥ 0, got -1"),
        ({"iteration": True, "history": {}}, TypeError, "iteration must be an int, got bool"),
        ({"iteration": 1, "history": {"loss": (1.0,)}}, TypeError, "history must be a dict of str → list"),
        ({"iteration": 1, "history": {}, "extra": [1]}, TypeError, "extra must be a dict or None, got list"),
    ],
    ids=["negative-iteration", "bool-iteration", "tuple-column", "list-extra"],
)
def test_make_checkpoint_refuses_bad_arguments(arguments: dict[str, Any], error: type, problem: str) -> None:
    model = _make_model()
    with pytest.raises(error, match=problem):
        make_checkpoint(model, SCG(model.parameters()), **arguments)


def test_save_refuses_a_dict_that_is_not_in_the_checkpoint_layout(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not made by moller_scg"):
        save_checkpoint(tmp_path / "run.pt", {"model": {}})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# Hostile and damaged files


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize(
    ("content", "problem"),
    [(random.Random(0).randbytes(4096), "it is not a checkpoint file"), (b"", "the file is empty")],
    ids=["random-bytes", "empty"],
)
def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "run.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem) as raised:
        load_checkpoint(path)
    assert str(path) in str(raised.value) and "resume=False" in str(raised.value)


@pytest.mark.parametrize("keep", [0.5, 0.99], ids=["half", "all-but-the-end"])
def test_truncated_checkpoint_is_refused(saved: Path, keep: float) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="it is truncated"):
        load_checkpoint(saved)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_every_prefix_of_a_checkpoint_is_refused(saved: Path, fraction: float) -> None:
    data = saved.read_bytes()
    prefix = saved.with_name("prefix.pt")
    prefix.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError):
        load_checkpoint(prefix)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(min_value=0.0, max_value=1.0, exclude_max=True), flip=st.integers(1, 255))
def test_a_damaged_byte_is_refused_or_harmless(saved: Path, position: float, flip: int) -> None:
    original = load_checkpoint(saved)
    data = bytearray(saved.read_bytes())
    data[int(len(data) * position)] ^= flip
    damaged = saved.with_name("damaged.pt")
    damaged.write_bytes(bytes(data))
    try:
        loaded = load_checkpoint(damaged)
    except CheckpointError:
        return
    # Bytes the reader ignores (zip timestamps, padding) may change; the content must not.
    _assert_same(loaded, original)


def test_damaged_tensor_data_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("data/0"))
    # A zip record's data follows its 30-byte local header, its name and its extra field (lengths at 26 and 28).
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    data[record.header_offset + 30 + name_length + extra_length] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="it is corrupt: its record .* fails its CRC check"):
        load_checkpoint(saved)


def _central_directory_entry(data: bytes, name_suffix: bytes) -> int:
    """Offset of the zip central directory entry whose record name ends with ``name_suffix``."""
    end_record = data.rindex(b"PK\x05\x06")
    entry = struct.unpack_from("<I", data, end_record + 16)[0]  # where the central directory starts
    while True:
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, entry + 28)
        if data[entry + 46 : entry + 46 + name_length].endswith(name_suffix):
            return entry
        entry += 46 + name_length + extra_length + comment_length


def test_record_marked_as_folder_is_refused(saved: Path) -> None:
    # torch.load reads such a record as uninitialised memory, without an error.
    data = bytearray(saved.read_bytes())
    data[_central_directory_entry(data, b"data/0") + 38] |= 0x10  # the MS-DOS folder bit of its external attributes
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="it is corrupt: its record '.*data/0' is marked as a folder"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("torch.save", r"refused for safety.*_record_that_code_ran.*weights_only=False only if you trust"),
        ("pickle protocol 2", "it is not a checkpoint file"),
        ("pickle default protocol", "it is not a checkpoint file"),
    ],
)
def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path: Path, form: str, expected: str) -> None:
    _code_ran.clear()
    model, optimizer = _trained(1)
    hostile = make_checkpoint(model, optimizer, iteration=1, history={})
    hostile["extra"] = {"payload": _CarriesCode()}
    path = tmp_path / "run.pt"
    if form == "torch.save":
        torch.save(hostile, path)
    else:
        path.write_bytes(pickle.dumps(hostile, protocol=2 if form == "pickle protocol 2" else None))

    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)

    assert _code_ran == []


@pytest.mark.parametrize(
    ("foreign", "problem"),
    [
        ({"weights": torch.ones(3)}, "not made by moller_scg.*a dict with the keys 'weights'"),
        (torch.ones(3), "not made by moller_scg.*a Tensor"),
        ({"format": FORMAT, "version": VERSION + 1}, "layout version 2, but this moller_scg reads version 1"),
        ({"format": FORMAT, "version": VERSION}, "incomplete: it has no 'iteration' entry"),
    ],
    ids=["plain-dict", "bare-tensor", "newer-version", "incomplete"],
)
def test_foreign_checkpoint_is_refused(tmp_path: Path, foreign: Any, problem: str) -> None:
    path = tmp_path / "run.pt"
    torch.save(foreign, path)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------------------------
# Restoring into the wrong model or optimizer: refused, nothing changed


@pytest.mark.parametrize(
    ("other_model", "problem"),
    [
        # Same keys, first layer alike: torch's load_state_dict would copy '0.*' before reporting '2.weight'.
        ({"outputs": 2}, r"'2.weight' has shape \(1, 3\) in the checkpoint but \(2, 3\) in the model"),
        ({"bias": False}, "the checkpoint has '2.bias' but the model does not"),
        ({"dtype": torch.float32}, "'0.weight' has dtype torch.float64 in the checkpoint but torch.float32"),
    ],
    ids=["other-shape", "other-keys", "other-dtype"],
)
def test_checkpoint_of_another_model_is_refused_and_nothing_is_loaded(
    saved: Path, other_model: dict[str, Any], problem: str
) -> None:
    model = _make_model(seed=5, **other_model)
    optimizer = SCG(model.parameters(), hvp="finite-difference")
    optimizer.step(_closure(model, optimizer))
    before = _snapshot(model, optimizer)

    with pytest.raises(CheckpointError, match=f"another model: {problem}") as raised:
        restore(model, optimizer, load_checkpoint(saved), source=saved)

    assert str(saved) in str(raised.value)
    _assert_same(_snapshot(model, optimizer), before)


def test_check_model_state_names_the_first_missing_key() -> None:
    model = _make_model()
    state = model.state_dict()
    del state["0.bias"]
    with pytest.raises(CheckpointError, match="the model has '0.bias' but the checkpoint does not"):
        check_model_state(model, state, source="run.pt")


@pytest.mark.parametrize(
    ("make_optimizer", "problem"),
    [
        (lambda model: torch.optim.Adam(model.parameters()), "written by a moller_scg.scg.SCG optimizer, not a torch"),
        (
            lambda model: SCG([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]),
            "its optimizer has 1 parameter groups, this one has 2",
        ),
    ],
    ids=["other-class", "other-groups"],
)
def test_checkpoint_of_another_optimizer_is_refused_and_nothing_is_loaded(
    saved: Path, make_optimizer: Any, problem: str
) -> None:
    model = _make_model(seed=8)
    optimizer = make_optimizer(model)
    before = _snapshot(model, optimizer)

    with pytest.raises(CheckpointError, match=problem):
        restore(model, optimizer, load_checkpoint(saved), source=saved)

    _assert_same(_snapshot(model, optimizer), before)


def test_failure_inside_load_state_dict_leaves_model_optimizer_and_generators_unchanged(saved: Path) -> None:
    loaded = load_checkpoint(saved)
    # This passes the checks, so the model is loaded; then SCG.load_state_dict refuses it and the model is put back.
    del loaded["optimizer"]["scg"]
    model = _make_model(seed=8)
    optimizer = SCG(model.parameters(), hvp="finite-difference")
    before = _snapshot(model, optimizer)
    torch.manual_seed(11)
    expected_draw = torch.rand(4)
    torch.manual_seed(11)

    with pytest.raises(CheckpointError, match="loading it failed.*not an SCG state_dict.*nothing was changed"):
        restore(model, optimizer, loaded, source=saved)

    _assert_same(_snapshot(model, optimizer), before)
    assert torch.equal(torch.rand(4), expected_draw)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pipe.pt"
    os.mkfifo(path)  # open() would wait for a writer forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path)
