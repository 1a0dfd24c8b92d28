"""The spherical loss family for PyTorch.

Losses that depend on a network's outputs ``o`` only through ``s = Σ o_k``, ``q = Σ o_k²`` and
the target's ``o_c`` (de Brébisson & Vincent, ICLR 2016), with the conventions of
:func:`torch.nn.functional.cross_entropy`, and an exact ``O(d²)`` output layer for huge numbers
of classes.
"""

from __future__ import annotations

from . import family
from .factored import FactoredSGD, FactoredSphericalLoss, NonFiniteUpdateError
from .family import Member, SphericalMember, get_member, member_names
from .functional import (
    log_spherical_softmax,
    log_taylor_softmax,
    softmax_upper_bound_loss,
    spherical_cross_entropy,
    spherical_loss,
    spherical_mse_loss,
    spherical_softmax,
    taylor_cross_entropy,
    taylor_softmax,
    z_loss,
)
from .linear import LinearSphericalLoss, linear_spherical_loss
from .modules import (
    SoftmaxUpperBoundLoss,
    SphericalCrossEntropyLoss,
    SphericalLoss,
    SphericalMSELoss,
    SphericalSoftmax,
    TaylorCrossEntropyLoss,
    TaylorSoftmax,
    ZLoss,
)

__version__ = "0.1.0"

_MODULE_OPTIONS = ("weight", "ignore_index", "reduction", "label_smoothing")


def get_loss(name: str, **options: object) -> SphericalLoss:
    """A loss module by member name, as the experiment suite's ``--loss`` takes it.

    Parameters
    ----------
    name : str
        One of ``log_softmax``, ``taylor``, ``spherical``, ``softmax_bound``, ``z_loss``,
        ``mse``.
    **options
        The member's options (``eps``, ``order``, ``margin``, ``xi``, ``a``, ``b``) and the
        module's (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``).

    Examples
    --------
    >>> crit = get_loss("spherical", eps=0.01, reduction="sum")
    """
    module_opts = {k: v for k, v in options.items() if k in _MODULE_OPTIONS}
    member_opts = {k: v for k, v in options.items() if k not in _MODULE_OPTIONS}
    return SphericalLoss(get_member(name, **member_opts), **module_opts)  # type: ignore[arg-type]


__all__ = [
    "FactoredSGD",
    "FactoredSphericalLoss",
    "LinearSphericalLoss",
    "Member",
    "NonFiniteUpdateError",
    "SoftmaxUpperBoundLoss",
    "SphericalCrossEntropyLoss",
    "SphericalLoss",
    "SphericalMSELoss",
    "SphericalMember",
    "SphericalSoftmax",
    "TaylorCrossEntropyLoss",
    "TaylorSoftmax",
    "ZLoss",
    "family",
    "get_loss",
    "get_member",
    "linear_spherical_loss",
    "log_spherical_softmax",
    "log_taylor_softmax",
    "member_names",
    "softmax_upper_bound_loss",
    "spherical_cross_entropy",
    "spherical_loss",
    "spherical_mse_loss",
    "spherical_softmax",
    "taylor_cross_entropy",
    "taylor_softmax",
    "z_loss",
]
