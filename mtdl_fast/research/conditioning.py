"""Task-conditioned models: one head shared by all tasks, conditioned on the task index.

`ConditionedModel(trunk, head)` exposes the conditioned head (`OneHotConcat`,
`MultiplicativeGating`, `FiLM`, `TaskMoE`) as K tied `ConditionedHead`s so it is still a
(trunk, heads) pair for the engine and the affinity tracker. `build_model(kind, ...)` builds the
ready-made combinations, hard sharing included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtdl_fast.models import MLPTrunk, MultiTaskModel, SmallResNet, _positive_int, linear_heads

# --------------------------------------------------------------------------------------------------
# Task-conditioned single-head models
# --------------------------------------------------------------------------------------------------


def _rows(table: torch.Tensor, task) -> torch.Tensor:
    """table[task]: (D,) for an int or 0-dim tensor, (B, D) for a (B,) tensor. Tensor indices go
    through F.embedding, which (unlike tensor indexing) also runs under grad inside vmap."""
    return table[task] if isinstance(task, int) else F.embedding(task.long(), table)


class TaskConditioned(nn.Module):
    """One classifier shared by all K tasks, conditioned on the task index.

    `forward(features, task)` maps features (B, D) to logits (B, num_classes). `task` is a Python
    int, a 0-dim integer tensor (one task for the whole batch) or a (B,) integer tensor (one task
    per sample). Integer tensors are not range-checked (that would synchronise with the device;
    out-of-range indices fail in the table lookup). Subclasses implement `condition`, the
    task-dependent map features -> classifier input; `self.classifier` is an nn.Linear.
    """

    def __init__(self, in_features: int, num_tasks: int, num_classes: int):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.num_tasks = _positive_int("num_tasks", num_tasks)
        self.num_classes = _positive_int("num_classes", num_classes)

    def _check(self, features: torch.Tensor, task) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must be a (B, {self.in_features}) tensor, "
                f"got {getattr(features, 'shape', type(features).__name__)}"
            )
        if isinstance(task, torch.Tensor):
            if task.dtype.is_floating_point or task.dtype.is_complex or task.dtype == torch.bool:
                raise ValueError(f"task must be an integer tensor, got dtype {task.dtype}")
            if task.ndim > 1 or (task.ndim == 1 and task.shape[0] != features.shape[0]):
                raise ValueError(f"task tensor must be 0-dim or ({features.shape[0]},), got {tuple(task.shape)}")
        elif isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [0, {self.num_tasks}) or an integer tensor, got {task!r}")

    def condition(self, features: torch.Tensor, task) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: torch.Tensor, task) -> torch.Tensor:
        self._check(features, task)
        return self.classifier(self.condition(features, task))


class OneHotConcat(TaskConditioned):
    """logits = classifier(concat(features, one_hot(task, K))): the task as K extra input columns,
    i.e. a learned per-task bias on the logits."""

    def __init__(self, in_features: int, num_tasks: int, num_classes: int):
        super().__init__(in_features, num_tasks, num_classes)
        self.classifier = nn.Linear(in_features + num_tasks, num_classes)

    def condition(self, features: torch.Tensor, task) -> torch.Tensor:
        index = task.unsqueeze(-1) if isinstance(task, torch.Tensor) else task
        # arange == index (not F.one_hot) so this also runs under vmap with a batched task index.
        one_hot = (torch.arange(self.num_tasks, device=features.device) == index).to(features.dtype)
        return torch.cat([features, one_hot.expand(features.shape[0], self.num_tasks)], dim=1)


class MultiplicativeGating(TaskConditioned):
    """features * sigmoid(gate[task]) with a learnable (K, D) gate table, then the classifier.

    The table starts at `init` (default 0: every task gates every feature by 0.5, so all tasks start
    identical and diverge as the table learns)."""

    def __init__(self, in_features: int, num_tasks: int, num_classes: int, init: float = 0.0):
        super().__init__(in_features, num_tasks, num_classes)
        self.gate = nn.Parameter(torch.full((num_tasks, in_features), float(init)))
        self.classifier = nn.Linear(in_features, num_classes)

    def condition(self, features: torch.Tensor, task) -> torch.Tensor:
        return features * torch.sigmoid(_rows(self.gate, task))


class FiLM(TaskConditioned):
    """Feature-wise linear modulation by the task (Perez et al., "FiLM: Visual Reasoning with a
    General Conditioning Layer", AAAI 2018), with per-task tables in place of a conditioning network:
    features * (1 + gamma[task]) + beta[task], then the classifier.

    gamma and beta are learnable (K, D) tables initialised to 0, so the layer starts as the identity
    and the model starts as the unconditioned classifier."""

    def __init__(self, in_features: int, num_tasks: int, num_classes: int):
        super().__init__(in_features, num_tasks, num_classes)
        self.gamma = nn.Parameter(torch.zeros(num_tasks, in_features))
        self.beta = nn.Parameter(torch.zeros(num_tasks, in_features))
        self.classifier = nn.Linear(in_features, num_classes)

    def condition(self, features: torch.Tensor, task) -> torch.Tensor:
        return features * (1 + _rows(self.gamma, task)) + _rows(self.beta, task)


class TaskMoE(TaskConditioned):
    """A small mixture of experts gated by the task (the per-task gating of multi-gate mixtures of
    experts, Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts", KDD 2018, here with a learned gate per task instead of an input-dependent
    gating network), then the shared classifier:

        g = softmax(gate_logits[task]),  out = sum_e g[e] * expert_e(features)

    Expert e is Linear(D, hidden) -> ReLU -> Linear(hidden, out_features); the E experts are held
    as stacked (E, ...) weights and run in one batched contraction. gate_logits (K, E) start at 0
    (the uniform mixture: all tasks start identical).
    """

    def __init__(
        self,
        in_features: int,
        num_tasks: int,
        num_classes: int,
        num_experts: int = 4,
        hidden: int | None = None,
        out_features: int | None = None,
    ):
        super().__init__(in_features, num_tasks, num_classes)
        self.num_experts = _positive_int("num_experts", num_experts)
        hidden = _positive_int("hidden", in_features if hidden is None else hidden)
        out_features = _positive_int("out_features", in_features if out_features is None else out_features)
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out_features))
        self.b2 = nn.Parameter(torch.empty(num_experts, out_features))
        self.gate_logits = nn.Parameter(torch.zeros(num_tasks, num_experts))
        self.classifier = nn.Linear(out_features, num_classes)
        self.reset_experts()

    @torch.no_grad()
    def reset_experts(self) -> None:
        """nn.Linear's default initialisation, expert by expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = w.shape[1] ** -0.5
            w.uniform_(-bound, bound)
            b.uniform_(-bound, bound)

    def condition(self, features: torch.Tensor, task) -> torch.Tensor:
        h = torch.relu(torch.einsum("bd,edh->ebh", features, self.w1) + self.b1.unsqueeze(1))
        experts = torch.einsum("ebh,eho->ebo", h, self.w2) + self.b2.unsqueeze(1)  # (E, B, O)
        g = torch.softmax(_rows(self.gate_logits, task), dim=-1)  # (E,) or (B, E)
        return torch.einsum("e,ebo->bo" if g.ndim == 1 else "be,ebo->bo", g, experts)


class ConditionedHead(nn.Module):
    """Task k's view of a shared `TaskConditioned` head: features -> conditioned(features, k).

    The K heads of a conditioned model all hold the SAME `conditioned` module, so their parameters
    are the same tensors (tied): a change through heads[0] is seen by heads[1], `model.parameters()`
    lists each once, and backward through several heads sums the tasks' gradients into them.

    The task is held as a (non-persistent) buffer, not only as a Python attribute, so that
    `torch.func.stack_module_state(heads)` stacks it with the parameters and a vmap over the
    stacked heads (the AffinityTracker's batched path, which calls heads[0]'s code with head k's
    tensors) gives head k its own task. The buffer is a floating one-hot row `task_code` (K,),
    decoded by argmax: the tracker differentiates with respect to the heads' buffers too, which
    an integer buffer would not allow, and a one-hot code stays exact in any floating dtype.
    """

    def __init__(self, conditioned: TaskConditioned, task: int, num_tasks: int | None = None):
        super().__init__()
        if not isinstance(conditioned, TaskConditioned):
            raise TypeError(f"conditioned must be a TaskConditioned module, got {type(conditioned).__name__}")
        if num_tasks is not None and num_tasks != conditioned.num_tasks:
            raise ValueError(f"num_tasks={num_tasks!r} but the conditioned head has {conditioned.num_tasks} tasks")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < conditioned.num_tasks:
            raise ValueError(f"task must be an int in [0, {conditioned.num_tasks}), got {task!r}")
        self.conditioned = conditioned
        self.task = task
        code = F.one_hot(torch.tensor(task), conditioned.num_tasks).float()
        self.register_buffer("task_code", code, persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conditioned(features, self.task_code.argmax(-1))

    def extra_repr(self) -> str:
        return f"task={self.task}"


class ConditionedModel(MultiTaskModel):
    """A shared trunk and ONE task-conditioned head shared by all tasks, as a (trunk, heads) pair.

    `heads[k]` is `ConditionedHead(head, k)`: K thin wrappers around the same `head`, so the model
    drops into everything that takes (trunk, heads) — the engine and `AffinityTracker`.

    What affinity means here: the tracker's lookahead (TAG, Fifty et al., NeurIPS 2021, Eq. 1)
    updates the trunk's parameters with task i's gradient and holds the heads fixed. The
    conditioning layer and classifier are shared too, but they sit on the heads side, so for a
    conditioned model Z[i, j] measures task i's effect on task j *through the trunk only*, with the
    conditioned head frozen during the lookahead, as TAG prescribes for heads. The tracker's
    stack_module_state copies the tied head parameters once per task, so its per-task head gradients
    are each task's own contribution; `AffinityTracker.apply_gradients` (and ordinary backward over
    the summed loss) adds them into the one shared tensor, i.e. sums them over tasks.

    `task_forward` also accepts a 0-dim or (B,) integer tensor of task indices (per-sample tasks).
    """

    def __init__(self, trunk: nn.Module, head: TaskConditioned):
        if not isinstance(head, TaskConditioned):
            raise TypeError(f"head must be a TaskConditioned module, got {type(head).__name__}")
        super().__init__(trunk, [ConditionedHead(head, k) for k in range(head.num_tasks)])

    @property
    def head(self) -> TaskConditioned:
        """The one conditioned head all K task heads share."""
        return self.heads[0].conditioned

    def task_forward(self, x: torch.Tensor, task) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.ndim < 1:
                raise ValueError(f"x must be a (B, ...) tensor, got {getattr(x, 'shape', type(x).__name__)}")
            return self.head(self.trunk(x), task)
        return super().task_forward(x, task)


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------

MODEL_KINDS = ("hard", "onehot", "gating", "film", "moe")
TRUNKS = ("resnet", "mlp")
_CONDITIONED = {"onehot": OneHotConcat, "gating": MultiplicativeGating, "film": FiLM, "moe": TaskMoE}


def build_model(
    kind: str,
    num_tasks: int,
    num_classes: int,
    in_channels: int,
    image_size: int,
    trunk: str = "resnet",
    width: int = 16,
    *,
    num_experts: int = 4,
) -> MultiTaskModel:
    """A multi-task model for (K, B, in_channels, image_size, image_size) views.

    Args:
        kind: "hard" (K independent linear heads) or a single head shared by all tasks and
            conditioned on the task: "onehot" (`OneHotConcat`), "gating" (`MultiplicativeGating`),
            "film" (`FiLM`), "moe" (`TaskMoE`).
        trunk: "resnet" (`SmallResNet(in_channels, width)`, 4 * width features) or "mlp"
            (`MLPTrunk` with hidden sizes (16 * width, 8 * width)).
        num_experts: experts of the "moe" head.

    Returns:
        `MultiTaskModel` for "hard", `ConditionedModel` otherwise.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if trunk not in TRUNKS:
        raise ValueError(f"trunk must be one of {TRUNKS}, got {trunk!r}")
    for name, value in (("num_tasks", num_tasks), ("num_classes", num_classes), ("in_channels", in_channels),
                        ("image_size", image_size), ("width", width), ("num_experts", num_experts)):
        _positive_int(name, value)
    if trunk == "resnet":
        body: nn.Module = SmallResNet(in_channels, width)
    else:
        body = MLPTrunk(in_channels * image_size * image_size, (16 * width, 8 * width))
    features = body.out_features
    if kind == "hard":
        return MultiTaskModel(body, linear_heads(num_tasks, features, num_classes))
    if kind == "moe":
        return ConditionedModel(body, TaskMoE(features, num_tasks, num_classes, num_experts=num_experts))
    return ConditionedModel(body, _CONDITIONED[kind](features, num_tasks, num_classes))
