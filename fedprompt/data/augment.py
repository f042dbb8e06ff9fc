"""Training-time image augmentation in plain PIL (torchvision is unusable on CPU machines
here): random resized crop and horizontal flip, drawn from a seeded generator."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def random_resized_crop_flip(image: Image.Image, rng: np.random.Generator,
                             scale: tuple[float, float] = (0.5, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """Crop a random area (share ``scale`` of the image, aspect ``ratio``), then flip
    horizontally with probability 1/2. The backbone's preprocessing resizes afterwards."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            image = image.crop((left, top, left + w, top + h))
            break
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image
