"""Flower deployment engine end to end (slow, about 3 minutes on 2 cores).

A SuperLink with TLS (certificates from scripts/make_certificates.sh) and SuperNode
authentication, two registered SuperNodes (partition 0 and 1 of 2) on free loopback ports,
a third SuperNode whose key was never registered (it must be refused) and a fourth
without TLS (it must never get in), then `flwr run`
with a tiny configuration for 2 rounds. Every process started is stopped in `finally`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_CONFIG = ("backbone.model='clip-tiny' backbone.image_size=0 data.max_train_per_class=10 "
              "federation.rounds=2 prompt.n_ctx=4 prompt.rank=2 privacy.mode='off' "
              # a client that dies must fail the run well before the test's own timeout
              "federation.timeout=300.0")


def _load_pilot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedprompt_pilot", REPO / "scripts" / "pilot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tls_authenticated_deployment_runs_two_rounds(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pilot_mod = _load_pilot()
    for key, value in pilot_mod.OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    certs = tmp_path / "certs"
    made = subprocess.run(["bash", str(REPO / "scripts" / "make_certificates.sh"), "-n", "3",
                           str(certs)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert made.returncode == 0, made.stdout + made.stderr
    out = tmp_path / "results"

    pilot = pilot_mod.Pilot(tmp_path / "work", certs, flwr_home=tmp_path / "flwr-home")
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
