"""Trunks and heads for multi-task models with hard parameter sharing.

A multi-task model here is a shared trunk (any nn.Module mapping a batch to (B, D) features) and
K heads, head k reading the trunk's features of task k's view. The affinity tracker and the engine
take the trunk and the heads separately, so any user trunk works.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for small images: (B, C, H, W) -> (B, 4 * width) features.

    Three stages of `blocks[i]` BasicBlocks with widths (w, 2w, 4w), the last two at stride 2,
    then global average pooling. The default (width 16, one block per stage) is a ResNet-8.
    """

    def __init__(self, in_channels: int = 3, width: int = 16, blocks: Sequence[int] = (1, 1, 1)):
        super().__init__()
        if in_channels < 1 or width < 1 or len(blocks) != 3 or min(blocks) < 1:
            raise ValueError(f"SmallResNet needs in_channels, width >= 1 and 3 stage depths >= 1, got {in_channels}, {width}, {blocks}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, channels = [], width
        for stage, depth in enumerate(blocks):
            out_channels = width * 2**stage
            for index in range(depth):
                layers.append(BasicBlock(channels, out_channels, stride=2 if stage > 0 and index == 0 else 1))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))


class MLPTrunk(nn.Module):
    """Flatten, then Linear + ReLU layers: (B, ...) -> (B, hidden[-1])."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        if in_features < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"MLPTrunk needs in_features >= 1 and hidden sizes >= 1, got {in_features}, {hidden}")
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        self.net = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def linear_heads(num_tasks: int, in_features: int, num_classes: int) -> nn.ModuleList:
    """K independent linear classifiers, one per task."""
    if num_tasks < 1 or in_features < 1 or num_classes < 1:
        raise ValueError(f"linear_heads needs positive sizes, got {num_tasks}, {in_features}, {num_classes}")
    return nn.ModuleList(nn.Linear(in_features, num_classes) for _ in range(num_tasks))
