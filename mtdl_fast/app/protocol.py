"""The paper protocol of the grouping analysis: every distribution trained alone, every pair, all
together and the TAG (and HOA) groups, each model evaluated on every distribution."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtdl_fast.app.trainer import Dataset, RunConfig, build_engine, evaluate, train


def _train_subset(config: RunConfig, names: Sequence[str], data: Dataset, device: torch.device, label: str):
    engine = build_engine(config, names, data, device)
    train(config, engine, data, device, label=label)
    return engine



def paper_protocol(config, names, data, device, together_acc, grouping, x_eval, y_eval) -> dict:
    """Each distribution alone, every pair, all together and the TAG (and HOA) groups, each model
    evaluated on every distribution; each task of a grouping is served by its group's model."""
    from mtdl_fast.grouping import select_groups

    k = len(names)
    alone = np.stack([evaluate(_train_subset(config, [n], data, device, f"alone {n}"), [n], names,
                               x_eval, y_eval, config.seed)[-1] for n in names])
    pair_error = np.zeros((k, k))
    for a in range(k):
        pair_error[a, a] = 1 - alone[a, a]
    for a in range(k):
        for b in range(a + 1, k):
            engine = _train_subset(config, [names[a], names[b]], data, device, f"pair {names[a]}+{names[b]}")
            acc = evaluate(engine, [names[a], names[b]], [names[a], names[b]], x_eval, y_eval, config.seed)[-1]
            pair_error[a, b], pair_error[b, a] = 1 - acc[0], 1 - acc[1]
    hoa = select_groups(pair_error, budget=min(config.budget, k), method="hoa", names=names)

    def grouped(result, label):
        per_task = np.zeros(k)
        for g, members in enumerate(result.groups):
            group_names = [names[m] for m in members]
            engine = _train_subset(config, group_names, data, device, f"{label} group {g}")
            acc = evaluate(engine, group_names, names, x_eval, y_eval, config.seed)[-1]
            for task in range(k):
                if result.serving[task] == g:
                    per_task[task] = acc[task]
        return per_task

    tag_acc, hoa_acc = grouped(grouping, "TAG"), grouped(hoa, "HOA")
    own = np.diag(alone)
    comparison = [
        {"setting": "each alone", "mean_accuracy": float(own.mean()), "per_task": own.tolist()},
        {"setting": "all together", "mean_accuracy": float(together_acc.mean()), "per_task": together_acc.tolist()},
        {"setting": f"TAG groups {grouping.groups}", "mean_accuracy": float(tag_acc.mean()),
         "per_task": tag_acc.tolist()},
        {"setting": f"HOA groups {hoa.groups}", "mean_accuracy": float(hoa_acc.mean()), "per_task": hoa_acc.tolist()},
    ]
    shift = {"rows": [f"trained on {n}" for n in names] + ["trained on all"], "cols": names,
             "matrix": np.vstack([alone, together_acc[None]]),
             "title": "Distribution shift: accuracy of each trained model on every distribution"}
    return {"comparison": comparison, "pair_error": pair_error, "hoa_groups": {"groups": hoa.groups}, "shift": shift}
