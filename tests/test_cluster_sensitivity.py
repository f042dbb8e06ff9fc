"""SecFPP's cluster-wise DP holds at the level of what *other* clients receive.

The user-level neighbouring-dataset recipe (docs/privacy-testing, section 2) run at the
server with clients as records: federation D has one extra client j, D' is D without it.
Both runs use the real :class:`ClusteredServer` and the plaintext backend (the same
algorithm the compute parties run). Every DP release is synchronised: D' replays the
clustering releases D made (noisy cluster sums, silhouette scores, sizes), both draw the
same aggregation noise, and before every step D' continues from D's released prompts.
Then adding or removing j may change any other client's received domain update by at
most the calibrated sensitivity ``server_lr C_G / denominator`` of its cluster, and must
not change any other client's cluster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedprompt.config import RunConfig, load_config
from fedprompt.federated.cluster_backends import clustering_settings
from fedprompt.federated.cluster_privacy import run_releases, server_dp
from fedprompt.federated.clustered import ClusteredServer
from fedprompt.federated.server import ClientReply
from fedprompt.privacy.accounting import RDP_ORDERS
from fedprompt.secure.clustering import ClusteringResult, round_seed
from fedprompt.secure.kmeans import Releases, dp_spherical_kmeans
from fedprompt.secure.plaintext_clustering import PlaintextClustering

FEDERATIONS = 300
SHAPE = (2, 3)  # the domain prompt's shape in these federations
TOLERANCE = 1e-5  # float32 prompts


class RecordingBackend(PlaintextClustering):
    """The plaintext backend; remembers what it released, or replays given releases."""

    def __init__(self, *args: object, replay: dict[int, Releases] | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.replay = replay
        self.released: dict[int, Releases] = {}

    def cluster(self, round_id: int, submissions: dict[int, bytes], *,
                replay: Releases | None = None) -> ClusteringResult:
        forced = self.replay[round_id] if self.replay is not None else replay
        result = super().cluster(round_id, submissions, replay=forced)
        assert result.releases is not None
        self.released[round_id] = result.releases
        return result


@dataclass
class Federation:
    config: RunConfig
    signatures: dict[int, np.ndarray]  # client -> unit vector
    updates: dict[int, list[np.ndarray]]  # client -> update per round
    absent_round1: set[int]  # clients that join in round 2
    extra: int  # the client that D has and D' lacks
    nodes: dict[int, int]  # client -> node id


def make_federation(index: int, dim: int | None = None) -> Federation:
    rng = np.random.default_rng(1000 + index)
    n_others = int(rng.integers(1, 13))
    dim = int(rng.choice([4, 8, 16])) if dim is None else dim
    k_true = int(rng.integers(1, 5))
    centres = rng.normal(size=(k_true, dim))
    spread = float(rng.choice([0.2, 0.6, 1.5]))
    clients = list(range(n_others + 1))
    extra = int(rng.integers(0, n_others + 1))
    signatures = {}
    for c in clients:
        v = centres[rng.integers(0, k_true)] + spread * rng.normal(size=dim) / np.sqrt(dim)
        if c == extra and rng.random() < 0.5:  # an adversarial extra: between clusters
            v = centres.mean(0) + 0.05 * rng.normal(size=dim)
        signatures[c] = v / np.linalg.norm(v)
    clip = float(rng.choice([0.1, 1.0, 3.0]))
    updates = {c: [rng.normal(size=SHAPE) * clip * float(rng.choice([0.2, 1.0, 5.0]))
                   for _ in range(3)] for c in clients}
    if rng.random() < 0.5:  # the extra client pushes hard
        updates[extra] = [u * 100.0 for u in updates[extra]]
    absent = {c for c in clients if rng.random() < 0.2}
    nodes = dict(zip(clients, rng.permutation(np.arange(100, 100 + len(clients))).tolist(),
                     strict=True))
    z_c = float(rng.choice([0.0, 0.5, 2.0]))
    config = load_config(overrides=[
        "federation.method='secfpp'", "federation.rounds=3",
        f"federation.fraction_train={rng.choice([0.5, 1.0])}",
        f"federation.server_lr={rng.choice([0.5, 1.0])}",
        "privacy.mode='noise-multiplier'", "privacy.local=false", "privacy.server=true",
        f"privacy.server_noise_multiplier={rng.choice([0.0, 0.7])}",
        f"privacy.server_clip_norm={clip}", "privacy.reproducible_noise=true",
        "clustering.backend='plaintext'", f"clustering.reduce_dim={dim}",
        f"clustering.k_max={rng.integers(2, 5)}", f"clustering.iterations={rng.integers(1, 5)}",
        f"clustering.noise_multiplier={z_c if z_c > 0 else 1e-9}",
        f"clustering.denominator='{rng.choice(['noisy-count', 'uniform'])}'",
        f"seed={index}",
    ])
    return Federation(config, signatures, updates, absent, extra, nodes)


def _server(fed: Federation, backend: RecordingBackend) -> ClusteredServer:
    shared = {"domain_ctx": torch.zeros(SHAPE)}
    return ClusteredServer(fed.config, shared, num_clients=len(fed.signatures),
                           backend=backend)


def _replies(fed: Federation, server: ClusteredServer, clients: list[int],
             server_round: int) -> list[ClientReply]:
    replies = []
    for c in clients:
        node = fed.nodes[c]
        config = server.train_config(node, server_round)
        submission = b""
        if config:
            submission = PlaintextClustering.seal(
                fed.signatures[c], server.backend.client_material(), server_round,
                int(config["cluster-client-id"]))
        replies.append(ClientReply(
            node_id=node, metrics={"partition-id": c, "num-examples": 10},
            update={"domain_ctx": fed.updates[c][server_round - 1].astype(np.float32)},
            submission=submission))
    return replies


def _round(fed: Federation, server: ClusteredServer, clients: list[int],
           server_round: int) -> dict[int, np.ndarray]:
    """One round; what every client receives: its cluster's prompt change this round."""
    nodes = [fed.nodes[c] for c in clients]
    server.begin_round(server_round, nodes)
    server.address(server_round, "train", nodes)
    before = {c: server.cluster_of(fed.nodes[c]) for c in clients}
    prompts = copy.deepcopy(server.prompts)
    server.aggregate(server_round, _replies(fed, server, clients, server_round))
    return {c: (server.prompts[before[c]]["domain_ctx"]
                - prompts[before[c]]["domain_ctx"]).double().numpy() for c in clients}


def _noise_draw(seed: int):
    rng = np.random.default_rng(seed)
    return lambda shape, std: rng.normal(0.0, std, shape)


def run_neighbours(fed: Federation) -> list[dict[str, float]]:
    """Rounds 1-3 on D and D' with every release synchronised; per round and other client
    the displacement of its received update and the calibrated sensitivity."""
    settings = clustering_settings(fed.config)
    big = _server(fed, RecordingBackend(settings, draw=_noise_draw(fed.config.seed)))
    small = _server(fed, RecordingBackend(settings, draw=_noise_draw(0), replay={}))
    everyone = sorted(fed.signatures)
    others = [c for c in everyone if c != fed.extra]
    out = []
    for server_round in (1, 2, 3):
        present = [c for c in everyone if server_round > 1 or c not in fed.absent_round1]
        small.backend.replay = big.backend.released  # type: ignore[attr-defined]
        got_big = _round(fed, big, present, server_round)
        got_small = _round(fed, small, [c for c in present if c != fed.extra], server_round)
        for c in others:
            if c not in got_small:
                continue
            denominator = big.history.rounds[server_round]["server"]["clusters"][
                _cluster_before(big, fed, c, server_round)]["denominator"]
            out.append({
                "round": server_round, "client": c,
                "displacement": float(np.linalg.norm(got_big[c] - got_small[c])),
                "sensitivity": fed.config.federation.server_lr
                * fed.config.privacy.server_clip_norm / denominator,
            })
        # other clients' clusters for the next round: the same in both runs
        for c in others:
            assert small.assignment.get(fed.nodes[c]) == big.assignment.get(fed.nodes[c]), (
                f"round {server_round}: client {c}'s cluster depends on client {fed.extra}")
        # D' continues from D's released state (the recipe's synchronised history)
        _synchronise(small, big)
    return out


def _cluster_before(server: ClusteredServer, fed: Federation, client: int,
                    server_round: int) -> int:
    return server.history.rounds[server_round]["server"]["cluster_of"][client]


def _synchronise(small: ClusteredServer, big: ClusteredServer) -> None:
    assert sorted(small.prompts) == sorted(big.prompts)
    small.prompts = copy.deepcopy(big.prompts)  # (the noise streams stay in step by
    # themselves: both runs draw the same shapes for the same clusters)


@pytest.fixture
def no_epsilon(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accountant's epsilon (slow at q < 1, irrelevant to the displacement) as 0."""
    from fedprompt.privacy.accounting import Accountant

    monkeypatch.setattr(Accountant, "epsilon", lambda self, delta: 0.0)


def test_one_client_moves_no_other_clients_update_beyond_the_sensitivity(no_epsilon) -> None:
    """300 random federations (1-12 other clients, random signatures around 1-4 centres,
    random updates and clip norms, an extra client that is sometimes adversarial, late
    joiners, both denominators, q = 0.5 or 1): 0 violations."""
    violations, rows, moved = [], 0, 0
    for index in range(FEDERATIONS):
        fed = make_federation(index)
        for row in run_neighbours(fed):
            rows += 1
            moved += row["displacement"] > TOLERANCE
            if row["displacement"] > row["sensitivity"] * (1 + 1e-6) + TOLERANCE:
                violations.append((index, row))
    assert rows > 3 * FEDERATIONS
    assert moved > 0  # the extra client does reach others, within the bound
    assert not violations, violations[:5]


def test_the_property_test_catches_a_realised_size_denominator(monkeypatch,
                                                              no_epsilon) -> None:
    """The test can fail: with the old calibration (a cluster's sum divided by its
    realised number of members) the same harness finds violations."""

    def realised(self: ClusteredServer, cluster: int) -> float:
        return self.sample_rate * max(self.members(cluster), 1)

    monkeypatch.setattr(ClusteredServer, "denominator", realised)
    violations = 0
    for index in range(40):
        for row in run_neighbours(make_federation(index)):
            violations += row["displacement"] > row["sensitivity"] * (1 + 1e-6) + TOLERANCE
    assert violations > 0


# ------------------------------------------------------------------------ accounting
def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' RDP analysis functions on the composed history, summed by hand."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=z, steps=n, orders=RDP_ORDERS)
              for z, q, n in history)
    eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize("mode", ["noise-multiplier", "target-epsilon"])
def test_the_server_ledger_equals_an_independent_recomputation(mode: str) -> None:
    """Every clustering attempt is in the server ledger (its own entries), and the
    ledger's epsilon is that of the composed releases: rounds x (z, q) for the domain
    prompts and attempts x releases x (z_c, 1) for the clustering."""
    fed = make_federation(7, dim=8)
    extra = ["privacy.mode='target-epsilon'", "privacy.epsilon=8.0",
             "clustering.noise_multiplier=0.0", "clustering.epsilon_share=0.25"] if (
        mode == "target-epsilon") else ["clustering.noise_multiplier=1.5",
                                        "clustering.cluster_every=2"]
    config = load_config(overrides=[
        "federation.method='secfpp'", "federation.rounds=4", "federation.fraction_train=0.5",
        "privacy.mode='noise-multiplier'", "privacy.local=false", "privacy.server=true",
        "privacy.server_noise_multiplier=1.1", "privacy.reproducible_noise=true",
        "clustering.backend='plaintext'", "clustering.reduce_dim=8", "clustering.k_max=3",
        "clustering.iterations=3", *extra])
    assert server_dp(config)
    fed.config = config
    fed.updates = {c: [*u, u[-1]] for c, u in fed.updates.items()}  # a 4th round
    server = _server(fed, RecordingBackend(clustering_settings(config)))
    clients = sorted(fed.signatures)
    for server_round in range(1, 5):
        _round(fed, server, clients, server_round)
    ledger = server.history.server_ledger
    clustering = [e for e in ledger.entries if e.sample_rate == 1.0]
    aggregate = [e for e in ledger.entries if e.sample_rate != 1.0]
    attempts = 2 if mode == "noise-multiplier" else 1  # rounds 1, 3 / round 1 only
    assert len(clustering) == attempts and len(aggregate) == 4
    assert all("DP clustering" in e.mechanism for e in clustering)
    z, z_c = server.noise_multiplier, server.clustering_noise
    assert z_c > 0 and all(e.noise_multiplier == z_c for e in clustering)
    history = [(z, 0.5, 4), (z_c, 1.0, attempts * run_releases(config))]
    assert ledger.epsilon == pytest.approx(_independent_epsilon(history, 1e-5), rel=1e-9)
    assert ledger.steps == 4 + attempts * run_releases(config)
    eps = [e.epsilon for e in ledger.entries]
    assert eps == sorted(eps)
    summary = server.history.rounds[4]["server"]["global_epsilon"]
    assert summary == pytest.approx(ledger.epsilon)
    if mode == "target-epsilon":
        # calibrated: everything planned lands on the target, the clustering on its share
        assert ledger.epsilon == pytest.approx(8.0, rel=2e-3)
        assert ledger.epsilon <= 8.0 * (1 + 1e-6)
        alone = _independent_epsilon([(z_c, 1.0, run_releases(config))], 1e-5)
        assert alone == pytest.approx(2.0, rel=2e-2) and alone <= 2.0 * (1 + 1e-6)


def test_a_failed_attempt_is_accounted_and_not_retried_past_the_budget() -> None:
    """target-epsilon: the planned clustering failed (accounted in full); a retry would
    exceed the budget, so none runs and the final epsilon is still within the target."""
    from fedprompt.secure.clustering import ClusteringError

    class Failing(RecordingBackend):
        calls = 0

        def cluster(self, round_id, submissions, *, replay=None):
            Failing.calls += 1
            raise ClusteringError("party 1 died")

    fed = make_federation(11)
    config = load_config(overrides=[
        "federation.method='secfpp'", "federation.rounds=3", "privacy.mode='target-epsilon'",
        "privacy.epsilon=4.0", "privacy.local=false", "privacy.server=true",
        "clustering.backend='plaintext'", f"clustering.reduce_dim={len(fed.signatures[0])}",
        "clustering.k_max=2", "clustering.iterations=2"])
    fed.config = config
    server = _server(fed, Failing(clustering_settings(config)))
    clients = sorted(fed.signatures)
    for server_round in (1, 2, 3):
        _round(fed, server, clients, server_round)
    assert Failing.calls == 1
    record = server.history.rounds[1]["server"]["clustering"]
    assert record["fallback"] and "party 1 died" in record["error"]
    assert "clustering" not in server.history.rounds[2]["server"]
    assert server.history.server_ledger.epsilon <= 4.0 * (1 + 1e-6)
    assert any("failed attempt" in e.mechanism for e in server.history.server_ledger.entries)


def test_without_server_dp_the_clustering_is_recorded_as_not_private() -> None:
    fed = make_federation(5)
    config = load_config(overrides=[
        "federation.method='secfpp'", "federation.rounds=1", "privacy.mode='off'",
        "clustering.backend='plaintext'", f"clustering.reduce_dim={len(fed.signatures[0])}",
        "clustering.noise_multiplier=3.0"])
    fed.config = config
    backend = RecordingBackend(clustering_settings(config))
    assert backend.settings.noise_multiplier == 0.0  # no noise without server DP
    server = _server(fed, backend)
    _round(fed, server, sorted(fed.signatures), 1)
    record = server.history.rounds[1]["server"]["clustering"]
    assert record["private"] is False and "not differentially private" in record["note"]
    assert not server.history.server_ledger.entries


def test_a_backend_whose_noise_differs_from_the_accounting_is_refused() -> None:
    fed = make_federation(2)
    settings = clustering_settings(fed.config)
    with pytest.raises(ValueError, match="disagree with what the run accounts for"):
        _server(fed, RecordingBackend(replace(settings, noise_multiplier=0.0)))


def test_replayed_releases_fix_every_public_output() -> None:
    """The reference mechanism: with the releases replayed, k, the centres and sizes are
    those of the run that made them, and each client's label depends only on its own
    vector (drop any other client: the labels of the rest are unchanged)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    draw = _noise_draw(9)
    stds = replace(clustering_settings(make_federation(0).config), dim=8, k_max=4,
                   iterations=3, noise_multiplier=0.6).noise_stds()
    ref = dp_spherical_kmeans(x, 4, 3, round_seed(0, 1), noise=stds, draw=draw)
    for drop in range(12):
        rest = np.delete(x, drop, axis=0)
        again = dp_spherical_kmeans(rest, 4, 3, round_seed(0, 1), noise=stds,
                                    replay=ref.releases)
        assert again.k == ref.k
        assert np.array_equal(again.labels, np.delete(ref.labels, drop))
        if ref.centres is not None:
            assert np.array_equal(again.centres, ref.centres)
        assert np.array_equal(again.counts, ref.counts)
