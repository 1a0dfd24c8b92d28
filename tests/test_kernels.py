"""The dense engine's fused kernels (Triton): each against a float64 reference, and the engine
with them against the engine without them, for every member and convention.

On a machine without CUDA the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before the kernels are first imported); with CUDA they run
compiled, on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import spherical_losses as sl  # noqa: E402
from spherical_losses import _kernels, family, functional  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if CUDA else "cpu"
MEMBERS = [
    ("taylor", {}),
    ("taylor", {"margin": 0.5}),
    ("spherical", {"eps": 0.05}),
    ("softmax_bound", {}),
    ("softmax_bound", {"xi": 1.0}),
    ("z_loss", {"a": 2.0, "b": 0.5}),
    ("mse", {}),
]


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "INTERPRET_ON_CPU", not CUDA)
    monkeypatch.delenv("SPHERICAL_LOSSES_KERNELS", raising=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def logits(n: int, c: int, dtype: torch.dtype = F64, scale: float = 3.0) -> torch.Tensor:
    return (scale * torch.randn(n, c, dtype=F64)).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "n, c",
    # (3, 5000): 5 splits of the rows' columns; (4096, 10): many rows per program
    [(1, 1), (7, 10), (3, 5000), (33, 3000), (4096, 10), (2, 70_000)],
)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
def test_statistics_match_float64(n: int, c: int, dtype: torch.dtype) -> None:
    torch.manual_seed(n + c)
    x = logits(n, c, dtype, scale=1.0 if dtype == torch.float16 else 3.0)
    target = torch.randint(0, c, (n,), device=DEVICE)
    assert _kernels.enabled(x)
    s, q, oc = _kernels.statistics(x, target)
    assert s.dtype == q.dtype == oc.dtype == (F64 if dtype == F64 else torch.float32)
    ref = family.statistics(x.double(), target)  # the float64 values of the same logits
    tol = 1e-13 if dtype == F64 else 1e-6
    for got, want in zip((s, q, oc), ref, strict=True):
        assert got.shape == (n,)
        assert rel(got, want) <= tol


def test_statistics_row_stride_and_bad_targets() -> None:
    torch.manual_seed(0)
    wide = logits(6, 50)
    x = wide[:, 5:45]  # rows 50 apart, 40 columns
    target = torch.tensor([0, 39, 40, -1, 7, 100], device=DEVICE)
    s, q, oc = _kernels.statistics(x, target)
    ref_s, ref_q, _ = family.statistics(x.contiguous(), target.clamp(0, 39))
    assert rel(s, ref_s) <= 1e-13 and rel(q, ref_q) <= 1e-13
    # A target outside [0, C) reads nothing: o_c is NaN there.
    assert oc[[2, 3, 5]].isnan().all()
    assert rel(oc[[0, 1, 4]], x[[0, 1, 4], [0, 39, 7]]) == 0


@pytest.mark.parametrize("n, c", [(7, 10), (33, 3000), (4096, 10), (2, 70_000)])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("constant", [True, False])
def test_gradient_matches_float64(n: int, c: int, dtype: torch.dtype, constant: bool) -> None:
    torch.manual_seed(n * c)
    wide = logits(n, c + 3, dtype)
    x = wide[:, :c]  # a row stride that is not C
    target = torch.randint(0, c, (n,), device=DEVICE)
    acc = F64 if dtype == F64 else torch.float32
    up, a, b, g = (torch.randn(n, dtype=acc, device=DEVICE) for _ in range(4))
    valid = torch.rand(n, device=DEVICE) < 0.8
    nan = torch.zeros(n, dtype=acc, device=DEVICE)
    nan[-1] = float("nan")  # a row whose output was not finite
    out = _kernels.gradient(x, target, valid, up.to(dtype), nan, a if constant else None, b, g)
    assert out.dtype == dtype and out.shape == (n, c) and out.is_contiguous()
    kept = torch.where(valid, up.to(dtype).double() + nan.double(), 0.0)[:, None]
    ref = 2.0 * b.double()[:, None] * x.double() + (a.double()[:, None] if constant else 0.0)
    ref[torch.arange(n), target] += g.double()
    ref = kept * ref
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[~valid].eq(0).all()
    # float64: exact but for the rounding of a fused multiply-add; otherwise the rounding of
    # the result to the logits' dtype.
    tol = {F64: 1e-15, torch.float32: 1e-7, torch.bfloat16: 4e-3}[dtype]
    finite = ref.isfinite()
    assert rel(out[finite], ref[finite]) <= tol


def test_gradient_reads_scalars_broadcast() -> None:
    x = logits(5, 12)
    target = torch.arange(5, device=DEVICE)
    valid = torch.ones(5, dtype=torch.bool, device=DEVICE)
    zero, one = (torch.full((), v, dtype=F64, device=DEVICE) for v in (0.0, 1.0))
    out = _kernels.gradient(x, target, valid, one, zero, None, one, zero)
    assert rel(out, 2.0 * x) == 0
    out = _kernels.gradient(x, target, valid, 3.0 * one, zero, one, zero, one)
    assert rel(out, 3.0 * (1.0 + torch.eye(5, 12, dtype=F64, device=DEVICE))) == 0


def engine(x, target, name, options, kernels_on, **conventions):
    """The loss and its gradient, with the kernels on or off."""
    x = x.detach().clone().requires_grad_(True)
    os.environ["SPHERICAL_LOSSES_KERNELS"] = "1" if kernels_on else "0"
    try:
        loss = sl.spherical_loss(x, target, family.get_member(name, **options), **conventions)
        (
            loss * torch.arange(1, loss.numel() + 1, device=x.device).view(loss.shape)
        ).sum().backward()
    finally:
        del os.environ["SPHERICAL_LOSSES_KERNELS"]
    return loss.detach(), x.grad


@pytest.mark.parametrize("name, options", MEMBERS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_engine_with_kernels_equals_without(monkeypatch, name, options, reduction) -> None:
    calls = []
    for fn in ("statistics", "gradient"):
        real = getattr(_kernels, fn)
        monkeypatch.setattr(_kernels, fn, lambda *a, _f=real, _n=fn: calls.append(_n) or _f(*a))
    torch.manual_seed(1)
    n, c = 40, 300
    x = logits(n, c, scale=1.0)
    target = torch.randint(0, c, (n,), device=DEVICE)
    target[::7] = -100
    weight = torch.rand(c, dtype=F64, device=DEVICE) + 0.5
    kw = {"weight": weight, "reduction": reduction}
    loss, grad = engine(x, target, name, options, True, **kw)
    assert calls == ["statistics", "gradient"]  # the kernels ran, forward and backward
    ref_loss, ref_grad = engine(x, target, name, options, False, **kw)
    assert calls == ["statistics", "gradient"]  # and were off for the reference
    assert rel(loss, ref_loss) <= 1e-13
    assert rel(grad, ref_grad) <= 1e-13
    assert (grad[::7] == 0).all()  # ignored rows


@pytest.mark.parametrize("name, options", MEMBERS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_low_precision(name, options, dtype) -> None:
    torch.manual_seed(2)
    x = logits(64, 1000, dtype, scale=1.0)
    target = torch.randint(0, 1000, (64,), device=DEVICE)
    loss, grad = engine(x, target, name, options, True)
    ref_loss, ref_grad = engine(x, target, name, options, False)
    assert loss.dtype == ref_loss.dtype == dtype and grad.dtype == dtype
    # (bfloat16: each result is within its unit roundoff, 2⁻⁸, of the float32 one)
    tol = 1e-6 if dtype == torch.float32 else 2 * 2.0**-8
    assert rel(loss, ref_loss) <= tol
    assert rel(grad, ref_grad) <= tol


# (On a GPU each new shape compiles a kernel: fewer examples there.)
@settings(deadline=None, max_examples=10 if CUDA else 30)
@given(
    n=st.integers(1, 9),
    c=st.integers(2, 2100),  # (the bound needs 2 classes)
    name=st.sampled_from([m for m, _ in MEMBERS]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_engine_with_kernels_property(n, c, name, reduction, seed) -> None:
    torch.manual_seed(seed)
    x = logits(n, c, scale=1.0)
    target = torch.randint(0, c, (n,), device=DEVICE)
    loss, grad = engine(x, target, name, {}, True, reduction=reduction)
    ref_loss, ref_grad = engine(x, target, name, {}, False, reduction=reduction)
    # (elementwise: a gradient that cancels to rounding noise, as the Z-loss's at C = 2, has
    # no meaningful norm-wise relative error)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_non_finite_logits_give_nan_as_without_kernels() -> None:
    x = logits(4, 30)
    x[1, 3] = float("inf")
    target = torch.tensor([0, 1, 2, 3], device=DEVICE)
    loss, grad = engine(x, target, "taylor", {}, True, reduction="none")
    ref_loss, ref_grad = engine(x, target, "taylor", {}, False, reduction="none")
    assert loss.isnan().tolist() == ref_loss.isnan().tolist() == [False, True, False, False]
    assert torch.equal(grad.isnan(), ref_grad.isnan())


def test_kernels_stay_out_of_traced_code_and_can_be_turned_off(monkeypatch) -> None:
    x = logits(3, 8)
    assert _kernels.enabled(x)
    assert not _kernels.enabled(x.t())  # (columns not contiguous)
    assert not _kernels.enabled(x[0])  # (one row: the engine makes rows first)
    assert not _kernels.enabled(x.int())
    assert not _kernels.enabled(x[:0])
    monkeypatch.setenv("SPHERICAL_LOSSES_KERNELS", "0")
    assert not _kernels.enabled(x)
    monkeypatch.delenv("SPHERICAL_LOSSES_KERNELS")
    seen = []
    torch.func.vmap(lambda row: seen.append(_kernels.enabled(row.unsqueeze(0))) or row)(x)
    assert seen == [False]
    # Under torch.func.grad the engine takes its differentiable path, with the same result.
    target = torch.tensor([1, 2, 3], device=DEVICE)
    grad = torch.func.grad(lambda v: sl.taylor_cross_entropy(v, target))(x)
    assert rel(grad, engine(x, target, "taylor", {}, True)[1]) <= 1e-13


def test_disabled_off_cuda_without_the_interpreter_flag(monkeypatch) -> None:
    monkeypatch.setattr(_kernels, "INTERPRET_ON_CPU", False)
    assert not _kernels.enabled(torch.randn(3, 8))
    assert functional.kernels is _kernels  # (the engine reads the same switch)


# (At large ξ, sinh² overflows to inf in both, as intended; the interpreter warns about it.)
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("num_classes", [3, 10, 1000, 793_471])
def test_optimal_xi_kernel_matches_the_reference(monkeypatch, num_classes) -> None:
    torch.manual_seed(num_classes)
    # v = q − s²/D from 0 (the root at log(D − 1)) to far beyond
    v = torch.cat([torch.zeros(3), 10.0 ** torch.linspace(-12, 12, 200)]).to(F64).to(DEVICE)
    assert _kernels.optimal_xi_enabled(v)
    xi = family._optimal_xi(v, num_classes)
    monkeypatch.setenv("SPHERICAL_LOSSES_KERNELS", "0")
    ref = family._optimal_xi(v, num_classes)  # the PyTorch operations, the same steps
    # (sinh from exp in the kernel: a few units of rounding apart)
    torch.testing.assert_close(xi, ref, rtol=1e-13, atol=0)
    assert (xi[:3] == torch.log(torch.tensor(num_classes - 1.0, dtype=F64))).all()
