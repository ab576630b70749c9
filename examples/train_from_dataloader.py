"""Train on K distribution tasks whose views are made in DataLoader workers.

Each worker turns its batch of uint8 images into K views (K, B, C, H, W) with the fused CPU path
(`mtdl_fast.loader.KViewCollate`); the main process only trains: `MTDLEngine.step_views` runs the
shared trunk and the K heads on the finished views and measures TAG affinity every few steps.

    python examples/train_from_dataloader.py --epochs 2 --workers 2

Data: scikit-learn's bundled handwritten digits (1797 images), resized to 32 x 32.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import mtdl_fast as mf
from mtdl_fast.app.data import load_digits
from mtdl_fast.loader import KViewCollate
from mtdl_fast.models import SmallResNet, linear_heads


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes making the views")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    images, labels = load_digits(args.size)
    tasks = mf.DistributionTasks(mf.DEFAULT_TASKS, seed=args.seed, mean=[0.5], std=[0.25])
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, collate_fn=KViewCollate(tasks), persistent_workers=args.workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    trunk = SmallResNet(in_channels=1, width=8)
    heads = linear_heads(len(tasks), trunk.out_features, num_classes=10)
    optimizer = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05, momentum=0.9)
    engine = mf.MTDLEngine(tasks, trunk, heads, optimizer, affinity_every=5)
    print(f"{len(tasks)} tasks, views made by {args.workers} workers on the "
          f"{tasks.resolve_backend(images[:1])!r} path")
    for epoch in range(args.epochs):
        start, total, steps = time.perf_counter(), 0.0, 0
        for views, targets, _params in loader:
            loss, _info = engine.step_views(views, targets)
            total += float(loss)
            steps += 1
        print(f"epoch {epoch}: mean loss {total / steps:.3f} over {steps} steps, {time.perf_counter() - start:.1f} s")
    z = engine.tracker.affinity
    names = tasks.names
    print("TAG affinity onto 'identity' (Z[i, 0]), running mean over the tracked steps:")
    for i, name in enumerate(names):
        print(f"  {name:16s} {z[i, 0].item():+.4f}")


if __name__ == "__main__":
    main()
