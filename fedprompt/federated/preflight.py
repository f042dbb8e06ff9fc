"""Check a federation's data once, before its first round.

Without this check, data no client can use (a missing or empty data set folder, a class
folder without images, a corrupt image, more clients than classes for a pathological
split) makes every client fail in every round with the same error, and the run "ends"
without having trained anything. :func:`check_federation_data` does, for every node,
what its ClientApp will do with its data (:func:`node_data` reads the node config as the
ClientApp does; :func:`~fedprompt.federated.client.client_data` finds the data set, the
domain and the partition), so the first problem becomes one clear
:class:`~fedprompt.errors.DataError` before anything is trained or written.

With ``images=True`` it also computes the image features (for a LLaVA backbone: encodes
the question-answer sets) through the same per-process caches the clients use: every
image is opened and decoded once, which finds corrupt and truncated files, and in the
in-process runner this costs nothing extra because the clients then reuse those features.
A separate server process (a Flower simulation's ServerApp) checks with ``images=False``
(data set and partitions only): its clients run in other processes, so encoding there
would double the work; a corrupt image then fails round 1 on every client, and the run
stops there (``federation.allow_empty_rounds``).

The global random generators are left as they were, so a checked run draws exactly the
numbers an unchecked one would.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError, DataError
from fedprompt.federated.client import cached_backbone, cached_features, client_data
from fedprompt.federated.generative import check_generative_data, is_generative


@dataclass(frozen=True)
class NodeData:
    """Which data a node's ClientApp trains on (from its node config)."""

    config: RunConfig  # the run's config; a site with its own folder: data.dataset = it
    partition_id: int  # the partition of that data set (0 for a site's own folder)
    num_partitions: int
    client_id: int  # the client's id (the node config's partition-id)


def node_data(config: RunConfig, node_config: Mapping[str, Any]) -> NodeData:
    """Read a node config as the ClientApp does: ``partition-id`` and ``num-partitions``
    (set by the simulation engine, or by ``flower-supernode --node-config``); a site with
    ``dataset`` trains on all of that folder, and ``partition-id`` only names it."""
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as exc:
        raise ConfigError(
            f"node_config has no {exc.args[0]!r}: start the SuperNode with --node-config "
            "\"partition-id=<i> num-partitions=<n>\" (the simulation engine sets both)"
        ) from None
    client_id = partition_id
    if node_config.get("dataset"):  # a site with its own data folder trains on all of it
        config = config.model_copy(update={
            "data": config.data.model_copy(update={"dataset": str(node_config["dataset"]),
                                                   "domains": []})})
        partition_id, num_partitions = 0, 1
    return NodeData(config, partition_id, num_partitions, client_id)


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global generators on the way out."""
    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


def check_federation_data(config: RunConfig, node_configs: Iterable[Mapping[str, Any]], *,
                          images: bool) -> None:
    """Load the data of every node (its node config in ``node_configs``) as its client
    will, building every partition; with ``images`` also compute the image features.
    The first problem raises its :class:`~fedprompt.errors.DataError` (a site's own
    folder is named in the message)."""
    with _rng_untouched():
        for node_config in node_configs:
            node = node_data(config, node_config)
            try:
                _check_node(node, images)
            except DataError as exc:
                if node_config.get("dataset"):
                    raise DataError(f"client {node.client_id} (its node config's dataset "
                                    f"{node_config['dataset']}): {exc}") from exc
                raise


def _check_node(node: NodeData, images: bool) -> None:
    if is_generative(node.config):
        check_generative_data(node.config, node.partition_id, node.num_partitions,
                              encode=images)
        return
    config, splits, _, _ = client_data(node.config, node.partition_id, node.num_partitions)
    if images:
        cached_features(config, cached_backbone(config.backbone), splits)
