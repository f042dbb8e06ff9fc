"""The interface between federated code and (secure) clustering of clients.

Federated code (``fedprompt.federated``, ``strategies``) sees only what is here:

* a client reduces its domain-level prompt with :func:`reduce_prompt` (a *public* random
  projection, the same matrix for every client, derived from the run seed: it needs no one
  else's data) and seals the reduced vector with :meth:`ClusteringBackend.seal` using the
  public material the server forwards to it (:meth:`ClusteringBackend.client_material`);
* the server relays the sealed bytes to :meth:`ClusteringBackend.cluster` and learns only a
  :class:`ClusteringResult`: the Gaussian releases of the DP clustering (noisy cluster
  sums, silhouette scores, cluster sizes; exact when the noise is off), the public
  centres and k derived from them, and each client's label (a function of its own vector
  and the public centres); :meth:`ClusteringBackend.assign` labels more clients against
  given public centres and releases nothing else.

Backends: the secure one (CrypTen compute parties, ``fedprompt.secure.mpc_clustering``)
and a plaintext reference (``fedprompt.secure.plaintext_clustering``) that runs the same
algorithm in the clear, labelled insecure, for debugging and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from fedprompt.secure.errors import ClusteringError, ShareRejected
from fedprompt.secure.fixed_point import vector_sensitivity
from fedprompt.secure.kmeans import (
    GaussianRelease,
    NoiseStds,
    Releases,
    noise_stds,
    release_plan,
)
from fedprompt.seeding import derived_seed

__all__ = ["ClusteringBackend", "ClusteringError", "ClusteringResult", "ClusteringSettings",
           "ShareRejected", "make_backend", "reduce_prompt", "round_seed", "seal",
           "single_cluster"]


@dataclass
class ClusteringResult:
    """What one clustering run tells the server.

    ``k``, ``centres``, ``counts``, ``criterion`` and ``releases`` are public: functions of
    the noisy releases only (with ``private`` true; exact values of the data otherwise).
    ``assignments`` holds each client's label, a function of its own vector and
    ``centres``."""

    k: int
    assignments: dict[int, int]  # client id -> cluster (slot) in [0, k)
    excluded: dict[int, str] = field(default_factory=dict)  # client id -> why
    centres: np.ndarray | None = None  # (k, dim) public unit centres; None when k = 1
    counts: np.ndarray | None = None  # (k,) released cluster sizes (noisy when private)
    criterion: np.ndarray | None = None  # (k_max,) the k criterion (noisy when private)
    releases: Releases | None = None  # every released value, in order
    private: bool = False  # every release carried Gaussian noise
    stats: dict[str, float] = field(default_factory=dict)  # seconds, bytes, ...


class ClusteringBackend(Protocol):
    def client_material(self) -> dict[str, bytes]:
        """Public material a client needs to seal its vector (e.g. party public keys)."""
        ...

    @staticmethod
    def seal(vector: np.ndarray, material: dict[str, bytes], round_id: int,
             client_id: int) -> bytes:
        """Client side: the bytes the client sends (the server cannot read them)."""
        ...

    def cluster(self, round_id: int, submissions: dict[int, bytes]) -> ClusteringResult:
        """Server side: cluster the clients whose submissions are given (any number, none
        included: the releases are made whoever takes part). Raises
        :class:`ClusteringError` when the round's clustering fails; bad submissions are
        excluded (listed in ``ClusteringResult.excluded``), not fatal."""
        ...

    def assign(self, round_id: int, submissions: dict[int, bytes],
               centres: np.ndarray) -> tuple[dict[int, int], dict[int, str]]:
        """Server side: each client's label against public ``centres`` (k, dim), and the
        excluded clients with reasons; nothing else is released."""
        ...

    def close(self) -> None:
        ...


def projection_matrix(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """The public Gaussian projection (in_dim, out_dim), scaled by 1/sqrt(out_dim)
    (Johnson-Lindenstrauss), identical in every process for one run seed."""
    gen = torch.Generator().manual_seed(derived_seed(seed, "cluster-projection", in_dim,
                                                     out_dim))
    return torch.randn(in_dim, out_dim, generator=gen) / out_dim ** 0.5


def reduce_prompt(domain_ctx: Tensor, out_dim: int, seed: int) -> np.ndarray:
    """A client's domain-level prompt (n_ctx, ctx_dim) as a unit vector of length
    ``out_dim``: flatten, project with the public matrix, L2-normalise. Unit norm bounds
    every coordinate by 1, which keeps it inside CrypTen's fixed-point range."""
    flat = domain_ctx.detach().float().reshape(-1).cpu()
    if out_dim >= flat.numel():  # nothing to reduce: zero-pad to the agreed length
        reduced = torch.zeros(out_dim)
        reduced[: flat.numel()] = flat
    else:
        reduced = flat @ projection_matrix(flat.numel(), out_dim, seed)
    reduced = reduced / reduced.norm().clamp_min(1e-12)
    return reduced.numpy().astype(np.float64)


@dataclass(frozen=True)
class ClusteringSettings:
    """Everything a clustering backend needs; build it from ``[clustering]`` config.

    ``dim``: length of the reduced vectors; ``k_max``: adaptive k in [1, k_max];
    ``iterations``: Lloyd iterations per candidate k; ``seed``: run seed (the public
    k-means start of round r derives from it and r); ``min_silhouette``: k = 1 unless
    some k >= 2 has a higher mean silhouette (see :mod:`fedprompt.secure.kmeans`);
    ``noise_multiplier``: every Gaussian release of a run (:meth:`release_plan`) gets
    noise of std ``noise_multiplier x`` its sensitivity (0: no noise, not private).

    Secure backend only: ``n_parties`` compute parties (>= 2) plus CrypTen's trusted
    third party for Beaver triples; ``timeout_s`` bounds every wait of a round;
    ``host`` and ``base_port`` place the spawned processes (port 0: free ports are
    picked); ``party_addresses`` (``"host:port"`` per party, in rank order) connects to
    parties already running ``python -m fedprompt.secure.party`` instead of spawning;
    ``verify_range`` checks every submission's range under MPC as well (the sensitivity
    of the releases rests on it; required with noise).
    """

    dim: int = 16
    k_max: int = 4
    iterations: int = 5
    seed: int = 0
    min_silhouette: float = 0.3
    n_parties: int = 2
    timeout_s: float = 120.0
    host: str = "127.0.0.1"
    base_port: int = 0
    party_addresses: tuple[str, ...] = ()
    auth_token: str = ""  # control-channel secret for party_addresses (else per-spawn)
    noise_multiplier: float = 0.0
    verify_range: bool = True
    startup_timeout_s: float = 180.0

    def __post_init__(self) -> None:
        problems = []
        if self.dim < 1:
            problems.append(f"dim must be >= 1, got {self.dim}")
        if self.k_max < 1:
            problems.append(f"k_max must be >= 1, got {self.k_max}")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1, got {self.iterations}")
        if not -1.0 <= self.min_silhouette <= 1.0:
            problems.append(f"min_silhouette must be in [-1, 1], got {self.min_silhouette}")
        if self.n_parties < 2:
            problems.append(f"n_parties must be >= 2 (non-colluding parties), got "
                            f"{self.n_parties}")
        if self.timeout_s <= 0 or self.startup_timeout_s <= 0:
            problems.append("timeouts must be > 0")
        if self.noise_multiplier < 0:
            problems.append(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and not self.verify_range:
            problems.append("noise_multiplier > 0 needs verify_range: the sensitivity of "
                            "the releases rests on the range check")
        if self.party_addresses and len(self.party_addresses) != self.n_parties:
            problems.append(f"party_addresses names {len(self.party_addresses)} parties, "
                            f"n_parties is {self.n_parties}")
        if problems:
            raise ValueError("invalid ClusteringSettings: " + "; ".join(problems))

    @property
    def vector_bound(self) -> float:
        """Bound on one client's vector in a cluster sum (see ``vector_sensitivity``)."""
        return vector_sensitivity(self.dim, self.n_parties)

    def release_plan(self) -> list[GaussianRelease]:
        """The Gaussian releases of one clustering run (each with its sensitivity)."""
        return release_plan(self.k_max, self.iterations, self.vector_bound)

    def noise_stds(self) -> NoiseStds:
        """The nominal noise std of every release (all at ``noise_multiplier``)."""
        return noise_stds(self.k_max, self.iterations, self.vector_bound,
                          self.noise_multiplier)

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 and self.k_max > 1


def round_seed(seed: int, round_id: int) -> int:
    """The seed of one round's k-means (its public initial centres)."""
    return derived_seed(seed, "kmeans-round", round_id)


def single_cluster(ids: list[int], excluded: dict[int, str]) -> ClusteringResult:
    """k_max = 1: everyone in one cluster, nothing computed or released."""
    return ClusteringResult(k=1, assignments=dict.fromkeys(ids, 0), excluded=excluded,
                            counts=None, private=True)


def make_backend(settings: ClusteringSettings, kind: str = "secure") -> ClusteringBackend:
    """``kind`` "secure" (CrypTen compute parties) or "plaintext" (INSECURE reference)."""
    if kind == "plaintext":
        from fedprompt.secure.plaintext_clustering import PlaintextClustering

        return PlaintextClustering(settings)
    if kind == "secure":
        from fedprompt.secure.mpc_clustering import SecureClustering

        return SecureClustering(settings)
    raise ValueError(f"unknown clustering backend {kind!r}: use 'secure' or 'plaintext'")


def seal(vector: np.ndarray, material: dict[str, bytes], round_id: int,
         client_id: int) -> bytes:
    """Client side, without the backend object: seal with whichever backend produced
    ``material`` (its ``"backend"`` entry). Raises :class:`ShareRejected` for a vector
    outside the fixed-point range and ``ValueError`` for unknown material."""
    kind = material.get("backend", b"")
    if kind == b"plaintext":
        from fedprompt.secure.plaintext_clustering import PlaintextClustering

        return PlaintextClustering.seal(vector, material, round_id, client_id)
    if kind == b"secure":
        from fedprompt.secure.sealing import seal_vector

        return seal_vector(vector, material, round_id, client_id)
    raise ValueError(f"clustering material names an unknown backend {kind!r}")
