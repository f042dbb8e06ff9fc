"""The validation split carved from each client's training data
(``data.validation_fraction``): off, every partition is what it was before; on, it is
disjoint from training and from the test split, sized per class, and seeded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedprompt.config import DataConfig, load_config
from fedprompt.data.partition import ClientPartition, partition, validation_size
from fedprompt.errors import ConfigError

#: the configurations below and the fingerprints of their partitions as computed by the
#: code before the validation split existed (commit 499cccc)
BEFORE = [
    ({"partition": "pathological", "num_clients": 4, "seed": 0}, "feb17fab660d494b"),
    ({"partition": "dirichlet", "num_clients": 5, "dirichlet_alpha": 0.3, "seed": 1},
     "f6f8945e09799674"),
    ({"partition": "iid", "num_clients": 3, "seed": 2}, "9aa5c79a36eb7a62"),
]


def _splits(n_classes: int = 10, per_train: int = 30, per_test: int = 10,
            seed: int = 7) -> Any:
    rng = np.random.default_rng(seed)
    train = rng.permutation(np.repeat(np.arange(n_classes), per_train))
    test = rng.permutation(np.repeat(np.arange(n_classes), per_test))
    return SimpleNamespace(train=SimpleNamespace(labels=train),
                           test=SimpleNamespace(labels=test))


def _fingerprint(parts: list[ClientPartition]) -> str:
    digest = hashlib.sha256()
    for p in parts:
        for array in (p.train, p.local_test, p.neighbor_test, p.classes):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:16]


@pytest.mark.parametrize(("settings", "fingerprint"), BEFORE)
def test_off_leaves_every_partition_as_it_was(settings: dict[str, Any],
                                              fingerprint: str) -> None:
    parts = partition(_splits(), DataConfig(**settings))
    assert _fingerprint(parts) == fingerprint
    assert all(len(p.validation) == 0 and p.validation.dtype == np.int64 for p in parts)
    assert all("validation" not in p.summary() for p in parts)


@pytest.mark.parametrize(("settings", "_"), BEFORE)
@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_on_holds_out_a_stratified_share_of_each_clients_training_data(
        settings: dict[str, Any], _: str, fraction: float) -> None:
    splits = _splits()
    before = partition(splits, DataConfig(**settings))
    after = partition(splits, DataConfig(**settings, validation_fraction=fraction))
    labels = splits.train.labels
    for old, new in zip(before, after, strict=True):
        # carved from the client's own training data, disjoint from what it trains on
        assert np.intersect1d(new.train, new.validation).size == 0
        assert np.array_equal(np.sort(np.concatenate([new.train, new.validation])), old.train)
        # the test split (indices into the test set) is untouched
        assert np.array_equal(new.local_test, old.local_test)
        assert np.array_equal(new.neighbor_test, old.neighbor_test)
        assert np.array_equal(new.classes, old.classes)
        for c in old.classes:
            count = int((labels[old.train] == c).sum())
            held = int((labels[new.validation] == c).sum())
            assert held == validation_size(count, fraction)
            if count >= 2:
                assert 1 <= held <= count - 1
        assert new.summary()["validation"] == len(new.validation)


def test_validation_sizes_per_class() -> None:
    assert [validation_size(n, 0.1) for n in (0, 1, 2, 5, 14, 15, 30)] == [0, 0, 1, 1, 1, 2, 3]
    assert [validation_size(n, 0.5) for n in (1, 2, 3, 4)] == [0, 1, 2, 2]  # half rounds up
    assert validation_size(10, 0.95) == 9  # one always stays in training
    assert validation_size(10, 0.0) == 0


def test_the_validation_split_is_seeded_by_data_seed() -> None:
    splits = _splits()

    def validation(seed: int) -> list[np.ndarray]:
        config = DataConfig(partition="iid", num_clients=3, seed=seed,
                            validation_fraction=0.2)
        return [p.validation for p in partition(splits, config)]

    first, again = validation(4), validation(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = validation(5)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_the_fraction_is_checked() -> None:
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="validation_fraction"):
            load_config(overrides=[f"data.validation_fraction={bad}"])


def test_clients_report_validation_accuracy_and_the_history_averages_it(
        tmp_path: Path) -> None:
    from strategies.inprocess import run_inprocess

    config = load_config(overrides=[
        "backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "train.batch_size=16", "federation.rounds=1", "federation.method='promptfl'",
        "data.num_clients=2", "data.validation_fraction=0.25", f"output_dir='{tmp_path}'"])
    out = run_inprocess(config)
    data = json.loads((out / "metrics.json").read_text())
    record = data["rounds"][-1]
    values = [m["val-accuracy"] for m in record["evaluate"].values()]
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)
    assert all("val-loss" in m for m in record["evaluate"].values())
    assert data["final"]["val_accuracy_mean"] == pytest.approx(np.mean(values))
    assert "val-*" in data["privacy"]["coverage"]["evaluate_reply"]
    assert "val_accuracy_mean" in (out / "rounds.csv").read_text().splitlines()[0]


def test_generative_clients_report_validation_metrics_too() -> None:
    from fedprompt.config import RunConfig
    from fedprompt.federated.generative import open_client_session

    config = RunConfig().with_overrides({
        "backbone.model": "llava-tiny", "data.num_clients": 3, "data.max_train_per_class": 4,
        "federation.method": "promptfl", "prompt.n_ctx": 4, "train.batch_size": 8,
        "data.validation_fraction": 0.25,
    })
    session = open_client_session(config, 1, 3)
    assert len(session.part.validation) > 0
    assert len(session.train_labels) == len(session.part.train)
    metrics = session.evaluate(session.learner.shared_state(), None)
    assert {"val-accuracy", "val-loss", "val-exact-match"} <= set(metrics)
