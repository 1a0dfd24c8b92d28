"""The dense losses: exact references, gradients, conventions, numbers and errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import spherical_losses as sl
from spherical_losses import family

# The member lists come from the registry and each member's declared properties (at its
# default options).
ALL = sl.member_names()
SPHERICAL = [name for name in ALL if sl.get_member(name).spherical]
WITH_PROBS = [name for name in ALL if sl.get_member(name).has_probabilities]
NO_PROBS = [name for name in ALL if not sl.get_member(name).has_probabilities]


# --------------------------------------------------------------------------------------------
# independent per-example references, written from the paper's formulas, one example at a time


def _bound_at(o: list[float], c: int, xi: float) -> float:
    D = len(o)
    s, q = sum(o), sum(x * x for x in o)
    lam = math.tanh(xi / 2) / (4 * xi)
    return (
        -((D - 2) ** 2) / (16 * D * lam)
        - D * xi / 2
        - D * lam * xi * xi
        + D * math.log1p(math.exp(xi))
        + s / D
        + lam * (q - s * s / D)
        - o[c]
    )


def _golden_min(f, lo: float, hi: float, iters: int = 200) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(iters):
        x1, x2 = b - g * (b - a), a + g * (b - a)
        if f(x1) < f(x2):
            b = x2
        else:
            a = x1
    return f((a + b) / 2)


def reference(name: str, o: list[float], c: int, **opt: float) -> float:
    D = len(o)
    if name == "log_softmax":
        m = max(o)
        return -(o[c] - m - math.log(sum(math.exp(x - m) for x in o)))
    if name == "taylor":
        order, margin = int(opt.get("order", 2)), opt.get("margin", 0.0)

        def f(x: float) -> float:
            return sum(x**j / math.factorial(j) for j in range(order + 1))

        terms = [f(x) for x in o]
        terms[c] = f(o[c] - margin)
        return -math.log(terms[c] / sum(terms))
    if name == "spherical":
        eps = opt.get("eps", 0.01)
        return -math.log((o[c] ** 2 + eps) / sum(x * x + eps for x in o))
    if name == "softmax_bound":
        if "xi" in opt:
            return _bound_at(o, c, opt["xi"])
        return _golden_min(lambda xi: _bound_at(o, c, xi), 1e-6, 60.0)
    if name == "z_loss":
        a, b = opt.get("a", 1.0), opt.get("b", 0.0)
        mu = sum(o) / D
        sigma = math.sqrt(sum((x - mu) ** 2 for x in o) / D)
        z = (o[c] - mu) / sigma
        t = a * (b - z)
        return (max(t, 0) + math.log1p(math.exp(-abs(t)))) / a
    if name == "mse":
        return sum((x - (1.0 if k == c else 0.0)) ** 2 for k, x in enumerate(o))
    raise AssertionError(name)


OPTIONS = [
    ("log_softmax", {}),
    ("taylor", {}),
    ("taylor", {"order": 4}),
    ("taylor", {"order": 6, "margin": 0.5}),
    ("taylor", {"margin": 0.3}),
    ("spherical", {}),
    ("spherical", {"eps": 0.5}),
    ("softmax_bound", {}),
    ("softmax_bound", {"xi": 1.7}),
    ("z_loss", {}),
    ("z_loss", {"a": 2.5, "b": 0.7}),
    ("mse", {}),
]


@pytest.mark.parametrize(("name", "opt"), OPTIONS)
@pytest.mark.parametrize("num_classes", [2, 3, 17])
def test_matches_per_example_reference(name: str, opt: dict, num_classes: int) -> None:
    g = torch.Generator().manual_seed(num_classes)
    x = torch.randn(9, num_classes, generator=g, dtype=torch.float64) * 1.5
    t = torch.randint(0, num_classes, (9,), generator=g)
    got = sl.get_loss(name, reduction="none", **opt)(x, t)
    want = torch.tensor(
        [reference(name, x[i].tolist(), int(t[i]), **opt) for i in range(9)], dtype=torch.float64
    )
    torch.testing.assert_close(got, want.double(), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# log_softmax is exactly F.cross_entropy, for every option


@pytest.mark.parametrize("shape", [(7,), (6, 7), (3, 7, 2, 4)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("soft", [False, True])
def test_log_softmax_is_cross_entropy(shape, reduction, weighted, label_smoothing, soft) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    C = shape[0] if len(shape) == 1 else shape[1]
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    if soft:
        t = torch.softmax(
            torch.randn(shape, generator=g, dtype=torch.float64), dim=0 if len(shape) == 1 else 1
        )
    else:
        t = torch.randint(0, C, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
        if t.dim():
            t.view(-1)[::3] = -100
    got = sl.spherical_loss(
        x, t, "log_softmax", w, reduction=reduction, label_smoothing=label_smoothing
    )
    want = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=label_smoothing)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# conventions shared by every member


def _per_position_reference(name, x, t, **opt):
    """Per-position losses of (N, C, d...) logits by looping over positions."""
    rows = x.movedim(1, -1).reshape(-1, x.shape[1])
    tt = t.reshape(-1)
    out = [
        reference(name, rows[i].tolist(), int(tt[i]), **opt) if tt[i] >= 0 else 0.0
        for i in range(len(tt))
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(t.shape)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_conventions_k_dimensional(name: str, reduction: str, weighted: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 3, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (4, 3, 2), generator=g)
    t[0, 0, 0] = -100
    t[2, 1, 1] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.2 if weighted else None
    per = _per_position_reference(name, x, t)
    ww = torch.where(t >= 0, w[t.clamp(min=0)] if w is not None else torch.ones_like(per), 0.0)
    want = {"none": per * ww, "sum": (per * ww).sum(), "mean": (per * ww).sum() / ww.sum()}[
        reduction
    ]
    got = sl.spherical_loss(x, t, name, w, reduction=reduction)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if reduction == "none":
        assert got[0, 0, 0] == 0.0 and got[2, 1, 1] == 0.0


@pytest.mark.parametrize("name", ALL)
def test_single_example_shape_c(name: str) -> None:
    x = torch.randn(6, dtype=torch.float64)
    t = torch.tensor(4)
    for reduction in ("none", "mean", "sum"):
        got = sl.spherical_loss(x, t, name, reduction=reduction)
        assert got.shape == ()
        torch.testing.assert_close(
            got, torch.tensor(reference(name, x.tolist(), 4), dtype=torch.float64)
        )


@pytest.mark.parametrize("name", ALL)
def test_ignore_index_gives_no_gradient_and_custom_index(name: str) -> None:
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 3, 3, 0, 2])
    loss = sl.spherical_loss(x, t, name, ignore_index=3)
    loss.backward()
    assert torch.all(x.grad[1:3] == 0)
    keep = torch.tensor([0, 3, 4])
    torch.testing.assert_close(loss, sl.spherical_loss(x[keep], t[keep], name))


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in ALL]
    + [(name, {"weight": "classes"}) for name in ALL]
    + [(name, {"label_smoothing": 0.1}) for name in WITH_PROBS],
)
def test_all_ignored_mean_is_nan_with_zero_gradient_like_cross_entropy(name, options) -> None:
    # A minibatch of padding only: F.cross_entropy's mean is NaN (0/0), its gradient zero, so
    # that SGD leaves the weights alone.
    x = torch.randn(3, 4, requires_grad=True)
    t = torch.full((3,), -100)
    if options.get("weight"):
        options = {"weight": torch.tensor([0.5, 1.0, 2.0, 1.5])}
    loss, expected = sl.spherical_loss(x, t, name, **options), F.cross_entropy(x, t, **options)
    assert torch.isnan(loss) and torch.isnan(expected)
    (grad,) = torch.autograd.grad(loss, x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert torch.equal(grad, expected_grad) and not grad.any()
    assert sl.spherical_loss(x, t, name, reduction="sum", **options) == 0


@pytest.mark.parametrize("name", SPHERICAL)
def test_targets_that_all_weigh_zero_give_nan_with_zero_gradient(name: str) -> None:
    # (F.cross_entropy's gradient is NaN there; a zero one leaves the weights alone.)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    loss = sl.spherical_loss(x, torch.tensor([0, 1, -100]), name, weight=weight)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isnan(loss) and not grad.any()


# --------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("name", [*SPHERICAL, "taylor4"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
def test_gradcheck(name: str, reduction: str, weighted: bool, ignore: bool) -> None:
    g = torch.Generator().manual_seed(2)
    opt = {"order": 4} if name == "taylor4" else {}
    name = "taylor" if name == "taylor4" else name
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), generator=g)
    if ignore:
        t[1] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    crit = sl.get_loss(name, weight=w, reduction=reduction, **opt)
    assert torch.autograd.gradcheck(lambda x: crit(x, t), (x,))


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in SPHERICAL]
    + [("taylor", {"margin": 0.3}), ("spherical", {"eps": 0.5}), ("softmax_bound", {"xi": 1.0})],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_second_derivatives(name: str, options: dict, reduction: str, num_classes: int) -> None:
    # With create_graph=True the closed-form backward gives a differentiable gradient (a
    # gradient penalty, a Hessian-vector product): for the bound with its optimal ξ, through
    # the implicit function theorem.
    member = family.get_member(name, **options)
    x = torch.randn(4, num_classes, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, -100, 1])
    weight = torch.linspace(0.5, 1.5, num_classes, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda x: sl.spherical_loss(x, t, member, weight=weight, reduction=reduction), (x,)
    )


def test_gradient_penalty_reaches_the_input() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    for loss in (
        lambda x: sl.taylor_cross_entropy(x, t),
        lambda x: sl.taylor_cross_entropy(x, t, order=4),  # (autograd all the way)
    ):
        (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
        (penalized,) = torch.autograd.grad(loss(x) + 10 * grad.square().sum(), x)
        (plain,) = torch.autograd.grad(loss(x), x)
        assert (penalized - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", WITH_PROBS[1:])
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_label_smoothing_and_probability_targets(name: str, soft: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    if soft:
        t = torch.softmax(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=1)
    else:
        t = torch.randint(0, 5, (2, 3), generator=g)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    crit = sl.get_loss(name, weight=w, label_smoothing=0.1)
    assert torch.autograd.gradcheck(lambda x: crit(x, t), (x,))


def test_gradient_is_alpha_plus_two_beta_o_plus_gamma_ec() -> None:
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 5, 2, 2])
    for name in SPHERICAL:
        member = family.get_member(name)
        (grad,) = torch.autograd.grad(sl.spherical_loss(x, t, member, reduction="sum"), x)
        s, q, oc = family.statistics(x.detach(), t)
        _, a, b, c = member.loss_and_partials(s, q, oc, 6)
        want = a[:, None] + 2 * b[:, None] * x.detach() + F.one_hot(t, 6) * c[:, None]
        torch.testing.assert_close(grad, want)


# --------------------------------------------------------------------------------------------
# label smoothing and probability targets for Taylor and spherical


def _manual_soft_ce(logp, t, w, reduction, ls, C):
    t = t * (1 - ls) + ls / C
    per = -(logp * t * w).sum(1)
    return {"none": per, "sum": per.sum(), "mean": per.sum() / per.numel()}[reduction]


@pytest.mark.parametrize(
    ("name", "mapping"),
    [("taylor", sl.log_taylor_softmax), ("spherical", sl.log_spherical_softmax)],
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_probability_targets(name, mapping, reduction, ls) -> None:
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.softmax(torch.randn(5, 4, dtype=torch.float64), dim=1)
    w = torch.rand(4, dtype=torch.float64) + 0.5
    got = sl.spherical_loss(x, t, name, w, reduction=reduction, label_smoothing=ls)
    torch.testing.assert_close(got, _manual_soft_ce(mapping(x, dim=1), t, w, reduction, ls, 4))


@pytest.mark.parametrize(
    ("name", "mapping"),
    [("taylor", sl.log_taylor_softmax), ("spherical", sl.log_spherical_softmax)],
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_label_smoothing_with_class_indices(name, mapping, reduction) -> None:
    # The same as cross-entropy against the smoothed one-hot target, with F.cross_entropy's
    # normalization: 'mean' divides by the summed weights of the kept targets.
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 4, -100, 2, 2, 1])
    w = torch.rand(5, dtype=torch.float64) + 0.5
    ls = 0.3
    got = sl.spherical_loss(x, t, name, w, reduction=reduction, label_smoothing=ls)
    logp = mapping(x, dim=1)
    keep = t >= 0
    tc = t.clamp(min=0)
    nll = -logp.gather(1, tc[:, None])[:, 0] * w[tc] * keep
    smooth = -(logp * w).sum(1) * keep
    per = (1 - ls) * nll + ls / 5 * smooth
    want = {"none": per, "sum": per.sum(), "mean": per.sum() / (w[tc] * keep).sum()}[reduction]
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# properties


finite = st.floats(-30, 30, allow_nan=False, width=64)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.sampled_from([2, 4, 6]))
def test_taylor_probabilities_positive_and_sum_to_one(values, order) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    p = sl.taylor_softmax(x, order=order)
    assert torch.all(p > 0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite, min_size=1, max_size=40),
    st.floats(1e-4, 10.0),
    st.floats(1e-2, 1e2),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_spherical_probabilities_and_invariances(values, eps, lam, flips) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    p = sl.spherical_softmax(x, eps=eps)
    assert torch.all(p > 0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    sign = torch.tensor([-1.0 if f else 1.0 for f in flips[: len(values)]], dtype=torch.float64)
    torch.testing.assert_close(sl.spherical_softmax(x * sign, eps=eps), p)
    torch.testing.assert_close(sl.spherical_softmax(lam * x, eps=lam * lam * eps), p)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite, min_size=2, max_size=30, unique=True),
    st.floats(-100, 100),
    st.floats(1e-2, 1e2),
    st.data(),
)
def test_z_loss_shift_and_scale_invariant(values, shift, scale, data) -> None:
    x = torch.tensor([values], dtype=torch.float64)
    assume(float(x.std()) >= 1e-3)
    t = torch.tensor([data.draw(st.integers(0, len(values) - 1))])
    base = sl.z_loss(x, t)
    moved = scale * x + shift
    # σ² = q/D − μ² loses eps·(q/D)/σ² of relative precision (documented on the member):
    # the tolerance follows that conditioning, on examples where it still means something
    # (at most about 4e-7).
    condition = max(float((v * v).mean() / v.var(unbiased=False)) for v in (x, moved))
    assume(condition < 1e8)
    tol = 1e-9 + 16 * torch.finfo(torch.float64).eps * condition
    torch.testing.assert_close(sl.z_loss(moved, t), base, rtol=tol, atol=tol)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(finite, min_size=2, max_size=50), st.data(), st.one_of(st.none(), st.floats(0.01, 20))
)
def test_bound_is_above_cross_entropy(values, data, xi) -> None:
    x = torch.tensor([values], dtype=torch.float64)
    t = torch.tensor([data.draw(st.integers(0, len(values) - 1))])
    bound = sl.softmax_upper_bound_loss(x, t, xi=xi)
    assert bound >= F.cross_entropy(x, t) - 1e-9
    if xi is not None:  # the optimum is below any fixed ξ
        assert sl.softmax_upper_bound_loss(x, t) <= bound + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30), st.data())
def test_mse_is_squared_distance_to_one_hot(values, data) -> None:
    x = torch.tensor([values], dtype=torch.float64)
    c = data.draw(st.integers(0, len(values) - 1))
    want = ((x - F.one_hot(torch.tensor([c]), len(values))) ** 2).sum()
    torch.testing.assert_close(sl.spherical_mse_loss(x, torch.tensor([c])), want)


def test_optimal_xi_is_the_minimum_over_a_grid() -> None:
    x = torch.randn(3, 50, dtype=torch.float64) * 3
    t = torch.tensor([0, 10, 49])
    best = sl.softmax_upper_bound_loss(x, t, reduction="none")
    for xi in torch.linspace(0.05, 30, 300).tolist():
        assert torch.all(best <= sl.softmax_upper_bound_loss(x, t, reduction="none", xi=xi) + 1e-10)


# --------------------------------------------------------------------------------------------
# numbers: dtypes, extremes, non-finite input


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(name: str, dtype: torch.dtype) -> None:
    x = (torch.randn(8, 11) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, 11, (8,))
    loss = sl.spherical_loss(x, t, name)
    assert loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == dtype
    x32 = x.detach().float().requires_grad_()
    ref = sl.spherical_loss(x32, t, name)
    ref.backward()
    torch.testing.assert_close(loss.float(), ref.to(dtype).float())
    torch.testing.assert_close(x.grad.float(), x32.grad.to(dtype).float())


EXTREMES = {
    "zeros": lambda: torch.zeros(4, 10),
    "constant": lambda: torch.full((4, 10), 3.0),
    "huge": lambda: torch.tensor([[1e4, -1e4] * 5, [-1e4] * 10, [1e4] * 10, [1e4] + [0.0] * 9]),
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_inputs_give_finite_loss_and_gradient(name: str, case: str, dtype) -> None:
    x = EXTREMES[case]().to(dtype).requires_grad_()
    t = torch.tensor([0, 3, 9, 1])
    loss = sl.spherical_loss(x, t, name)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))


def test_bound_at_a_million_classes() -> None:
    D = 1_000_000
    x = torch.zeros(2, D, requires_grad=True)
    t = torch.tensor([0, D - 1])
    loss = sl.softmax_upper_bound_loss(x, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    # Uniform logits: Bouchard's bound min_a [a + Σ log(1 + e^(o_k − a))] is
    # log(D − 1) + D log(D / (D − 1)) ≈ log D + 1, and the Jaakkola–Jordan step is tight there.
    assert abs(loss.item() - (math.log(D - 1) + D * math.log(D / (D - 1)))) < 1e-5
    y = torch.randn(2, D)
    gap = sl.softmax_upper_bound_loss(y, t) - F.cross_entropy(y, t)
    assert torch.isfinite(gap) and gap >= -1e-3


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(name: str, bad: float) -> None:
    x = torch.randn(3, 5)
    x[1, 2] = bad
    got = sl.spherical_loss(x, torch.tensor([0, 1, 2]), name, reduction="none")
    assert torch.isnan(got[1]) and torch.all(torch.isfinite(got[[0, 2]]))


def test_z_loss_constant_outputs_defined_as_zero_score() -> None:
    x = torch.full((2, 5), 7.0, requires_grad=True)
    loss = sl.z_loss(x, torch.tensor([0, 4]), b=1.5)
    torch.testing.assert_close(loss, F.softplus(torch.tensor(1.5)))
    loss.backward()
    assert torch.all(x.grad == 0)


# --------------------------------------------------------------------------------------------
# the API


def test_functional_and_module_names_agree() -> None:
    x = torch.randn(5, 8, dtype=torch.float64)
    t = torch.randint(0, 8, (5,))
    pairs = [
        (sl.taylor_cross_entropy(x, t, order=4), sl.TaylorCrossEntropyLoss(order=4)(x, t)),
        (sl.spherical_cross_entropy(x, t, eps=0.1), sl.SphericalCrossEntropyLoss(eps=0.1)(x, t)),
        (sl.z_loss(x, t, a=2.0), sl.ZLoss(a=2.0)(x, t)),
        (sl.softmax_upper_bound_loss(x, t, xi=2.0), sl.SoftmaxUpperBoundLoss(xi=2.0)(x, t)),
        (sl.spherical_mse_loss(x, t), sl.SphericalMSELoss()(x, t)),
        (sl.get_loss("taylor", order=4)(x, t), sl.taylor_cross_entropy(x, t, order=4)),
        (sl.get_loss("log_softmax")(x, t), F.cross_entropy(x, t)),
        (sl.TaylorSoftmax(dim=0)(x), sl.taylor_softmax(x, dim=0)),
        (sl.SphericalSoftmax(eps=0.2)(x), sl.spherical_softmax(x, eps=0.2)),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a, b)


REGISTERED = family.registrations()
LOSS_ARGUMENTS = ["input", "target", "weight", "ignore_index", "reduction", "label_smoothing"]


def test_member_lists_follow_the_registry() -> None:
    # The test lists above are made from the registry: check them against the declarations.
    assert [r.name for r in REGISTERED] == ALL and len(set(ALL)) == len(ALL) >= 6
    assert sorted(WITH_PROBS + NO_PROBS) == sorted(ALL)
    for r in REGISTERED:
        member = family.get_member(r.name)
        assert type(member) is r.member
        assert (
            (r.name in SPHERICAL) == isinstance(member, family.SphericalMember) == member.spherical
        )
        assert bool(r.softmax_function) <= member.has_probabilities


@pytest.mark.parametrize("registration", REGISTERED, ids=lambda r: r.name)
def test_generated_losses_and_modules(registration: family.Registration) -> None:
    # Each registered name exists, with the member's options in its signature, equals
    # spherical_loss with the member, and is exported from the package.
    if not registration.loss_function:
        assert not registration.loss_module
        return
    fn = getattr(sl, registration.loss_function)
    module = getattr(sl, registration.loss_module)
    assert fn is getattr(sl.functional, registration.loss_function)
    assert {registration.loss_function, registration.loss_module} <= set(sl.__all__)
    options = [p.name for p in registration.options()]
    assert list(inspect.signature(fn).parameters) == LOSS_ARGUMENTS + options
    assert list(inspect.signature(module).parameters) == LOSS_ARGUMENTS[2:] + options
    assert registration.member.__doc__.splitlines()[0] in fn.__doc__
    assert all(f"{name} :" in fn.__doc__ and f"{name} :" in module.__doc__ for name in options)
    assert fn.__name__ == registration.loss_function and fn.__module__.endswith("functional")
    assert issubclass(module, sl.SphericalLoss) and module.__name__ == registration.loss_module
    x = torch.randn(5, 8, dtype=torch.float64)
    t = torch.tensor([0, 7, 3, -100, 3])
    want = sl.spherical_loss(x, t, registration.name, reduction="sum")
    torch.testing.assert_close(fn(x, t, reduction="sum"), want, rtol=0, atol=0)
    torch.testing.assert_close(module(reduction="sum")(x, t), want, rtol=0, atol=0)
    assert module().member == family.get_member(registration.name)
    with pytest.raises(TypeError, match=f"{registration.loss_function}.*unexpected.*'nope'"):
        fn(x, t, nope=1)
    with pytest.raises(TypeError, match=f"{registration.loss_module}.*unexpected.*'nope'"):
        module(nope=1)


@pytest.mark.parametrize(
    "registration", [r for r in REGISTERED if r.softmax_function], ids=lambda r: r.name
)
def test_generated_probability_maps(registration: family.Registration) -> None:
    log_fn = getattr(sl, "log_" + registration.softmax_function)
    fn = getattr(sl, registration.softmax_function)
    module = getattr(sl, registration.softmax_module)
    names = list(registration.softmax_options)
    assert list(inspect.signature(fn).parameters) == ["input", "dim", *names]
    assert list(inspect.signature(module).parameters) == ["dim", *names]
    x = torch.randn(3, 5, dtype=torch.float64)
    want = family.get_member(registration.name).log_probs(x, dim=0)
    torch.testing.assert_close(log_fn(x, 0), want, rtol=0, atol=0)
    torch.testing.assert_close(fn(x, 0), want.exp(), rtol=0, atol=0)
    torch.testing.assert_close(module(0)(x), want.exp(), rtol=0, atol=0)
    assert repr(module(0)).startswith(f"{registration.softmax_module}(dim=0")
    with pytest.raises(TypeError, match="unexpected keyword argument 'margin'"):
        fn(x, 0, margin=0.5)  # (a training option, not one of the probability map's)


def test_positional_member_options_as_before() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0, 5, 2, 1])
    torch.testing.assert_close(
        sl.taylor_cross_entropy(x, t, None, -100, "none", 0.0, 4, 0.5),
        sl.spherical_loss(x, t, family.Taylor(4, 0.5), reduction="none"),
    )
    torch.testing.assert_close(sl.taylor_softmax(x, 1, 4), sl.taylor_softmax(x, dim=1, order=4))
    with pytest.raises(TypeError, match="multiple values for argument 'order'"):
        sl.taylor_cross_entropy(x, t, None, -100, "mean", 0.0, 4, order=2)


def test_module_weight_is_a_buffer_that_moves_with_the_module() -> None:
    crit = sl.TaylorCrossEntropyLoss(weight=torch.ones(3))
    assert "weight" in dict(crit.named_buffers())
    assert crit.double().weight.dtype == torch.float64


def test_user_defined_member_works_with_autograd_partials() -> None:
    class HalfMSE(sl.SphericalMember):
        name = "half_mse"

        def loss(self, s, q, oc, D):
            return 0.5 * (q - 2 * oc + 1)

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 0, 5, 5])
    assert torch.autograd.gradcheck(lambda x: sl.spherical_loss(x, t, HalfMSE()), (x,))
    assert torch.autograd.gradgradcheck(lambda x: sl.spherical_loss(x, t, HalfMSE()), (x,))
    torch.testing.assert_close(
        sl.spherical_loss(x, t, HalfMSE(), reduction="sum"),
        0.5 * sl.spherical_mse_loss(x, t, reduction="sum"),
    )


@pytest.mark.parametrize(
    "fn", [sl.taylor_softmax, sl.log_taylor_softmax, sl.spherical_softmax, sl.log_spherical_softmax]
)
@pytest.mark.parametrize(("shape", "dim"), [((2, 0), 1), ((0, 3), 0), ((0,), 0), ((0, 3), 1)])
def test_probability_maps_of_empty_tensors(fn, shape: tuple[int, ...], dim: int) -> None:
    x = torch.empty(shape)
    assert fn(x, dim).shape == torch.softmax(x, dim).shape == shape


def test_probability_maps_along_dim() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    for fn in (sl.taylor_softmax, sl.spherical_softmax):
        for dim in (0, 1, -1):
            torch.testing.assert_close(
                fn(x, dim=dim).sum(dim), torch.ones(()).double().expand_as(x.sum(dim))
            )
    torch.testing.assert_close(sl.log_taylor_softmax(x, 1).exp(), sl.taylor_softmax(x, 1))


# --------------------------------------------------------------------------------------------
# errors: each names the value and what was expected


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: sl.SphericalCrossEntropyLoss(eps=0), "eps must be a finite number > 0, got 0"),
        (lambda: sl.SphericalCrossEntropyLoss(eps=-1), "got -1"),
        (lambda: sl.TaylorCrossEntropyLoss(order=3), "even integer >= 2.*got 3"),
        (lambda: sl.TaylorCrossEntropyLoss(order=0), "got 0"),
        (lambda: sl.TaylorSoftmax(order=5), "got 5"),
        (lambda: sl.TaylorCrossEntropyLoss(margin=-0.1), "margin must be .*>= 0, got -0.1"),
        (lambda: sl.ZLoss(a=0), "a must be a finite number > 0, got 0"),
        (lambda: sl.ZLoss(b=float("nan")), "b must be a finite number"),
        (lambda: sl.SoftmaxUpperBoundLoss(xi=0), "xi must be a finite number > 0, got 0"),
        (lambda: sl.SoftmaxUpperBoundLoss(xi=-2.0), "got -2.0"),
        (lambda: sl.ZLoss(label_smoothing=0.1), "defines no class probabilities"),
        (lambda: sl.TaylorCrossEntropyLoss(reduction="avg"), "reduction must be one of.*'avg'"),
        (
            lambda: sl.TaylorCrossEntropyLoss(label_smoothing=1.5),
            r"label_smoothing must be in \[0, 1\], got 1.5",
        ),
        (
            lambda: sl.get_loss("softmax"),
            "unknown loss 'softmax'; expected one of log_softmax, taylor",
        ),
        (lambda: sl.get_loss("spherical", epsilon=0.1), "unknown option.*epsilon.*expected eps"),
        (lambda: sl.get_loss("mse", eps=0.1), "expected no options"),
        (lambda: sl.get_loss("spherical", eps="abc"), "option eps of loss 'spherical' must be a"),
        (
            lambda: sl.get_loss("taylor", margin=None),
            r"bad option value for loss 'taylor' \(margin",
        ),
    ],
)
def test_bad_options_fail_when_created(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", ALL)
def test_target_out_of_range(name: str) -> None:
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"Target 12 is out of bounds for 10 classes"):
        sl.spherical_loss(x, torch.tensor([0, 12, 1]), name)
    with pytest.raises(ValueError, match=r"Target -3 is out of bounds"):
        sl.spherical_loss(x, torch.tensor([0, -3, 1]), name)


@pytest.mark.parametrize("name", ALL)
def test_shape_and_dtype_errors(name: str) -> None:
    x = torch.randn(3, 10)
    with pytest.raises(
        ValueError, match=r"target must have shape \(3,\) for input of shape \(3, 10\), got \(4,\)"
    ):
        sl.spherical_loss(x, torch.zeros(4, dtype=torch.long), name)
    with pytest.raises(ValueError, match=r"floating-point tensor of logits, got torch\.int64"):
        sl.spherical_loss(
            torch.ones(3, 10, dtype=torch.long), torch.zeros(3, dtype=torch.long), name
        )
    with pytest.raises(
        ValueError, match=r"weight must be a 1-D tensor of 10 elements.*got shape \(9,\)"
    ):
        sl.spherical_loss(x, torch.zeros(3, dtype=torch.long), name, weight=torch.ones(9))
    with pytest.raises(ValueError, match="got a scalar"):
        sl.spherical_loss(torch.tensor(1.0), torch.tensor(0), name)
    with pytest.raises(ValueError, match="integer tensor"):
        sl.spherical_loss(x, torch.zeros(3, dtype=torch.bool), name)
    with pytest.raises(ValueError, match="target must be a tensor, got list"):
        sl.spherical_loss(x, [0, 1, 2], name)
    with pytest.raises(ValueError, match=r"weight must be a floating-point tensor, got \[1.0"):
        sl.SphericalLoss(name, weight=[1.0] * 10)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_any_integer_target_dtype_is_taken_as_indices(name: str, dtype: torch.dtype) -> None:
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 3, 3, 2])
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    loss = sl.spherical_loss(x, target.to(dtype), name, weight=weight, ignore_index=3)
    expected = sl.spherical_loss(x, target, name, weight=weight, ignore_index=3)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    grads = [torch.autograd.grad(v, x)[0] for v in (loss, expected)]
    torch.testing.assert_close(*grads, rtol=0, atol=0)


@pytest.mark.parametrize("name", NO_PROBS)
def test_float_targets_need_probabilities(name: str) -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=f"the '{name}' loss defines no class probabilities"):
        sl.spherical_loss(x, torch.rand(3, 4), name)
    with pytest.raises(ValueError, match="no label_smoothing > 0"):
        sl.spherical_loss(x, torch.tensor([0, 1, 2]), name, label_smoothing=0.1)


def test_probability_target_shape_and_margin_errors() -> None:
    x = torch.randn(3, 4)
    for name in WITH_PROBS:
        with pytest.raises(ValueError, match=r"input's shape \(3, 4\), got \(3, 5\)"):
            sl.spherical_loss(x, torch.rand(3, 5), name)
        # As F.cross_entropy: no ignore_index >= 0 with probability targets (a negative one is
        # the default, and means nothing there).
        with pytest.raises(ValueError, match=r"class-index targets only.*got 1"):
            sl.spherical_loss(x, torch.rand(3, 4), name, ignore_index=1)
        sl.spherical_loss(x, torch.rand(3, 4), name, ignore_index=-1)
    with pytest.raises(ValueError, match="margin needs class-index targets"):
        sl.taylor_cross_entropy(x, torch.rand(3, 4), margin=0.5)
    with pytest.raises(ValueError, match="margin"):
        sl.taylor_cross_entropy(x, torch.tensor([0, 1, 2]), margin=0.5, label_smoothing=0.1)
    with pytest.raises(IndexError, match=r"dim must be in \[-2, 1\].*got 2"):
        sl.taylor_softmax(x, dim=2)
    with pytest.raises(ValueError, match=r"dim must be an integer.*got None"):
        sl.TaylorSoftmax(dim=None)(x)  # type: ignore[arg-type]


def test_non_spherical_members_say_so() -> None:
    member = family.Taylor(order=4)
    assert not member.spherical and family.Taylor().spherical
    with pytest.raises(ValueError, match="order 4 is not spherical"):
        member.loss_and_partials(torch.zeros(1), torch.zeros(1), torch.zeros(1), 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        sl.softmax_upper_bound_loss(torch.randn(3, 1), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# edge cases: Taylor at x = −1, scalars


def test_taylor_second_derivative_at_minus_one() -> None:
    # log(1 + x + x²/2) = log(((1 + x)² + 1) / 2) has second derivative 2 at x = −1.
    y = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(family.taylor_polynomial_log(y, 2), y, create_graph=True)
    (h,) = torch.autograd.grad(g, y)
    assert g.item() == 0.0 and h.item() == 2.0
    x = torch.tensor(
        [[-1.0, 0.3, 2.0], [-1.0, -1.0, -3.5], [-1.0, -2.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    for fn in (sl.log_taylor_softmax, sl.taylor_softmax, lambda x: sl.taylor_softmax(x, 0)):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    t = torch.tensor([0, 1, 2])
    soft = torch.softmax(x.detach() * 3, 1)
    for loss in (
        lambda x: sl.taylor_cross_entropy(x, t, label_smoothing=0.2),
        lambda x: sl.taylor_cross_entropy(x, soft),
    ):
        assert torch.autograd.gradgradcheck(loss, (x,))


def test_taylor_gradient_at_nan_and_huge_logits() -> None:
    # A NaN logit's own gradient is NaN, as with torch.log_softmax; the gradient at the largest
    # finite logits is finite (each branch of the order-2 formula sees only its own inputs).
    x = torch.tensor([math.nan, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sl.log_taylor_softmax(x)[1], x)
    assert grad.isnan().all()
    top = torch.finfo(torch.float64).max
    y = torch.tensor([top, -top, 1.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(family.taylor_polynomial_log(y, 2).sum(), y)
    assert grad.isfinite().all()
    torch.testing.assert_close(grad[2], torch.tensor(2.0 * 2.0 / 5.0, dtype=torch.float64))


SCALAR_MAPS = {
    "taylor_softmax": (sl.taylor_softmax, torch.softmax),
    "log_taylor_softmax": (sl.log_taylor_softmax, torch.log_softmax),
    "spherical_softmax": (sl.spherical_softmax, torch.softmax),
    "log_spherical_softmax": (sl.log_spherical_softmax, torch.log_softmax),
    "log_taylor_softmax order 4": (
        lambda x, dim: sl.log_taylor_softmax(x, dim, order=4),
        torch.log_softmax,
    ),
    "TaylorSoftmax": (lambda x, dim: sl.TaylorSoftmax(dim)(x), torch.softmax),
    "SphericalSoftmax": (lambda x, dim: sl.SphericalSoftmax(dim, eps=0.5)(x), torch.softmax),
}


@pytest.mark.parametrize("name", list(SCALAR_MAPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_probability_maps_of_a_scalar_follow_torch_softmax(name: str, dtype) -> None:
    # A 0-dim tensor is one class, as for torch.softmax: dim 0 or -1, and an IndexError beyond.
    fn, torch_fn = SCALAR_MAPS[name]
    for value in (2.0, -1.0, 0.0, -7.5):
        x = torch.tensor(value, dtype=dtype, requires_grad=dtype == torch.float64)
        for dim in (0, -1):
            got, want = fn(x, dim), torch_fn(x, dim)
            assert got.shape == want.shape == () and got.dtype == want.dtype == dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            if x.requires_grad:
                (grad,) = torch.autograd.grad(got, x)
                (expected,) = torch.autograd.grad(want, x)
                torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)
        for dim in (1, -2, 5):
            with pytest.raises(IndexError):
                torch_fn(x, dim)
            with pytest.raises(IndexError, match=rf"dim must be in \[-1, 0\].*got {dim}"):
                fn(x, dim)


@pytest.mark.parametrize("name", list(SCALAR_MAPS))
def test_probability_maps_dim_errors_like_torch(name: str) -> None:
    fn, torch_fn = SCALAR_MAPS[name]
    x = torch.randn(3, 4)
    for dim in (2, -3):
        with pytest.raises(IndexError):
            torch_fn(x, dim)
        with pytest.raises(IndexError, match=rf"dim must be in \[-2, 1\].*got {dim}"):
            fn(x, dim)
    for bad in (None, 1.0, "1", True, torch.tensor(True), torch.tensor([1])):
        with pytest.raises(ValueError, match="dim must be an integer"):
            fn(x, bad)
    torch.testing.assert_close(fn(x, torch.tensor(1)), fn(x, 1))  # (any integer type)
