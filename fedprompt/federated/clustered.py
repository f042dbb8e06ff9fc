"""SecFPP's server side: domain-level prompts per cluster, cluster-wise DP aggregation,
and clustering of the clients each ``clustering.cluster_every`` rounds.

One round (``federation.method = "secfpp"``):

1. :meth:`ClusteredServer.begin_round` registers every connected node (a node seen for the
   first time joins the lowest-numbered cluster; in round 1 that is cluster 0, which
   holds everyone) and applies the assignments found by the previous round's clustering.
   It decides whether this round clusters: rounds 1, 1 + ``cluster_every``, ... do; with
   ``clustering.reduce = "first-update"`` (a fixed signature per client) only while some
   connected node has not yet been clustered, since clustering the same signatures again
   adds nothing (and a k-means started elsewhere could flip a borderline client).
2. Each node receives its cluster's domain-level prompt (:meth:`shared_for`); in a
   clustering round its train config also carries the backend's public material, the
   round id and the id to seal under (:meth:`train_config`).
3. Replies are screened exactly as for the global methods (keys, shapes, dtype, finite,
   norm bound), then **every cluster is aggregated on its own** with the same code as the
   global aggregate (:func:`~fedprompt.federated.aggregation.combine_updates`): with global
   DP each accepted update is clipped to ``C_G``, the clipped updates of the cluster's
   members are summed, divided by the cluster's expected number of participants
   ``q n_c`` and noised with ``N(0, (z C_G / (q n_c))^2)``; one accountant per cluster
   steps once per round (every cluster releases every round, also when none of its members
   was sampled, as DP-FedAvg does).
4. In a clustering round the sealed submissions of the accepted replies are relayed to
   the backend (the server cannot read them). A reply whose update was rejected has its
   submission dropped too (nothing is half-applied). The result's assignments take effect
   at the start of the next round; clients without a submission, or excluded by the
   backend (a bad share), keep their cluster. If the backend raises
   :class:`~fedprompt.secure.clustering.ClusteringError`, the error is logged, the round is
   marked ``fallback`` and the last assignments stay.

New clusters: cluster labels are matched to the previous ones by largest overlap (greedy,
so a stable partition keeps its ids, its prompt and its accountant); a label that matches
no previous cluster gets a fresh id. Each cluster's domain prompt is then **the mean of its
members' current domain prompts** (the prompts of the clusters they come from: only
post-processing of released aggregates, nothing new about any client). A cluster with a
fresh id gets a copy of the per-client accountant (below), since its prompt derives from
every release so far.

Privacy: each client contributes to exactly one cluster's release per round, with the
same ``z`` and sampling rate ``q`` in every cluster, so the user-level epsilon of the
domain prompts is that of ``T`` releases at ``(z, q)``: ``global_epsilon`` (server ledger),
and every cluster's ledger shows the same figure for the releases its prompt derives from.
The cluster assignment itself is **not** differentially private (it depends on the
clients' unnoised reduced prompts; see docs/secfpp.md).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedprompt.config import RunConfig
from fedprompt.federated.server import Accepted, ClientReply, FederatedServer
from fedprompt.privacy.accounting import Accountant
from fedprompt.secure.clustering import ClusteringBackend, ClusteringError, ClusteringResult

log = logging.getLogger("fedprompt.server")

#: train-config keys of a clustering round (client material goes under MATERIAL_PREFIX)
ROUND_KEY = "cluster-round"
CLIENT_ID_KEY = "cluster-client-id"
MATERIAL_PREFIX = "cluster-material."
#: reply-config key of a client's sealed submission
SHARE_KEY = "cluster-share"


def clustering_round(config: RunConfig, server_round: int) -> bool:
    """Rounds 1, 1 + cluster_every, 1 + 2 cluster_every, ... may cluster."""
    return (server_round - 1) % config.clustering.cluster_every == 0


def material_config(material: Mapping[str, bytes]) -> dict[str, bytes]:
    return {f"{MATERIAL_PREFIX}{k}": bytes(v) for k, v in material.items()}


def material_from_config(config: Mapping[str, Any]) -> dict[str, bytes]:
    return {k[len(MATERIAL_PREFIX):]: bytes(v) for k, v in config.items()
            if k.startswith(MATERIAL_PREFIX)}


def match_labels(previous: Mapping[int, int], labels: Mapping[int, int]) -> dict[int, int]:
    """Cluster ids for the new ``labels`` (node -> label): each label takes the id of the
    previous cluster it overlaps most (greedy over overlaps, largest first; ties by label
    then id), unmatched labels take fresh ids above every previous id."""
    overlap = Counter((label, previous[node]) for node, label in labels.items()
                      if node in previous)
    mapping: dict[int, int] = {}
    used: set[int] = set()
    for (label, old), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if label not in mapping and old not in used:
            mapping[label] = old
            used.add(old)
    fresh = max([*previous.values(), -1]) + 1
    for label in sorted(set(labels.values())):
        if label not in mapping:
            mapping[label] = fresh
            fresh += 1
    return {node: mapping[label] for node, label in labels.items()}


def check_result(result: ClusteringResult, submitted: Sequence[int]) -> None:
    """A backend result must assign only submitted clients, to labels in [0, k)."""
    unknown = sorted(set(result.assignments) - set(submitted))
    if unknown:
        raise ClusteringError(f"the clustering result assigns clients that submitted nothing: "
                              f"{unknown}")
    overlap = sorted(set(result.assignments) & set(result.excluded))
    if overlap:
        raise ClusteringError(f"the clustering result both assigns and excludes {overlap}")
    bad = {n: c for n, c in result.assignments.items() if not 0 <= c < result.k}
    if bad:
        raise ClusteringError(f"the clustering result has labels outside [0, k={result.k}): "
                              f"{bad}")


class ClusteredServer(FederatedServer):
    """:class:`FederatedServer` with one set of shared tensors per cluster."""

    def __init__(self, config: RunConfig, shared: dict[str, Tensor], num_clients: int,
                 local_dp_names: Sequence[str] = (), *, backend: ClusteringBackend) -> None:
        super().__init__(config, shared, num_clients, local_dp_names)
        if not self.shared:
            raise ValueError("a clustered method needs shared (domain-level) tensors")
        self.backend = backend
        self.prompts: dict[int, dict[str, Tensor]] = {0: _clone(self.shared)}
        self.assignment: dict[int, int] = {}  # node id -> cluster id
        self.pending: dict[int, int] | None = None  # from the last clustering, for next round
        self.cluster_accountants: dict[int, Accountant] = {0: Accountant(
            config.privacy.accountant)}
        # node id -> the small id its submissions are sealed and relayed under (Flower node
        # ids are arbitrary 64-bit numbers; backends bind submissions to this id)
        self.slot: dict[int, int] = {}
        self._material: dict[str, bytes] = {}  # this round's, for train configs
        # nodes whose submission a successful clustering has used; with first-update
        # signatures (fixed per client) only a round with a node not yet among them clusters
        self.clustered: set[int] = set()
        self.clustering_now = False
        # DP-noised centroids (clustering.centroid_noise > 0): one Gaussian release of the
        # k cluster sums of unit vectors per clustering, accounted here
        self.centroid_accountant = Accountant(config.privacy.accountant)

    # ------------------------------------------------------------------ rounds
    def begin_round(self, server_round: int, node_ids: Sequence[int]) -> None:
        if self.pending is not None:
            self._apply(self.pending)
            self.pending = None
        for node in sorted(node_ids):
            self.assignment.setdefault(node, min(self.prompts))
            self.slot.setdefault(node, len(self.slot))
        self.clustering_now = clustering_round(self.config, server_round) and (
            self.config.clustering.reduce != "first-update"
            or any(node not in self.clustered for node in node_ids))
        self._material = (material_config(self.backend.client_material())
                          if self.clustering_now else {})

    def _apply(self, new: dict[int, int]) -> None:
        """Switch to the assignments ``new``; every cluster's prompt becomes the mean of its
        members' current prompts."""
        prompts: dict[int, dict[str, Tensor]] = {}
        for cluster in sorted(set(new.values())):
            sources = [self.assignment[n] for n in sorted(new) if new[n] == cluster]
            if len(set(sources)) == 1:
                prompts[cluster] = _clone(self.prompts[sources[0]])
            else:
                prompts[cluster] = {k: torch.stack([self.prompts[s][k] for s in sources]).mean(0)
                                    for k in self.shared}
            if cluster not in self.cluster_accountants:
                self.cluster_accountants[cluster] = Accountant.from_json(
                    self.accountant.to_json())
        self.prompts = prompts
        self.assignment = dict(new)
        self.cluster_accountants = {c: a for c, a in self.cluster_accountants.items()
                                    if c in prompts}

    def cluster_of(self, node_id: int) -> int:
        return self.assignment.get(node_id, min(self.prompts))

    def shared_for(self, node_id: int) -> dict[str, Tensor]:
        return self.prompts[self.cluster_of(node_id)]

    def train_config(self, node_id: int, server_round: int) -> dict[str, int | str | bytes]:
        if not self.clustering_now:
            return {}
        return {ROUND_KEY: server_round, CLIENT_ID_KEY: self.slot[node_id], **self._material}

    def result_arrays(self) -> dict[str, Tensor]:
        return {}  # there is no global model: one domain prompt per cluster

    def close(self) -> None:
        self.backend.close()

    def members(self, cluster: int) -> int:
        return sum(1 for c in self.assignment.values() if c == cluster)

    def _client(self, node: int) -> int | str:
        return self.label(node)  # the client its authenticated node is bound to

    def _by_client(self, assignment: Mapping[int, int]) -> dict[int | str, int]:
        return {self._client(n): c for n, c in sorted(assignment.items())}

    # ------------------------------------------------------------- aggregation
    def aggregate(self, server_round: int, replies: Sequence[ClientReply]) -> None:
        accepted, rejected = self.screen(server_round, replies)
        groups: dict[int, list[Accepted]] = {c: [] for c in self.prompts}
        for a in accepted:
            groups[self.cluster_of(a.reply.node_id)].append(a)
        lr = self.config.federation.server_lr
        delta = self.config.privacy.delta
        clusters: dict[int, dict[str, Any]] = {}
        for cluster, group in sorted(groups.items()):
            n_members = self.members(cluster)
            mean, details = self.combine(group, self.prompts[cluster],
                                         self.sample_rate * max(n_members, 1))
            self.prompts[cluster] = {k: v + lr * mean[k]
                                     for k, v in self.prompts[cluster].items()}
            epsilon = None
            if self.global_dp:
                accountant = self.cluster_accountants[cluster]
                accountant.step(self.noise_multiplier, self.sample_rate)
                epsilon = accountant.epsilon(delta)
            clusters[cluster] = {"members": n_members, "accepted": len(group),
                                 "clients": [self._client(a.reply.node_id) for a in group],
                                 **details, "epsilon": epsilon}
        if self.global_dp:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        info: dict[str, Any] = {
            "accepted": len(accepted), "rejected": rejected, "clusters": clusters,
            "cluster_of": self._by_client(self.assignment),
            "global_epsilon": self.accountant.epsilon(delta) if self.global_dp else None,
        }
        if self.clustering_now:
            info["clustering"] = self._cluster(server_round, accepted, replies)
        info["assignments_next"] = self._by_client(self.pending or self.assignment)
        self.history.record_train(server_round, replies, info)

    def _cluster(self, server_round: int, accepted: Sequence[Accepted],
                 replies: Sequence[ClientReply]) -> dict[str, Any]:
        backend_name = self.config.clustering.backend
        record: dict[str, Any] = {"backend": backend_name, "secure": backend_name == "secure",
                                  "fallback": False, "error": "", "k": None, "seconds": 0.0,
                                  "excluded": {}, "stats": {}}
        excluded: dict[int | str, str] = {}
        accepted_nodes = {a.reply.node_id for a in accepted}
        for reply in replies:
            if reply.submission and reply.node_id not in accepted_nodes:
                excluded[self._client(reply.node_id)] = "its update was not accepted"
        submissions: dict[int, bytes] = {}  # by slot
        for a in accepted:
            if a.reply.submission and a.reply.node_id in self.slot:
                submissions[self.slot[a.reply.node_id]] = a.reply.submission
            else:
                excluded[self._client(a.reply.node_id)] = "no clustering submission in the reply"
        record["submissions"] = len(submissions)
        if len(submissions) < 2:
            record |= {"fallback": True,
                       "error": f"{len(submissions)} submission(s): clustering needs at least 2"}
            log.warning("round %d: clustering skipped (%s); keeping the last assignments",
                        server_round, record["error"])
        else:
            start = time.perf_counter()
            try:
                result = self.backend.cluster(server_round, submissions)
                check_result(result, list(submissions))
            except ClusteringError as exc:
                record |= {"fallback": True, "error": str(exc),
                           "seconds": time.perf_counter() - start}
                log.error("round %d: clustering failed: %s. Falling back to the last "
                          "assignments for the next round", server_round, exc)
            else:
                record["seconds"] = time.perf_counter() - start
                node_of = {slot: node for node, slot in self.slot.items()}
                for slot, why in sorted(result.excluded.items()):
                    who = self._client(node_of[slot]) if slot in node_of else f"slot {slot}"
                    excluded[who] = why
                    log.warning("round %d: clustering excluded client %s (keeps its "
                                "cluster): %s", server_round, who, why)
                labels = {node_of[slot]: label for slot, label in result.assignments.items()}
                matched = match_labels(self.assignment, labels)
                self.pending = self.assignment | matched
                self.clustered |= set(labels)
                record |= {"k": result.k, "stats": dict(result.stats),
                           "assigned": self._by_client(matched),
                           "centroid_epsilon": self._account_centroids(result)}
                log.info("round %d: %s clustering (%s) found k=%d in %.2f s", server_round,
                         backend_name, "secure" if record["secure"] else "INSECURE plaintext",
                         result.k, record["seconds"])
        record["excluded"] = excluded
        return record


    def _account_centroids(self, result: ClusteringResult) -> float | None:
        """Epsilon of the centroid releases so far, or None when none was released.

        Adding or removing one client changes the k cluster sums of unit vectors by at most
        ``centroid_clip = 1`` in L2 (the assignment given), and the sums carry Gaussian
        noise of std at least ``centroid_noise`` x 1; clients submit when sampled, at rate
        ``fraction_train``. This bounds the centroids only: k and the assignments are
        released without noise."""
        noise = self.config.clustering.centroid_noise
        if result.centroids is None or noise <= 0:
            return None
        self.centroid_accountant.step(noise, self.sample_rate)
        return self.centroid_accountant.epsilon(self.config.privacy.delta)


def _clone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}
