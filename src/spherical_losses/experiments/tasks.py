"""Tasks: each is its data, its model and its metric; one training loop serves them all.

A task yields minibatches already split for this process (``rank`` of ``world``) so that
``world`` processes with a global batch of ``B`` see exactly what one process with ``B`` sees.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import data
from .models import ConvNet, LSTMBody, ResNet

__all__ = ["PAPER_RESULTS", "PROFILES", "Settings", "Task", "make_task", "task_names"]


@dataclass(frozen=True)
class Settings:
    """A task's training settings; a profile fixes them and the command line overrides them."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    schedule: str = "cosine"  # 'cosine', or 'step:E:F' (×F every epoch from E on), or 'none'
    clip: float = 0.0  # gradient-norm clipping, 0 = none
    bptt: int = 35
    model: dict[str, Any] = field(default_factory=dict)
    train_limit: int = 0  # use only the first examples/tokens of the training set (0 = all)

    def replace(self, **changes: Any) -> Settings:
        known = {f.name for f in fields(self)}
        bad = sorted(set(changes) - known)
        if bad:
            raise ValueError(
                f"unknown setting(s) {', '.join(bad)}; expected {', '.join(sorted(known))}"
            )
        return replace(self, **changes)

    def lr_factor(self, epoch: int) -> float:
        """Learning-rate multiplier during ``epoch`` (0-based)."""
        kind, *args = self.schedule.split(":")
        if kind == "none":
            return 1.0
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if kind == "step":
            start, factor = int(args[0]), float(args[1])
            return factor ** max(0, epoch - start + 1)
        raise ValueError(f"unknown schedule {self.schedule!r}; expected cosine, step:E:F or none")


# Profiles. 'cpu': one run in at most 15 minutes on 2 cores (30 for CIFAR). 'paper': the
# paper-scale settings, for a GPU.
_CPU_CIFAR = Settings(epochs=12, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4)
PROFILES: dict[str, dict[str, Settings]] = {
    "cpu": {
        "mnist": Settings(epochs=4, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4),
        "cifar10": _CPU_CIFAR.replace(model={"blocks_per_stage": 1, "width": 16}),
        "cifar100": _CPU_CIFAR.replace(model={"blocks_per_stage": 1, "width": 32}),
        "ptb": Settings(
            epochs=6,
            batch_size=20,
            lr=20.0,
            schedule="step:4:0.25",
            clip=0.25,
            bptt=35,
            model={"hidden": 200, "layers": 2, "dropout": 0.2},
        ),
    },
    "paper": {
        # lr 0.02, not the cpu profile's 0.05: at this width 0.05 sent log-softmax to a
        # constant prediction within 100 steps in 1 of 3 seeds on a CPU, as in 1 of 2 on a GPU
        # (results/README.md).
        "mnist": Settings(
            epochs=30,
            batch_size=128,
            lr=0.02,
            momentum=0.9,
            weight_decay=5e-4,
            model={"width": 64, "features": 512},
        ),
        "cifar10": Settings(epochs=160, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "cifar100": Settings(epochs=160, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4),
        "ptb": Settings(
            epochs=39,
            batch_size=20,
            lr=1.0,
            schedule="step:6:0.8",
            clip=5.0,
            bptt=35,
            model={"hidden": 650, "layers": 2, "dropout": 0.5, "init": 0.05},
        ),
    },
}

# The paper's Table (de Brébisson & Vincent 2016): test error (%) or test perplexity.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "mnist": {"log_softmax": 0.812, "taylor": 0.785, "spherical": 0.828},
    "cifar10": {"log_softmax": 8.52, "taylor": 8.07, "spherical": 8.37},
    "cifar100": {"log_softmax": 32.4, "taylor": 33.1, "spherical": 33.1},
    "ptb": {"log_softmax": 126.7, "taylor": 147.2, "spherical": 149.2},
}


class Task:
    """A task: data, a model body (features), the number of classes and the metrics.

    Built with ``holdout=True`` (what ``tune`` does), a task evaluates on a validation split
    held out from its training data (or the corpus's own), and never loads its test split.
    """

    name: ClassVar[str]
    model_class: ClassVar[type[nn.Module]]
    recurrent: ClassVar[bool] = False
    headline: ClassVar[str] = "test_error"  # the metric a report tabulates (lower is better)
    topk: ClassVar[tuple[int, ...]] = (1,)
    num_classes: int

    def build_body(self, settings: Settings) -> nn.Module:
        raise NotImplementedError

    def train_batches(
        self, settings: Settings, epoch: int, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def eval_batches(self, settings: Settings, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def splits(self) -> tuple[str, ...]:
        return ("test",)

    def metric(self, split: str) -> str:
        """The metric to minimize on ``split`` (the headline's, e.g. ``valid_error``)."""
        return self.headline.replace("test_", f"{split}_", 1)


def _shard(batch: Tensor, rank: int, world: int) -> Tensor:
    if len(batch) % world:
        raise ValueError(
            f"the global batch size {len(batch)} must be divisible by the {world} processes"
        )
    per = len(batch) // world
    return batch[rank * per : (rank + 1) * per]


class _ImageTask(Task):
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    augment: ClassVar[bool] = False
    holdout_size: ClassVar[int]  # the validation split: the last images of the training set

    # The loader: ``(root, with_test) -> {"train_x", "train_y", "test_x", "test_y"}``.
    load: ClassVar[Callable[..., dict[str, Tensor]]]

    def __init__(self, root: Path, holdout: bool = False) -> None:
        arrays = self.load(root, with_test=not holdout)
        train_x, train_y = arrays["train_x"], arrays["train_y"]
        if holdout:
            # (a fifth of a training set too small for the official size: test fixtures)
            n = min(self.holdout_size, len(train_y) // 5)
            self.eval_sets = {"valid": (train_x[-n:], train_y[-n:])}
            train_x, train_y = train_x[:-n], train_y[:-n]
        else:
            self.eval_sets = {"test": (arrays["test_x"], arrays["test_y"])}
        self.train_x, self.train_y = train_x, train_y
        self._mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std).view(1, -1, 1, 1)

    def build_body(self, settings: Settings) -> nn.Module:
        return self.model_class(**settings.model)

    def _normalize(self, x: Tensor) -> Tensor:
        return (x.float() / 255.0 - self._mean) / self._std

    def _crop_and_flip(self, x: Tensor, g: torch.Generator) -> Tensor:
        # The standard CIFAR augmentation: pad 4, random 32×32 crop, random horizontal flip.
        # Offsets are drawn for the whole global batch so every process agrees.
        n, _, h, w = x.shape
        padded = nn.functional.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n,), generator=g)
        dx = torch.randint(0, 9, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        idx_n = torch.arange(n)[:, None, None, None]
        idx_c = torch.arange(x.shape[1])[None, :, None, None]
        return padded[idx_n, idx_c, rows, cols]

    def train_batches(
        self, settings: Settings, epoch: int, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n = (
            len(self.train_y)
            if not settings.train_limit
            else min(settings.train_limit, len(self.train_y))
        )
        order = torch.randperm(n, generator=g)
        b = settings.batch_size
        for i in range(n // b):  # the last partial batch is dropped
            idx = order[i * b : (i + 1) * b]
            x = self.train_x[idx]
            if self.augment:
                x = self._crop_and_flip(x, g)
            yield _shard(self._normalize(x), rank, world), _shard(self.train_y[idx], rank, world)

    def splits(self) -> tuple[str, ...]:
        return tuple(self.eval_sets)

    def eval_batches(self, settings: Settings, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        if split not in self.eval_sets:
            raise ValueError(
                f"task {self.name!r} has only a {self.splits()[0]!r} split, got {split!r}"
            )
        x, y = self.eval_sets[split]
        step = 1000
        for i in range(0, len(y), step):
            yield self._normalize(x[i : i + step]), y[i : i + step]


class MNIST(_ImageTask):
    name = "mnist"
    model_class = ConvNet
    mean = (0.1307,)
    std = (0.3081,)
    holdout_size = 10_000
    num_classes = 10
    load = staticmethod(data.load_mnist)


class CIFAR10(_ImageTask):
    name = "cifar10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    augment = True
    model_class = ResNet
    holdout_size = 5_000
    num_classes = 10
    load = staticmethod(data.load_cifar10)


class CIFAR100(CIFAR10):
    name = "cifar100"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    topk = (1, 5)
    num_classes = 100
    load = staticmethod(data.load_cifar100)


class LanguageModel(Task):
    """Word-level language modelling over a token stream, with truncated BPTT."""

    name = "ptb"
    recurrent = True
    headline = "test_perplexity"
    topk = (1, 10)
    model_class = LSTMBody

    def __init__(self, corpus: data.Corpus, name: str = "ptb") -> None:
        self.name = name  # type: ignore[misc]
        self.corpus = corpus
        self.num_classes = len(corpus.vocab)
        # (a corpus loaded without its test split is the tuning's: its own valid split only)
        self._splits = ("valid", "test") if corpus.test is not None else ("valid",)

    def build_body(self, settings: Settings) -> nn.Module:
        return LSTMBody(self.num_classes, **settings.model)

    def splits(self) -> tuple[str, ...]:
        return self._splits

    def train_batches(
        self, settings: Settings, epoch: int, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        stream = self.corpus.train
        if settings.train_limit:
            stream = stream[: settings.train_limit]
        columns = data.batchify(stream, settings.batch_size)
        columns = _shard(columns.t(), rank, world).t()
        yield from data.bptt_batches(columns, settings.bptt)

    def eval_batches(self, settings: Settings, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        if split not in self._splits:
            raise ValueError(
                f"task {self.name!r} has splits {' and '.join(map(repr, self._splits))}, "
                f"got {split!r}"
            )
        columns = data.batchify(getattr(self.corpus, split), 10)
        yield from data.bptt_batches(columns, settings.bptt)


_TASKS: dict[str, type[Task]] = {
    "mnist": MNIST,
    "cifar10": CIFAR10,
    "cifar100": CIFAR100,
    "ptb": LanguageModel,
    "text": LanguageModel,
}


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def headline(task: str) -> str:
    """The metric a report tabulates for ``task`` (lower is better)."""
    return _TASKS[task].headline if task in _TASKS else Task.headline


def model_options(task: str) -> list[str]:
    """The options of a task's model (what ``--model-opt`` accepts)."""
    params = inspect.signature(_TASKS[task].model_class).parameters
    return [p for p in params if p != "vocab_size"]


def make_task(
    name: str, data_dir: Path, vocab_size: int | None = None, holdout: bool = False
) -> Task:
    """Loads a task's data. ``text`` reads ``train.txt``/``valid.txt``/``test.txt`` from
    ``data_dir`` itself (any whitespace-tokenized corpus). ``holdout``: evaluate on a
    validation split (the last 10,000 MNIST training images, the last 5,000 of CIFAR, a
    corpus's own valid split) and leave the test split unread."""
    if name == "mnist":
        return MNIST(data_dir, holdout)
    if name == "cifar10":
        return CIFAR10(data_dir, holdout)
    if name == "cifar100":
        return CIFAR100(data_dir, holdout)
    with_test = not holdout
    if name == "ptb":
        return LanguageModel(data.load_ptb(data_dir, vocab_size, with_test), "ptb")
    if name == "text":
        corpus = data.load_text_corpus(data_dir, vocab_size=vocab_size, with_test=with_test)
        return LanguageModel(corpus, "text")
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(_TASKS)}")
