"""MNIST: the four IDX files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from ._common import (
    _IDX_IMAGES_MAGIC,
    _IDX_LABELS_MAGIC,
    _OFFICIAL_COUNTS,
    DataError,
    PathLike,
    _check_labels,
    _locate,
    _read_all,
    _replace_hint,
    resolve_data_dir,
)

__all__ = ["load_mnist"]


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


def load_mnist(root: PathLike | None = None, with_test: bool = True) -> dict[str, torch.Tensor]:
    """Load MNIST from the IDX files in ``<root>/mnist``.

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`.
    with_test : bool
        Whether to read the test split; without it, its files are neither needed nor opened
        (tuning selects settings on data that the final score never sees).

    Returns
    -------
    dict of str to torch.Tensor
        ``train_x`` and ``test_x`` (uint8, N×1×28×28), ``train_y`` and ``test_y``
        (int64, N); no ``test_*`` without ``with_test``.

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
    paths = _locate("mnist", resolve_data_dir(root), with_test)
    buffers = _read_all(paths)
    out: dict[str, torch.Tensor] = {}
    splits = (("train", 0), ("test", 2))[: len(paths) // 2]
    for split, i in splits:
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
    for (split, i), expected in zip(splits, _OFFICIAL_COUNTS["mnist"], strict=False):
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
