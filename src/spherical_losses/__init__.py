"""The spherical loss family for PyTorch.

Losses that depend on a network's outputs ``o`` only through ``s = Σ o_k``, ``q = Σ o_k²`` and
the target's ``o_c`` (de Brébisson & Vincent, ICLR 2016), with the conventions of
:func:`torch.nn.functional.cross_entropy`, and an exact ``O(d²)`` output layer for huge numbers
of classes.

The named losses, probability maps and modules (``taylor_cross_entropy``,
``TaylorCrossEntropyLoss``, ``taylor_softmax``, ...) are made from the registry of members in
:mod:`spherical_losses.family`.
"""

from __future__ import annotations

from . import family, functional, modules
from .factored import FactoredSGD, FactoredSphericalLoss, NonFiniteUpdateError
from .family import Member, SphericalMember, get_member, member_names
from .functional import spherical_loss
from .linear import LinearSphericalLoss, linear_spherical_loss
from .modules import SphericalLoss

__version__ = "0.1.0"

_MODULE_OPTIONS = ("weight", "ignore_index", "reduction", "label_smoothing")


def get_loss(name: str, **options: object) -> SphericalLoss:
    return SphericalLoss(
        get_member(name, **{k: v for k, v in options.items() if k not in _MODULE_OPTIONS}),  # type: ignore[arg-type]
        **{k: v for k, v in options.items() if k in _MODULE_OPTIONS},  # type: ignore[arg-type]
    )


_OPTIONS = sorted({p.name for r in family.registrations() for p in r.options()})
get_loss.__doc__ = f"""A loss module by member name, as the experiment suite's ``--loss`` takes it.

    Parameters
    ----------
    name : str
        One of {", ".join(f"``{n}``" for n in member_names())}.
    **options
        The member's options ({", ".join(f"``{n}``" for n in _OPTIONS)}) and the
        module's (``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``).

    Examples
    --------
    >>> crit = get_loss("spherical", eps=0.01, reduction="sum")
    """

__all__ = [
    "FactoredSGD",
    "FactoredSphericalLoss",
    "LinearSphericalLoss",
    "Member",
    "NonFiniteUpdateError",
    "SphericalLoss",
    "SphericalMember",
    "family",
    "get_loss",
    "get_member",
    "linear_spherical_loss",
    "member_names",
    "spherical_loss",
]
# The named functions and modules, as generated from the registry.
for _name in (*functional.__all__, *modules.__all__):
    if _name not in __all__:
        globals()[_name] = getattr(functional if _name in functional.__all__ else modules, _name)
        __all__.append(_name)
del _name
