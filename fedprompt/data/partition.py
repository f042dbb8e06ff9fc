"""Client partitions: who trains on what, and what each client is tested on.

Every client gets

* ``train``: indices into the training set;
* ``local_test``: indices into the test set drawn from the client's own distribution
  (personalization, the papers' "local accuracy");
* ``neighbor_test``: the test indices of every *other* client (generalization, the
  papers' "neighbor accuracy").

Splits:

* **pathological** (DP-FPL's split): the classes are shuffled with the seed and dealt
  into ``num_clients`` disjoint groups of near-equal size (``np.array_split``, so every
  class is used even when the class count is not a multiple of the client count). A
  client trains on all training images of its classes; its local test set is all test
  images of its classes and its neighbor test set all test images of the other classes.
  (flwr-datasets' ``PathologicalPartitioner`` lets classes repeat across partitions, so
  it does not give this disjoint split.)
* **dirichlet**: per-class Dirichlet(alpha) proportions over clients, drawn by
  flwr-datasets' ``DirichletPartitioner`` (resampled until every client holds
  ``min_partition_size`` images). Each class's test images are then split in the same
  proportions as its training images, so a client's local test set follows its own
  label distribution.
* **iid**: a seeded uniform split of both sets.

All splits are deterministic for a given seed, disjoint across clients and cover every
image.

**Validation** (``data.validation_fraction > 0``, for hyperparameter search that never
looks at a test split): after the split, each client holds out that share of its own
training examples as ``validation``, per class: a class of which the client has ``n >= 2``
examples gives ``min(n - 1, max(1, round(fraction * n)))`` of them (so at least one, and
at least one stays in training), a class with a single example gives none. The choice is
seeded by ``data.seed`` and the client id, from a generator of its own, so the split
itself (and every partition with the fraction at 0) is unchanged; ``train`` then excludes
the validation examples, and ``classes`` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedprompt.config import DataConfig
from fedprompt.data.datasets import DataSplits
from fedprompt.errors import DataError


@dataclass(frozen=True)
class ClientPartition:
    client_id: int
    train: np.ndarray
    local_test: np.ndarray
    neighbor_test: np.ndarray
    classes: np.ndarray  # classes present in the client's training data
    #: indices into the training set held out from ``train`` for validation (empty: off)
    validation: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def summary(self) -> dict[str, int | list[int]]:
        summary: dict[str, int | list[int]] = {
            "client": self.client_id,
            "train": len(self.train),
            "local_test": len(self.local_test),
            "neighbor_test": len(self.neighbor_test),
            "classes": self.classes.tolist(),
        }
        if len(self.validation):
            summary["validation"] = len(self.validation)
        return summary


#: mixed into the validation generator's seed, apart from the split's own generator
_VALIDATION_STREAM = 0x76616C  # "val"


def validation_size(count: int, fraction: float) -> int:
    """How many of a client's ``count`` examples of one class are held out for validation:
    ``round(fraction * count)``, at least 1 and at most ``count - 1`` (none of a single
    example, so that every class the client has stays in its training data)."""
    if fraction <= 0 or count < 2:
        return 0
    return min(count - 1, max(1, int(np.floor(fraction * count + 0.5))))


def carve_validation(part: ClientPartition, train_labels: np.ndarray, fraction: float,
                     seed: int) -> ClientPartition:
    """``part`` with a stratified share ``fraction`` of its training examples moved to
    ``validation`` (:func:`validation_size` per class), chosen with ``seed``."""
    if fraction <= 0:
        return part
    rng = np.random.default_rng([seed, _VALIDATION_STREAM, part.client_id])
    labels = train_labels[part.train]
    held = [rng.permutation(part.train[labels == c])[:validation_size(
        int((labels == c).sum()), fraction)] for c in np.unique(labels)]
    validation = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    train = np.setdiff1d(part.train, validation, assume_unique=True)
    return replace(part, train=train, validation=validation.astype(np.int64))


def _finish(train_parts: list[np.ndarray], test_parts: list[np.ndarray],
            train_labels: np.ndarray, how: str) -> list[ClientPartition]:
    partitions = []
    all_test = [np.sort(p.astype(np.int64)) for p in test_parts]
    for cid, (train, local_test) in enumerate(zip(train_parts, all_test, strict=True)):
        train = np.sort(train.astype(np.int64))
        if len(train) == 0:
            raise DataError(
                f"the {how} split leaves client {cid} with no training data: use fewer "
                "clients (data.num_clients), a larger data.dirichlet_alpha, or more data"
            )
        if len(local_test) == 0:
            raise DataError(
                f"the {how} split leaves client {cid} with no local test images: its classes "
                "have no test images. Use fewer clients (data.num_clients) or add test images"
            )
        others = [all_test[j] for j in range(len(all_test)) if j != cid]
        neighbor = np.sort(np.concatenate(others)) if others else np.empty(0, np.int64)
        partitions.append(ClientPartition(cid, train, local_test, neighbor,
                                          np.unique(train_labels[train])))
    return partitions


def pathological_split(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int,
                       seed: int) -> list[ClientPartition]:
    """Disjoint class groups per client (DP-FPL's pathological split)."""
    classes = np.unique(train_labels)
    if num_clients > len(classes):
        raise DataError(
            f"a pathological split gives each client classes of its own, so it needs at least "
            f"as many classes ({len(classes)}) as clients ({num_clients}): lower "
            "data.num_clients or use data.partition='dirichlet'"
        )
    rng = np.random.default_rng(seed)
    groups = np.array_split(rng.permutation(classes), num_clients)
    train_parts = [np.flatnonzero(np.isin(train_labels, g)) for g in groups]
    test_parts = [np.flatnonzero(np.isin(test_labels, g)) for g in groups]
    return _finish(train_parts, test_parts, train_labels, "pathological")


def _split_like(indices: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[
    np.ndarray
]:
    """Split ``indices`` into ``len(counts)`` parts proportional to ``counts`` (largest
    remainder rounding)."""
    total = counts.sum()
    shuffled = rng.permutation(indices)
    if total == 0:
        return [np.empty(0, np.int64) for _ in counts]
    exact = counts / total * len(indices)
    sizes = np.floor(exact).astype(np.int64)
    remainder = len(indices) - sizes.sum()
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    return np.split(shuffled, np.cumsum(sizes)[:-1])


def dirichlet_split(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int,
                    alpha: float, min_partition_size: int, seed: int) -> list[ClientPartition]:
    """Dirichlet(alpha) label skew (flwr-datasets), test split in the same proportions."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    if num_clients * min_partition_size > len(train_labels):
        raise DataError(
            f"{num_clients} clients x min_partition_size {min_partition_size} exceeds the "
            f"{len(train_labels)} training images: lower data.num_clients or "
            "data.min_partition_size"
        )
    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha,
        min_partition_size=min_partition_size, self_balancing=False, shuffle=True, seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"label": train_labels.tolist(), "index": list(range(len(train_labels)))}
    )
    try:
        train_parts = [
            np.asarray(partitioner.load_partition(cid)["index"], dtype=np.int64)
            for cid in range(num_clients)
        ]
    except ValueError as exc:
        raise DataError(
            f"the Dirichlet split (alpha={alpha}) could not give every client "
            f"{min_partition_size} images: {exc}. Raise data.dirichlet_alpha, lower "
            "data.num_clients or data.min_partition_size"
        ) from exc
    rng = np.random.default_rng(seed)
    test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(test_labels):
        counts = np.array([(train_labels[p] == label).sum() for p in train_parts])
        pieces = _split_like(np.flatnonzero(test_labels == label), counts, rng)
        for cid, piece in enumerate(pieces):
            test_parts[cid].append(piece)
    merged = [np.concatenate(p) if p else np.empty(0, np.int64) for p in test_parts]
    return _finish(train_parts, merged, train_labels, "Dirichlet")


def iid_split(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int,
              seed: int) -> list[ClientPartition]:
    rng = np.random.default_rng(seed)
    train_parts = np.array_split(rng.permutation(len(train_labels)), num_clients)
    test_parts = np.array_split(rng.permutation(len(test_labels)), num_clients)
    return _finish(list(train_parts), list(test_parts), train_labels, "iid")


def partition(splits: DataSplits, config: DataConfig) -> list[ClientPartition]:
    """The client partitions a run's ``[data]`` section asks for (seeded by
    ``config.seed``), each with its validation split where ``data.validation_fraction >
    0``."""
    seed = config.seed
    train, test = splits.train.labels, splits.test.labels
    n = config.num_clients
    if n > len(train):
        raise DataError(f"{n} clients but only {len(train)} training images: lower "
                        "data.num_clients")
    if config.partition == "pathological":
        parts = pathological_split(train, test, n, seed)
    elif config.partition == "dirichlet":
        parts = dirichlet_split(train, test, n, config.dirichlet_alpha,
                                config.min_partition_size, seed)
    else:
        parts = iid_split(train, test, n, seed)
    if config.validation_fraction > 0:
        parts = [carve_validation(p, train, config.validation_fraction, seed) for p in parts]
    return parts
