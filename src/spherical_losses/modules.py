"""``nn.Module`` wrappers: each holds its options and calls the functional form."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import Tensor, nn

from . import _conventions as conventions
from . import family
from . import functional as F
from .family import Member

# The named modules are appended as they are made, at the end.
__all__ = ["ProbabilityMap", "SphericalLoss"]


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


# --------------------------------------------------------------------------------------------
# the named modules, made from the registry (family.register)


class ProbabilityMap(nn.Module):
    """Base of the probability-map modules (:class:`TaylorSoftmax`, ...): holds ``dim`` and the
    member's options, checked when the module is created, and calls the functional form.
    """

    function: Callable[..., Tensor]

    def __init__(self, dim: int, options: dict[str, object]) -> None:
        super().__init__()
        self.dim = dim
        self.options = options
        for key, value in options.items():
            setattr(self, key, value)

    def forward(self, input: Tensor) -> Tensor:
        return type(self).function(input, self.dim, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {"dim": self.dim, **self.options}.items())


_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD


def _publish(
    name: str,
    base: type[nn.Module],
    parameters: list[inspect.Parameter],
    build: Callable[[nn.Module, dict[str, object]], None],
    doc: str,
) -> None:
    """Makes the module class ``name``: its ``__init__`` takes ``parameters`` (bound as Python
    binds them, when the module is created) and hands them to ``build``.
    """
    signature = inspect.Signature(parameters)

    def __init__(self: nn.Module, *args: object, **kwargs: object) -> None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{name}(): {error}") from None
        bound.apply_defaults()
        build(self, bound.arguments)

    __init__.__qualname__ = f"{name}.__init__"
    __init__.__doc__ = f"See :class:`{name}`."
    __init__.__signature__ = inspect.Signature([_SELF, *parameters], return_annotation=None)  # type: ignore[attr-defined]
    globals()[name] = type(
        name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__}
    )
    __all__.append(name)


def _loss_module(registration: family.Registration) -> None:
    if not (name := registration.loss_module):
        return
    cls = registration.member
    common = list(inspect.signature(SphericalLoss.__init__, eval_str=True).parameters.values())
    common = [p for p in common if p.name not in ("self", "member")]
    options = [p.replace(kind=_POSITIONAL) for p in registration.options()]

    def build(self: nn.Module, arguments: dict[str, object]) -> None:
        member = cls(**{p.name: arguments[p.name] for p in options})
        SphericalLoss.__init__(self, member, *(arguments[p.name] for p in common))  # type: ignore[arg-type]

    doc = F.describe(
        registration,
        f"The loss of :class:`~spherical_losses.family.{cls.__name__}` as a module; see "
        f":func:`~spherical_losses.{registration.loss_function}`.",
        "weight, ignore_index, reduction, label_smoothing\n    As for "
        f":class:`torch.nn.CrossEntropyLoss`{F.no_smoothing_note(cls)}; checked when the loss "
        "is created.",
        tuple(p.name for p in options),
        "Shape\n-----\n" + _LOSS_SHAPE,
    )
    _publish(name, SphericalLoss, common + options, build, doc)


def _softmax_module(registration: family.Registration) -> None:
    if not (name := registration.softmax_module):
        return
    cls = registration.member
    names = registration.softmax_options
    dim = inspect.Parameter("dim", _POSITIONAL, default=-1, annotation=int)
    options = [p.replace(kind=_POSITIONAL) for p in registration.options() if p.name in names]

    def build(self: nn.Module, arguments: dict[str, object]) -> None:
        member_options = {n: arguments[n] for n in names}
        cls(**member_options)  # checks the options now
        ProbabilityMap.__init__(self, arguments["dim"], member_options)  # type: ignore[arg-type]

    fn = registration.softmax_function
    doc = F.describe(
        registration,
        f"The class probabilities of :class:`~spherical_losses.family.{cls.__name__}` along "
        f"``dim``, as a module; see :func:`~spherical_losses.{fn}`.",
        "dim : int\n    The class dimension, as for :class:`torch.nn.Softmax`.",
        names,
        "Shape\n-----\ninput and output of any shape, the same.",
    )
    _publish(name, ProbabilityMap, [dim, *options], build, doc)
    globals()[name].function = staticmethod(getattr(F, fn))


_LOSS_SHAPE = (
    "input ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; target ``()``, ``(N)`` or\n"
    "``(N, d1, ..., dK)`` of class indices, or class probabilities of the input's shape;\n"
    "output a scalar, or the target's shape for ``reduction='none'``."
)

for _registration in family.registrations():
    _loss_module(_registration)
    _softmax_module(_registration)
del _registration
