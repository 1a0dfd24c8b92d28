"""What every reader shares: the data folder, the file layouts, locating and reading files,
and :class:`DataError`."""

from __future__ import annotations

import gzip
import lzma
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike[str]

#: Environment variable naming the data directory when none is given.
DATA_ENV_VAR = "SPHERICAL_LOSSES_DATA"

#: Accepted suffixes of MNIST and CIFAR files, in lookup order.
COMPRESSION_SUFFIXES = ("", ".gz", ".xz")


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
    from .downloads import _SOURCES  # (downloads.py reads the layouts above: a late import)

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


#: How many of a layout's ``names`` (the last ones) hold the test split.
_TEST_FILES = {"mnist": 2, "cifar10": 1, "cifar100": 1, "ptb": 1}


def _locate(task: str, root: Path, with_test: bool = True) -> list[Path]:
    """Return the files of the first complete layout of ``task``, in ``names`` order
    (without the test split's files, which are then neither needed nor opened, if not
    ``with_test``)."""
    _, compressed, layouts = _LAYOUTS[task]
    for layout in layouts:
        folder = root / task / layout.subdir
        names = layout.names if with_test else layout.names[: -_TEST_FILES[task]]
        paths = [_find(folder, name, compressed) for name in names]
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
