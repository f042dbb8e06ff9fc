import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from fedprompt.config import RunConfig, TrainConfig, load_config
from fedprompt.data import FeatureBatches
from fedprompt.prompts import HierarchicalPrompt
from fedprompt.training import LocalTrainer, PromptedClassifier, warmup_cosine
from fedprompt.training.run import METRICS_KEYS, run_local

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def _teacher_features(backbone, n_per_class: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Image features that sit near the text features of a random class-specific prompt."""
    gen = torch.Generator().manual_seed(seed)
    teacher = HierarchicalPrompt(4, backbone.ctx_dim, len(CLASSES), generator=gen)
    with torch.no_grad():
        teacher.class_ctx.normal_(0, 0.5, generator=gen)
        text = PromptedClassifier(backbone, teacher, CLASSES).text_features()
    labels = np.repeat(np.arange(len(CLASSES)), n_per_class)
    noise = torch.randn(len(labels), backbone.embed_dim, generator=gen) * 0.02
    return text[torch.as_tensor(labels)] + noise, labels


def test_trainer_learns_through_the_frozen_text_encoder(tiny_backbone) -> None:
    features, labels = _teacher_features(tiny_backbone, 20, seed=0)
    learner = HierarchicalPrompt(4, tiny_backbone.ctx_dim, len(CLASSES),
                                 generator=torch.Generator().manual_seed(1))
    classifier = PromptedClassifier(tiny_backbone, learner, CLASSES)
    config = TrainConfig(optimizer="adamw", lr=0.05, weight_decay=0.0, epochs=15)
    batches = FeatureBatches(features, labels, 16, seed=0)
    trainer = LocalTrainer(classifier, config, total_steps=15 * len(batches))
    eval_batches = FeatureBatches(features, labels, 100, shuffle=False)
    before = trainer.evaluate(eval_batches)
    for _ in range(15):
        trainer.train_epoch(batches)
    after = trainer.evaluate(eval_batches)
    assert before.accuracy < 0.5
    assert after.accuracy > 0.95 and after.loss < before.loss
    assert trainer.steps_taken == 15 * len(batches)
    assert trainer.lr == pytest.approx(0.0, abs=1e-9)  # cosine schedule ran to its end


def test_optimizer_state_round_trips(tiny_backbone) -> None:
    features, labels = _teacher_features(tiny_backbone, 4, seed=2)
    learner = HierarchicalPrompt(4, tiny_backbone.ctx_dim, len(CLASSES))
    trainer = LocalTrainer(PromptedClassifier(tiny_backbone, learner, CLASSES),
                           TrainConfig(), total_steps=10)
    trainer.train_epoch(FeatureBatches(features, labels, 8))
    state = trainer.state_dict()
    other = LocalTrainer(PromptedClassifier(tiny_backbone, learner, CLASSES), TrainConfig(),
                         total_steps=10)
    other.load_state_dict(state)
    assert other.steps_taken == trainer.steps_taken and other.lr == trainer.lr
    momentum = trainer.optimizer.state[learner.class_ctx]["momentum_buffer"]
    assert torch.equal(other.optimizer.state[learner.class_ctx]["momentum_buffer"], momentum)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def _small_run(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(overrides=["backbone.model='clip-tiny'", "train.epochs=2",
                                  "data.max_train_per_class=8",
                                  "prompt.n_ctx=4", f"output_dir='{tmp_path}'", *overrides])


def test_run_writes_a_complete_results_folder(tmp_path: Path) -> None:
    config = _small_run(tmp_path, "name='unit'")
    result = run_local(config, progress=False)
    out = result.output_dir
    assert out.parent == tmp_path and out.name.startswith("unit-")
    assert {p.name for p in out.iterdir()} == {
        "config.toml", "metrics.json", "privacy_ledger.json", "accuracy.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(metrics)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["data"]["train_size"] == 80 and metrics["data"]["num_classes"] == 10
    assert 0.0 <= metrics["before"]["test_accuracy"] <= 1.0
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert load_config(out / "config.toml") == config and resolved["seed"] == config.seed
    ledger = json.loads((out / "privacy_ledger.json").read_text())["ledgers"][0]
    assert ledger["private"] is False and ledger["epsilon"] is None
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_numbers_and_cache_equals_recompute(tmp_path: Path) -> None:
    cached = run_local(_small_run(tmp_path), progress=False).metrics
    again = run_local(_small_run(tmp_path), progress=False).metrics
    recomputed = run_local(_small_run(tmp_path, "data.feature_cache=false"),
                           progress=False).metrics
    assert cached["epochs"] == [e | {"seconds": e2["seconds"]}
                                for e, e2 in zip(again["epochs"], cached["epochs"], strict=True)]
    assert cached["feature_cache"]["enabled"] and not recomputed["feature_cache"]["enabled"]
    for a, b in zip(cached["epochs"], recomputed["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)


def test_one_site_run_on_a_client_partition_reports_neighbor_accuracy(tmp_path: Path) -> None:
    config = _small_run(tmp_path, "data.num_clients=2", "data.client=1",
                        "prompt.learner='dpfpl'", "prompt.rank=2")
    metrics = run_local(config, progress=False).metrics
    assert metrics["data"]["client"] == 1
    assert metrics["data"]["train_size"] == 40  # 5 of the 10 classes x 8 images
    assert metrics["data"]["test_size"] + metrics["data"]["neighbor_test_size"] == 450
    assert "neighbor_accuracy" in metrics["final"]


def test_augmentation_trains_on_the_fly(tmp_path: Path) -> None:
    metrics = run_local(_small_run(tmp_path, "train.augment=true", "train.epochs=1"),
                        progress=False).metrics
    assert metrics["feature_cache"]["enabled"] is False
    assert np.isfinite(metrics["epochs"][0]["train_loss"])
