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
* The step can run with no host synchronization (``FactoredSGD(sync_free=True)``, the
  default on a GPU): ``M⁻¹`` by an LU factorization in float64 whatever ``ρ`` (a cost fixed by
  the shapes), the update applied where finite by a selection on the device, and the bounds on
  ``U``, the first non-finite step and the first step needing a repair recorded on the device;
  :meth:`FactoredSGD.check` reads them every ``check_every`` steps (one synchronization),
  repairs then, and raises :class:`NonFiniteUpdateError` naming the step. Eagerly on the CPU
  the step keeps its per-step choices (one read of ``ρ`` and finiteness per step).
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

Layout
------
* :mod:`.layer`: :class:`FactoredSphericalLoss`, the module with its checks of inputs and
  targets, its state and the training protocol; :mod:`.function`, its autograd Function;
* :mod:`.update`: the SGD step as plain functions of tensors (the products on the Woodbury or
  the ``d × d`` side, the choice of the way to take ``M⁻¹``, the increments, one commit of the
  new state);
* :mod:`.optim`: :class:`FactoredSGD`, which applies the recorded update, with its exchange
  between the processes of a group;
* :mod:`.graph`: :class:`CapturedStep`, the sync-free step captured in a CUDA graph.
"""

from .graph import CapturedStep
from .layer import FactoredSphericalLoss
from .optim import FactoredSGD
from .update import NonFiniteUpdateError

__all__ = ["CapturedStep", "FactoredSGD", "FactoredSphericalLoss", "NonFiniteUpdateError"]
