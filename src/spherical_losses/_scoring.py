"""Scoring every class of a large output layer a chunk of classes at a time.

The output layers that never form all their logits (:class:`~spherical_losses.LinearSphericalLoss`,
and the factored layer) still need them, a chunk of classes at a time, for inference: the
``k`` best classes of each example. The functions here take any source of logit chunks, so that
each layer supplies only how its logits are computed (``h Wᵀ + b`` for a plain weight).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

__all__ = ["check_chunk_size", "check_topk", "linear_logit_chunks", "topk_of_chunks"]

#: Classes per chunk when the caller gives none: an (N, chunk) block of logits at a time.
DEFAULT_CHUNK = 65536


def check_chunk_size(chunk_size: object) -> int:
    """``chunk_size`` as a positive int, or a ValueError naming it."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return chunk_size


def check_topk(k: object, num_classes: int, by: str, has_probabilities: bool, name: str) -> int:
    """Checks ``topk``'s ``k`` and ``by`` for a layer of ``num_classes`` classes whose loss is
    ``name``; returns ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        raise ValueError(f"k must be an integer in [1, {num_classes}], got {k!r}")
    if by not in ("logit", "probability"):
        raise ValueError(f"by must be 'logit' or 'probability', got {by!r}")
    if by == "probability" and not has_probabilities:
        raise ValueError(f"the {name!r} loss defines no class probabilities; use by='logit'")
    return k


def linear_logit_chunks(
    rows: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int
) -> Iterator[tuple[int, Tensor]]:
    """``(start, rows @ weight[start:start+chunk].T + bias[start:start+chunk])`` for each chunk
    of classes: ``rows`` (N, d), ``weight`` (D, d), ``bias`` (D) or None.
    """
    check_chunk_size(chunk_size)
    for start in range(0, weight.shape[0], chunk_size):
        w = weight[start : start + chunk_size]
        if bias is None:
            yield start, rows @ w.T
        else:
            yield start, torch.addmm(bias[start : start + chunk_size], rows, w.T)


def topk_of_chunks(
    chunks: Iterable[tuple[int, Tensor]],
    k: int,
    rows: int,
    *,
    score: Callable[[Tensor], Tensor] | None = None,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest scores of each row and their classes, over chunks of classes.

    Parameters
    ----------
    chunks : iterable of (int, Tensor)
        ``(start, logits)`` with ``logits`` of shape ``(rows, chunk)`` for the classes
        ``start, ..., start + chunk - 1``.
    k : int
        How many classes to keep per row.
    rows : int
        The number of rows ``N``.
    score : callable, optional
        Maps a chunk of logits to the scores ranked (default: the logits themselves).
    like : Tensor
        Gives the dtype and device of the (empty) starting values.

    Returns
    -------
    (values, indices) : tuple of Tensor
        ``(N, k)`` each, in decreasing order as :func:`torch.topk`. Memory is
        ``O(N·(chunk + k))``: the running top ``k`` is merged with each chunk's own.
    """
    values = like.new_empty(rows, 0)
    indices = torch.empty(rows, 0, dtype=torch.long, device=like.device)
    for start, logits in chunks:
        chunk = logits if score is None else score(logits)
        chunk_values, chunk_indices = chunk.topk(min(k, chunk.shape[1]), dim=1)
        values, order = torch.cat([values, chunk_values], dim=1).topk(
            min(k, values.shape[1] + chunk_values.shape[1]), dim=1
        )
        indices = torch.cat([indices, chunk_indices + start], dim=1).gather(1, order)
    return values, indices
