"""``nn.Module`` wrappers: each holds its options and calls the functional form."""

from __future__ import annotations

from torch import Tensor, nn

from . import _conventions as conventions
from . import family
from . import functional as F
from .family import Member

__all__ = [
    "SoftmaxUpperBoundLoss",
    "SphericalCrossEntropyLoss",
    "SphericalLoss",
    "SphericalMSELoss",
    "SphericalSoftmax",
    "TaylorCrossEntropyLoss",
    "TaylorSoftmax",
    "ZLoss",
]


class SphericalLoss(nn.Module):
    """The loss of any member of the family, as :class:`torch.nn.CrossEntropyLoss` is for
    log-softmax; see :func:`spherical_losses.functional.spherical_loss`.

    Parameters
    ----------
    member : Member or str
        A member of :mod:`spherical_losses.family`, a user-defined
        :class:`~spherical_losses.family.SphericalMember`, or a member's name.
    weight, ignore_index, reduction, label_smoothing
        As for :class:`torch.nn.CrossEntropyLoss`. Checked here, when the loss is created.

    Shape
    -----
    input ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; target ``()``, ``(N)`` or
    ``(N, d1, ..., dK)`` of class indices, or class probabilities of the input's shape;
    output a scalar, or the target's shape for ``reduction='none'``.
    """

    weight: Tensor | None

    def __init__(
        self,
        member: Member | str,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.member = family.get_member(member)
        conventions.check_reduction(reduction)
        conventions.check_label_smoothing(label_smoothing)
        if weight is not None:  # (its size is checked against the input's classes per call)
            conventions.check_weight(weight, weight.numel() if isinstance(weight, Tensor) else 0)
        if label_smoothing > 0 and not self.member.has_probabilities:
            raise ValueError(
                f"the {self.member.name!r} loss defines no class probabilities, so it takes "
                "no label_smoothing"
            )
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.spherical_loss(
            input,
            target,
            self.member,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"member={self.member!r}, reduction={self.reduction!r}"


class TaylorCrossEntropyLoss(SphericalLoss):
    """Log-Taylor softmax cross-entropy; see :func:`~spherical_losses.taylor_cross_entropy`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        order: int = 2,
        margin: float = 0.0,
    ) -> None:
        super().__init__(
            family.Taylor(order, margin), weight, ignore_index, reduction, label_smoothing
        )


class SphericalCrossEntropyLoss(SphericalLoss):
    """Log-spherical softmax cross-entropy; see
    :func:`~spherical_losses.spherical_cross_entropy`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        eps: float = 0.01,
    ) -> None:
        super().__init__(family.Spherical(eps), weight, ignore_index, reduction, label_smoothing)


class ZLoss(SphericalLoss):
    """Z-loss (de Brébisson & Vincent 2016); see :func:`~spherical_losses.z_loss`.

    Not the ``(log Z)²`` auxiliary penalty of language-model code.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        a: float = 1.0,
        b: float = 0.0,
    ) -> None:
        super().__init__(family.ZScore(a, b), weight, ignore_index, reduction, label_smoothing)


class SoftmaxUpperBoundLoss(SphericalLoss):
    """Spherical upper bound of softmax cross-entropy; see
    :func:`~spherical_losses.softmax_upper_bound_loss`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        xi: float | None = None,
    ) -> None:
        super().__init__(family.SoftmaxBound(xi), weight, ignore_index, reduction, label_smoothing)


class SphericalMSELoss(SphericalLoss):
    """Squared error to the one-hot target; see :func:`~spherical_losses.spherical_mse_loss`."""

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(family.SquaredError(), weight, ignore_index, reduction, label_smoothing)


class TaylorSoftmax(nn.Module):
    """Taylor softmax along ``dim``; see :func:`~spherical_losses.taylor_softmax`."""

    def __init__(self, dim: int = -1, order: int = 2) -> None:
        super().__init__()
        family.Taylor(order)  # checks the order now
        self.dim = dim
        self.order = order

    def forward(self, input: Tensor) -> Tensor:
        return F.taylor_softmax(input, self.dim, self.order)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, order={self.order}"


class SphericalSoftmax(nn.Module):
    """Spherical softmax along ``dim``; see :func:`~spherical_losses.spherical_softmax`."""

    def __init__(self, dim: int = -1, eps: float = 0.01) -> None:
        super().__init__()
        family.Spherical(eps)  # checks eps now
        self.dim = dim
        self.eps = eps

    def forward(self, input: Tensor) -> Tensor:
        return F.spherical_softmax(input, self.dim, self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"
