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

# The public names, and the private ones that tests/test_data.py reaches.
from ._common import _OFFICIAL_COUNTS as _OFFICIAL_COUNTS
from ._common import DATA_ENV_VAR, DataError, resolve_data_dir
from ._common import _replace_hint as _replace_hint
from .cifar import load_cifar10, load_cifar100, read_cifar10_batch
from .downloads import _SOURCES as _SOURCES
from .downloads import TASKS, download
from .downloads import _Resource as _Resource
from .mnist import load_mnist
from .text import Corpus, batchify, bptt_batches, load_ptb, load_text_corpus, zipf_token_stream

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
