"""Multi-domain federations: clients drawn from several data sets (``data.domains``).

With ``data.domains = ["../shared/data/cifar10-mini", "../shared/data/flowers12"]`` and
``data.num_clients = 10`` the clients are dealt to the domains in contiguous blocks of
near-equal size (``np.array_split``: clients 0-4 on cifar10-mini, 5-9 on flowers12), and
each block is split by ``data.partition`` *within its domain*, exactly as a one-domain run
of that size would be. Each domain keeps its own label space and class names, so

* a client classifies among its domain's classes (its class-level prompt, personal, has as
  many rows as its domain has classes; shared prompt parts never depend on the number of
  classes, so they have the same shape on every client);
* its local test set is the test images of its own classes and its neighbor test set the
  test images of the other clients **of the same domain** (another domain's images have no
  label in this client's label space).

A domain is anything ``data.dataset`` accepts: an ImageFolder root, ``digits`` or
``digits-inverted`` (the same digits, colour-inverted: two renderings of one data set).
The split is a pure function of the configuration, so the server can name every client's
domain for evaluation (the adjusted Rand index of the clustering) without asking anyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.config import DataConfig
from fedprompt.errors import DataError


@dataclass(frozen=True)
class DomainSlot:
    """Where one client of a multi-domain federation gets its data."""

    domain: int  # index into data.domains
    data: DataConfig  # the domain's own [data] section (dataset = the domain, no domains)
    partition_id: int  # the client's partition within its domain
    num_partitions: int  # how many clients share the domain


def domain_blocks(num_clients: int, num_domains: int) -> list[list[int]]:
    """Client ids of every domain: contiguous, near-equal blocks."""
    if num_domains < 1:
        raise DataError("a multi-domain federation needs at least one domain")
    if num_clients < num_domains:
        raise DataError(f"{num_domains} domains but {num_clients} clients: every domain needs "
                        "at least one client (raise data.num_clients)")
    return [b.tolist() for b in np.array_split(np.arange(num_clients), num_domains)]


def client_domains(data: DataConfig, num_clients: int) -> list[int]:
    """The domain index of every client 0..num_clients-1 (all 0 without data.domains)."""
    if not data.domains:
        return [0] * num_clients
    out = [0] * num_clients
    for d, block in enumerate(domain_blocks(num_clients, len(data.domains))):
        for client in block:
            out[client] = d
    return out


def domain_slot(data: DataConfig, client: int, num_clients: int) -> DomainSlot:
    """Client ``client`` of ``num_clients``: its domain, that domain's data config, and
    its partition within the domain."""
    if not data.domains:
        raise DataError("data.domains is empty: this is a one-domain run")
    if not 0 <= client < num_clients:
        raise DataError(f"client {client} is outside 0..{num_clients - 1}")
    for d, block in enumerate(domain_blocks(num_clients, len(data.domains))):
        if client in block:
            config = data.model_copy(update={"dataset": data.domains[d], "domains": [],
                                             "num_clients": len(block)})
            return DomainSlot(d, config, block.index(client), len(block))
    raise AssertionError("unreachable: the blocks cover every client")
