"""The linear layer + spherical loss without logits: exactness against the dense engine on
``F.linear`` logits, gradients, precision, optimizers, memory, inference and errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import spherical_losses as sl
from spherical_losses import family
from spherical_losses import linear as linear_mod

SPHERICAL = [n for n in family.member_names() if family.get_member(n).spherical]
METHODS = ["gram", "chunked"]
F64 = torch.float64


class ScaledSquares(family.SphericalMember):
    """A user-defined member with only ``loss`` (partials by autograd), depending on ``s`` too."""

    name = "scaled_squares"

    def loss(self, s, q, oc, D):
        return 0.5 * (q - 2 * oc + 1) + 0.1 * s * s / D


MEMBERS = [*SPHERICAL, ScaledSquares()]


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of a few classes in the chunked method, so that tests cross block boundaries."""
    monkeypatch.setattr(linear_mod, "_CHUNK_ELEMENTS", 24)


def _case(seed, shape=(3, 4), D=13, d=5, bias=True, dtype=torch.float64, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=g, dtype=dtype).requires_grad_()
    W = (scale * torch.randn(D, d, generator=g, dtype=dtype)).requires_grad_()
    b = (scale * torch.randn(D, generator=g, dtype=dtype)).requires_grad_() if bias else None
    y = torch.randint(D, shape, generator=g)
    return h, W, b, y


def _grads(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss.sum(), tensors)


def _dense(h, W, b, y, member, **kw):
    return sl.spherical_loss(F.linear(h, W, b).movedim(-1, 1), y, member, **kw)


# --------------------------------------------------------------------------------------------
# exactness against the dense engine (float64)


@pytest.mark.parametrize("member", MEMBERS, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_reference(member, bias, weighted, ignore, reduction, method, small_chunks):
    h, W, b, y = _case(0, bias=bias)
    weight = torch.rand(13, dtype=torch.float64) + 0.1 if weighted else None
    if ignore:
        y[0, 1] = y[2, 3] = 7
    kw = {"weight": weight, "reduction": reduction, "ignore_index": 7 if ignore else -100}
    got = sl.linear_spherical_loss(h, W, y, member, linear_bias=b, method=method, **kw)
    want = _dense(h, W, b, y, member, **kw)
    assert got.shape == want.shape == (y.shape if reduction == "none" else ())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, r in zip(_grads(got, (h, W, b)), _grads(want, (h, W, b)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@settings(deadline=None)  # (the first examples pay for the member's first call)
@given(
    m=st.integers(0, 6),
    D=st.integers(2, 12),
    d=st.integers(1, 6),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    member=st.sampled_from(SPHERICAL),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_reference_any_size(m, D, d, scale, member, method, seed):
    h, W, b, y = _case(seed, shape=(m,), D=D, d=d, scale=scale)
    kw = {"reduction": "sum"}
    got = sl.linear_spherical_loss(h, W, y, member, linear_bias=b, method=method, **kw)
    want = _dense(h, W, b, y, member, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, r in zip(_grads(got, (h, W, b)), _grads(want, (h, W, b)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_unbatched_input(method):
    h, W, b, y = _case(1, shape=())
    for reduction in ("none", "mean"):
        got = sl.linear_spherical_loss(h, W, y, linear_bias=b, reduction=reduction, method=method)
        want = sl.spherical_loss(F.linear(h, W, b), y, "taylor", reduction=reduction)
        assert got.shape == ()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_all_ignored_mean_is_nan_with_zero_gradient(method):
    h, W, b, y = _case(2)
    y.fill_(-100)
    loss = sl.linear_spherical_loss(h, W, y, linear_bias=b, method=method)
    assert torch.isnan(loss)
    for g in _grads(loss, (h, W, b)):
        assert torch.equal(g, torch.zeros_like(g))
    total = sl.linear_spherical_loss(h, W, y, linear_bias=b, reduction="sum", method=method)
    assert total.item() == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_input_gives_nan_as_dense(method):
    h, W, b, y = _case(3)
    h = h.detach().clone()
    h[1, 2, 0] = float("inf")
    got = sl.linear_spherical_loss(h, W, y, linear_bias=b, reduction="none", method=method)
    want = _dense(h, W, b, y, "taylor", reduction="none")
    assert torch.isnan(got[1, 2]) and torch.isnan(want[1, 2])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("member", ["taylor", "softmax_bound", "z_loss"])
def test_gradcheck(method, member, small_chunks):
    h, W, b, y = _case(4, shape=(5,), D=9, d=4)
    y[3] = -100
    weight = torch.rand(9, dtype=torch.float64) + 0.5

    def f(h, W, b):
        return sl.linear_spherical_loss(
            h, W, y, member, linear_bias=b, weight=weight, reduction="none", method=method
        )

    assert torch.autograd.gradcheck(f, (h, W, b))


# --------------------------------------------------------------------------------------------
# precision


def test_float32_at_100000_classes():
    # The bar: 1e-5 on the loss, 1e-4 normwise relative on the gradients, against a
    # float64 dense reference of the same float32 values.
    h, W, b, y = _case(5, shape=(64,), D=100_000, d=64, dtype=torch.float32, scale=0.125)
    loss = sl.linear_spherical_loss(h, W, y, linear_bias=b, method="gram")
    grads = _grads(loss, (h, W, b))
    h64, W64, b64 = (t.detach().double().requires_grad_() for t in (h, W, b))
    ref = _dense(h64, W64, b64, y, "taylor")
    refs = _grads(ref, (h64, W64, b64))
    assert abs(loss.item() - ref.item()) <= 1e-5
    for g, r in zip(grads, refs, strict=True):
        assert (torch.linalg.vector_norm(g.double() - r) / torch.linalg.vector_norm(r)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    # Logits about 16 ± 1 over 20,000 classes: the Z-loss's variance q/D − (s/D)² ≈ 1 is left
    # of q/D ≈ 257 once the statistics are rounded to half precision (off by 40% to 280%), but
    # not in float32: the result is then the reference up to its rounding to the input's dtype.
    h, W, b, y = _case(6, shape=(16,), D=20_000, d=32, dtype=dtype, scale=0.2)
    b = (b.detach() + 16).to(dtype).requires_grad_()
    got = sl.linear_spherical_loss(h, W, y, "z_loss", linear_bias=b, reduction="none")
    assert got.dtype == dtype
    h64, W64, b64 = (t.detach().double() for t in (h, W, b))
    want = _dense(h64, W64, b64, y, "z_loss", reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=0)
    grads = _grads(got.float().sum(), (h, W, b))
    assert [g.dtype for g in grads] == [dtype] * 3


def test_autocast_computes_in_float32():
    h, W, b, y = _case(7, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sl.linear_spherical_loss(h.bfloat16(), W, y, linear_bias=b)
    assert got.dtype == torch.float32
    want = sl.linear_spherical_loss(h.bfloat16().float(), W, y, linear_bias=b)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    grad_h, grad_W = torch.autograd.grad(got, (h, W))
    assert grad_h.dtype == grad_W.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_stays_off_for_the_gram_matrix():
    h, W, b, y = (
        t.cuda() if t is not None else t
        for t in _case(8, shape=(256,), D=50_000, d=128, dtype=torch.float32)
    )
    h64, W64, b64 = (t.detach().double() for t in (h, W, b))
    want = _dense(h64, W64, b64, y, "taylor")
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        got = sl.linear_spherical_loss(h, W, y, linear_bias=b, method="gram")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    assert abs(got.item() - want.item()) <= 1e-5


# --------------------------------------------------------------------------------------------
# training: optimizers, tied weights, torch.compile


def test_adam_trajectory_equals_dense_taylor():
    torch.manual_seed(9)
    D, d = 40, 6
    body = torch.nn.Sequential(torch.nn.Linear(10, d), torch.nn.Tanh()).double()
    head = sl.LinearSphericalLoss(d, D, "taylor", bias=True, dtype=torch.float64)
    body2, head2 = copy.deepcopy(body), copy.deepcopy(head.linear)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=0.05)
    opt2 = torch.optim.Adam([*body2.parameters(), *head2.parameters()], lr=0.05)
    for step in range(15):
        x = torch.randn(32, 10, dtype=torch.float64)
        y = torch.randint(D, (32,))
        opt.zero_grad()
        head(body(x), y).backward()
        opt.step()
        opt2.zero_grad()
        sl.spherical_loss(head2(body2(x)), y, "taylor").backward()
        opt2.step()
        for p, p2 in zip([*body.parameters(), *head.parameters()],
                         [*body2.parameters(), *head2.parameters()], strict=True):  # fmt: skip
            torch.testing.assert_close(p, p2, rtol=1e-10, atol=1e-12, msg=f"step {step}")


@pytest.mark.parametrize("method", METHODS)
def test_tied_input_and_output_weights(method):
    # A language model whose input embedding is its output weight.
    g = torch.Generator().manual_seed(10)
    E = (0.3 * torch.randn(17, 6, generator=g, dtype=torch.float64)).requires_grad_()
    x, y = torch.randint(17, (2, 9), generator=g), torch.randint(17, (2, 9), generator=g)

    def feat(E):
        return torch.tanh(E[x]).cumsum(1)

    got = torch.autograd.grad(sl.linear_spherical_loss(feat(E), E, y, method=method), E)[0]
    want = torch.autograd.grad(_dense(feat(E), E, None, y, "taylor"), E)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_transposed_weight(method, small_chunks):
    # A weight stored as (d, D) and passed as a transposed view.
    h, W, b, y = _case(15)
    P = W.detach().T.contiguous().requires_grad_()
    got = sl.linear_spherical_loss(h, P.T, y, linear_bias=b, method=method)
    want = _dense(h, P.T, b, y, "taylor")
    for g, r in zip(_grads(got, (h, P, b)), _grads(want, (h, P, b)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_is_reproducible_with_repeated_targets(method):
    # Many examples per class: the sums at the targets are taken in a fixed order.
    h, W, b, y = _case(16, shape=(2048,), D=50, d=64, dtype=torch.float32)
    y = y % 5
    first, second = (
        _grads(sl.linear_spherical_loss(h, W, y, linear_bias=b, method=method), (h, W, b))
        for _ in range(2)
    )
    for g1, g2 in zip(first, second, strict=True):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("method", METHODS)
def test_torch_compile(method):
    torch._dynamo.reset()
    h, W, b, y = _case(11)
    weight = torch.rand(13, dtype=torch.float64)

    def f(h, W, b):
        return sl.linear_spherical_loss(h, W, y, linear_bias=b, weight=weight, method=method)

    compiled = torch.compile(f, backend="aot_eager")
    got, want = compiled(h, W, b), f(h, W, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, r in zip(_grads(got, (h, W, b)), _grads(want, (h, W, b)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# memory and method choice


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn().backward()
    return max(e.cpu_memory_usage for e in prof.events())


def test_no_tensor_of_size_m_by_D():
    # m × D is 20 M floats (80 MB); the profiler's memory records of every operation of the
    # forward and backward stay far below it (the largest is the weight's gradient, D × d).
    m, D, d = 1024, 20_000, 16
    h, W, b, y = _case(12, shape=(m,), D=D, d=d, dtype=torch.float32)
    logits_bytes = m * D * 4
    got = _largest_allocation(lambda: sl.linear_spherical_loss(h, W, y, linear_bias=b))
    assert got < logits_bytes / 8
    # The measurement sees the logits where they exist.
    assert _largest_allocation(lambda: _dense(h, W, b, y, "taylor")) >= logits_bytes


def test_chunked_method_bounds_its_blocks():
    m, D, d = 64, 200_000, 8
    h, W, b, y = _case(13, shape=(m,), D=D, d=d, dtype=torch.float32)
    got = _largest_allocation(
        lambda: sl.linear_spherical_loss(h, W, y, linear_bias=b, method="chunked")
    )
    assert got <= max(4 * linear_mod._CHUNK_ELEMENTS, 4 * D * d) * 1.01


def test_arithmetic_model_and_auto_choice():
    m, D, d = 4096, 100_000, 256
    ratio = linear_mod.arithmetic_cost("dense", m, D, d) / linear_mod.arithmetic_cost(
        "gram", m, D, d
    )
    assert ratio == pytest.approx(1.5 * m * D / (d * (D + m)))
    assert linear_mod._resolve_method("auto", m, D, d, True, True) == "gram"
    assert linear_mod._resolve_method("auto", 8, D, d, True, True) == "chunked"
    # Without the weight's gradient, the Gram matrix is paid for by fewer rows.
    assert linear_mod._resolve_method("auto", 64, D, d, True, False) == "chunked"
    assert linear_mod._resolve_method("auto", 512, D, d, True, False) == "gram"


# --------------------------------------------------------------------------------------------
# the module: as nn.LinearCrossEntropyLoss, log_prob, topk


def test_module_mirrors_linear_cross_entropy_loss():
    weight = torch.rand(11)
    ours = sl.LinearSphericalLoss(5, 11, bias=True, weight=weight, reduction="sum")
    theirs = torch.nn.LinearCrossEntropyLoss(5, 11, bias=True, weight=weight, reduction="sum")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    h, y = torch.randn(6, 5), torch.randint(11, (6,))
    want = sl.spherical_loss(ours.linear(h), y, "taylor", weight=weight, reduction="sum")
    torch.testing.assert_close(ours(h, y), want)
    assert "num_classes=11" in repr(ours)


@pytest.mark.parametrize("member", ["taylor", "spherical"])
@pytest.mark.parametrize("m", [1, 64])  # the statistics by chunks, and by the Gram matrix
def test_log_prob_is_exact(member, m):
    crit = sl.LinearSphericalLoss(8, 50, member, bias=True, dtype=torch.float64, ignore_index=3)
    h = torch.randn(m, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(50, (m,))
    y[0] = 3
    got = crit.log_prob(h, y)
    full = family.get_member(member).log_probs(crit.linear(h)).gather(1, y[:, None])[:, 0]
    want = full.masked_fill(y == 3, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(*(torch.autograd.grad(t.sum(), h)[0] for t in (got, want)))


@pytest.mark.parametrize("by", ["logit", "probability"])
def test_topk_by_chunks(by):
    crit = sl.LinearSphericalLoss(6, 31, "spherical", bias=True, dtype=torch.float64)
    h = torch.randn(2, 3, 6, dtype=torch.float64)
    values, indices = crit.topk(h, 5, chunk_size=7, by=by)
    logits = crit.linear(h)
    scores = logits if by == "logit" else family.Spherical().log_probs(logits)
    want_values, want_indices = scores.topk(5)
    assert values.shape == indices.shape == (2, 3, 5)
    torch.testing.assert_close(values, want_values, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, want_indices)
    v1, i1 = crit.topk(h[0, 0], 5, by=by)
    assert v1.shape == (5,) and torch.equal(i1, want_indices[0, 0])


# --------------------------------------------------------------------------------------------
# errors


def _call(**kw):
    h, W, b, y = _case(14)
    args = {"input": h, "linear_weight": W, "target": y, "linear_bias": b} | kw
    return sl.linear_spherical_loss(**args)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"loss": "log_softmax"}, ValueError, "'log_softmax' loss .* is not spherical"),
        ({"loss": family.Taylor(order=4)}, ValueError, "'taylor' loss .*order=4.* not spherical"),
        ({"loss": "nope"}, ValueError, "unknown loss 'nope'"),
        ({"method": "dense"}, ValueError, "method must be one of 'auto', 'gram', 'chunked'"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"weight": torch.ones(12, dtype=F64)}, ValueError, "1-D tensor of 13"),
        ({"target": torch.full((3, 4), 13)}, IndexError, "Target 13 is out of bounds for 13"),
        ({"target": torch.zeros(3, 4)}, ValueError, "class indices"),
        (
            {"target": torch.zeros(3, 5, dtype=torch.long)},
            ValueError,
            r"target must have shape \(3, 4\)",
        ),
        (
            {"input": torch.randn(3, 4, 6, dtype=F64)},
            RuntimeError,
            r"input must have shape \(\.\.\., 5\)",
        ),
        ({"input": torch.ones(3, 4, 5, dtype=torch.long)}, ValueError, "input must be a floating"),
        (
            {"linear_weight": torch.randn(13, 5, 1, dtype=F64)},
            ValueError,
            "linear_weight must have",
        ),
        (
            {"linear_bias": torch.randn(12, dtype=F64)},
            RuntimeError,
            r"linear_bias must have shape \(13,\)",
        ),
        ({"linear_weight": torch.randn(13, 5)}, RuntimeError, "same dtype"),
    ],
)
def test_errors(kw, error, match):
    with pytest.raises(error, match=match):
        _call(**kw)


def test_module_errors():
    with pytest.raises(ValueError, match="'log_softmax' loss"):
        sl.LinearSphericalLoss(4, 10, "log_softmax")
    with pytest.raises(ValueError, match="method must be one of"):
        sl.LinearSphericalLoss(4, 10, method="fast")
    with pytest.raises(ValueError, match="1-D tensor of 10"):
        sl.LinearSphericalLoss(4, 10, weight=torch.ones(3))
    crit = sl.LinearSphericalLoss(4, 10, "z_loss")
    h = torch.randn(2, 4)
    with pytest.raises(ValueError, match="'z_loss' loss defines no class probabilities"):
        crit.log_prob(h, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="defines no class probabilities; use by='logit'"):
        crit.topk(h, 2, by="probability")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\], got 11"):
        crit.topk(h, 11)
    with pytest.raises(ValueError, match="by must be 'logit' or 'probability'"):
        crit.topk(h, 2, by="prob")
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        crit.topk(h, 2, chunk_size=0)
