"""Persistent client state and privacy ledgers (a restarted site continues its budget),
refused replays and stale messages, ledgers that never decrease, and replies keyed by the
authenticated node they came from (a reply cannot speak for another client)."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

import clients.app as client_module
from clients.app import app as client_app
from fedprompt.config import load_config
from fedprompt.errors import ConfigError
from fedprompt.federated.client import (
    ClientState,
    RoundAlreadyTrained,
    StaleMessage,
    check_fresh,
    check_round,
)
from fedprompt.federated.client_store import (
    SIMULATION_SUBDIR,
    ClientStateError,
    ClientStore,
    state_root,
)
from fedprompt.federated.server import ClientReply
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.ledger import LedgerEntry, LedgerError, LedgerRegression, PrivacyLedger
from strategies.inprocess import InProcessGrid, inprocess_grid, run_on_grid
from strategies.server_app import build_server

BASE = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "prompt.rank=2", "train.batch_size=16", "federation.method='dpfpl'",
        "data.num_clients=2", "federation.rounds=3",
        "privacy.mode='noise-multiplier'", "privacy.local_noise_multiplier=1.0",
        "privacy.server_noise_multiplier=1.0", "privacy.epsilon=100",
        "privacy.reproducible_noise=true"]


def _config(tmp_path: Path, *overrides: str):
    return load_config(overrides=[*BASE, f"output_dir='{tmp_path}'", *overrides])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _ledgers(out: Path) -> dict[str, dict]:
    data = json.loads((out / "privacy_ledger.json").read_text())["ledgers"]
    return {lg["party"]: lg for lg in data}


def _entry(epsilon: float, steps: int, rnd: int) -> LedgerEntry:
    return LedgerEntry(party="client-0", mechanism="DP-SGD", tensors=["u"],
                       noise_multiplier=1.0, clipping_norm=1.0, sample_rate=0.1, steps=steps,
                       accountant="rdp", epsilon=epsilon, delta=1e-5, round=rnd)


def _client_files(out: Path, client: int) -> Path:
    """The state folder of ``client`` under a results folder (one run per folder)."""
    (folder,) = (out / SIMULATION_SUBDIR).glob(f"run-*/client-{client}")
    return folder


# ----------------------------------------------------------------------- ledgers
def test_a_ledger_refuses_a_falling_epsilon_or_step_count() -> None:
    ledger = PrivacyLedger("client-0", 1e-5)
    ledger.record(_entry(1.0, 4, 1))
    ledger.record(_entry(1.5, 8, 2))
    with pytest.raises(LedgerRegression, match="below the 1.5 already spent"):
        ledger.record(_entry(0.01, 12, 3))
    with pytest.raises(LedgerRegression, match="fewer than the 8"):
        ledger.record(_entry(2.0, 6, 3))
    with pytest.raises(LedgerRegression, match="round 1 comes after round 2"):
        ledger.record(_entry(2.0, 12, 1))
    with pytest.raises(LedgerError, match="not a number"):
        ledger.record(_entry(float("nan"), 12, 3))
    assert [e.epsilon for e in ledger.entries] == [1.0, 1.5]  # nothing was recorded
    ledger.record(_entry(1.5, 8, 3))  # equal is not a decrease
    again = PrivacyLedger.from_json(ledger.to_json())
    assert again.entries == ledger.entries and again.epsilon == 1.5
    broken = json.loads(ledger.to_json())
    broken["entries"][1]["epsilon"] = 0.5  # a tampered file does not load
    with pytest.raises(LedgerRegression):
        PrivacyLedger.from_dict(broken)


# ----------------------------------------------------------------- state folder
@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", ".hidden", "/etc",
                                  "x\x00y", "a\\b"])
def test_the_server_cannot_point_client_state_outside_output_dir(tmp_path: Path,
                                                                 name: str) -> None:
    with pytest.raises(ConfigError):
        state_root({}, tmp_path, name)


def test_state_root_is_the_sites_own_folder_else_under_the_results_folder(
        tmp_path: Path) -> None:
    site = tmp_path / "site-state"
    # the site's own absolute state-dir wins over anything the server sends
    assert state_root({"state-dir": str(site)}, tmp_path / "out", "../x") == site
    with pytest.raises(ConfigError, match="not an absolute path"):
        state_root({"state-dir": "relative/state"}, tmp_path, "run")
    assert state_root({}, tmp_path, "default-20260101-000000") == (
        tmp_path.resolve() / "default-20260101-000000" / SIMULATION_SUBDIR)
    with pytest.raises(ConfigError, match="no state folder"):
        state_root({}, tmp_path, "")
    # a symbolic link named like a run folder cannot lead out of output_dir
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run-link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="leads outside"):
        state_root({}, tmp_path / "out", "run-link")


def test_the_store_round_trips_the_whole_state_atomically(tmp_path: Path) -> None:
    state = ClientState(personal={"local_ctx": torch.randn(2, 3)}, optimizer=b"\x00opt\xff",
                        accountant='{"kind": "rdp", "history": [[1.0, 0.1, 4]]}',
                        generator=b"", learner_rng=bytes(range(256)), batch_rng='{"k": 1}',
                        rounds_trained=2, first_update=b"\x01", last_round=3)
    ledger = PrivacyLedger("client-7", 1e-5)
    ledger.record(_entry(0.5, 4, 3))
    store = ClientStore(tmp_path, run_id=42, client_id=7)
    assert store.load().state is None and not store.load().ledger.private
    store.save(state, ledger)
    loaded = store.load()
    assert loaded.state is not None
    assert torch.equal(loaded.state.personal["local_ctx"], state.personal["local_ctx"])
    for name in ("optimizer", "accountant", "generator", "learner_rng", "batch_rng",
                 "rounds_trained", "first_update", "last_round"):
        assert getattr(loaded.state, name) == getattr(state, name), name
    assert loaded.ledger.entries == ledger.entries
    assert json.loads(store.ledger_file.read_text())["epsilon"] == 0.5
    assert sorted(p.name for p in store.folder.iterdir()) == [
        "privacy_ledger.json", "state.pt"]  # no temporary file left behind
    # another run or another client never reads this state
    with pytest.raises(ClientStateError, match="belongs to run 42 client 7"):
        other = ClientStore(tmp_path, run_id=42, client_id=8)
        other.folder.mkdir(parents=True)
        other.state_file.write_bytes(store.state_file.read_bytes())
        other.load()


def test_replayed_and_stale_rounds_are_refused() -> None:
    check_round(None, 1)
    check_round(ClientState(last_round=2), 3)
    with pytest.raises(RoundAlreadyTrained, match="already trained round 2"):
        check_round(ClientState(last_round=2), 2)
    with pytest.raises(RoundAlreadyTrained):
        check_round(ClientState(last_round=2), 1)
    with pytest.raises(RoundAlreadyTrained, match="rounds start at 1"):
        check_round(None, 0)
    check_fresh(1, None)
    check_fresh(1, time.time() + 60)
    with pytest.raises(StaleMessage, match="nothing was trained or sent"):
        check_fresh(1, time.time() - 1)
    with pytest.raises(StaleMessage, match="update is discarded"):
        check_fresh(1, time.time() - 1, finished=True)


# ------------------------------------------------------------ a restarted client
class _Restarting:
    """The ClientApp, with a hook: ``wipe_before`` = (node, round) forgets that node's
    memory (its context.state and every cached session) just before its train message,
    as a SuperNode killed and restarted between rounds; every train message is kept."""

    def __init__(self, wipe_before: tuple[int, int] | None = None) -> None:
        self.wipe_before = wipe_before
        self.train_messages: dict[tuple[int, int], Message] = {}
        self.app = ClientApp()
        self.app.train()(self._train)
        self.app.evaluate()(lambda msg, ctx: client_app(msg, ctx))

    def _train(self, msg: Message, context: Context) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        self.train_messages[(context.node_id, rnd)] = copy.deepcopy(msg)
        if (context.node_id, rnd) == self.wipe_before:
            context.state = RecordDict()
            client_module._SESSIONS.clear()
        return client_app(msg, context)


def _client_entries(out: Path, client: int) -> list[tuple[int, int, float]]:
    entries = _ledgers(out)[f"client-{client}"]["entries"]
    return [(e["round"], e["steps"], e["epsilon"]) for e in entries]


def test_a_client_whose_memory_is_wiped_continues_from_disk(tmp_path: Path) -> None:
    config = _config(tmp_path)
    straight = run_on_grid(inprocess_grid(config, 2), config, tmp_path / "straight")

    restarting = _Restarting(wipe_before=(1, 2))  # node 1 = client 0, before round 2
    grid = inprocess_grid(config, 2, client_app=restarting.app)
    out = run_on_grid(grid, config, tmp_path / "restarted")

    for client in (0, 1):
        entries = _client_entries(out, client)
        assert [r for r, _, _ in entries] == [1, 2, 3]
        steps = [s for _, s, _ in entries]
        eps = [e for _, _, e in entries]
        assert steps == sorted(set(steps)) and eps == sorted(set(eps))  # strictly growing
        # the same count as an uninterrupted run: 3 rounds of equal length
        assert steps == [steps[0], 2 * steps[0], 3 * steps[0]]
        assert entries == _client_entries(straight, client)
        # the client's own ledger on its disk is the server's copy
        own = json.loads((_client_files(out, client) / "privacy_ledger.json").read_text())
        assert [(e["round"], e["steps"], e["epsilon"]) for e in own["entries"]] == entries
        # and its epsilon is the accountant's over the steps taken
        last = own["entries"][-1]
        replay = Accountant("rdp")
        replay.step(last["noise_multiplier"], last["sample_rate"], last["steps"])
        assert last["epsilon"] == pytest.approx(replay.epsilon(1e-5), rel=1e-9)
    # reproducible noise: the wiped client trained exactly what it would have
    for client in (0, 1):
        a, b = _disk_state(straight, client), _disk_state(out, client)
        assert a.last_round == b.last_round == 3 and b.rounds_trained == 3
        assert a.personal and set(a.personal) == set(b.personal)
        for name, tensor in a.personal.items():
            assert torch.equal(tensor, b.personal[name]), name

    # a replay of round 2's train message is refused, and nothing on disk changes
    state_file = _client_files(out, 0) / "state.pt"
    before = state_file.read_bytes()
    replay_msg = restarting.train_messages[(1, 2)]
    replay_msg.metadata.__dict__["_message_id"] = "replayed"
    reply = grid._deliver(replay_msg)
    assert reply.has_error() and "already trained round 3" in reply.error.reason
    assert state_file.read_bytes() == before


def _disk_state(out: Path, client: int) -> ClientState:
    folder = _client_files(out, client)
    run_id = int(folder.parent.name.removeprefix("run-"))
    state = ClientStore(folder.parent.parent, run_id, client).load().state
    assert state is not None
    return state


def test_a_stale_train_message_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.rounds=1")
    grid = inprocess_grid(config, 2)
    out = run_on_grid(grid, config, tmp_path / "run")
    state_file = _client_files(out, 0) / "state.pt"
    before = state_file.read_bytes()
    content = RecordDict({
        "arrays": ArrayRecord(build_server(config, 2).shared),
        "config": ConfigRecord({"server-round": 2, "run-folder": out.name}),
    })
    stale = _message(grid, content, ttl=0.05)
    time.sleep(0.1)  # the server stopped waiting for this round
    reply = grid._deliver(stale)
    assert reply.has_error() and "message expired" in reply.error.reason
    assert state_file.read_bytes() == before
    assert _disk_state(out, 0).last_round == 1


def test_a_client_without_a_state_folder_refuses_to_train(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.rounds=1")
    grid = inprocess_grid(config, 1)
    content = RecordDict({
        "arrays": ArrayRecord(build_server(config, 1).shared),
        "config": ConfigRecord({"server-round": 1, "run-folder": "../../escape"}),
    })
    reply = grid._deliver(_message(grid, content))
    assert reply.has_error() and "not a single plain folder name" in reply.error.reason
    assert not (tmp_path.parent / "escape").exists()


def _message(grid: InProcessGrid, content: RecordDict, ttl: float | None = None) -> Message:
    """A train message to node 1 of ``grid``, as its ServerApp would create it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = grid.run_id, 0, 0
    return Message(content, dst_node_id=1, message_type="train", ttl=ttl)


# ---------------------------------------------------------------- spoofed replies
class _Spoofer:
    """The ClientApp; node ``node`` rewrites its train replies from ``from_round`` on to
    claim client ``claim`` with epsilon 0.01."""

    def __init__(self, node: int, claim: int, from_round: int) -> None:
        self.node, self.claim, self.from_round = node, claim, from_round
        self.app = ClientApp()
        self.app.train()(self._train)
        self.app.evaluate()(lambda msg, ctx: client_app(msg, ctx))

    def _train(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        rnd = int(msg.content["config"]["server-round"])
        if context.node_id != self.node or rnd < self.from_round:
            return reply
        metrics = dict(reply.content["metrics"]) | {"partition-id": self.claim,
                                                    "epsilon": 0.01}
        content = RecordDict({"arrays": reply.content["arrays"],
                              "metrics": MetricRecord(metrics),
                              "config": reply.content["config"]})
        return Message(content, reply_to=msg)


@pytest.mark.parametrize("from_round", [1, 2])
def test_a_reply_claiming_another_client_changes_nothing_of_it(tmp_path: Path,
                                                               from_round: int) -> None:
    config = _config(tmp_path)
    honest = run_on_grid(inprocess_grid(config, 2), config, tmp_path / "honest")
    spoofer = _Spoofer(node=2, claim=0, from_round=from_round)
    out = run_on_grid(inprocess_grid(config, 2, client_app=spoofer.app), config,
                      tmp_path / "spoofed")
    data = _metrics(out)
    # client 0's ledger is exactly that of the honest run, its records its own replies
    assert _client_entries(out, 0) == _client_entries(honest, 0)
    assert all(e > 0.01 for _, _, e in _client_entries(out, 0))
    for record, (_, steps, epsilon) in zip(data["rounds"], _client_entries(honest, 0),
                                           strict=True):
        assert record["train"]["0"]["partition-id"] == 0
        assert (record["train"]["0"]["steps"], record["train"]["0"]["epsilon"]) == (
            steps, epsilon)
    # the spoofer is recorded, as rejected, under its own client (its node is client 1:
    # its evaluate replies say so) and counts for nobody
    for record in data["rounds"][from_round - 1:]:
        spoofed = record["train"]["1"]
        assert spoofed["status"] == "rejected"
        assert "claims to be client 0" in spoofed["untrusted"]
        assert spoofed["claimed-epsilon"] == 0.01 and spoofed["claimed-partition-id"] == 0
        assert any("claims to be client 0" in r["reason"]
                   for r in record["server"]["rejected"])
        assert record["server"]["accepted"] == 1
        assert record["summary"]["clients_trained"] == 1
    ledgers = _ledgers(out)
    # the spoofer's own ledger holds only its honest rounds (none when it spoofed from
    # round 1: its train replies were never trusted)
    spoofer_ledger = ledgers.get("client-1", {"entries": []})
    assert [e["round"] for e in spoofer_ledger["entries"]] == list(range(1, from_round))
    assert ledgers["client-0"]["epsilon"] == _ledgers(honest)["client-0"]["epsilon"]


def test_the_server_takes_replies_only_from_addressed_nodes_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    server = build_server(config, 3)
    shape = {k: tuple(v.shape) for k, v in server.shared.items()}

    def reply(node: int, claim: Any, epsilon: float, steps: int) -> ClientReply:
        update = {k: torch.zeros(s) for k, s in shape.items()}
        return ClientReply(node_id=node, update=update, metrics={
            "partition-id": claim, "num-examples": 10, "epsilon": epsilon, "steps": steps,
            "noise-multiplier": 1.0, "sample-rate": 0.25, "declined": 0})

    with pytest.raises(RuntimeError, match="never addressed"):
        server.aggregate(1, [reply(11, 0, 1.0, 4)])
    server.address(1, "train", [11, 12])
    server.aggregate(1, [reply(11, 0, 1.0, 4), reply(12, 1, 1.0, 4), reply(13, 2, 1.0, 4),
                         reply(11, 0, 0.5, 8)])
    assert server.client_of(11) == 0 and server.client_of(12) == 1
    assert server.client_of(13) is None  # never sent a message: never bound
    info = server.history.rounds[1]["server"]
    assert info["accepted"] == 2
    reasons = [r["reason"] for r in info["rejected"]]
    assert any("node 13 was not sent a train message" in r for r in reasons)
    assert any("a second train reply from node 11" in r for r in reasons)
    # one record per addressed node; the other replies are nobody's record
    assert set(server.history.rounds[1]["train"]) == {0, 1}
    assert sorted((i["node"], i["reason"]) for i in server.history.rounds[1]["ignored"]) == [
        (11, "a second train reply from node 11 in round 1"),
        (13, "node 13 was not sent a train message in round 1")]

    server.address(2, "train", [11, 12])
    # node 12 now claims client 0, node 11 reports less than it already spent
    server.aggregate(2, [reply(11, 0, 0.9, 8), reply(12, 0, 2.0, 8)])
    info = server.history.rounds[2]["server"]
    assert info["accepted"] == 0
    reasons = " ".join(r["reason"] for r in info["rejected"])
    assert "below the 1 already spent" in reasons
    assert "claims to be client 0, but node 12 is client 1" in reasons
    assert [e.epsilon for e in server.history.client_ledgers[0].entries] == [1.0]
    assert [e.epsilon for e in server.history.client_ledgers[1].entries] == [1.0]
    # each rejected reply is its client's record of the round, with the reason
    train = server.history.rounds[2]["train"]
    assert set(train) == {0, 1}
    assert all(r["status"] == "rejected" and r["reason"].startswith("untrusted: ")
               for r in train.values())
    assert "claims to be client 0" in train[1]["untrusted"]

    # a client that forgot its budget reports its first round's figures again: refused
    server.address(3, "train", [12])
    server.aggregate(3, [reply(12, 1, 1.0, 4)])
    assert server.history.rounds[3]["server"]["accepted"] == 0
    assert "a trained round adds steps" in server.history.rounds[3]["server"]["rejected"][0][
        "reason"]
    server.address(4, "train", [12])
    server.aggregate(4, [reply(12, 1, 1.4, 8)])
    assert server.history.rounds[4]["server"]["accepted"] == 1
    assert [e.epsilon for e in server.history.client_ledgers[1].entries] == [1.0, 1.4]


def test_in_process_grids_are_separate_runs() -> None:
    a, b = InProcessGrid(client_app, 1), InProcessGrid(client_app, 1)
    assert a.run_id != b.run_id


def test_a_superlink_error_counts_for_the_node_it_could_not_reach() -> None:
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    from strategies.strategy import _reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 0, 0
    sent = Message(RecordDict(), dst_node_id=7, message_type="train")
    sent.metadata.__dict__["_message_id"] = "m7"
    # "node unavailable", answered by the SuperLink itself for node 7: no reply from 7
    error = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
                    reply_to=sent)
    error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    reply = _reply(error, {"m7": 7})
    assert reply.node_id == 7 and not reply.error and not reply.untrusted
    assert reply.no_reply.startswith("node unavailable") and "Node Unavailable" in reply.no_reply
    assert reply.status("train") == ("no reply", reply.no_reply)
    # (an in-process node may have the SuperLink's id 1: its ClientApp's errors are its own)
    sent_to_1 = Message(RecordDict(), dst_node_id=SUPERLINK_NODE_ID, message_type="train")
    sent_to_1.metadata.__dict__["_message_id"] = "m1"
    raised = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="disk full"),
                     reply_to=sent_to_1)
    reply = _reply(raised, {"m1": SUPERLINK_NODE_ID})
    assert reply.status("train") == ("failed", "2: disk full")
    # a reply from node 8 to the message sent to node 7 speaks for nobody
    other = Message(RecordDict({"metrics": MetricRecord({"partition-id": 0})}),
                    reply_to=sent)
    other.metadata.__dict__["_src_node_id"] = 8
    reply = _reply(other, {"m7": 7})
    assert reply.node_id == 8 and "to the message sent to node 7" in reply.untrusted
    assert _reply(other, {}).untrusted == ""  # unknown message: judged by the server
