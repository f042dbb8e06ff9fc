"""Epoch time with cached image features vs re-encoding images every epoch.

    python experiments/benchmarks/feature_cache.py [--dataset PATH|digits]
                                                   [--models clip-tiny effnet-minilm]
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


def measure(model: str, dataset: str, epochs: int, batch_size: int) -> dict:
    backbone = build_backbone(BackboneConfig(model=model, device="cpu"))
    splits = load_dataset(DataConfig(dataset=dataset))
    train_config = TrainConfig(batch_size=batch_size)

    def trainer() -> LocalTrainer:
        learner = build_prompt_learner(PromptConfig(learner="coop", n_ctx=8), backbone,
                                       len(splits.classnames), seed=0)
        classifier = PromptedClassifier(backbone, learner, splits.classnames)
        steps = epochs * -(-len(splits.train) // batch_size)
        return LocalTrainer(classifier, train_config, steps)

    start = time.perf_counter()
    features = FeatureCache(backbone, cache_dir=None, batch_size=64).get(splits.train)
    encode_once = time.perf_counter() - start
    cached = _epoch_times(trainer(), FeatureBatches(features, splits.train.labels, batch_size,
                                                    seed=0), epochs)
    recomputed = _epoch_times(trainer(), ImageBatches(backbone, splits.train, batch_size,
                                                      seed=0), epochs)
    return {"model": model, "train_images": len(splits.train),
            "classes": len(splits.classnames), "encode_once_s": round(encode_once, 4),
            "cached_epoch_s": round(min(cached), 4),
            "recomputed_epoch_s": round(min(recomputed), 4),
            "speedup": round(min(recomputed) / min(cached), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir()
                        else "digits")
    parser.add_argument("--models", nargs="+", default=["clip-tiny", "effnet-minilm"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(m, args.dataset, args.epochs, args.batch_size) for m in args.models]
    print(f"feature cache benchmark: {Path(args.dataset).name} ({rows[0]['train_images']} "
          f"training images, {rows[0]['classes']} classes), CoOp n_ctx 8, batch "
          f"{args.batch_size}, {args.threads} threads, best of {args.epochs} epochs")
    print(f"{'backbone':<16}{'encode once s':>15}{'cached epoch s':>16}"
          f"{'re-encode epoch s':>19}{'speed-up':>10}")
    for r in rows:
        print(f"{r['model']:<16}{r['encode_once_s']:>15.2f}{r['cached_epoch_s']:>16.2f}"
              f"{r['recomputed_epoch_s']:>19.2f}{r['speedup']:>9.1f}x")
    print(json.dumps({"benchmark": "feature_cache", "dataset": Path(args.dataset).name,
                      "batch_size": args.batch_size, "threads": args.threads,
                      "epochs": args.epochs, "cpu_count": os.cpu_count(), "results": rows}))


if __name__ == "__main__":
    main()
