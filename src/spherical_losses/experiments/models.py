"""The experiment suite's models.

Each model is a *body* that maps an input to features of size ``features``; the output layer
(``nn.Linear`` or :class:`~spherical_losses.FactoredSphericalLoss`) is kept apart so that the
training loop can swap it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvNet", "LSTMBody", "ResNet", "he_init"]


def he_init(module: nn.Module) -> None:
    """He (Kaiming) normal initialization of every conv and linear layer, biases at zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ConvNet(nn.Module):
    """A small VGG-style convolutional net for 28×28 grey images (MNIST).

    Two blocks of two 3×3 convolutions with ReLU and 2×2 max-pooling, then a fully connected
    layer with ReLU and dropout. Input ``(N, 1, 28, 28)``, output ``(N, features)``.
    """

    def __init__(self, width: int = 32, features: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * 7 * 7, features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.features = features
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): ``6n + 2`` layers, widths ``w, 2w, 4w``.

    ``n = 3`` is ResNet-20. Input ``(N, 3, 32, 32)``, output ``(N, 4w)`` after global average
    pooling.
    """

    def __init__(self, blocks_per_stage: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for b in range(blocks_per_stage):
                layers.append(_BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.features = cin
        he_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))


class LSTMBody(nn.Module):
    """Word-level LSTM language model body: embedding, LSTM layers, dropout.

    Input ``(T, B)`` token indices and the previous state; output features ``(T, B, hidden)``
    and the new state. Weights uniform in ``[−init, init]`` (Zaremba et al. 2014).
    ``sparse=True`` gives the embedding a sparse gradient (plain SGD only), so that a step
    touches only the rows of the words in the batch: with a huge vocabulary a dense embedding
    gradient would cost ``O(D·d)`` per step.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int = 200,
        layers: int = 2,
        dropout: float = 0.0,
        init: float = 0.1,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden, sparse=sparse)
        self.lstm = nn.LSTM(hidden, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.features = hidden
        for p in self.parameters():
            nn.init.uniform_(p, -init, init)

    def forward(
        self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        out, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.drop(out), state
