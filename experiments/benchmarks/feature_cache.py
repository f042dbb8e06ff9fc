"""Epoch time with cached image features vs re-encoding images every epoch.

    python experiments/benchmarks/feature_cache.py [--dataset PATH|digits] [--model clip-tiny]
                                                   [--epochs 2] [--batch-size 32] [--threads 2]

Both paths train the same learner on the same batches (same seed, same visiting order);
the cached path pays the image encoding once, up front. Prints a table, then as its last
line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from fedprompt.backbones import build_backbone
from fedprompt.config import BackboneConfig, DataConfig, PromptConfig, TrainConfig
from fedprompt.data import FeatureBatches, FeatureCache, ImageBatches, load_dataset
from fedprompt.prompts import build_prompt_learner
from fedprompt.training import LocalTrainer, PromptedClassifier

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "flowers12"


def _epoch_times(trainer: LocalTrainer, batches, epochs: int) -> list[float]:
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        trainer.train_epoch(batches)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir()
                        else "digits")
    parser.add_argument("--model", default="clip-tiny")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backbone = build_backbone(BackboneConfig(model=args.model, device="cpu"))
    splits = load_dataset(DataConfig(dataset=args.dataset))
    train_config = TrainConfig(batch_size=args.batch_size)

    def trainer() -> LocalTrainer:
        learner = build_prompt_learner(PromptConfig(learner="coop"), backbone,
                                       len(splits.classnames), seed=0)
        classifier = PromptedClassifier(backbone, learner, splits.classnames)
        steps = args.epochs * -(-len(splits.train) // args.batch_size)
        return LocalTrainer(classifier, train_config, steps)

    start = time.perf_counter()
    features = FeatureCache(backbone, cache_dir=None, batch_size=64).get(splits.train)
    encode_once = time.perf_counter() - start
    cached = _epoch_times(trainer(), FeatureBatches(features, splits.train.labels,
                                                    args.batch_size, seed=0), args.epochs)
    recomputed = _epoch_times(trainer(), ImageBatches(backbone, splits.train, args.batch_size,
                                                      seed=0), args.epochs)
    cached_epoch = min(cached)
    recomputed_epoch = min(recomputed)
    ratio = recomputed_epoch / cached_epoch
    rows = [
        ("encode all training images once", encode_once),
        ("epoch on cached features", cached_epoch),
        ("epoch re-encoding images", recomputed_epoch),
    ]
    print(f"feature cache benchmark: {args.model}, {Path(args.dataset).name} "
          f"({len(splits.train)} training images, {len(splits.classnames)} classes), batch "
          f"{args.batch_size}, {args.threads} threads, best of {args.epochs} epochs")
    print(f"{'':<34}{'seconds':>10}")
    for label, value in rows:
        print(f"{label:<34}{value:>10.3f}")
    print(f"{'speed-up per epoch (re-encode / cached)':<44}{ratio:>8.1f}x")
    print(json.dumps({
        "benchmark": "feature_cache", "model": args.model, "dataset": Path(args.dataset).name,
        "train_images": len(splits.train), "classes": len(splits.classnames),
        "batch_size": args.batch_size, "threads": args.threads, "epochs": args.epochs,
        "encode_once_s": round(encode_once, 4), "cached_epoch_s": round(cached_epoch, 4),
        "recomputed_epoch_s": round(recomputed_epoch, 4), "speedup": round(ratio, 2),
        "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
