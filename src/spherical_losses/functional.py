"""Dense losses and probability maps, with the conventions of ``torch.nn.functional``.

Every loss takes ``(input, target, weight=None, ignore_index=-100, reduction='mean',
label_smoothing=0.0)`` like :func:`torch.nn.functional.cross_entropy`, with input of shape
``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)`` and target of class indices (or, for the members
that define probabilities, class probabilities of the input's shape).

The spherical members run on one engine: ``(s, q, o_c)`` are read from the logits in one pass,
the member gives the per-example loss and ``(α, β, γ)`` in closed form, and the backward is
``∂L/∂o = α·1 + 2β·o + γ·e_c``, a single pass that writes the gradient (no ``exp``, no saved
``(N, C)`` activations). On CUDA, with Triton, each pass is one fused kernel that reads the
logits in their own dtype (:mod:`._kernels`).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable

import torch
from torch import Tensor

from . import _conventions as conventions
from . import _kernels as kernels
from . import family
from .family import Member, SphericalMember, compute_dtype

_HALF = (torch.float16, torch.bfloat16)

# The named losses and probability maps are appended as they are made, at the end.
__all__ = ["spherical_loss"]


class _SphericalLossFunction(torch.autograd.Function):
    """Per-example loss of a spherical member on (N, C) logits, closed-form backward.

    Outputs the loss and, not differentiable, the partials ``(α, β, γ)`` and ``s − s`` (0, or
    NaN where an output is not finite), which the backward and the forward-mode rule read.
    In the ``setup_context`` form with a generated vmap rule, so that every ``torch.func``
    transform applies; no value is read on the host (nothing breaks a compiled graph).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(  # type: ignore[override]
        input: Tensor, target: Tensor, valid: Tensor, member: SphericalMember
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if kernels.enabled(input):  # (CUDA: one read of the logits in their own dtype)
            s, q, oc = kernels.statistics(input, target)
        else:
            s, q, oc = family.statistics(input.to(compute_dtype(input.dtype)), target)
        loss, alpha, beta, gamma = member.loss_and_partials(s, q, oc, input.shape[-1])
        # A non-finite output makes s non-finite, and s − s NaN: the loss and gradient are NaN
        # there, as for F.cross_entropy, rather than whatever the member's formula makes of it.
        nan = s - s
        return torch.where(valid, loss + nan, 0.0), alpha, beta, gamma, nan

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        input, target, valid, member = inputs
        _, alpha, beta, gamma, nan = output
        ctx.mark_non_differentiable(alpha, beta, gamma, nan)
        ctx.save_for_backward(input, target, valid, alpha, beta, gamma, nan)
        ctx.save_for_forward(input, target, valid, alpha, beta, gamma, nan)
        ctx.member = member
        # No zero gradients made for the outputs that no one differentiates (the partials).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        input, target, valid, alpha, beta, gamma, nan = ctx.saved_tensors
        if grad_loss is None:  # (the loss itself took no part in what is differentiated)
            return None, None, None, None
        if torch.is_grad_enabled() or (
            not torch.compiler.is_compiling() and conventions.is_traced(input)
        ):
            # create_graph=True (a gradient penalty, a second derivative) or a torch.func
            # transform around this one: the same gradient from the partials recomputed with
            # differentiable operations, so that it can be differentiated itself. (A compiled
            # backward, traced once with grad mode off, reads the saved partials.)
            return _differentiable_gradient(input, target, valid, ctx.member, grad_loss)
        if kernels.enabled(input):  # (CUDA: the gradient written in one pass, in input's dtype)
            a = alpha if ctx.member.uses_sum else None
            grad = kernels.gradient(input, target, valid, grad_loss, nan, a, beta, gamma)
            return grad, None, None, None
        g = torch.where(valid, grad_loss + nan, 0.0)
        o = input.to(compute_dtype(input.dtype))
        # ∂L/∂o = α·1 + 2β·o + γ·e_c, written in one pass over o.
        # (torch.addcmul with two broadcast operands is much slower than mul + add_.)
        grad = torch.mul(o, (2.0 * beta * g).unsqueeze(-1))
        if ctx.member.uses_sum:  # (α ≡ 0 otherwise: a pass over the gradient saved)
            grad.add_((alpha * g).unsqueeze(-1))
        grad.scatter_add_(-1, target.unsqueeze(-1), (gamma * g).unsqueeze(-1))
        return grad.to(input.dtype), None, None, None


class _SphericalLossFunctionForwardMode(_SphericalLossFunction):
    """The same with a forward-mode rule (torch.func.jvp, jacfwd, hessian, forward_ad), which
    torch.compile cannot trace: used everywhere but in compiled code.
    """

    @staticmethod
    def jvp(ctx, input_t: Tensor, *_: object) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Forward mode (torch.func.jvp, jacfwd, hessian): dL = α·Σ_k do_k + 2β·Σ_k o_k do_k
        # + γ·do_c, from the saved partials.
        input, target, valid, alpha, beta, gamma, nan = ctx.saved_tensors
        dtype = compute_dtype(input.dtype)
        o, t = input.to(dtype), input_t.to(dtype)
        dt = t.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        dloss = alpha * t.sum(-1) + 2.0 * beta * (o * t).sum(-1) + gamma * dt
        return torch.where(valid, dloss + nan, 0.0), None, None, None, None


class _EagerSphericalLossFunction(torch.autograd.Function):
    """The same in the form without ``setup_context``, for plain eager calls: on every call
    :meth:`torch.autograd.Function.apply` binds a ``setup_context`` Function's arguments
    through :func:`inspect.signature`, which costs more than the rest of a small call's
    host time (tens of microseconds), while ``torch.func`` transforms, which need that form,
    are told apart by their wrapped inputs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, input: Tensor, target: Tensor, valid: Tensor, member: SphericalMember
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        inputs = (input, target, valid, member)
        output = _SphericalLossFunction.forward(*inputs)
        _SphericalLossFunction.setup_context(ctx, inputs, output)
        return output

    backward = _SphericalLossFunction.backward
    jvp = _SphericalLossFunctionForwardMode.jvp


def _differentiable_gradient(
    input: Tensor, target: Tensor, valid: Tensor, member: SphericalMember, grad_loss: Tensor
) -> tuple[Tensor | None, ...]:
    """``∂L/∂o = α·1 + 2β·o + γ·e_c`` times the upstream gradient, built from autograd
    operations on the logits (the partials as functions of them), for double backward.
    """
    o = input.to(compute_dtype(input.dtype))
    s, q, oc = family.statistics(o, target)
    _, alpha, beta, gamma = member.loss_and_partials(s, q, oc, o.shape[-1])
    kept = torch.where(valid, grad_loss + (s - s), 0.0)  # (as the forward)
    alpha, beta, gamma = (
        (torch.broadcast_to(t, s.shape) * kept).unsqueeze(-1) for t in (alpha, beta, gamma)
    )
    # (a comparison, not scatter_, which vmap has no batching rule for)
    one_hot = (torch.arange(o.shape[-1], device=o.device) == target.unsqueeze(-1)).to(o.dtype)
    grad = alpha + 2.0 * beta * o + gamma * one_hot
    return grad.to(input.dtype), None, None, None


# --------------------------------------------------------------------------------------------
# input checks


def _class_index_shape(input: Tensor) -> tuple[int, ...]:
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def _check_logits(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise ValueError(f"input must be a tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise ValueError(f"input must be a floating-point tensor of logits, got {input.dtype}")


def _check_input(input: Tensor) -> None:
    _check_logits(input)
    if input.dim() == 0:
        raise ValueError("input must have shape (C), (N, C) or (N, C, d1, ..., dK), got a scalar")


def _check_dim(dim: int, ndim: int) -> int:
    """``dim`` as torch.softmax takes it: any integer in ``[-n, n)`` with ``n = max(ndim, 1)``
    (a 0-dim tensor is one class), an IndexError beyond; a ValueError if not an integer.
    """
    try:
        # (operator.index takes True and one-element tensors too; torch.softmax does not.)
        if isinstance(dim, bool) or (
            isinstance(dim, Tensor) and (dim.dim() != 0 or dim.dtype == torch.bool)
        ):
            raise TypeError
        dim = operator.index(dim)
    except TypeError:
        raise ValueError(f"dim must be an integer (the class dimension), got {dim!r}") from None
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(
            f"dim must be in [{-n}, {n - 1}] for input of {ndim} dimensions, got {dim}"
        )
    return dim


def _check_class_target(input: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Checks class-index targets; returns them as int64 and the mask of positions kept."""
    target = conventions.class_indices(target)
    expected = _class_index_shape(input)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"class-index target must have shape {expected} for input of shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    return target, conventions.target_mask(target, num_classes, ignore_index)


def _to_rows(t: Tensor, class_dim: bool) -> Tensor:
    """(N, C, d...) → (N·d..., C) for logits; (N, d...) → (N·d...,) for targets."""
    if class_dim:
        if t.dim() == 1:
            return t.unsqueeze(0)
        if t.dim() == 2:
            return t
        return t.movedim(1, -1).reshape(-1, t.shape[1])
    return t.reshape(-1)


# --------------------------------------------------------------------------------------------
# the engine


def spherical_loss(
    input: Tensor,
    target: Tensor,
    member: Member | str,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """The loss of any member of the family, with :func:`~torch.nn.functional.cross_entropy`'s
    conventions.

    Parameters
    ----------
    input : Tensor
        Logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
    target : Tensor
        Class indices (any integer dtype) of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)``
        with values in ``[0, C)`` (or ``ignore_index``); or, for members with probabilities,
        class probabilities of the input's shape (then ``ignore_index`` must be negative).
    member : Member or str
        A member of :mod:`spherical_losses.family` (or a user-defined
        :class:`~spherical_losses.family.SphericalMember`), or its name.
    weight : Tensor, optional
        Per-class weights of shape ``(C)``.
    ignore_index : int
        Target value that contributes neither loss nor gradient (class-index targets).
    reduction : {'none', 'mean', 'sum'}
        'mean' divides by the summed weights of the targets not ignored (NaN, with a zero
        gradient, when that sum is 0: every target ignored, or weighted 0).
    label_smoothing : float
        In ``[0, 1]``; cross-entropy against ``(1 − ε)·target + ε/C`` (members with
        probabilities only).

    Returns
    -------
    Tensor
        A scalar, or for ``reduction='none'`` the target's shape (0 at ignored positions).
        The dtype of ``input`` (half precision is computed in float32); float32 for half
        precision under :func:`torch.autocast`, as :func:`~torch.nn.functional.cross_entropy`.
    """
    member = family.get_member(member)
    _check_input(input)
    if input.dtype in _HALF and torch.is_autocast_enabled(input.device.type):
        # As F.cross_entropy under autocast: computed in float32, and returned in float32.
        with torch.autocast(input.device.type, enabled=False):
            return spherical_loss(
                input.float(), target, member, weight, ignore_index, reduction, label_smoothing
            )
    probability_target = _check_arguments(
        input, target, member, weight, ignore_index, reduction, label_smoothing
    )
    if not probability_target:
        target, valid = _check_class_target(input, target, ignore_index)
    native = member.native_loss(input, target, weight, ignore_index, reduction, label_smoothing)
    if native is not None:
        return native.to(input.dtype)
    if probability_target:
        return _probability_target_loss(input, target, member, weight, reduction, label_smoothing)
    return _class_index_loss(input, target, valid, member, weight, reduction, label_smoothing)


def _check_arguments(
    input: Tensor,
    target: Tensor,
    member: Member,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
) -> bool:
    """Checks what does not depend on the target's values; returns whether the target holds
    class probabilities (else class indices).
    """
    conventions.check_reduction(reduction)
    conventions.check_label_smoothing(label_smoothing)
    conventions.check_weight(weight, input.shape[0 if input.dim() == 1 else 1])
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    probability_target = target.is_floating_point()
    if (probability_target or label_smoothing > 0) and not member.has_probabilities:
        what = "class-probability targets" if probability_target else "label_smoothing > 0"
        raise ValueError(
            f"the {member.name!r} loss defines no class probabilities, so it takes no {what}; "
            "use class-index targets and label_smoothing=0"
        )
    if probability_target:
        if tuple(target.shape) != tuple(input.shape):
            raise ValueError(
                f"class-probability target must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if ignore_index >= 0:  # (F.cross_entropy refuses it too)
            raise ValueError(
                f"ignore_index applies to class-index targets only; with class-probability "
                f"targets it must stay negative (the default -100), got {ignore_index}"
            )
    elif member.margin and label_smoothing > 0:
        raise ValueError(
            "label_smoothing needs the model's probabilities, which a margin changes per "
            "target; use margin=0"
        )
    return probability_target


def _class_index_loss(
    input: Tensor,
    target: Tensor,
    valid: Tensor,
    member: Member,
    weight: Tensor | None,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    """The loss for checked class-index targets (int64, ``valid`` the mask of those kept)."""
    logits = _to_rows(input, class_dim=True)
    rows_valid = _to_rows(valid, class_dim=False)
    rows_target = torch.where(rows_valid, _to_rows(target, class_dim=False), 0)
    if member.spherical:
        if torch.compiler.is_compiling():
            function: type[torch.autograd.Function] = _SphericalLossFunction
        elif conventions.is_traced(logits):
            function = _SphericalLossFunctionForwardMode
        else:
            function = _EagerSphericalLossFunction
        per_example = function.apply(logits, rows_target, rows_valid, member)[0]
    else:
        o = logits.to(compute_dtype(logits.dtype))
        per_example = member.dense_loss(o, rows_target).masked_fill(~rows_valid, 0.0)

    # (per_example is 0 at ignored positions already: a multiply by the 0/1 mask is saved.)
    w = rows_valid.to(per_example.dtype)
    if weight is not None:
        w = w * weight.to(per_example.dtype)[rows_target]
        per_example = per_example * w
    loss = conventions.weighted_reduce(per_example, w, reduction, target.shape)
    if label_smoothing > 0:
        logp = member.log_probs(logits.to(compute_dtype(logits.dtype)), dim=-1)
        smooth = -(logp * weight.to(logp.dtype) if weight is not None else logp).sum(-1)
        smooth = smooth.masked_fill(~rows_valid, 0.0)
        loss = (1.0 - label_smoothing) * loss + (
            label_smoothing / logits.shape[-1]
        ) * conventions.weighted_reduce(smooth, w, reduction, target.shape)
    return loss.to(input.dtype)


def _probability_target_loss(
    input: Tensor,
    target: Tensor,
    member: Member,
    weight: Tensor | None,
    reduction: str,
    label_smoothing: float,
) -> Tensor:
    # As F.cross_entropy with class-probability targets: −Σ_k w_k t_k log p_k per position;
    # 'mean' divides by the number of positions.
    if member.margin:
        raise ValueError("a margin needs class-index targets (it shifts the target class's output)")
    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    dtype = compute_dtype(input.dtype)
    logp = member.log_probs(input.to(dtype), dim=class_dim)
    t = target.to(dtype)
    if label_smoothing > 0:
        t = t * (1.0 - label_smoothing) + label_smoothing / num_classes
    prod = logp * t
    if weight is not None:
        shape = [1] * input.dim()
        shape[class_dim] = num_classes
        prod = prod * weight.to(dtype).reshape(shape)
    per = -prod.sum(class_dim)
    if reduction == "none":
        out = per
    elif reduction == "sum":
        out = per.sum()
    else:
        out = (
            per.sum() / (input.numel() // num_classes)
            if input.numel()
            else per.sum() * float("nan")
        )
    return out.to(input.dtype)


# --------------------------------------------------------------------------------------------
# the named losses and probability maps, made from the registry (family.register)

_LOSS_ARGUMENTS = "input, target, weight, ignore_index, reduction, label_smoothing"
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD


def bind_options(
    registration: family.Registration,
    names: tuple[str, ...],
    args: tuple[object, ...],
    kwargs: dict[str, object],
    where: str,
) -> dict[str, object]:
    """A generated wrapper's member options: its extra positional ``args`` and ``kwargs``,
    which may name ``names`` only, over the member's defaults; a TypeError as Python's own.
    """
    if len(args) > len(names):
        raise TypeError(
            f"{where}() takes at most {len(names)} option(s) after its other arguments "
            f"({', '.join(names) or 'none'}), got {len(args)}: {args!r}"
        )
    options = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
        if key in options:
            raise TypeError(f"{where}() got multiple values for argument {key!r}")
        options[key] = value
    return {
        p.name: options.get(p.name, p.default) for p in registration.options() if p.name in names
    }


def describe(
    registration: family.Registration,
    lead: str,
    common: str,
    names: tuple[str, ...],
    tail: str,
) -> str:
    """A generated object's docstring: ``lead``, the member's description, the ``common``
    Parameters entries, the member's entries for ``names``, then ``tail``.
    """
    description, entries = registration.documentation()
    options = [
        entries.get(n, f"{n}\n    See :class:`{_member_path(registration)}`.") for n in names
    ]
    parameters = "\n".join([common, *options])
    return f"{lead}\n\n{description}\n\nParameters\n----------\n{parameters}\n\n{tail}\n"


def no_smoothing_note(cls: type[Member]) -> str:
    """The docstrings' note for a member without probabilities (empty for the others)."""
    if cls.has_probabilities:
        return ""
    return " (``label_smoothing`` must stay 0: the member defines no probabilities)"


def _member_path(registration: family.Registration) -> str:
    return f"~spherical_losses.family.{registration.member.__name__}"


def _publish(fn: Callable[..., Tensor], name: str, signature: inspect.Signature, doc: str) -> None:
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__doc__ = doc
    globals()[name] = fn
    __all__.append(name)


def _loss_function(registration: family.Registration) -> None:
    if not (name := registration.loss_function):
        return
    cls = registration.member
    names = tuple(p.name for p in registration.options())

    def loss(
        input: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        member = (
            cls(**bind_options(registration, names, args, kwargs, name))
            if args or kwargs
            else cls()
        )
        return spherical_loss(
            input, target, member, weight, ignore_index, reduction, label_smoothing
        )

    common = [p for p in inspect.signature(spherical_loss, eval_str=True).parameters.values()]
    common = [p for p in common if p.name != "member"]
    options = [p.replace(kind=_POSITIONAL) for p in registration.options()]
    smoothing = no_smoothing_note(cls)
    see_also = (
        f"spherical_losses.family.{cls.__name__} : the member, a function of ``(s, q, o_c, D)``."
    )
    if registration.loss_module:
        see_also += f"\nspherical_losses.{registration.loss_module} : the same loss as a module."
    doc = describe(
        registration,
        f"The loss of :class:`{_member_path(registration)}`, with the conventions of "
        ":func:`torch.nn.functional.cross_entropy`.",
        f"{_LOSS_ARGUMENTS}\n    As for :func:`~spherical_losses.spherical_loss`{smoothing}.",
        names,
        "Returns\n-------\nTensor\n    A scalar, or for ``reduction='none'`` the target's "
        f"shape (0 at ignored positions).\n\nSee Also\n--------\n{see_also}",
    )
    _publish(loss, name, inspect.Signature([*common, *options], return_annotation=Tensor), doc)


def _softmax_functions(registration: family.Registration) -> None:
    if not (name := registration.softmax_function):
        return
    cls = registration.member
    names = registration.softmax_options
    log_name = "log_" + name

    def log_softmax(input: Tensor, dim: int = -1, *args: object, **kwargs: object) -> Tensor:
        return _probability_map(
            cls(**bind_options(registration, names, args, kwargs, log_name)), input, dim
        )

    def softmax(input: Tensor, dim: int = -1, *args: object, **kwargs: object) -> Tensor:
        member = cls(**bind_options(registration, names, args, kwargs, name))
        return _probability_map(member, input, dim).exp()

    parameters = [
        inspect.Parameter("input", _POSITIONAL, annotation=Tensor),
        inspect.Parameter("dim", _POSITIONAL, default=-1, annotation=int),
        *(p.replace(kind=_POSITIONAL) for p in registration.options() if p.name in names),
    ]
    signature = inspect.Signature(parameters, return_annotation=Tensor)
    common = (
        "input : Tensor\n    Logits of any shape (a 0-dim tensor is one class, as for "
        ":func:`torch.softmax`).\ndim : int\n    The class dimension, as for :func:`torch.softmax`."
    )
    for fn, fn_name, what in (
        (log_softmax, log_name, "log-probabilities"),
        (softmax, name, "probabilities"),
    ):
        doc = describe(
            registration,
            f"The class {what} of :class:`{_member_path(registration)}` along ``dim``.",
            common,
            names,
            f"Returns\n-------\nTensor\n    The {what}, of the input's shape and dtype (half "
            "precision is computed in float32).",
        )
        _publish(fn, fn_name, signature, doc)


for _registration in family.registrations():
    _loss_function(_registration)
    _softmax_functions(_registration)
del _registration


def _probability_map(member: Member, input: Tensor, dim: int) -> Tensor:
    _check_logits(input)
    dim = _check_dim(dim, input.dim())
    if input.dim() == 0:  # one class, as for torch.softmax
        return _probability_map(member, input.unsqueeze(0), 0).squeeze(0)
    if input.shape[dim] == 0:  # no classes: an empty result, as torch.log_softmax gives
        return input.clone()
    return member.log_probs(input.to(compute_dtype(input.dtype)), dim=dim).to(input.dtype)
