"""INSECURE plaintext reference backend: the server sees every client's reduced vector.

For debugging, tests and the comparison with the secure backend only. It runs exactly the
algorithm of :mod:`fedprompt.secure.kmeans` that the compute parties run under MPC, with
the same validation and the same Gaussian releases (noise from a CSPRNG), so both
backends give the same partition on well-separated data when the noise is off. Its
releases are DP against everyone but the server, which sees every vector.
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
    single_cluster,
)
from fedprompt.secure.fixed_point import check_dims, check_vector
from fedprompt.secure.kmeans import NoiseDraw, Releases, assign, dp_spherical_kmeans

log = logging.getLogger(__name__)

_MAGIC = b"FPPT"
_VERSION = 1
_HEADER = struct.Struct("<4sBQqI")  # magic, version, round, client, dim


def _settings(settings: ClusteringSettings | None, overrides: dict[str, Any]
              ) -> ClusteringSettings:
    base = settings if settings is not None else ClusteringSettings()
    return replace(base, **overrides) if overrides else base


def secure_draw() -> NoiseDraw:
    """Gaussian draws from a CSPRNG stream keyed by the OS (float64)."""
    from fedprompt.privacy.noise import SecureRandom

    stream = SecureRandom()

    def draw(shape: tuple[int, ...], std: float) -> np.ndarray:
        return stream.normal(tuple(shape), std).numpy()

    return draw


class PlaintextClustering:
    """INSECURE: submissions are plain float vectors the server reads."""

    insecure = True

    def __init__(self, settings: ClusteringSettings | None = None, *,
                 draw: NoiseDraw | None = None, **overrides: Any) -> None:
        """``draw`` (tests) replaces the CSPRNG noise source (:func:`secure_draw`)."""
        self.settings = _settings(settings, overrides)
        check_dims(self.settings.dim)
        self.draw = draw if draw is not None else secure_draw()

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

    def _open_all(self, round_id: int, submissions: dict[int, bytes]) -> tuple[
        list[int], list[np.ndarray], dict[int, str]
    ]:
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
        check_dims(self.settings.dim, len(ids))
        return ids, rows, excluded

    def cluster(self, round_id: int, submissions: dict[int, bytes], *,
                replay: Releases | None = None) -> ClusteringResult:
        """``replay`` (tests: the neighbouring-dataset recipe) forces every released value
        to the given ones instead of drawing noise."""
        start = time.perf_counter()
        ids, rows, excluded = self._open_all(round_id, submissions)
        s = self.settings
        if s.k_max == 1:
            return single_cluster(ids, excluded)
        x = np.stack(rows) if rows else np.zeros((0, s.dim))
        outcome = dp_spherical_kmeans(x, s.k_max, s.iterations, round_seed(s.seed, round_id),
                                      s.min_silhouette, s.noise_stds(), self.draw, replay)
        return ClusteringResult(
            k=outcome.k,
            assignments={cid: int(lab) for cid, lab in zip(ids, outcome.labels, strict=True)},
            excluded=excluded, centres=outcome.centres, counts=outcome.counts,
            criterion=outcome.criterion, releases=outcome.releases, private=s.private,
            stats={"seconds": time.perf_counter() - start, "clients": float(len(ids))},
        )

    def assign(self, round_id: int, submissions: dict[int, bytes],
               centres: np.ndarray) -> tuple[dict[int, int], dict[int, str]]:
        ids, rows, excluded = self._open_all(round_id, submissions)
        x = np.stack(rows) if rows else np.zeros((0, self.settings.dim))
        labels = assign(x, np.asarray(centres, dtype=np.float64))
        return {cid: int(lab) for cid, lab in zip(ids, labels, strict=True)}, excluded

    def close(self) -> None:
        return None
