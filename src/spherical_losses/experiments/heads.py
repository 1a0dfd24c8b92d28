"""Output heads: what turns a body's features into the loss, log-probabilities and a ranking.

A head is one class with a name in :data:`HEADS` (what ``--output`` chooses). It is given the
member and the dense initialization of the output layer, ``nn.Linear(features, classes)``,
so that every head starts from the same weights; it says which module (if any) the network
holds, which optimizers it brings itself, and what of its state a checkpoint keeps.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import family, functional
from ..linear import LinearSphericalLoss, linear_spherical_loss
from .options import RunConfig, RunError
from .tasks import Settings

__all__ = ["HEADS", "DenseHead", "FactoredHead", "LinearHead", "Net", "OutputHead"]


class Net(nn.Module):
    """Body + optional output layer. Returns the logits where the network applies its layer
    (``apply_head``), else the features (no layer, or one whose loss reads the features)."""

    def __init__(
        self, body: nn.Module, head: nn.Module | None, recurrent: bool, apply_head: bool = True
    ) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.recurrent = recurrent
        self.apply_head = apply_head and head is not None

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        if self.recurrent:
            feats, state = self.body(x, state)
        else:
            feats = self.body(x)
        feats = feats.reshape(-1, feats.shape[-1])
        return (self.head(feats) if self.apply_head else feats), state


class OutputHead:
    """The interface of an output head. ``out`` below is what :class:`Net` returns:
    logits ``(N, C)`` where the head puts a layer in the network, features ``(N, d)`` else."""

    name: ClassVar[str]
    #: Whether the network applies the module :meth:`attach` returns to the features (a
    #: layer that makes the logits), or only holds it (its parameters trained with the
    #: network's, its loss computed from the features).
    applied: ClassVar[bool] = True

    def __init__(self, member: family.Member) -> None:
        self.member = member

    def check(self, config: RunConfig, settings: Settings) -> None:
        """Raises :class:`RunError` when this head cannot train the run ``config`` (called by
        :meth:`RunConfig.resolve`, with the other checks of a run's options)."""

    def attach(
        self, linear: nn.Linear, device: torch.device, dtype: torch.dtype
    ) -> nn.Module | None:
        """Takes the output layer's initialization; returns the module the network holds."""
        raise NotImplementedError

    def optimizers(
        self, settings: Settings, lr: float, group: Any = None
    ) -> list[torch.optim.Optimizer]:
        """The optimizers of the head's own parameters (none: they are in the network)."""
        return []

    def loss(self, out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor | None:
        """``log p(target)`` per row, or ``None`` where the member defines no probabilities."""
        raise NotImplementedError

    def topk(self, out: Tensor, k: int) -> Tensor:
        """The ``k`` best classes per row ``(N, k)``, best first."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint keeps beyond the network's parameters."""
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


class DenseHead(OutputHead):
    """``nn.Linear`` in the network; the member's dense loss on its logits."""

    name = "dense"

    def attach(self, linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> nn.Module:
        return linear

    def loss(self, out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return functional.spherical_loss(out, target, self.member, reduction=reduction)

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor | None:
        member = self.member
        if member.spherical and member.has_probabilities:
            s, q, oc = family.statistics(out, target)
            return member.target_log_prob(s, q, oc, out.shape[-1])
        try:
            logp = member.log_probs(out, dim=-1)
        except ValueError:  # the member defines no probabilities (Z-loss, squared error)
            return None
        return logp.gather(-1, target[:, None])[:, 0]

    def topk(self, out: Tensor, k: int) -> Tensor:
        return _ranking_scores(self.member, out).topk(k, dim=-1).indices


def _ranking_scores(member: family.Member, logits: Tensor) -> Tensor:
    """What a prediction ranks classes by: the member's own probabilities where it defines
    them (Taylor's 1 + o + o²/2 and spherical's o² + ε are not increasing in o, so the largest
    logit need not be the most probable class), else the logits."""
    if member.has_probabilities:
        return member.log_probs(logits, dim=-1)
    return logits


class _SphericalHead(OutputHead):
    """A head whose criterion (``self.crit``) takes the features: a spherical member only;
    exact log-probabilities without the logits, top-k from chunks of them."""

    crit: Any

    def check(self, config: RunConfig, settings: Settings) -> None:
        if not self.member.spherical:
            raise RunError(
                f"--output {config.output} needs a spherical loss; {config.loss_spec()} is not "
                "spherical (it does not depend on the outputs through (s, q, o_c) only)"
            )

    def log_prob(self, out: Tensor, target: Tensor) -> Tensor | None:
        if not self.member.has_probabilities:
            return None
        return self.crit.log_prob(out, target)

    def topk(self, out: Tensor, k: int) -> Tensor:
        # In chunks of classes (O(D·d) time, bounded memory); by the member's probabilities
        # where it defines them, as the dense head ranks.
        by = "probability" if self.member.has_probabilities else "logit"
        return self.crit.topk(out, k, by=by)[1]


class FactoredHead(_SphericalHead):
    """:class:`~spherical_losses.FactoredSphericalLoss` on the features, trained by
    :class:`~spherical_losses.FactoredSGD` in ``O(d²)`` per example."""

    name = "factored"

    def check(self, config: RunConfig, settings: Settings) -> None:
        super().check(config, settings)
        if config.optimizer != "sgd":
            raise RunError(
                f"--output factored trains the output layer with its own plain SGD "
                f"(FactoredSGD), not --optimizer {config.optimizer}; use --output linear for "
                f"an output layer trained by {config.optimizer}"
            )
        if settings.momentum:
            raise RunError(
                f"--output factored trains the output layer with plain SGD (momentum has no "
                f"exact O(d²) form), but the {config.profile} profile of {config.task!r} uses "
                f"momentum {settings.momentum}; use --output dense for this task"
            )

    def attach(self, linear: nn.Linear, device: torch.device, dtype: torch.dtype) -> None:
        from ..factored import FactoredSphericalLoss

        self.crit = FactoredSphericalLoss.from_linear(linear, loss=self.member).to(device, dtype)
        return None

    def optimizers(
        self, settings: Settings, lr: float, group: Any = None
    ) -> list[torch.optim.Optimizer]:
        from ..factored import FactoredSGD

        # Under torchrun (group: the processes) they exchange their rows of each update
        # (O(m d) numbers), not a D × d gradient, and apply the same exact step.
        return [FactoredSGD(self.crit, lr, weight_decay=settings.weight_decay, process_group=group)]

    def loss(self, out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if reduction not in ("mean", "sum") or self.crit.reduction != "mean":
            raise ValueError(f"unsupported reduction {reduction!r} for the factored output")
        loss = self.crit(out, target)
        return loss * len(target) if reduction == "sum" else loss

    def state_dict(self) -> dict[str, Any]:
        return self.crit.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.crit.load_state_dict(state)


class LinearHead(_SphericalHead):
    """:class:`~spherical_losses.LinearSphericalLoss` on the features: the loss and its exact
    gradient from ``WᵀW`` without the logits, so that the network's optimizer (any) trains the
    layer. The layer is in the network (its optimizer, clipping, DDP and checkpoint)."""

    name = "linear"
    applied = False

    def attach(
        self, linear: nn.Linear, device: torch.device, dtype: torch.dtype
    ) -> LinearSphericalLoss:
        # Made on the meta device, then given the dense initialization itself: no new weights
        # drawn, so the random stream (dropout) is the dense run's.
        crit = LinearSphericalLoss(
            linear.in_features, linear.out_features, self.member, bias=True, device="meta"
        )
        crit.linear = linear
        self.crit = crit
        return crit

    def loss(self, out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        layer = self.crit.linear
        return linear_spherical_loss(
            out, layer.weight, target, self.member, linear_bias=layer.bias, reduction=reduction
        )


#: The output heads by ``--output`` name.
HEADS: dict[str, type[OutputHead]] = {
    head.name: head for head in (DenseHead, LinearHead, FactoredHead)
}
