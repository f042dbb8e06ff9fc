"""The clustering backend of a run (``[clustering]``), and a client's sealed submission.

Server side, :func:`build_backend` turns ``[clustering]`` into
:class:`~fedprompt.secure.clustering.ClusteringSettings` (with the clustering's noise
multiplier from :mod:`fedprompt.federated.cluster_privacy`: the same one the server
accounts for) and starts the backend (the secure one spawns, or connects to, the CrypTen
compute parties). Client side,
:func:`seal_submission` reduces the client's domain-level prompt and seals the reduced
vector with the backend's static ``seal`` and the public material the server forwarded:
no backend object (and no compute party) is created on a client.

What a client reduces (``clustering.reduce``):

* ``first-update`` (default): the change of its domain-level prompt in its first round of
  training. In round 1 every client starts from the same public initial prompt, so the
  change is the pull of the client's own data alone, and clients of one domain pull alike
  (measured: clean domain separation in round 1). The client keeps it in its state and
  re-seals it in every clustering round (fresh shares each time), so later clusterings
  see the same signatures (and cluster clients that joined later).
* ``update``: this round's change. From round 2 on each client starts from its cluster's
  prompt, which has already absorbed the cluster's common pull: what is left is mostly
  the client's own class mix, and the domain signal fades (measured: domains found in
  round 1, merged into one cluster from round 2 on).
* ``drift``: trained prompt minus the initial prompt; ``prompt``: the trained prompt. Both
  are dominated by the cluster's shared prompt, so a clustering perpetuates itself (a
  misassigned client stays misassigned).

The vector is flattened, projected by the public Gaussian matrix of
:func:`~fedprompt.secure.clustering.reduce_prompt` (derived from the run seed, identical
on every client) to ``clustering.reduce_dim`` and L2-normalised: unit vectors are inside
the fixed-point range the compute parties accept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedprompt.config import RunConfig
from fedprompt.federated.cluster_privacy import clustering_noise_multiplier
from fedprompt.secure.clustering import (
    ClusteringBackend,
    ClusteringSettings,
    make_backend,
    reduce_prompt,
)

TOKEN_ENV = "FEDPROMPT_CLUSTER_TOKEN"


def clustering_settings(config: RunConfig) -> ClusteringSettings:
    c = config.clustering
    addresses = tuple(a.strip() for a in c.party_addresses.split(",") if a.strip())
    return ClusteringSettings(
        dim=c.reduce_dim, k_max=c.k_max, iterations=c.iterations, seed=config.seed,
        min_silhouette=c.min_silhouette, n_parties=c.parties, timeout_s=c.timeout, host=c.host,
        base_port=c.base_port, party_addresses=addresses,
        auth_token=os.environ.get(TOKEN_ENV, "") if addresses else "",
        noise_multiplier=clustering_noise_multiplier(config),
        startup_timeout_s=c.startup_timeout,
    )


def build_backend(config: RunConfig) -> ClusteringBackend:
    """The run's clustering backend (``clustering.backend``), started."""
    return make_backend(clustering_settings(config), config.clustering.backend)


def backend_class(name: str) -> Any:
    """The backend class whose static ``seal`` a client uses (imported lazily: the secure
    one pulls in CrypTen)."""
    if name == "plaintext":
        from fedprompt.secure.plaintext_clustering import PlaintextClustering

        return PlaintextClustering
    if name == "secure":
        from fedprompt.secure.mpc_clustering import SecureClustering

        return SecureClustering
    raise ValueError(f"unknown clustering backend {name!r}: use 'secure' or 'plaintext'")


@dataclass(frozen=True)
class ClusteringRequest:
    """What the server asks of a client in a clustering round."""

    round_id: int
    client_id: int  # the id the server relays this client's submission under
    material: dict[str, bytes]  # the backend's public material (party keys, dimension)


@dataclass(frozen=True)
class PromptTrace:
    """A client's domain-level prompt at the points a reduction may use (CPU tensors)."""

    initial: dict[str, Tensor]  # the run's initial shared tensors (public, from the seed)
    received: dict[str, Tensor]  # what the server sent this round
    trained: dict[str, Tensor]  # after this round's local training
    first_update: dict[str, Tensor]  # the change in the client's first round


def reduced_vector(config: RunConfig, trace: PromptTrace) -> Any:
    """The unit vector of length ``clustering.reduce_dim`` a client submits."""
    how = config.clustering.reduce
    if how == "first-update":
        source = trace.first_update
    elif how == "update":
        source = {k: v - trace.received[k] for k, v in trace.trained.items()}
    elif how == "drift":
        source = {k: v - trace.initial[k] for k, v in trace.trained.items()}
    else:
        source = trace.trained
    parts = [source[n].reshape(-1) for n in sorted(source)]
    flat = torch.cat([p.detach().float().cpu() for p in parts])
    return reduce_prompt(flat, config.clustering.reduce_dim, config.seed)


def seal_submission(config: RunConfig, request: ClusteringRequest, trace: PromptTrace) -> bytes:
    """The client's sealed submission for ``request`` (bytes the server cannot read)."""
    vector = reduced_vector(config, trace)
    sealer = backend_class(config.clustering.backend)
    return sealer.seal(vector, request.material, request.round_id, request.client_id)
