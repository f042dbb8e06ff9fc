"""The interface between federated code and (secure) clustering of clients.

Federated code (``fedprompt.federated``, ``strategies``) sees only what is here:

* a client reduces its domain-level prompt with :func:`reduce_prompt` (a *public* random
  projection, the same matrix for every client, derived from the run seed: it needs no one
  else's data) and seals the reduced vector with :meth:`ClusteringBackend.seal` using the
  public material the server forwards to it (:meth:`ClusteringBackend.client_material`);
* the server relays the sealed bytes to :meth:`ClusteringBackend.cluster` and learns only a
  :class:`ClusteringResult` (k, assignments, DP-noised centroids where configured).

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

from fedprompt.errors import FedPromptError
from fedprompt.seeding import derived_seed


class ClusteringError(FedPromptError, RuntimeError):
    """Secure clustering failed this round (a party died, a wait timed out, ...)."""


class ShareRejected(FedPromptError, ValueError):
    """One client's sealed submission is malformed, of the wrong size, or out of range."""


@dataclass
class ClusteringResult:
    k: int
    assignments: dict[int, int]  # client id -> cluster in [0, k)
    excluded: dict[int, str] = field(default_factory=dict)  # client id -> why
    centroids: np.ndarray | None = None  # (k, dim), DP-noised, only where configured
    stats: dict[str, float] = field(default_factory=dict)  # seconds, bytes, criterion...


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
        """Server side: cluster the clients whose submissions are given. Raises
        :class:`ClusteringError` when the round's clustering fails; bad submissions are
        excluded (listed in ``ClusteringResult.excluded``), not fatal."""
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
