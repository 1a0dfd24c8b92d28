"""A linear layer and a spherical loss without the logits: the Gram engine.

With logits ``o = W h + b`` (``W`` of shape ``(D, d)``), a spherical member needs per example
only ``s = Σ_k o_k``, ``q = Σ_k o_k²`` and ``o_c``, and all of them come from the ``d × d`` Gram
matrix ``Q = WᵀW``, ``w̄ = Wᵀ1``, ``Wᵀb`` and the target rows ``W_c``::

    s   = h·w̄ + Σ b
    q   = hᵀQh + 2 h·(Wᵀb) + ‖b‖²
    o_c = W_c·h + b_c

and so does the exact gradient (α, β, γ are the member's partials ∂L/∂s, ∂L/∂q, ∂L/∂o_c)::

    ∂h = α w̄ + 2β (Q h + Wᵀb) + γ W_c
    ∂W = 1 (Σ_i α_i h_i)ᵀ + 2 W (Σ_i β_i h_i h_iᵀ) + 2 b (Σ_i β_i h_i)ᵀ + Σ_i e_{c_i} γ_i h_iᵀ
    ∂b = (Σ_i α_i) 1 + 2 W (Σ_i β_i h_i) + 2 (Σ_i β_i) b + Σ_i γ_i e_{c_i}

A step costs two ``D × d × d`` products and ``O(m d²)`` work for ``m`` examples, against
``3 m D d`` for the logits and their gradients; no ``m × D`` tensor exists. The gradient is the
exact gradient of the loss, so any optimizer can use it. ``docs/linear-path.md`` derives it.

For few examples (``m`` below about ``d/2``) the logits are cheaper: ``method="chunked"`` forms
them a block of classes at a time (never all ``m × D`` at once) and recomputes them in the
backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import _conventions as conventions
from . import _scoring, family
from .family import Member, SphericalMember

__all__ = ["LinearSphericalLoss", "arithmetic_cost", "linear_spherical_loss"]

METHODS = ("auto", "gram", "chunked")

#: Logits per block (m × classes) in the chunked method: 16 MiB of float32.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# the arithmetic model


def arithmetic_cost(
    method: str, m: int, D: int, d: int, *, input_grad: bool = True, weight_grad: bool = True
) -> int:
    """Multiply-adds of one forward (and backward, for the gradients asked) of a method.

    Parameters
    ----------
    method : {'gram', 'chunked', 'dense'}
        ``'dense'`` is the logits ``h Wᵀ`` and their two gradient products.
    m, D, d : int
        Examples, classes, input features.
    input_grad, weight_grad : bool
        Which gradients are computed.

    Returns
    -------
    int
        The count of the matrix products only; the element-wise passes are left out.
        Against the dense member with both gradients, the Gram method's ratio is
        ``3 m D d / (2 D d² + 2 m d²) ≈ 1.5 m / d`` when ``D ≫ m``.
    """
    products = int(input_grad) + int(weight_grad)
    if method == "dense":
        return m * D * d * (1 + products)
    if method == "chunked":  # the backward forms the logits again
        return m * D * d * (1 + (1 + products if products else 0))
    if method == "gram":  # Q and h Q; then W M and M = Σ β h hᵀ for the weight's gradient
        return (D * d * d + m * d * d) * (1 + int(weight_grad))
    raise ValueError(f"method must be one of 'gram', 'chunked', 'dense', got {method!r}")


def _resolve_method(
    method: str, m: int, D: int, d: int, input_grad: bool, weight_grad: bool
) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method != "auto":
        return method
    grads = {"input_grad": input_grad, "weight_grad": weight_grad}
    gram = arithmetic_cost("gram", m, D, d, **grads)
    return "gram" if gram <= arithmetic_cost("chunked", m, D, d, **grads) else "chunked"


def _chunk_size(m: int, D: int) -> int:
    return max(1, min(D, _CHUNK_ELEMENTS // max(m, 1)))


# --------------------------------------------------------------------------------------------
# the engines


@contextlib.contextmanager
def _ieee_matmul(enabled: bool) -> Iterator[None]:
    """Float32 products in full precision on CUDA, whatever the global TF32 setting.

    TF32 rounds the factors to 10 bits of mantissa: ``Q`` would be the Gram matrix of a ``W``
    perturbed by about 5·10⁻⁴ relatively, and ``q = hᵀQh`` off by as much, 50 times the
    float32 tolerance of this path. ``allow_tf32=True`` keeps the global setting.
    """
    matmul = torch.backends.cuda.matmul
    if not enabled or getattr(matmul, "fp32_precision", "ieee") != "tf32":
        yield
        return
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = "tf32"


def _partials(
    member: SphericalMember, s: Tensor, q: Tensor, oc: Tensor, D: int, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The member's ``(L, α, 2β, γ)``, NaN where ``s`` is not finite (as the dense engine) and
    0 at ignored positions.
    """
    loss, alpha, beta, gamma = member.loss_and_partials(s, q, oc, D)
    # A non-finite logit makes s non-finite: loss and gradient NaN, as for F.cross_entropy
    # (without asking the device whether it happened).
    bad = ~torch.isfinite(s)
    kept = ~valid
    out = []
    for t in (loss, alpha, 2.0 * beta, gamma):
        t = torch.broadcast_to(t, s.shape)
        out.append(torch.where(bad, torch.nan, t).masked_fill(kept, 0.0))
    return out[0], out[1], out[2], out[3]


def _target_outputs(
    h: Tensor, W: Tensor, b: Tensor | None, target: Tensor
) -> tuple[Tensor, Tensor]:
    """``W_c`` (m, d) and ``o_c = W_c·h + b_c`` (m)."""
    W_c = W.index_select(0, target)
    oc = torch.linalg.vecdot(W_c, h)
    if b is not None:
        oc = oc + b.index_select(0, target)
    return W_c, oc


def _gram_statistics(
    h: Tensor, W: Tensor, b: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``s``, ``q``, ``Qh + Wᵀb`` (m, d), ``w̄`` from ``Q = WᵀW``: one ``D × d × d`` product,
    one ``m × d × d``. Differentiable by autograd (``log_prob`` uses it so).
    """
    d = W.shape[1]
    Q = W.T @ W
    w_bar = W.sum(0)
    cols = [Q, w_bar.unsqueeze(1)]
    if b is not None:
        Wtb = b @ W
        cols.append(Wtb.unsqueeze(1))
    HQ = h @ torch.cat(cols, 1)  # [h Q | h·w̄ | h·Wᵀb], one product
    P, s = HQ[:, :d], HQ[:, d]
    q = torch.linalg.vecdot(P, h)
    if b is not None:
        s = s + b.sum()
        q = q + 2.0 * HQ[:, d + 1] + b.dot(b)
        P = P + Wtb
    # hᵀQh of a positive semi-definite Q can round below 0 where every logit is about 0.
    return s, q.clamp(min=0.0), P, w_bar


def _chunked_statistics(
    h: Tensor, W: Tensor, b: Tensor | None, chunk: int
) -> tuple[Tensor, Tensor]:
    """``s`` and ``q`` from the logits, ``chunk`` classes at a time."""
    s = h.new_zeros(h.shape[0])
    q = h.new_zeros(h.shape[0])
    for _, o in _scoring.linear_logit_chunks(h, W, b, chunk):
        s = s + o.sum(1)
        q = q + torch.linalg.vector_norm(o, dim=1).square()
    return s, q


class _LinearLoss(torch.autograd.Function):
    """Per-example loss of a spherical member on ``h Wᵀ + b``, closed-form backward.

    ``chunk=None``: the Gram method (module docstring); an int: the logits ``chunk`` classes
    at a time, in the forward and again in the backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        h: Tensor,
        W: Tensor,
        b: Tensor | None,
        target: Tensor,
        valid: Tensor,
        member: SphericalMember,
        chunk: int | None,
        ieee: bool,
    ) -> tuple[Tensor, ...]:
        W_c, oc = _target_outputs(h, W, b, target)
        if chunk is None:
            with _ieee_matmul(ieee):
                s, q, PW, w_bar = _gram_statistics(h, W, b)
            # Q h + Wᵀb, W_c and w̄ are what the backward needs besides the partials.
            extra = (PW, W_c, w_bar)
        else:
            s, q = _chunked_statistics(h, W, b, chunk)
            extra = ()
        return (*_partials(member, s, q, oc, W.shape[0], valid), *extra)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        h, W, b, target, _, _, ctx.chunk, ctx.ieee = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(h, W, b, target, *output[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        h, W, b, target, alpha, beta2, gamma, *extra = ctx.saved_tensors
        # The partials of the reduced loss (the upstream gradient holds the class weights).
        a, b2, g = alpha * grad_loss, beta2 * grad_loss, gamma * grad_loss
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = b is not None and ctx.needs_input_grad[2]
        if ctx.chunk is None:
            grads = _gram_backward(h, W, b, a, b2, g, *extra, need_h, need_W, need_b, ctx.ieee)
        else:
            grads = _chunked_backward(h, W, b, target, a, b2, g, need_h, need_W, need_b, ctx.chunk)
        grad_h, grad_W, grad_b = grads
        # The γ terms, at the targets: Σ_i e_{c_i} γ_i h_iᵀ and Σ_i γ_i e_{c_i}.
        if need_W:
            _add_rows(grad_W, target, h * g.unsqueeze(1))
        if need_b:
            grad_b.index_add_(0, target, g)
        return grad_h, grad_W, grad_b, None, None, None, None, None


def _add_rows(out: Tensor, index: Tensor, rows: Tensor) -> None:
    """``out[index[i]] += rows[i]`` for every ``i``, in a fixed order (reproducible bits).

    On the CPU as a 1-D ``index_add_`` on the flat view: the same sums in the same order, but
    ``index_add_`` of whole rows took about 100 ms for 4,096 rows of 256 on two threads (against
    about 1 ms on one), longer than the rest of the step but its two products.
    """
    if out.device.type != "cpu" or not out.is_contiguous():
        out.index_add_(0, index, rows)
        return
    d = out.shape[1]
    flat = (index.unsqueeze(1) * d + torch.arange(d, device=index.device)).view(-1)
    out.view(-1).index_add_(0, flat, rows.reshape(-1))


def _gram_backward(
    h: Tensor,
    W: Tensor,
    b: Tensor | None,
    a: Tensor,
    b2: Tensor,
    g: Tensor,
    PW: Tensor,
    W_c: Tensor,
    w_bar: Tensor,
    need_h: bool,
    need_W: bool,
    need_b: bool,
    ieee: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients from ``Q``, but for the ``γ`` terms of the weight and bias."""
    grad_h = grad_W = grad_b = None
    if need_h:
        # ∂h = α w̄ + 2β (Q h + Wᵀb) + γ W_c
        grad_h = torch.addcmul(torch.outer(a, w_bar), b2.unsqueeze(1), PW)
        grad_h.addcmul_(g.unsqueeze(1), W_c)
    v = b2 @ h if (need_b or (need_W and b is not None)) else None  # Σ 2β h
    if need_W:
        with _ieee_matmul(ieee):
            M = (h * b2.unsqueeze(1)).T @ h  # Σ 2β h hᵀ, (d, d)
            grad_W = W @ M
        # 1 (Σ α h)ᵀ: a broadcast add in place (addmm's copy of a broadcast row into its
        # output took longer than the product itself).
        grad_W.add_(a @ h)
        if b is not None:
            grad_W.addr_(b, v)
    if need_b:
        grad_b = torch.addmv(b * b2.sum(), W, v).add_(a.sum())
    return grad_h, grad_W, grad_b


def _chunked_backward(
    h: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    a: Tensor,
    b2: Tensor,
    g: Tensor,
    need_h: bool,
    need_W: bool,
    need_b: bool,
    chunk: int,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients from the logits again, a block of classes at a time, but for the ``γ``
    terms of the weight and bias.
    """
    grad_h = h.new_zeros(h.shape) if need_h else None
    grad_W = torch.empty_like(W) if need_W else None
    grad_b = torch.empty_like(b) if need_b else None
    a_, b2_ = a.unsqueeze(1), b2.unsqueeze(1)
    for start, o in _scoring.linear_logit_chunks(h, W, b, chunk):
        stop = start + o.shape[1]
        G = o.mul_(b2_).add_(a_)  # ∂L/∂o = α + 2β o on this block (γ at the targets)
        if need_h:
            grad_h.addmm_(G, W[start:stop])
        if need_W:
            torch.mm(G.T, h, out=grad_W[start:stop])
        if need_b:
            torch.sum(G, 0, out=grad_b[start:stop])
    if need_h:
        grad_h.addcmul_(g.unsqueeze(1), W.index_select(0, target))
    return grad_h, grad_W, grad_b


# --------------------------------------------------------------------------------------------
# checks


def _spherical_member(loss: str | Member) -> SphericalMember:
    member = family.get_member(loss)
    if not isinstance(member, SphericalMember) or not member.spherical:
        spherical = [n for n in family.member_names() if family.get_member(n).spherical]
        raise ValueError(
            f"the {member.name!r} loss ({member!r}) is not spherical: it needs every logit, not "
            f"only (s, q, o_c), so it has no form without the logits; use one of "
            f"{', '.join(spherical)} or a SphericalMember (for log-softmax, "
            "torch.nn.functional.linear_cross_entropy)"
        )
    return member


def _check_layer(
    input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None
) -> tuple[int, int]:
    """``(D, d)``; a RuntimeError for shapes and dtypes that ``F.linear`` refuses."""
    for name, t in (("input", input), ("linear_weight", linear_weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point tensor, got {got}")
    if linear_weight.dim() != 2:
        raise ValueError(
            f"linear_weight must have shape (num_classes, in_features), got "
            f"{tuple(linear_weight.shape)}"
        )
    D, d = linear_weight.shape
    if input.dim() == 0 or input.shape[-1] != d:
        raise RuntimeError(
            f"input must have shape (..., {d}) for linear_weight of shape {(D, d)}, got "
            f"{tuple(input.shape)}"
        )
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (D,):
            got = tuple(linear_bias.shape) if isinstance(linear_bias, Tensor) else linear_bias
            raise RuntimeError(f"linear_bias must have shape ({D},), got {got}")
    dtypes = {t.dtype for t in (input, linear_weight, linear_bias) if t is not None}
    if len(dtypes) > 1 and not torch.is_autocast_enabled(input.device.type):
        raise RuntimeError(
            f"input, linear_weight and linear_bias must have the same dtype (as for F.linear), "
            f"got {input.dtype}, {linear_weight.dtype}"
            + (f", {linear_bias.dtype}" if linear_bias is not None else "")
        )
    return D, d


def _check_target(
    target: object, input: Tensor, D: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    target = conventions.class_indices(target)
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(input.shape[:-1])} (the input's without its last "
            f"dimension) for input of shape {tuple(input.shape)}, got {tuple(target.shape)}"
        )
    return target, conventions.target_mask(target, D, ignore_index)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """At least float32 (the statistics of half-precision inputs are accumulated in it)."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------
# the loss


def linear_spherical_loss(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    loss: str | Member = "taylor",
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    method: str = "auto",
    allow_tf32: bool = False,
) -> Tensor:
    """A spherical loss of the logits ``F.linear(input, linear_weight, linear_bias)``, computed
    without them, with :func:`~torch.nn.functional.linear_cross_entropy`'s conventions.

    Equal (up to rounding) to ``sl.spherical_loss(F.linear(input, linear_weight, linear_bias),
    target, loss, ...)``, gradients included, for any optimizer.

    Parameters
    ----------
    input : Tensor
        ``(..., d)``: the features of each example.
    linear_weight : Tensor
        ``(D, d)``: the output layer's weight (``nn.Linear(d, D).weight``).
    target : Tensor
        ``(...)``: class indices (any integer dtype) in ``[0, D)``, or ``ignore_index``.
    loss : str or SphericalMember
        A spherical member by name (``'taylor'``, ``'spherical'``, ``'softmax_bound'``,
        ``'z_loss'``, ``'mse'``) or a :class:`~spherical_losses.family.SphericalMember`
        instance, user-defined ones included. Default ``'taylor'``.
    linear_bias : Tensor, optional
        ``(D)``: the output layer's bias.
    weight : Tensor, optional
        ``(D)``: per-class weights.
    reduction : {'mean', 'sum', 'none'}
        ``'mean'`` divides by the summed weights of the targets kept (NaN with a zero gradient
        when every target is ignored, as the dense losses).
    ignore_index : int
        Target value that contributes neither loss nor gradient.
    method : {'auto', 'gram', 'chunked'}
        ``'gram'``: the statistics from ``Q = WᵀW`` (two ``D × d × d`` products and
        ``O(m d²)`` per step). ``'chunked'``: the logits a block of classes at a time, for few
        examples. ``'auto'`` (default): the cheaper one by :func:`arithmetic_cost`.
    allow_tf32 : bool
        On CUDA, let float32 products use TF32 when it is enabled globally (default: they are
        computed in full float32, since TF32 costs ``Q`` about three decimal digits).

    Returns
    -------
    Tensor
        A scalar, or ``(...)`` (the target's shape) for ``reduction='none'``, 0 at ignored
        positions. Half-precision inputs are computed in float32 and the result returned in
        their dtype; under autocast the result is float32, as cross-entropy's.

    Examples
    --------
    >>> h = torch.randn(4096, 256, requires_grad=True)
    >>> head = torch.nn.Linear(256, 100_000)
    >>> y = torch.randint(100_000, (4096,))
    >>> loss = linear_spherical_loss(h, head.weight, y, "taylor", linear_bias=head.bias)
    >>> loss.backward()  # no (4096, 100000) tensor is formed
    """
    member = _spherical_member(loss)
    conventions.check_reduction(reduction)
    D, d = _check_layer(input, linear_weight, linear_bias)
    conventions.check_weight(weight, D)
    target, valid = _check_target(target, input, D, ignore_index)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    device = input.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = _compute_dtype(input, linear_weight, linear_bias)
    rows_valid = valid.reshape(-1)
    rows_target = torch.where(rows_valid, target.reshape(-1), 0)
    m = rows_target.shape[0]
    grad = torch.is_grad_enabled()
    method = _resolve_method(
        method,
        m,
        D,
        d,
        input_grad=grad and input.requires_grad,
        weight_grad=grad and linear_weight.requires_grad,
    )
    # Cross-entropy is computed in float32 under autocast: so is this.
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
        h = input.reshape(-1, d).to(dtype)
        W = linear_weight.to(dtype)
        b = None if linear_bias is None else linear_bias.to(dtype)
        chunk = None if method == "gram" else _chunk_size(m, D)
        ieee = input.device.type == "cuda" and not allow_tf32
        per = _LinearLoss.apply(h, W, b, rows_target, rows_valid, member, chunk, ieee)[0]
        w = rows_valid.to(dtype)
        if weight is not None:
            w = w * weight.to(dtype).index_select(0, rows_target)
        out = conventions.weighted_reduce(per * w, w, reduction, target.shape)
    return out if autocast else out.to(input.dtype)


# --------------------------------------------------------------------------------------------
# the module


class LinearSphericalLoss(nn.Module):
    """A linear output layer and a spherical loss, without the logits.

    Holds its :class:`~torch.nn.Linear` as :class:`~torch.nn.LinearCrossEntropyLoss` does
    (``self.linear``) and calls :func:`linear_spherical_loss`; the gradient reaches
    ``self.linear``'s parameters exactly, so any optimizer trains them.

    Parameters
    ----------
    in_features : int
        ``d``, the features of each example.
    num_classes : int
        ``D``.
    loss : str or SphericalMember
        A spherical member by name or instance. Default ``'taylor'``.
    bias : bool
        Whether the layer has a bias. Default False.
    device, dtype
        Of the layer's parameters.
    reduction, weight, ignore_index, method
        As :func:`linear_spherical_loss`.

    Examples
    --------
    >>> crit = LinearSphericalLoss(256, 100_000, "taylor")
    >>> opt = torch.optim.AdamW(crit.parameters())
    >>> h, y = torch.randn(4096, 256), torch.randint(100_000, (4096,))
    >>> crit(h, y).backward()
    >>> opt.step()
    >>> values, classes = crit.topk(h[:8], 5, by="probability")
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        loss: str | Member = "taylor",
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.member = _spherical_member(loss)
        conventions.check_reduction(reduction)
        conventions.check_weight(weight, num_classes)
        if method not in METHODS:
            raise ValueError(
                f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}"
            )
        self.num_classes = num_classes
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.method = method
        self.register_buffer("weight", weight)
        self.weight: Tensor | None
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """The loss: ``input`` (..., in_features), ``target`` (...)."""
        return linear_spherical_loss(
            input,
            self.linear.weight,
            target,
            self.member,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            method=self.method,
        )

    def log_prob(self, input: Tensor, target: Tensor) -> Tensor:
        """Exact ``log p(target | input)`` from the statistics, without the logits.

        For members with probabilities (Taylor, spherical). Differentiable by autograd.

        Parameters
        ----------
        input : Tensor
            ``(..., in_features)``.
        target : Tensor
            ``(...)``, class indices.

        Returns
        -------
        Tensor
            ``(...)``; 0 at positions equal to ``ignore_index``.
        """
        if not self.member.has_probabilities:
            raise ValueError(
                f"the {self.member.name!r} loss defines no class probabilities, so it has no "
                "log_prob; use 'taylor' or 'spherical'"
            )
        W, b = self.linear.weight, self.linear.bias
        _check_layer(input, W, b)
        target, valid = _check_target(target, input, self.num_classes, self.ignore_index)
        h = input.reshape(-1, W.shape[1])
        rows_target = torch.where(valid, target, 0).reshape(-1)
        s, q = self._sums(h, W, b)
        oc = _target_outputs(h.to(s.dtype), W.to(s.dtype), _cast(b, s.dtype), rows_target)[1]
        logp = self.member.target_log_prob(s, q, oc, self.num_classes)
        return logp.reshape(target.shape).masked_fill(~valid, 0.0).to(input.dtype)

    def topk(
        self, input: Tensor, k: int, chunk_size: int = _scoring.DEFAULT_CHUNK, *, by: str = "logit"
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest logits (or most probable classes) and their classes, computed
        ``chunk_size`` classes at a time.

        Parameters
        ----------
        input : Tensor
            ``(..., in_features)``.
        k : int
            ``1 <= k <= num_classes``.
        chunk_size : int
            Classes per chunk: memory is ``O(N·(chunk_size + k))`` for ``N`` examples.
        by : {'logit', 'probability'}
            ``'probability'`` ranks by the member's own probabilities (Taylor, spherical), which
            need not follow the logits (``1 + o + o²/2`` and ``o² + ε`` are not increasing);
            the values are then exact log-probabilities.

        Returns
        -------
        (values, indices) : tuple of Tensor
            ``(..., k)`` each, in decreasing order, as :func:`torch.topk`.
        """
        k = _scoring.check_topk(
            k, self.num_classes, by, self.member.has_probabilities, self.member.name
        )
        _scoring.check_chunk_size(chunk_size)
        W, b = self.linear.weight, self.linear.bias
        _check_layer(input, W, b)
        h = input.reshape(-1, W.shape[1])
        dtype = _compute_dtype(h, W, b)
        rows = h.to(dtype)
        score = None
        if by == "probability":
            s, q = self._sums(h, W, b)
            member, D = self.member, self.num_classes
            s_, q_ = s.unsqueeze(1), q.unsqueeze(1)

            def score(o: Tensor) -> Tensor:
                return member.target_log_prob(s_, q_, o, D)

        chunks = _scoring.linear_logit_chunks(rows, W.to(dtype), _cast(b, dtype), chunk_size)
        values, indices = _scoring.topk_of_chunks(chunks, k, rows.shape[0], score=score, like=rows)
        shape = (*input.shape[:-1], k)
        return values.reshape(shape).to(input.dtype), indices.reshape(shape)

    def _sums(self, h: Tensor, W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        """``s`` and ``q`` of every row, by the cheaper method (no gradient products)."""
        dtype = _compute_dtype(h, W, b)
        h, W, b = h.to(dtype), W.to(dtype), _cast(b, dtype)
        m, (D, d) = h.shape[0], W.shape
        if _resolve_method("auto", m, D, d, False, False) == "gram":
            s, q = _gram_statistics(h, W, b)[:2]
            return s, q
        return _chunked_statistics(h, W, b, _chunk_size(m, D))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"loss={self.member!r}, bias={self.linear.bias is not None}, "
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"method={self.method!r}"
        )


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)
