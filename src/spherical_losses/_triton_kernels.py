"""The Triton kernels behind :mod:`._kernels` (imported only where Triton is installed).

Both kernels take rows of logits with unit column stride and any row stride, and index rows in
int64 (``N·C`` may pass 2³¹). Block shapes are chosen from ``(N, C)`` so that each program
reads about 4,096 values per iteration, and the statistics split long rows over several
programs when there are too few rows to fill the GPU (the partial sums are added afterwards, in
a fixed order: the result is deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_TILE = 4096  # values per program and iteration
_MAX_BLOCK_C = 1024
_PROGRAMS_PER_PROCESSOR = 4


@triton.jit
def _statistics_kernel(
    x_ptr, t_ptr, partial_ptr, oc_ptr, N, C, stride,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ITERATIONS: tl.constexpr,
):  # fmt: skip
    # (The loop's length is a constant of the compiled kernel: one kernel per (C, splits) in
    # use, and Triton's interpreter runs it, which it does not for a length given at run time.)
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = oc_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    base = rows.to(tl.int64) * stride
    s = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
    q = tl.zeros((BLOCK_M, BLOCK_C), dtype=acc_ty)
    first = split * (ITERATIONS * BLOCK_C)
    for iteration in range(ITERATIONS):
        cols = first + iteration * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_ty)
        s += x
        q += x * x
    out = split * N + rows
    tl.store(partial_ptr + out, tl.sum(s, axis=1), mask=row_ok)
    tl.store(partial_ptr + tl.num_programs(1) * N + out, tl.sum(q, axis=1), mask=row_ok)
    # o_c, by the first split only; a target outside [0, C) gives NaN, not a stray read.
    t = tl.load(t_ptr + rows, mask=row_ok, other=0)
    inside = (t >= 0) & (t < C)
    oc = tl.load(x_ptr + base + t, mask=row_ok & inside & (split == 0), other=0.0).to(acc_ty)
    oc = tl.where(inside, oc, float("nan"))
    tl.store(oc_ptr + rows, oc, mask=row_ok & (split == 0))


@triton.jit
def _gradient_kernel(
    x_ptr, t_ptr, valid_ptr, up_ptr, up_stride, nan_ptr, a_ptr, a_stride, b_ptr, b_stride,
    g_ptr, g_stride, out_ptr, N, C, stride_x, stride_out,
    HAS_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    acc_ty = nan_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    # The upstream gradient of each row: 0 where ignored, NaN where an output is not finite.
    valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
    up = tl.load(up_ptr + rows * up_stride, mask=row_ok, other=0.0).to(acc_ty)
    up = tl.where(valid, up + tl.load(nan_ptr + rows, mask=row_ok, other=0.0), 0.0)
    b = 2.0 * tl.load(b_ptr + rows * b_stride, mask=row_ok, other=0.0) * up
    grad = x.to(acc_ty) * b[:, None]
    if HAS_A:
        grad += (tl.load(a_ptr + rows * a_stride, mask=row_ok, other=0.0) * up)[:, None]
    t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(g_ptr + rows * g_stride, mask=row_ok, other=0.0) * up
    grad += tl.where(cols[None, :] == t[:, None], g[:, None], 0.0)
    out = out_ptr + rows64[:, None] * stride_out + cols[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(n: int, c: int) -> tuple[int, int]:
    block_c = min(triton.next_power_of_2(c), _MAX_BLOCK_C)
    block_m = min(max(1, _TILE // block_c), triton.next_power_of_2(n))
    return block_c, block_m


def statistics_blocks(n: int, c: int, processors: int) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_M, splits)`` for the statistics of ``(n, c)`` logits."""
    block_c, block_m = _blocks(n, c)
    programs = triton.cdiv(n, block_m)
    wanted = _PROGRAMS_PER_PROCESSOR * processors
    splits = 1
    if programs < wanted:
        splits = max(1, min(triton.cdiv(c, block_c), wanted // programs))
    return block_c, block_m, splits


def launch_statistics(
    x: Tensor, target: Tensor, partial: Tensor, oc: Tensor, block_m: int, block_c: int,
    splits: int,
) -> None:  # fmt: skip
    n, c = x.shape
    # Each split reads ITERATIONS blocks of columns (the last split may read fewer).
    iterations = triton.cdiv(triton.cdiv(c, splits), block_c)
    grid = (triton.cdiv(n, block_m), splits)
    _statistics_kernel[grid](
        x, target, partial, oc, n, c, x.stride(0),
        BLOCK_M=block_m, BLOCK_C=block_c, ITERATIONS=iterations, num_warps=4,
    )  # fmt: skip


def launch_gradient(
    x: Tensor, target: Tensor, valid: Tensor, upstream: Tensor, nan: Tensor,
    alpha: Tensor | None, beta: Tensor, gamma: Tensor, out: Tensor,
) -> None:  # fmt: skip
    """Each of ``upstream``, ``alpha``, ``beta``, ``gamma``: ``(N,)`` or a broadcast view of it
    (stride 0), in float32 (float64 for float64 logits) but ``upstream``, in any dtype.
    """
    n, c = x.shape
    block_c, block_m = _blocks(n, c)
    grid = (triton.cdiv(n, block_m), triton.cdiv(c, block_c))
    a = beta if alpha is None else alpha
    _gradient_kernel[grid](
        x, target, valid, upstream, upstream.stride(0), nan, a, a.stride(0), beta,
        beta.stride(0), gamma, gamma.stride(0), out, n, c, x.stride(0), out.stride(0),
        HAS_A=alpha is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip


@triton.jit
def _optimal_xi_kernel(
    v_ptr, xi_ptr, N, D, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # The safeguarded Newton iteration of family._optimal_xi, in float64, for BLOCK examples.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    v = tl.load(v_ptr + offs, mask=ok, other=0.0).to(tl.float64)
    d = D.to(tl.float64)
    c1 = 4.0 * (d - 1.0)
    c2 = (d - 2.0) * (d - 2.0)
    target = d * v
    lo = tl.zeros_like(v) + tl.log(d - 1.0)
    at_lo = target <= 0.0
    # 2·asinh(sqrt(2 c2 / c1)), asinh(x) = log(x + sqrt(x² + 1))
    r = tl.sqrt(2.0 * c2 / c1)
    floor = 2.0 * tl.log(r + tl.sqrt(r * r + 1.0))
    hi = tl.maximum(tl.sqrt(2.0 * target / c1), floor) + 1.0
    xi = tl.where(at_lo, lo, hi)
    for _ in range(ITERATIONS):
        e = tl.exp(0.5 * xi)
        sh = 0.5 * (e - 1.0 / e)
        sh2 = sh * sh
        inv_sh2 = 1.0 / sh2
        bracket = c1 - c2 * inv_sh2
        xi2 = xi * xi
        g = xi2 * bracket - target
        slope = 2.0 * xi * bracket + xi2 * c2 * inv_sh2 * tl.sqrt((1.0 + sh2) * inv_sh2)
        above = g > 0.0
        hi = tl.where(above, xi, hi)
        lo = tl.where(above, lo, xi)
        step = xi - g / slope
        inside = (step >= lo) & (step <= hi)
        xi = tl.where(at_lo, lo, tl.where(inside, step, 0.5 * (lo + hi)))
    tl.store(xi_ptr + offs, xi, mask=ok)


def launch_optimal_xi(v: Tensor, xi: Tensor, num_classes: int, iterations: int) -> None:
    n = v.numel()
    block = 256
    _optimal_xi_kernel[(triton.cdiv(n, block),)](
        v, xi, n, num_classes, ITERATIONS=iterations, BLOCK=block, num_warps=4
    )
