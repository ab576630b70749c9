"""Relatedness signals a run reports beside TAG's exact affinity, so a reader can see which one
predicts transfer: the first-order estimate and the covariance similarity.

- first order: Z_fo[i, j] = lr <g_i, g_j> / L_j (the lookahead's first-order Taylor term), from
  the per-task gradients each exact affinity step computes anyway (no extra passes), averaged over
  the same steps as Z;
- covariance similarity (Wu, Zhang & Re, ICLR 2020) of the K views of the evaluation images, on
  the inputs (training-free) and on the trained trunk's features.
"""
from __future__ import annotations

import numpy as np
import torch

from mtdl_fast import reductions
from mtdl_fast.engine import MTDLEngine
from mtdl_fast.lookahead import trunk_forward
from mtdl_fast.research.covariance import covariance_similarity_matrix
from mtdl_fast.tasks import DistributionTasks


class RelatednessSignals:
    """Collects the signals over one run: `after_step` during training, `matrices` at the end."""

    def __init__(self, lr: float):
        self.lr = lr
        self._total: torch.Tensor | None = None
        self._steps = 0

    def after_step(self, engine: MTDLEngine, info: dict) -> None:
        """After an engine step: fold in this step's first-order estimate when it tracked affinity."""
        tracker = engine.tracker
        if info.get("affinity") is None or tracker is None or tracker.last_task_grads is None:
            return
        grads = tracker.last_task_grads["shared"]
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        z = self.lr * reductions.gram(flat) / tracker.last_losses.to(torch.float64)[None, :]
        if not bool(torch.isfinite(z).all()):  # a skipped step: as the exact affinity does
            return
        self._total = z if self._total is None else z + self._total.to(z.device)  # stays on the device
        self._steps += 1

    def state_dict(self) -> dict:
        return {"total": None if self._total is None else self._total.cpu(), "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self._total = state["total"]
        self._steps = int(state["steps"])

    @torch.no_grad()
    def matrices(self, engine: MTDLEngine, names: list[str], x_eval: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
        """{signal name: (K, K) float64} for the trained engine on the evaluation images."""
        out = {}
        if self._steps:
            out["first order"] = (self._total / self._steps).cpu().numpy()
        views = DistributionTasks(names, seed=seed + 1)(x_eval)
        out["covariance (inputs)"] = covariance_similarity_matrix(views).cpu().numpy()
        trunk = engine.trunk
        training = trunk.training
        trunk.eval()
        with engine.autocast():
            features = torch.stack([trunk_forward(trunk, views[k], k).float() for k in range(len(names))])
        trunk.train(training)
        out["covariance (trunk features)"] = covariance_similarity_matrix(features).cpu().numpy()
        return out
