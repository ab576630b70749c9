"""Trunks and hard parameter sharing: the models the engine and the trainer build on.

A multi-task model here is a shared trunk (any nn.Module mapping a batch to (B, D) features) and
K heads, head k reading the trunk's features of task k's view. The affinity tracker and the engine
take the trunk and the heads separately, so any user trunk works.

- `SmallResNet`, `MLPTrunk`: ready-made trunks; `linear_heads(K, D, classes)`: K linear heads.
- `MultiTaskModel(trunk, heads)`: the container; `forward(views)` runs each view through the trunk
  in its own call (per-view BatchNorm statistics) and head k on view k.

Trunk hooks (optional; the engine, the affinity tracker, `MultiTaskModel` and `view_features`
honour them; `mtdl_fast.lookahead.trunk_forward(trunk, x, task)` calls a trunk either way):

- task-aware: ``task_aware = True``, ``forward(x, task)`` with ``task`` an int or a 0-dim int64
  tensor (it may be vmapped), and ``task_parameter_names()`` naming (as in ``named_parameters``)
  the parameters that belong to one task (a per-task alignment, per-task copies); the trunk is
  then called as ``trunk(view_k, k)`` for task k, and the affinity lookahead holds those
  parameters fixed, like heads.
- ``forward_views(views (K, B, ...)) -> (K, B, D)``: all K views in one call (a vectorised
  multi-trunk), used instead of K trunk calls. Task k's features must depend on view k only.
- ``regularization() -> scalar tensor``: a penalty the engine adds to the training loss (not to
  the per-task losses, nor to the affinity), e.g. soft parameter sharing's tie between copies.

Task-conditioned heads (one head shared by all tasks) live in `mtdl_fast.research.conditioning`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtdl_fast.lookahead import is_task_aware, trunk_forward


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
# Trunk hooks
# --------------------------------------------------------------------------------------------------


def check_trunk(trunk: nn.Module) -> None:
    """TypeError when `trunk` declares a hook (see the module docs) without implementing it."""
    if not isinstance(trunk, nn.Module):
        raise TypeError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
    name = type(trunk).__name__
    if is_task_aware(trunk) and not callable(getattr(trunk, "task_parameter_names", None)):
        raise TypeError(f"{name} sets task_aware = True but has no task_parameter_names() method")
    for hook in ("forward_views", "regularization"):
        if hasattr(trunk, hook) and not callable(getattr(trunk, hook)):
            raise TypeError(f"{name}.{hook} must be a method, got {type(getattr(trunk, hook)).__name__}")


def view_features(trunk: nn.Module, views: torch.Tensor) -> Sequence[torch.Tensor]:
    """The trunk's features of each task's view: K tensors (B, D...), entry k from view k only.

    One ``trunk.forward_views(views)`` call when the trunk has it (returning (K, B, D...)), else one
    trunk call per view, trunk(views[k], k) or trunk(views[k]) (per-view BatchNorm statistics).
    """
    if not hasattr(trunk, "forward_views"):
        return [trunk_forward(trunk, view, k) for k, view in enumerate(views.unbind(0))]
    features = trunk.forward_views(views)
    if not isinstance(features, torch.Tensor) or features.shape[:2] != views.shape[:2]:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{type(trunk).__name__}.forward_views must return (K, B, ...) = "
                         f"{tuple(views.shape[:2])} + (...), got {shape}")
    return features


def trunk_regularization(trunk: nn.Module) -> torch.Tensor | None:
    """The trunk's ``regularization()`` penalty (a scalar tensor), or None when it has none."""
    if not hasattr(trunk, "regularization"):
        return None
    penalty = trunk.regularization()
    if not isinstance(penalty, torch.Tensor) or penalty.numel() != 1:
        shape = tuple(penalty.shape) if isinstance(penalty, torch.Tensor) else type(penalty).__name__
        raise ValueError(f"{type(trunk).__name__}.regularization() must return a scalar tensor, got {shape}")
    return penalty.reshape(())


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
    per view): task k's output depends on view k only. A trunk with the hooks of this module's
    docs is called as trunk(view_k, k) (task-aware) or once on all views (``forward_views``).

    Args:
        trunk: maps a batch (B, ...) to features (B, D); may implement the trunk hooks.
        heads: K modules; head k maps trunk features of view k to task k's output (B, classes).
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        check_trunk(trunk)
        heads = list(heads)
        if not heads or not all(isinstance(h, nn.Module) for h in heads):
            raise ValueError("heads must be a non-empty sequence of nn.Module")
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """views (K, B, ...) -> outputs (K, B, classes): head k on task k's features of views[k]
        (`view_features`: one trunk call per view unless the trunk has ``forward_views``)."""
        if not isinstance(views, torch.Tensor) or views.ndim < 2:
            raise ValueError(f"views must be a (K, B, ...) tensor, got {getattr(views, 'shape', type(views).__name__)}")
        if views.shape[0] != self.num_tasks:
            raise ValueError(f"views has K={views.shape[0]} task views but the model has {self.num_tasks} tasks")
        features = view_features(self.trunk, views)
        return torch.stack([head(features[k]) for k, head in enumerate(self.heads)])

    def task_forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """x (B, ...) -> task `task`'s output (B, classes): heads[task](trunk(x)), or
        heads[task](trunk(x, task)) for a task-aware trunk."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError(f"x must be a (B, ...) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}), got {task!r}")
        return self.heads[task](trunk_forward(self.trunk, x, task))
