"""Flower deployment engine end to end (slow, a few minutes each on 2 cores).

A SuperLink with TLS (certificates from scripts/make_certificates.sh) and SuperNode
authentication, two registered SuperNodes (partition 0 and 1 of 2) on free loopback ports,
a third SuperNode whose key was never registered (it must be refused) and a fourth
without TLS (it must never get in), then `flwr run`
with a tiny configuration for 2 rounds. A second test kills a SuperNode of a run with
local DP after round 1 and restarts it with the same key and state folder: its privacy
ledger must continue. Every process started is stopped in `finally`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = ("backbone.model='clip-tiny' backbone.image_size=0 data.max_train_per_class=10 "
              "federation.rounds=2 prompt.n_ctx=4 prompt.rank=2 privacy.mode='off' "
              # a client that dies must fail the run well before the test's own timeout
              "federation.timeout=300.0")


#: local DP with real epsilons (a budget that is never reached), 3 rounds
DP_RUN_CONFIG = ("backbone.model='clip-tiny' backbone.image_size=0 data.max_train_per_class=10 "
                 "federation.rounds=3 prompt.n_ctx=4 prompt.rank=2 "
                 "privacy.mode='noise-multiplier' privacy.local_noise_multiplier=1.0 "
                 "privacy.server_noise_multiplier=1.0 privacy.epsilon=100.0 "
                 # round 3 waits for the restarted site to be connected again
                 "federation.timeout=150.0 federation.min_available_clients=2")


def _load_pilot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedprompt_pilot", REPO / "scripts" / "pilot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _pilot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: int) -> tuple[ModuleType,
                                                                                 Any]:
    """scripts/pilot.py loaded, the offline environment set, certificates and ``keys``
    SuperNode keys made, and a Pilot on them (nothing started yet)."""
    pilot_mod = _load_pilot()
    for key, value in pilot_mod.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    certs = tmp_path / "certs"
    made = subprocess.run(["bash", str(REPO / "scripts" / "make_certificates.sh"), "-n",
                           str(keys), str(certs)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    return pilot_mod, pilot_mod.Pilot(tmp_path / "work", certs,
                                      flwr_home=tmp_path / "flwr-home")


@pytest.mark.slow
def test_tls_authenticated_deployment_runs_two_rounds(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pilot_mod, pilot = _pilot(tmp_path, monkeypatch, keys=3)
    out = tmp_path / "results"
    ports: list[int] = [pilot.port]
    try:
        pilot.start_superlink(timeout=120)
        node_ids = {pilot.register_supernode(pilot.key_paths(i)[1]) for i in range(2)}
        assert None not in node_ids and len(node_ids) == 2
        nodes = [pilot.start_supernode(i, 2) for i in range(2)]
        # key 2 exists but was never registered: the SuperLink must refuse this node
        intruder = pilot.start_supernode(0, 2, private_key=pilot.key_paths(2)[0],
                                         name="intruder")
        # no TLS, no key: plain HTTP against the HTTPS port never gets through (it keeps
        # retrying until stopped)
        plaintext = pilot.start_supernode(1, 2, insecure=True, name="plaintext")
        ports += [proc.info["port"] for proc in [*nodes, intruder, plaintext]]
        online = pilot.wait_online(nodes, timeout=180)
        assert set(online.values()) == node_ids

        assert intruder.wait(timeout=120) != 0, intruder.tail()
        refused = intruder.log.read_text()
        assert "Failed to activate SuperNode" in refused, refused[-2000:]
        assert "Exit Code: 305" in refused
        assert "SuperNode ID:" not in refused
        status = {int(n["node-id"]): n["status"] for n in pilot.list_supernodes()}
        assert status == dict.fromkeys(node_ids, "online")

        result = pilot.run(f"{RUN_CONFIG} output_dir='{out}'", timeout=480)
        assert result.status == "finished:completed"
        rejected = plaintext.log.read_text()
        assert "SuperNode ID:" not in rejected and "Connection attempt failed" in rejected
    finally:
        left = pilot.stop()
        assert not left, [(p.pid, p.cmdline()) for p in left]
        assert not pilot.leftovers()
        assert not any(pilot_mod._port_open("127.0.0.1", port) for port in ports)

    run_dir = pilot_mod.results_dir(out)
    for name in ("metrics.json", "rounds.csv", "clients.csv", "privacy_ledger.json"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert entry["summary"]["clients_trained"] == 2
        assert entry["summary"]["declined"] == entry["summary"]["rejected"] == 0
        assert sorted(m["partition-id"] for m in entry["train"].values()) == [0, 1]
        assert sorted(m["partition-id"] for m in entry["evaluate"].values()) == [0, 1]
        for client in entry["evaluate"].values():
            assert math.isfinite(client["local-accuracy"])
            assert 0.0 <= client["local-accuracy"] <= 1.0
        for client in entry["train"].values():
            assert math.isfinite(client["train-loss"])
    assert math.isfinite(metrics["final"]["local_accuracy_mean"])


def _evaluated(out: Path, server_round: int, clients: set[str]) -> bool:
    """Whether the run writing under ``out`` has recorded the evaluation of
    ``server_round`` by all of ``clients`` (metrics.json is replaced atomically)."""
    runs = [p for p in out.iterdir() if (p / "metrics.json").is_file()] if out.is_dir() else []
    if len(runs) != 1:
        return False
    rounds = json.loads((runs[0] / "metrics.json").read_text())["rounds"]
    return any(r["round"] == server_round and clients <= set(r["evaluate"]) for r in rounds)


@pytest.mark.slow
def test_a_restarted_site_continues_its_privacy_ledger(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from fedprompt.privacy.accounting import Accountant

    pilot_mod, pilot = _pilot(tmp_path, monkeypatch, keys=2)
    out = tmp_path / "results"
    try:
        pilot.start_superlink(timeout=120)
        for i in range(2):
            pilot.register_supernode(pilot.key_paths(i)[1])
        nodes = [pilot.start_supernode(i, 2) for i in range(2)]
        online = pilot.wait_online(nodes, timeout=180)
        run = pilot.start_run(f"{DP_RUN_CONFIG} output_dir='{out}'")
        deadline = time.monotonic() + 480
        while not _evaluated(out, 1, {"0", "1"}):
            assert run.alive(), run.tail()
            assert time.monotonic() < deadline, "round 1 did not finish in 480 s"
            time.sleep(0.2)
        # round 1 is trained and evaluated: site 1 crashes, then comes back with the same
        # key and the same state folder
        pilot.kill(nodes[1])
        assert not nodes[1].alive()
        # a crashed node stays "online" at the SuperLink until it misses its heartbeats
        # (2 x 30 s); it can be activated again only once it is marked offline. A few
        # seconds more let the ServerApp collect the "node unavailable" error of the
        # round-2 message it had sent there (the SuperLink then deletes that message).
        node_id, offline_by = online[nodes[1].name], time.monotonic() + 150
        while {int(n["node-id"]): n["status"] for n in pilot.list_supernodes()}.get(
                node_id) == "online":
            assert time.monotonic() < offline_by, "the killed node stays online"
            time.sleep(2.0)
        time.sleep(8.0)
        restarted = pilot.start_supernode(1, 2, name="supernode-1-restarted")
        assert restarted.info["state_dir"] == nodes[1].info["state_dir"]
        again = pilot.wait_online([restarted], timeout=180)
        assert again[restarted.name] == online[nodes[1].name]  # the same authenticated node
        result = pilot.wait_run(run, timeout=900)
        assert result.status == "finished:completed"
    finally:
        left = pilot.stop()
        assert not left, [(p.pid, p.cmdline()) for p in left]

    run_dir = pilot_mod.results_dir(out)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    ledgers = {lg["party"]: lg for lg in
               json.loads((run_dir / "privacy_ledger.json").read_text())["ledgers"]}
    for client, proc in ((0, nodes[0]), (1, restarted)):
        (folder,) = proc.info["state_dir"].glob(f"run-*/client-{client}")
        assert folder.parent.name == f"run-{result.run_id}"
        own = json.loads((folder / "privacy_ledger.json").read_text())["entries"]
        rounds = [e["round"] for e in own]
        steps = [e["steps"] for e in own]
        eps = [e["epsilon"] for e in own]
        # continues across the restart: strictly growing, as many steps as an
        # uninterrupted run of the same rounds, and the accountant's epsilon of them
        assert rounds == sorted(set(rounds)) and rounds[0] == 1
        assert steps == [steps[0] * (k + 1) for k in range(len(steps))]
        assert eps == sorted(set(eps)) and eps[0] > 0
        for entry in own:
            replay = Accountant("rdp")
            replay.step(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
            assert entry["epsilon"] == pytest.approx(replay.epsilon(1e-5), rel=1e-9)
        # no stale message was trained: every round in the site's own ledger is a round
        # the server received and accepted from it, with the same figures
        server = {e["round"]: (e["steps"], e["epsilon"])
                  for e in ledgers[f"client-{client}"]["entries"]}
        assert {e["round"]: (e["steps"], e["epsilon"]) for e in own} == server
        for r in rounds:
            record = metrics["rounds"][r - 1]["train"][str(client)]
            assert "error" not in record and "untrusted" not in record
    # the restarted site trained again after the restart, continuing its budget
    (folder,) = restarted.info["state_dir"].glob("run-*/client-1")
    own = json.loads((folder / "privacy_ledger.json").read_text())["entries"]
    assert own[0]["round"] == 1 and own[-1]["round"] == 3 and len(own) >= 2
