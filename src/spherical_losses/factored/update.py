"""The SGD step of the factored weight, as plain functions of tensors.

With ``a = 1 − ηλ``, ``b = 2ηβ``, ``J = Hᵀ diag(b) H``, ``M = a I − J``, ``u = −η Hᵀα`` and
``R = −η diag(γ) H``, one step of dense SGD is ``W' = W M + 1 uᵀ + Eᵀ R`` (``E`` the one-hot
rows of the targets), so that ``U' = U M``, ``ω' = M ω + u``, ``U'⁻¹ = M⁻¹ U⁻¹``,
``V[c] += R U'⁻¹`` and ``Q' = a² Q + Y + Yᵀ`` with
``Y = J (Q J/2 − W_cᵀ R − a Q) + a W_cᵀ R + Rᵀ S R/2 + g uᵀ``, ``g = M w̄ + Rᵀ1 + D u/2``
(``docs/factored-update.md`` derives them, §3–§4). A step runs in three phases:

1. :func:`woodbury_products` or :func:`square_products`: the products with the minibatch,
   on the ``m × m`` side (Woodbury, when ``m`` is small next to ``d``) or the ``d × d`` side,
   with ``ρ² = ‖J‖_F²``, which bounds the spectrum of ``J``;
2. :func:`choose_inverse`: how ``M⁻¹`` is taken, from ``ρ``: a series, a direct solve, the
   eigendecomposition of ``J``, or, when ``M`` is nearly singular, no factored step at all
   (:func:`dense_update` applies the step to ``V`` in ``O(D d²)``);
3. :func:`woodbury_increments` or :func:`square_increments`: the increments of the state
   ``[Uᵀ | Q | ω | w̄ | U⁻¹]``, in V's dtype, and the rows added to ``V``; :func:`commit` adds
   them to the float64 state in one operation.

Phase 2 reads ``ρ`` on the host. The sync-free step (``FactoredSGD(sync_free=True)``) replaces
it by :func:`sync_free_inverse`, chosen by the shapes only, and :func:`commit` then applies the
update only where it is finite, by a selection on the device (``docs/factored-update.md`` §6).

Each function reads its inputs and writes only into the :class:`Workspace` (its work tensors,
made once per shape), except :func:`commit`, :func:`decay` and :func:`dense_update`, which
change the state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "INVERSES",
    "SIDES",
    "Inverse",
    "NonFiniteUpdateError",
    "Pending",
    "Workspace",
    "by_groups",
    "choose_inverse",
    "choose_side",
    "commit",
    "decay",
    "dense_update",
    "gram64",
    "row_chunks",
    "square_increments",
    "square_products",
    "sync_free_inverse",
    "woodbury_increments",
    "woodbury_products",
]

# The ways of taking M⁻¹, and the sides of the products (see choose_inverse, choose_side).
INVERSES = ("series", "direct", "eigen", "dense")
SIDES = ("woodbury", "square")
# Rows of V per chunk in the O(D d²) passes: bounds their temporaries to about 4 MiB.
CHUNK_ELEMENTS = 2**20
# Most powers of J/a summed for M⁻¹ before an exact solve is cheaper.
MAX_SERIES_TERMS = 8
# Unit roundoff: the series for M⁻¹ stops when the rest is below it (relative to the step).
_EPS = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float32, torch.float64)}


class NonFiniteUpdateError(RuntimeError):
    """Raised by :meth:`FactoredSGD.step` when the recorded gradient is not finite.

    Dense SGD would write the NaN or infinity into the weight; the factored layer refuses the
    update and keeps its weight. Under a process group every process raises at the same step
    (the check follows the exchange), so a training loop can catch it and stop on all of them.
    """


class Pending(NamedTuple):
    """The part of the next SGD update recorded by one backward (one row per example)."""

    H: Tensor  # (m, d) inputs, with a constant 1 appended when the layer has a bias
    coef: Tensor  # (m, 3) columns α, β, γ times the upstream gradient (0 where ignored)
    target: Tensor  # (m,) target classes (0 where ignored)
    W_c: Tensor  # (m, d) target rows of W
    P: Tensor  # (m, d) rows of H Q
    s: Tensor  # (m,) H w̄


class Cast(NamedTuple):
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


class Products(NamedTuple):
    """The products of a step with the minibatch (phase 1); the fields of the other side are
    ``None``.
    """

    R: Tensor  # (m, d) −η diag(γ) H
    g_col: Tensor  # (m, 1) −ηγ
    b: Tensor  # (m, 1) 2ηβ
    u: Tensor  # (d,) −η Hᵀα
    ur: Tensor  # (3, d) rows u, Hᵀb, r = Rᵀ1
    rho_sq: Tensor  # () ‖J‖_F²
    hb: Tensor | None = None  # Woodbury: diag(b) H
    GB: Tensor | None = None  # H Hᵀ diag(b) (m × m)
    C: Tensor | None = None  # H Q Hᵀ
    N: Tensor | None = None  # H W_cᵀ
    SR: Tensor | None = None  # S R
    J: Tensor | None = None  # square: J (d × d)
    SRR: Tensor | None = None  # Rᵀ S R
    WR: Tensor | None = None  # W_cᵀ R


class Inverse(NamedTuple):
    """How a step takes ``M⁻¹`` (phase 2), and the bounds it gives on ``M``'s singular values."""

    kind: str  # one of INVERSES
    terms: int  # powers of J/a summed ('series')
    # Bounds on the largest and smallest singular values of M: 0-dim tensors when sync-free.
    sm_hi: float | Tensor
    sm_lo: float | Tensor
    eig: torch.return_types.linalg_eigh | None = None  # of J in float64 ('eigen')
    J64: Tensor | None = None  # J in float64 ('eigen', 'dense')
    # Sync-free 'direct': M⁻¹ (d × d side) or (a I − G B)⁻¹ (m × m side), float64.
    inverse: Tensor | None = None


class Workspace:
    """The work tensors of a step and their views, made once per shape: a step then allocates
    and slices little, which matters at the sizes where it takes a millisecond.
    """

    def __init__(self, m: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.key = (m, d, dtype, device)
        self.lr: float | None = None
        self.scale = torch.empty(3, dtype=dtype, device=device)
        # (−1, 2, −1), which set_lr multiplies by η: a kernel with a scalar argument, where
        # copying a new host tensor to a GPU would wait for it.
        self.signs = torch.tensor([-1.0, 2.0, -1.0], dtype=dtype, device=device)
        self.a: float | None = None
        self.column_scale = torch.empty(3 * d + 2, dtype=torch.float64, device=device)
        # The increments of [Uᵀ | Q | ω | w̄ | U⁻¹], then room for one more d × d block: the
        # d × d side's products write into it directly.
        self.inc = torch.empty(d, 4 * d + 2, dtype=dtype, device=device)
        self.inc_main = self.inc[:, : 3 * d + 2]
        Ut, Q, omega, w_bar, U_inv, self.inner = self.inc.split_with_sizes([d, d, 1, 1, d, d], 1)
        self.inc_blocks = (Ut, Q, omega[:, 0], w_bar[:, 0], U_inv)
        self.inc_Q_T = Q.T
        self.last = self.inc[:, 2 * d + 2 :]  # [U⁻¹ block | inner], which J multiplies
        self.inc_vectors = self.inc[:, 2 * d : 2 * d + 2]  # [ω | w̄] blocks
        self.square_ready = False
        self._vector_coefficients: tuple[int, Tensor] | None = None

    def set_lr(self, lr: float) -> None:
        """The factors ``(−η, 2η, −η)`` of the columns α, β, γ."""
        if self.lr != lr:
            self.lr = lr
            torch.mul(self.signs, lr, out=self.scale)

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
        ``J w̄ − D u − Rᵀ1`` and ``a M⁻¹ U⁻¹ − U⁻¹`` (``docs/factored-update.md`` §5).
        """
        if self.a != a:
            self.a = a
            d = self.key[1]
            Ut, Q, vectors, U_inv = self.column_scale.split_with_sizes([d, d, 2, d])
            Ut.fill_(-1.0 / a)
            Q.fill_(1.0 / (a * a))
            vectors.fill_(-1.0 / a)
            U_inv.fill_(1.0)

    def prepare_square(self) -> None:
        """The tensors of the d × d side: L = [diag(b) H | diag(γ') S R | diag(γ') W_c | coef],
        and Lᵀ H = [J; Rᵀ S R; W_cᵀ R; rows u, ·, r].
        """
        if self.square_ready:
            return
        m, d, dtype, device = self.key
        self.L = torch.empty(m, 3 * d + 3, dtype=dtype, device=device)
        self.L_T = self.L.T
        self.L_blocks = self.L.split_with_sizes([d, d, d, 3], 1)
        cs = self.L_blocks[3]  # columns −ηα, b = 2ηβ, −ηγ
        self.b, self.g_col = cs[:, 1:2], cs[:, 2:]
        self.out = torch.empty(3 * d + 3, d, dtype=dtype, device=device)
        self.J, self.SRR, self.WR, self.ur = self.out.split_with_sizes([d, d, d, 3])
        self.J_flat = self.J.view(-1)
        # J [a M⁻¹ U⁻¹ − U⁻¹ so far | inner], and Y (whose transpose ΔQ adds).
        self.prod = torch.empty(d, 2 * d, dtype=dtype, device=device)
        self.prod_last, self.J_inner = self.prod.split_with_sizes([d, d], 1)
        self.Y = torch.empty(d, d, dtype=dtype, device=device)
        self.Y_T = self.Y.T
        self.square_ready = True


def row_chunks(V: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(start, V[start : start + step])`` over ``V``'s rows, about 4 MiB of work per chunk:
    the one loop of the ``O(D d²)`` passes (materializing, repairing, a dense step).
    """
    step = max(1, CHUNK_ELEMENTS // max(1, V.shape[1]))
    for start in range(0, V.shape[0], step):
        yield start, V[start : start + step]


def by_groups(R: Tensor, sync_free: bool) -> bool:
    """Whether :func:`same_target_sum` takes the groups of the targets (eagerly on the CPU:
    less time than the product) rather than the ``m × m`` product, which unlike the groups
    (:func:`torch.unique`, whose size depends on the values) needs no synchronization.
    """
    return R.device.type == "cpu" and not sync_free


def same_target_sum(R: Tensor, target: Tensor, sync_free: bool = False) -> Tensor:
    """``S R`` with ``S_ij = [c_i = c_j]``: each row becomes the sum of its class's rows
    (by the groups of the targets or as the product ``S R``: :func:`by_groups`).
    """
    if not by_groups(R, sync_free):
        return torch.eq(target.unsqueeze(1), target).to(R.dtype) @ R
    groups, inverse = torch.unique(target, return_inverse=True)
    if groups.shape[0] == R.shape[0]:
        return R
    sums = R.new_zeros(groups.shape[0], R.shape[1]).index_add_(0, inverse, R)
    return sums.index_select(0, inverse)


def choose_side(m: int, d: int) -> str:
    """``'woodbury'`` (``M⁻¹`` through the ``m × m`` matrix ``a I − H Hᵀ diag(b)``) when that
    costs fewer multiply-adds over the whole step than the ``d × d`` side (``'square'``): for
    ``d`` beyond about ``1.45 m`` (``docs/factored-update.md`` §6).
    """
    return "woodbury" if 4 * m * d * d + 14 * m * m * d + m**3 < 10 * d**3 else "square"


def woodbury_products(ws: Workspace, upd: Pending, sync_free: bool = False) -> Products:
    """Phase 1 on the ``m × m`` side: ``H Hᵀ``, ``H Q Hᵀ`` and ``H W_cᵀ`` in one product."""
    H, m = upd.H, upd.H.shape[0]
    cs = torch.mul(upd.coef, ws.scale)  # columns −ηα, b = 2ηβ, −ηγ
    b, g_col = cs[:, 1:2], cs[:, 2:]
    R = H * g_col
    hb = H * b
    G, C, N = (H @ torch.cat([H, upd.P, upd.W_c]).T).split_with_sizes([m, m, m], 1)
    GB = G * b.T  # H Hᵀ diag(b), which has the nonzero eigenvalues of J
    ur = (H.T @ cs).T
    return Products(
        R, g_col, b, ur[0], ur, (GB * GB.T).sum(), hb, GB, C, N,
        same_target_sum(R, upd.target, sync_free),
    )  # fmt: skip


def square_products(ws: Workspace, upd: Pending, sync_free: bool = False) -> Products:
    """Phase 1 on the ``d × d`` side: one product gives ``J``, ``Rᵀ S R``, ``W_cᵀ R``, ``u``
    and ``r = Rᵀ1``.
    """
    H, c = upd.H, upd.target
    ws.prepare_square()
    torch.mul(upd.coef, ws.scale, out=ws.L_blocks[3])
    L_hb, L_SR, L_W, _ = ws.L_blocks
    b, g_col = ws.b, ws.g_col
    R = H * g_col
    torch.mul(H, b, out=L_hb)
    if by_groups(R, sync_free):
        # diag(−ηγ) S R from R's rows summed over the targets' groups.
        torch.mul(same_target_sum(R, c), g_col, out=L_SR)
    else:
        # diag(−ηγ) S R as (diag(−ηγ) S) R: one m × m product.
        torch.mm(torch.mul(torch.eq(c.unsqueeze(1), c), g_col), R, out=L_SR)
    torch.mul(upd.W_c, g_col, out=L_W)
    torch.mm(ws.L_T, H, out=ws.out)
    rho_sq = torch.dot(ws.J_flat, ws.J_flat)
    return Products(R, g_col, b, ws.ur[0], ws.ur, rho_sq, J=ws.J, SRR=ws.SRR, WR=ws.WR)


def to_square(ws: Workspace, upd: Pending, p: Products, J: Tensor) -> Products:
    """The Woodbury side's products completed to the ``d × d`` side's, with ``J`` given."""
    ws.prepare_square()
    assert p.SR is not None
    SR = p.SR
    SRR, WR = (torch.cat([SR * p.g_col, upd.W_c * p.g_col], dim=1).T @ upd.H).split_with_sizes(
        [upd.H.shape[1]] * 2
    )
    return p._replace(J=J, SRR=SRR, WR=WR)


def choose_inverse(
    rho: float, a: float, dtype: torch.dtype, H: Tensor, b: Tensor, max_condition: float,
    kind: str | None = None,
) -> Inverse:  # fmt: skip
    """How to take ``M⁻¹ = (a I − J)⁻¹``, with ``ρ = ‖J‖_F ≥ ‖J‖₂`` (``kind=None``: the cheapest
    exact way; else that way, which must suit ``M``).

    For ``ρ ≤ a/2``, ``a M⁻¹ = Σ_k (J/a)^k`` converges fast: ``'series'`` when the dtype's
    precision takes at most ``MAX_SERIES_TERMS`` powers, else ``'direct'`` (a Cholesky
    factorization of ``M`` or a solve with the ``m × m`` matrix). Beyond, ``'eigen'``: the
    eigendecomposition of ``J`` in float64, unless ``M`` is nearly singular (condition number
    beyond ``max_condition / 4``), where a factored step would lose the precision of ``V``:
    then ``'dense'``, the step applied to ``V`` itself (``docs/factored-update.md`` §6).
    """
    r = rho / a if a > 0 else math.inf
    if kind in (None, "series", "direct") and r <= 0.5:
        terms = 1
        if r > 0:
            terms = max(1, math.ceil(math.log(_EPS[dtype] * (1 - r)) / math.log(r)))
        if kind is None:
            kind = "series" if terms <= MAX_SERIES_TERMS else "direct"
        return Inverse(kind, terms, a + rho, a - rho)
    if kind in ("series", "direct"):
        raise ValueError(
            f"cannot take M⁻¹ by {kind!r} for this step: ‖J‖_F / a = {r:.3g}, expected at most "
            "0.5 (use 'eigen' or 'dense')"
        )
    J64 = gram64(H, b)
    eig = torch.linalg.eigh(J64)
    singular = (a - eig.eigenvalues).abs()
    sm_hi, sm_lo = singular.max().item(), singular.min().item()
    if kind is None:
        kind = "eigen" if sm_lo * max_condition > 4.0 * sm_hi else "dense"
    return Inverse(kind, 0, sm_hi, sm_lo, eig, J64)


def gram64(H: Tensor, b: Tensor) -> Tensor:
    """``J = Hᵀ diag(b) H`` in float64, symmetric to the last bit."""
    J64 = H.T.double() @ (H * b).double()
    return (J64 + J64.T) / 2


def sync_free_inverse(p: Products, a: float, side: str) -> Inverse:
    """``'direct'`` with no host synchronization: the inverse of ``M`` (``side='square'``) or
    of the ``m × m`` matrix ``a I − G B`` (``'woodbury'``) by an LU factorization in float64
    (:func:`torch.linalg.inv_ex`, whose status stays on the device), whatever ``ρ``: a cost
    fixed by the shapes. ``M`` is then nonsingular or the increments are not finite, which the
    step's finiteness test catches.

    The bounds on ``M``'s singular values are 0-dim tensors: ``a + ρ`` above (``‖J‖₂ ≤ ρ``),
    and below the larger of ``a − ρ`` and ``1 / ‖M⁻¹‖_F`` (square side; ``σ_min(M) =
    1/‖M⁻¹‖₂``) or of ``a − ρ`` and ``min(a, 1 / ‖(a I − G B)⁻¹‖_F)`` (Woodbury side: ``M``'s
    eigenvalues are ``a`` and the ``a − λ`` of ``G B``'s eigenvalues ``λ``, and the spectral
    radius of the inverse is at most its Frobenius norm).
    """
    rho = p.rho_sq.clamp_min(0.0).sqrt().double()
    inner = p.J if side == "square" else p.GB
    assert inner is not None
    eye = torch.eye(inner.shape[0], dtype=torch.float64, device=inner.device)
    inverse = torch.linalg.inv_ex(a * eye - inner.double()).inverse
    floor = torch.linalg.matrix_norm(inverse).reciprocal()
    if side == "woodbury":
        floor = floor.clamp_max(a)
    return Inverse("direct", 0, rho + a, torch.maximum(a - rho, floor), inverse=inverse)


def _vector_increments(ws: Workspace, state: Cast, p: Products, a: float, D: int) -> Tensor:
    """Completes the ω and w̄ blocks (which hold ``J ω`` and ``J w̄``) to ``J ω − u`` and
    ``J w̄ − D u − Rᵀ1`` (``ω' = M ω + u``, ``w̄' = M w̄ + D u + Rᵀ1``), as one product of
    ``[u; Hᵀb; r]ᵀ`` with a 3 × 2 matrix; returns ``−g = −(M w̄ + Rᵀ1 + D u/2)``.
    """
    ws.inc_vectors.addmm_(p.ur.T, ws.vector_coefficients(D))
    return torch.add(ws.inc_blocks[3], state.w_bar, alpha=-a).add_(p.u, alpha=0.5 * D)


def woodbury_increments(
    ws: Workspace, upd: Pending, p: Products, inv: Inverse, state: Cast, a: float, D: int
) -> Tensor:
    """Phase 3 on the ``m × m`` side (``inv.kind`` ``'series'`` or ``'direct'``): fills the
    increments and returns ``R U'⁻¹``, the rows added to ``V[c]``.

    ``a M⁻¹ = I + Hᵀ diag(b) (a I − G B)⁻¹ H`` with ``G B = H Hᵀ diag(b)``, so every ``d × d``
    product of the ``d × d`` side becomes one through ``m`` (``docs/factored-update.md`` §6).
    """
    H, m = upd.H, upd.H.shape[0]
    hb, GB = p.hb, p.GB
    assert hb is not None and GB is not None and p.C is not None and p.SR is not None
    inc_Ut, inc_Q, inc_omega, inc_w_bar, inc_U_inv = ws.inc_blocks
    X, HU = H @ state.U_inv, H @ state.U.T  # H U⁻¹, H Uᵀ
    torch.mv(hb.T, H @ state.omega, out=inc_omega)  # J ω
    torch.mv(hb.T, upd.s, out=inc_w_bar)  # J w̄, with H w̄ = s from the forward
    if inv.kind == "series":  # a Z = Σ_k (G B / a)^k X, by Horner on the m × m side
        Z = X
        for _ in range(inv.terms - 1):
            Z = torch.addmm(X, GB, Z, alpha=1.0 / a)
    elif inv.inverse is not None:  # sync-free: (a I − G B)⁻¹ in float64 (sync_free_inverse)
        Z = (inv.inverse @ X.double()).mul_(a).to(X.dtype)
    else:
        Z = a * torch.linalg.solve(torch.diag_embed(GB.new_full((m,), a)) - GB, X)
    torch.mm(hb.T, HU, out=inc_Ut)  # J Uᵀ = (U J)ᵀ
    torch.addmm(inc_U_inv, hb.T, Z, beta=0.0, alpha=1.0 / a, out=inc_U_inv)
    dV = torch.addmm(X, GB, Z, alpha=1.0 / a).mul_(p.g_col / a)  # R U'⁻¹
    neg_g = _vector_increments(ws, state, p, a, D)
    # Y = J (Q J/2 − W_cᵀ R − a Q) + a W_cᵀ R + Rᵀ S R/2 + g uᵀ, as one product through m.
    left = torch.cat([hb, p.R, neg_g.neg().unsqueeze(0)])
    right = torch.cat(
        [
            torch.addmm(p.C @ hb, p.N, p.R, beta=0.5, alpha=-1.0).sub_(upd.P, alpha=a),
            torch.add(p.SR, upd.W_c, alpha=2.0 * a).mul_(0.5),
            p.u.unsqueeze(0),
        ]
    )
    Y = left.T @ right
    torch.add(Y, Y.T, out=inc_Q)
    return dV


def _square_series(ws: Workspace, J: Tensor, inner: Tensor, a: float, terms: int) -> Tensor:
    """``a M⁻¹ U⁻¹ − U⁻¹ = Σ_{k≥1} (J/a)^k U⁻¹`` by Horner, into the U⁻¹ block (which holds
    ``J U⁻¹``), and ``J inner`` (returned), the last power and that in one product.
    """
    inc_U_inv = ws.inc_blocks[4]
    if terms == 1:
        if a != 1.0:
            inc_U_inv.div_(a)
        return torch.mm(J, inner, out=ws.J_inner)
    first = None
    if terms > 2:  # all powers but the last, then its place holds a × that
        first = inc_U_inv / a
        step = first
        for _ in range(terms - 2):
            step = torch.addmm(first, J, step, alpha=1.0 / a)
        inc_U_inv.copy_(step).mul_(a)
    torch.mm(J, ws.last, out=ws.prod)
    last = ws.prod_last
    if first is not None:
        torch.add(first, last, alpha=1.0 / (a * a), out=inc_U_inv)
    elif a != 1.0:
        inc_U_inv.div_(a).add_(last, alpha=1.0 / (a * a))
    else:
        inc_U_inv.add_(last)
    return ws.J_inner


def square_increments(
    ws: Workspace, upd: Pending, p: Products, inv: Inverse, state: Cast, a: float, D: int
) -> Tensor:
    """Phase 3 on the ``d × d`` side (any ``inv.kind`` but ``'dense'``): fills the increments
    and returns ``R U'⁻¹``, the rows added to ``V[c]``.
    """
    J, SRR, WR = p.J, p.SRR, p.WR
    assert J is not None and SRR is not None and WR is not None
    dtype = J.dtype
    inc_U_inv = ws.inc_blocks[4]
    # J [Uᵀ | Q | ω | w̄ | U⁻¹] in one product, written where the increments go (J is
    # symmetric: J Uᵀ = (U J)ᵀ and J Q = (Q J)ᵀ).
    torch.mm(J, state.packed, out=ws.inc_main)
    # −(Q J/2 − W_cᵀ R − a Q), which J multiplies in Y (Q J = (J Q)ᵀ, read from the ΔQ block,
    # which holds J Q until ΔQ replaces it below).
    inner = torch.add(WR, ws.inc_Q_T, alpha=-0.5, out=ws.inner).add_(state.Q, alpha=a)
    if inv.kind == "series":
        J_inner = _square_series(ws, J, inner, a, inv.terms)
    else:
        eye = torch.eye(J.shape[0], device=J.device, dtype=torch.float64)
        if inv.inverse is not None:  # sync-free (sync_free_inverse)
            M_inv = inv.inverse
        elif inv.eig is None:
            M_inv = torch.cholesky_inverse(torch.linalg.cholesky(a * eye - J.double()))
        else:
            vectors = inv.eig.eigenvectors
            M_inv = (vectors / (a - inv.eig.eigenvalues)) @ vectors.T
        J_inner = J @ inner
        torch.mm((a * M_inv - eye).to(dtype), state.U_inv, out=inc_U_inv)
    dV = p.R @ torch.add(state.U_inv, inc_U_inv)
    if a != 1.0:
        dV /= a
    neg_g = _vector_increments(ws, state, p, a, D)
    # Y = −J inner + a W_cᵀ R + Rᵀ S R/2 + g uᵀ.
    Y = ws.Y
    if a != 1.0:
        torch.add(SRR, WR, alpha=2.0 * a, out=Y).mul_(0.5)
    else:
        torch.add(WR, SRR, alpha=0.5, out=Y)
    Y.sub_(J_inner).addr_(neg_g, p.u, alpha=-1.0)
    torch.add(Y, ws.Y_T, out=ws.inc_blocks[1])
    return dV


def commit(
    V: Tensor, state: Tensor, ws: Workspace, target: Tensor, dV: Tensor, a: float,
    ok: Tensor | None = None,
) -> None:  # fmt: skip
    """The one change of a factored step: ``V[c] += dV``, and the float64 state
    ``[Uᵀ | Q | ω | w̄ | U⁻¹]`` becomes ``(state + inc · column_scale) · (a, a², a, a, 1/a)``
    (``docs/factored-update.md`` §5). With ``ok`` (a boolean 0-dim tensor: the sync-free step)
    the change is made only where ``ok`` is true, by selection on the device: else ``V`` and
    the state keep their values.
    """
    ws.set_decay(a)
    if ok is not None:
        dV = torch.where(ok, dV, 0.0)
        new = torch.addcmul(state, ws.inc_main, ws.column_scale)
        decay(new, a)
        state.copy_(torch.where(ok, new, state))
    if V.device.type == "cpu":
        # (On the CPU index_add_ takes less time than index_put_ with accumulate, and it adds
        # V's rows deterministically there; on CUDA its atomic adds would not.)
        V.index_add_(0, target, dV)
    else:
        V.index_put_((target,), dV, accumulate=True)
    if ok is None:
        state.addcmul_(ws.inc_main, ws.column_scale)
        decay(state, a)


def decay(state: Tensor, a: float) -> None:
    """``W ← a W`` on the packed state: ``U``, ``ω``, ``w̄`` times ``a``, ``Q`` times ``a²``,
    ``U⁻¹`` divided by ``a`` (``a ≠ 0``).
    """
    if a != 1.0:
        d = state.shape[0]
        state[:, : 2 * d + 2].mul_(a)
        state[:, d : 2 * d].mul_(a)
        state[:, 2 * d + 2 :].div_(a)


def dense_update(
    V: Tensor, U: Tensor, omega: Tensor, target: Tensor, a: float, J64: Tensor, R: Tensor,
    u: Tensor, ok: Tensor | None = None,
) -> None:  # fmt: skip
    """The step applied to ``V`` itself (``O(D d²)``): ``V ← (V U + 1ωᵀ) M + 1uᵀ``, then
    ``V[c] += R``; the caller starts a fresh factorization (``U = I``, ``ω = 0``). For steps
    whose ``M`` is nearly singular. Where ``ok`` (a boolean 0-dim tensor: the sync-free step)
    is false, ``M = I``, ``u = 0`` and ``R = 0`` instead: a repair, which keeps ``W``.
    """
    M = a * torch.eye(J64.shape[0], device=J64.device, dtype=torch.float64) - J64
    UM, shift = U @ M, M @ omega + u.double()
    if ok is not None:
        UM, shift = torch.where(ok, UM, U), torch.where(ok, shift, omega)
        R = torch.where(ok, R, 0.0)
    UM, shift = UM.to(V.dtype), shift.to(V.dtype)
    for _, rows in row_chunks(V):
        rows.copy_(torch.addmm(shift, rows, UM))
    V.index_add_(0, target, R)
