from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedprompt.config import DataConfig
from fedprompt.data import (
    FeatureCache,
    digits,
    dirichlet_split,
    iid_split,
    image_folder,
    load_dataset,
    partition,
    pathological_split,
)
from fedprompt.errors import DataError
from tests.conftest import shared_dataset


def _labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def _check_cover_and_disjoint(parts, n_train: int, n_test: int) -> None:
    train = np.concatenate([p.train for p in parts])
    local = np.concatenate([p.local_test for p in parts])
    assert len(train) == len(set(train.tolist())) == n_train  # disjoint, covers all
    assert len(local) == len(set(local.tolist())) == n_test
    for p in parts:
        others = np.concatenate([q.local_test for q in parts if q.client_id != p.client_id])
        assert np.array_equal(np.sort(p.neighbor_test), np.sort(others))


def test_pathological_is_disjoint_by_class_deterministic_and_covering() -> None:
    train, test = _labels(12, 30), _labels(12, 10, seed=1)
    parts = pathological_split(train, test, 5, seed=3)
    _check_cover_and_disjoint(parts, len(train), len(test))
    seen: set[int] = set()
    for p in parts:
        classes = set(p.classes.tolist())
        assert not classes & seen  # no class shared by two clients
        seen |= classes
        assert set(train[p.train].tolist()) == classes
        assert set(test[p.local_test].tolist()) == classes
        assert not set(test[p.neighbor_test].tolist()) & classes
    assert seen == set(range(12))
    again = pathological_split(train, test, 5, seed=3)
    assert all(np.array_equal(a.train, b.train) for a, b in zip(parts, again, strict=True))
    other = pathological_split(train, test, 5, seed=4)
    assert any(not np.array_equal(a.train, b.train) for a, b in zip(parts, other, strict=True))


def test_pathological_needs_as_many_classes_as_clients() -> None:
    with pytest.raises(DataError, match="at least as many classes.*data.num_clients"):
        pathological_split(_labels(3, 5), _labels(3, 2), 4, seed=0)


def test_dirichlet_is_deterministic_covering_and_skewed() -> None:
    train, test = _labels(10, 60), _labels(10, 20, seed=1)
    parts = dirichlet_split(train, test, 4, alpha=0.3, min_partition_size=10, seed=0)
    _check_cover_and_disjoint(parts, len(train), len(test))
    again = dirichlet_split(train, test, 4, alpha=0.3, min_partition_size=10, seed=0)
    assert all(np.array_equal(a.train, b.train) and np.array_equal(a.local_test, b.local_test)
               for a, b in zip(parts, again, strict=True))
    # local test sets follow each client's own label distribution
    for p in parts:
        train_hist = np.bincount(train[p.train], minlength=10) / len(p.train)
        test_hist = np.bincount(test[p.local_test], minlength=10) / len(p.local_test)
        assert np.abs(train_hist - test_hist).sum() < 0.5
    # small alpha: label distributions differ strongly between clients
    hists = [np.bincount(train[p.train], minlength=10) / len(p.train) for p in parts]
    assert max(np.abs(hists[0] - h).sum() for h in hists[1:]) > 0.5


def test_dirichlet_impossible_minimum_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="min_partition_size"):
        dirichlet_split(_labels(2, 5), _labels(2, 2), 4, alpha=0.3, min_partition_size=5,
                        seed=0)


def test_iid_split_covers_everything() -> None:
    train, test = _labels(4, 25), _labels(4, 5)
    _check_cover_and_disjoint(iid_split(train, test, 3, seed=0), len(train), len(test))


def test_a_split_that_leaves_a_client_without_data_is_rejected() -> None:
    train = np.array([0, 0, 1, 1, 2, 2])
    test = np.array([0, 1])  # class 2 has no test images
    with pytest.raises(DataError, match=r"leaves client \d with no local test images.*fewer"):
        pathological_split(train, test, 3, seed=0)
    with pytest.raises(DataError, match="5000 clients but only 1347 training images"):
        partition(digits(), DataConfig(num_clients=5000, partition="iid"))


def test_digits_default_data_set() -> None:
    splits = load_dataset(DataConfig(dataset="digits"))
    assert splits.classnames[:3] == ["zero", "one", "two"]
    assert len(splits.train) + len(splits.test) == 1797
    image = splits.train.images.load(0)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert set(np.unique(splits.test.labels)) == set(range(10))


def _make_tree(root: Path, classes: dict[str, int], size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_without_splits_holds_out_per_class(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"golden_retriever": 8, "tabby-cat": 4})
    splits = image_folder(tmp_path, seed=0, test_fraction=0.25)
    assert splits.classnames == ["golden retriever", "tabby cat"]
    assert np.bincount(splits.test.labels).tolist() == [2, 1]
    assert len(splits.train) == 9
    assert image_folder(tmp_path, seed=0).train.images.paths == splits.train.images.paths


def test_image_folder_with_splits_and_classnames_json(tmp_path: Path) -> None:
    _make_tree(tmp_path / "train", {"n01": 3, "n02": 3})
    _make_tree(tmp_path / "test", {"n01": 1, "n02": 2})
    (tmp_path / "classnames.json").write_text('{"n01": "tench", "n02": "goldfish"}')
    splits = image_folder(tmp_path)
    assert splits.classnames == ["tench", "goldfish"]
    assert (len(splits.train), len(splits.test)) == (6, 3)


def test_empty_class_folder_names_the_folder_and_fix(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a": 3})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty class folder.*/b hold no images.*remove"):
        image_folder(tmp_path)


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*'digits'"):
        load_dataset(DataConfig(dataset=str(tmp_path / "nothing")))


def test_unreadable_images_are_all_named_in_one_error(tmp_path: Path, tiny_backbone) -> None:
    _make_tree(tmp_path, {"a": 4, "b": 4}, size=32)
    (tmp_path / "a" / "1.png").write_bytes(b"this is not a png")
    (tmp_path / "b" / "2.png").write_bytes(b"\x89PNG truncated")
    splits = image_folder(tmp_path, test_fraction=0.25)
    everything = splits.train.images.paths + splits.test.images.paths
    from fedprompt.data import FileImages

    with pytest.raises(DataError) as info:
        from fedprompt.data import encode_image_set

        encode_image_set(tiny_backbone, FileImages(everything))
    message = str(info.value)
    assert "2 unreadable image(s)" in message
    assert str(tmp_path / "a" / "1.png") in message and str(tmp_path / "b" / "2.png") in message
    assert "Replace these files" in message


def test_feature_cache_encodes_once_and_reuses_disk(tmp_path: Path, tiny_backbone) -> None:
    splits = digits()
    small = splits.test.subset(np.arange(20))
    cache = FeatureCache(tiny_backbone, tmp_path)
    first = cache.get(small)
    assert (cache.misses, cache.hits) == (1, 0)
    assert torch.equal(cache.get(small), first) and cache.hits == 1
    fresh = FeatureCache(tiny_backbone, tmp_path)
    assert torch.equal(fresh.get(small), first) and (fresh.misses, fresh.hits) == (0, 1)
    direct = tiny_backbone.encode_images(tiny_backbone.preprocess(
        [small.images.load(i) for i in range(20)]))
    assert torch.allclose(first, direct, atol=1e-6)


def test_shared_flowers_tree_loads() -> None:
    root = shared_dataset("flowers12")
    splits = image_folder(root)
    assert splits.train.num_classes == 12 and (len(splits.train), len(splits.test)) == (720, 240)
    assert "colts foot" in splits.classnames


def test_split_follows_data_seed_only() -> None:
    a = load_dataset(DataConfig(dataset="digits", seed=0))
    b = load_dataset(DataConfig(dataset="digits", seed=0))
    c = load_dataset(DataConfig(dataset="digits", seed=1))
    assert a.test.images.fingerprint() == b.test.images.fingerprint()
    assert a.test.images.fingerprint() != c.test.images.fingerprint()
    parts = partition(a, DataConfig(num_clients=3, seed=5))
    again = partition(a, DataConfig(num_clients=3, seed=5))
    assert all(np.array_equal(p.train, q.train) for p, q in zip(parts, again, strict=True))
