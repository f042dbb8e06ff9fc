"""SecFPP in the federation: hierarchical prompts, clustering, cluster-wise DP."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import PERSONAL_KEY
from clients.app import app as client_app
from fedprompt.config import load_config
from fedprompt.data.domains import client_domains, domain_slot
from fedprompt.errors import DataError
from fedprompt.federated.clustered import SHARE_KEY, match_centres
from fedprompt.secure.clustering import ClusteringError, ClusteringResult, ClusteringSettings
from fedprompt.secure.plaintext_clustering import PlaintextClustering
from strategies.inprocess import inprocess_grid, run_inprocess, run_on_grid
from tests.conftest import SHARED_DATA, shared_dataset

BASE = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "train.batch_size=16", "federation.rounds=2", "federation.method='secfpp'",
        "clustering.backend='plaintext'", "clustering.reduce_dim=16",
        "data.domains='digits,digits-inverted'", "data.num_clients=4", "data.partition='iid'"]


def _config(tmp_path: Path, *overrides: str):
    return load_config(overrides=[*BASE, f"output_dir='{tmp_path}'", *overrides])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _centres(k: int, dim: int = 16) -> np.ndarray:
    """Public centres for scripted results: the first k unit axes."""
    return np.eye(dim)[:k]


class FixedClustering:
    """A backend whose assignments are scripted per round (by relay id): a dict of
    labels (slots of the public centres ``_centres(k)``), an exception to raise, or None
    for "cluster in the clear". Submissions are still opened with the plaintext backend,
    so they must be valid. ``sizes`` scripts the released cluster sizes."""

    insecure = True

    def __init__(self, script: dict[int, Any], dim: int = 16,
                 exclude: dict[int, dict[int, str]] | None = None,
                 sizes: dict[int, list[float]] | None = None) -> None:
        self.inner = PlaintextClustering(ClusteringSettings(dim=dim))
        self.script = script
        self.exclude = exclude or {}
        self.sizes = sizes or {}
        self.dim = dim
        self.calls: list[tuple[int, list[int]]] = []
        self.labelled: list[tuple[int, list[int]]] = []
        self.closed = False

    def client_material(self) -> dict[str, bytes]:
        return self.inner.client_material()

    seal = staticmethod(PlaintextClustering.seal)

    def cluster(self, round_id: int, submissions: dict[int, bytes]) -> ClusteringResult:
        self.calls.append((round_id, sorted(submissions)))
        for cid, blob in submissions.items():
            self.inner.open(blob, round_id, cid)
        planned = self.script.get(round_id)
        if isinstance(planned, Exception):
            raise planned
        if planned is None:
            return self.inner.cluster(round_id, submissions)
        excluded = self.exclude.get(round_id, {})
        assignments = {c: planned[c] for c in submissions if c not in excluded}
        k = max(planned.values()) + 1
        sizes = self.sizes.get(round_id, [float(sum(1 for v in assignments.values() if v == j))
                                          for j in range(k)])
        return ClusteringResult(k=k, assignments=assignments, excluded=dict(excluded),
                                centres=_centres(k, self.dim) if k > 1 else None,
                                counts=np.array(sizes))

    def assign(self, round_id: int, submissions: dict[int, bytes],
               centres: np.ndarray) -> tuple[dict[int, int], dict[int, str]]:
        self.labelled.append((round_id, sorted(submissions)))
        return self.inner.assign(round_id, submissions, centres)

    def close(self) -> None:
        self.closed = True


class Recorder:
    """Wraps the ClientApp; records what every node receives and sends."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.app = ClientApp()
        self.app.train()(self._train)
        self.app.evaluate()(self._evaluate)

    def _note(self, kind: str, msg: Message, context: Context) -> None:
        self.received.append({
            "kind": kind, "node": context.node_id,
            "round": int(msg.content["config"]["server-round"]),
            "arrays": msg.content["arrays"].to_torch_state_dict(),
        })

    def _train(self, msg: Message, context: Context) -> Message:
        self._note("train", msg, context)
        reply = client_app(msg, context)
        self.sent.append({"kind": "train", "node": context.node_id,
                          "round": int(msg.content["config"]["server-round"]),
                          "records": set(reply.content.keys()),
                          "arrays": reply.content["arrays"].to_torch_state_dict(),
                          "config": dict(reply.content["config"])})
        return reply

    def _evaluate(self, msg: Message, context: Context) -> Message:
        self._note("evaluate", msg, context)
        reply = client_app(msg, context)
        self.sent.append({"kind": "evaluate", "node": context.node_id,
                          "records": set(reply.content.keys())})
        return reply


# ------------------------------------------------------------------------ units
def test_multi_domain_clients_are_dealt_in_blocks_and_split_within_their_domain() -> None:
    config = load_config(overrides=["data.domains='digits, digits-inverted'",
                                    "data.num_clients=5"])
    assert config.data.domains == ["digits", "digits-inverted"]
    assert client_domains(config.data, 5) == [0, 0, 0, 1, 1]
    slot = domain_slot(config.data, 3, 5)
    assert (slot.domain, slot.partition_id, slot.num_partitions) == (1, 0, 2)
    assert slot.data.dataset == "digits-inverted" and slot.data.domains == []
    from fedprompt.data import load_dataset

    with pytest.raises(DataError, match="multi-domain run is federated"):
        load_dataset(config.data)


def test_new_clusters_take_ids_and_prompts_by_their_public_centres() -> None:
    old = {0: np.array([1.0, 0.0, 0.0]), 3: np.array([0.0, 1.0, 0.0])}
    # the backend's slots are arbitrary: swapped centres keep their ids
    ids, nearest = match_centres(old, np.array([[0.1, 0.99, 0.0], [0.99, 0.1, 0.0]]))
    assert ids == {0: 3, 1: 0} and nearest == {0: 3, 1: 0}
    # a third cluster gets a fresh id and starts from the nearest old cluster's prompt
    ids, nearest = match_centres(old, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                                                [0.6, 0.0, 0.8]]))
    assert ids == {0: 0, 1: 3, 2: 4} and nearest[2] == 0
    # before any centres: fresh ids 0..k-1
    assert match_centres({}, np.eye(3)[:2]) == ({0: 0, 1: 1}, {})


# --------------------------------------------------------------------- federation
def test_secfpp_runs_in_process_and_records_the_clustering(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.rounds=3")
    grid = inprocess_grid(config, 4)
    out = run_on_grid(grid, config, tmp_path / "run")
    data = _metrics(out)
    assert [r["summary"]["clients_trained"] for r in data["rounds"]] == [4, 4, 4]
    first = data["rounds"][0]
    assert set(first["server"]["cluster_of"].values()) == {0}  # round 1: one cluster
    clustering = first["server"]["clustering"]
    assert clustering["backend"] == "plaintext" and clustering["secure"] is False
    assert clustering["submissions"] == 4 and not clustering["fallback"]
    assert first["summary"]["clustering_k"] >= 1
    for record in data["rounds"]:
        assert record["summary"]["cluster_ari"] is not None  # known domains
        assert set(record["server"]["assignments_next"]) == {"0", "1", "2", "3"}
    # first-update signatures are fixed per client: once everyone is clustered, later
    # rounds do not cluster again (and nobody is asked for a share)
    assert all("clustering" not in r["server"] for r in data["rounds"][1:])
    assert data["rounds"][2]["server"]["cluster_of"] == first["server"]["assignments_next"]
    # the class-level prompt is personal: one row per class of the client's domain
    personal = grid.contexts[1].state[PERSONAL_KEY].to_torch_state_dict()
    assert set(personal) == {"class_ctx"} and personal["class_ctx"].shape[0] == 10
    header = (out / "rounds.csv").read_text().splitlines()[0].split(",")
    assert {"clusters", "clustering_k", "clustering_fallback", "cluster_ari"} <= set(header)
    clients = (out / "clients.csv").read_text().splitlines()[0].split(",")
    assert {"cluster", "cluster_next"} <= set(clients)


def test_class_level_prompts_are_never_in_any_reply(tmp_path: Path) -> None:
    recorder = Recorder()
    run_inprocess(_config(tmp_path, "clustering.reduce='update'", "clustering.cluster_every=1"),
                  4, client_app=recorder.app)
    train = [s for s in recorder.sent if s["kind"] == "train"]
    assert len(train) == 8
    for reply in train:
        assert set(reply["arrays"]) == {"domain_ctx"}
        assert reply["records"] == {"arrays", "metrics", "config"}
        assert set(reply["config"]) == {"declined-reason", SHARE_KEY}
        assert isinstance(reply["config"][SHARE_KEY], bytes)
    evaluate = [s for s in recorder.sent if s["kind"] == "evaluate"]
    assert evaluate and all(s["records"] == {"metrics"} for s in evaluate)


def test_domain_prompts_of_a_cluster_never_reach_another_cluster(tmp_path: Path) -> None:
    # relay ids 0, 1 -> cluster 0 and 2, 3 -> cluster 1 from round 1 on (nodes 1..4)
    split = {0: 0, 1: 0, 2: 1, 3: 1}
    backend = FixedClustering({r: split for r in range(1, 5)})
    recorder = Recorder()
    config = _config(tmp_path, "federation.rounds=4")
    grid = inprocess_grid(config, 4, client_app=recorder.app)
    out = run_on_grid(grid, config, tmp_path / "run", backend=backend)
    assert backend.closed  # the strategy closed the backend at the end
    cluster = {1: 0, 2: 0, 3: 1, 4: 1}
    got = {(r["kind"], r["round"], r["node"]): r["arrays"]["domain_ctx"]
           for r in recorder.received}
    update = {(s["round"], s["node"]): s["arrays"]["domain_ctx"]
              for s in recorder.sent if s["kind"] == "train"}
    for rnd in (3, 4):  # clusters in force from round 2; check every later round exactly
        for node, c in cluster.items():
            members = [n for n, cc in cluster.items() if cc == c]
            expected = got[("train", rnd - 1, node)] + torch.stack(
                [update[(rnd - 1, m)] for m in members]).mean(0)
            torch.testing.assert_close(got[("train", rnd, node)], expected)
            others = [n for n, cc in cluster.items() if cc != c]
            for other in others:
                assert not torch.equal(got[("train", rnd, node)],
                                       got[("train", rnd, other)])
    data = _metrics(out)
    assert data["rounds"][-1]["server"]["cluster_of"] == {"0": 0, "1": 0, "2": 1, "3": 1}


def test_a_failed_clustering_round_keeps_the_last_assignments(tmp_path: Path,
                                                              caplog) -> None:
    split = {0: 0, 1: 0, 2: 1, 3: 1}
    backend = FixedClustering({1: split, 2: ClusteringError("compute party 1 died"),
                               3: {0: 1, 1: 1, 2: 1, 3: 1}},
                              exclude={3: {0: "share has the wrong size"}})
    config = _config(tmp_path, "federation.rounds=4", "clustering.reduce='update'",
                     "clustering.cluster_every=1")
    with caplog.at_level(logging.WARNING, logger="fedprompt.server"):
        data = _metrics(run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run",
                                    backend=backend))
    rounds = data["rounds"]
    failed = rounds[1]["server"]["clustering"]
    assert failed["fallback"] is True and "compute party 1 died" in failed["error"]
    assert rounds[1]["summary"]["clustering_fallback"] is True
    assert rounds[1]["server"]["assignments_next"] == rounds[0]["server"]["assignments_next"]
    assert rounds[2]["server"]["cluster_of"] == {"0": 0, "1": 0, "2": 1, "3": 1}
    assert any("clustering failed: compute party 1 died" in r.getMessage()
               for r in caplog.records)
    # round 3: client 0 is excluded (bad share) and goes to the successor of its cluster
    # by the public centres (cluster 0); 1 moves to cluster 1
    third = rounds[2]["server"]
    assert third["clustering"]["excluded"] == {"0": "share has the wrong size"}
    assert third["assignments_next"] == {"0": 0, "1": 1, "2": 1, "3": 1}
    assert rounds[3]["server"]["cluster_of"] == {"0": 0, "1": 1, "2": 1, "3": 1}


def test_clients_missing_from_a_clustering_are_labelled_against_its_public_centres(
        tmp_path: Path) -> None:
    """first-update, cluster once: a client excluded from the round-1 clustering trains in
    a public default cluster in round 2 and is labelled against the public centres then
    (the backend's assign, which releases nothing else); nobody is clustered again."""
    backend = FixedClustering({1: {0: 0, 1: 0, 2: 1, 3: 1}},
                              exclude={1: {3: "share has the wrong size"}})
    config = _config(tmp_path, "federation.rounds=3")
    rounds = _metrics(run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run",
                                  backend=backend))["rounds"]
    assert [c[0] for c in backend.calls] == [1]
    assert backend.labelled == [(2, [3])]  # only the client not labelled yet
    assert rounds[1]["server"]["cluster_of"]["3"] == 0  # the successor of its old cluster
    label = rounds[1]["server"]["labelling"]["assigned"]["3"]  # nearest of e0, e1
    assert label in (0, 1) and rounds[2]["server"]["cluster_of"]["3"] == label
    assert "labelling" not in rounds[2]["server"] and "clustering" not in rounds[2]["server"]


def test_first_update_signatures_are_clustered_once_and_retried_after_a_failure(
        tmp_path: Path) -> None:
    backend = FixedClustering({1: ClusteringError("timed out after 120 s"),
                               2: {0: 0, 1: 0, 2: 1, 3: 1}})
    config = _config(tmp_path, "federation.rounds=3")
    rounds = _metrics(run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run",
                                  backend=backend))["rounds"]
    assert [call[0] for call in backend.calls] == [1, 2]  # round 1 failed: retried once
    assert rounds[0]["server"]["clustering"]["fallback"] is True
    assert "clustering" not in rounds[2]["server"]
    assert rounds[2]["server"]["cluster_of"] == {"0": 0, "1": 0, "2": 1, "3": 1}


def test_cluster_wise_dp_noise_denominators_and_the_server_ledger(tmp_path: Path) -> None:
    """Each cluster's noisy sum is divided by its released (noisy) size, never by its
    realised membership; the noise std on the mean uses the same denominator; one
    aggregate release per round and the clustering's releases are all entries of the
    server ledger (no per-cluster ledgers)."""
    backend = FixedClustering({1: {0: 0, 1: 1, 2: 1, 3: 1}}, sizes={1: [1.3, 2.6]})
    config = _config(tmp_path, "federation.rounds=3", "privacy.mode='noise-multiplier'",
                     "privacy.local=false", "privacy.server=true",
                     "privacy.server_noise_multiplier=0.7", "privacy.server_clip_norm=0.5",
                     "privacy.reproducible_noise=true", "clustering.noise_multiplier=3.0")
    out = run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run", backend=backend)
    rounds = _metrics(out)["rounds"]
    first = rounds[0]["server"]["clusters"]["0"]
    assert first["denominator"] == 4 and first["noise_std"] == pytest.approx(0.7 * 0.5 / 4)
    assert rounds[0]["server"]["clustering"]["private"] is True
    for record in rounds[1:]:
        clusters = record["server"]["clusters"]
        assert clusters["0"]["members"] == 1 and clusters["1"]["members"] == 3
        # per-client norms are not covered by any epsilon: withheld under DP
        assert "update_norms" not in clusters["0"] and "clipped" not in clusters["1"]
        assert clusters["0"]["denominator"] == 1.3 and clusters["1"]["denominator"] == 2.6
        assert clusters["0"]["noise_std"] == pytest.approx(0.7 * 0.5 / 1.3)
        assert clusters["1"]["noise_std"] == pytest.approx(0.7 * 0.5 / 2.6)
        assert record["server"]["cluster_of"] == {"0": 0, "1": 1, "2": 1, "3": 1}
    ledgers = {lg["party"]: lg for lg in
               json.loads((out / "privacy_ledger.json").read_text())["ledgers"]}
    assert not [p for p in ledgers if p.startswith("cluster")]
    server = ledgers["server"]["entries"]
    kinds = ["clustering" if "DP clustering" in e["mechanism"] else "aggregate"
             for e in server]
    assert kinds == ["aggregate", "clustering", "aggregate", "aggregate"]
    eps = [e["epsilon"] for e in server]
    steps = [e["steps"] for e in server]
    assert eps == sorted(eps) and len(set(eps)) == 4 and steps == sorted(steps)
    assert server[1]["noise_multiplier"] == 3.0 and server[1]["sample_rate"] == 1.0
    assert rounds[-1]["summary"]["global_epsilon"] == pytest.approx(ledgers["server"]["epsilon"])


def test_dp_clustering_in_a_federation_is_accounted(tmp_path: Path) -> None:
    """The plaintext backend with the run's settings: every clustering is a ledger entry
    of the server, at the clustering's noise multiplier, and the round's record says so."""
    config = _config(tmp_path, "federation.rounds=2", "privacy.mode='noise-multiplier'",
                     "privacy.local=false", "privacy.server_noise_multiplier=1.0",
                     "clustering.noise_multiplier=2.0", "clustering.cluster_every=1",
                     "clustering.reduce='update'")
    out = run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run")
    rounds = _metrics(out)["rounds"]
    records = [r["server"]["clustering"] for r in rounds]
    assert all(r["private"] and r["noise_multiplier"] == 2.0 for r in records)
    ledger = {lg["party"]: lg for lg in
              json.loads((out / "privacy_ledger.json").read_text())["ledgers"]}["server"]
    clustering = [e for e in ledger["entries"] if "DP clustering" in e["mechanism"]]
    assert [e["round"] for e in clustering] == [1, 2]
    assert [e["epsilon"] for e in clustering] == pytest.approx(
        [r["epsilon_after"] for r in records])


def test_without_server_dp_the_clustering_is_labelled_not_private(tmp_path: Path) -> None:
    config = _config(tmp_path, "clustering.reduce='update'")
    out = run_on_grid(inprocess_grid(config, 4), config, tmp_path / "run")
    parties = {lg["party"]: lg for lg in
               json.loads((out / "privacy_ledger.json").read_text())["ledgers"]}
    assert not parties["server"]["entries"]
    record = _metrics(out)["rounds"][0]["server"]["clustering"]
    assert record["private"] is False and "not differentially private" in record["note"]


def _two_domain_folders(root: Path) -> list[Path]:
    """Small ImageFolder copies (symlinks) of cifar10-mini and flowers12: 8 train and 4
    test images per class, so the feature encoding stays quick."""
    out = []
    for name in ("cifar10-mini", "flowers12"):
        source = shared_dataset(name)
        for split, n in (("train", 8), ("test", 4)):
            for folder in sorted((source / split).iterdir()):
                target = root / name / split / folder.name
                target.mkdir(parents=True)
                for image in sorted(folder.iterdir())[:n]:
                    (target / image.name).symlink_to(image)
        out.append(root / name)
    return out


def _two_domain_config(tmp_path: Path, backend: str):
    domains = _two_domain_folders(tmp_path / "data")
    return load_config(overrides=[
        "backbone.model='effnet-minilm'", "backbone.image_size=128", "prompt.n_ctx=16",
        "train.batch_size=32", "train.scheduler='constant'", "federation.method='secfpp'",
        "federation.rounds=2", f"clustering.backend='{backend}'", "clustering.reduce_dim=32",
        f"data.domains='{domains[0]},{domains[1]}'", "data.num_clients=6",
        "data.partition='iid'", f"output_dir='{tmp_path}'"])


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_clustering_recovers_two_known_domains(tmp_path: Path) -> None:
    config = _two_domain_config(tmp_path, "plaintext")
    data = _metrics(run_inprocess(config))
    aris = [r["summary"]["cluster_ari"] for r in data["rounds"]]
    assert aris[-1] == 1.0, aris
    assert data["rounds"][-1]["summary"]["clusters"] == 2
    assigned = data["rounds"][-1]["server"]["assignments_next"]
    assert len({assigned[str(c)] for c in (0, 1, 2)}) == 1
    assert len({assigned[str(c)] for c in (3, 4, 5)}) == 1
    assert np.isfinite(data["final"]["local_accuracy_mean"])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_secure_backend_end_to_end_recovers_the_domains(tmp_path: Path) -> None:
    """secfpp with CrypTen compute parties (spawned by the server, closed at the end):
    the server relays sealed shares only, and finds the same clusters as in the clear."""
    recorder = Recorder()
    config = _two_domain_config(tmp_path, "secure")
    data = _metrics(run_inprocess(config, client_app=recorder.app))
    clustering = data["rounds"][0]["server"]["clustering"]
    assert clustering["secure"] is True and not clustering["fallback"], clustering
    assert clustering["stats"]["comm_bytes"] > 0
    assert [r["summary"]["cluster_ari"] for r in data["rounds"]] == [1.0, 1.0]
    shares = [s["config"][SHARE_KEY] for s in recorder.sent
              if s["kind"] == "train" and SHARE_KEY in s["config"]]
    assert len(shares) == 6 and len(set(shares)) == 6  # round 1 only (first-update)
    with pytest.raises(Exception):  # noqa: B017 - a sealed share is no plaintext vector
        PlaintextClustering(ClusteringSettings(dim=32)).open(shares[0], 1, 0)
    plain = _metrics(run_inprocess(_two_domain_config(tmp_path / "plain", "plaintext")))
    assert ([r["server"]["assignments_next"] for r in data["rounds"]]
            == [r["server"]["assignments_next"] for r in plain["rounds"]])
