"""Trunks and hard parameter sharing: the models the engine and the trainer build on.

A multi-task model here is a shared trunk (any nn.Module mapping a batch to (B, D) features) and
K heads, head k reading the trunk's features of task k's view. The affinity tracker and the engine
take the trunk and the heads separately, so any user trunk works.

- `SmallResNet`, `MLPTrunk`: ready-made trunks; `linear_heads(K, D, classes)`: K linear heads.
- `MultiTaskModel(trunk, heads)`: the container; `forward(views)` runs each view through the trunk
  in its own call (per-view BatchNorm statistics) and head k on view k.

Task-conditioned heads (one head shared by all tasks) live in `mtdl_fast.research.conditioning`.
"""
from __future__ import annotations

from collections.abc import Sequence

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
            raise ValueError(f"SmallResNet needs in_channels, width >= 1 and 3 stage depths >= 1, "
                             f"got {in_channels}, {width}, {blocks}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
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


# --------------------------------------------------------------------------------------------------
# Multi-task containers
# --------------------------------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MultiTaskModel(nn.Module):
    """A shared trunk and K task heads (hard parameter sharing), split the way the engine and
    `AffinityTracker(model.trunk, model.heads)` take it.

    `forward(views)` runs every view through the trunk in its own call, so BatchNorm in train mode
    normalises each view with its own batch statistics (and updates the running statistics once
    per view), exactly the per-task semantics of DESIGN.md: task k's output depends on view k only.

    Args:
        trunk: maps a batch (B, ...) to features (B, D).
        heads: K modules; head k maps trunk features of view k to task k's output (B, classes).
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError("heads must be a non-empty sequence of nn.Module")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """views (K, B, ...) -> outputs (K, B, classes): head k on trunk(views[k]), one trunk call per view."""
        if not isinstance(views, torch.Tensor) or views.ndim < 2:
            raise ValueError(f"views must be a (K, B, ...) tensor, got {getattr(views, 'shape', type(views).__name__)}")
        if views.shape[0] != self.num_tasks:
            raise ValueError(f"views has K={views.shape[0]} task views but the model has {self.num_tasks} tasks")
        return torch.stack([head(self.trunk(views[k])) for k, head in enumerate(self.heads)])

    def task_forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """x (B, ...) -> task `task`'s output (B, classes): heads[task](trunk(x))."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError(f"x must be a (B, ...) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        return self.heads[task](self.trunk(x))
