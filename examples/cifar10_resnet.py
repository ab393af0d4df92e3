"""A small ResNet-style CNN with BatchNorm for CIFAR-10: the example of
README, "Your own model and data".

``build(width=16, num_classes=10)`` returns a ``torch.nn.Module`` mapping
float32 images (B, 3, 32, 32) in [0, 1] to logits (B, num_classes):
a 3x3 stem convolution, three residual stages of ``width``, ``2 width`` and
``4 width`` channels (the last two halve the resolution), each convolution
followed by BatchNorm, then global average pooling and a linear layer.
With ``width`` 16: 78,042 parameters in 29 tensors, and 9 BatchNorm
layers whose 27 buffers (running mean and variance, float32, and
``num_batches_tracked``, int64; 2,760 bytes) FLQ sends raw and averages
(``model.buffers average``).

Run it (from the repository's root, so that ``examples.cifar10_resnet`` imports):

    flq simulate --config examples/cifar10_resnet.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution
    with BatchNorm when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Stem, three stages of one :class:`Block` each, pooling, classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.stage1 = Block(width, width, 1)
        self.stage2 = Block(width, 2 * width, 2)
        self.stage3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def build(width: int = 16, num_classes: int = 10) -> nn.Module:
    """The model FLQ trains (``"model": {"name": "examples.cifar10_resnet:build"}``)."""
    return ResNetSmall(width, num_classes)
