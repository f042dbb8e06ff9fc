"""Image + question + answer records, for generative backbones (LLaVA).

Two sources give a :class:`QASplits` (train and test :class:`QASet`):

* a **JSONL folder** (free-form answers, ``task.kind = "answer"``)::

      <root>/train.jsonl        one record per line
      <root>/test.jsonl         (or only <root>/data.jsonl: a seeded test_fraction is held out)
      <root>/<images...>        paths in the records are relative to <root>

  Each line is a JSON object ``{"image": "rel/path.png", "question": "...",
  "answer": "..."}``; other keys are ignored. Blank lines are skipped. Errors name the
  file and line.

* any **labelled image set** (``digits``, an ImageFolder tree): classification as
  generation, every image asked ``task.question`` and answered with its class name
  (:func:`classification_qa`).

``labels`` are class indices (classification) or indices of the distinct answers
(JSONL), so the client partitions of :mod:`fedprompt.data.partition` apply unchanged
(``data.partition = "iid"`` suits free-form answers; ``pathological`` deals answers).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedprompt.data.datasets import DataSplits, FileImages, ImageSet, ImageSource
from fedprompt.errors import DataError

REQUIRED_KEYS = ("image", "question", "answer")


@dataclass
class QASet:
    """Images with one question and one reference answer each."""

    name: str
    images: ImageSource
    questions: list[str]
    answers: list[str]
    labels: np.ndarray  # class index, or index of the answer in ``classnames``
    classnames: list[str]  # class names, or the distinct answers (sorted)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        sizes = {len(self.images), len(self.questions), len(self.answers), len(self.labels)}
        if len(sizes) != 1:
            raise DataError(f"{self.name}: {len(self.images)} images, {len(self.questions)} "
                            f"questions, {len(self.answers)} answers, {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> QASet:
        idx = np.asarray(indices, dtype=np.int64)
        return QASet(self.name, self.images.subset(idx), [self.questions[i] for i in idx],
                     [self.answers[i] for i in idx], self.labels[idx], self.classnames)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.fingerprint().encode())
        digest.update(json.dumps([self.questions, self.answers]).encode())
        return digest.hexdigest()


@dataclass
class QASplits:
    train: QASet
    test: QASet
    kind: str  # "classification" or "jsonl"

    @property
    def classnames(self) -> list[str]:
        return self.train.classnames


def classification_qa(splits: DataSplits, question: str) -> QASplits:
    """Classification as generation: each image is asked ``question``; the answer is its
    class name."""
    if not question.strip():
        raise DataError("task.question is empty: give the question asked about every image")

    def convert(data: ImageSet) -> QASet:
        answers = [data.classnames[int(y)] for y in data.labels]
        return QASet(data.name, data.images, [question] * len(data), answers, data.labels,
                     list(data.classnames))

    return QASplits(convert(splits.train), convert(splits.test), "classification")


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    records = []
    root = path.parent
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object with keys "
                                f"{list(REQUIRED_KEYS)}, got {type(record).__name__}")
            missing = [k for k in REQUIRED_KEYS if not isinstance(record.get(k), str)]
            if missing:
                raise DataError(f"{path}:{number}: missing or non-string key(s) {missing}; "
                                f"every record needs {list(REQUIRED_KEYS)}")
            if not record["answer"].strip():
                raise DataError(f"{path}:{number}: empty answer")
            image = (root / record["image"]).resolve()
            if not image.is_relative_to(root.resolve()):
                raise DataError(f"{path}:{number}: image path {record['image']!r} leaves the "
                                f"data set folder {root}")
            if not image.is_file():
                raise DataError(f"{path}:{number}: image {image} does not exist (paths are "
                                f"relative to {root})")
            records.append({"image": str(image), "question": record["question"],
                            "answer": record["answer"].strip()})
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _to_set(name: str, records: list[dict[str, str]], vocab: list[str]) -> QASet:
    index = {a: i for i, a in enumerate(vocab)}
    return QASet(name, FileImages([Path(r["image"]) for r in records]),
                 [r["question"] for r in records], [r["answer"] for r in records],
                 np.array([index[r["answer"]] for r in records]), vocab)


def jsonl_qa(root: str | Path, seed: int = 0, test_fraction: float = 0.25) -> QASplits:
    """Load a JSONL + image folder (layout in the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"question-answer data set folder {root} does not exist: set "
                        "data.dataset to a folder holding train.jsonl and test.jsonl")
    train_file, test_file, single = root / "train.jsonl", root / "test.jsonl", root / "data.jsonl"
    if train_file.is_file() and test_file.is_file():
        train, test = _read_jsonl(train_file), _read_jsonl(test_file)
    elif single.is_file():
        records = _read_jsonl(single)
        if len(records) < 2:
            raise DataError(f"{single} has {len(records)} record: holding out a test record "
                            "needs at least 2")
        order = np.random.default_rng(seed).permutation(len(records))
        n_test = min(max(1, round(test_fraction * len(records))), len(records) - 1)
        test = [records[i] for i in sorted(order[:n_test])]
        train = [records[i] for i in sorted(order[n_test:])]
    else:
        raise DataError(f"{root} has neither train.jsonl + test.jsonl nor data.jsonl: see "
                        "docs/llava.md for the question-answer data set format")
    vocab = sorted({r["answer"] for r in train + test})
    return QASplits(_to_set(f"{root.name}/train", train, vocab),
                    _to_set(f"{root.name}/test", test, vocab), "jsonl")


def as_label_splits(splits: QASplits) -> DataSplits:
    """A view with ``train.labels`` / ``test.labels`` for :func:`fedprompt.data.partition`."""
    return DataSplits(
        ImageSet(splits.train.name, splits.train.images, splits.train.labels, splits.classnames),
        ImageSet(splits.test.name, splits.test.images, splits.test.labels, splits.classnames),
    )
