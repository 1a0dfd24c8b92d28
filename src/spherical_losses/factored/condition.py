"""The bounds on the singular values of ``U`` kept by the factored layer, and the record of
the sync-free steps (``docs/factored-update.md`` §6 and §7).

Only ``V``'s rows are rounded, and their rounding errors reach ``W`` amplified by the
condition number of ``U``: the layer keeps upper and lower bounds on ``U``'s singular values,
on the host after an eager step and in a small float64 record on the device after a sync-free
one, and repairs the factorization when they leave their range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .update import NonFiniteUpdateError

if TYPE_CHECKING:
    from .layer import _Session

__all__ = ["SCALE_LIMIT", "ConditionBook"]

# Singular values of U are kept in [2^-20, 2^20]; only overflow of V depends on this.
SCALE_LIMIT = 2.0**20


class ConditionBook:
    """The part of :class:`~.layer.FactoredSphericalLoss` that keeps the bounds on ``U``'s
    singular values (a base class of the layer, which provides the attributes below).
    """

    _session: _Session
    U: Tensor
    U_inv: Tensor
    V: Tensor
    max_condition: float
    repair: Any  # the layer's method

    def _bound_condition(self, sm_hi: float, sm_lo: float) -> None:
        """Updates the bounds on ``U``'s singular values for ``U' = U M``, where ``M``'s lie in
        ``[sm_lo, sm_hi]``. When the bounds leave the allowed range, first takes the exact
        singular values (and recomputes ``U⁻¹``), and repairs only if those are out of range
        (``docs/factored-update.md`` §7).
        """
        hi, lo = self._sigma()
        if not self._sigma_in_range(hi * sm_hi, lo * sm_lo, 1.0):
            # The bounds may be loose: look at the exact singular values before repairing.
            sigma = torch.linalg.svdvals(self.U)
            hi, lo = sigma[0].item(), sigma[-1].item()
            if self._sigma_in_range(hi, lo, 4.0):
                self.U_inv.copy_(torch.linalg.inv(self.U))  # clears the rounding drift of U⁻¹
                self._session.state_version += 1
            else:
                self.repair()
                hi, lo = 1.0, 1.0
        self._set_sigma(hi * sm_hi, lo * sm_lo)

    def _sigma_in_range(self, hi: Any, lo: Any, margin: float) -> Any:
        """Whether singular values in ``[lo, hi]`` are within range, with a safety ``margin``
        (floats: a bool; 0-dim tensors, as the sync-free step has them: a boolean tensor).
        """
        return (
            (lo > 0)
            & (hi * margin <= self.max_condition * lo)
            & (hi * margin <= SCALE_LIMIT)
            & (lo >= margin / SCALE_LIMIT)
        )

    def _sigma(self) -> tuple[float, float]:
        """The bounds on ``U``'s singular values, read from the book when a sync-free step
        changed them (a synchronization, at an eager point: a state_dict, a copy, a move, an
        eager step after sync-free ones).
        """
        session = self._session
        if session.book_fresh:
            assert session.book is not None
            hi, lo = session.book[:2].tolist()
            session.sigma, session.book_fresh = (hi, lo), False
        return session.sigma

    def _set_sigma(self, hi: float, lo: float) -> None:
        """Sets the bounds, on the host and in the book (without waiting for the device)."""
        session = self._session
        session.sigma = (hi, lo)
        if session.book is not None:
            session.book[0].fill_(hi)
            session.book[1].fill_(lo)

    def _scale_sigma(self, factor: float) -> None:
        """Multiplies the bounds by ``factor`` (``W ← a W``: ``|a|``), wherever they are."""
        session = self._session
        hi, lo = session.sigma
        session.sigma = (hi * factor, lo * factor)
        if session.book is not None:
            session.book[:2].mul_(factor)

    def _book(self) -> Tensor:
        """The sync-free steps' book on V's device, float64 ``(5,)``: the bounds on ``U``'s
        largest and smallest singular values, the count of sync-free steps, and the number of
        the first step whose update was not finite, and of the first that left the bounds out
        of range (``-1``: none since the last :meth:`_settle`). Made once, from the host's
        bounds (one copy to the device).
        """
        session = self._session
        book = session.book
        if book is None or book.device != self.V.device:
            with torch.inference_mode(False):  # a normal tensor, changed outside steps too
                book = torch.tensor(
                    [*self._sigma(), 0.0, -1.0, -1.0], dtype=torch.float64, device=self.V.device
                )
            session.book, session.book_fresh = book, False
        return book

    def _book_step(self, ok: Tensor, sm_hi: Tensor, sm_lo: Tensor) -> None:
        """Records a sync-free step in the book, on the device: where ``ok`` (the update was
        finite and applied), the bounds times ``M``'s (``sm_hi``, ``sm_lo``); the step's number
        if it is the first not ``ok``, or the first whose bounds leave the range.
        """
        book = self._book()
        bounds = book[:2]
        new = bounds * torch.stack([sm_hi, sm_lo])
        in_range = self._sigma_in_range(new[0], new[1], 1.0)
        bounds.copy_(torch.where(ok, new, bounds))
        book[2].add_(1.0)
        first = book[3:]
        events = torch.stack([~ok, ok & ~in_range])
        first.copy_(torch.where(events & (first < 0), book[2], first))
        self._session.book_fresh = True

    def _settle(self) -> None:
        """The deferred checks of the sync-free steps, at an eager point (one synchronization:
        one read of the book). When a step left the bounds on ``U``'s singular values out of
        range, does now what an eager step does at once (:meth:`_bound_condition`: the exact
        singular values, then a new ``U⁻¹`` or a :meth:`repair`); then raises
        :class:`NonFiniteUpdateError` when a step's update was not finite (that step was not
        applied; the later ones were).
        """
        session = self._session
        if not session.book_fresh:
            return
        assert session.book is not None
        hi, lo, steps, bad, out = session.book.tolist()
        session.sigma, session.book_fresh = (hi, lo), False
        session.book[3:].fill_(-1.0)
        if out >= 0:
            self._bound_condition(1.0, 1.0)
        if bad >= 0:
            raise NonFiniteUpdateError(
                f"FactoredSGD: the update of sync-free step {int(bad)} (counting this layer's "
                "sync-free steps from 1) was not finite (the loss or the input overflowed, or "
                f"M = aI - J was singular); that update was not applied, the {int(steps - bad)} "
                "later ones were"
            )
