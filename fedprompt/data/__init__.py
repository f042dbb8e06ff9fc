"""Data: ImageFolder and bundled image sets, client partitions, image-feature cache."""

from fedprompt.data.datasets import (
    ArrayImages,
    DataSplits,
    FileImages,
    ImageSet,
    digits,
    image_folder,
    load_dataset,
)
from fedprompt.data.features import FeatureBatches, FeatureCache, ImageBatches, encode_image_set
from fedprompt.data.partition import (
    ClientPartition,
    dirichlet_split,
    iid_split,
    partition,
    pathological_split,
)

__all__ = [
    "ArrayImages",
    "ClientPartition",
    "DataSplits",
    "FeatureBatches",
    "FeatureCache",
    "FileImages",
    "ImageBatches",
    "ImageSet",
    "digits",
    "dirichlet_split",
    "encode_image_set",
    "iid_split",
    "image_folder",
    "load_dataset",
    "partition",
    "pathological_split",
]
