"""One-site prompt learning: the ``fedprompt train`` experiment.

Builds the backbone, data, prompt learner and trainer from one :class:`RunConfig`,
evaluates before training, trains for ``train.epochs`` epochs (evaluating after each),
and writes a results folder:

* ``config.toml``: the resolved configuration (seed included);
* ``metrics.json``: see :data:`METRICS_KEYS`;
* ``privacy_ledger.json``: the run's privacy ledger (non-private here);
* ``accuracy.png``: accuracy per epoch.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedprompt
from fedprompt.backbones import build_backbone
from fedprompt.config import RunConfig
from fedprompt.console import make_progress
from fedprompt.data import (
    FeatureBatches,
    FeatureCache,
    ImageBatches,
    ImageSet,
    load_dataset,
    partition,
)
from fedprompt.data.features import default_cache_dir
from fedprompt.privacy import PrivacyLedger
from fedprompt.prompts import build_prompt_learner
from fedprompt.results import create_run_dir, plot_epoch_accuracy, write_json
from fedprompt.seeding import batch_seed, seed_everything
from fedprompt.training.model import PromptedClassifier
from fedprompt.training.trainer import EvalStats, LocalTrainer

#: Documented keys of ``metrics.json``.
METRICS_KEYS = {
    "schema": "format id, 'fedprompt.local/1'",
    "run": "name, learner, seed, start/end time, seconds, versions, device, backbone identity",
    "data": "dataset, num_classes, classnames, train/test/neighbor sizes, client (or null)",
    "before": "test_accuracy, test_loss (and neighbor_*) with the initial prompt",
    "epochs": "per epoch: epoch, train_loss, train_accuracy (running, during the epoch), "
              "test_accuracy, test_loss, neighbor_accuracy, neighbor_loss, lr, seconds",
    "final": "the last epoch's test/neighbor accuracy and loss, best_test_accuracy, best_epoch",
    "timing": "feature_seconds (encoding/caching images), train_seconds, mean_epoch_seconds",
    "feature_cache": "enabled, hits, misses",
}


@dataclass
class LocalRunResult:
    output_dir: Path
    metrics: dict[str, Any]


@dataclass
class _Sources:
    train: Any
    test: Any
    neighbor: Any | None


def _select(data: ImageSet, indices: np.ndarray | None, name: str) -> ImageSet:
    return data if indices is None else data.subset(indices, name)


def run_local(config: RunConfig, progress: bool = True,
              output_dir: str | Path | None = None) -> LocalRunResult:
    """Run one-site prompt learning as configured; returns the results folder + metrics."""
    started = time.time()
    seed_everything(config.seed)
    out = create_run_dir(config, output_dir)
    backbone = build_backbone(config.backbone)
    splits = load_dataset(config.data)
    train_idx = test_idx = neighbor_idx = None
    client = config.data.client
    if config.data.client >= 0:
        part = partition(splits, config.data)[config.data.client]
        train_idx, test_idx = part.train, part.local_test
        neighbor_idx = part.neighbor_test if len(part.neighbor_test) else None

    learner = build_prompt_learner(config.prompt, backbone, len(splits.classnames), config.seed)
    classifier = PromptedClassifier(backbone, learner, splits.classnames)
    cfg_train = config.train
    use_cache = config.data.feature_cache and not cfg_train.augment
    device = backbone.device

    t0 = time.time()
    # With the cache off, features still live in memory for the run (test images are
    # never augmented) but nothing is written to disk.
    cache_dir = (Path(config.data.cache_dir).expanduser() if config.data.cache_dir
                 else default_cache_dir()) if config.data.feature_cache else None
    cache = FeatureCache(backbone, cache_dir, config.backbone.image_batch_size, progress)
    test_all = cache.get(splits.test)

    def eval_batches(indices: np.ndarray | None) -> FeatureBatches:
        feats = test_all if indices is None else test_all[torch.as_tensor(indices)]
        labels = splits.test.labels if indices is None else splits.test.labels[indices]
        return FeatureBatches(feats, labels, cfg_train.eval_batch_size, shuffle=False,
                              device=device)

    if use_cache:
        train_all = cache.get(splits.train)
        feats = train_all if train_idx is None else train_all[torch.as_tensor(train_idx)]
        labels = splits.train.labels if train_idx is None else splits.train.labels[train_idx]
        train_batches: Any = FeatureBatches(feats, labels, cfg_train.batch_size, shuffle=True,
                                            seed=batch_seed(config.seed, max(0, client)),
                                            device=device)
    else:
        train_batches = ImageBatches(backbone, _select(splits.train, train_idx, "train"),
                                     cfg_train.batch_size, shuffle=True,
                                     seed=batch_seed(config.seed, max(0, client)),
                                     augment=cfg_train.augment)
    sources = _Sources(train_batches, eval_batches(test_idx),
                       eval_batches(neighbor_idx) if neighbor_idx is not None else None)
    feature_seconds = time.time() - t0

    trainer = LocalTrainer(classifier, cfg_train, cfg_train.epochs * len(train_batches))

    def evaluate() -> dict[str, float | int]:
        stats = trainer.evaluate(sources.test).as_dict("test_")
        if sources.neighbor is not None:
            stats.update(trainer.evaluate(sources.neighbor).as_dict("neighbor_"))
        return stats

    before = evaluate()
    epochs: list[dict[str, Any]] = []
    t_train = time.time()
    with make_progress(progress) as bar:
        epoch_task = bar.add_task("epochs", total=cfg_train.epochs,
                                  info=f"test acc {before['test_accuracy']:.3f}")
        step_task = bar.add_task("steps", total=len(train_batches), info="")
        for epoch in range(1, cfg_train.epochs + 1):
            t_epoch = time.time()
            bar.reset(step_task, total=len(train_batches))
            lr = trainer.lr
            stats = trainer.train_epoch(
                train_batches,
                on_step=lambda loss, acc: bar.update(
                    step_task, advance=1, info=f"loss {loss:.3f} acc {acc:.3f}"
                ),
            )
            record = {"epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                      "lr": lr, **evaluate(), "seconds": time.time() - t_epoch}
            epochs.append(record)
            bar.update(epoch_task, advance=1, info=f"test acc {record['test_accuracy']:.3f}")
    train_seconds = time.time() - t_train

    best = max(epochs, key=lambda e: e["test_accuracy"])
    last = epochs[-1]
    metrics = {
        "schema": "fedprompt.local/1",
        "run": {
            "name": config.name, "learner": config.prompt.learner, "seed": config.seed,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": time.time() - started, "fedprompt": fedprompt.__version__,
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "backbone": backbone.identity(),
        },
        "data": {
            "dataset": config.data.dataset, "num_classes": len(splits.classnames),
            "classnames": splits.classnames,
            "train_size": len(train_idx) if train_idx is not None else len(splits.train),
            "test_size": sources.test.labels.numel(),
            "neighbor_test_size": sources.neighbor.labels.numel() if sources.neighbor else 0,
            "client": config.data.client if config.data.client >= 0 else None,
        },
        "before": before,
        "epochs": epochs,
        "final": {k: v for k, v in last.items() if k.startswith(("test_", "neighbor_"))}
        | {"train_accuracy": last["train_accuracy"],
           "best_test_accuracy": best["test_accuracy"], "best_epoch": best["epoch"]},
        "timing": {"feature_seconds": feature_seconds, "train_seconds": train_seconds,
                   "mean_epoch_seconds": train_seconds / len(epochs)},
        "feature_cache": {"enabled": use_cache, "hits": cache.hits, "misses": cache.misses},
    }
    write_json(out / "metrics.json", metrics)
    PrivacyLedger.write_all([PrivacyLedger(party="client")], out / "privacy_ledger.json")
    plot_epoch_accuracy(metrics, out / "accuracy.png")
    return LocalRunResult(out, metrics)


__all__ = ["METRICS_KEYS", "EvalStats", "LocalRunResult", "run_local"]
