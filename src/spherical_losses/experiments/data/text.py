"""Word-level text corpora (Penn Treebank, any three text files) and token streams."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._common import _OFFICIAL_COUNTS, _PTB_FILES, DataError, PathLike, _locate, resolve_data_dir

__all__ = [
    "Corpus",
    "batchify",
    "bptt_batches",
    "load_ptb",
    "load_text_corpus",
    "zipf_token_stream",
]

EOS = "<eos>"
UNK = "<unk>"


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
        1-D int64 token-id streams with an ``<eos>`` after each line (``test`` is ``None``
        when the corpus was loaded without its test split).
    """

    vocab: list[str]
    index: dict[str, int]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor | None


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
    with_test: bool = True,
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
    with_test : bool
        Whether to read the test file; without it, the file is neither needed nor opened,
        and ``Corpus.test`` is ``None`` (the vocabulary may then lack an ``<unk>`` that
        only test words would have needed).

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
    paths = [Path(folder) / name for name in names[: 3 if with_test else 2]]
    if not all(path.is_file() for path in paths):
        raise DataError(
            "Text corpus not found. Put these plain-text files in place:\n"
            + "\n".join(f"    {path}" for path in paths)
        )
    train, *others = (_read_lines(path) for path in paths)
    vocab = _build_vocab(train, others, vocab_size)
    index = {word: i for i, word in enumerate(vocab)}
    unk = index.get(UNK, -1)  # only looked up for unknown words, when <unk> is in vocab

    def encode(lines: list[list[str]]) -> torch.Tensor:
        return torch.tensor([index.get(w, unk) for line in lines for w in line], dtype=torch.int64)

    test = encode(others[1]) if with_test else None
    return Corpus(vocab, index, encode(train), encode(others[0]), test)


def load_ptb(
    root: PathLike | None = None, vocab_size: int | None = None, with_test: bool = True
) -> Corpus:
    """Load the Penn Treebank language-modelling corpus (Mikolov's version).

    Parameters
    ----------
    root : str or os.PathLike, optional
        Data directory, resolved with :func:`resolve_data_dir`; the files are
        ``<root>/ptb/ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``.
    vocab_size, with_test
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
    paths = _locate("ptb", resolve_data_dir(root), with_test)
    corpus = load_text_corpus(paths[0].parent, _PTB_FILES, vocab_size, with_test)
    # After parsing, so that a corrupt file is reported without a warning; counted in tokens
    # (not bytes), so that a copy with other line endings is the same corpus.
    found = [len(split) for split in (corpus.train, corpus.valid, corpus.test) if split is not None]
    for path, count, expected in zip(paths, found, _OFFICIAL_COUNTS["ptb"], strict=False):
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
