"""A tiny synthetic image task that needs no file: a coloured square on dark noise.

Used by tests and the Minion demo, where a random-weight backbone must still have
something a prompt can learn (the colour of the square)."""

from __future__ import annotations

import numpy as np

#: class name -> RGB of the square
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def coloured_squares(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size, 3) uint8 and their labels (indices into ``COLORS``,
    cycling through the classes): a half-size square of the class colour at a random
    place on noise of values 0-39."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COLORS)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    side = size // 2
    for i, y in enumerate(labels):
        pixels[i] = rng.integers(0, 40, (size, size, 3))
        x0, y0 = rng.integers(0, size - side, 2)
        pixels[i, y0 : y0 + side, x0 : x0 + side] = list(COLORS.values())[y]
    return pixels, labels
