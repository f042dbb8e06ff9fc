"""Labelled image sets: ImageFolder trees on disk and data bundled with PyPI packages.

An :class:`ImageSet` is a list of images (files or an in-memory array), their integer
labels and the class names used in prompts. :func:`load_dataset` turns a run's
``[data]`` section into a train/test pair:

* ``dataset = "digits"``: scikit-learn's bundled handwritten digits (1,797 images,
  8x8, 10 classes), rendered as 32x32 RGB images named "zero" ... "nine". Nothing to
  download, so a fresh machine can run the default experiment. ``"digits-inverted"``:
  the same images colour-inverted (a second rendering, for multi-domain runs).
* ``dataset = "<path>"``: an ImageFolder tree, either ``<root>/train/<class>/*`` and
  ``<root>/test/<class>/*`` or ``<root>/<class>/*`` (then a seeded, per-class
  ``test_fraction`` is held out, as Caltech101-style data sets need). Class names come
  from folder names with ``_`` and ``-`` read as spaces, or from ``<root>/classnames.json``
  (``{"folder": "name", ...}``) when present.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedprompt.config import DataConfig
from fedprompt.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: data sets bundled with a PyPI package (not paths): ``data.dataset`` values
BUNDLED = frozenset({"digits", "digits-inverted"})

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


class ImageSource:
    """Random access to images; subclasses hold files or arrays."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def subset(self, indices: np.ndarray) -> ImageSource:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Changes whenever any image changes (used as a feature-cache key)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"image #{index}"


class FileImages(ImageSource):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(
                f"cannot read image {path}: {exc}. Replace the file with a valid image or "
                "delete it, then run again"
            ) from exc

    def subset(self, indices: np.ndarray) -> FileImages:
        return FileImages([self.paths[int(i)] for i in indices])

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.paths:
            try:
                stat = path.stat()
            except OSError as exc:
                raise DataError(f"image {path} disappeared: {exc}") from exc
            digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class ArrayImages(ImageSource):
    """Images held in memory as a ``[N, H, W, 3]`` uint8 array."""

    def __init__(self, pixels: np.ndarray) -> None:
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise DataError(f"expected [N, H, W, 3] uint8 pixels, got {pixels.shape} "
                            f"{pixels.dtype}")
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index])

    def subset(self, indices: np.ndarray) -> ArrayImages:
        return ArrayImages(self.pixels[np.asarray(indices, dtype=np.int64)])

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.pixels).tobytes()).hexdigest()


@dataclass
class ImageSet:
    """Images, integer labels in ``0..len(classnames)-1``, and class names."""

    name: str
    images: ImageSource
    labels: np.ndarray
    classnames: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} "
                            "labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def subset(self, indices: np.ndarray, name: str | None = None) -> ImageSet:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageSet(name or self.name, self.images.subset(indices), self.labels[indices],
                        self.classnames)

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.images.fingerprint().encode())
        digest.update(self.labels.tobytes())
        return digest.hexdigest()


@dataclass
class DataSplits:
    train: ImageSet
    test: ImageSet

    @property
    def classnames(self) -> list[str]:
        return self.train.classnames


# --------------------------------------------------------------------------- digits
def digits(seed: int = 0, test_fraction: float = 0.25, size: int = 32,
           inverted: bool = False) -> DataSplits:
    """scikit-learn's bundled digits as ``size`` x ``size`` RGB images, stratified split;
    ``inverted``: colour-inverted (dark digits on white), the same split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    gray = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = np.stack([
        np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
        for im in gray
    ])
    rgb = np.repeat(pixels[..., None], 3, axis=-1)
    if inverted:
        rgb = 255 - rgb
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    name = "digits-inverted" if inverted else "digits"
    full = ImageSet(name, ArrayImages(rgb), labels, list(DIGIT_NAMES))
    return DataSplits(full.subset(np.sort(idx_train), f"{name}/train"),
                      full.subset(np.sort(idx_test), f"{name}/test"))


# ---------------------------------------------------------------------- ImageFolder
def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _scan(root: Path) -> dict[str, list[Path]]:
    classes = _class_dirs(root)
    if not classes:
        raise DataError(
            f"{root} has no class folders: an ImageFolder tree is <root>/<class>/<image> or "
            "<root>/{train,test}/<class>/<image>; point data.dataset at its root"
        )
    found = {}
    empty = []
    for folder in classes:
        files = _images_in(folder)
        if not files:
            empty.append(folder)
        found[folder.name] = files
    if empty:
        names = ", ".join(str(p) for p in empty)
        raise DataError(
            f"empty class folder(s): {names} hold no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}). Add images or remove the folder(s)"
        )
    return found


def _classnames(root: Path, folders: list[str]) -> list[str]:
    mapping_file = root / "classnames.json"
    if mapping_file.is_file():
        try:
            mapping = json.loads(mapping_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{mapping_file} is not valid JSON: {exc}") from exc
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise DataError(
                f"{mapping_file} has no name for class folder(s) {missing}: add entries "
                '{"folder": "class name"} for every class folder'
            )
        return [str(mapping[f]) for f in folders]
    return [f.replace("_", " ").replace("-", " ").strip() for f in folders]


def image_folder(root: str | Path, seed: int = 0, test_fraction: float = 0.25) -> DataSplits:
    """Load an ImageFolder tree (see the module docstring for the layouts)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data set folder {root} does not exist: set data.dataset to the root of an "
            "ImageFolder tree, or to 'digits' for the bundled data set"
        )
    name = root.name
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files = _scan(root / "train")
        test_files = _scan(root / "test")
        if set(train_files) != set(test_files):
            only_train = sorted(set(train_files) - set(test_files))
            only_test = sorted(set(test_files) - set(train_files))
            raise DataError(
                f"{root}: train/ and test/ have different class folders (only in train: "
                f"{only_train}; only in test: {only_test}). Give both splits the same classes"
            )
        folders = sorted(train_files)
        classnames = _classnames(root, folders)

        def build(files: dict[str, list[Path]], split: str) -> ImageSet:
            paths = [p for f in folders for p in files[f]]
            labels = [i for i, f in enumerate(folders) for _ in files[f]]
            return ImageSet(f"{name}/{split}", FileImages(paths), np.array(labels), classnames)

        return DataSplits(build(train_files, "train"), build(test_files, "test"))

    files = _scan(root)
    folders = sorted(files)
    classnames = _classnames(root, folders)
    rng = np.random.default_rng(seed)
    train_paths, train_labels, test_paths, test_labels = [], [], [], []
    for label, folder in enumerate(folders):
        paths = files[folder]
        if len(paths) < 2:
            raise DataError(
                f"class folder {root / folder} has {len(paths)} image: holding out a test "
                "image needs at least 2 per class. Add images, or provide train/ and test/ "
                "folders"
            )
        order = rng.permutation(len(paths))
        n_test = min(max(1, round(test_fraction * len(paths))), len(paths) - 1)
        for rank, i in enumerate(order):
            (test_paths if rank < n_test else train_paths).append(paths[i])
            (test_labels if rank < n_test else train_labels).append(label)
    return DataSplits(
        ImageSet(f"{name}/train", FileImages(train_paths), np.array(train_labels), classnames),
        ImageSet(f"{name}/test", FileImages(test_paths), np.array(test_labels), classnames),
    )


def few_shot(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """Keep at most ``per_class`` images of every class (seeded choice)."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in range(data.num_classes):
        idx = np.flatnonzero(data.labels == label)
        keep.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return data.subset(np.sort(np.array(keep, dtype=np.int64)))


def load_dataset(config: DataConfig) -> DataSplits:
    """The train/test pair a run's ``[data]`` section names (split by ``config.seed``)."""
    seed = config.seed
    if config.domains:
        raise DataError(
            f"data.domains={config.domains} names several data sets: a multi-domain run is "
            "federated (fedprompt-sim, flwr run), where every client loads its own domain; "
            "for one-site training set data.dataset to one of them and data.domains=[]"
        )
    if config.dataset in BUNDLED:
        splits = digits(seed=seed, test_fraction=config.test_fraction,
                        inverted=config.dataset == "digits-inverted")
    else:
        splits = image_folder(config.dataset, seed=seed, test_fraction=config.test_fraction)
    if config.max_train_per_class:
        splits = DataSplits(few_shot(splits.train, config.max_train_per_class, seed), splits.test)
    return splits
