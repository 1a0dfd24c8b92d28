"""The autograd Function of the factored layer: the loss forward, and a backward that returns
``∂L/∂h = α w̄ + 2β Q h + γ W_c`` and records the pending update on the layer
(``docs/factored-update.md`` §1–§2).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .update import Pending

if TYPE_CHECKING:
    from .layer import FactoredSphericalLoss

_Method = TypeVar("_Method", bound=Callable[..., Any])


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Turns :func:`torch.autocast` off for ``device``'s type, where it is on: the layer's
    forward, backward and update run in the layer's own precision (float32 or float64), as
    autocast runs ``F.cross_entropy`` in float32.
    """
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def own_precision(method: _Method) -> _Method:
    """Runs a method of the layer taking ``input`` first with autocast off; under autocast, an
    input of lower precision (float16, bfloat16: a network's output there) is cast to the
    layer's dtype first. (Outside autocast a dtype mismatch raises, as before.)
    """

    @functools.wraps(method)
    def wrapper(layer: FactoredSphericalLoss, input: Tensor, *args: Any, **kwargs: Any) -> Any:
        device_type = layer.V.device.type
        if not torch.is_autocast_enabled(device_type):
            return method(layer, input, *args, **kwargs)
        if isinstance(input, Tensor) and input.dtype in (torch.float16, torch.bfloat16):
            input = input.to(layer.V.dtype)
        with torch.autocast(device_type, enabled=False):
            return method(layer, input, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def per_example(
    layer: FactoredSphericalLoss, input: Tensor, target: Tensor, valid: Tensor | None
) -> tuple[Tensor, ...]:
    """The loss of each example and what its gradients need: ``(loss, coef, H, W_c, P, s, w̄)``
    with ``coef`` the columns ``α, β, γ`` (zero rows, and zero loss, where ``valid`` is false).
    """
    H = layer._augment(input)
    s, q, oc, W_c, P, w_bar = layer._statistics(H, target)
    loss, alpha, beta, gamma = layer.member.loss_and_partials(s, q, oc, layer.num_classes)
    if not alpha.shape == beta.shape == gamma.shape == loss.shape == s.shape:
        # A user-defined member may return scalars for constant partials.
        loss, alpha, beta, gamma = torch.broadcast_tensors(loss, alpha, beta, gamma, s)[:4]
    coef = torch.stack([alpha, beta, gamma], dim=1)
    if valid is not None:
        coef.masked_fill_(~valid.unsqueeze(1), 0.0)
        loss = loss.masked_fill(~valid, 0.0)
    return loss, coef, H, W_c, P, s, w_bar


def input_gradient(coef: Tensor, w_bar: Tensor, P: Tensor, W_c: Tensor) -> Tensor:
    """``∂L/∂h = α w̄ + 2β Q h + γ W_c`` for the rows of ``coef`` (already scaled by the upstream
    gradient), without the bias column: computed on the first columns only, so that the
    gradient is contiguous (autograd would copy a strided one).
    """
    n = w_bar.shape[0]  # (w̄ without its bias entry)
    alpha, beta, gamma = coef.split(1, dim=1)
    grad = torch.mul(alpha, w_bar)
    return grad.addcmul_(P[:, :n], beta, value=2.0).addcmul_(W_c[:, :n], gamma)


class _FactoredLossFunction(torch.autograd.Function):
    """Per-example loss of the factored layer; the backward records the pending update."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        input: Tensor,
        target: Tensor,
        valid: Tensor | None,
        layer: FactoredSphericalLoss,
        trigger: Tensor | None,
    ) -> Tensor:
        loss, coef, H, W_c, P, s, w_bar = per_example(layer, input, target, valid)
        n = H.shape[0]
        # The reduction is done here, so that the backward gets one scale for all examples.
        ctx.scale = None
        if layer.reduction == "sum":
            loss = loss.sum()
        elif layer.reduction == "mean":
            if valid is None:
                loss = loss.mean()
                ctx.scale = 1.0 / n if n else 0.0  # an empty batch has no coefficient to scale
            else:
                count = valid.sum().to(coef.dtype)
                loss = loss.sum() / count
                # With no target kept the mean is NaN (0/0) but the gradient zero, as with
                # F.cross_entropy: the coefficients are all zero, and a finite scale keeps them so.
                ctx.scale = 1.0 / count.clamp_min(1.0)
        # Intermediates, held on ctx rather than saved (no input or output among them): w̄ is
        # a view of the cast state, which a repair() may refresh in place before the backward,
        # with the same value (that of W, which a repair keeps). The coefficients are saved as
        # well, so that autograd frees them after a backward without retain_graph, and a second
        # backward through the same graph raises as it would for a dense layer, instead of
        # recording the update twice.
        ctx.save_for_backward(coef)
        ctx.intermediates = (H, target, W_c, P, s, w_bar)
        ctx.layer = layer
        ctx.version = layer._session.weight_version
        ctx.record = trigger is not None
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        with autocast_off(grad_loss.device):
            return _FactoredLossFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        layer: FactoredSphericalLoss = ctx.layer
        layer._check_version(ctx.version)
        (coef,) = ctx.saved_tensors  # (raises if the graph was freed by an earlier backward)
        H, target, W_c, P, s, w_bar = ctx.intermediates
        if grad_loss.dim():  # reduction 'none': one upstream gradient per example
            coef = coef * grad_loss.unsqueeze(1)
        else:
            coef = coef * (grad_loss if ctx.scale is None else grad_loss * ctx.scale)
        if ctx.record:
            layer._record(Pending(H, coef, target, W_c, P, s))
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = input_gradient(coef, w_bar, P, W_c)
        return grad_input, None, None, None, None
