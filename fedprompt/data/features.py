"""Image features for training: cached once, or encoded per batch.

With a frozen image tower and no augmentation, an image's feature never changes, so
:class:`FeatureCache` encodes every image once (in memory, and on disk keyed by the
backbone's weights/preprocessing and the images' identity) and training iterates over
:class:`FeatureBatches`. With augmentation on, :class:`ImageBatches` loads, augments and
encodes every batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.console import make_progress
from fedprompt.data.augment import random_resized_crop_flip
from fedprompt.data.datasets import ImageSet, ImageSource
from fedprompt.errors import DataError

Batch = tuple[Tensor, Tensor]


def default_cache_dir() -> Path:
    base = os.environ.get("FEDPROMPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fedprompt"
    )
    return Path(base) / "features"


def _load_batch(images: ImageSource, indices: np.ndarray, bad: list[str],
                rng: np.random.Generator | None) -> list:
    loaded = []
    for i in indices:
        try:
            image = images.load(int(i))
        except DataError as exc:
            bad.append(f"{images.describe(int(i))} ({exc.__cause__ or exc})")
            continue
        loaded.append(random_resized_crop_flip(image, rng) if rng is not None else image)
    return loaded


def _raise_unreadable(bad: list[str]) -> None:
    shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
    raise DataError(
        f"{len(bad)} unreadable image(s): {shown}. Replace these files with valid images or "
        "delete them, then run again"
    )


@torch.no_grad()
def encode_image_set(backbone: VisionLanguageBackbone, images: ImageSource,
                     batch_size: int = 64, progress: bool = False,
                     description: str = "encoding images") -> Tensor:
    """Features ``[N, embed_dim]`` (float32, CPU) of every image. All unreadable images
    are reported together in one :class:`DataError`."""
    chunks, bad = [], []
    with make_progress(progress) as bar:
        task = bar.add_task(description, total=len(images), info="")
        for start in range(0, len(images), batch_size):
            indices = np.arange(start, min(start + batch_size, len(images)))
            loaded = _load_batch(images, indices, bad, None)
            if loaded and not bad:
                chunks.append(backbone.encode_images(backbone.preprocess(loaded)).cpu())
            bar.advance(task, len(indices))
    if bad:
        _raise_unreadable(bad)
    if not chunks:
        return torch.empty(0, backbone.embed_dim)
    return torch.cat(chunks)


class FeatureCache:
    """Image features computed once per (backbone, image set).

    Args:
        backbone: the frozen backbone.
        cache_dir: folder for ``<key>.safetensors`` files; ``None`` keeps them in memory.
    """

    def __init__(self, backbone: VisionLanguageBackbone, cache_dir: Path | None = None,
                 batch_size: int = 64, progress: bool = False) -> None:
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.progress = progress
        self._memory: dict[str, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def key(self, data: ImageSet) -> str:
        identity = json.dumps(self.backbone.identity(), sort_keys=True)
        return hashlib.sha256(f"{identity}|{data.images.fingerprint()}".encode()).hexdigest()

    def get(self, data: ImageSet) -> Tensor:
        key = self.key(data)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir else None
        features = None
        if path is not None and path.is_file():
            stored = load_file(str(path))["features"]
            if stored.shape == (len(data), self.backbone.embed_dim):
                features = stored
                self.hits += 1
        if features is None:
            self.misses += 1
            features = encode_image_set(self.backbone, data.images, self.batch_size,
                                        self.progress, f"encoding {data.name}")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                save_file({"features": features.contiguous()}, str(tmp))
                tmp.replace(path)
        self._memory[key] = features
        return features


def _epoch_order(n: int, rng: np.random.Generator, shuffle: bool) -> np.ndarray:
    return rng.permutation(n) if shuffle else np.arange(n)


class FeatureBatches:
    """Mini-batches ``(features, labels)`` over precomputed features."""

    def __init__(self, features: Tensor, labels: np.ndarray | Tensor, batch_size: int,
                 shuffle: bool = True, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if len(features) != len(labels):
            raise DataError(f"{len(features)} features but {len(labels)} labels")
        self.features = features.to(device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        # Same visiting order as ImageBatches for the same seed, so cached and on-the-fly
        # training see identical batches.
        order = torch.as_tensor(_epoch_order(len(self.labels), self.rng, self.shuffle))
        order = order.to(self.features.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.features[idx], self.labels[idx]


class ImageBatches:
    """Mini-batches ``(features, labels)`` encoded on the fly (optionally augmented)."""

    def __init__(self, backbone: VisionLanguageBackbone, data: ImageSet, batch_size: int,
                 shuffle: bool = True, seed: int = 0, augment: bool = False) -> None:
        self.backbone = backbone
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.augment = augment

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = _epoch_order(len(self.data), self.rng, self.shuffle)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            bad: list[str] = []
            images = _load_batch(self.data.images, idx, bad, self.rng if self.augment else None)
            if bad:
                _raise_unreadable(bad)
            with torch.no_grad():
                features = self.backbone.encode_images(self.backbone.preprocess(images))
            labels = torch.as_tensor(self.data.labels[idx], dtype=torch.long)
            yield features, labels.to(features.device)
