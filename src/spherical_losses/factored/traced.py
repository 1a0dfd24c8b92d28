"""The factored layer's loss as two custom operators, for a forward traced by torch.compile.

The eager forward (:class:`~.function._FactoredLossFunction`) records the pending update from
its backward by changing the layer, a side effect that torch.compile cannot trace inside an
autograd Function. Here the same computation is two operators opaque to the compiler:
``factored_rows`` (the per-example losses and what the gradients need, read from the layer's
current state) and ``factored_record`` (run by the backward: it checks the layer's version and
records the update). The layer is named to them by a key, since an operator takes no Python
objects; the reduction is ordinary traced code (:func:`~.._conventions.weighted_reduce`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import _conventions as conventions
from .function import input_gradient, per_example
from .update import Pending

if TYPE_CHECKING:
    from .layer import FactoredSphericalLoss

__all__ = ["register", "traced_loss"]

# The layers by key (their id), for the operators.
_LAYERS: weakref.WeakValueDictionary[int, FactoredSphericalLoss] = weakref.WeakValueDictionary()


def register(layer: FactoredSphericalLoss) -> None:
    """Makes ``layer`` reachable by the operators under the key ``id(layer)``."""
    _LAYERS[id(layer)] = layer


def traced_loss(layer: FactoredSphericalLoss, rows: Tensor, target: Tensor, valid: Tensor,
                trigger: Tensor | None) -> Tensor:  # fmt: skip
    """The reduced loss of ``rows`` ``(N, in_features)``, as the eager forward computes it."""
    record = trigger is not None
    if trigger is None:
        trigger = rows.new_empty(0)
    loss, *_ = torch.ops.spherical_losses.factored_rows(
        rows, target, valid, trigger, id(layer), record
    )
    weights = valid.to(loss.dtype)
    return conventions.weighted_reduce(loss, weights, layer.reduction, loss.shape)


@torch.library.custom_op("spherical_losses::factored_rows", mutates_args=())
def _rows(
    rows: Tensor, target: Tensor, valid: Tensor, trigger: Tensor, key: int, record: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    layer = _LAYERS[key]
    loss, coef, H, W_c, P, s, w_bar = per_example(layer, rows, target, valid)
    version = torch.tensor(layer._session.weight_version)
    # (An operator's outputs may not alias its inputs or one another.)
    return (loss, coef, H.clone(), W_c, P.clone(), s.clone(), w_bar.clone(), version)


@_rows.register_fake
def _(
    rows: Tensor, target: Tensor, valid: Tensor, trigger: Tensor, key: int, record: bool
) -> tuple[Tensor, ...]:
    layer = _LAYERS[key]
    n, d = rows.shape[0], layer.V.shape[1]
    return (
        rows.new_empty(n),
        rows.new_empty(n, 3),
        rows.new_empty(n, d),
        rows.new_empty(n, d),
        rows.new_empty(n, d),
        rows.new_empty(n),
        rows.new_empty(layer.in_features),
        torch.empty((), dtype=torch.long),
    )


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    _, target, _, trigger, key, record = inputs
    _, coef, H, W_c, P, s, w_bar, version = output
    ctx.save_for_backward(coef, H, target, W_c, P, s, w_bar, version, trigger)
    ctx.key, ctx.record = key, record


def _backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    coef, H, target, W_c, P, s, w_bar, version, trigger = ctx.saved_tensors
    coef = coef * grad_loss.unsqueeze(1)
    if ctx.record:
        torch.ops.spherical_losses.factored_record(trigger, H, coef, target, W_c, P, s, version,
                                                   ctx.key)  # fmt: skip
    grad_input = input_gradient(coef, w_bar, P, W_c) if ctx.needs_input_grad[0] else None
    return grad_input, None, None, None, None, None


_rows.register_autograd(_backward, setup_context=_setup)


# `trigger` is declared mutated so that the compiler keeps the call, which returns nothing.
@torch.library.custom_op("spherical_losses::factored_record", mutates_args=("trigger",))
def _record(trigger: Tensor, H: Tensor, coef: Tensor, target: Tensor, W_c: Tensor, P: Tensor,
            s: Tensor, version: Tensor, key: int) -> None:  # fmt: skip
    layer = _LAYERS[key]
    layer._check_version(int(version))
    # Copies: a compiled graph may reuse the memory of its intermediates after this call.
    layer._record(Pending(*(t.clone() for t in (H, coef, target, W_c, P, s))))


@_record.register_fake
def _(trigger: Tensor, H: Tensor, coef: Tensor, target: Tensor, W_c: Tensor, P: Tensor,
      s: Tensor, version: Tensor, key: int) -> None:  # fmt: skip
    return None
