"""Loss weighting strategies of the multi-task literature, on the engine's `Weighting` contract
(`mtdl_fast.weighting`: `forward`, `weights`, `step_end`, `linear`, `last_weights`).

    weighting = make_weighting("dwa", num_tasks=K)
    engine = MTDLEngine(tasks, trunk, heads, optimizer, weighting=weighting)

Static weights, min-max (worst task, and its smooth log-sum-exp form), uncertainty weighting
(Kendall et al.), dynamic weight average (Liu et al.), SVD reweighting (Wu, Zhang & Re) and
uniform task sampling. Each class states its formula and citation.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtdl_fast.weighting import Sum, Weighting, _check_count, _weight_dtype

__all__ = [
    "DynamicWeightAverage",
    "MinMax",
    "SVDReweighting",
    "Static",
    "Sum",
    "UncertaintyWeighting",
    "UniformTaskSampling",
    "WEIGHTINGS",
    "Weighting",
    "make_weighting",
]


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive finite number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


class Static(Weighting):
    """Fixed user weights: total = sum_k w_k L_k.

    ``weights``: K non-negative finite numbers, not all zero (a sequence or a 1-D tensor). They are
    used as given, not renormalised. ``num_tasks``, when given, must equal ``len(weights)``.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, num_tasks: int | None = None) -> None:
        try:
            w = torch.as_tensor(weights, dtype=torch.float64).detach().clone().cpu()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"weights must be a sequence of K numbers, got {weights!r}") from err
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {tuple(w.shape)}")
        if num_tasks is not None and _check_count("num_tasks", num_tasks) != w.numel():
            raise ValueError(
                f"weights must have num_tasks = {num_tasks} entries, got {w.numel()}: {w.tolist()}"
            )
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights must be non-negative and finite, got {w.tolist()}")
        if not (w > 0).any():
            raise ValueError(f"weights must not all be zero, got {w.tolist()}")
        super().__init__(w.numel())
        self.register_buffer("static_weights", w)

    def _weights(self, losses, **context):
        return self.static_weights

    def extra_repr(self) -> str:
        return f"weights={self.static_weights.tolist()}"


# ---------------------------------------------------------------------------------------------
# MinMax


class MinMax(Weighting):
    """Minimise the worst task: total = max_k L_k.

    Hard (``temperature=None``, default): weights are the one-hot of argmax_k L_k (the first index
    on ties) and ``forward`` is ``(onehot * L).sum()``, which equals max_k L_k, so the gradient
    flows to the worst task only; ``linear`` is True.

    Smooth (``temperature=t > 0``): total = t * logsumexp(L / t), a soft maximum with
    max_k L_k <= total <= max_k L_k + t log K, and weights = softmax(L / t). The total is not a
    fixed weighted sum of the losses (t * logsumexp(L/t) != sum_k softmax(L/t)_k L_k in general),
    so ``linear`` is False and the engine backpropagates ``forward()``. Note that
    d total / d L_k = softmax(L/t)_k = weights_k, so combining per-task gradients with
    ``weights()`` does give the gradient of the smooth total; only its value differs from the
    weighted sum.
    """

    def __init__(self, num_tasks: int, temperature: float | None = None) -> None:
        super().__init__(num_tasks)
        self.temperature = None if temperature is None else _check_positive("temperature", temperature)
        self.linear = self.temperature is None

    def _weights(self, losses, **context):
        dtype = _weight_dtype(losses)
        if self.temperature is None:
            index = torch.arange(self.num_tasks, device=losses.device)
            return (index == torch.argmax(losses)).to(dtype)
        return torch.softmax(losses.to(dtype) / self.temperature, dim=0)

    def forward(self, losses, **context):
        w = self.weights(losses, **context)
        if self.temperature is None:
            return (w * losses).sum()
        t = self.temperature
        return t * torch.logsumexp(losses.to(w.dtype) / t, dim=0)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"


# ---------------------------------------------------------------------------------------------
# Uncertainty weighting


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    One learnable log-variance per task, s_k = log sigma_k^2 (``log_vars``, initialised to
    ``init_log_var``, 0 by default). The paper's objectives, written with s_k:

    - regression (Gaussian likelihood, its Eq. 7):   1/(2 sigma^2) L + log sigma = 1/2 exp(-s) L + 1/2 s
    - classification (softmax likelihood, Eq. 10):   1/sigma^2 L + log sigma     = exp(-s) L + 1/2 s

    ``variant="default"`` (used unless asked otherwise) is the common parameterisation
    total = sum_k exp(-s_k) L_k + s_k, i.e. twice the regression form: same minimiser
    s_k* = log L_k for a fixed L_k, gradient twice as large. ``variant="regression"`` and
    ``variant="classification"`` give the paper's forms exactly (minimisers log(L_k) and
    log(2 L_k) respectively).

    ``weights()`` returns the coefficient of each L_k, detached: exp(-s) (default and
    classification) or exp(-s)/2 (regression). ``linear`` is False: ``log_vars`` learn through
    the backward of ``forward()``, so the engine must backpropagate it and must include
    ``weighting.parameters()`` in its optimizer.

    A non-finite loss yields a non-finite total (and non-finite gradients for ``log_vars``); the
    engine skips such steps, which leaves ``log_vars`` untouched.
    """

    linear = False
    VARIANTS = {"default": (1.0, 1.0), "regression": (0.5, 0.5), "classification": (1.0, 0.5)}

    def __init__(self, num_tasks: int, init_log_var: float = 0.0, variant: str = "default") -> None:
        super().__init__(num_tasks)
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {sorted(self.VARIANTS)}, got {variant!r}")
        if (
            isinstance(init_log_var, bool)
            or not isinstance(init_log_var, numbers.Real)
            or not math.isfinite(init_log_var)
        ):
            raise ValueError(f"init_log_var must be a finite number, got {init_log_var!r}")
        self.variant = variant
        self.loss_scale, self.reg_scale = self.VARIANTS[variant]
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init_log_var)))

    def _weights(self, losses, **context):
        return self.loss_scale * torch.exp(-self.log_vars.detach())

    def forward(self, losses, **context):
        self.weights(losses)  # validates and records last_weights
        s = self.log_vars.to(losses.device)
        dtype = torch.promote_types(losses.dtype, s.dtype)
        s = s.to(dtype)
        return (self.loss_scale * torch.exp(-s) * losses.to(dtype) + self.reg_scale * s).sum()

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, variant={self.variant!r}"


# ---------------------------------------------------------------------------------------------
# Dynamic Weight Average


class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, Eq. 7):

        w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T),   r_k(t-1) = L_k(t-1) / L_k(t-2)

    where L_k(t) is task k's average loss over period t (an epoch in the paper), T the temperature
    (2 by default, as in the paper), and w_k(t) = 1 for the first two periods (t = 1, 2), when no
    ratio is available. The weights sum to K.

    Granularity: ``step_end(losses)`` adds one observation; ``period`` consecutive observations
    are averaged into one period. An engine calling ``step_end`` once per epoch with the epoch's
    mean losses uses ``period=1`` (default); one calling it every step with ``N`` steps per
    epoch reproduces the paper with ``period=N``. A call whose losses are not all finite is
    skipped: it changes nothing and does not count towards the period.

    A zero loss in the denominator is guarded (clamped to the smallest positive float64; 0/0
    reads as ratio 1), and ratios that overflow are clipped, so weights stay finite.

    History lives in buffers (float64), so ``state_dict`` resumes exactly; all updates are
    tensor operations (no host synchronisation).
    """

    def __init__(self, num_tasks: int, temperature: float = 2.0, period: int = 1) -> None:
        super().__init__(num_tasks)
        self.temperature = _check_positive("temperature", temperature)
        self.period = _check_count("period", period)
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros((), dtype=torch.int64))
        # period_losses[0] = L(t-2), period_losses[1] = L(t-1): the last two completed periods
        self.register_buffer("period_losses", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("periods_done", torch.zeros((), dtype=torch.int64))

    def _weights(self, losses, **context):
        older, newer = self.period_losses[0], self.period_losses[1]
        tiny = torch.finfo(torch.float64).tiny
        ratio = newer / older.clamp_min(tiny)
        ratio = torch.where((newer == 0) & (older == 0), torch.ones_like(ratio), ratio)
        logits = torch.nan_to_num(ratio / self.temperature, nan=0.0, posinf=1e300, neginf=-1e300)
        dwa = self.num_tasks * torch.softmax(logits, dim=0)
        return torch.where(self.periods_done >= 2, dwa, torch.ones_like(dwa))

    @torch.no_grad()
    def step_end(self, losses: torch.Tensor) -> None:
        """Record one observation of the losses (skipped when any is non-finite)."""
        losses = self._check_losses(losses)
        obs = losses.detach().to(device=self.loss_sum.device, dtype=torch.float64)
        ok = torch.isfinite(obs).all()
        loss_sum = torch.where(ok, self.loss_sum + obs, self.loss_sum)
        loss_count = self.loss_count + ok.to(torch.int64)
        complete = loss_count >= self.period
        average = loss_sum / loss_count.clamp_min(1).to(torch.float64)
        shifted = torch.stack([self.period_losses[1], average])
        self.period_losses.copy_(torch.where(complete, shifted, self.period_losses))
        self.periods_done.add_(complete.to(torch.int64))
        self.loss_sum.copy_(torch.where(complete, torch.zeros_like(loss_sum), loss_sum))
        self.loss_count.copy_(torch.where(complete, torch.zeros_like(loss_count), loss_count))

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}, period={self.period}"


# ---------------------------------------------------------------------------------------------
# SVD task reweighting


class SVDReweighting(Weighting):
    """SVD-based task reweighting (Wu, Zhang & Ré, "Understanding and Improving Information
    Transfer in Multi-Task Learning", ICLR 2020, Algorithm 2).

    The paper, with shared inputs X and labels y_i: theta_i = X^T y_i; take the rank-r
    approximation U_r D_r V_r^T of [theta_1 ... theta_K]; weight alpha_i = ||theta_i^T U_r||;
    train on sum_i alpha_i L_i. A task whose labels are noisy projects weakly on the principal
    directions shared by the tasks and gets a smaller weight.

    Here each task k has its own view, so X_k = ``features[k]`` ((B, D): the trunk features of
    view k, detached) and theta_k = X_k^T Y_k, flattened to a column of length D*C, where Y_k is:

    - integer targets: the one-hot (B, C) of task k's labels (C = ``num_classes``; when None it is
      read from the targets as max + 1, a host synchronisation per call); a label outside
      [0, C), such as an ignore_index of -100, gives a zero row (the image counts for nothing);
    - floating targets: the targets themselves, (B,) -> (B, 1) or (B, C) (regression labels).

    ``targets`` may be shared by all views ((B,) / (B, C) floating) or per task ((K, B) /
    (K, B, C)). Features with more trailing dimensions ((K, B, ...)) are flattened to (K, B, D).
    ``center=True`` subtracts each view's feature mean over the batch first (off by default, as in
    the paper; useful for non-negative ReLU features whose common mean direction otherwise
    dominates U_1).

    Rank: ``rank`` r >= 1; when r exceeds the rank bound min(K, D*C) it is clamped to it (then
    alpha_k = ||theta_k||, the full norm of its column). Computation: with M = [theta_1 ... theta_K]
    = U S V^T, theta_k^T U_r = (V_r S_r)[k], so alpha_k^2 = sum_{j<=r} s_j^2 V[k, j]^2; this is read
    from the eigendecomposition of the K x K Gram matrix M^T M in float64 (cheap when D*C >> K,
    and independent of the singular vectors' signs).

    Normalisation: weights = K alpha / sum_i alpha (they sum to K, so the scale of the total is
    that of :class:`Sum`; the paper trains on sum_i alpha_i L_i, whose scale depends on the
    features' magnitude). If every alpha is 0, or any is non-finite, the fresh estimate is
    discarded.

    Updates: the weights are recomputed on every ``weights()``/``forward()`` call that receives
    both ``features`` and ``targets``; ``ema`` in [0, 1) blends a fresh estimate into the stored
    one, w <- ema * w + (1 - ema) * fresh (0, default: replace). Calls without features reuse
    the stored weights; before any features were seen the weights are 1. ``linear`` is True.
    The stored weights are buffers, so ``state_dict`` resumes exactly.
    """

    def __init__(
        self,
        num_tasks: int,
        rank: int = 1,
        num_classes: int | None = None,
        ema: float = 0.0,
        center: bool = False,
    ) -> None:
        super().__init__(num_tasks)
        self.rank = _check_count("rank", rank)
        self.num_classes = None if num_classes is None else _check_count("num_classes", num_classes)
        if isinstance(ema, bool) or not isinstance(ema, numbers.Real) or not (0.0 <= float(ema) < 1.0):
            raise ValueError(f"ema must be a number in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self.center = bool(center)
        self.register_buffer("svd_weights", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("has_estimate", torch.zeros((), dtype=torch.bool))

    # -- theta_k = X_k^T Y_k -------------------------------------------------------------------
    def task_vectors(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The (K, D*C) matrix whose row k is theta_k = X_k^T Y_k flattened."""
        K = self.num_tasks
        if not isinstance(features, torch.Tensor) or features.ndim < 3 or features.shape[0] != K:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must have shape (num_tasks={K}, B, D), got {shape}")
        if not features.is_floating_point():
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        B = features.shape[1]
        dtype = torch.promote_types(features.dtype, torch.float32)
        x = features.detach().reshape(K, B, -1).to(dtype)
        if self.center:
            x = x - x.mean(dim=1, keepdim=True)
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        y = targets.detach().to(x.device)
        if y.is_floating_point():
            if y.ndim == 1:  # (B,): one real label per image, shared by the views
                y = y.reshape(1, B, 1).expand(K, -1, -1) if y.shape[0] == B else y
            elif y.ndim == 2 and tuple(y.shape) == (K, B):  # (K, B): per task (wins when K == B == C)
                y = y.unsqueeze(-1)
            elif y.ndim == 2 and y.shape[0] == B:  # (B, C): shared
                y = y.unsqueeze(0).expand(K, -1, -1)
            if y.ndim != 3 or y.shape[0] != K or y.shape[1] != B:
                raise ValueError(
                    f"floating targets must have shape (B,), (B, C), (K, B) or (K, B, C) with K={K}, B={B}, "
                    f"got {tuple(targets.shape)}"
                )
            y = y.to(dtype)
        else:
            if y.ndim == 1:
                y = y.unsqueeze(0).expand(K, -1)
            if y.ndim != 2 or y.shape != (K, B):
                raise ValueError(
                    f"integer targets must have shape (B,) or (K, B) with K={K}, B={B}, "
                    f"got {tuple(targets.shape)}"
                )
            num_classes = self.num_classes if self.num_classes is not None else int(y.max()) + 1
            y = y.long()
            inside = (y >= 0) & (y < num_classes)  # others (e.g. ignore_index -100) count for nothing
            onehot = torch.zeros(K, B, num_classes, device=x.device, dtype=dtype)
            y = onehot.scatter_(2, y.clamp(0, num_classes - 1).unsqueeze(-1), inside.unsqueeze(-1).to(dtype))
        theta = torch.bmm(x.transpose(1, 2), y)  # (K, D, C)
        return theta.reshape(K, -1)

    def alphas(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """alpha_k = ||theta_k^T U_r|| (float64, unnormalised) for these features and targets;
        all zeros when the features are not finite."""
        m = self.task_vectors(features, targets).to(torch.float64)  # rows theta_k
        gram = m @ m.T  # (K, K) = M^T M for M = [theta_1 ... theta_K]
        # eigh raises on non-finite input: a zero Gram gives alpha = 0, which the caller discards
        gram = torch.where(torch.isfinite(gram).all(), gram, torch.zeros_like(gram))
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        r = min(self.rank, self.num_tasks, m.shape[1])
        top_vals = evals[-r:].clamp_min(0)
        top_vecs = evecs[:, -r:]
        return (top_vecs.square() * top_vals).sum(dim=1).sqrt()

    def _weights(self, losses, features=None, targets=None, **context):
        if features is not None:
            if targets is None:
                raise ValueError("targets must be given with features for SVDReweighting")
            alpha = self.alphas(features, targets).to(self.svd_weights.device)
            total = alpha.sum()
            fresh = self.num_tasks * alpha / total
            valid = torch.isfinite(fresh).all() & (total > 0)
            mixed = self.ema * self.svd_weights + (1 - self.ema) * fresh
            blended = torch.where(self.has_estimate, mixed, fresh)
            self.svd_weights.copy_(torch.where(valid, blended, self.svd_weights))
            self.has_estimate.copy_(self.has_estimate | valid)
        return self.svd_weights

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, rank={self.rank}, num_classes={self.num_classes}, "
            f"ema={self.ema}, center={self.center}"
        )


# ---------------------------------------------------------------------------------------------
# Uniform task sampling


class UniformTaskSampling(Weighting):
    """Uniform task sampling: every call draws ``num_sampled`` = m distinct tasks uniformly at
    random (without replacement) and weights them K/m, the others 0.

    Each task is drawn with probability m/K, so E[w_k] = (m/K)(K/m) = 1 and
    E[sum_k w_k L_k] = sum_k L_k: the total is an unbiased estimate of the :class:`Sum` total
    (and the combined gradient of its gradient). ``linear`` is True.

    ``generator``: a ``torch.Generator`` (used as given; a CUDA generator samples on its device),
    an int seed (a new CPU generator with that seed), or None (a new CPU generator seeded from
    torch's global RNG, so ``torch.manual_seed`` makes runs reproducible). The generator's state
    is saved in the state dict (extra state) and restored by ``load_state_dict``, so a resumed
    run draws the same tasks. A state can only be loaded into a generator of the same kind.

    Each ``weights()`` or ``forward()`` call draws anew; call one of them once per step (the
    draw of the last call is in ``last_weights``). A non-finite loss of an unsampled task still
    makes the total non-finite (0 * inf); skip computing unsampled losses where it matters.
    """

    def __init__(
        self, num_tasks: int, num_sampled: int = 1, generator: torch.Generator | int | None = None
    ) -> None:
        super().__init__(num_tasks)
        self.num_sampled = _check_count("num_sampled", num_sampled, 1, num_tasks)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator().manual_seed(seed)
        elif isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(int(generator))
        elif not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Indices of the tasks drawn by one call (advances the generator)."""
        perm = torch.randperm(self.num_tasks, generator=self.generator, device=self.generator.device)
        return perm[: self.num_sampled]

    def _weights(self, losses, **context):
        idx = self.sample().to(losses.device)
        w = torch.zeros(self.num_tasks, device=losses.device, dtype=_weight_dtype(losses))
        return w.index_fill_(0, idx, self.num_tasks / self.num_sampled)

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state(), "generator_device": str(self.generator.device)}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_sampled={self.num_sampled}"


# ---------------------------------------------------------------------------------------------
# factory

WEIGHTINGS: dict[str, type[Weighting]] = {
    "sum": Sum,
    "static": Static,
    "minmax": MinMax,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "svd": SVDReweighting,
    "uniform": UniformTaskSampling,
}


def make_weighting(name: str, num_tasks: int, **kwargs: Any) -> Weighting:
    """Build a strategy by name: one of ``WEIGHTINGS`` ("sum", "static", "minmax",
    "uncertainty", "dwa", "svd", "uniform"); ``kwargs`` go to its constructor ("static" needs
    ``weights=``, whose length must be ``num_tasks``)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; expected one of {', '.join(WEIGHTINGS)}")
    if key == "static":
        if "weights" not in kwargs:
            raise ValueError("weighting 'static' needs weights=[w_1, ..., w_K]")
        return Static(num_tasks=num_tasks, **kwargs)
    return WEIGHTINGS[key](num_tasks, **kwargs)
