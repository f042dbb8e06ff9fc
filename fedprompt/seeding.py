"""Seeds for Python, NumPy and torch."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a run seed and identifiers (stable across processes and
    platforms, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_seed(seed: int, client: int) -> int:
    """Seed of a client's batch order. One-site runs use it too, so a one-client
    federation without noise replays the one-site run exactly."""
    return derived_seed(seed, "batches", client)
