"""The factored training step captured in a CUDA graph and replayed.

On a GPU the sync-free step (forward, backward to ``h``, :meth:`FactoredSGD.step`) is some 70
small kernels, each launched from Python: at ``m = 128`` their launches, not their work, set
its time. :class:`CapturedStep` records them once in a :class:`torch.cuda.CUDAGraph` (the
whole-network capture of PyTorch's CUDA graph notes: warm-up steps on a side stream, then one
captured step on static input tensors) and replays them for each minibatch, which is copied
into the static inputs first.

A replay runs the captured kernels on the addresses they had at the capture, so the step
keeps every tensor that outlives it in place (the state, the sync-free record, the work
tensors; ``tests/test_factored_graph.py`` checks it), and its Python branches depend on the
shapes only. The learning rate reaches the step through a work tensor (``Workspace.scale``),
which :class:`CapturedStep` rewrites between replays when ``lr`` changes; ``weight_decay``
enters as numbers of the kernels (``a = 1 − lr·weight_decay``), so with weight decay a change
of either needs a new capture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .layer import FactoredSphericalLoss
from .optim import FactoredSGD

__all__ = ["CapturedStep"]


class CapturedStep:
    """One training step of a :class:`FactoredSphericalLoss` and its :class:`FactoredSGD`,
    captured in a CUDA graph: ``loss = layer(h, target); loss.backward(); optimizer.step()``.

    Calling it copies ``h`` and ``target`` into the static inputs and replays the graph: the
    same update as the eager sync-free step (about one kernel launch instead of some 70).
    The optimizer must be sync-free with ``check_every=0``: call ``optimizer.check()`` every
    so often outside the graph (one synchronization; it repairs ``U`` when the bounds on its
    condition number left their range, and raises :class:`NonFiniteUpdateError` for a step
    whose update was not finite and so not applied).

    Parameters
    ----------
    layer : FactoredSphericalLoss
        On a CUDA device, ``reduction`` ``'mean'`` or ``'sum'``; not frozen.
    optimizer : FactoredSGD
        Attached to ``layer``, ``sync_free=True`` (the default on a GPU), ``check_every=0``,
        no process group.
    example_input, example_target : Tensor
        A minibatch of the shapes to capture (``(m, in_features)`` and ``(m,)``); every later
        call takes these shapes. The warm-up runs ``warmup`` steps on it, which are then
        undone: capturing leaves the layer as it was.
    warmup : int
        Eager steps before the capture (at least 1: they make the work tensors, the record
        on the device and the libraries' handles, which a capture cannot).

    Attributes
    ----------
    grad : Tensor
        ``∂loss/∂h`` of the last call ``(m, in_features)``, for the network below (overwritten
        by the next call: clone it to keep it).

    Notes
    -----
    Between calls, ``optimizer.param_groups[0]['lr']`` may change (a scheduler): the new value
    is written into the step's work tensor before the replay. With ``weight_decay > 0`` a
    change of ``lr`` or ``weight_decay`` raises instead (their product is a constant of the
    captured kernels): capture again. Eager steps (of any batch size), evaluation and
    :meth:`FactoredSGD.check` may run between calls. Moving or casting the layer, or loading
    a state with ``assign=True``, replaces its tensors: a later call raises (capture again).
    The graph keeps its own memory pool (the step's temporaries, ``grad`` and the loss), and
    capturing holds a copy of ``V`` while the warm-up steps run (to undo them).

    Examples
    --------
    >>> layer = FactoredSphericalLoss(128, 500_000, "taylor").cuda()
    >>> opt = FactoredSGD(layer, lr=0.1, sync_free=True, check_every=0)
    >>> h, y = torch.randn(128, 128, device="cuda"), torch.randint(500_000, (128,), device="cuda")
    >>> step = CapturedStep(layer, opt, h, y)
    >>> for i in range(1000):
    ...     h, y = next_batch()  # the network below, run eagerly (or its own graph)
    ...     loss = step(h.detach(), y)  # forward, backward to h and the SGD step, replayed
    ...     h.backward(step.grad)  # the gradient to the network below
    ...     if i % 100 == 99:
    ...         opt.check()  # outside the graph: repairs, non-finite steps
    """

    def __init__(
        self,
        layer: FactoredSphericalLoss,
        optimizer: FactoredSGD,
        example_input: Tensor,
        example_target: Tensor,
        *,
        warmup: int = 3,
    ) -> None:
        _check_setup(layer, optimizer, warmup)
        self.layer, self.optimizer = layer, optimizer
        group = optimizer.param_groups[0]
        self._hyper = (float(group["lr"]), float(group["weight_decay"]))
        _check_target(example_target)
        with torch.no_grad():
            self.input = example_input.detach().clone().requires_grad_()
            self.target = example_target.detach().long().clone()
        saved = _save(layer)
        side = torch.cuda.Stream(layer.V.device)
        side.wait_stream(torch.cuda.current_stream(layer.V.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._step()
        finally:  # (also after an error: the layer as it was, no update pending)
            torch.cuda.current_stream(layer.V.device).wait_stream(side)
            _restore(layer, saved)
            optimizer.zero_grad()
        self.input.grad = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss = self._step()
        except Exception:
            optimizer.zero_grad()  # (the layer trains on eagerly)
            raise
        self.grad: Tensor = self.input.grad  # type: ignore[assignment]
        session = layer._session
        assert session.workspace is not None and session.cast_cache is not None
        # What the graph reads and writes, kept alive (an eager step of another batch size
        # makes its own work tensors) and compared with the layer's at each call.
        self._kept = (session.workspace, session.cast_cache[1], session.book, session.ones)
        self._owned = (layer.V, layer._state, session.cast_cache[1].packed, session.book)
        self._workspace = session.workspace

    def _step(self) -> Tensor:
        self.optimizer.zero_grad()
        loss = self.layer(self.input, self.target)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:
        """Copies ``input`` and ``target`` into the static inputs and replays the step;
        returns the loss (a static tensor, overwritten by the next call).
        """
        self._check_call(input, target)
        layer, session = self.layer, self.layer._session
        with torch.no_grad():
            self.input.copy_(input)
            self.target.copy_(target)
        # The learning rate is read from this work tensor, outside the captured kernels (an
        # inference tensor, as the step makes its work tensors).
        with torch.inference_mode():
            self._workspace.set_lr(self._hyper[0])
        self.graph.replay()
        layer._stepped()  # W changed: the next eager forward refreshes its copy of the state
        session.book_fresh = True  # FactoredSGD.check() reads the record
        return self.loss

    def _check_call(self, input: Tensor, target: Tensor) -> None:
        self._check_layer()
        for name, value, static in (("input", input, self.input), ("target", target, self.target)):
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.shape != static.shape:
                raise ValueError(
                    f"this step was captured for {name} of shape {tuple(static.shape)}, got "
                    f"{tuple(value.shape)}; capture another CapturedStep for that shape"
                )
            if value.device != static.device:
                raise ValueError(f"{name} is on {value.device}, the step on {static.device}")
        if input.dtype != self.input.dtype:
            raise ValueError(
                f"input dtype {input.dtype} does not match the layer's {self.input.dtype}"
            )
        _check_target(target)
        group = self.optimizer.param_groups[0]
        lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
        if (lr, weight_decay) != self._hyper:
            if weight_decay != 0.0 or self._hyper[1] != 0.0:
                raise ValueError(
                    f"(lr, weight_decay) changed from {self._hyper} to {(lr, weight_decay)} "
                    "since the capture; with weight decay their product is a constant of the "
                    "captured kernels: capture again (a CapturedStep for the new values)"
                )
            self._hyper = (lr, weight_decay)

    def _check_layer(self) -> None:
        """That the layer still trains with the captured optimizer, on the captured tensors."""
        layer = self.layer
        if layer._attached() is not self.optimizer:
            raise RuntimeError("the captured FactoredSGD is no longer attached to the layer")
        session = layer._session
        if session.pending:
            raise RuntimeError(
                "a backward of the layer is pending (its update not applied): call the "
                "FactoredSGD's step() or zero_grad() before a captured step"
            )
        now = (layer.V, layer._state, session.cast_cache and session.cast_cache[1].packed)
        if any(a is not b for a, b in zip((*now, session.book), self._owned, strict=True)):
            raise RuntimeError(
                "the layer's tensors were replaced since the capture (a move, a cast or a "
                "load_state_dict(assign=True)); capture again"
            )


def _check_target(target: Tensor) -> None:
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must hold class indices (an integer tensor), got {target.dtype}")


def _check_setup(layer: Any, optimizer: Any, warmup: Any) -> None:
    if not (isinstance(optimizer, FactoredSGD) and optimizer.layer is layer):
        raise ValueError(
            "CapturedStep needs a FactoredSphericalLoss and the FactoredSGD attached to the "
            f"layer, got {type(layer).__name__} and {type(optimizer).__name__}"
        )
    if layer._attached() is not optimizer:
        raise ValueError("CapturedStep needs the FactoredSGD attached to the layer (the last made)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
    if not optimizer.is_sync_free():
        raise ValueError(
            f"CapturedStep needs a FactoredSGD with sync_free=True, got sync_free="
            f"{optimizer.sync_free!r} on {layer.V.device.type} (the eager step reads values on "
            "the host, which a CUDA graph cannot replay)"
        )
    if optimizer.check_every != 0:
        raise ValueError(
            f"CapturedStep needs a FactoredSGD with check_every=0, got check_every="
            f"{optimizer.check_every} (its check() synchronizes); call optimizer.check() "
            "between calls instead"
        )
    if optimizer.process_group is not None:
        raise ValueError(
            "CapturedStep cannot capture a FactoredSGD with a process group (its exchange "
            "reads a header on the host)"
        )
    if layer.reduction not in ("mean", "sum"):
        raise ValueError(
            f"CapturedStep needs a scalar loss, reduction='mean' or 'sum', got "
            f"reduction={layer.reduction!r}"
        )
    if not layer._session.trainable:
        raise ValueError("the layer is frozen (requires_grad_(False)): there is no step to capture")
    if layer._session.pending:
        raise ValueError("a backward of the layer is pending: call step() or zero_grad() first")
    _check_device(layer)


def _check_device(layer: FactoredSphericalLoss) -> None:
    device = layer.V.device
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"CapturedStep needs the layer on a CUDA device, got {device}")


def _save(layer: FactoredSphericalLoss) -> tuple[Any, ...]:
    """A copy of what a step changes (``V``, the packed state, the record and its host side),
    taken before the warm-up steps, which :func:`_restore` then undoes.
    """
    session = layer._session
    book = layer._book()  # (made now, outside the warm-up: the graph writes into it)
    sigma = layer._sigma()
    return layer.V.clone(), layer._state.clone(), book.clone(), sigma, session.book_fresh


def _restore(layer: FactoredSphericalLoss, saved: tuple[Any, ...]) -> None:
    V, state, book, sigma, fresh = saved
    session = layer._session
    with torch.no_grad():
        layer.V.copy_(V)
        layer._state.copy_(state)
        session.book.copy_(book)  # type: ignore[union-attr]
    session.sigma, session.book_fresh = sigma, fresh
    session.weight_version += 1
    session.state_version += 1
