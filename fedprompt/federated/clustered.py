"""SecFPP's server side: domain-level prompts per cluster, cluster-wise DP aggregation,
and DP clustering of the clients.

**What one client may change in what others receive** (user-level DP, add/remove one
client): only (a) its own clipped update, in the one cluster sum it belongs to, and (b)
values released by Gaussian mechanisms that are accounted here. Everything else a round
does is a function of public values (config, seed, earlier DP releases) and of each
client's *own* data:

* **clustering** (:mod:`fedprompt.secure.kmeans`): DP spherical k-means from public
  initial centres; its releases (noisy cluster sums, silhouette scores, cluster sizes)
  are accounted in the server's accountant (:mod:`fedprompt.federated.cluster_privacy`);
  a client's label is a function of its own signature and the public centres, so it may
  be opened to the server;
* **which rounds cluster** is public (``clustering.cluster_every``; a failed attempt is
  retried only while the planned budget allows), never "when a new client shows up", and
  a clustering runs whoever submitted (no "too few clients" skip);
* **cluster ids and prompts after a clustering** come from the public centres: new
  clusters are matched to old ones by the cosine of their centres, and each new cluster
  starts from the prompt of the old cluster whose centre is nearest (the old rule, "the
  mean of its members' prompts", weighted the old prompts by membership counts: data);
* **denominators** of the cluster means are public or DP: the cluster's released (noisy)
  size from the last clustering, at least 1 (``clustering.denominator = "noisy-count"``),
  or ``q N / k`` (``"uniform"``); never the realised cluster size;
* a client not yet labelled against the current centres (not sampled when they were
  found, joined later) trains in the cluster a public rule gives it (its old cluster's
  successor by nearest centre, else the lowest cluster id) and is labelled against the
  centres when it next trains (:meth:`~fedprompt.secure.clustering.ClusteringBackend.
  assign`: each client's own label, nothing else is released).

**Aggregation.** With server DP every accepted update is clipped to ``C_G``, each
cluster's clipped updates are summed and the sum gets ``N(0, (z C_G)^2)`` noise per
coordinate, then is divided by the cluster's denominator (the noise std on the mean,
``z C_G / denominator``, uses the same denominator). One client touches exactly one
cluster's sum, so all clusters' sums together are *one* Gaussian release of sensitivity
``C_G`` per round: one accountant step at ``(z, q)`` per round, whatever the number of
clusters. Every cluster releases every round (noise only if none of its members took
part). Without server DP: the plain (or example-weighted) mean of the cluster's updates.

In a clustering round the sealed submissions of the *accepted* replies are relayed to the
backend (the server cannot read them); a reply whose update was rejected has its
submission dropped too. The result takes effect at the start of the next round. If the
backend raises :class:`~fedprompt.secure.clustering.ClusteringError`, the error is
logged, the round is marked ``fallback``, the attempt stays accounted and the last
assignments stay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from fedprompt.config import RunConfig
from fedprompt.federated import cluster_privacy
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


def material_config(material: Mapping[str, bytes]) -> dict[str, bytes]:
    return {f"{MATERIAL_PREFIX}{k}": bytes(v) for k, v in material.items()}


def material_from_config(config: Mapping[str, Any]) -> dict[str, bytes]:
    return {k[len(MATERIAL_PREFIX):]: bytes(v) for k, v in config.items()
            if k.startswith(MATERIAL_PREFIX)}


def match_centres(old: Mapping[int, np.ndarray], new: np.ndarray) -> tuple[
    dict[int, int], dict[int, int]
]:
    """Public matching of new clusters (rows of ``new``) to old ones (id -> centre).

    Returns (``ids``: new slot -> cluster id, ``nearest``: new slot -> the old id whose
    centre has the largest cosine with it). Ids: greedy over cosines, largest first (ties
    by slot then id), each old id used once; unmatched slots get fresh ids above every
    old id. Only public centres are used."""
    old_ids = sorted(old)
    fresh = max([*old_ids, -1]) + 1
    if not old_ids:
        return {j: fresh + j for j in range(len(new))}, {}
    cos = np.stack([new @ old[o] for o in old_ids], axis=1)  # (k_new, k_old)
    nearest = {j: old_ids[int(np.argmax(cos[j]))] for j in range(len(new))}
    pairs = sorted((-cos[j, i], j, old_ids[i]) for j in range(len(new))
                    for i in range(len(old_ids)))
    ids: dict[int, int] = {}
    used: set[int] = set()
    for _, j, o in pairs:
        if j not in ids and o not in used:
            ids[j] = o
            used.add(o)
    for j in range(len(new)):
        if j not in ids:
            ids[j] = fresh
            fresh += 1
    return ids, nearest


def check_result(result: ClusteringResult, submitted: Sequence[int], dim: int) -> None:
    """A backend result must assign only submitted clients, to labels in [0, k), and
    carry its public centres (k >= 2) and sizes of the right shapes."""
    unknown = sorted(set(result.assignments) - set(submitted))
    if unknown:
        raise ClusteringError(f"the clustering result assigns clients that submitted nothing: "
                              f"{unknown}")
    overlap = sorted(set(result.assignments) & set(result.excluded))
    if overlap:
        raise ClusteringError(f"the clustering result both assigns and excludes {overlap}")
    if result.k < 1:
        raise ClusteringError(f"the clustering result has k = {result.k}")
    bad = {n: c for n, c in result.assignments.items() if not 0 <= c < result.k}
    if bad:
        raise ClusteringError(f"the clustering result has labels outside [0, k={result.k}): "
                              f"{bad}")
    if result.k >= 2 and (result.centres is None
                          or np.shape(result.centres) != (result.k, dim)):
        raise ClusteringError(f"a clustering result with k = {result.k} must carry its public "
                              f"centres of shape ({result.k}, {dim})")
    if result.counts is not None and np.shape(result.counts) != (result.k,):
        raise ClusteringError(f"the clustering result's sizes have shape "
                              f"{np.shape(result.counts)}, expected ({result.k},)")


@dataclass
class Clustering:
    """A clustering to apply at the start of the next round (all public but labels)."""

    labels: dict[int, int]  # node -> slot in [0, k)
    centres: np.ndarray | None  # (k, dim) public unit centres; None for k = 1
    sizes: np.ndarray | None  # (k,) released sizes; None when the backend gave none


class ClusteredServer(FederatedServer):
    """:class:`FederatedServer` with one set of shared tensors per cluster."""

    def __init__(self, config: RunConfig, shared: dict[str, Tensor], num_clients: int,
                 local_dp_names: Sequence[str] = (), *, backend: ClusteringBackend) -> None:
        super().__init__(config, shared, num_clients, local_dp_names)
        if not self.shared:
            raise ValueError("a clustered method needs shared (domain-level) tensors")
        self.backend = backend
        # the clustering's noise, and the domain prompts' noise calibrated next to it
        self.clustering_noise = cluster_privacy.clustering_noise_multiplier(config)
        self.clustering_private = self.global_dp and self.clustering_noise > 0
        if self.global_dp:
            self.noise_multiplier = cluster_privacy.domain_noise_multiplier(
                config, self.noise_multiplier)
            self.history.server_noise = self.noise_multiplier
        self._check_backend()
        self.prompts: dict[int, dict[str, Tensor]] = {0: _clone(self.shared)}
        self.centres: dict[int, np.ndarray] = {}  # cluster id -> public unit centre
        self.sizes: dict[int, float] = {}  # cluster id -> released (noisy) size
        self.k: int | None = None  # clusters of the last clustering (None: none yet)
        self.assignment: dict[int, int] = {}  # node id -> cluster id
        self.current: set[int] = set()  # nodes labelled against the current centres
        self.pending: Clustering | None = None  # from the last clustering, for next round
        # node id -> the small id its submissions are sealed and relayed under (Flower node
        # ids are arbitrary 64-bit numbers; backends bind submissions to this id)
        self.slot: dict[int, int] = {}
        self._material: dict[str, bytes] = {}  # this round's, for train configs
        self.clustered_once = False  # a clustering has succeeded
        self.clustering_now = False
        self.assigning_now = False
        self.clustering_releases = 0  # Gaussian releases of clustering accounted so far

    def _check_backend(self) -> None:
        """The backend must make the releases this server accounts for."""
        settings = getattr(self.backend, "settings", None)
        if settings is None:
            return  # a test double: it releases nothing of its own
        c = self.config.clustering
        want = {"noise_multiplier": self.clustering_noise, "k_max": c.k_max,
                "iterations": c.iterations, "dim": c.reduce_dim, "n_parties": c.parties}
        got = {key: getattr(settings, key) for key in want}
        if any(abs(float(got[key]) - float(value)) > 1e-12 for key, value in want.items()):
            raise ValueError(f"the clustering backend's settings {got} disagree with what "
                             f"the run accounts for {want}: build it with "
                             "fedprompt.federated.cluster_backends.build_backend(config)")

    # ------------------------------------------------------------------ rounds
    def begin_round(self, server_round: int, node_ids: Sequence[int]) -> None:
        if self.pending is not None:
            self._apply(self.pending)
            self.pending = None
        for node in sorted(node_ids):
            self.assignment.setdefault(node, self.default_cluster())
            self.slot.setdefault(node, len(self.slot))
        wanted = cluster_privacy.clusters_at_all(self.config) and (
            cluster_privacy.scheduled(self.config, server_round) or (
                self.config.clustering.cluster_every == 0 and not self.clustered_once))
        self.clustering_now = wanted and self._budget_allows(server_round)
        self.assigning_now = (not self.clustering_now and bool(self.centres)
                              and any(n not in self.current for n in node_ids))
        self._material = (material_config(self.backend.client_material())
                          if self.clustering_now or self.assigning_now else {})

    def _budget_allows(self, server_round: int) -> bool:
        """In target-epsilon mode a clustering beyond the plan (a retry after a failed
        attempt) runs only if the composed epsilon of everything planned still fits."""
        privacy = self.config.privacy
        if not self.clustering_private or privacy.mode != "target-epsilon":
            return True
        rounds = self.config.federation.rounds
        later = sum(cluster_privacy.scheduled(self.config, r)
                    for r in range(server_round + 1, rounds + 1))
        runs = 1 + later
        trial = Accountant(self.accountant.kind, [
            *self.accountant.history,
            (self.noise_multiplier, self.sample_rate, rounds - server_round + 1),
            (self.clustering_noise, 1.0, runs * cluster_privacy.run_releases(self.config))])
        projected = trial.epsilon(privacy.delta)
        if projected > privacy.epsilon * (1 + 1e-6):
            log.warning("round %d: no clustering: it would take the composed epsilon to "
                        "%.4g > privacy.epsilon=%g (a failed attempt was accounted)",
                        server_round, projected, privacy.epsilon)
            return False
        return True

    def default_cluster(self) -> int:
        """Where a node with no label against the current centres trains (public)."""
        return min(self.prompts)

    def _transition(self, new: Clustering) -> tuple[dict[int, int], dict[int, int],
                                                    dict[int, int]]:
        """Public bookkeeping of switching to ``new``: (new slot -> cluster id, new slot ->
        the old cluster whose prompt it starts from, node -> cluster id)."""
        keep = min(self.prompts)
        if new.centres is None:  # k = 1
            return {0: keep}, {0: keep}, dict.fromkeys(self.assignment, keep) | dict.fromkeys(
                new.labels, keep)
        ids, nearest = match_centres(self.centres, new.centres)
        source = {j: nearest.get(j, keep) for j in ids}  # no centres yet: one old cluster
        successor = {o: ids[int(np.argmax(new.centres @ centre))]
                     for o, centre in self.centres.items()}
        fallback = min(ids.values())
        assignment = {node: successor.get(cluster, fallback)
                      for node, cluster in self.assignment.items()}
        assignment |= {node: ids[slot] for node, slot in new.labels.items()}
        return ids, source, assignment

    def _apply(self, new: Clustering) -> None:
        """Switch to the clustering ``new``. Cluster ids, starting prompts and the place
        of nodes it did not label follow from the public centres alone (k = 1: the one
        cluster starts from the old prompts mixed with public weights, their released
        sizes)."""
        ids, source, assignment = self._transition(new)
        if new.centres is None:
            old = sorted(self.prompts)
            weights = np.array([max(self.sizes.get(c, 0.0), 0.0) for c in old])
            weights = weights / weights.sum() if weights.sum() > 0 else np.full(
                len(old), 1.0 / len(old))
            self.prompts = {ids[0]: {k: sum(float(w) * self.prompts[c][k]
                                            for w, c in zip(weights, old, strict=True))
                                     for k in self.shared}}
            self.centres = {}
        else:
            self.prompts = {ids[j]: _clone(self.prompts[source[j]]) for j in sorted(ids)}
            self.centres = {ids[j]: np.asarray(new.centres[j], dtype=np.float64)
                            for j in sorted(ids)}
        self.sizes = ({ids[j]: float(new.sizes[j]) for j in sorted(ids)}
                      if new.sizes is not None else {})
        self.assignment = assignment
        self.current = set(new.labels) if new.centres is not None else set(assignment)
        self.k = len(ids)

    def cluster_of(self, node_id: int) -> int:
        return self.assignment.get(node_id, self.default_cluster())

    def shared_for(self, node_id: int) -> dict[str, Tensor]:
        return self.prompts[self.cluster_of(node_id)]

    def train_config(self, node_id: int, server_round: int) -> dict[str, int | str | bytes]:
        if self.clustering_now or (self.assigning_now and node_id not in self.current):
            return {ROUND_KEY: server_round, CLIENT_ID_KEY: self.slot[node_id],
                    **self._material}
        return {}

    def result_arrays(self) -> dict[str, Tensor]:
        return {}  # there is no global model: one domain prompt per cluster

    def close(self) -> None:
        self.backend.close()

    def members(self, cluster: int) -> int:
        return sum(1 for c in self.assignment.values() if c == cluster)

    def denominator(self, cluster: int) -> float:
        """What the cluster's noisy sum is divided by: public, or DP-released."""
        q_n = self.sample_rate * self.num_clients
        if self.k is None:
            return q_n  # one cluster of everyone, as the global methods
        if self.config.clustering.denominator == "uniform" or cluster not in self.sizes:
            return max(q_n / self.k, 1e-12)
        return max(self.sizes[cluster], 1.0)

    def _client(self, node: int) -> int | str:
        return self.label(node)  # the client its authenticated node is bound to

    def _by_client(self, assignment: Mapping[int, int]) -> dict[int | str, int]:
        return {self._client(n): c for n, c in sorted(assignment.items())}

    # ------------------------------------------------------------- aggregation
    def aggregate(self, server_round: int, replies: Sequence[ClientReply]) -> None:
        replies = self.complete(server_round, "train", replies)
        accepted, rejected = self.screen(server_round, replies)
        groups: dict[int, list[Accepted]] = {c: [] for c in self.prompts}
        for a in accepted:
            groups[self.cluster_of(a.reply.node_id)].append(a)
        lr = self.config.federation.server_lr
        delta = self.config.privacy.delta
        clusters: dict[int, dict[str, Any]] = {}
        for cluster, group in sorted(groups.items()):
            denominator = self.denominator(cluster)
            mean, details = self.combine(group, self.prompts[cluster], denominator)
            self.prompts[cluster] = {k: v + lr * mean[k]
                                     for k, v in self.prompts[cluster].items()}
            clusters[cluster] = {"members": self.members(cluster), "accepted": len(group),
                                 "clients": [self._client(a.reply.node_id) for a in group],
                                 "denominator": denominator, **details}
        info: dict[str, Any] = {
            "accepted": len(accepted), "rejected": rejected, "clusters": clusters,
            "cluster_of": self._by_client(self.assignment),
        }
        entries: list[dict[str, Any]] = []
        if self.global_dp:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
            info["aggregate_epsilon"] = self.accountant.epsilon(delta)
            info["aggregate_steps"] = self.accountant.steps
        if self.clustering_now:
            info["clustering"] = self._cluster(server_round, accepted, replies, entries)
        elif self.assigning_now:
            info["labelling"] = self._label(server_round, accepted)
        info["ledger_entries"] = entries
        info["global_epsilon"] = (entries[-1]["epsilon"] if entries
                                  else info.get("aggregate_epsilon"))
        info["assignments_next"] = self._by_client(
            self._preview(self.pending) if self.pending is not None else self.assignment)
        self.history.record_train(server_round, replies, info)

    def _preview(self, pending: Clustering) -> dict[int, int]:
        """The assignment ``pending`` will give when it takes effect."""
        return self._transition(pending)[2]

    def _submissions(self, accepted: Sequence[Accepted], replies: Sequence[ClientReply],
                     excluded: dict[int | str, str], wanted: set[int] | None = None
                     ) -> dict[int, bytes]:
        accepted_nodes = {a.reply.node_id for a in accepted}
        for reply in replies:
            if reply.submission and reply.node_id not in accepted_nodes:
                excluded[self._client(reply.node_id)] = "its update was not accepted"
        submissions: dict[int, bytes] = {}  # by slot
        for a in accepted:
            node = a.reply.node_id
            if wanted is not None and node not in wanted:
                continue
            if a.reply.submission and node in self.slot:
                submissions[self.slot[node]] = a.reply.submission
            else:
                excluded[self._client(node)] = "no clustering submission in the reply"
        return submissions

    def _cluster(self, server_round: int, accepted: Sequence[Accepted],
                 replies: Sequence[ClientReply], entries: list[dict[str, Any]]
                 ) -> dict[str, Any]:
        backend_name = self.config.clustering.backend
        record: dict[str, Any] = {
            "backend": backend_name, "secure": backend_name == "secure",
            "private": self.clustering_private, "noise_multiplier": self.clustering_noise,
            "fallback": False, "error": "", "k": None, "seconds": 0.0, "excluded": {},
            "stats": {}}
        if not self.clustering_private:
            record["note"] = ("not differentially private: the clustering ran without noise "
                              "(no server DP); k, the centres, the sizes and the assignment "
                              "depend on the clients' signatures without a guarantee")
        excluded: dict[int | str, str] = {}
        submissions = self._submissions(accepted, replies, excluded)
        record["submissions"] = len(submissions)
        if self.clustering_private:  # the attempt is accounted whatever its outcome
            steps = cluster_privacy.run_releases(self.config)
            self.accountant.step(self.clustering_noise, 1.0, steps)
            self.clustering_releases += steps
        start = time.perf_counter()
        try:
            result = self.backend.cluster(server_round, submissions)
            check_result(result, list(submissions), self.config.clustering.reduce_dim)
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
            self.pending = Clustering(
                labels, None if result.centres is None else np.asarray(result.centres),
                None if result.counts is None else np.asarray(result.counts, dtype=float))
            self.clustered_once = True
            record |= {"k": result.k, "stats": dict(result.stats),
                       "sizes": None if result.counts is None else [
                           float(v) for v in result.counts],
                       "criterion": None if result.criterion is None else [
                           float(v) for v in result.criterion],
                       "assigned": self._by_client(labels)}
            log.info("round %d: %s clustering (%s, %s) found k=%d in %.2f s", server_round,
                     backend_name, "secure" if record["secure"] else "INSECURE plaintext",
                     "DP" if self.clustering_private else "NOT private", result.k,
                     record["seconds"])
        record["excluded"] = excluded
        if self.clustering_private:
            epsilon = self.accountant.epsilon(self.config.privacy.delta)
            record["epsilon_after"] = epsilon
            entries.append(self._ledger_entry(server_round, epsilon, record["fallback"]))
        return record

    def _ledger_entry(self, server_round: int, epsilon: float, failed: bool
                      ) -> dict[str, Any]:
        """The server-ledger entry of one clustering attempt (user-level)."""
        privacy = self.config.privacy
        outcome = " (failed attempt, accounted in full)" if failed else ""
        return {
            "party": "server",
            "mechanism": f"DP clustering of the clients{outcome}: Gaussian noise (every "
            "compute party adds its share) on " + cluster_privacy.describe_run(self.config)
            + "; sample rate 1 (no amplification by the round's client sampling claimed)",
            "tensors": ["clustering signature (reduced domain-prompt update)"],
            "noise_multiplier": self.clustering_noise,
            "clipping_norm": cluster_privacy.vector_bound(self.config),
            "sample_rate": 1.0, "steps": self.accountant.steps,
            "accountant": privacy.accountant, "epsilon": epsilon, "delta": privacy.delta,
            "round": server_round,
        }

    def _label(self, server_round: int, accepted: Sequence[Accepted]) -> dict[str, Any]:
        """Label clients not yet labelled against the current public centres (each
        client's own label; nothing else is released)."""
        record: dict[str, Any] = {"fallback": False, "error": "", "excluded": {}}
        excluded: dict[int | str, str] = {}
        waiting = {a.reply.node_id for a in accepted} - self.current
        submissions = self._submissions(accepted, [], excluded, waiting)
        if not submissions:
            record["excluded"] = excluded
            return record
        ids = sorted(self.centres)
        try:
            found, bad = self.backend.assign(server_round, submissions,
                                             np.stack([self.centres[c] for c in ids]))
        except ClusteringError as exc:
            record |= {"fallback": True, "error": str(exc)}
            log.error("round %d: labelling failed: %s (retried when they next train)",
                      server_round, exc)
            record["excluded"] = excluded
            return record
        node_of = {slot: node for node, slot in self.slot.items()}
        for slot, why in sorted(bad.items()):
            excluded[self._client(node_of[slot]) if slot in node_of else f"slot {slot}"] = why
        labelled = {}
        for slot, label in found.items():
            if slot not in node_of or not 0 <= label < len(ids):
                raise ClusteringError(f"round {server_round}: the backend labelled slot "
                                      f"{slot} with {label} (k = {len(ids)})")
            node = node_of[slot]
            self.assignment[node] = ids[label]
            self.current.add(node)
            labelled[node] = ids[label]
        record |= {"assigned": self._by_client(labelled), "excluded": excluded}
        return record


def _clone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}

