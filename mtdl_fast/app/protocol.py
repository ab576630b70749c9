"""The grouping analysis ("--protocol paper"): does training the chosen groups beat training every
distribution together and each alone, and does the affinity predict which pairs help each other?

For each of `config.seeds` seeds: all K distributions together (with affinity tracking; the main
run is the first seed's), each alone, every pair, then the TAG groups (from that seed's affinity)
and the HOA groups (Standley et al., ICML 2020, from that seed's pair errors); every model is
evaluated on every distribution, and each task of a grouping is scored by its serving group's
model. Over the seeds every figure gets a mean and a 95% t-interval; differences between settings
are paired by seed. Relatedness signals (TAG's exact affinity, the first-order gradient estimate,
covariance similarity) are compared with the measured pair effects by Spearman rank correlation.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from mtdl_fast.app.signals import RelatednessSignals
from mtdl_fast.app.trainer import Dataset, RunConfig, build_run, evaluate, train
from mtdl_fast.engine import MTDLEngine

SETTINGS = ("each alone", "all together", "TAG groups", "HOA groups")


@dataclasses.dataclass
class SeedOutcome:
    """One seed of the protocol. Accuracies are each task's on its own distribution."""

    seed: int
    alone: np.ndarray          # (K,)
    pair: np.ndarray           # (K, K): task a's accuracy trained with b; diagonal = alone
    together: np.ndarray       # (K,)
    tag: np.ndarray            # (K,) served by its TAG group's model
    hoa: np.ndarray            # (K,) served by its HOA group's model
    tag_groups: list[list[int]]
    hoa_groups: list[list[int]]
    shift: np.ndarray          # (K + 1, K): each alone-model and the together-model on every distribution
    signals: dict[str, np.ndarray]  # relatedness signals (K, K)


def interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the 95% Student t-interval over `axis` (NaN half-width for one sample)."""
    from scipy import stats

    samples = np.asarray(samples, dtype=np.float64)
    n = samples.shape[axis]
    mean = samples.mean(axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    sem = samples.std(axis=axis, ddof=1) / np.sqrt(n)
    return mean, stats.t.ppf(0.975, n - 1) * sem


def pair_effects(pair: np.ndarray, alone: np.ndarray) -> np.ndarray:
    """(K, K) symmetric: how much training a and b together changed both, summed:
    (acc_a with b - acc_a alone) + (acc_b with a - acc_b alone)."""
    gain = pair - alone[:, None]
    np.fill_diagonal(gain, 0.0)
    return gain + gain.T


def rank_agreement(signal: np.ndarray, effects: np.ndarray) -> float:
    """Spearman correlation over the pairs a < b between signal[a, b] + signal[b, a] and the pair effect."""
    from scipy import stats

    upper = np.triu_indices(signal.shape[0], k=1)
    score = (signal + signal.T)[upper]
    if np.ptp(score) == 0 or np.ptp(effects[upper]) == 0:
        return float("nan")  # no ranking to compare
    return float(stats.spearmanr(score, effects[upper]).statistic)


def _train(config: RunConfig, names: Sequence[str], data: Dataset, device: torch.device, label: str) -> MTDLEngine:
    run = build_run(config, names, data, device)
    train(config, run.engine, data, device, label=label, before_step=run.before_step)
    return run.engine


def _served(result_groups: list[list[int]], serving: Sequence[int], config: RunConfig, names: list[str],
            data: Dataset, device: torch.device, x_eval, y_eval, label: str) -> np.ndarray:
    """Each task's accuracy under the model of the group that serves it."""
    per_task = np.zeros(len(names))
    for g, members in enumerate(result_groups):
        group_names = [names[m] for m in members]
        engine = _train(config, group_names, data, device, f"{label} group {g}")
        acc = evaluate(engine, group_names, names, x_eval, y_eval, config.seed)[-1]
        for task in range(len(names)):
            if serving[task] == g:
                per_task[task] = acc[task]
    return per_task


Together = tuple[MTDLEngine, np.ndarray, dict[str, np.ndarray]]


def train_together(config: RunConfig, names: list[str], data: Dataset, device: torch.device, x_eval,
                   y_eval) -> Together:
    """All K tasks in one model with affinity tracking: (engine, accuracy row, other signals)."""
    run = build_run(config, names, data, device)
    signals = RelatednessSignals(config.lr)
    train(config, run.engine, data, device, label=f"seed {config.seed}: all together", before_step=run.before_step,
          after_step=signals.after_step)
    accuracy = evaluate(run.engine, names, names, x_eval, y_eval, config.seed)[-1]
    return run.engine, accuracy, signals.matrices(run.engine, names, x_eval, config.seed)


def run_seed(config: RunConfig, names: list[str], data: Dataset, device: torch.device, x_eval, y_eval,
             together: Together | None = None) -> SeedOutcome:
    """The protocol for `config.seed`; `together` = a finished run on all K tasks with affinity
    tracking (`train_together`), trained here when None."""
    from mtdl_fast.grouping import select_groups

    k = len(names)
    budget = min(config.budget, k)
    if together is None:
        together = train_together(config, names, data, device, x_eval, y_eval)
    engine, together_acc, signals = together
    affinity = engine.tracker.affinity.cpu().numpy()
    tag = select_groups(np.nan_to_num(affinity), budget=budget, names=names)
    plain = dataclasses.replace(config, affinity_every=None)  # sub-runs only need their accuracy
    alone_models = np.stack([
        evaluate(_train(plain, [n], data, device, f"seed {config.seed}: alone {n}"), [n], names, x_eval, y_eval,
                 config.seed)[-1] for n in names])
    pair = np.diag(np.diag(alone_models)).astype(np.float64)
    for a in range(k):
        for b in range(a + 1, k):
            duo = [names[a], names[b]]
            acc = evaluate(_train(plain, duo, data, device, f"seed {config.seed}: pair {'+'.join(duo)}"), duo, duo,
                           x_eval, y_eval, config.seed)[-1]
            pair[a, b], pair[b, a] = acc[0], acc[1]
    hoa = select_groups(1.0 - pair, budget=budget, method="hoa", names=names)
    found = {"TAG exact": affinity, **signals}
    return SeedOutcome(
        seed=config.seed, alone=np.diag(alone_models).copy(), pair=pair, together=np.asarray(together_acc),
        tag=_served(tag.groups, tag.serving, plain, names, data, device, x_eval, y_eval, f"seed {config.seed}: TAG"),
        hoa=_served(hoa.groups, hoa.serving, plain, names, data, device, x_eval, y_eval, f"seed {config.seed}: HOA"),
        tag_groups=tag.groups, hoa_groups=hoa.groups,
        shift=np.vstack([alone_models, np.asarray(together_acc)[None]]), signals=found)


def summarise(outcomes: Sequence[SeedOutcome], names: list[str]) -> dict:
    """Means and 95% intervals over seeds: per setting and distribution, the paired differences of
    the TAG groups against together and alone, and each signal's rank agreement with pair effects."""
    per_setting = {s: np.stack([getattr(o, a) for o in outcomes])
                   for s, a in zip(SETTINGS, ("alone", "together", "tag", "hoa"))}
    with_mean = {s: np.hstack([v, v.mean(1, keepdims=True)]) for s, v in per_setting.items()}  # (seeds, K + 1)
    table = {s: dict(zip(("mean", "ci"), (m.tolist() for m in interval(v)))) for s, v in with_mean.items()}
    differences = {f"TAG groups - {other}": dict(zip(("mean", "ci"), (m.tolist() for m in interval(
        with_mean["TAG groups"] - with_mean[other])))) for other in ("all together", "each alone")}
    agreement = {}
    for signal in outcomes[0].signals:
        rho = np.array([rank_agreement(o.signals[signal], pair_effects(o.pair, o.alone)) for o in outcomes])
        mean, ci = interval(rho[np.isfinite(rho)]) if np.isfinite(rho).any() else (np.nan, np.nan)
        agreement[signal] = {"per_seed": rho.tolist(), "mean": float(mean), "ci": float(ci)}
    return {"columns": [*names, "mean"], "seeds": [o.seed for o in outcomes], "accuracy": table,
            "differences": differences, "rank_agreement": agreement,
            "groups": {o.seed: {"TAG": o.tag_groups, "HOA": o.hoa_groups} for o in outcomes}}


def paper_protocol(config: RunConfig, names: list[str], data: Dataset, device: torch.device,
                   main: Together, x_eval, y_eval) -> dict:
    """The whole analysis over `config.seeds` seeds starting at `config.seed`; `main` is the finished
    main run (`train_together`'s triple), reused as the first seed's together run."""
    outcomes = []
    for offset in range(config.seeds):
        seeded = dataclasses.replace(config, seed=config.seed + offset)
        outcomes.append(run_seed(seeded, names, data, device, x_eval, y_eval, together=main if offset == 0 else None))
    first = outcomes[0]
    shift = {"rows": [f"trained on {n}" for n in names] + ["trained on all"], "cols": names,
             "matrix": np.mean([o.shift for o in outcomes], axis=0),
             "title": f"Distribution shift: accuracy of each trained model on every distribution "
                      f"(mean over {len(outcomes)} seeds)"}
    return {"protocol": summarise(outcomes, names), "pair_error": 1.0 - np.mean([o.pair for o in outcomes], axis=0),
            "hoa_groups": {"groups": first.hoa_groups}, "shift": shift}
