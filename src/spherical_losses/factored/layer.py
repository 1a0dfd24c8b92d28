"""The factored layer: the module, its input checks, its state and the training protocol.

:class:`FactoredSphericalLoss` holds ``V`` and the packed float64 state; its forward computes
``s``, ``q`` and ``o_c`` from the state in ``O(d²)`` per example, and the backward of its
autograd Function (:mod:`.function`) returns ``∂L/∂h`` and records on the layer what the next SGD
step needs (:class:`~.update.Pending`). :class:`~.optim.FactoredSGD` applies it with the
functions of :mod:`.update`. The equations are derived in ``docs/factored-update.md``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .. import _conventions as conventions
from .. import _scoring as scoring
from .. import family
from ..family import Member, SphericalMember
from . import traced
from .condition import ConditionBook
from .function import _FactoredLossFunction, own_precision
from .update import Cast, Pending, Workspace, row_chunks

if TYPE_CHECKING:
    from .optim import FactoredSGD

__all__ = ["FactoredSphericalLoss"]

# The small state, kept in float64 whatever the dtype of V.
_STATE = ("U", "U_inv", "omega", "Q", "w_bar")


class _Session:
    """The layer's mutable bookkeeping, as plain attributes: ``nn.Module.__setattr__`` is slow,
    and every step sets several of them.
    """

    __slots__ = (
        "book",
        "book_fresh",
        "cast_cache",
        "consumed",
        "ones",
        "optimizer_ref",
        "pending",
        "sigma",
        "state_version",
        "trainable",
        "trigger",
        "weight_version",
        "workspace",
        "zeroed",
    )

    def __init__(self) -> None:
        self.pending: list[Pending] = []
        self.consumed = False  # a step applied the pending update; zero_grad() not called since
        # zero_grad(set_to_none=False) and no backward since: the gradient is zero, not none
        self.zeroed = False
        self.trainable = True
        self.optimizer_ref: weakref.ref[FactoredSGD] | None = None
        self.weight_version = 0  # changes when W does: a backward must see its forward's W
        self.state_version = 0  # changes when any state tensor does (the cast copy follows)
        self.sigma = (1.0, 1.0)  # bounds on the largest and smallest singular values of U
        # The sync-free steps' bookkeeping on the device (FactoredSphericalLoss._book), and
        # whether a step changed it since the host last read it (then its bounds are sigma's).
        self.book: Tensor | None = None
        self.book_fresh = False
        self.cast_cache: tuple[tuple[Any, ...], Cast] | None = None
        self.workspace: Workspace | None = None
        self.trigger: Tensor | None = None  # the zero-size leaf of the forward (see there)
        self.ones: Tensor | None = None  # a column of ones, for the bias column of H

    def detached(self) -> _Session:
        """A copy without the training session (optimizer, pending update) and the caches."""
        copy = _Session()
        copy.trainable, copy.sigma = self.trainable, self.sigma
        copy.trigger = self.trigger  # (a copy gets its own: the state is deep-copied or pickled)
        copy.weight_version, copy.state_version = self.weight_version, self.state_version
        return copy


class FactoredSphericalLoss(ConditionBook, nn.Module):
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
        self._make_trigger(self.V.device)
        traced.register(self)
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
        ``zero_grad()`` (which see for ``set_to_none``). A parent module's ``zero_grad()`` does
        not reach it (it zeroes the gradients of parameters, and this layer has none): call
        this or the optimizer's.
        """
        super().zero_grad(set_to_none)
        self._discard_pending(set_to_none)

    # ----------------------------------------------------------------------------------------
    # forward and evaluation

    @own_precision
    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss of ``input`` ``(N, in_features)`` against class indices ``target`` ``(N)``."""
        rows, target_rows, valid, unbatched = self._check(input, target)
        # A zero-sized leaf that requires grad makes autograd call the backward (which records
        # the weight's update) even when the input needs no gradient. (Made outside the forward,
        # which torch.compile cannot create leaves in.)
        trigger = None
        if self._session.trainable and torch.is_grad_enabled():
            trigger = self._session.trigger
            if trigger is None or trigger.device != rows.device:
                trigger = self._make_trigger(rows.device)
        if torch.compiler.is_compiling():
            if valid is None:
                valid = torch.ones_like(target_rows, dtype=torch.bool)
            loss = traced.traced_loss(self, rows, target_rows, valid, trigger)
        else:
            loss = _FactoredLossFunction.apply(rows, target_rows, valid, self, trigger)
        return loss.squeeze(0) if unbatched and self.reduction == "none" else loss

    @own_precision
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

    @own_precision
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

    @own_precision
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
        k = scoring.check_topk(
            k, self.num_classes, by, self.member.has_probabilities, self.member.name
        )
        rows, unbatched = self._check_input(input)
        score = None
        if by == "probability":
            # log p_k = target_log_prob(s, q, o_k, D) for every class k of a chunk.
            H = self._augment(rows)
            HQ = H @ self._cast_state().QW  # [H Q | H ω | H w̄]
            d = H.shape[1]
            s, q = HQ[:, d + 1 :], torch.linalg.vecdot(HQ[:, :d], H).unsqueeze(1)
            member, D = self.member, self.num_classes
            score = lambda chunk: member.target_log_prob(s, q, chunk, D)  # noqa: E731
        values, indices = scoring.topk_of_chunks(
            self._logit_chunks(rows, chunk_size), k, rows.shape[0], score=score, like=rows
        )
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
        for _, rows in row_chunks(V):
            if transform is not None:
                rows.copy_(transform(rows))
            # Within a chunk the Gram matrix is accumulated in V's dtype, across chunks in float64.
            Q += rows.T @ rows
            w_bar += rows.sum(0, dtype=torch.float64)
        Q.add_(Q.T.clone()).mul_(0.5)
        for t in (self.U, self.U_inv):
            t.zero_().diagonal().fill_(1.0)
        self.omega.zero_()
        self._set_sigma(1.0, 1.0)
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
        if not 0 <= self.ignore_index < self.num_classes and conventions.reads_values(target):
            # The usual case (ignore_index = -100), eagerly on the CPU: targets all in range
            # ignore nothing, and the step skips the mask. (Elsewhere the mask is kept, so that
            # nothing waits for the device.)
            low, high = torch.aminmax(target)
            if 0 <= int(low) and int(high) < self.num_classes:
                return rows, target, None, unbatched
        valid = conventions.target_mask(target, self.num_classes, self.ignore_index)
        return rows, target.masked_fill(~valid, 0), valid, unbatched

    def _make_trigger(self, device: torch.device) -> Tensor:
        with torch.inference_mode(False):
            trigger = self._session.trigger = torch.empty(0, device=device, requires_grad=True)
        return trigger

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

    def _cast_state(self) -> Cast:
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
                cast = Cast(
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
        scoring.check_chunk_size(chunk_size)
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
        for start, chunk in row_chunks(self.V):
            rows = torch.addmm(state.omega, chunk, state.U)
            weight[start : start + rows.shape[0]] = rows[:, : self.in_features]
            if bias is not None:
                bias[start : start + rows.shape[0]] = rows[:, -1]
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

    def _record(self, pending: Pending) -> None:
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
        self._session.zeroed = False

    def _discard_pending(self, set_to_none: bool = True) -> None:
        self._session.pending = []
        self._session.consumed = False
        self._session.zeroed = not set_to_none

    def _take_pending(self) -> tuple[Pending | None, str | None]:
        """The update recorded since the last step, its rows in one :class:`Pending` (``None``
        when no backward ran), and the misuse that forbids a step, if any.
        """
        session = self._session
        problem = None
        if not session.pending and session.consumed:
            problem = (
                "FactoredSGD.step() called again without a backward(); dense SGD would apply "
                "the previous gradient again, which has no exact factored form: call "
                "zero_grad() after each step"
            )
        pending = session.pending
        if len(pending) == 1:
            return pending[0], problem
        if pending:  # W did not change between these backward calls: one update of all rows
            return Pending(*(torch.cat(parts) for parts in zip(*pending, strict=True))), problem
        if session.zeroed:  # a zero gradient: an update of no rows, the weight decay alone
            V = self.V
            rows = V.new_zeros(0, V.shape[1])
            none = V.new_zeros(0, dtype=torch.long)
            return Pending(rows, V.new_zeros(0, 3), none, rows, rows, V.new_zeros(0)), None
        return None, problem

    def _stepped(self) -> None:
        """Marks the recorded update as applied: W changed, and a backward now needs zero_grad()
        (unless the gradient was zero: a backward then adds to it, and a step applies it alone).
        """
        session = self._session
        session.pending = []
        session.consumed = not session.zeroed
        session.weight_version += 1
        session.state_version += 1

    def _workspace(self, m: int, d: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        ws = self._session.workspace
        if ws is None or ws.key != (m, d, dtype, device):
            ws = self._session.workspace = Workspace(m, d, dtype, device)
        return ws

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
        self._sigma()
        self._session.book = None  # (made again on the new device by the next sync-free step)
        super()._apply(fn, recurse)
        if any(self._buffers[name] is not before for name, before in old.items()):
            # The views were replaced: pack them again, with the float64 originals' values, on
            # the device that fn chose.
            self._pack_state(old, self._buffers["U"].device)
        self._session.weight_version += 1
        self._session.state_version += 1
        if self._session.trigger is None or self._session.trigger.device != self.V.device:
            self._make_trigger(self.V.device)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"sigma_bounds": self._sigma()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        hi, lo = (float(x) for x in state["sigma_bounds"])
        self._set_sigma(hi, lo)

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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        traced.register(self)  # (a copy is another layer for the traced forward)

    def __getstate__(self) -> dict[str, Any]:
        # The attachment to an optimizer and the pending update belong to a training session.
        self._sigma()
        state = self.__dict__.copy()
        state["_session"] = self._session.detached()
        return state
