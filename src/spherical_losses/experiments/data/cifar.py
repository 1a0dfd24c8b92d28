"""CIFAR-10 and CIFAR-100, in their binary and python versions."""

from __future__ import annotations

import codecs
import io
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import (
    _CIFAR_PIXELS,
    _LAYOUTS,
    _OFFICIAL_COUNTS,
    COMPRESSION_SUFFIXES,
    DataError,
    PathLike,
    _check_labels,
    _locate,
    _read_all,
    _read_bytes,
    _replace_hint,
    resolve_data_dir,
)

__all__ = ["load_cifar10", "load_cifar100", "read_cifar10_batch"]


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
    task: str, root: PathLike | None, parse: Callable[[bytes, Path, bool], Any], with_test: bool
) -> dict[str, torch.Tensor]:
    paths = _locate(task, resolve_data_dir(root), with_test)
    binary = _is_binary_name(paths[0])
    parts = [parse(buf, path, binary) for buf, path in zip(_read_all(paths), paths, strict=True)]
    # After every file has parsed, so that a corrupt file is reported as such. A binary file
    # cut after a whole record parses, so another count there is an error; a pickle cannot be
    # cut silently, so another count there is another dataset, loaded with a warning.
    for (_, labels), path, expected in zip(parts, paths, _OFFICIAL_COUNTS[task], strict=False):
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
    if not with_test:
        train_x, train_y = _to_tensors(parts)
        return {"train_x": train_x, "train_y": train_y}
    train_x, train_y = _to_tensors(parts[:-1])
    test_x, test_y = _to_tensors(parts[-1:])
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def load_cifar10(root: PathLike | None = None, with_test: bool = True) -> dict[str, torch.Tensor]:
    """Load CIFAR-10 from ``<root>/cifar10``.

    The binary version (``cifar-10-batches-bin/``) is read when all its files are
    present, else the python version (``cifar-10-batches-py/``).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.
    with_test : bool
        Whether to read the test split; without it, its file is neither needed nor opened
        and the dict has no ``test_*``.

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

    return _load_cifar("cifar10", root, parse, with_test)


def load_cifar100(root: PathLike | None = None, with_test: bool = True) -> dict[str, torch.Tensor]:
    """Load CIFAR-100 with its fine labels from ``<root>/cifar100``.

    The python version (``cifar-100-python/``) is read when both its files are
    present, else the binary version (``cifar-100-binary/``, whose records hold a
    coarse label byte, a fine label byte and 3072 pixel bytes).

    Parameters
    ----------
    root, with_test
        As for :func:`load_cifar10`.

    Returns
    -------
    dict of str to torch.Tensor
        As :func:`load_cifar10`'s, with fine labels (int64, 0–99).

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

    return _load_cifar("cifar100", root, parse, with_test)
