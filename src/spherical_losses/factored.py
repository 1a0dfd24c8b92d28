"""An exact output layer for spherical losses whose training step costs ``O(d²)`` per example.

A linear output layer ``o = W h`` with ``D`` classes and a spherical loss (one that depends on
``o`` only through ``s = Σ o_k``, ``q = Σ o_k²`` and ``o_c``) can be trained by plain SGD without
ever forming ``o`` or the dense gradient of ``W`` (Vincent, de Brébisson & Bouthillier, NIPS 2015;
de Brébisson & Vincent, ICLR 2016). The weight is kept factored as ``W = V U + 1 ωᵀ``, with
``Q = WᵀW`` and ``w̄ = Wᵀ1`` alongside:

* forward: ``s = w̄·h``, ``q = hᵀ Q h`` and ``o_c = (V[c] U + ω)·h``;
* backward: ``∂L/∂h = α w̄ + 2β Q h + γ W_c``;
* SGD step: ``U``, ``U⁻¹``, ``ω``, ``Q`` and ``w̄`` change by products of ``d × d`` matrices
  with the minibatch, and only the ``m`` target rows of ``V`` change.

No tensor with ``D`` rows is created by a training step, so its cost does not depend on ``D``.
The equations are those of ``docs/factored-update.md``; the member definitions (``L``, ``α``,
``β``, ``γ``) are those of :mod:`spherical_losses.family`, shared with the dense engine.

Design
------
* ``V`` (``D × d``) is the only large tensor; it has the layer's dtype (float32 or float64).
  ``U``, ``U⁻¹``, ``ω``, ``Q`` and ``w̄`` are small and always float64, as the column blocks of
  one ``d × (3d+2)`` matrix ``[Uᵀ | Q | ω | w̄ | U⁻¹]`` (the buffers are views of it). A step
  computes their increments in V's dtype (so the matrix products run at float32 speed) and adds
  them to the float64 state in one operation: accumulating in float64 keeps the state from
  drifting away from its definition. The forward reads a copy in V's dtype, refreshed per step.
* ``M⁻¹`` is taken through the ``m × m`` matrix ``a I − H Hᵀ diag(b)`` (Woodbury) when ``d``
  exceeds about ``1.45 m``, else through the ``d × d`` matrix ``M``, whichever costs fewer
  multiply-adds. ``M = a I − J`` with ``J = Hᵀ diag(b) H`` symmetric and ``‖J‖₂ ≤ ‖J‖_F = ρ``:
  for ``ρ ≤ a/2`` (the usual case, ``ρ`` is ``O(η‖h‖²/D)`` for the softmax-like members),
  ``a M⁻¹ = Σ_k (J/a)^k`` is summed to the dtype's precision, 1 to 3 terms typically; for a
  slower series a Cholesky factorization, for ``ρ > a/2`` the eigendecomposition of ``J``.
* Only ``V``'s rows are rounded to the layer's dtype, and their rounding errors reach ``W``
  amplified by the condition number of ``U``. The layer keeps upper and lower bounds on the
  singular values of ``U`` (a step multiplies them by at most ``a + ρ`` and at least
  ``a − ρ``). When the bounds allow a condition number above ``max_condition`` (or singular
  values beyond ``2^±20``), the exact singular values are computed (``O(d³)``, and ``U⁻¹`` is
  recomputed from ``U`` then); only if they are indeed out of range does
  :meth:`FactoredSphericalLoss.repair` fold ``U`` and ``ω`` into ``V`` (``O(D d²)``, by row
  chunks; ``W`` is unchanged up to one rounding) and recompute ``Q`` and ``w̄`` from ``V``.
  A step whose own ``M`` is nearly singular (a learning rate at the stability limit of the
  loss) is applied to ``V`` directly, in the same ``O(D d²)`` way, so it stays exact.
* The state lives in buffers, not parameters, so generic optimizers never see it and
  ``state_dict()`` round-trips it; ``backward()`` records the pending update on the layer and
  :class:`FactoredSGD` applies it (see :class:`FactoredSphericalLoss` for the protocol).

Cost of a step (forward, backward to ``h``, update), in multiply-adds: ``6 m d² + 5 d³`` on the
``d × d`` path with one extra series term, ``8 m d² + 7 m² d`` on the Woodbury path, against
``3 m D d`` for the dense layer: about the papers' ideal speedup ``D/(4d)``. At ``d ≈ 128`` a
step (about 1 ms on 2 CPU cores) spends about half of its time outside its matrix products: some
60 small PyTorch operations, autograd and the member's partials, which pay a fixed cost per
call and the memory traffic of the state and work buffers. That bounds the speedup at small
``D`` (see ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import _conventions as conventions
from . import family
from .family import Member, SphericalMember

__all__ = ["FactoredSGD", "FactoredSphericalLoss"]

# The small state, kept in float64 whatever the dtype of V.
_STATE = ("U", "U_inv", "omega", "Q", "w_bar")
# Singular values of U are kept in [2^-20, 2^20]; only overflow of V depends on this.
_SCALE_LIMIT = 2.0**20
# Rows of V per chunk in the O(D d²) passes: bounds their temporaries to about 4 MiB.
_CHUNK_ELEMENTS = 2**20
# Most powers of J/a summed for M⁻¹ before an exact solve is cheaper.
_MAX_SERIES_TERMS = 8
# Unit roundoff: the series for M⁻¹ stops when the rest is below it (relative to the step).
_EPS = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float32, torch.float64)}


class NonFiniteUpdateError(RuntimeError):
    """Raised by :meth:`FactoredSGD.step` when the recorded gradient is not finite.

    Dense SGD would write the NaN or infinity into the weight; the factored layer refuses the
    update and keeps its weight. Under a process group every process raises at the same step
    (the check follows the exchange), so a training loop can catch it and stop on all of them.
    """


class _Pending(NamedTuple):
    """The part of the next SGD update recorded by one backward (one row per example)."""

    H: Tensor  # (m, d) inputs, with a constant 1 appended when the layer has a bias
    coef: Tensor  # (m, 3) columns α, β, γ times the upstream gradient (0 where ignored)
    target: Tensor  # (m,) target classes (0 where ignored)
    W_c: Tensor  # (m, d) target rows of W
    P: Tensor  # (m, d) rows of H Q
    s: Tensor  # (m,) H w̄


class _Cast(NamedTuple):
    """The small state in V's dtype, for the matrix products: views of one packed copy
    ``[Uᵀ | Q | ω | w̄ | U⁻¹]``, so that a product with several of them is one product.
    """

    packed: Tensor
    U: Tensor
    Q: Tensor
    omega: Tensor
    w_bar: Tensor
    U_inv: Tensor
    QW: Tensor  # [Q | ω | w̄]
    w_bar_in: Tensor  # w̄ without the bias entry (what the input's gradient takes)


class _Session:
    """The layer's mutable bookkeeping, as plain attributes: ``nn.Module.__setattr__`` is slow,
    and every step sets several of them.
    """

    __slots__ = (
        "cast_cache",
        "consumed",
        "last_update",
        "ones",
        "optimizer_ref",
        "pending",
        "sigma",
        "state_version",
        "trainable",
        "trigger",
        "weight_version",
        "workspace",
    )

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.consumed = False  # a step applied the pending update; zero_grad() not called since
        self.trainable = True
        self.optimizer_ref: weakref.ref[FactoredSGD] | None = None
        self.weight_version = 0  # changes when W does: a backward must see its forward's W
        self.state_version = 0  # changes when any state tensor does (the cast copy follows)
        self.sigma = (1.0, 1.0)  # bounds on the largest and smallest singular values of U
        self.last_update = ""  # how the last step applied M⁻¹: series, direct, eigen, dense
        self.cast_cache: tuple[tuple[Any, ...], _Cast] | None = None
        self.workspace: _Workspace | None = None
        self.trigger: Tensor | None = None  # the zero-size leaf of the forward (see there)
        self.ones: Tensor | None = None  # a column of ones, for the bias column of H

    def detached(self) -> _Session:
        """A copy without the training session (optimizer, pending update) and the caches."""
        copy = _Session()
        copy.trainable, copy.sigma = self.trainable, self.sigma
        copy.weight_version, copy.state_version = self.weight_version, self.state_version
        return copy


class _Workspace:
    """The work tensors of a step and their views, made once per shape: a step then allocates
    and slices little, which matters at the sizes where it takes a millisecond.
    """

    def __init__(self, m: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.key = (m, d, dtype, device)
        self.lr: float | None = None
        self.scale = torch.empty(3, dtype=dtype, device=device)
        self.a: float | None = None
        self.column_scale = torch.empty(3 * d + 2, dtype=torch.float64, device=device)
        # The increments of [Uᵀ | Q | ω | w̄ | U⁻¹], then room for one more d × d block: the
        # d × d path's products write into it directly.
        self.inc = torch.empty(d, 4 * d + 2, dtype=dtype, device=device)
        self.inc_main = self.inc[:, : 3 * d + 2]
        Ut, Q, omega, w_bar, U_inv, self.inner = self.inc.split_with_sizes([d, d, 1, 1, d, d], 1)
        self.inc_blocks = (Ut, Q, omega[:, 0], w_bar[:, 0], U_inv)
        self.inc_Q_T = Q.T
        self.last = self.inc[:, 2 * d + 2 :]  # [U⁻¹ block | inner], which J multiplies
        self.inc_vectors = self.inc[:, 2 * d : 2 * d + 2]  # [ω | w̄] blocks
        self.d_path_ready = False
        self._vector_coefficients: tuple[int, Tensor] | None = None

    def vector_coefficients(self, num_classes: int) -> Tensor:
        """``C`` with ``[u | Hᵀb | r] C = [−u | −r − D u]``: the increments of ω and w̄ beyond
        ``J ω`` and ``J w̄``.
        """
        cached = self._vector_coefficients
        if cached is None or cached[0] != num_classes:
            _, _, dtype, device = self.key
            C = torch.tensor(
                [[-1.0, -float(num_classes)], [0.0, 0.0], [0.0, -1.0]], dtype=dtype, device=device
            )
            cached = self._vector_coefficients = (num_classes, C)
        return cached[1]

    def set_decay(self, a: float) -> None:
        """The factors of the increments' blocks: the state becomes
        ``(state + inc · column_scale) · (a, a², a, a, 1/a)`` for the blocks of
        ``[Uᵀ | Q | ω | w̄ | U⁻¹]``, where inc holds ``J Uᵀ``, ``ΔQ``, ``J ω − u``,
        ``J w̄ − D u − Rᵀ1`` and ``a M⁻¹ U⁻¹ − U⁻¹``.
        """
        if self.a != a:
            self.a = a
            d = self.key[1]
            Ut, Q, vectors, U_inv = self.column_scale.split_with_sizes([d, d, 2, d])
            Ut.fill_(-1.0 / a)
            Q.fill_(1.0 / (a * a))
            vectors.fill_(-1.0 / a)
            U_inv.fill_(1.0)

    def prepare_d_path(self) -> None:
        """The tensors of the d × d path: L = [diag(b) H | diag(γ') S R | diag(γ') W_c | coef],
        and Lᵀ H = [J; Rᵀ S R; W_cᵀ R; rows u, ·, r].
        """
        m, d, dtype, device = self.key
        self.L = torch.empty(m, 3 * d + 3, dtype=dtype, device=device)
        self.L_T = self.L.T
        self.L_blocks = self.L.split_with_sizes([d, d, d, 3], 1)
        cs = self.L_blocks[3]  # columns −ηα, b = 2ηβ, −ηγ
        self.b, self.g_col = cs[:, 1:2], cs[:, 2:]
        self.out = torch.empty(3 * d + 3, d, dtype=dtype, device=device)
        self.J, self.SRR, self.WR, self.ur = self.out.split_with_sizes([d, d, d, 3])
        self.u, self.ur_T = self.ur[0], self.ur.T
        self.J_flat = self.J.view(-1)
        # J [a M⁻¹ U⁻¹ − U⁻¹ so far | inner], and Y (whose transpose ΔQ adds).
        self.prod = torch.empty(d, 2 * d, dtype=dtype, device=device)
        self.prod_last, self.J_inner = self.prod.split_with_sizes([d, d], 1)
        self.Y = torch.empty(d, d, dtype=dtype, device=device)
        self.Y_T = self.Y.T
        self.d_path_ready = True


def _targets_fit(num_classes: int, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds every class index exactly (float32: up to 2²⁴ classes)."""
    return num_classes <= 2.0 / torch.finfo(dtype).eps


def _broadcast_layer(layer: FactoredSphericalLoss, group: Any) -> None:
    """Makes ``layer`` on every process of ``group`` a copy of the one on its first process."""
    import torch.distributed as dist

    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        dist.broadcast(layer.V, source, group=group)
        dist.broadcast(layer._state, source, group=group)
        sigma = torch.tensor(layer._session.sigma, dtype=torch.float64, device=layer.V.device)
        dist.broadcast(sigma, source, group=group)
    layer._session.sigma = (float(sigma[0]), float(sigma[1]))
    layer._session.weight_version += 1
    layer._session.state_version += 1


def _same_target_sum(R: Tensor, target: Tensor) -> Tensor:
    """``S R`` with ``S_ij = [c_i = c_j]``: each row becomes the sum of its class's rows."""
    groups, inverse = torch.unique(target, return_inverse=True)
    if groups.shape[0] == R.shape[0]:
        return R
    sums = R.new_zeros(groups.shape[0], R.shape[1]).index_add_(0, inverse, R)
    return sums.index_select(0, inverse)


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
        H = layer._augment(input)
        s, q, oc, W_c, P, w_bar = layer._statistics(H, target)
        loss, alpha, beta, gamma = layer.member.loss_and_partials(s, q, oc, layer.num_classes)
        n = H.shape[0]
        if not alpha.shape == beta.shape == gamma.shape == loss.shape == (n,):
            # A user-defined member may return scalars for constant partials.
            loss, alpha, beta, gamma = torch.broadcast_tensors(loss, alpha, beta, gamma, s)[:4]
        coef = torch.stack([alpha, beta, gamma], dim=1)
        if valid is not None:
            coef.masked_fill_(~valid.unsqueeze(1), 0.0)
            loss = loss.masked_fill(~valid, 0.0)
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
        ctx.in_features = input.shape[-1]
        return loss if loss.dtype == input.dtype else loss.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        layer: FactoredSphericalLoss = ctx.layer
        layer._check_version(ctx.version)
        (coef,) = ctx.saved_tensors  # (raises if the graph was freed by an earlier backward)
        H, target, W_c, P, s, w_bar = ctx.intermediates
        if grad_loss.dim():  # reduction 'none': one upstream gradient per example
            coef = coef * grad_loss.unsqueeze(1)
        else:
            coef = coef * (grad_loss if ctx.scale is None else grad_loss * ctx.scale)
        if ctx.record:
            layer._record(_Pending(H, coef, target, W_c, P, s))
        grad_input = None
        if ctx.needs_input_grad[0]:
            # ∂L/∂h = α w̄ + 2β Q h + γ W_c, without the bias column: computed on the first
            # columns only, so the gradient is contiguous (autograd would copy a strided one).
            n = ctx.in_features
            alpha, beta, gamma = coef.split(1, dim=1)
            grad = torch.mul(alpha, w_bar)  # α w̄ᵀ (w̄ without its bias entry)
            grad_input = grad.addcmul_(P[:, :n], beta, value=2.0).addcmul_(W_c[:, :n], gamma)
        return grad_input, None, None, None, None


class FactoredSphericalLoss(nn.Module):
    r"""A linear output layer and a spherical loss, trained exactly in ``O(d²)`` per example.

    Computes ``loss(W h + b, target)`` for a member of the spherical family, like
    ``spherical_loss(nn.Linear(in_features, num_classes)(h), target, loss)``, but owns the
    weight (as :class:`torch.nn.AdaptiveLogSoftmaxWithLoss` does) and keeps it factored, so that
    neither the forward, nor the backward to ``h``, nor the SGD step of the weight costs more
    than ``O(in_features²)`` per example, whatever ``num_classes``. Train the weight with
    :class:`FactoredSGD` (plain SGD with weight decay: the only optimizer with an exact
    ``O(d²)`` update); the network below receives ``h.grad`` as usual and may use any optimizer.

    Parameters
    ----------
    in_features : int
        Size ``d`` of each input ``h``.
    num_classes : int
        Number of classes ``D``.
    loss : str, Member or type
        A spherical member of :mod:`spherical_losses.family` by name (``'taylor'``,
        ``'spherical'``, ``'softmax_bound'``, ``'z_loss'``, ``'mse'``), a member object, or a
        user-defined :class:`~spherical_losses.family.SphericalMember`. Default ``'taylor'``.
    bias : bool
        Whether to learn a bias (a last column of ``W``, fed by a constant 1 appended to ``h``;
        weight decay applies to it, as :class:`torch.optim.SGD` applies it to a bias).
    reduction : {'mean', 'sum', 'none'}
        As :func:`torch.nn.functional.cross_entropy`; 'mean' averages over the targets not
        ignored.
    device, dtype
        Of the weight; ``dtype`` float32 or float64 (the small state is float64 regardless).
    ignore_index : int
        Target value that contributes neither loss nor gradient. Default -100.
    max_condition : float
        Largest condition number allowed for the factor ``U`` (at least 16). A larger value
        makes repairs rarer and lets rounding errors of ``V`` grow by up to this factor.
        Default 100.
    **loss_options
        The member's options (``eps``, ``margin``, ``xi``, ``a``, ``b``) when ``loss`` is a
        name, as :func:`spherical_losses.get_loss` takes them.

    Shape
    -----
    input ``(N, in_features)`` or ``(in_features)``; target ``(N)`` or ``()`` of class indices;
    output a scalar, or ``(N)`` / ``()`` for ``reduction='none'``.

    Notes
    -----
    Training protocol. ``loss.backward()`` computes ``h.grad`` and records the update of the
    weight on the layer (the inputs and the per-example coefficients, ``O(d)`` per example);
    several backward calls accumulate, exactly as gradients do, and :meth:`FactoredSGD.step`
    applies them all in one update. As with dense gradients, call
    :meth:`FactoredSGD.zero_grad` between a step and the next backward: a dense SGD without it
    would apply the old gradient again, which has no exact ``O(d²)`` form, so the layer raises
    instead. A backward also raises when no :class:`FactoredSGD` is attached to the layer (the
    weight would silently never train; call ``requires_grad_(False)`` on this layer to freeze
    it, since freezing a parent module reaches parameters only), and when the weight changed
    between a forward and its backward. There is no ``weight.grad`` and the layer has no
    parameters: momentum or Adam would need ``D × d`` state, so they cannot train it (a
    generic optimizer given ``layer.parameters()`` rejects the empty list).

    Examples
    --------
    >>> body = nn.Sequential(nn.Linear(32, 64), nn.Tanh())
    >>> crit = FactoredSphericalLoss(64, 100_000, "spherical", eps=0.1)
    >>> opt_body = torch.optim.Adam(body.parameters())
    >>> opt_out = FactoredSGD(crit, lr=0.1)
    >>> x, y = torch.randn(8, 32), torch.randint(100_000, (8,))
    >>> for opt in (opt_body, opt_out):
    ...     opt.zero_grad()
    >>> crit(body(x), y).backward()
    >>> for opt in (opt_body, opt_out):
    ...     opt.step()
    """

    V: Tensor
    U: Tensor
    U_inv: Tensor
    omega: Tensor
    Q: Tensor
    w_bar: Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        loss: str | Member | type[Member] = "taylor",
        bias: bool = True,
        reduction: str = "mean",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        ignore_index: int = -100,
        max_condition: float = 100.0,
        **loss_options: float | int | None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        conventions.check_reduction(reduction)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        max_condition = float(max_condition)
        if not (16.0 <= max_condition < math.inf):
            raise ValueError(f"max_condition must be a finite number >= 16, got {max_condition!r}")
        member = family.get_member(loss, **loss_options)
        if not (isinstance(member, SphericalMember) and member.spherical):
            raise ValueError(
                f"FactoredSphericalLoss needs a spherical loss (a function of s, q and o_c), "
                f"got {member!r}; use one of 'taylor' (order 2), 'spherical', 'softmax_bound', "
                "'z_loss', 'mse' or a SphericalMember, or the dense losses for this one"
            )
        self.member: SphericalMember = member
        self.in_features = in_features
        self.num_classes = num_classes
        self.has_bias = bool(bias)
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.max_condition = max_condition

        d = in_features + self.has_bias
        self.register_buffer("V", torch.empty(num_classes, d, device=device, dtype=dtype))
        # U, Q, ω, w̄ and U⁻¹ are views of one float64 matrix [Uᵀ | Q | ω | w̄ | U⁻¹] (d × 3d+2):
        # a step updates all of them with one addition, and one copy casts them to V's dtype.
        self._state = torch.zeros(d, 3 * d + 2, device=device, dtype=torch.float64)
        self._register_state_views()
        self._session = _Session()
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------
    # construction and conversion

    def reset_parameters(self) -> None:
        """Initializes the weight and bias as :class:`torch.nn.Linear` does."""
        with torch.no_grad():
            bound = 1.0 / math.sqrt(self.in_features)
            self.V.uniform_(-bound, bound)
            self._reset_factorization()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        loss: str | Member | type[Member] = "taylor",
        **kwargs: Any,
    ) -> FactoredSphericalLoss:
        """The layer with the weight and bias of ``linear`` (copied), on its device and dtype.

        ``kwargs`` are the other arguments of the constructor (``reduction``, member options).
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        # skip_init builds the layer on the meta device: no O(D d²) initialization to discard.
        layer = nn.utils.skip_init(
            cls,
            linear.in_features,
            linear.out_features,
            loss,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            layer.V[:, : linear.in_features].copy_(weight)
            if linear.bias is not None:
                layer.V[:, -1].copy_(linear.bias)
            layer._reset_factorization()
        return layer

    def to_linear(self) -> nn.Linear:
        """A :class:`torch.nn.Linear` with this layer's weight and bias (copies)."""
        linear = nn.Linear(
            self.in_features,
            self.num_classes,
            bias=self.has_bias,
            device="meta",
        )
        weight, bias = self._materialize()
        linear.weight = nn.Parameter(weight)
        if bias is not None:
            linear.bias = nn.Parameter(bias)
        return linear

    @property
    def weight(self) -> Tensor:
        """The weight ``(num_classes, in_features)``, materialized (a copy; ``O(D d²)``)."""
        return self._materialize()[0]

    @property
    def bias(self) -> Tensor | None:
        """The bias ``(num_classes,)``, materialized (a copy), or ``None``."""
        return self._materialize()[1] if self.has_bias else None

    def requires_grad_(self, requires_grad: bool = True) -> FactoredSphericalLoss:
        """Whether ``backward()`` records updates of the weight (``False`` freezes it).

        Calling it on a parent module does not reach this layer, whose weight is no parameter.
        """
        self._session.trainable = bool(requires_grad)
        return super().requires_grad_(requires_grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discards the update recorded since the last step, like the :class:`FactoredSGD`'s
        ``zero_grad()``. A parent module's ``zero_grad()`` does not reach it (it zeroes the
        gradients of parameters, and this layer has none): call this or the optimizer's.
        """
        super().zero_grad(set_to_none)
        self._discard_pending()

    # ----------------------------------------------------------------------------------------
    # forward and evaluation

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of ``input`` ``(N, in_features)`` against class indices ``target`` ``(N)``."""
        rows, target_rows, valid, unbatched = self._check(input, target)
        # A zero-sized leaf that requires grad makes autograd call the backward (which records
        # the weight's update) even when the input needs no gradient.
        trigger = None
        if self._session.trainable and torch.is_grad_enabled():
            trigger = self._session.trigger
            if trigger is None or trigger.device != rows.device:
                trigger = self._session.trigger = torch.empty(
                    0, device=rows.device, requires_grad=True
                )
        loss = _FactoredLossFunction.apply(rows, target_rows, valid, self, trigger)
        return loss.squeeze(0) if unbatched and self.reduction == "none" else loss

    def log_prob(self, input: Tensor, target: Tensor) -> Tensor:
        """Exact ``log p(target | input)`` in ``O(d²)`` per example, for members with probabilities.

        Differentiable with respect to ``input`` (not the weight).

        Parameters
        ----------
        input : Tensor
            ``(N, in_features)`` or ``(in_features)``.
        target : Tensor
            Class indices ``(N)`` or ``()``.

        Returns
        -------
        Tensor
            ``(N)`` or ``()``; 0 at positions equal to ``ignore_index``.
        """
        if not self.member.has_probabilities:
            raise ValueError(
                f"the {self.member.name!r} loss defines no class probabilities, so it has no "
                "log_prob; use 'taylor' or 'spherical'"
            )
        rows, target_rows, valid, unbatched = self._check(input, target)
        s, q, oc = self._statistics(self._augment(rows), target_rows)[:3]
        logp = self.member.target_log_prob(s, q, oc, self.num_classes)
        if valid is not None:
            logp = logp.masked_fill(~valid, 0.0)
        logp = logp.to(input.dtype)
        return logp.squeeze(0) if unbatched else logp

    def logits(self, input: Tensor, chunk_size: int | None = None) -> Tensor:
        """All outputs ``W h + b``: ``(N, num_classes)`` (or ``(num_classes)``), ``O(D d)`` each.

        ``chunk_size`` classes are computed at a time (default: all at once); no ``D × d``
        temporary is formed either way.
        """
        rows, unbatched = self._check_input(input)
        out = rows.new_empty(rows.shape[0], self.num_classes)
        for start, chunk in self._logit_chunks(rows, chunk_size):
            out[:, start : start + chunk.shape[1]] = chunk
        return out.squeeze(0) if unbatched else out

    def topk(
        self, input: Tensor, k: int, chunk_size: int = 65536, *, by: str = "logit"
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest outputs (or most probable classes) and their classes, without
        forming all outputs at once.

        Parameters
        ----------
        input : Tensor
            ``(N, in_features)`` or ``(in_features)``.
        k : int
            ``1 <= k <= num_classes``.
        chunk_size : int
            Classes per chunk: memory is ``O(N·(chunk_size + k))``.
        by : str
            ``'logit'`` (default): the largest outputs. ``'probability'``: the most probable
            classes under the member's own probabilities (Taylor, spherical), which need not
            be the largest outputs (Taylor's ``1 + o + o²/2`` and spherical's ``o² + ε`` are not
            increasing in ``o``); the values are then log-probabilities, exact (the normalizer
            comes from ``s`` and ``q`` in ``O(d²)`` per row).

        Returns
        -------
        (values, indices) : tuple of Tensor
            ``(N, k)`` (or ``(k)``), sorted in decreasing order, as :func:`torch.topk`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be an integer in [1, {self.num_classes}], got {k!r}")
        if by not in ("logit", "probability"):
            raise ValueError(f"by must be 'logit' or 'probability', got {by!r}")
        if by == "probability" and not self.member.has_probabilities:
            raise ValueError(
                f"the {self.member.name!r} loss defines no class probabilities; use by='logit'"
            )
        rows, unbatched = self._check_input(input)
        score: Callable[[Tensor], Tensor] = lambda chunk: chunk  # noqa: E731
        if by == "probability":
            # log p_k = target_log_prob(s, q, o_k, D) for every class k of a chunk.
            H = self._augment(rows)
            HQ = H @ self._cast_state().QW  # [H Q | H ω | H w̄]
            d = H.shape[1]
            s, q = HQ[:, d + 1 :], torch.linalg.vecdot(HQ[:, :d], H).unsqueeze(1)
            member, D = self.member, self.num_classes
            score = lambda chunk: member.target_log_prob(s, q, chunk, D)  # noqa: E731
        # The running top k, merged with each chunk's own top k.
        values = rows.new_empty(rows.shape[0], 0)
        indices = torch.empty(rows.shape[0], 0, dtype=torch.long, device=rows.device)
        for start, logits in self._logit_chunks(rows, chunk_size):
            chunk = score(logits)
            chunk_values, chunk_indices = chunk.topk(min(k, chunk.shape[1]), dim=1)
            values, order = torch.cat([values, chunk_values], dim=1).topk(
                min(k, values.shape[1] + chunk_values.shape[1]), dim=1
            )
            indices = torch.cat([indices, chunk_indices + start], dim=1).gather(1, order)
        if unbatched:
            return values.squeeze(0), indices.squeeze(0)
        return values, indices

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, "
            f"loss={self.member!r}, bias={self.has_bias}, reduction={self.reduction!r}"
        )

    # ----------------------------------------------------------------------------------------
    # maintenance

    @torch.no_grad()
    def repair(self) -> None:
        """Folds ``U`` and ``ω`` into ``V`` and recomputes ``Q`` and ``w̄`` from ``V``, exactly.

        ``W`` is unchanged (up to one rounding of ``V`` to its dtype). Costs ``O(D d²)``, in row
        chunks. Called automatically when ``U``'s condition number or scale leaves its range.
        """
        U, omega = (t.to(self.V.dtype) for t in (self.U, self.omega))
        self._reset_factorization(lambda rows: torch.addmm(omega, rows, U))

    def _register_state_views(self) -> None:
        S, d = self._state, self._state.shape[0]
        self.register_buffer("U", S[:, :d].T)
        self.register_buffer("U_inv", S[:, 2 * d + 2 :])
        self.register_buffer("omega", S[:, 2 * d])
        self.register_buffer("Q", S[:, d : 2 * d])
        self.register_buffer("w_bar", S[:, 2 * d + 1])

    def _pack_state(self, values: dict[str, Tensor], device: torch.device) -> None:
        """A new packed float64 state on ``device`` holding ``values`` (none if they are meta)."""
        d = self.V.shape[1]
        self._state = torch.empty(d, 3 * d + 2, device=device, dtype=torch.float64)
        self._register_state_views()
        if not any(value.is_meta for value in values.values()):
            for name, value in values.items():
                self._buffers[name].copy_(value)  # type: ignore[union-attr]

    def _reset_factorization(self, transform: Callable[[Tensor], Tensor] | None = None) -> None:
        """``V ← transform(V)`` by row chunks, then ``U = U⁻¹ = I``, ``ω = 0``, ``Q = VᵀV``,
        ``w̄ = Vᵀ1`` (in place).
        """
        V = self.V
        Q, w_bar = self.Q.zero_(), self.w_bar.zero_()
        step = max(1, _CHUNK_ELEMENTS // V.shape[1])
        for start in range(0, V.shape[0], step):
            rows = V[start : start + step]
            if transform is not None:
                rows.copy_(transform(rows))
            # Within a chunk the Gram matrix is accumulated in V's dtype, across chunks in float64.
            Q += rows.T @ rows
            w_bar += rows.sum(0, dtype=torch.float64)
        Q.add_(Q.T.clone()).mul_(0.5)
        for t in (self.U, self.U_inv):
            t.zero_().diagonal().fill_(1.0)
        self.omega.zero_()
        self._session.sigma = (1.0, 1.0)
        self._session.state_version += 1

    # ----------------------------------------------------------------------------------------
    # internals: inputs

    def _check_input(self, input: Tensor) -> tuple[Tensor, bool]:
        if not isinstance(input, Tensor):
            raise ValueError(f"input must be a tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2) or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape (N, {self.in_features}) or ({self.in_features},), "
                f"got {tuple(input.shape)}"
            )
        if input.dtype != self.V.dtype:
            raise ValueError(
                f"input dtype {input.dtype} does not match the layer's {self.V.dtype}; "
                "convert one of them (e.g. layer.to(input.dtype))"
            )
        if input.device != self.V.device:
            raise ValueError(
                f"input is on {input.device} but the layer is on {self.V.device}; move one of them"
            )
        unbatched = input.dim() == 1
        return (input.unsqueeze(0) if unbatched else input), unbatched

    def _check(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Rows ``(N, in_features)``, targets ``(N)`` (0 where ignored), and the mask of the
        targets kept (``None`` when all are).
        """
        rows, unbatched = self._check_input(input)
        target = conventions.class_indices(target)
        expected = () if unbatched else (rows.shape[0],)
        if tuple(target.shape) != expected:
            raise ValueError(
                f"target must have shape {expected} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        if target.device != rows.device:
            raise ValueError(f"target is on {target.device} but the input is on {rows.device}")
        if unbatched:
            target = target.reshape(1)
        if target.numel() == 0:
            return rows, target, None, unbatched
        if not 0 <= self.ignore_index < self.num_classes:
            # The usual case (ignore_index = -100): targets all in range ignore nothing.
            low, high = torch.aminmax(target)
            if 0 <= int(low) and int(high) < self.num_classes:
                return rows, target, None, unbatched
        valid = conventions.target_mask(target, self.num_classes, self.ignore_index)
        return rows, target.masked_fill(~valid, 0), valid, unbatched

    def _augment(self, rows: Tensor) -> Tensor:
        """``H``: the rows with a constant 1 appended when the layer has a bias."""
        if not self.has_bias:
            return rows
        # One concatenation with a kept column of ones (cheaper than a padding, which fills).
        ones = self._session.ones
        m = rows.shape[0]
        if (
            ones is None
            or ones.shape[0] < m
            or ones.dtype != rows.dtype
            or ones.device != rows.device
        ):
            with torch.inference_mode(False):
                ones = self._session.ones = rows.new_ones(max(m, 1), 1)
        return torch.cat([rows, ones[:m]], dim=1)

    # ----------------------------------------------------------------------------------------
    # internals: the factored weight

    def _cast_state(self) -> _Cast:
        """The small state in V's dtype, refreshed (one copy) after each change."""
        session = self._session
        cache = session.cast_cache
        if cache is None or cache[0] != session.state_version:
            # (A move or cast of the layer changes the state version too.)
            V = self.V
            cast = cache[1] if cache is not None else None
            if cast is None or cast.packed.dtype != V.dtype or cast.packed.device != V.device:
                with torch.inference_mode(False):  # a normal tensor, even during a step
                    packed = torch.empty_like(self._state, dtype=V.dtype)
                d = packed.shape[0]
                Ut, Q, omega, w_bar, U_inv = packed.split_with_sizes([d, d, 1, 1, d], 1)
                QW = packed[:, d : 2 * d + 2]
                w_bar = w_bar[:, 0]
                cast = _Cast(
                    packed, Ut.T, Q, omega[:, 0], w_bar, U_inv, QW, w_bar[: self.in_features]
                )
            cast.packed.copy_(self._state)
            cache = session.cast_cache = (session.state_version, cast)
        return cache[1]

    def _statistics(self, H: Tensor, target: Tensor) -> tuple[Tensor, ...]:
        """``(s, q, o_c, W_c, P, w̄)`` of the rows of ``H`` (``O(m d²)``); ``P = H Q``; ``w̄``
        without its bias entry.
        """
        state = self._cast_state()
        W_c = torch.addmm(state.omega, self.V.index_select(0, target), state.U)
        d = H.shape[1]
        HQ = H @ state.QW  # [H Q | H ω | H w̄], one product
        P, s = HQ[:, :d], HQ[:, d + 1]
        q = torch.linalg.vecdot(P, H)
        oc = torch.linalg.vecdot(W_c, H)
        return s, q, oc, W_c, P, state.w_bar_in

    def _logit_chunks(self, rows: Tensor, chunk_size: int | None) -> Iterator[tuple[int, Tensor]]:
        if chunk_size is None:
            chunk_size = self.num_classes
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        state = self._cast_state()
        H = self._augment(rows)
        # o = V (U h) + ω·h: one (N, d) product, then a product with V's rows per chunk.
        HU = H @ state.U.T
        shift = (H @ state.omega).unsqueeze(1)
        for start in range(0, self.num_classes, chunk_size):
            yield start, torch.addmm(shift, HU, self.V[start : start + chunk_size].T)

    @torch.no_grad()
    def _materialize(self) -> tuple[Tensor, Tensor | None]:
        weight = self.V.new_empty(self.num_classes, self.in_features)
        bias = self.V.new_empty(self.num_classes) if self.has_bias else None
        state = self._cast_state()
        step = max(1, _CHUNK_ELEMENTS // self.V.shape[1])
        for start in range(0, self.num_classes, step):
            rows = torch.addmm(state.omega, self.V[start : start + step], state.U)
            weight[start : start + step] = rows[:, : self.in_features]
            if bias is not None:
                bias[start : start + step] = rows[:, -1]
        return weight, bias

    # ----------------------------------------------------------------------------------------
    # internals: the training protocol

    def _attach(self, optimizer: FactoredSGD) -> None:
        self._session.optimizer_ref = weakref.ref(optimizer)
        self._session.pending = []
        self._session.consumed = False

    def _attached(self) -> FactoredSGD | None:
        optimizer = (
            self._session.optimizer_ref() if self._session.optimizer_ref is not None else None
        )
        return optimizer if optimizer is not None and optimizer.layer is self else None

    def _check_version(self, version: int) -> None:
        if version != self._session.weight_version:
            raise RuntimeError(
                "FactoredSphericalLoss: the weight changed between this forward and its backward "
                "(an optimizer step, load_state_dict() or a move/cast in between), so the "
                "gradient would refer to the old weight; run the forward again"
            )

    def _record(self, pending: _Pending) -> None:
        if self._attached() is None:
            raise RuntimeError(
                "FactoredSphericalLoss: no FactoredSGD is attached, so this backward would "
                "compute the input's gradient but never train the layer's weight; create "
                "spherical_losses.FactoredSGD(layer, lr=...) (the only optimizer of this layer: "
                "momentum or Adam would need D x d state), or call layer.requires_grad_(False) "
                "to freeze the weight"
            )
        if self._session.consumed:
            raise RuntimeError(
                "FactoredSphericalLoss: backward() after FactoredSGD.step() without zero_grad(); "
                "dense SGD would add this gradient to the one already applied, which has no "
                "exact factored form: call the FactoredSGD's zero_grad() after each step"
            )
        self._session.pending.append(pending)

    def _discard_pending(self) -> None:
        self._session.pending = []
        self._session.consumed = False

    def _sgd_step(
        self, lr: float, weight_decay: float, exchange: Callable[..., _Pending | None] | None
    ) -> None:
        problem = None
        if not self._session.pending and self._session.consumed:
            problem = (
                "FactoredSGD.step() called again without a backward(); dense SGD would apply "
                "the previous gradient again, which has no exact factored form: call "
                "zero_grad() after each step"
            )
            if exchange is None:
                raise RuntimeError(problem)
        pending = self._session.pending
        update: _Pending | None = None
        if len(pending) == 1:
            update = pending[0]
        elif pending:  # W did not change between these backward calls: one update of all rows
            update = _Pending(*(torch.cat(parts) for parts in zip(*pending, strict=True)))
        if exchange is not None:  # every process gets every process's rows (or raises with all)
            update = exchange(update, lr, weight_decay, problem)
        if update is None:
            return  # no gradient: dense SGD skips the parameter, weight decay included
        with torch.inference_mode():  # (no autograd bookkeeping: a little less per operation)
            self._apply_update(update, lr, weight_decay)
        self._session.pending = []
        self._session.consumed = True
        self._session.weight_version += 1
        self._session.state_version += 1

    def _apply_update(self, upd: _Pending, lr: float, weight_decay: float) -> None:
        """``W ← (1 − ηλ) W − η Σ_i (α_i 1 + 2β_i W h_i + γ_i e_{c_i}) h_iᵀ``, in factored form.

        With ``a = 1 − ηλ``, ``b = 2ηβ``, ``J = Hᵀ diag(b) H``, ``M = a I − J``, ``u = −η Hᵀα``
        and ``R = −η diag(γ) H``: ``W' = W M + 1 uᵀ + Eᵀ R`` (``E`` the one-hot rows of the
        targets), so ``U' = U M``, ``ω' = M ω + u``, ``V[c] += R U'⁻¹``, and
        ``Q' = M Q M + T + Tᵀ + Rᵀ S R + (rank 2) = a² Q + Y + Yᵀ`` with
        ``Y = J (Q J/2 − W_cᵀ R − a Q) + a W_cᵀ R + Rᵀ S R/2 + g uᵀ``, ``g = M w̄ + Rᵀ1 + D u/2``.
        The increments are computed in V's dtype and added to the float64 state in place.
        """
        H, c = upd.H, upd.target
        m, d = H.shape
        dtype = H.dtype
        D = self.num_classes
        a = 1.0 - lr * weight_decay
        if m == 0:  # an empty minibatch: weight decay only, W' = a W
            self._session.last_update = "decay"
            if a == 0.0:
                self.V.zero_()
                self._reset_factorization()
            elif a != 1.0:
                S = self._state
                S[:, : 2 * d + 2].mul_(a)
                S[:, d : 2 * d].mul_(a)
                S[:, 2 * d + 2 :].div_(a)
                self._session.sigma = (
                    self._session.sigma[0] * abs(a),
                    self._session.sigma[1] * abs(a),
                )
            return
        ws = self._workspace(m, d, H.dtype, H.device)
        if ws.lr != lr:
            ws.lr = lr
            ws.scale.copy_(torch.tensor([-lr, 2.0 * lr, -lr], dtype=torch.float64))
        # M⁻¹ from the m×m side (Woodbury: (a I − H Hᵀ diag(b))⁻¹) or from the d×d matrix J;
        # their costs (multiply-adds of the whole step) cross near d ≈ 1.45 m.
        woodbury = 4 * m * d * d + 14 * m * m * d + m**3 < 10 * d**3
        if not woodbury and not ws.d_path_ready:
            ws.prepare_d_path()
        # Columns −ηα (u = Hᵀ(−ηα)), b = 2ηβ and −ηγ (R = diag(−ηγ) H); on the d × d path
        # written straight into the left factor of the product below.
        if woodbury:
            cs = torch.mul(upd.coef, ws.scale)
            b, g_col = cs[:, 1:2], cs[:, 2:]
        else:
            cs = torch.mul(upd.coef, ws.scale, out=ws.L_blocks[3])
            b, g_col = ws.b, ws.g_col
        R = H * g_col
        SR = None  # S R, with S_ij = [c_i = c_j]: R's rows summed over repeated targets
        if woodbury:
            SR = _same_target_sum(R, c)
            hb = H * b
            # H Hᵀ, H Q Hᵀ and H W_cᵀ in one product.
            G, C, N = (H @ torch.cat([H, upd.P, upd.W_c]).T).split_with_sizes([m, m, m], 1)
            GB = G * b.T  # H Hᵀ diag(b), which has the nonzero eigenvalues of J
            rho_sq = (GB * GB.T).sum()  # ‖J‖_F² = tr((H Hᵀ diag(b))²)
            ur = (H.T @ cs).T
            u, ur_T = ur[0], ur.T
        else:
            # One product gives J = Hᵀ diag(b) H, Rᵀ S R, W_cᵀ R, u and r = Rᵀ1.
            L_hb, L_SR, L_W, _ = ws.L_blocks
            torch.mul(H, b, out=L_hb)
            if H.device.type == "cpu":
                # diag(−ηγ) S R from R's rows summed over the targets' groups: on the CPU,
                # less time than the m × m product below.
                torch.mul(_same_target_sum(R, c), g_col, out=L_SR)
            else:
                # diag(−ηγ) S R as (diag(−ηγ) S) R: one m × m product, which unlike the
                # groups (torch.unique) needs no synchronization with the device.
                torch.mm(torch.mul(torch.eq(c.unsqueeze(1), c), g_col), R, out=L_SR)
            torch.mul(upd.W_c, g_col, out=L_W)
            torch.mm(ws.L_T, H, out=ws.out)
            J, SRR, WR, ur = ws.J, ws.SRR, ws.WR, ws.ur
            u, ur_T = ws.u, ws.ur_T
            rho_sq = torch.dot(ws.J_flat, ws.J_flat)
        # One synchronization: the bound ρ = ‖J‖_F, and whether the coefficients are finite.
        rho_sq_value, total = torch.stack([rho_sq, ur.sum()]).tolist()
        rho_value = math.sqrt(max(rho_sq_value, 0.0))
        if not (math.isfinite(total) and math.isfinite(rho_value)):
            raise NonFiniteUpdateError(
                "FactoredSGD: the recorded gradient is not finite (the loss or the input "
                "overflowed); the update was not applied"
            )

        # J is symmetric with ‖J‖₂ ≤ ρ, so M's eigenvalues lie in [a − ρ, a + ρ]. For ρ ≤ a/2,
        # a M⁻¹ = Σ_k (J/a)^k converges; `terms` powers reach the dtype's precision (the rest
        # is below eps times the increment). Beyond, take M's exact spectrum.
        r_ratio = rho_value / a if a > 0 else math.inf
        eig = None
        if r_ratio <= 0.5:
            sm_hi, sm_lo = a + rho_value, a - rho_value
            eps = _EPS[dtype]
            terms = 1
            if r_ratio > 0:
                terms = max(1, math.ceil(math.log(eps * (1 - r_ratio)) / math.log(r_ratio)))
            kind = "series" if terms <= _MAX_SERIES_TERMS else "direct"
        else:
            J64 = H.T.double() @ (H * b).double()
            eig = torch.linalg.eigh((J64 + J64.T) / 2)
            singular = (a - eig.eigenvalues).abs()
            sm_hi, sm_lo = singular.max().item(), singular.min().item()
            if not sm_lo * self.max_condition > 4.0 * sm_hi:
                # M itself is (nearly) singular, so U' would be: apply the step to V directly.
                self._dense_update(c, a, J64, R, u)
                self._session.last_update = "dense"
                return
            kind = "eigen"
            if woodbury:
                woodbury = False
                if not ws.d_path_ready:
                    ws.prepare_d_path()
                if SR is None:
                    SR = _same_target_sum(R, c)
                SRR, WR = (torch.cat([SR * g_col, upd.W_c * g_col], dim=1).T @ H).split_with_sizes(
                    [d, d]
                )
            J = J64.to(dtype)
        self._session.last_update = kind

        hi, lo = self._session.sigma
        if not self._sigma_in_range(hi * sm_hi, lo * sm_lo, 1.0):
            # The bounds may be loose: look at the exact singular values before repairing.
            sigma = torch.linalg.svdvals(self.U)
            hi, lo = sigma[0].item(), sigma[-1].item()
            if self._sigma_in_range(hi, lo, 4.0):
                self.U_inv.copy_(torch.linalg.inv(self.U))  # clears the rounding drift of U⁻¹
                self._session.state_version += 1
            else:
                self.repair()
                hi, lo = 1.0, 1.0
        self._session.sigma = (hi * sm_hi, lo * sm_lo)

        state = self._cast_state()
        ws.set_decay(a)
        inc_Ut, inc_Q, inc_omega, inc_w_bar, inc_U_inv = ws.inc_blocks
        if woodbury:
            X, HU = H @ state.U_inv, H @ state.U.T  # H U⁻¹, H Uᵀ
            torch.mv(hb.T, H @ state.omega, out=inc_omega)  # J ω
            torch.mv(hb.T, upd.s, out=inc_w_bar)  # J w̄, with H w̄ = s from the forward
            if kind == "series":  # a Z = Σ_k (G B / a)^k X, by Horner on the m×m side
                Z = X
                for _ in range(terms - 1):
                    Z = torch.addmm(X, GB, Z, alpha=1.0 / a)
            else:
                Z = a * torch.linalg.solve(torch.diag_embed(GB.new_full((m,), a)) - GB, X)
            torch.mm(hb.T, HU, out=inc_Ut)  # J Uᵀ = (U J)ᵀ
            torch.addmm(inc_U_inv, hb.T, Z, beta=0.0, alpha=1.0 / a, out=inc_U_inv)
            dV = torch.addmm(X, GB, Z, alpha=1.0 / a).mul_(g_col / a)  # R U'⁻¹
        else:
            # J [Uᵀ | Q | ω | w̄ | U⁻¹] in one product, written where the increments go (J is
            # symmetric: J Uᵀ = (U J)ᵀ and J Q = (Q J)ᵀ).
            torch.mm(J, state.packed, out=ws.inc_main)
            JU_inv = inc_U_inv
            # −(Q J/2 − W_cᵀ R − a Q), which J multiplies in Y (Q J = (J Q)ᵀ, read from the
            # ΔQ block, which holds J Q until ΔQ replaces it below).
            inner = torch.add(WR, ws.inc_Q_T, alpha=-0.5, out=ws.inner).add_(state.Q, alpha=a)
            if kind == "series":  # a M⁻¹ U⁻¹ − U⁻¹ = Σ_{k≥1} (J/a)^k U⁻¹, by Horner
                if terms == 1:
                    J_inner = torch.mm(J, inner, out=ws.J_inner)
                    if a != 1.0:
                        inc_U_inv.div_(a)
                else:
                    first = None
                    if terms > 2:  # all powers but the last, then its place holds a × that
                        first = JU_inv / a
                        step = first
                        for _ in range(terms - 2):
                            step = torch.addmm(first, J, step, alpha=1.0 / a)
                        JU_inv.copy_(step).mul_(a)
                    # The last power and J × inner in one product.
                    torch.mm(J, ws.last, out=ws.prod)
                    last, J_inner = ws.prod_last, ws.J_inner
                    if first is not None:
                        torch.add(first, last, alpha=1.0 / (a * a), out=inc_U_inv)
                    elif a != 1.0:
                        inc_U_inv.div_(a).add_(last, alpha=1.0 / (a * a))
                    else:
                        inc_U_inv.add_(last)
            else:
                eye = torch.eye(d, device=H.device, dtype=torch.float64)
                if eig is None:
                    M_inv = torch.cholesky_inverse(torch.linalg.cholesky(a * eye - J.double()))
                else:
                    M_inv = (eig.eigenvectors / (a - eig.eigenvalues)) @ eig.eigenvectors.T
                J_inner = J @ inner
                torch.mm((a * M_inv - eye).to(dtype), state.U_inv, out=inc_U_inv)
            dV = R @ torch.add(state.U_inv, inc_U_inv)
            if a != 1.0:
                dV /= a
        # J ω − u and J w̄ − D u − Rᵀ1 (ω' = M ω + u, w̄' = M w̄ + D u + Rᵀ1), and
        # g = M w̄ + Rᵀ1 + D u/2.
        # The first two as one product of [u; Hᵀb; r]ᵀ with a 3 × 2 matrix; −g by itself.
        ws.inc_vectors.addmm_(ur_T, ws.vector_coefficients(D))
        neg_g = torch.add(inc_w_bar, state.w_bar, alpha=-a).add_(u, alpha=0.5 * D)
        if woodbury:
            left = torch.cat([hb, R, neg_g.neg().unsqueeze(0)])
            right = torch.cat(
                [
                    torch.addmm(C @ hb, N, R, beta=0.5, alpha=-1.0).sub_(upd.P, alpha=a),
                    torch.add(SR, upd.W_c, alpha=2.0 * a).mul_(0.5),
                    u.unsqueeze(0),
                ]
            )
            Y = left.T @ right
        else:
            # Y = −J inner + a W_cᵀ R + Rᵀ S R/2 + g uᵀ.
            Y = ws.Y
            if a != 1.0:
                torch.add(SRR, WR, alpha=2.0 * a, out=Y).mul_(0.5)
            else:
                torch.add(WR, SRR, alpha=0.5, out=Y)
            Y.sub_(J_inner).addr_(neg_g, u, alpha=-1.0)
        torch.add(Y, Y.T if woodbury else ws.Y_T, out=inc_Q)
        if H.device.type == "cpu":
            # (On the CPU index_add_ takes less time than index_put_ with accumulate, and it
            # adds V's rows deterministically there; on CUDA its atomic adds would not.)
            self.V.index_add_(0, c, dV)
        else:
            self.V.index_put_((c,), dV, accumulate=True)
        S = self._state.addcmul_(ws.inc_main, ws.column_scale)
        if a != 1.0:
            S[:, : 2 * d + 2].mul_(a)
            S[:, d : 2 * d].mul_(a)
            S[:, 2 * d + 2 :].div_(a)

    def _dense_update(self, target: Tensor, a: float, J64: Tensor, R: Tensor, u: Tensor) -> None:
        """The same step applied to ``V`` itself (``O(D d²)``): ``V ← (V U + 1ωᵀ) M + 1uᵀ``,
        ``V[c] += R``, then a fresh factorization. For steps that make ``M`` ill-conditioned.
        """
        eye = torch.eye(J64.shape[0], device=J64.device, dtype=torch.float64)
        M = a * eye - J64
        UM = (self.U @ M).to(self.V.dtype)
        shift = (M @ self.omega + u.double()).to(self.V.dtype)
        step = max(1, _CHUNK_ELEMENTS // self.V.shape[1])
        for start in range(0, self.num_classes, step):
            rows = self.V[start : start + step]
            rows.copy_(torch.addmm(shift, rows, UM))
        self.V.index_add_(0, target, R)
        self._reset_factorization()

    def _workspace(self, m: int, d: int, dtype: torch.dtype, device: torch.device) -> _Workspace:
        ws = self._session.workspace
        if ws is None or ws.key != (m, d, dtype, device):
            ws = self._session.workspace = _Workspace(m, d, dtype, device)
        return ws

    def _sigma_in_range(self, hi: float, lo: float, margin: float) -> bool:
        """Whether singular values in ``[lo, hi]`` are within range, with a safety ``margin``."""
        return (
            lo > 0
            and hi * margin <= self.max_condition * lo
            and hi * margin <= _SCALE_LIMIT
            and lo >= margin / _SCALE_LIMIT
        )

    # ----------------------------------------------------------------------------------------
    # nn.Module hooks

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FactoredSphericalLoss:
        # .to(), .cuda(), .float(), ...: V takes the new device and dtype; the small state
        # follows the device only and stays float64 (re-cast from the original, not rounded).
        if self._session.pending:
            raise RuntimeError(
                "FactoredSphericalLoss: cannot move or cast the layer while an update is "
                "pending; call the FactoredSGD's step() or zero_grad() first"
            )
        dtype = fn(self.V.detach()[:0]).dtype  # what fn makes of V (on a zero-size view)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"FactoredSphericalLoss holds its weight in torch.float32 or torch.float64, not "
                f"{dtype} (its exact update needs that precision); cast the rest of the model "
                "only, e.g. with model.body.half()"
            )
        old = {name: self._buffers[name] for name in _STATE}
        super()._apply(fn, recurse)
        if any(self._buffers[name] is not before for name, before in old.items()):
            # The views were replaced: pack them again, with the float64 originals' values, on
            # the device that fn chose.
            self._pack_state(old, self._buffers["U"].device)
        self._session.weight_version += 1
        self._session.state_version += 1
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"sigma_bounds": self._session.sigma}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._session.sigma = tuple(float(x) for x in state["sigma_bounds"])  # type: ignore[assignment]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self._session.pending:
            raise RuntimeError(
                "FactoredSphericalLoss: cannot load a state while an update is pending; call the "
                "FactoredSGD's step() or zero_grad() first"
            )
        views = {name: self._buffers[name] for name in _STATE}
        super()._load_from_state_dict(state_dict, prefix, *args)
        if any(self._buffers[name] is not view for name, view in views.items()):
            # load_state_dict(assign=True) replaced the views by the loaded tensors.
            loaded = {name: self._buffers[name] for name in _STATE}
            self._pack_state(loaded, self._buffers["U"].device)
        self._session.weight_version += 1
        self._session.state_version += 1

    def __getstate__(self) -> dict[str, Any]:
        # The attachment to an optimizer and the pending update belong to a training session.
        state = self.__dict__.copy()
        state["_session"] = self._session.detached()
        return state


class FactoredSGD(torch.optim.Optimizer):
    """Exact SGD (with weight decay) for a :class:`FactoredSphericalLoss`, in ``O(d²)`` per example.

    :meth:`step` applies ``W ← W − lr·(∇W + weight_decay·W)`` with the gradient of every
    ``backward()`` since the last :meth:`zero_grad` (bias included), exactly as
    :class:`torch.optim.SGD` does on the dense layer, without ever forming ``∇W``. It is a
    :class:`torch.optim.Optimizer`: learning-rate schedulers work on it (``OneCycleLR`` with
    ``cycle_momentum=False``: there is no momentum) and its ``state_dict()`` round-trips
    (``param_groups`` holds a single placeholder tensor; the layer's state is saved with the
    layer). A copy or pickle of the layer and its optimizer together trains the copied layer.

    Parameters
    ----------
    layer : FactoredSphericalLoss
        The layer to train; attaching an optimizer detaches the previous one.
    lr : float
        Learning rate, ``>= 0``.
    weight_decay : float
        L2 penalty, ``>= 0``, as :class:`torch.optim.SGD` (applied to the bias too).
    process_group : ProcessGroup, optional
        Train one layer across the processes of a :mod:`torch.distributed` group (e.g.
        ``torch.distributed.group.WORLD`` under ``torchrun``), each with its own share of the
        minibatch, as :class:`~torch.nn.parallel.DistributedDataParallel` trains the rest of
        the network. The layer's state is broadcast from the group's first process here; each
        :meth:`step` then gathers every process's recorded rows (``h``, ``α, β, γ``, the
        target, and the forward's ``W_c``, ``H Q`` and ``s``: ``m (3d + 5)`` numbers per
        process, not a ``D × d`` gradient), averages the gradients over the processes as
        DistributedDataParallel does, and applies the same exact update everywhere. Every
        process of the group must call :meth:`step`. ``None`` (default): no exchange.

    Attributes
    ----------
    last_exchange_bytes : int
        Bytes this process sent in the last :meth:`step`'s exchange (0 without a group).

    Notes
    -----
    Only plain SGD is exact in ``O(d²)``: momentum or Adam keep ``D × d`` state, and a
    :class:`FactoredSphericalLoss` exposes no parameters to them (a backward without a
    :class:`FactoredSGD` attached raises). Between a :meth:`step` and the next ``backward()``,
    call :meth:`zero_grad`.
    """

    def __init__(
        self,
        layer: FactoredSphericalLoss,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        process_group: Any = None,
    ) -> None:
        if not isinstance(layer, FactoredSphericalLoss):
            raise ValueError(
                f"FactoredSGD trains a FactoredSphericalLoss, got {type(layer).__name__}"
            )
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if not (0.0 <= float(value) < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if process_group is not None:
            import torch.distributed as dist

            if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
                raise ValueError(
                    "process_group must be a torch.distributed ProcessGroup or None, got "
                    f"{type(process_group).__name__}"
                )
        # torch.optim.Optimizer wants tensors in its parameter group: a zero-size placeholder.
        # The step reaches the layer's state through self.layer (which .to() may have moved).
        placeholder = torch.empty(0, device=layer.V.device, dtype=layer.V.dtype)
        super().__init__([placeholder], {"lr": lr, "weight_decay": weight_decay})
        self.layer = layer
        self.process_group = process_group
        self.last_exchange_bytes = 0
        if process_group is not None:
            _broadcast_layer(layer, process_group)
        layer._attach(self)

    def __getstate__(self) -> dict[str, Any]:
        # (torch.optim.Optimizer keeps only its groups and state; the layer goes along, so that
        # a copied or unpickled optimizer trains the copy of its layer.)
        if self.process_group is not None:
            raise TypeError(
                "cannot copy or pickle a FactoredSGD that has a process group (a process group "
                "cannot be); save its state_dict() and the layer's instead"
            )
        state = super().__getstate__()
        state.update(layer=self.layer, process_group=None, last_exchange_bytes=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.layer._attach(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(
                "FactoredSGD trains one FactoredSphericalLoss and takes no other parameters; "
                "use another optimizer for the rest of the network"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Applies the update recorded by the backward calls since the last :meth:`zero_grad`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layer._attached() is not self:
            raise RuntimeError(
                "this FactoredSGD is no longer attached to its layer (another FactoredSGD was "
                "created for it)"
            )
        group = self.param_groups[0]
        exchange = self._exchange if self.process_group is not None else None
        self.layer._sgd_step(float(group["lr"]), float(group["weight_decay"]), exchange)
        return loss

    def _exchange(
        self, update: _Pending | None, lr: float, weight_decay: float, problem: str | None
    ) -> _Pending | None:
        """Every process's rows of the update, in rank order, with the gradients averaged over
        the processes; ``None`` when no process recorded a backward. Raises on every process
        when one of them has a ``problem`` or their learning rates or weight decays differ
        (each would apply another step), so that none waits for the others forever.
        """
        import torch.distributed as dist

        group = self.process_group
        world = dist.get_world_size(group)
        V = self.layer.V
        d, dtype, device = V.shape[1], V.dtype, V.device
        # First a header per process: its row count (−1: no backward since the last step),
        # lr, weight decay, and whether it has a problem. Then the rows, padded to the largest
        # count: one float tensor per process, targets included where the dtype holds them
        # exactly, else in a second integer tensor.
        count = -1 if update is None else update.H.shape[0]
        header = torch.tensor(
            [count, lr, weight_decay, problem is not None], dtype=torch.float64, device=device
        )
        headers = [torch.empty_like(header) for _ in range(world)]
        dist.all_gather(headers, header, group=group)
        table = torch.stack(headers).tolist()
        failed = [rank for rank, row in enumerate(table) if row[3]]
        if problem is not None:
            raise RuntimeError(problem)
        if failed:
            raise RuntimeError(
                f"FactoredSGD.step() failed on process {failed[0]} of the group (see its error), "
                "so no process applied the update"
            )
        if any(row[1:3] != table[0][1:3] for row in table):
            settings = ", ".join(f"({row[1]!r}, {row[2]!r})" for row in table)
            raise ValueError(
                "FactoredSGD: the processes of the group have different (lr, weight_decay), "
                f"{settings} by rank, so each would apply another step; give every process "
                "the same values (and the same schedule)"
            )
        sizes = [int(row[0]) for row in table]
        top = max(sizes)
        sent = header.numel() * header.element_size()
        if top < 0:
            self.last_exchange_bytes = sent
            return None
        exact_targets = _targets_fit(self.layer.num_classes, dtype)
        width = 3 * d + 4  # H, α β γ, W_c, H Q, s
        rows = torch.zeros(top, width + int(exact_targets), dtype=dtype, device=device)
        targets = None if exact_targets else torch.zeros(top, dtype=torch.long, device=device)
        if update is not None and update.H.shape[0]:
            m = update.H.shape[0]
            rows[:m, :width] = torch.cat(
                [update.H, update.coef / world, update.W_c, update.P, update.s[:, None]], dim=1
            )
            if targets is None:
                rows[:m, -1] = update.target
            else:
                targets[:m] = update.target
        everything = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(everything, rows, group=group)
        sent += rows.numel() * rows.element_size()
        if targets is not None:
            all_targets = [torch.empty_like(targets) for _ in range(world)]
            dist.all_gather(all_targets, targets, group=group)
            sent += targets.numel() * targets.element_size()
        self.last_exchange_bytes = sent
        kept = [part[:n] for part, n in zip(everything, sizes, strict=True) if n >= 0]
        table = torch.cat(kept)
        if targets is None:
            target = table[:, -1].long()
        else:
            target = torch.cat([t[:n] for t, n in zip(all_targets, sizes, strict=True) if n >= 0])
        H, coef, W_c, P, s = table[:, :width].split_with_sizes([d, 3, d, d, 1], dim=1)
        return _Pending(H, coef, target, W_c, P, s[:, 0])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discards the update recorded since the last step (like zeroing dense gradients)."""
        if self.layer._attached() is self:
            self.layer._discard_pending()
