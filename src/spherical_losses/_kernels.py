"""Fused GPU kernels for the dense engine, in Triton.

The engine needs two passes over the ``(N, C)`` logits: the forward reads ``(s, q, o_c)``, the
backward writes ``∂L/∂o = α·1 + 2β·o + γ·e_c``. As chains of PyTorch operations these are
several kernels each, and half-precision logits are first copied to float32 (a read and a write
of the whole tensor). Here each is one kernel: the forward reads the logits once in their own
dtype and accumulates in float32 (float64 for float64 logits); the backward reads them once and
writes the gradient in their dtype. The member's per-row formulas stay PyTorch operations on
``(N,)`` vectors, so each member is still written once.

They run on CUDA tensors when Triton can be imported, in eager code only: under
:func:`torch.compile` the PyTorch operations are traced instead (the compiler fuses them), and
under :mod:`torch.func` transforms the engine's differentiable path is used. The environment
variable ``SPHERICAL_LOSSES_KERNELS=0`` turns them off (to compare, or to rule them out).
Tests run the same kernels on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

from . import _conventions as conventions

# Tests set this (with TRITON_INTERPRET=1) to run the kernels on CPU tensors.
INTERPRET_ON_CPU = False

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _triton_kernels() -> ModuleType | None:
    try:
        from . import _triton_kernels as kernels
    except ImportError:  # no Triton (a CPU build of PyTorch, or a platform without it)
        return None
    return kernels


def _usable(t: Tensor) -> bool:
    if os.environ.get("SPHERICAL_LOSSES_KERNELS", "1") == "0":
        return False
    if not (t.is_cuda or (INTERPRET_ON_CPU and t.device.type == "cpu")):
        return False
    return not conventions.is_traced(t) and _triton_kernels() is not None


def enabled(input: Tensor) -> bool:
    """Whether the engine's passes over ``input`` (rows of logits) run as these kernels."""
    if input.dtype not in _DTYPES or input.dim() != 2 or input.stride(1) != 1:
        return False
    return input.shape[0] > 0 and input.shape[1] > 0 and _usable(input)


def optimal_xi_enabled(v: Tensor) -> bool:
    """Whether :func:`optimal_xi` takes ``v`` (float64, one value per example)."""
    return v.dtype == torch.float64 and v.numel() > 0 and not v.requires_grad and _usable(v)


def optimal_xi(v: Tensor, num_classes: int, iterations: int) -> Tensor:
    """The softmax bound's optimal ξ for each ``v``, by ``iterations`` of the safeguarded
    Newton iteration of :func:`.family._optimal_xi`, in one kernel (float64).
    """
    kernels = _triton_kernels()
    assert kernels is not None
    v = v.contiguous()
    xi = torch.empty_like(v)
    kernels.launch_optimal_xi(v, xi, num_classes, iterations)
    return xi


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def statistics(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, q, o_c)`` of the logits ``input`` ``(N, C)`` for class indices ``target`` ``(N,)``
    in one read, in float32 (float64 for float64 logits). A target outside ``[0, C)`` gives a
    NaN ``o_c`` (the engine checks targets before; this keeps a bad one from reading memory).
    """
    kernels = _triton_kernels()
    assert kernels is not None
    n, c = input.shape
    acc = _accumulator(input.dtype)
    block_c, block_m, splits = kernels.statistics_blocks(n, c, _processors(input.device))
    partial = torch.empty((2, splits, n), dtype=acc, device=input.device)
    oc = torch.empty(n, dtype=acc, device=input.device)
    kernels.launch_statistics(input, target, partial, oc, block_m, block_c, splits)
    if splits == 1:
        return partial[0, 0], partial[1, 0], oc
    s, q = partial.sum(1)
    return s, q, oc


def gradient(
    input: Tensor,
    target: Tensor,
    valid: Tensor,
    upstream: Tensor,
    nan: Tensor,
    alpha: Tensor | None,
    beta: Tensor,
    gamma: Tensor,
) -> Tensor:
    """``g_i·(α_i + 2β_i·o_ik + γ_i·[k = c_i])`` for every row ``i`` and class ``k``, in one
    pass over the logits ``input``, written in their dtype; ``g_i`` is the ``upstream``
    gradient plus ``nan`` (0, or NaN where a row's output is not finite) where ``valid``, else
    0. ``alpha`` ``None``: no constant term. The per-row tensors broadcast to ``(N,)`` (no copy
    is made of a scalar); ``nan`` and the partials are in the accumulation dtype.
    """
    kernels = _triton_kernels()
    assert kernels is not None
    n, c = input.shape

    def rows(t: Tensor) -> Tensor:
        return torch.broadcast_to(t, (n,))

    out = torch.empty((n, c), dtype=input.dtype, device=input.device)
    kernels.launch_gradient(
        input,
        target,
        valid,
        rows(upstream),
        rows(nan),
        None if alpha is None else rows(alpha),
        rows(beta),
        rows(gamma),
        out,
    )
    return out
