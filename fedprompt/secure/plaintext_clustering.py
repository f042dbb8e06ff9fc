"""INSECURE plaintext reference backend: the server sees every client's reduced vector.

For debugging, tests and the comparison with the secure backend only. It runs exactly the
algorithm of :mod:`fedprompt.secure.kmeans` that the compute parties run under MPC, with
the same validation, so both backends give the same partition on well-separated data.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import replace
from typing import Any

import numpy as np

from fedprompt.secure.clustering import (
    ClusteringResult,
    ClusteringSettings,
    ShareRejected,
    round_seed,
)
from fedprompt.secure.fixed_point import check_dims, check_vector
from fedprompt.secure.kmeans import adaptive_kmeans

log = logging.getLogger(__name__)

_MAGIC = b"FPPT"
_VERSION = 1
_HEADER = struct.Struct("<4sBQqI")  # magic, version, round, client, dim


def _settings(settings: ClusteringSettings | None, overrides: dict[str, Any]
              ) -> ClusteringSettings:
    base = settings if settings is not None else ClusteringSettings()
    return replace(base, **overrides) if overrides else base


class PlaintextClustering:
    """INSECURE: submissions are plain float vectors the server reads."""

    insecure = True

    def __init__(self, settings: ClusteringSettings | None = None, **overrides: Any) -> None:
        self.settings = _settings(settings, overrides)
        check_dims(self.settings.dim)

    def client_material(self) -> dict[str, bytes]:
        return {"backend": b"plaintext", "dim": str(self.settings.dim).encode()}

    @staticmethod
    def seal(vector: np.ndarray, material: dict[str, bytes], round_id: int,
             client_id: int) -> bytes:
        dim = int(material["dim"].decode())
        arr = check_vector(vector, dim, who=f"client {client_id}'s vector")
        return _HEADER.pack(_MAGIC, _VERSION, round_id, client_id, dim) + arr.astype(
            "<f8").tobytes()

    def open(self, blob: bytes, round_id: int, client_id: int) -> np.ndarray:
        """The vector in a submission, or :class:`ShareRejected` naming the problem."""
        dim = self.settings.dim
        if not isinstance(blob, bytes | bytearray) or len(blob) != _HEADER.size + 8 * dim:
            size = len(blob) if isinstance(blob, bytes | bytearray) else type(blob).__name__
            raise ShareRejected(f"submission has size {size}, expected "
                                f"{_HEADER.size + 8 * dim} bytes (dim {dim})")
        magic, version, rnd, cid, got_dim = _HEADER.unpack_from(blob)
        if magic != _MAGIC or version != _VERSION:
            raise ShareRejected("submission is not a plaintext-clustering vector (bad header)")
        if (rnd, cid, got_dim) != (round_id, client_id, dim):
            raise ShareRejected(f"submission is for round {rnd}, client {cid}, dim {got_dim}; "
                                f"expected round {round_id}, client {client_id}, dim {dim}")
        values = np.frombuffer(blob, dtype="<f8", offset=_HEADER.size)
        return check_vector(values, dim, who="submitted vector")

    def cluster(self, round_id: int, submissions: dict[int, bytes]) -> ClusteringResult:
        start = time.perf_counter()
        excluded: dict[int, str] = {}
        rows: list[np.ndarray] = []
        ids: list[int] = []
        for cid in sorted(submissions):
            try:
                rows.append(self.open(submissions[cid], round_id, cid))
                ids.append(cid)
            except ShareRejected as exc:
                excluded[cid] = str(exc)
                log.warning("clustering round %d: client %d excluded: %s", round_id, cid, exc)
        if not ids:
            return ClusteringResult(k=0, assignments={}, excluded=excluded,
                                    stats={"seconds": time.perf_counter() - start})
        check_dims(self.settings.dim, len(ids))
        s = self.settings
        outcome = adaptive_kmeans(np.stack(rows), s.k_max, s.iterations,
                                  round_seed(s.seed, round_id), s.min_silhouette)
        centroids = None
        if s.centroid_noise_multiplier > 0:
            rng = np.random.default_rng()
            x = np.stack(rows)
            counts = np.bincount(outcome.labels, minlength=outcome.k)
            sums = np.stack([x[outcome.labels == j].sum(0) for j in range(outcome.k)])
            noise = rng.normal(0.0, s.centroid_noise_multiplier * s.centroid_clip, sums.shape)
            centroids = (sums + noise) / counts[:, None]
        return ClusteringResult(
            k=outcome.k,
            assignments={cid: int(lab) for cid, lab in zip(ids, outcome.labels, strict=True)},
            excluded=excluded,
            centroids=centroids,
            stats={"seconds": time.perf_counter() - start, "k_chosen": float(outcome.k_chosen),
                   "clients": float(len(ids))},
        )

    def close(self) -> None:
        return None
