"""The loss family, each member defined once.

A loss on the ``D`` outputs ``o`` of one example with target class ``c`` is *spherical* when it
depends on ``o`` only through

* ``s = Σ_k o_k`` (the sum),
* ``q = Σ_k o_k²`` (the squared norm), and
* ``o_c`` (the target's output).

A spherical member is therefore a function ``L(s, q, o_c, D)``. With its partial derivatives
``α = ∂L/∂s``, ``β = ∂L/∂q`` and ``γ = ∂L/∂o_c`` the whole gradient is

    ∂L/∂o = α·1 + 2β·o + γ·e_c,

which is all either engine needs: the dense engine (:mod:`spherical_losses.functional`) computes
``(s, q, o_c)`` from the logits, and the factored engine (:mod:`spherical_losses.factored`)
computes them from a factored weight in ``O(d²)`` without ever forming ``o``.

A new member is a subclass of :class:`SphericalMember` with a :meth:`~SphericalMember.loss`
written with torch operations; the partial derivatives then come from autograd on ``O(N)``
tensors. Built-in members override :meth:`~SphericalMember.loss_and_partials` with closed forms.

A built-in member is one class here and one :func:`register` call that names its public
functions and modules (``taylor_cross_entropy``, ``TaylorCrossEntropyLoss``, ...): the
functional wrappers, the modules, ``__all__``, :func:`spherical_losses.get_loss`, the tests and
the benchmarks all read :func:`registrations`.

Members that are not spherical (``LogSoftmax``, Taylor of order > 2) work with the dense engine
only; they say so with ``spherical = False``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from . import _kernels as kernels
from ._conventions import is_traced, reads_values


class Member:
    """Base of every member of the family.

    Attributes
    ----------
    name : str
        The name used by :func:`get_member` and the command line.
    spherical : bool
        Whether the loss depends on the outputs only through ``(s, q, o_c, D)``; only such
        members work with :class:`~spherical_losses.FactoredSphericalLoss`.
    has_probabilities : bool
        Whether the member defines a probability for every class (then it accepts
        class-probability targets and ``label_smoothing``).
    uses_sum : bool
        Whether the loss depends on ``s`` (``α = ∂L/∂s`` not identically 0); ``False`` lets the
        dense engine skip the ``α·1`` term of the gradient without looking at ``α``.
    margin : float
        The soft margin on the target's output (0 for members that take none); a margin needs
        class-index targets and no label smoothing.
    """

    name: ClassVar[str] = "member"
    spherical: ClassVar[bool] = False
    has_probabilities: ClassVar[bool] = False
    uses_sum: ClassVar[bool] = True
    margin: float = 0.0

    def options(self) -> dict[str, float | int | None]:
        """The member's options, as given to its constructor."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options() == other.options()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.options().items())))

    def log_probs(self, input: Tensor, dim: int = -1) -> Tensor:
        """Log-probabilities of every class along ``dim`` (members with probabilities)."""
        raise ValueError(f"the {self.name!r} loss defines no class probabilities")

    def dense_loss(self, input: Tensor, target: Tensor) -> Tensor:
        """Per-example loss of a non-spherical member: ``input`` (N, C), ``target`` (N,)."""
        raise NotImplementedError

    def native_loss(
        self,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> Tensor | None:
        """The whole loss from a PyTorch function with the same conventions, or ``None`` (the
        default) to let the dense engine compute it from :meth:`dense_loss` or the partials.

        Arguments as :func:`spherical_losses.spherical_loss`, already checked; half precision
        is to be computed in float32 (:func:`compute_dtype`).
        """
        return None


class SphericalMember(Member):
    """A spherical loss: a function of ``(s, q, o_c, D)`` per example.

    Subclasses implement :meth:`loss`. The partial derivatives default to autograd through
    :meth:`loss` on the per-example statistics (cheap: ``O(N)``); override
    :meth:`loss_and_partials` with closed forms where speed matters.

    Examples
    --------
    A user-defined member (here a scaled squared error) works with both engines:

    >>> class Scaled(SphericalMember):
    ...     name = "scaled_mse"
    ...     def loss(self, s, q, oc, D):
    ...         return 0.5 * (q - 2 * oc + 1)
    """

    spherical: ClassVar[bool] = True

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        """Per-example loss from the statistics, each of shape ``(N,)``."""
        raise NotImplementedError

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-example ``(L, ∂L/∂s, ∂L/∂q, ∂L/∂o_c)``, each of shape ``(N,)``."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in (s, q, oc)):
            # (A second derivative is being taken: partials that are differentiable too.)
            value = self.loss(s, q, oc, D)
            alpha, beta, gamma = torch.autograd.grad(
                value.sum(), (s, q, oc), create_graph=True, allow_unused=True,
                materialize_grads=True,
            )  # fmt: skip
            return value, alpha, beta, gamma
        with torch.enable_grad():
            s_, q_, oc_ = (t.detach().requires_grad_(True) for t in (s, q, oc))
            value = self.loss(s_, q_, oc_, D)
            alpha, beta, gamma = torch.autograd.grad(
                value.sum(), (s_, q_, oc_), allow_unused=True, materialize_grads=True
            )
        return value.detach(), alpha, beta, gamma

    def target_log_prob(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        """Exact ``log p_c`` from the statistics (members with probabilities)."""
        raise ValueError(f"the {self.name!r} loss defines no class probabilities")

    def dense_loss(self, input: Tensor, target: Tensor) -> Tensor:
        s, q, oc = statistics(input, target)
        return self.loss(s, q, oc, input.shape[-1])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def statistics(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, q, o_c)`` of logits ``input`` (N, C) for class indices ``target`` (N,)."""
    s = input.sum(dim=-1)
    # A norm reduction reads the logits once and allocates no (N, C) temporary.
    q = torch.linalg.vector_norm(input, dim=-1).square()
    oc = input.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return s, q, oc


# --------------------------------------------------------------------------------------------
# the registry: the one list of built-in members and of the public names made from them


@dataclass(frozen=True)
class Registration:
    """A built-in member and the public functions and modules made from it.

    :mod:`spherical_losses.functional` and :mod:`spherical_losses.modules` generate each named
    object, with its signature and a docstring built from the member's.

    Attributes
    ----------
    member : type[Member]
        The member's class; its constructor's parameters are the member's options.
    loss_function : str or None
        The functional loss, ``(input, target, weight, ignore_index, reduction,
        label_smoothing, *options)``, e.g. ``"taylor_cross_entropy"``.
    loss_module : str or None
        The :class:`~spherical_losses.SphericalLoss` subclass, e.g. ``"TaylorCrossEntropyLoss"``.
    softmax_function : str or None
        The probability map ``(input, dim, *softmax_options)``, e.g. ``"taylor_softmax"``; its
        logarithm is ``"log_" + softmax_function``. Members with probabilities only.
    softmax_module : str or None
        The probability map's module, e.g. ``"TaylorSoftmax"``.
    softmax_options : tuple of str
        The options the probability maps take (a margin, for one, is for training only).
    """

    member: type[Member]
    loss_function: str | None = None
    loss_module: str | None = None
    softmax_function: str | None = None
    softmax_module: str | None = None
    softmax_options: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.member.name

    def options(self) -> list[inspect.Parameter]:
        """The member's options: its constructor's parameters, annotations evaluated."""
        return list(inspect.signature(self.member, eval_str=True).parameters.values())

    def documentation(self) -> tuple[str, dict[str, str]]:
        """The member's docstring as its description and ``{option: its Parameters entry}``."""
        doc = inspect.cleandoc(self.member.__doc__ or "")
        description, _, parameters = doc.partition("\nParameters\n----------\n")
        entries: dict[str, list[str]] = {}
        for line in parameters.splitlines():
            if line and not line[0].isspace():  # "name : type" opens an entry
                entries[line.partition(" :")[0].strip()] = [line]
            elif entries:
                next(reversed(entries.values())).append(line)
        return description.strip(), {k: "\n".join(v).rstrip() for k, v in entries.items()}


_REGISTRY: dict[str, Registration] = {}
_M = TypeVar("_M", bound=type[Member])


def register(
    loss_function: str | None = None, loss_module: str | None = None
) -> Callable[[_M], _M]:
    """Class decorator that registers a built-in member under its ``name``, with the names of
    its functional loss and its module (see :class:`Registration`).
    """

    def add(cls: _M) -> _M:
        if cls.name in _REGISTRY:
            raise ValueError(f"a member named {cls.name!r} is already registered")
        _REGISTRY[cls.name] = Registration(cls, loss_function, loss_module)
        return cls

    return add


def register_softmax(
    function: str, module: str, options: tuple[str, ...] = ()
) -> Callable[[_M], _M]:
    """Class decorator, above :func:`register`, that adds a registered member's probability
    map: its function, its module and the options they take (see :class:`Registration`).
    """

    def add(cls: _M) -> _M:
        if not cls.has_probabilities:
            raise ValueError(f"{cls.__name__} defines no probabilities, so no softmax")
        _REGISTRY[cls.name] = dataclasses.replace(
            _REGISTRY[cls.name],
            softmax_function=function,
            softmax_module=module,
            softmax_options=options,
        )
        return cls

    return add


def registrations() -> tuple[Registration, ...]:
    """Every built-in member's :class:`Registration`, in registration order."""
    return tuple(_REGISTRY.values())


def _positive(name: str, value: float, what: str) -> float:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what} {name} must be a finite number > 0, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# log-softmax: the baseline (not spherical; the dense engine delegates to F.cross_entropy)


@register()
class LogSoftmax(Member):
    """Ordinary softmax cross-entropy, the baseline. Not spherical."""

    name: ClassVar[str] = "log_softmax"
    has_probabilities: ClassVar[bool] = True

    def log_probs(self, input: Tensor, dim: int = -1) -> Tensor:
        return torch.log_softmax(input, dim=dim)

    def dense_loss(self, input: Tensor, target: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(input, target, reduction="none")

    def native_loss(self, input, target, weight, ignore_index, reduction, label_smoothing):
        # F.cross_entropy itself, so that the baseline is PyTorch's to the last bit (the
        # arguments as in Member.native_loss).
        dtype = compute_dtype(input.dtype)
        return torch.nn.functional.cross_entropy(
            input.to(dtype),
            target.to(dtype) if target.is_floating_point() else target,
            None if weight is None else weight.to(dtype),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )


# --------------------------------------------------------------------------------------------
# Taylor softmax


def taylor_polynomial_log(x: Tensor, order: int) -> Tensor:
    """``log f_n(x)`` with ``f_n(x) = Σ_{j≤n} x^j / j!`` for even ``n`` (so ``f_n > 0``).

    Evaluated as ``n·log M + log(f_n(x) / M^n)`` with ``M = max(1, |x|)`` so that no power
    overflows, whatever the order and the size of ``x``.
    """
    if order == 2:
        # 1 + x + x²/2 = ((1 + x)² + 1) / 2: positive terms, no cancellation; factoring out
        # (1 + x)² where it is large keeps the square from overflowing. Each branch sees its
        # own inputs only, so that neither overflows in the gradient (a NaN still reaches the
        # small one); the small one takes 1 + x itself, not |1 + x| (autograd takes the
        # derivative of |y| at 0 as 0, which made the second derivative 0, not 2, at x = −1).
        y = x + 1.0
        a = y.abs()
        big = a > 1.0
        ys = a.clamp(min=1.0)
        return torch.where(
            big,
            2.0 * torch.log(ys) + torch.log1p(torch.reciprocal(ys).square()),
            torch.log1p(torch.square(torch.where(big, 0.0, y))),
        ) - math.log(2.0)
    m = x.abs().clamp(min=1.0)
    u = x / m
    inv_m = 1.0 / m
    # Horner on Σ_j u^j · M^(j-n) / j!, from j = n down to 0.
    acc = torch.full_like(x, 1.0 / math.factorial(order))
    for j in range(order - 1, -1, -1):
        acc = acc * u + inv_m ** (order - j) / math.factorial(j)
    return torch.log(acc) + order * torch.log(m)


@register_softmax("taylor_softmax", "TaylorSoftmax", options=("order",))
@register("taylor_cross_entropy", "TaylorCrossEntropyLoss")
class Taylor(SphericalMember):
    """Log-Taylor softmax: ``p_k ∝ f_n(o_k)``, ``f_n(x) = Σ_{j≤n} x^j/j!`` (``n`` even).

    For ``n = 2``: ``L = −log(1 + o_c + o_c²/2) + log(D + s + q/2)``, spherical.
    Higher even orders are not spherical (dense engine only).

    Parameters
    ----------
    order : int
        Even order ``n ≥ 2`` of the Taylor expansion of ``exp``. Default 2.
    margin : float
        Soft margin ``m ≥ 0`` (Banerjee et al. 2020): the target's term uses
        ``f_n(o_c − m)`` in the numerator and in the normalizer. Training only: the class
        probabilities (:meth:`log_probs`) use no margin. For ``n = 2`` the loss stays
        spherical, since ``Σ_k f(o_k) − f(o_c) + f(o_c − m)`` depends on ``(s, q, o_c)`` only.
    """

    name: ClassVar[str] = "taylor"
    has_probabilities: ClassVar[bool] = True

    def __init__(self, order: int = 2, margin: float = 0.0) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or order < 2 or order % 2:
            raise ValueError(
                f"Taylor order must be an even integer >= 2 (odd orders can be negative), "
                f"got {order!r}"
            )
        margin = float(margin)
        if not (margin >= 0 and math.isfinite(margin)):
            raise ValueError(f"Taylor margin must be a finite number >= 0, got {margin!r}")
        self.order = order
        self.margin = margin

    @property
    def spherical(self) -> bool:  # type: ignore[override]
        return self.order == 2

    def options(self) -> dict[str, float | int | None]:
        return {"order": self.order, "margin": self.margin}

    def log_probs(self, input: Tensor, dim: int = -1) -> Tensor:
        logf = taylor_polynomial_log(input, self.order)
        return logf - torch.logsumexp(logf, dim=dim, keepdim=True)

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return self.loss_and_partials(s, q, oc, D)[0]

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self._require_spherical()
        # Few operations, mostly in place: the factored layer calls this once per step on
        # m-vectors, where each operation's overhead outweighs its arithmetic.
        m = self.margin
        y = oc + (1.0 - m)  # 1 + x, with x = o_c − m
        fx2 = y.square().add_(1.0)  # 2 f(x) = 2 (1 + x + x²/2) = 1 + (1 + x)²
        z2 = torch.add(q, s, alpha=2.0).add_(2.0 * D)  # 2 Σ_k f(o_k) = 2D + 2s + q
        if m:
            # Σ_k f(o_k) with the target's term f(o_c) replaced by f(o_c − m);
            # f(o_c) − f(o_c − m) = m (1 + o_c − m/2).
            z2 = z2.sub_(oc, alpha=2.0 * m).sub_(m * (2.0 - m))
        loss = torch.div(z2, fx2).log_()
        beta = z2.reciprocal()
        alpha = beta * 2.0
        gamma = torch.div(y, fx2).mul_(-2.0)
        if m:
            gamma = gamma.sub_(alpha, alpha=m)
        return loss, alpha, beta, gamma

    def target_log_prob(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        self._require_spherical()
        fx = 0.5 * (torch.square(oc + 1.0) + 1.0)
        return torch.log(fx) - torch.log(D + s + 0.5 * q)

    def dense_loss(self, input: Tensor, target: Tensor) -> Tensor:
        if self.spherical:
            return super().dense_loss(input, target)
        logf = taylor_polynomial_log(input, self.order)
        if self.margin:
            oc = input.gather(-1, target.unsqueeze(-1))
            logf = logf.scatter(
                -1, target.unsqueeze(-1), taylor_polynomial_log(oc - self.margin, self.order)
            )
        return torch.logsumexp(logf, dim=-1) - logf.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def _require_spherical(self) -> None:
        if not self.spherical:
            raise ValueError(
                f"Taylor softmax of order {self.order} is not spherical (only order 2 is); "
                "it has no (s, q, o_c) form and works with the dense losses only"
            )


# --------------------------------------------------------------------------------------------
# spherical softmax


@register_softmax("spherical_softmax", "SphericalSoftmax", options=("eps",))
@register("spherical_cross_entropy", "SphericalCrossEntropyLoss")
class Spherical(SphericalMember):
    """Log-spherical softmax: ``p_k = (o_k² + ε) / Σ_i (o_i² + ε)``.

    ``L = −log(o_c² + ε) + log(q + Dε)``.

    Parameters
    ----------
    eps : float
        ``ε > 0``, keeps every probability positive. Default 0.01 (the authors' code).
    """

    name: ClassVar[str] = "spherical"
    has_probabilities: ClassVar[bool] = True
    uses_sum: ClassVar[bool] = False

    def __init__(self, eps: float = 0.01) -> None:
        self.eps = _positive("eps", eps, "spherical softmax")

    def options(self) -> dict[str, float | int | None]:
        return {"eps": self.eps}

    def log_probs(self, input: Tensor, dim: int = -1) -> Tensor:
        # Dividing by the largest |o_k| first keeps o² from overflowing.
        scale = input.detach().abs().amax(dim=dim, keepdim=True).clamp(min=self.eps**0.5)
        num = torch.square(input / scale) + self.eps / torch.square(scale)
        return torch.log(num) - torch.log(num.sum(dim=dim, keepdim=True))

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return self.loss_and_partials(s, q, oc, D)[0]

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        num = torch.square(oc) + self.eps
        den = q + D * self.eps
        loss = torch.log(den) - torch.log(num)
        return loss, torch.zeros_like(s), 1.0 / den, -2.0 * oc / num

    def target_log_prob(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return torch.log(torch.square(oc) + self.eps) - torch.log(q + D * self.eps)


# --------------------------------------------------------------------------------------------
# spherical upper bound of log-softmax (Bouchard 2007 with the Jaakkola–Jordan bound)


def _jj_lambda(xi: Tensor) -> Tensor:
    """``λ(ξ) = tanh(ξ/2) / (4ξ)``, with its limit 1/8 at ξ = 0."""
    small = xi.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(xi), xi)
    return torch.where(small, 0.125 - xi * xi / 96.0, torch.tanh(safe / 2) / (4 * safe))


def _implicit_xi(xi: Tensor, v: Tensor, D: int) -> Tensor:
    """``ξ*`` (the root of ``G(ξ) = ξ²·(4(D−1) − (D−2)²/sinh²(ξ/2)) − D·v``, found without
    autograd) with its derivative in ``v`` by the implicit function theorem,
    ``dξ*/dv = D / G'(ξ*)``: the value is ``xi`` itself. The first derivatives of the bound
    need none of it (envelope theorem); its second derivatives do.
    """
    c1, c2 = 4.0 * (D - 1.0), (D - 2.0) ** 2
    sh2 = torch.square(torch.sinh(0.5 * xi))
    g = -D * v  # G's part that depends on v
    slope = 2.0 * xi * (c1 - c2 / sh2) + torch.square(xi) * c2 / (sh2 * torch.tanh(0.5 * xi))
    return xi - (g - g.detach()) / slope.clamp(min=torch.finfo(slope.dtype).tiny)


_XI_STEPS = 60  # Newton steps of _optimal_xi where it cannot stop early


def _optimal_xi(v: Tensor, D: int) -> Tensor:
    """The ξ that minimizes the bound, for ``v = q − s²/D ≥ 0`` (float64 in and out).

    The bound's derivative in ξ is ``λ'(ξ)·(v + K/λ² − Dξ²)`` with ``K = (D−2)²/(16D)`` and
    ``λ' < 0``, so the minimum is the single root of the increasing function
    ``G(ξ) = ξ²·(4(D−1) − (D−2)²/sinh²(ξ/2)) − D·v``. ``G(log(D−1)) = −Dv ≤ 0`` brackets it
    from below (at ``v = 0``, ``ξ* = log(D−1)``); from above, any ξ with
    ``sinh²(ξ/2) ≥ 2(D−2)²/(4(D−1))`` and ``ξ² > 2Dv/(4(D−1))`` has ``G > 0``.
    Solved by Newton steps kept inside the bracket (bisection when a step leaves it), until
    every step is below rounding where the values can be read on the host; elsewhere (a GPU,
    torch.compile, torch.func) a fixed number of steps, which reaches float64 rounding from
    the bracket at any ``v`` and ``D``.
    """
    c1 = 4.0 * (D - 1.0)
    c2 = (D - 2.0) ** 2
    target = D * v
    if D == 2:  # G = 4ξ² − 2v
        return torch.sqrt(v / 2.0)
    if kernels.optimal_xi_enabled(v):  # (CUDA: the same steps, fused in one kernel)
        return kernels.optimal_xi(v, D, _XI_STEPS)
    lo = torch.full_like(v, math.log(D - 1.0))
    at_lo = target <= 0  # the root is log(D − 1) exactly
    hi = torch.sqrt(2.0 * target / c1).clamp(min=2.0 * math.asinh(math.sqrt(2.0 * c2 / c1))) + 1.0
    xi = torch.where(at_lo, lo, hi)
    early_exit = reads_values(v)
    for _ in range(100 if early_exit else _XI_STEPS):
        sh2 = torch.square(torch.sinh(0.5 * xi))
        inv_sh2 = 1.0 / sh2
        bracket = c1 - c2 * inv_sh2
        xi2 = torch.square(xi)
        g = xi2 * bracket - target
        # d/dξ of c2/sinh²(ξ/2) is −c2·coth(ξ/2)/sinh²(ξ/2), coth = sqrt(1 + sinh²)/sinh
        slope = 2.0 * xi * bracket + xi2 * c2 * inv_sh2 * torch.sqrt((1.0 + sh2) * inv_sh2)
        above = g > 0
        hi = torch.where(above, xi, hi)
        lo = torch.where(above, lo, xi)
        delta = g / slope
        step = xi - delta
        inside = (step >= lo) & (step <= hi)
        xi = torch.where(at_lo, lo, torch.where(inside, step, 0.5 * (lo + hi)))
        if early_exit and bool((at_lo | (inside & (delta.abs() <= 1e-13 * (1.0 + xi)))).all()):
            break
    return xi


@register("softmax_upper_bound_loss", "SoftmaxUpperBoundLoss")
class SoftmaxBound(SphericalMember):
    """Spherical upper bound of log-softmax (Bouchard 2007, Jaakkola–Jordan).

    With ``λ(ξ) = tanh(ξ/2) / (4ξ)``::

        L_ξ = −(D−2)²/(16Dλ) − Dξ/2 − Dλξ² + D log(1+e^ξ) + s/D + λ(q − s²/D) − o_c

    which is ≥ the softmax cross-entropy for every ``ξ > 0``.

    Parameters
    ----------
    xi : float or None
        A fixed ``ξ > 0``, or ``None`` (default) for the per-example ``ξ`` that minimizes the
        bound. The optimum depends on ``(s, q)`` only, so the loss stays spherical, and at
        the optimum the gradient needs no derivative through ``ξ`` (envelope theorem).
    """

    name: ClassVar[str] = "softmax_bound"

    def __init__(self, xi: float | None = None) -> None:
        self.xi = None if xi is None else _positive("xi", xi, "softmax bound")

    def options(self) -> dict[str, float | int | None]:
        return {"xi": self.xi}

    def log_probs(self, input: Tensor, dim: int = -1) -> Tensor:
        # The bound is trained as a surrogate of log-softmax; its model is the softmax.
        return torch.log_softmax(input, dim=dim)

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return self.loss_and_partials(s, q, oc, D)[0]

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if D < 2:
            raise ValueError(f"the softmax bound needs at least 2 classes, got {D}")
        # The ξ-dependent terms are each about D·ξ/4 and nearly cancel: float64 keeps the
        # result accurate at D = 10⁶ (all of it is O(N) work).
        s64, q64 = s.double(), q.double()
        v = (q64 - torch.square(s64) / D).clamp(min=0.0)
        if self.xi is None:
            xi = _optimal_xi(v.detach(), D)
            if v.requires_grad or is_traced(v):  # (a second derivative, maybe: _implicit_xi)
                xi = _implicit_xi(xi, v, D)
            lam = _jj_lambda(xi)
            # Dξ/2 + Dλξ² − D log(1+e^ξ) = −D[log(2cosh(ξ/2)) − (ξ/4)tanh(ξ/2)].
            h = torch.nn.functional.softplus(xi) - 0.5 * xi - 0.25 * xi * torch.tanh(0.5 * xi)
            bound = D * h - (D - 2.0) ** 2 / (16.0 * D * lam) + lam * v + s64 / D
        else:
            # A fixed ξ makes λ and the terms in ξ alone constants, computed once in float64.
            xi = self.xi
            lam = math.tanh(0.5 * xi) / (4.0 * xi)  # (ξ > 0 here)
            h = xi + math.log1p(math.exp(-xi)) - 0.5 * xi - 0.25 * xi * math.tanh(0.5 * xi)
            constant = D * h - (D - 2.0) ** 2 / (16.0 * D * lam)
            bound = (v * lam).add_(s64, alpha=1.0 / D).add_(constant)
        loss = bound.to(s.dtype) - oc
        alpha = (1.0 / D - 2.0 * lam * s64 / D).to(s.dtype)
        beta = lam.to(s.dtype) if isinstance(lam, Tensor) else torch.full_like(s, lam)
        return loss, alpha, beta, torch.full_like(oc, -1.0)


# --------------------------------------------------------------------------------------------
# Z-loss


@register("z_loss", "ZLoss")
class ZScore(SphericalMember):
    """Z-loss (de Brébisson & Vincent 2016): a softplus of the target's z-score.

    ``μ = s/D``, ``σ = sqrt(q/D − μ²)``, ``z = (o_c − μ)/σ`` and
    ``L = softplus(a(b − z)) / a``. Invariant to shifting and to positive scaling of ``o``.

    This is *not* the ``(log Z)²`` penalty that large-language-model code also calls
    "z-loss".

    At constant outputs (``σ = 0``) the z-score is undefined; it is taken as 0 there, with a
    zero gradient.

    The variance comes from ``(s, q)`` (all that the factored layer has), so it loses about
    ``eps · (q/D)/σ²`` of relative precision when the outputs share an offset much larger than
    their spread: in float64 with ``|μ|/σ ≈ 10⁴`` that is about 10⁻⁸.

    Parameters
    ----------
    a : float
        Slope ``a > 0`` of the softplus. Default 1.
    b : float
        Offset ``b`` of the softplus. Default 0.
    """

    name: ClassVar[str] = "z_loss"

    def __init__(self, a: float = 1.0, b: float = 0.0) -> None:
        self.a = _positive("a", a, "Z-loss")
        b = float(b)
        if not math.isfinite(b):
            raise ValueError(f"Z-loss b must be a finite number, got {b!r}")
        self.b = b

    def options(self) -> dict[str, float | int | None]:
        return {"a": self.a, "b": self.b}

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return self.loss_and_partials(s, q, oc, D)[0]

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # (Few operations: at small C a call's time is mostly their count.)
        mu = s / D
        mean_square = q / D
        var = mean_square - mu * mu
        # Below rounding level of q/D the variance is zero (constant outputs): z and its
        # gradient are 0 there, through w = 1/σ where σ is defined and 0 elsewhere.
        defined = var > mean_square * (4.0 * torch.finfo(s.dtype).eps)
        inv_sigma = torch.rsqrt(torch.where(defined, var, 1.0))
        w = torch.where(defined, inv_sigma, 0.0)
        z = (oc - mu) * w
        t = (self.b - z) * self.a
        loss = torch.nn.functional.softplus(t) / self.a
        # dL/dz = −sigmoid(t) and dz/do_c = 1/σ, so γ = −sigmoid(t)/σ. With σ² = q/D − s²/D²,
        # dσ/ds = −μ/(Dσ) and dσ/dq = 1/(2Dσ): dz/ds = (z μ/σ − 1)/(Dσ), dz/dq = −z/(2Dσ²).
        gamma = -torch.sigmoid(t) * w
        z_sigma = z * inv_sigma
        alpha = (z_sigma * mu - 1.0) * gamma / D
        beta = z_sigma * gamma * (-0.5 / D)
        return loss, alpha, beta, gamma


# --------------------------------------------------------------------------------------------
# squared error


@register("spherical_mse_loss", "SphericalMSELoss")
class SquaredError(SphericalMember):
    """Squared error to the one-hot target: ``L = ‖o − e_c‖² = q − 2 o_c + 1``."""

    name: ClassVar[str] = "mse"
    uses_sum: ClassVar[bool] = False

    def loss(self, s: Tensor, q: Tensor, oc: Tensor, D: int) -> Tensor:
        return q - 2.0 * oc + 1.0

    def loss_and_partials(
        self, s: Tensor, q: Tensor, oc: Tensor, D: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.loss(s, q, oc, D),
            torch.zeros_like(s),
            torch.ones_like(q),
            torch.full_like(oc, -2.0),
        )


# --------------------------------------------------------------------------------------------


def member_names() -> list[str]:
    """Names accepted by :func:`get_member` and :func:`spherical_losses.get_loss`."""
    return list(_REGISTRY)


def get_member(name: str | Member, **options: float | int | None) -> Member:
    """A member of the family by name, with its options (``eps=...``, ``order=...``)."""
    if isinstance(name, Member):
        if options:
            raise ValueError(
                "options are given to the member's constructor, not with a member object"
            )
        return name
    if isinstance(name, type) and issubclass(name, Member):
        return name(**options)
    try:
        cls = _REGISTRY[name].member
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(_REGISTRY)}") from None
    if not options:  # (the common case: no signature to inspect, which takes a while)
        return cls()
    params = inspect.signature(cls).parameters.values()
    allowed = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(
            f"unknown option(s) {', '.join(bad)} for loss {name!r}; "
            f"expected {', '.join(allowed) if allowed else 'no options'}"
        )
    for key, value in options.items():
        # (Every option is a number; the constructors check the ranges.)
        if not (value is None or isinstance(value, int | float)):
            raise ValueError(f"option {key} of loss {name!r} must be a number, got {value!r}")
    try:
        return cls(**options)
    except TypeError as error:  # e.g. None for an option that has no default meaning for it
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise ValueError(f"bad option value for loss {name!r} ({given}): {error}") from None


__all__ = [
    "Member",
    "Registration",
    "SphericalMember",
    "get_member",
    "member_names",
    "register",
    "register_softmax",
    "registrations",
    *(registration.member.__name__ for registration in _REGISTRY.values()),
]
