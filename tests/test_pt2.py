"""PyTorch 2 for the dense losses (issue 14): torch.compile(fullgraph=True), torch.func, autocast,
and F.cross_entropy's exception for an out-of-range target, each side by side with PyTorch's own
behaviour.

torch.compile is slow on a CPU: the broad checks use the ``aot_eager`` backend (Dynamo's graph
capture and AOTAutograd's joint graph, no code generation), a few the default ``inductor``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacrev, vmap

import spherical_losses as sl
from spherical_losses import family

ALL = sl.member_names()
# Each member at its default options, plus the non-spherical Taylor order and the fixed-ξ bound.
VARIANTS = [(name, {}) for name in ALL] + [("taylor", {"order": 4}), ("softmax_bound", {"xi": 1.0})]
IDS = [name + "".join(f"-{k}={v}" for k, v in opt.items()) for name, opt in VARIANTS]
# The optimal-ξ search compiles to some 60 unrolled Newton steps (about 10 s on a CPU): it has
# one case of its own below instead of one per reduction.
QUICK = [(v, i) for v, i in zip(VARIANTS, IDS, strict=True) if v != ("softmax_bound", {})]


def _data(dtype: torch.dtype = torch.float32, seed: int = 0):
    """(N, C, d) logits, targets with ignored positions, class weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 3, generator=g, dtype=dtype)
    t = torch.randint(0, 6, (4, 3), generator=g)
    t[0, 0] = t[2, 1] = -100
    w = torch.rand(6, generator=g, dtype=dtype) + 0.5
    return x, t, w


def _forward_backward(fn, x: torch.Tensor, *args):
    x = x.clone().requires_grad_()
    out = fn(x, *args)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def _loss(name: str, opt: dict, reduction: str, weighted: bool = True):
    member = family.get_member(name, **opt)

    def loss(x, t, w):
        return sl.spherical_loss(x, t, member, w if weighted else None, reduction=reduction)

    return loss


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, no host synchronization, eager's results


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("variant"), [v for v, _ in QUICK], ids=[i for _, i in QUICK])
def test_compiled_equals_eager(variant, reduction: str) -> None:
    # fullgraph=True fails on any graph break: a .item(), a bool() of a tensor, an untraceable
    # call. The compiled forward and gradient equal eager's.
    torch._dynamo.reset()
    name, opt = variant
    loss = _loss(name, opt, reduction)
    x, t, w = _data()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, got_grad = _forward_backward(compiled, x, t, w)
    want, want_grad = _forward_backward(loss, x, t, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_compiled_optimal_bound_equals_eager() -> None:
    torch._dynamo.reset()
    loss = _loss("softmax_bound", {}, "mean")
    x, t, w = _data(torch.float64)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, got_grad = _forward_backward(compiled, x, t, w)
    want, want_grad = _forward_backward(loss, x, t, w)
    # (eager stops the search at convergence, compiled code after a fixed number of steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("name", "reduction"), [("taylor", "sum"), ("z_loss", "mean")])
def test_inductor_equals_eager_and_cross_entropy_compiles_alike(name: str, reduction: str) -> None:
    torch._dynamo.reset()
    x, t, w = _data()
    crit = sl.get_loss(name, weight=w, reduction=reduction)
    compiled = torch.compile(crit, fullgraph=True)
    got, got_grad = _forward_backward(compiled, x, t)
    want, want_grad = _forward_backward(crit, x, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    # A target out of range: compiled, a RuntimeError, as compiled F.cross_entropy gives.
    bad = t.clone()
    bad[1, 1] = 6
    with pytest.raises(RuntimeError):
        torch.compile(F.cross_entropy, fullgraph=True)(x, bad)
    with pytest.raises(RuntimeError):
        compiled(x, bad)


def test_module_holding_a_loss_compiles_with_fullgraph() -> None:
    torch._dynamo.reset()
    model = torch.nn.Linear(5, 6)
    crit = sl.TaylorCrossEntropyLoss(label_smoothing=0.1)
    h, t = torch.randn(8, 5), torch.randint(0, 6, (8,))
    t[3] = -100

    def step(h, t):
        return crit(model(h), t)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(h, t)
    (got_grad,) = torch.autograd.grad(got, model.weight)
    want = step(h, t)
    (want_grad,) = torch.autograd.grad(want, model.weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


# --------------------------------------------------------------------------------------------
# torch.func: grad, jacrev, hessian, vmap(grad(...)) for per-example gradients


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_torch_func_transforms_match_autograd(variant) -> None:
    name, opt = variant
    member = family.get_member(name, **opt)
    x, t, w = _data(torch.float64, seed=1)
    x, t = x[:, :, 0], t[:, 0]  # (N, C): the Hessian stays small

    def mean(x):
        return sl.spherical_loss(x, t, member, w)

    def per_example(x):
        return sl.spherical_loss(x, t, member, w, reduction="none")

    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(mean(xr), xr, create_graph=True)
    torch.testing.assert_close(grad(mean)(x), want.detach(), rtol=1e-10, atol=1e-12)
    want_jac = torch.autograd.functional.jacobian(per_example, x)
    torch.testing.assert_close(jacrev(per_example)(x), want_jac, rtol=1e-10, atol=1e-12)
    want_hessian = torch.autograd.functional.hessian(mean, x)
    torch.testing.assert_close(hessian(mean)(x), want_hessian, rtol=1e-8, atol=1e-10)
    # Per-example gradients (Opacus-style): vmap over the examples of the gradient of one.
    kept = t.clamp(min=0)

    def one(xi, ti):
        return sl.spherical_loss(xi, ti, member, reduction="sum")

    per = vmap(grad(one))(x, kept)
    rows = [torch.autograd.grad(one(xr[i], kept[i]), xr)[0][i] for i in range(len(kept))]
    torch.testing.assert_close(per, torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_log_softmax_under_torch_func_is_cross_entropy_under_torch_func() -> None:
    x, t, w = _data(torch.float64, seed=2)
    x, t = x[:, :, 0], t[:, 0]
    for transform in (grad, jacrev, hessian):
        got = transform(lambda x: sl.get_loss("log_softmax", weight=w)(x, t))(x)
        want = transform(lambda x: F.cross_entropy(x, t, w))(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    kept = t.clamp(min=0)
    got = vmap(grad(lambda x, t: sl.get_loss("log_softmax")(x, t)))(x, kept)
    want = vmap(grad(lambda x, t: F.cross_entropy(x, t)))(x, kept)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# autocast: computed in float32 and returned in float32, as F.cross_entropy


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_and_returns_float32(variant, dtype: torch.dtype) -> None:
    name, opt = variant
    member = family.get_member(name, **opt)
    x, t, w = _data()
    half = x.to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        loss = sl.spherical_loss(half, t, member, w)
        reference = F.cross_entropy(half, t, w)
    assert loss.dtype == reference.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, half)
    assert g.dtype == dtype  # (the gradient of the input, in the input's dtype, as for F)
    # The same numbers as the float32 loss of the half-precision logits.
    x32 = half.detach().float().requires_grad_()
    want = sl.spherical_loss(x32, t, member, w)
    (want_grad,) = torch.autograd.grad(want, x32)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    torch.testing.assert_close(g, want_grad.to(dtype), rtol=0, atol=0)


def test_autocast_compiled_equals_eager() -> None:
    torch._dynamo.reset()
    x, t, w = _data(torch.bfloat16)
    crit = sl.get_loss("taylor", weight=w.float())

    def step(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return crit(x, t)

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t)
    want = step(x, t)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_half_precision_without_autocast_keeps_its_dtype_as_cross_entropy() -> None:
    x, t, _ = _data(torch.bfloat16)
    for name in ALL:
        assert sl.spherical_loss(x, t, name).dtype == F.cross_entropy(x, t).dtype


# --------------------------------------------------------------------------------------------
# an out-of-range target: an IndexError, as F.cross_entropy raises (and a ValueError)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("shape", ["C", "NC", "NCd"])
def test_target_out_of_range_is_an_index_error_as_cross_entropy(variant, shape: str) -> None:
    name, opt = variant
    x, t, w = _data()
    if shape == "C":
        x, t = x[0, :, 0], torch.tensor(6)
    elif shape == "NC":
        x, t = x[:, :, 0], t[:, 0].clone()
        t[1] = -1
    else:
        t = t.clone()
        t[3, 2] = 17
    with pytest.raises(IndexError):
        F.cross_entropy(x, t, w)
    crit = sl.get_loss(name, weight=w, **opt)
    with pytest.raises(IndexError, match="out of bounds for 6 classes"):
        crit(x, t)
    with pytest.raises(ValueError, match="out of bounds for 6 classes"):
        crit(x, t)


# --------------------------------------------------------------------------------------------
# on a GPU: no synchronization at all in a loss call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_no_host_synchronization_on_cuda(variant) -> None:
    name, opt = variant
    x, t, w = (v.cuda() for v in _data())
    x.requires_grad_()
    crit = sl.get_loss(name, weight=w, **opt)
    crit(x, t).backward()  # (the first call may initialize things)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("none", "mean", "sum"):
            crit.reduction = reduction
            crit(x, t).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
