"""The factored O(d²) output layer against the dense layer and SGD it must reproduce exactly."""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR

import spherical_losses as sl
from spherical_losses import FactoredSGD, FactoredSphericalLoss, family

MEMBERS = ["taylor", "spherical", "z_loss", "softmax_bound", "mse"]
# Learning rates at which float64 training is not chaotic over the runs below (at larger steps
# the spherical softmax's γ = −2o_c/(o_c² + ε) amplifies rounding differences between any two
# exact implementations, dense included), and at which the loss still moves.
LR = {"taylor": 0.3, "spherical": 0.01, "z_loss": 0.3, "softmax_bound": 0.3, "mse": 0.02}
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The matrices here are tiny: one thread is as fast, and unaffected by other processes
    competing for the cores (with several threads each, OpenMP's busy waits collapse).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return ((actual.detach() - expected.detach()).abs().max() / scale).item()


def make_pair(
    member: str | family.Member,
    num_classes: int,
    in_features: int,
    bias: bool = True,
    dtype: torch.dtype = F64,
    seed: int = 0,
    **kwargs: object,
) -> tuple[nn.Linear, FactoredSphericalLoss]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, num_classes, bias=bias, dtype=dtype)
    return linear, FactoredSphericalLoss.from_linear(linear, member, **kwargs)


def train_both(
    linear: nn.Linear,
    layer: FactoredSphericalLoss,
    steps: int,
    lr: float,
    *,
    batch: int,
    weight_decay: float = 0.0,
    schedule: bool = True,
    seed: int = 1,
    feature_scale: torch.Tensor | None = None,
    sync_free: bool | None = None,
    check_every: int = 100,
) -> float:
    """Trains both layers on the same minibatches; returns the largest relative difference of
    the losses and input gradients seen at any step, after checking the final weights (and,
    for a sync-free optimizer, its deferred checks).
    """
    member, reduction = layer.member, layer.reduction
    device = layer.V.device  # the dense reference stays where it is (the CPU)
    opt = FactoredSGD(
        layer, lr=lr, weight_decay=weight_decay, sync_free=sync_free, check_every=check_every
    )
    dense_opt = torch.optim.SGD(linear.parameters(), lr=lr, weight_decay=weight_decay)
    schedulers = [StepLR(o, step_size=40, gamma=0.8) for o in (opt, dense_opt)] if schedule else []
    gen = torch.Generator().manual_seed(seed)
    num_classes, in_features = linear.out_features, linear.in_features
    # Targets from a quarter of the classes: most minibatches repeat some.
    high = max(1, num_classes // 4)
    worst = 0.0
    for _ in range(steps):
        h = torch.randn(batch, in_features, generator=gen, dtype=linear.weight.dtype)
        if feature_scale is not None:
            h = h * feature_scale
        target = torch.randint(0, high, (batch,), generator=gen)
        h1, h2 = h.to(device, copy=True).requires_grad_(), h.clone().requires_grad_()
        opt.zero_grad()
        dense_opt.zero_grad()
        loss = layer(h1, target.to(device))
        dense = sl.spherical_loss(linear(h2), target, member, reduction=reduction)
        if reduction == "none":
            weights = torch.rand(batch, generator=gen, dtype=h.dtype)
            (loss * weights.to(device)).sum().backward()
            (dense * weights).sum().backward()
        else:
            loss.backward()
            dense.backward()
        worst = max(worst, rel(loss.cpu(), dense), rel(h1.grad.cpu(), h2.grad))
        opt.step()
        dense_opt.step()
        for scheduler in schedulers:
            scheduler.step()
    opt.check()  # (raises if a sync-free step's update was not finite)
    assert rel(layer.weight.cpu(), linear.weight) <= 1e-9
    if linear.bias is not None:
        assert rel(layer.bias.cpu(), linear.bias) <= 1e-9
    return worst


# --------------------------------------------------------------------------------------------
# exactness against the dense layer and torch.optim.SGD (float64)


# The step as it runs eagerly on the CPU (None: chosen for the device), and the sync-free step
# that runs on a GPU and under torch.compile (True), run here on the CPU.
SYNC_FREE = pytest.mark.parametrize("sync_free", [None, True], ids=["eager", "sync_free"])


@SYNC_FREE
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("member", MEMBERS)
def test_matches_dense_sgd(
    member: str, bias: bool, weight_decay: float, reduction: str, sync_free: bool | None
) -> None:
    linear, layer = make_pair(member, 40, 6, bias=bias, reduction=reduction)
    lr = LR[member] / (12 if reduction == "sum" else 1)
    worst = train_both(
        linear, layer, 60, lr, batch=12, weight_decay=weight_decay, sync_free=sync_free
    )
    assert worst <= 1e-9


@SYNC_FREE
@pytest.mark.parametrize("shape", ["m > d", "m < d"])
@pytest.mark.parametrize("member", MEMBERS)
def test_matches_dense_sgd_1000_steps(member: str, shape: str, sync_free: bool | None) -> None:
    # m > d inverts M on the d×d side, m < d through the m×m (Woodbury) side.
    in_features, batch = (5, 12) if shape == "m > d" else (24, 6)
    linear, layer = make_pair(member, 50, in_features)
    worst = train_both(
        linear, layer, 1000, LR[member], batch=batch, weight_decay=0.01, sync_free=sync_free
    )
    assert worst <= 1e-9


def test_reduction_none_with_weights_matches_dense() -> None:
    linear, layer = make_pair("taylor", 30, 5, reduction="none")
    assert train_both(linear, layer, 50, 0.2, batch=9) <= 1e-9


def test_user_defined_member_matches_dense() -> None:
    class LogNorm(family.SphericalMember):
        """Defined by its loss only: the partials come from autograd."""

        name = "test_log_norm"

        def loss(self, s, q, oc, D):
            return torch.log(D + q) - 2.0 * oc + 0.1 * torch.square(s) / D

    linear, layer = make_pair(LogNorm(), 30, 5)
    assert train_both(linear, layer, 100, 0.05, batch=8, weight_decay=0.01) <= 1e-9


@pytest.mark.parametrize("shape", ["m > d", "m < d"])
def test_member_without_q_term_matches_dense(shape: str) -> None:
    class NoQ(family.SphericalMember):
        """β = ∂L/∂q = 0: M = (1 − ηλ) I, the series for M⁻¹ has one term."""

        name = "test_no_q"

        def loss(self, s, q, oc, D):
            return torch.square(s) / D - oc

    in_features, batch = (4, 9) if shape == "m > d" else (20, 5)
    linear, layer = make_pair(NoQ(), 30, in_features)
    assert train_both(linear, layer, 100, 0.05, batch=batch, weight_decay=0.1) <= 1e-9


def test_gradient_accumulation_matches_dense() -> None:
    linear, layer = make_pair("spherical", 20, 4, eps=0.1)
    opt = FactoredSGD(layer, lr=0.05, weight_decay=0.1)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        opt.zero_grad()
        dense_opt.zero_grad()
        for _ in range(3):  # three backward calls, one step: W did not change in between
            h = torch.randn(5, 4, generator=gen, dtype=F64)
            target = torch.randint(0, 6, (5,), generator=gen)
            layer(h, target).backward()
            sl.spherical_loss(linear(h), target, family.Spherical(0.1)).backward()
        opt.step()
        dense_opt.step()
    assert rel(layer.weight, linear.weight) <= 1e-9
    assert rel(layer.bias, linear.bias) <= 1e-9


@pytest.mark.parametrize("ignore_index", [-1, 5])  # 5: a class number, ignored all the same
def test_ignore_index_matches_dense(ignore_index: int) -> None:
    linear, layer = make_pair("taylor", 15, 4, ignore_index=ignore_index)
    opt = FactoredSGD(layer, lr=0.2)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(30):
        h = torch.randn(8, 4, generator=gen, dtype=F64, requires_grad=True)
        target = torch.randint(0, 15, (8,), generator=gen)
        target[torch.rand(8, generator=gen) < 0.3] = ignore_index
        target[0] = 3  # at least one target kept
        h2 = h.detach().clone().requires_grad_()
        opt.zero_grad()
        dense_opt.zero_grad()
        loss = layer(h, target)
        dense = sl.spherical_loss(linear(h2), target, "taylor", ignore_index=ignore_index)
        loss.backward()
        dense.backward()
        assert rel(loss, dense) <= 1e-12
        assert rel(h.grad, h2.grad) <= 1e-12
        opt.step()
        dense_opt.step()
    assert rel(layer.weight, linear.weight) <= 1e-10


def test_empty_batch_applies_weight_decay_only() -> None:
    in_features = 3
    linear, layer = make_pair("taylor", 10, in_features, reduction="sum")
    opt = FactoredSGD(layer, lr=0.5, weight_decay=0.1)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.5, weight_decay=0.1)
    h, target = torch.empty(0, in_features, dtype=F64), torch.empty(0, dtype=torch.long)
    layer(h, target).backward()
    sl.spherical_loss(linear(h), target, "taylor", reduction="sum").backward()
    opt.step()
    dense_opt.step()
    assert rel(layer.weight, linear.weight) <= 1e-14


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(8, 4), (3, 16)])  # the d × d and the m × m side
def test_batch_of_ignored_targets_applies_weight_decay_only(
    shape: tuple[int, int], reduction: str
) -> None:
    # Every coefficient is zero, so J = 0 and M⁻¹ is the series' first term alone. With
    # 'mean' the loss is NaN (0/0) and the input's gradient zero, as for the dense layer.
    batch, in_features = shape
    linear, layer = make_pair("taylor", 10, in_features, reduction=reduction, ignore_index=-1)
    opt = FactoredSGD(layer, lr=0.5, weight_decay=0.1)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.5, weight_decay=0.1)
    gen = torch.Generator().manual_seed(6)
    for step in range(4):
        h = torch.randn(batch, in_features, generator=gen, dtype=F64, requires_grad=True)
        h2 = h.detach().clone().requires_grad_()
        target = torch.randint(0, 10, (batch,), generator=gen)
        if step % 2:
            target.fill_(-1)
        for o in (opt, dense_opt):
            o.zero_grad()
        loss = layer(h, target)
        dense = sl.spherical_loss(
            linear(h2), target, "taylor", reduction=reduction, ignore_index=-1
        )
        loss.backward()
        dense.backward()
        opt.step()
        dense_opt.step()
        if step % 2:
            assert opt.last_update == "series"
            assert torch.isnan(loss) == torch.isnan(dense) == (reduction == "mean")
            assert not h.grad.any() and not h2.grad.any()
        else:
            assert rel(loss, dense) <= 1e-12
            assert rel(h.grad, h2.grad) <= 1e-12
        assert rel(layer.weight, linear.weight) <= 1e-12
        assert rel(layer.bias, linear.bias) <= 1e-12


def test_unbatched_input() -> None:
    linear, layer = make_pair("taylor", 7, 3, reduction="none")
    h = torch.randn(3, dtype=F64)
    target = torch.tensor(4)
    loss = layer(h, target)
    assert loss.shape == ()
    expected = sl.spherical_loss(linear(h), target, "taylor", reduction="none")
    assert rel(loss, expected) <= 1e-12
    assert layer.log_prob(h, target).shape == ()
    assert layer.logits(h).shape == (7,)


# --------------------------------------------------------------------------------------------
# the ways of inverting M, and the repairs


# (kind, ratio, shape): the way the eager step takes M⁻¹ when J's largest eigenvalue is ratio × a,
# for minibatches of that shape (batch, in_features).
WAYS = [
    ("series", 1e-5, (6, 16)),
    ("series", 1e-5, (16, 6)),
    ("direct", 0.1, (6, 16)),
    ("direct", 0.1, (16, 6)),
    ("eigen", 0.8, (16, 6)),
    ("eigen", 1.4, (6, 16)),  # M indefinite (the rows of H are orthogonal), well conditioned
    ("dense", 1.0 - 1e-4, (16, 6)),  # M nearly singular
]


def check_steps_of_ratio(
    ratio: float, shape: tuple[int, int], expected: str, **options: object
) -> None:
    """Three steps of FactoredSGD(**options) where J's largest eigenvalue is ratio × a, each
    taking M⁻¹ the ``expected`` way and equal to torch.optim.SGD's.
    """
    batch, in_features = shape
    linear, layer = make_pair("mse", 30, in_features, bias=False, reduction="sum")
    opt = FactoredSGD(layer, lr=0.0, weight_decay=0.02, **options)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.0, weight_decay=0.02)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        h = torch.randn(batch, in_features, generator=gen, dtype=F64)
        if batch < in_features:  # orthogonal rows of one norm: J has one nonzero eigenvalue
            h = torch.linalg.qr(h.T).Q.T * 2.0
        target = torch.randint(0, 30, (batch,), generator=gen)
        # For 'mse' with reduction 'sum' (β = 1), J = 2η HᵀH: set its largest eigenvalue.
        lr = ratio / (2.0 * torch.linalg.eigvalsh(h.T @ h)[-1].item())
        for o in (opt, dense_opt):
            o.param_groups[0]["lr"] = lr
            o.zero_grad()
        layer(h, target).backward()
        sl.spherical_loss(linear(h), target, "mse", reduction="sum").backward()
        opt.step()
        dense_opt.step()
        opt.check()
        assert opt.last_update == expected
        assert rel(layer.weight, linear.weight) <= 1e-9


@pytest.mark.parametrize(("kind", "ratio", "shape"), WAYS)
@pytest.mark.parametrize("side", ["auto", "woodbury", "square"])
@pytest.mark.parametrize("pinned", [False, True])
def test_every_way_of_inverting_M_is_exact(
    kind: str, ratio: float, shape: tuple[int, int], pinned: bool, side: str
) -> None:
    # Unpinned, the step chooses `kind` for this ratio; pinned, the argument chooses it. The
    # shape chooses the side (m × m for (6, 16), d × d for (16, 6)) unless `side` does.
    check_steps_of_ratio(ratio, shape, kind, side=side, inverse=kind if pinned else "auto")


@pytest.mark.parametrize(("kind", "ratio", "shape"), WAYS)
@pytest.mark.parametrize("side", ["auto", "woodbury", "square"])
@pytest.mark.parametrize("inverse", ["auto", "direct", "dense"])
def test_sync_free_step_is_exact_for_every_M(
    kind: str, ratio: float, shape: tuple[int, int], side: str, inverse: str
) -> None:
    # The sync-free step takes M⁻¹ by an LU factorization whatever ρ (or, pinned, applies the
    # step to V), on either side: exact where the eager step chooses each of its ways.
    expected = "dense" if inverse == "dense" else "direct"
    check_steps_of_ratio(ratio, shape, expected, side=side, inverse=inverse, sync_free=True)


def test_a_pinned_variant_must_suit_the_step() -> None:
    layer = FactoredSphericalLoss(4, 10, "mse", bias=False, reduction="sum", dtype=F64)
    with pytest.raises(ValueError, match=r"inverse must be one of 'auto', 'series'.*got 'cg'"):
        FactoredSGD(layer, inverse="cg")
    with pytest.raises(ValueError, match=r"side must be one of 'auto', 'woodbury'.*got 'm'"):
        FactoredSGD(layer, side="m")
    # ‖J‖_F = 2η‖HᵀH‖_F ≥ a: the series would not converge, so pinning it raises.
    opt = FactoredSGD(layer, lr=1.0, inverse="series")
    h = torch.eye(4, dtype=F64)
    layer(h, torch.arange(4)).backward()
    with pytest.raises(ValueError, match=r"cannot take M⁻¹ by 'series'.*expected at most 0.5"):
        opt.step()


@SYNC_FREE
def test_repairs_keep_training_exact(sync_free: bool | None) -> None:
    # mse squeezes W along the inputs' directions, much faster along the directions of large
    # variance: U becomes ill-conditioned quickly, and max_condition=16 makes repairs frequent.
    # (Sync-free, they are deferred to the check every 5 steps, and the last one to the end.)
    linear, layer = make_pair("mse", 40, 6, max_condition=16)
    scale = torch.tensor([3.0, 1.0, 0.5, 0.3, 0.2, 0.1], dtype=F64)
    repairs = 0
    repair = layer.repair

    def counting_repair() -> None:
        nonlocal repairs
        repairs += 1
        repair()

    layer.repair = counting_repair  # type: ignore[method-assign]
    worst = train_both(
        linear, layer, 300, 0.01, batch=10, schedule=False, feature_scale=scale,
        sync_free=sync_free, check_every=5,
    )  # fmt: skip
    assert worst <= 1e-9
    assert repairs > 0
    sigma = torch.linalg.svdvals(layer.U)
    assert (sigma[0] / sigma[-1]).item() <= 16.0


def test_repair_leaves_the_weight_unchanged() -> None:
    linear, layer = make_pair("z_loss", 25, 5)
    train_both(linear, layer, 30, 0.3, batch=7, weight_decay=0.1)
    before = layer.weight, layer.bias
    layer.repair()
    assert torch.equal(layer.U, torch.eye(6, dtype=F64))
    assert torch.equal(layer.omega, torch.zeros(6, dtype=F64))
    assert rel(layer.weight, before[0]) <= 1e-14
    assert rel(layer.bias, before[1]) <= 1e-14
    W = torch.cat([layer.weight, layer.bias.unsqueeze(1)], dim=1)
    assert rel(layer.Q, W.T @ W) <= 1e-13
    assert rel(layer.w_bar, W.sum(0)) <= 1e-13


def test_state_matches_its_definition() -> None:
    linear, layer = make_pair("softmax_bound", 30, 5)
    train_both(linear, layer, 200, 0.3, batch=9, weight_decay=0.05)
    W = layer.V @ layer.U + layer.omega
    assert rel(layer.Q, W.T @ W) <= 1e-12
    assert rel(layer.w_bar, W.sum(0)) <= 1e-12
    assert rel(layer.U @ layer.U_inv, torch.eye(6, dtype=F64)) <= 1e-12


# --------------------------------------------------------------------------------------------
# float32: the float64 state keeps the weight close to a float64 reference


def _float32_run(num_classes: int, in_features: int, batch: int, steps: int, lr: float) -> float:
    """Trains a float32 factored layer and a float64 dense layer on a teacher's labels; returns
    the relative error of the weights (max-norm) after checking that the loss fell.
    """
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(num_classes, in_features, generator=gen, dtype=F64)
    inputs = torch.randn(4096, in_features, generator=gen, dtype=F64)
    labels = (inputs @ teacher.T).argmax(1)
    torch.manual_seed(0)
    linear = nn.Linear(in_features, num_classes, dtype=F64)
    layer = FactoredSphericalLoss.from_linear(linear, "taylor").float()
    opt = FactoredSGD(layer, lr=lr)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, inputs.shape[0], (batch,), generator=gen)
        h, target = inputs[index], labels[index]
        opt.zero_grad()
        dense_opt.zero_grad()
        layer(h.float(), target).backward()
        loss = sl.spherical_loss(linear(h), target, "taylor")
        loss.backward()
        losses.append(loss.item())
        opt.step()
        dense_opt.step()
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])
    W = torch.cat([layer.weight, layer.bias.unsqueeze(1)], dim=1).double()
    W_ref = torch.cat([linear.weight, linear.bias.unsqueeze(1)], dim=1)
    return rel(W, W_ref)


def test_float32_stays_close_to_float64() -> None:
    assert _float32_run(2000, 32, 32, 500, lr=1.0) <= 1e-4


@pytest.mark.slow
def test_float32_10000_steps_stays_close_to_float64() -> None:
    assert _float32_run(10_000, 64, 32, 10_000, lr=1.0) <= 1e-3


@pytest.mark.slow
def test_float32_100000_steps_does_not_drift() -> None:
    assert _float32_run(300, 8, 16, 100_000, lr=0.3) <= 1e-3


# --------------------------------------------------------------------------------------------
# memory: a step creates nothing with D rows


def _largest_op_output(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max(event.cpu_memory_usage for event in prof.events())


def test_training_step_allocates_nothing_of_size_D() -> None:
    num_classes, in_features, batch = 200_000, 31, 64
    torch.manual_seed(0)
    h = torch.randn(batch, in_features, requires_grad=True)
    target = torch.randint(0, num_classes, (batch,))
    linear = nn.Linear(in_features, num_classes)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    layer = FactoredSphericalLoss(in_features, num_classes)
    opt = FactoredSGD(layer, lr=0.1)

    def dense_step() -> None:
        dense_opt.zero_grad()
        sl.spherical_loss(linear(h), target, "taylor").backward()
        dense_opt.step()

    def factored_step() -> None:
        opt.zero_grad()
        layer(h, target).backward()
        opt.step()

    smallest_D_sized = num_classes * 4  # one float32 column of D entries
    # The method sees the dense step's (m, D) logits...
    assert _largest_op_output(dense_step) >= batch * smallest_D_sized
    # ... and nothing near D entries in the factored step (V itself has D × 32).
    assert _largest_op_output(factored_step) < smallest_D_sized / 10


# --------------------------------------------------------------------------------------------
# gradients to the input


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("member", MEMBERS)
def test_input_gradient(member: str, bias: bool, reduction: str) -> None:
    linear, layer = make_pair(member, 12, 4, bias=bias, reduction=reduction)
    layer.requires_grad_(False)  # h.grad only: no update to record
    torch.manual_seed(2)
    h = torch.randn(5, 4, dtype=F64, requires_grad=True)
    target = torch.tensor([0, 3, 3, 7, 11])
    assert torch.autograd.gradcheck(lambda x: layer(x, target), (h,))
    out = layer(h, target)
    (out.sum() if reduction == "none" else out).backward()
    h_dense = h.detach().clone().requires_grad_()
    dense = sl.spherical_loss(linear(h_dense), target, member, reduction=reduction)
    (dense.sum() if reduction == "none" else dense).backward()
    assert rel(h.grad, h_dense.grad) <= 1e-12


def test_frozen_layer_records_nothing() -> None:
    _, layer = make_pair("taylor", 10, 3)
    layer.requires_grad_(False)
    h = torch.randn(4, 3, dtype=F64, requires_grad=True)
    layer(h, torch.tensor([1, 2, 3, 4])).backward()  # no optimizer needed: nothing to train
    assert not layer._session.pending and h.grad is not None
    with torch.no_grad():
        assert not layer(h, torch.tensor([1, 2, 3, 4])).requires_grad


# --------------------------------------------------------------------------------------------
# conversion, state, evaluation


@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_to_linear_round_trip(bias: bool) -> None:
    linear = nn.Linear(5, 9, bias=bias)
    layer = FactoredSphericalLoss.from_linear(linear, "spherical", eps=0.05)
    assert layer.V.dtype == torch.float32 and layer.U.dtype == F64
    assert layer.member == family.Spherical(0.05)
    back = layer.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float32
    assert torch.equal(back.weight, linear.weight)
    assert torch.equal(layer.weight, linear.weight)
    if bias:
        assert torch.equal(back.bias, linear.bias) and torch.equal(layer.bias, linear.bias)
    else:
        assert back.bias is None and layer.bias is None


def test_default_initialization_is_that_of_linear() -> None:
    layer = FactoredSphericalLoss(16, 2000)
    bound = 1 / 4
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound
    W = torch.cat([layer.weight, layer.bias.unsqueeze(1)], dim=1).double()
    assert rel(layer.Q, W.T @ W) <= 1e-6


def test_state_dict_round_trip_continues_identically() -> None:
    _, layer = make_pair("taylor", 30, 5)
    opt = FactoredSGD(layer, lr=0.3, weight_decay=0.01)
    scheduler = StepLR(opt, step_size=5, gamma=0.5)
    gen = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(8, 5, generator=gen, dtype=F64), torch.randint(0, 30, (8,), generator=gen))
        for _ in range(40)
    ]

    def train(layer, opt, scheduler, batches) -> None:
        for h, target in batches:
            opt.zero_grad()
            layer(h, target).backward()
            opt.step()
            scheduler.step()

    train(layer, opt, scheduler, batches[:20])
    saved = io.BytesIO()
    torch.save(
        {"layer": layer.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()},
        saved,
    )
    saved.seek(0)
    state = torch.load(saved)
    _, fresh = make_pair("taylor", 30, 5, seed=99)
    fresh.load_state_dict(state["layer"])
    fresh_opt = FactoredSGD(fresh, lr=1.0)
    fresh_opt.load_state_dict(state["opt"])
    fresh_scheduler = StepLR(fresh_opt, step_size=5, gamma=0.5)
    fresh_scheduler.load_state_dict(state["sched"])
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train(layer, opt, scheduler, batches[20:])
    train(fresh, fresh_opt, fresh_scheduler, batches[20:])
    assert torch.equal(fresh.weight, layer.weight)
    assert torch.equal(fresh.bias, layer.bias)
    for name in ("V", "U", "U_inv", "Q", "omega", "w_bar"):
        assert torch.equal(getattr(fresh, name), getattr(layer, name))


def test_copies_and_casts_keep_the_float64_state() -> None:
    _, layer = make_pair("z_loss", 20, 4, dtype=torch.float32)
    opt = FactoredSGD(layer, lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(6, 4), torch.randint(0, 20, (6,))).backward()
        opt.step()
    weight = layer.weight
    U = layer.U.clone()
    as64 = copy.deepcopy(layer).double()
    assert as64.V.dtype == F64 and torch.equal(as64.U, U)
    assert rel(as64.weight, weight.double()) <= 1e-7
    back = as64.float()
    assert back.V.dtype == torch.float32 and back.U.dtype == F64 and torch.equal(back.U, U)
    # The buffers are views of one packed state, also after the casts.
    assert back.U.data_ptr() != U.data_ptr()
    assert back.U_inv.untyped_storage().data_ptr() == back.Q.untyped_storage().data_ptr()
    # deepcopy and pickling drop the training session (the optimizer and pending update), and
    # keep the buffers views of the packed state that a step updates.
    copied = copy.deepcopy(layer)
    assert copied._attached() is None
    assert copied.U.untyped_storage().data_ptr() == copied._state.untyped_storage().data_ptr()
    assigned = FactoredSphericalLoss(4, 20, "z_loss")
    assigned.load_state_dict(layer.state_dict(), assign=True)
    assert assigned.Q.untyped_storage().data_ptr() == assigned._state.untyped_storage().data_ptr()
    assert torch.equal(assigned.weight, weight)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.weight, weight)


def test_log_prob_matches_dense() -> None:
    for member, options in (("taylor", {}), ("spherical", {"eps": 0.1})):
        linear, layer = make_pair(member, 17, 6, **options)
        h = torch.randn(9, 6, dtype=F64)
        target = torch.randint(0, 17, (9,))
        expected = (
            family.get_member(member, **options).log_probs(linear(h)).gather(1, target[:, None])
        )
        assert rel(layer.log_prob(h, target), expected.squeeze(1)) <= 1e-12


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 100])
def test_logits_and_topk_match_dense(chunk_size: int | None) -> None:
    linear, layer = make_pair("taylor", 23, 4)
    h = torch.randn(5, 4, dtype=F64)
    logits = linear(h)
    assert rel(layer.logits(h, chunk_size=chunk_size), logits) <= 1e-12
    for k in (1, 3, 23):
        values, indices = layer.topk(h, k, chunk_size=chunk_size or 65536)
        expected_values, expected_indices = logits.topk(k, dim=1)
        assert rel(values, expected_values) <= 1e-12
        assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("member", ["taylor", "spherical"])
@pytest.mark.parametrize("chunk_size", [1, 7, 100])
def test_topk_by_probability_matches_dense(member: str, chunk_size: int) -> None:
    # Large negative outputs are among the most probable classes for both members (f(o) grows
    # with |o|), so ranking by probability differs from ranking by logit here.
    linear, layer = make_pair(member, 23, 4)
    h = 10.0 * torch.randn(6, 4, dtype=F64)
    log_probs = layer.member.log_probs(linear(h), dim=-1)
    assert not torch.equal(log_probs.topk(3, dim=1).indices, linear(h).topk(3, dim=1).indices)
    for k in (1, 3, 23):
        values, indices = layer.topk(h, k, chunk_size=chunk_size, by="probability")
        expected_values, expected_indices = log_probs.topk(k, dim=1)
        assert rel(values, expected_values) <= 1e-12
        assert torch.equal(indices, expected_indices)


def test_topk_errors() -> None:
    _, layer = make_pair("z_loss", 10, 3)
    with pytest.raises(ValueError, match="defines no class probabilities"):
        layer.topk(torch.randn(2, 3, dtype=F64), 2, by="probability")
    with pytest.raises(ValueError, match="by must be 'logit' or 'probability', got 'rank'"):
        layer.topk(torch.randn(2, 3, dtype=F64), 2, by="rank")


def test_learning_rate_scheduler_drives_the_step() -> None:
    linear, layer = make_pair("mse", 10, 3)
    opt = FactoredSGD(layer, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0 if epoch >= 1 else 1.0)
    h, target = torch.randn(4, 3, dtype=F64), torch.tensor([1, 2, 3, 4])
    for _ in range(2):
        opt.zero_grad()
        layer(h, target).backward()
        opt.step()
        scheduler.step()
    frozen = layer.weight
    opt.zero_grad()
    layer(h, target).backward()
    opt.step()  # lr 0 now
    assert torch.equal(layer.weight, frozen)
    assert not torch.equal(frozen, linear.weight)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((8, 10, "log_softmax"), {}, "spherical"),
        ((8, 10, "taylor"), {"order": 4}, "spherical"),
        ((8, 10, "taylor"), {"eps": 1.0}, "unknown option"),
        ((0, 10), {}, "in_features"),
        ((8, 10), {"reduction": "avg"}, "reduction"),
        ((8, 10), {"dtype": torch.float16}, "dtype"),
        ((8, 10), {"max_condition": 2.0}, "max_condition"),
    ],
)
def test_construction_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FactoredSphericalLoss(*args, **kwargs)


def test_input_errors() -> None:
    layer = FactoredSphericalLoss(4, 10, "spherical")
    h = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"shape \(N, 4\).*got \(3, 5\)"):
        layer(torch.randn(3, 5), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
        layer(h, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        layer(h, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"Target 12 is out of bounds for 10 classes"):
        layer(h, torch.tensor([1, 12, 3]))
    with pytest.raises(ValueError, match=r"Target -3 is out of bounds"):
        layer(h, torch.tensor([1, -3, 3]))
    with pytest.raises(ValueError, match=r"float64 does not match the layer's torch\.float32"):
        layer(h.double(), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="no class probabilities"):
        FactoredSphericalLoss(4, 10, "z_loss").log_prob(h, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 10\]"):
        layer.topk(h, 11)
    with pytest.raises(ValueError, match="chunk_size"):
        layer.logits(h, chunk_size=0)


def test_training_protocol_errors() -> None:
    layer = FactoredSphericalLoss(3, 10, "taylor", dtype=F64)
    h, target = torch.randn(4, 3, dtype=F64), torch.tensor([1, 2, 3, 4])
    # No FactoredSGD: the weight would silently never train.
    with pytest.raises(RuntimeError, match="no FactoredSGD is attached"):
        layer(h, target).backward()
    # Generic optimizers see no parameters at all.
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.Adam(layer.parameters())
    opt = FactoredSGD(layer, lr=0.1)
    layer(h, target).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):  # dense SGD would re-apply the old step
        opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        layer(h, target).backward()
    opt.zero_grad()
    stale = layer(h, target)  # forward, then the weight changes, then its backward
    layer(h, target).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="weight changed between this forward and its backward"):
        stale.backward()
    layer(h, target).backward()
    with pytest.raises(RuntimeError, match="pending"):
        layer.double()
    opt.zero_grad()
    # A second optimizer takes the layer over.
    newer = FactoredSGD(layer, lr=0.1)
    with pytest.raises(RuntimeError, match="no longer attached"):
        opt.step()
    with pytest.raises(ValueError, match="takes no other parameters"):
        newer.add_param_group({"params": [torch.zeros(1)]})
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        FactoredSGD(layer, lr=-1.0)
    with pytest.raises(ValueError, match="FactoredSGD trains a FactoredSphericalLoss"):
        FactoredSGD(nn.Linear(3, 3), lr=0.1)  # type: ignore[arg-type]


def test_layer_zero_grad_discards_the_recorded_update_as_for_dense() -> None:
    # layer.zero_grad() after a backward (e.g. to skip a batch) drops that batch's gradient.
    linear, layer = make_pair("taylor", 12, 4)
    opt = FactoredSGD(layer, lr=0.3)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.3)
    gen = torch.Generator().manual_seed(8)
    h1, h2 = (torch.randn(6, 4, generator=gen, dtype=F64) for _ in range(2))
    target = torch.randint(0, 12, (6,), generator=gen)
    layer(h1, target).backward()
    sl.spherical_loss(linear(h1), target, "taylor").backward()
    layer.zero_grad()
    linear.zero_grad()
    layer(h2, target).backward()
    sl.spherical_loss(linear(h2), target, "taylor").backward()
    opt.step()
    dense_opt.step()
    assert rel(layer.weight, linear.weight) <= 1e-12


def test_backward_twice_through_one_graph_as_for_dense() -> None:
    linear, layer = make_pair("taylor", 12, 4)
    opt = FactoredSGD(layer, lr=0.3)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.3)
    h, target = torch.randn(6, 4, dtype=F64), torch.randint(0, 12, (6,))
    loss, dense = layer(h, target), sl.spherical_loss(linear(h), target, "taylor")
    # With retain_graph, the gradient is added twice, on both sides.
    loss.backward(retain_graph=True)
    dense.backward(retain_graph=True)
    loss.backward()
    dense.backward()
    # Without it, a third backward raises instead of recording the update once more.
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    opt.step()
    dense_opt.step()
    assert rel(layer.weight, linear.weight) <= 1e-12


def test_layer_and_optimizer_copied_or_pickled_together_train_the_copy() -> None:
    _, layer = make_pair("taylor", 12, 4)
    opt = FactoredSGD(layer, lr=0.3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(9)
    batches = [
        (torch.randn(6, 4, generator=gen, dtype=F64), torch.randint(0, 12, (6,), generator=gen))
        for _ in range(4)
    ]

    def train(layer: FactoredSphericalLoss, opt: FactoredSGD, batches) -> None:
        for h, target in batches:
            opt.zero_grad()
            layer(h, target).backward()
            opt.step()

    train(layer, opt, batches[:2])
    copies = [copy.deepcopy((layer, opt)), pickle.loads(pickle.dumps((layer, opt)))]
    train(layer, opt, batches[2:])
    for copied_layer, copied_opt in copies:
        assert copied_opt.layer is copied_layer and copied_layer._attached() is copied_opt
        train(copied_layer, copied_opt, batches[2:])
        assert torch.equal(copied_layer.weight, layer.weight)


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_casting_to_half_precision_is_refused(cast: str) -> None:
    layer = FactoredSphericalLoss(3, 10, "taylor")
    model = nn.Sequential(nn.Linear(3, 3), layer)
    with pytest.raises(
        ValueError, match=r"float32 or torch.float64, not torch\.(float16|bfloat16)"
    ):
        model.half() if cast == "half" else model.to(torch.bfloat16)
    assert layer.V.dtype == torch.float32  # untouched
    layer.double()  # the supported casts still work
    assert layer.V.dtype == F64


def test_non_finite_gradient_is_not_applied() -> None:
    layer = FactoredSphericalLoss(3, 10, "mse", dtype=F64)
    opt = FactoredSGD(layer, lr=0.1)
    before = layer.weight
    h = torch.randn(4, 3, dtype=F64)
    h[0, 0] = math.inf
    layer(h, torch.tensor([1, 2, 3, 4])).backward()
    with pytest.raises(sl.NonFiniteUpdateError, match="not finite"):  # a RuntimeError
        opt.step()
    assert torch.equal(layer.weight, before)
    assert issubclass(sl.NonFiniteUpdateError, RuntimeError)


def test_sync_free_non_finite_update_is_skipped_then_reported() -> None:
    # Sync-free, the step cannot raise at once: it leaves the weight as it was, and check()
    # raises, naming the step; the later steps were applied, and the training goes on.
    layer = FactoredSphericalLoss(3, 10, "mse", dtype=F64)
    twin = copy.deepcopy(layer)
    opt = FactoredSGD(layer, lr=0.1, sync_free=True, check_every=0)
    twin_opt = FactoredSGD(twin, lr=0.1)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, generator=gen, dtype=F64), torch.arange(1, 5)) for _ in range(3)]
    bad = batches[0][0].clone()
    bad[0, 0] = math.inf
    before = layer.weight
    opt.zero_grad()
    layer(bad, batches[0][1]).backward()
    opt.step()
    assert torch.equal(layer.weight, before)
    for h, target in batches[1:]:
        for model, o in ((layer, opt), (twin, twin_opt)):
            o.zero_grad()
            model(h, target).backward()
            o.step()
    with pytest.raises(sl.NonFiniteUpdateError, match=r"sync-free step 1 .*the 2 later ones"):
        opt.check()
    assert rel(layer.weight, twin.weight) <= 1e-12
    opt.check()  # reported once
    h, target = batches[0]
    for model, o in ((layer, opt), (twin, twin_opt)):
        o.zero_grad()
        model(h, target).backward()
        o.step()
    opt.check()
    assert rel(layer.weight, twin.weight) <= 1e-12


def test_sync_free_bounds_reach_the_state_dict_and_copies() -> None:
    # The bounds on U's singular values live on the device during sync-free steps: a
    # state_dict or a copy reads them there (an eager point), not the stale host values.
    layer = FactoredSphericalLoss(12, 20, "taylor", dtype=F64)
    opt = FactoredSGD(layer, lr=0.3, weight_decay=0.1, sync_free=True, check_every=0)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        opt.zero_grad()
        h = torch.randn(4, 12, generator=gen, dtype=F64)
        layer(h, torch.randint(0, 20, (4,), generator=gen)).backward()
        opt.step()
    book = tuple(layer._session.book[:2].tolist())
    bounds = layer.state_dict()["_extra_state"]["sigma_bounds"]
    # Taylor's β > 0 makes J positive semidefinite: M's smallest singular value is at most a.
    assert bounds == book and bounds[1] <= (1 - 0.3 * 0.1) ** 3
    assert copy.deepcopy(layer)._session.sigma == book


def test_sync_free_arguments() -> None:
    layer = FactoredSphericalLoss(4, 10, "mse", dtype=F64)
    assert not FactoredSGD(layer).is_sync_free()  # eagerly on the CPU: the per-step choices
    assert FactoredSGD(layer, sync_free=True).is_sync_free()
    for inverse in ("series", "eigen"):
        with pytest.raises(ValueError, match=rf"inverse='{inverse}' .* cannot be sync-free"):
            FactoredSGD(layer, inverse=inverse, sync_free=True)
    with pytest.raises(ValueError, match=r"check_every must be an integer >= 0, got -1"):
        FactoredSGD(layer, check_every=-1)


@pytest.mark.parametrize("shape", [(12, 5), (4, 16)], ids=["square", "woodbury"])
def test_sync_free_step_reads_nothing_on_the_host(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every way a tensor's value reaches Python raises during the sync-free steps (a new lr
    # each step, weight decay, repeated and ignored targets, two backward calls, a zero
    # gradient, a state that needs repairs): on a GPU none of them waits for the device.
    batch, in_features = shape
    linear, layer = make_pair("mse", 30, in_features, ignore_index=2, max_condition=16)
    opt = FactoredSGD(layer, lr=0.05, weight_decay=0.1, sync_free=True, check_every=0)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(4)
    scale = torch.logspace(0, -1.5, in_features, dtype=F64)

    def host_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sync-free step read a tensor's value on the host")

    for step in range(12):
        for o in (opt, dense_opt):
            o.param_groups[0]["lr"] = 0.05 * (1 + step % 3)
            o.zero_grad(set_to_none=step != 5)
        if step != 5:  # step 5: a zero gradient, the weight decay alone
            for _ in range(2):
                h = torch.randn(batch, in_features, generator=gen, dtype=F64) * scale
                target = torch.randint(0, 6, (batch,), generator=gen)
                layer(h, target).backward()
                sl.spherical_loss(linear(h), target, "mse", ignore_index=2).backward()
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                patch.setattr(torch.Tensor, name, host_read)
            opt.step()
        dense_opt.step()
        if step % 4 == 3:
            opt.check()
    opt.check()
    assert rel(layer.weight, linear.weight) <= 1e-9
    assert rel(layer.bias, linear.bias) <= 1e-9


def test_cpu_training_is_bitwise_reproducible() -> None:
    # With repeated targets and m·d above PyTorch's parallel grain, V's rows were updated by
    # index_put_(accumulate=True) with atomic float adds on several threads (different bits
    # from run to run); index_add_ adds them in order.
    def train() -> torch.Tensor:
        torch.manual_seed(0)
        layer = FactoredSphericalLoss(128, 200, "taylor")
        opt = FactoredSGD(layer, lr=0.1)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            h = torch.randn(512, 128, generator=gen)
            target = torch.randint(0, 5, (512,), generator=gen)  # many repeated targets
            opt.zero_grad()
            layer(h, target).backward()
            opt.step()
        return layer.V.clone()

    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        first = train()
        assert all(torch.equal(first, train()) for _ in range(4))
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# as PyTorch behaves: errors, autocast, zero_grad, torch.compile


def test_target_out_of_range_raises_index_error_as_cross_entropy() -> None:
    layer = FactoredSphericalLoss(4, 10, "taylor")
    h, target = torch.randn(3, 4), torch.tensor([1, 10, 3])
    with pytest.raises(IndexError):
        F.cross_entropy(torch.randn(3, 10), target)
    with pytest.raises(IndexError, match=r"Target 10 is out of bounds for 10 classes"):
        layer(h, target)
    with pytest.raises(IndexError, match=r"Target -2 is out of bounds for 10 classes"):
        layer.log_prob(h, torch.tensor([1, -2, 3]))


def test_autocast_runs_the_layer_in_its_own_precision() -> None:
    # The repro of issue 14: under autocast the forward ran in bfloat16 and the step failed.
    torch.manual_seed(0)
    head = FactoredSphericalLoss(32, 2000)
    reference = copy.deepcopy(head)
    opt, reference_opt = FactoredSGD(head, lr=0.1), FactoredSGD(reference, lr=0.1)
    h, y = torch.randn(8, 32), torch.randint(0, 2000, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(h, y)
        log_prob, logits = head.log_prob(h, y), head.logits(h)
    expected = reference(h, y)
    assert loss.dtype == torch.float32
    assert rel(loss, expected) <= 1e-6
    assert log_prob.dtype == logits.dtype == torch.float32
    assert rel(log_prob, reference.log_prob(h, y)) <= 1e-6
    assert rel(logits, reference.logits(h)) <= 1e-6
    loss.backward()
    expected.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a step inside the context too
        opt.step()
    reference_opt.step()
    assert rel(head.weight, reference.weight) <= 1e-6
    # A body's output under autocast is bfloat16: the layer takes it in float32, and the
    # input's gradient comes back in bfloat16, as autograd casts it.
    opt.zero_grad()
    h_low = h.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(h_low, y)
    loss.backward()
    assert loss.dtype == torch.float32 and h_low.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"bfloat16 does not match the layer's torch\.float32"):
        head(h_low, y)  # outside autocast, a mismatch still raises


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_grad_set_to_none_as_torch_optim_sgd(weight_decay: float) -> None:
    linear, layer = make_pair("taylor", 12, 4)
    opt = FactoredSGD(layer, lr=0.3, weight_decay=weight_decay)
    dense_opt = torch.optim.SGD(linear.parameters(), lr=0.3, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(9)

    def backward() -> None:
        h = torch.randn(6, 4, generator=gen, dtype=F64)
        target = torch.randint(0, 12, (6,), generator=gen)
        layer(h, target).backward()
        sl.spherical_loss(linear(h), target, "taylor").backward()

    def both(*calls: str, **kwargs: bool) -> None:
        for o in (opt, dense_opt):
            for call in calls:
                getattr(o, call)(**kwargs)

    backward()
    both("step")
    # Zero gradients and no backward: each step applies the weight decay alone.
    both("zero_grad", set_to_none=False)
    both("step")
    both("step")
    assert rel(layer.weight, linear.weight) <= 1e-12
    assert rel(layer.bias, linear.bias) <= 1e-12
    # A backward then adds to the zero gradient.
    backward()
    both("step")
    assert rel(layer.weight, linear.weight) <= 1e-12
    # Gradients set to None: torch.optim.SGD skips the parameter, decay included; so does this.
    before = layer.weight
    both("zero_grad", set_to_none=True)
    both("step")
    assert torch.equal(layer.weight, before)
    assert rel(layer.weight, linear.weight) <= 1e-12


def test_compiled_forward_equals_eager() -> None:
    # A model holding the layer, compiled whole (fullgraph=True: no graph break), for the
    # evaluation forward: the target check is an assertion in the graph, not a synchronization.
    torch.manual_seed(0)
    body = nn.Linear(5, 8, dtype=F64)
    head = FactoredSphericalLoss(8, 40, dtype=F64, ignore_index=3)
    model = nn.ModuleDict({"body": body, "head": head})

    def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = model["body"](x)
        return model["head"](h, y), model["head"].log_prob(h, y)

    compiled = torch.compile(evaluate, fullgraph=True, dynamic=False)
    x, y = torch.randn(6, 5, dtype=F64), torch.tensor([0, 3, 39, 7, 3, 12])
    with torch.no_grad():
        for got, expected in zip(compiled(x, y), evaluate(x, y), strict=True):
            assert rel(got, expected) <= 1e-12
        # (The graph's own index check may fire before the layer's assertion.)
        with pytest.raises(RuntimeError, match="out of bounds"):
            compiled(x, torch.tensor([0, 3, 40, 7, 3, 12]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_training_equals_eager(reduction: str) -> None:
    # The forward and backward of a model holding the layer, compiled whole (fullgraph=True),
    # then the eager FactoredSGD step: the same losses, gradients and weights as all eager.
    torch.manual_seed(0)
    eager = nn.ModuleDict(
        {
            "body": nn.Linear(5, 8, dtype=F64),
            "head": FactoredSphericalLoss(8, 40, dtype=F64, ignore_index=3, reduction=reduction),
        }
    )
    twin = copy.deepcopy(eager)
    optimizers = [
        (torch.optim.SGD(model["body"].parameters(), lr=0.1), FactoredSGD(model["head"], lr=0.2))
        for model in (eager, twin)
    ]

    def loss_of(model: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model["head"](model["body"](x), y).sum()

    compiled = torch.compile(loss_of, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(6, 5, generator=gen, dtype=F64)
        y = torch.randint(0, 10, (6,), generator=gen)  # repeated targets, some ignored (3)
        losses = []
        for model, run, (body_opt, head_opt) in zip(
            (eager, twin), (loss_of, compiled), optimizers, strict=True
        ):
            body_opt.zero_grad()
            head_opt.zero_grad()
            loss = run(model, x, y)
            loss.backward()
            body_opt.step()
            head_opt.step()
            losses.append(loss)
        assert rel(losses[1], losses[0]) <= 1e-12
        assert rel(twin["body"].weight, eager["body"].weight) <= 1e-12
        assert rel(twin["head"].weight, eager["head"].weight) <= 1e-12
        assert rel(twin["head"].bias, eager["head"].bias) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", ["m > d", "m < d"])
@pytest.mark.parametrize("member", MEMBERS)
def test_cuda_float64_matches_dense_sgd(member: str, shape: str) -> None:
    # The factored layer on the GPU against the dense layer and torch.optim.SGD on the CPU.
    in_features, batch = (5, 12) if shape == "m > d" else (24, 6)
    linear, layer = make_pair(member, 50, in_features)
    layer = layer.cuda()
    worst = train_both(linear, layer, 200, LR[member], batch=batch, weight_decay=0.01)
    assert worst <= 1e-9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_log_prob_and_topk_match_cpu() -> None:
    _, layer = make_pair("taylor", 300, 16)
    cuda_layer = copy.deepcopy(layer).cuda()
    h, target = torch.randn(20, 16, dtype=F64), torch.randint(0, 300, (20,))
    assert (
        rel(cuda_layer.log_prob(h.cuda(), target.cuda()).cpu(), layer.log_prob(h, target)) <= 1e-12
    )
    for by in ("logit", "probability"):
        values, indices = cuda_layer.topk(h.cuda(), 5, chunk_size=70, by=by)
        expected_values, expected_indices = layer.topk(h, 5, chunk_size=70, by=by)
        assert torch.equal(indices.cpu(), expected_indices)
        assert rel(values.cpu(), expected_values) <= 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    _, layer = make_pair("taylor", 300, 16, dtype=torch.float32)
    cuda_layer = copy.deepcopy(layer).cuda()
    opt, cuda_opt = FactoredSGD(layer, lr=0.5), FactoredSGD(cuda_layer, lr=0.5)
    for _ in range(20):
        h, target = torch.randn(32, 16), torch.randint(0, 300, (32,))
        for o, lay, dev in ((opt, layer, "cpu"), (cuda_opt, cuda_layer, "cuda")):
            o.zero_grad()
            lay(h.to(dev), target.to(dev)).backward()
            o.step()
    assert cuda_layer.U.dtype == F64
    assert rel(cuda_layer.weight.cpu(), layer.weight) <= 1e-4
