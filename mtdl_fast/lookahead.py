"""TAG lookahead: the optimizer-rule preview, the trunk protocol and the plain reference loop.

`naive_affinity` is the definition the batched tracker is tested against (Fifty et al., NeurIPS
2021, Eq. 1): K autograd.grad calls, K x K forwards, parameters restored. `preview_update` computes
the shared parameters an optimizer step *would* produce from a gradient, for a batch of K
gradients at once, without touching the optimizer's state.

Baselines. ``baseline="tag"`` is TAG's definition, ``Z[i, j] = 1 - L_j(theta + u(g_i)) /
L_j(theta)`` with u(g) the previewed update for gradient g. ``baseline="shared_step"`` measures
each source against the step every source shares, ``Z[i, j] = 1 - L_j(theta + u(g_i)) /
L_j(theta + u(0))``: with momentum, u(0) = -lr * momentum * buffer moves all sources alike and
dominates TAG's ratio; the shared step removes it (K extra target evaluations). For plain SGD
u(0) = 0 and the two coincide.

Task-aware trunks. A trunk with ``task_aware = True`` is called as ``trunk(x, task)`` (task an int
or a 0-dim int64 tensor, possibly vmapped) and names its per-task parameters (e.g. a per-task
alignment matrix) in ``task_parameter_names()``. Those are treated like head parameters: each task
has its own gradient, and the lookahead holds them fixed; only the truly shared parameters move.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BASELINES = ("tag", "shared_step")


def check_baseline(baseline: object) -> str:
    """The baseline name, or ValueError."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    return baseline


def is_task_aware(trunk: nn.Module) -> bool:
    """Whether the trunk takes the task: ``trunk(x, task)``."""
    return getattr(trunk, "task_aware", False) is True


def task_parameter_names(trunk: nn.Module) -> frozenset[str]:
    """Names (as in named_parameters) of a task-aware trunk's per-task parameters; empty otherwise."""
    if not is_task_aware(trunk):
        return frozenset()
    names = frozenset(trunk.task_parameter_names())
    unknown = sorted(names - {n for n, _ in trunk.named_parameters()})
    if unknown:
        raise ValueError(f"trunk.task_parameter_names() names parameters the trunk does not have: {unknown}")
    return names


def trunk_forward(trunk: nn.Module, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
    """trunk(x, task) for a task-aware trunk, trunk(x) otherwise."""
    return trunk(x, task) if is_task_aware(trunk) else trunk(x)


@contextlib.contextmanager
def fixed_randomness(device: torch.device, seed: int | None) -> Iterator[None]:
    """Run the block from the random state `seed` (the CPU's and, for CUDA, `device`'s default
    generator), then put the global random states back.

    Every block run with the same seed draws the same random numbers (the same Dropout masks for
    inputs of the same shape), and the caller's random streams do not move. seed None: no change
    (the block draws from, and advances, the global streams).
    """
    if seed is None:
        yield
        return
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    return None


def check_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """TypeError for an optimizer whose rule the preview does not implement, ValueError for one
    configured in a way it does not (maximize=True)."""
    if optimizer is None:
        return
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"the affinity lookahead previews torch.optim.SGD, Adam or AdamW updates, got "
            f"{type(optimizer).__name__}; preview a plain SGD step instead (MTDLEngine(affinity_lr=...), "
            f"or AffinityTracker(lr=...) without optimizer), or turn affinity off (affinity_every=None)"
        )
    for group in optimizer.param_groups:
        if group.get("maximize", False):
            raise ValueError("optimizer with maximize=True is not supported by the lookahead preview")


def preview_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    lr: float | None = None,
) -> list[torch.Tensor]:
    """The parameters one optimizer step would produce, for K candidate gradients at once.

    Args:
        params: P parameter tensors theta (the current values).
        grads: P tensors of shape (K, *theta.shape): K candidate gradients of each parameter.
        optimizer: SGD (momentum, dampening, Nesterov, weight decay), Adam or AdamW (weight decay,
            amsgrad), previewed from its current state without changing it; None: plain SGD.
        lr: the step size; with an optimizer it replaces the param group's lr when given.

    Returns:
        P tensors (K, *theta.shape): theta' for each of the K gradients. A parameter the optimizer
        does not hold is returned unchanged (the real step would not move it).
    """
    out = []
    for param, g in zip(params, grads):
        p = param.detach()
        if optimizer is None:
            out.append(p - lr * g)
            continue
        group = _group_of(optimizer, param)
        if group is None:
            out.append(p.expand_as(g).clone())
            continue
        step_lr = group["lr"] if lr is None else lr
        state = optimizer.state.get(param, {})
        if isinstance(optimizer, torch.optim.SGD):
            out.append(p - step_lr * _sgd_direction(p, g, group, state))
        else:
            out.append(_adam_step(p, g, group, state, step_lr, optimizer))
    return out


def _sgd_direction(p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
    if group["weight_decay"] != 0:
        g = g + group["weight_decay"] * p
    momentum = group["momentum"]
    if momentum == 0:
        return g
    buf = state.get("momentum_buffer")
    buf = g if buf is None else momentum * buf + (1 - group["dampening"]) * g
    return g + momentum * buf if group["nesterov"] else buf


def _adam_step(
    p: torch.Tensor, g: torch.Tensor, group: dict, state: dict, lr: float, optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    step = float(state["step"]) + 1 if "step" in state else 1.0
    base = p
    if wd != 0:
        if decoupled:
            base = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = state.get("exp_avg", torch.zeros_like(p))
    v = state.get("exp_avg_sq", torch.zeros_like(p))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if group.get("amsgrad", False):
        v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = v.sqrt() / (bias2**0.5) + group["eps"]
    return base - (lr / bias1) * m / denom


class _Restore:
    """Snapshot parameters, buffers and .grad of modules; put them back on exit."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = modules

    def __enter__(self):
        self.tensors = [(t, t.detach().clone()) for m in self.modules for t in list(m.parameters()) + list(m.buffers())]
        self.grads = [(p, None if p.grad is None else p.grad.clone()) for m in self.modules for p in m.parameters()]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
        for p, g in self.grads:
            p.grad = g
        return False


def naive_affinity(
    trunk: nn.Module,
    heads: Sequence[nn.Module],
    views: torch.Tensor,
    targets: torch.Tensor,
    lr: float | None = None,
    loss_fn: LossFn = F.cross_entropy,
    optimizer: torch.optim.Optimizer | None = None,
    per_task_targets: bool | None = None,
    *,
    baseline: str = "tag",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TAG's lookahead affinity by the plain loop (the reference).

    Args:
        trunk: the trunk; its trainable parameters, less a task-aware trunk's per-task ones, are
            the shared parameters theta_s.
        heads: K task heads; head j maps trunk(view_j) to task j's prediction.
        views: (K, B, ...) one input batch per task.
        targets: (B,) shared by all tasks, or (K, B, ...) per task when `per_task_targets`
            (default: per task iff targets.shape[0] == K and targets.ndim >= 2).
        lr, optimizer: the lookahead step (see `preview_update`).
        baseline: "tag" (denominator L_j(theta)) or "shared_step" (L_j(theta + u(0))); see the
            module docstring.
        seed: every forward (base and lookahead, every target) starts from this random state,
            so Dropout draws the same masks in all of them and the global random streams do not
            move; None: each forward draws from the global streams.

    Returns:
        (Z, base, lookahead): Z[i, j] = 1 - lookahead[i, j] / base[j], all float64 (K, K)/(K,);
        base is the baseline's denominator. Parameters, buffers and .grad of the modules are left
        as they were.
    """
    check_baseline(baseline)
    k_tasks = len(heads)
    per_task = per_task_targets if per_task_targets is not None else targets.ndim >= 2 and targets.shape[0] == k_tasks
    tgt = [targets[j] if per_task else targets for j in range(k_tasks)]
    per_task_params = task_parameter_names(trunk)
    params = [p for n, p in trunk.named_parameters() if p.requires_grad and n not in per_task_params]

    def loss(j: int) -> torch.Tensor:
        with fixed_randomness(views.device, seed):
            return loss_fn(heads[j](trunk_forward(trunk, views[j], j)), tgt[j])

    with _Restore([trunk, *heads]):
        base = [loss(j) for j in range(k_tasks)]
        steps = [torch.autograd.grad(base[i], params, retain_graph=True) for i in range(k_tasks)]
        if baseline == "shared_step":
            steps.append(tuple(torch.zeros_like(p) for p in params))
        base_t = torch.stack([b.detach() for b in base]).double()
        lookahead = torch.empty(len(steps), k_tasks, dtype=torch.float64, device=views.device)
        originals = [p.detach().clone() for p in params]
        for i, grads in enumerate(steps):
            new = preview_update(params, [g.unsqueeze(0) for g in grads], optimizer, lr)
            with torch.no_grad():
                for p, v in zip(params, new):
                    p.copy_(v[0])
                for j in range(k_tasks):
                    lookahead[i, j] = loss(j).double()
                for p, v in zip(params, originals):
                    p.copy_(v)
    if baseline == "shared_step":
        base_t, lookahead = lookahead[k_tasks], lookahead[:k_tasks]
    return 1.0 - lookahead / base_t[None, :], base_t, lookahead
