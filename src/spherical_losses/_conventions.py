"""The conventions of :func:`torch.nn.functional.cross_entropy`, written once for every engine.

The dense engine (:mod:`spherical_losses.functional`), the factored layer
(:mod:`spherical_losses.factored`) and the linear path without logits all take their targets,
class weights and reductions through these functions, so that each check and its message, and
the mean over a minibatch whose targets are all ignored, exist in one place.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "TargetOutOfBoundsError",
    "check_label_smoothing",
    "check_reduction",
    "check_weight",
    "class_indices",
    "is_traced",
    "reads_values",
    "target_mask",
    "weighted_reduce",
]

REDUCTIONS = ("none", "mean", "sum")


class TargetOutOfBoundsError(IndexError, ValueError):
    """A class-index target outside ``[0, C)`` that is not ``ignore_index``.

    An :class:`IndexError`, as :func:`torch.nn.functional.cross_entropy` raises for the same
    mistake, and a :class:`ValueError`, as this library raised before, so that callers catching
    either keep working.
    """


def check_reduction(reduction: str) -> None:
    """Raises a ValueError unless ``reduction`` is ``'none'``, ``'mean'`` or ``'sum'``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")


def check_label_smoothing(label_smoothing: float) -> None:
    """Raises a ValueError unless ``label_smoothing`` is in ``[0, 1]``."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def check_weight(weight: Tensor | None, num_classes: int) -> None:
    """Raises a ValueError unless ``weight`` is None or a float tensor of shape ``(C)``."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight!r}")
    if weight.dim() != 1 or weight.numel() != num_classes:
        raise ValueError(
            f"weight must be a 1-D tensor of {num_classes} elements (one per class), "
            f"got shape {tuple(weight.shape)}"
        )


def class_indices(target: object) -> Tensor:
    """``target`` as int64 class indices (any integer dtype is taken as indices)."""
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold class indices (an integer tensor), got {target.dtype}")
    return target.long()


def is_traced(t: Tensor) -> bool:
    """Whether ``t`` is being traced by :func:`torch.compile` or transformed by
    :mod:`torch.func` (``vmap``, ``grad``, ``jvp``, ...): no Python branch may read its values.
    """
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def reads_values(t: Tensor) -> bool:
    """Whether reading ``t``'s values on the host is cheap and allowed: a CPU tensor, run
    eagerly (on a GPU it would wait for the device; traced, it has no values).
    """
    return t.device.type == "cpu" and not is_traced(t)


def target_mask(target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """The mask of the targets kept (not ``ignore_index``); raises
    :class:`TargetOutOfBoundsError` for a kept target outside ``[0, num_classes)``.

    Eagerly on the CPU the error names the first bad target. Elsewhere, as
    :func:`~torch.nn.functional.cross_entropy` there, the check does not wait for the device:
    on a GPU and under :func:`torch.compile` an asynchronous assert (a RuntimeError when it
    fails: on a GPU, a device-side assert at the next synchronization); on targets that a
    :mod:`torch.func` transform wraps (``vmap``) none, where the gather of the target's output
    still fails on a bad index.
    """
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if reads_values(target):
        if bool(bad.any()):
            value = int(target[bad].flatten()[0])
            raise TargetOutOfBoundsError(
                f"Target {value} is out of bounds for {num_classes} classes "
                f"(expected 0 <= target < {num_classes}, or ignore_index={ignore_index})"
            )
    elif torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(
        target
    ):
        torch._assert_async(
            ~bad.any(),
            f"Target out of bounds for {num_classes} classes (expected 0 <= target < "
            f"{num_classes}, or ignore_index={ignore_index})",
        )
    return valid


def weighted_reduce(values: Tensor, weights: Tensor, reduction: str, shape: torch.Size) -> Tensor:
    """Reduces per-example ``values`` (already multiplied by their ``weights``).

    ``'none'`` reshapes to ``shape``; ``'sum'`` sums; ``'mean'`` divides by the summed weights.
    As :func:`~torch.nn.functional.cross_entropy` when every target is ignored, the mean is NaN
    (0/0) but its gradient zero, so that such a minibatch leaves the weights alone (a plain 0/0
    gives NaN gradients, which SGD writes into every weight). The same when the kept targets
    all weigh 0, where ``F.cross_entropy``'s gradient is NaN. No synchronization with the device.
    """
    if reduction == "none":
        return values.reshape(shape)
    if reduction == "sum":
        return values.sum()
    total = weights.sum()
    nothing = total == 0
    return (values.sum() / total.masked_fill(nothing, 1.0)).masked_fill(nothing, math.nan)
