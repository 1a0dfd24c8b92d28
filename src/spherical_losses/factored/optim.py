"""The optimizer of the factored layer, and its exchange between processes.

:class:`FactoredSGD` takes the update that the layer's backward calls recorded, gathers every
process's rows under a process group (:meth:`FactoredSGD._exchange`), and applies it with the
functions of :mod:`.update` through :func:`apply_update`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import update
from .function import autocast_off
from .layer import FactoredSphericalLoss
from .update import NonFiniteUpdateError, Pending

__all__ = ["FactoredSGD", "apply_update"]


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
        sigma = torch.tensor(layer._sigma(), dtype=torch.float64, device=layer.V.device)
        dist.broadcast(sigma, source, group=group)
    hi, lo = sigma.tolist()
    layer._set_sigma(hi, lo)
    layer._session.weight_version += 1
    layer._session.state_version += 1


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
    side : {'auto', 'woodbury', 'square'}
        Which side the step's products take: through the ``m × m`` matrix of the minibatch
        (Woodbury) or the ``d × d`` one. ``'auto'`` (default): the cheaper for ``(m, d)``. Every
        side gives the same update up to rounding; a fixed one is for tests and comparisons.
    inverse : {'auto', 'series', 'direct', 'eigen', 'dense'}
        How the step takes ``M⁻¹`` (see :func:`.update.choose_inverse`). ``'auto'`` (default):
        chosen per step from the bound ``ρ = ‖J‖_F`` (sync-free: ``'direct'``). A fixed way
        must suit the step: ``'series'`` and ``'direct'`` raise a ValueError when ``ρ > a/2``
        (not sync-free ``'direct'``, which suits every nonsingular ``M``); ``'eigen'`` works on
        the ``d × d`` side whatever ``side`` says; ``'dense'`` applies each step to ``V`` in
        ``O(D d²)``. ``'series'`` and ``'eigen'`` are not sync-free.
    sync_free : bool, optional
        Whether :meth:`step` runs without host synchronization (see Notes). ``None``
        (default): on a GPU (any device but the CPU), unless ``inverse`` is ``'series'`` or
        ``'eigen'``; eagerly on the CPU the step keeps its per-step choices, which are faster
        there. ``True`` on the CPU runs the same code as on a GPU (for tests).
    check_every : int
        Sync-free: :meth:`check` runs after every ``check_every`` steps (default 100), one
        synchronization each; 0: only when called (e.g. between compiled steps).

    Attributes
    ----------
    last_exchange_bytes : int
        Bytes this process sent in the last :meth:`step`'s exchange (0 without a group).
    last_update : str
        How the last :meth:`step` took ``M⁻¹`` (``'series'``, ``'direct'``, ``'eigen'``,
        ``'dense'``), ``'decay'`` for an empty minibatch, ``''`` before the first step.

    Notes
    -----
    The eager step reads two numbers from the device (the bound ``ρ`` on ``‖J‖₂``, which
    chooses how to invert ``M``, and whether the gradient is finite), and on rare steps more
    (the eigenvalues of ``J`` when ``ρ > a/2``, the singular values of ``U`` when its bounds
    leave their range, the status of a Cholesky factorization or solve). The sync-free step
    reads none: it inverts ``M`` (or the ``m × m`` matrix of the Woodbury side) by an LU
    factorization in float64 whose status stays on the device (a cost fixed by the shapes),
    applies its update only where it is finite (a selection on the device, so a non-finite
    gradient leaves the weight as it was), and records on the device the bounds on ``U``'s
    singular values, the first step whose update was not finite and the first that left the
    bounds out of range. :meth:`check` reads that record (one synchronization): it repairs
    ``U`` or recomputes ``U⁻¹`` when a step left the range (an eager step does it at once,
    so in between ``U``'s condition number may exceed ``max_condition``: ``V``'s rounding
    errors reach ``W`` amplified by it, which a step at the stability limit of the loss,
    with ``M`` nearly singular, makes large; the eager step applies such a step to ``V``
    directly), and raises :class:`NonFiniteUpdateError` naming the step whose update was not
    applied. What still synchronizes on a GPU: creating the step's work tensors (once per
    minibatch shape) and the device record (once), :meth:`check`, and under a process group
    the exchange (its header is read on the host).

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
        side: str = "auto",
        inverse: str = "auto",
        sync_free: bool | None = None,
        check_every: int = 100,
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
        for name, value, allowed in (
            ("side", side, update.SIDES),
            ("inverse", inverse, update.INVERSES),
        ):
            if value != "auto" and value not in allowed:
                choices = ", ".join(repr(x) for x in ("auto", *allowed))
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if sync_free and inverse in ("series", "eigen"):
            raise ValueError(
                f"inverse={inverse!r} chooses per step on the host, so it cannot be sync-free; "
                "use 'auto', 'direct' or 'dense' with sync_free=True"
            )
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ValueError(f"check_every must be an integer >= 0, got {check_every!r}")
        # torch.optim.Optimizer wants tensors in its parameter group: a zero-size placeholder.
        # The step reaches the layer's state through self.layer (which .to() may have moved).
        placeholder = torch.empty(0, device=layer.V.device, dtype=layer.V.dtype)
        super().__init__([placeholder], {"lr": lr, "weight_decay": weight_decay})
        self.layer = layer
        self.process_group = process_group
        self.last_exchange_bytes = 0
        self.side, self.inverse = side, inverse
        self.sync_free, self.check_every = sync_free, check_every
        self.steps_unchecked = 0  # sync-free steps since the last check()
        self.last_update = ""
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
        state.update(
            layer=self.layer,
            process_group=None,
            last_exchange_bytes=0,
            side=self.side,
            inverse=self.inverse,
            sync_free=self.sync_free,
            check_every=self.check_every,
            steps_unchecked=self.steps_unchecked,
            last_update=self.last_update,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (A copy pickled before the sync-free step existed: the eager choices, as then.)
        state = {"sync_free": None, "check_every": 100, "steps_unchecked": 0, **state}
        super().__setstate__(state)
        self.layer._attach(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError(
                "FactoredSGD trains one FactoredSphericalLoss and takes no other parameters; "
                "use another optimizer for the rest of the network"
            )
        super().add_param_group(param_group)

    def is_sync_free(self) -> bool:
        """Whether :meth:`step` runs without host synchronization (``sync_free``, resolved for
        the layer's device).
        """
        if self.sync_free is not None:
            return self.sync_free
        return self.layer.V.device.type != "cpu" and self.inverse not in ("series", "eigen")

    def check(self) -> None:
        """The deferred checks of the sync-free steps (one synchronization; nothing to do
        after eager steps): repairs ``U`` or recomputes ``U⁻¹`` if a step since the last check
        left the bounds on its singular values out of range, then raises
        :class:`NonFiniteUpdateError` if a step's update was not finite (that step was not
        applied, the later ones were; the error says which). Called by :meth:`step` every
        ``check_every`` sync-free steps; call it outside a compiled region.
        """
        self.steps_unchecked = 0
        with torch.no_grad():
            self.layer._settle()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Applies the update recorded by the backward calls since the last :meth:`zero_grad`
        (sync-free: then every ``check_every`` steps :meth:`check`).
        """
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
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        pending, problem = self.layer._take_pending()
        if self.process_group is not None:
            # Every process gets every process's rows (or raises with all of them).
            pending = self._exchange(pending, lr, weight_decay, problem)
        elif problem is not None:
            raise RuntimeError(problem)
        if pending is None:
            return loss  # no gradient: dense SGD skips the parameter, weight decay included
        side = None if self.side == "auto" else self.side
        inverse = None if self.inverse == "auto" else self.inverse
        sync_free = self.is_sync_free()
        # (No autograd bookkeeping: a little less per operation. No autocast: the update runs in
        # the layer's precision, whatever the context of the step.)
        with torch.inference_mode(), autocast_off(self.layer.V.device):
            self.last_update = apply_update(
                self.layer, pending, lr, weight_decay, side, inverse, sync_free=sync_free
            )
        self.layer._stepped()
        if sync_free and self.check_every:
            self.steps_unchecked += 1
            if self.steps_unchecked >= self.check_every:
                self.check()
        return loss

    def _exchange(
        self, update: Pending | None, lr: float, weight_decay: float, problem: str | None
    ) -> Pending | None:
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
        return Pending(H, coef, target, W_c, P, s[:, 0])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Discards the update recorded since the last step (like zeroing dense gradients).

        Parameters
        ----------
        set_to_none : bool
            ``True`` (default): the layer's gradient becomes none, so a :meth:`step` with no
            ``backward()`` since changes nothing, weight decay included, as
            :class:`torch.optim.SGD` skips a parameter whose ``grad`` is ``None``. ``False``:
            it becomes zero, so such a step applies the weight decay alone, as
            :class:`torch.optim.SGD` does to zero gradients (at every such step).
        """
        if self.layer._attached() is self:
            self.layer._discard_pending(set_to_none)


def apply_update(
    layer: FactoredSphericalLoss, upd: Pending, lr: float, weight_decay: float,
    side: str | None = None, inverse: str | None = None, *, sync_free: bool = False,
) -> str:  # fmt: skip
    """``W ← (1 − ηλ) W − η Σ_i (α_i 1 + 2β_i W h_i + γ_i e_{c_i}) h_iᵀ`` on ``layer``, in
    factored form (:mod:`.update`); returns how ``M⁻¹`` was taken (``'decay'`` for an empty
    minibatch). ``side`` and ``inverse`` (``None``: chosen per step) fix the variant;
    ``sync_free`` chooses by the shapes only (:func:`_apply_sync_free`).
    """
    m, d = upd.H.shape
    a = 1.0 - lr * weight_decay
    if m == 0:  # an empty minibatch: weight decay only, W' = a W
        if a == 0.0:
            layer.V.zero_()
            layer._reset_factorization()
        elif a != 1.0:
            update.decay(layer._state, a)
            layer._scale_sigma(abs(a))
        return "decay"
    ws = layer._workspace(m, d, upd.H.dtype, upd.H.device)
    ws.set_lr(lr)
    side = update.choose_side(m, d) if side is None else side
    products = update.woodbury_products if side == "woodbury" else update.square_products
    p = products(ws, upd, sync_free)
    if sync_free:
        return _apply_sync_free(layer, ws, upd, p, a, side, inverse)
    # One synchronization: the bound ρ = ‖J‖_F, and whether the coefficients are finite.
    rho_sq, total = torch.stack([p.rho_sq, p.ur.sum()]).tolist()
    rho = math.sqrt(max(rho_sq, 0.0))
    if not (math.isfinite(total) and math.isfinite(rho)):
        raise NonFiniteUpdateError(
            "FactoredSGD: the recorded gradient is not finite (the loss or the input "
            "overflowed); the update was not applied"
        )
    inv = update.choose_inverse(rho, a, upd.H.dtype, upd.H, p.b, layer.max_condition, inverse)
    if inv.kind == "dense":  # M (nearly) singular, so U' would be: apply the step to V itself
        assert inv.J64 is not None
        update.dense_update(layer.V, layer.U, layer.omega, upd.target, a, inv.J64, p.R, p.u)
        layer._reset_factorization()
        return "dense"
    if inv.kind == "eigen":  # M's spectrum is known on the d × d side only
        assert inv.J64 is not None
        J = inv.J64.to(upd.H.dtype)
        p = update.to_square(ws, upd, p, J) if side == "woodbury" else p._replace(J=J)
        side = "square"
    layer._bound_condition(inv.sm_hi, inv.sm_lo)
    increments = update.woodbury_increments if side == "woodbury" else update.square_increments
    dV = increments(ws, upd, p, inv, layer._cast_state(), a, layer.num_classes)
    update.commit(layer.V, layer._state, ws, upd.target, dV, a)
    return inv.kind


def _apply_sync_free(
    layer: FactoredSphericalLoss, ws: update.Workspace, upd: Pending, p: update.Products,
    a: float, side: str, inverse: str | None,
) -> str:  # fmt: skip
    """The rest of :func:`apply_update` with no host synchronization: ``'direct'`` by
    :func:`.update.sync_free_inverse` on ``side``, or ``'dense'`` when pinned or when ``a = 0``
    (``M = −J``, singular when ``m < d``); the update applied where finite, and recorded in
    the layer's book (:meth:`FactoredSphericalLoss._book_step`) for :meth:`FactoredSGD.check`.
    """
    if inverse == "dense" or a == 0.0:
        ok = torch.isfinite(p.rho_sq + p.ur.sum())
        J64 = update.gram64(upd.H, p.b)
        update.dense_update(layer.V, layer.U, layer.omega, upd.target, a, J64, p.R, p.u, ok)
        layer._reset_factorization()
        one = torch.ones((), dtype=torch.float64, device=ok.device)
        layer._book_step(ok, one, one)
        return "dense"
    inv = update.sync_free_inverse(p, a, side)
    assert isinstance(inv.sm_hi, torch.Tensor) and isinstance(inv.sm_lo, torch.Tensor)
    increments = update.woodbury_increments if side == "woodbury" else update.square_increments
    dV = increments(ws, upd, p, inv, layer._cast_state(), a, layer.num_classes)
    # Whether the update is finite: the inputs' coefficients, and what M⁻¹ made of them.
    ok = torch.isfinite(p.rho_sq + p.ur.sum() + dV.sum() + ws.inc_main.sum())
    update.commit(layer.V, layer._state, ws, upd.target, dV, a, ok)
    layer._book_step(ok, inv.sm_hi, inv.sm_lo)
    return "direct"
