"""Federated runs through the real ClientApp/ServerApp code (in-process grid)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.app import PERSONAL_KEY
from clients.app import app as client_app
from fedprompt.config import load_config
from fedprompt.training.run import run_local
from strategies.inprocess import InProcessGrid, inprocess_grid, run_inprocess, run_on_grid

BASE = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "prompt.rank=2", "train.batch_size=16", "federation.rounds=2"]


def _config(tmp_path: Path, *overrides: str):
    return load_config(overrides=[*BASE, f"output_dir='{tmp_path}'", *overrides])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_one_client_without_noise_equals_the_one_site_trainer(tmp_path: Path) -> None:
    fed = _config(tmp_path, "federation.method='dpfpl'", "federation.rounds=3",
                  "data.num_clients=1")
    rounds = _metrics(run_inprocess(fed))["rounds"]
    site = _config(tmp_path, "prompt.learner='dpfpl'", "train.epochs=3", "data.num_clients=1",
                   "data.client=0")
    epochs = run_local(site, progress=False).metrics["epochs"]
    for record, epoch in zip(rounds, epochs, strict=True):
        client = record["evaluate"]["0"] if "0" in record["evaluate"] else record["evaluate"][0]
        assert client["local-loss"] == pytest.approx(epoch["test_loss"], abs=1e-6)
        assert client["local-accuracy"] == pytest.approx(epoch["test_accuracy"], abs=1e-9)
        train = record["train"]["0"] if "0" in record["train"] else record["train"][0]
        assert train["train-loss"] == pytest.approx(epoch["train_loss"], abs=1e-6)


@pytest.mark.parametrize("method", ["local-only", "promptfl", "fedpgp", "dpfpl",
                                    "dpfpl-no-residual", "dpfpl-full-rank"])
def test_every_method_runs_and_shares_only_what_it_declares(tmp_path: Path, method: str) -> None:
    config = _config(tmp_path, f"federation.method='{method}'", "data.num_clients=3")
    grid = inprocess_grid(config, 3)
    out = run_on_grid(grid, config, tmp_path / method)
    data = _metrics(out)
    assert len(data["rounds"]) == 2
    assert data["final"]["clients_trained"] == 3
    assert data["final"]["local_accuracy_mean"] is not None
    # personal parts stay in each node's context.state and differ between clients
    personal = [grid.contexts[n].state[PERSONAL_KEY].to_torch_state_dict() for n in (1, 2, 3)]
    expected_personal = {"local-only": {"ctx"}, "promptfl": set(), "fedpgp": {"local_u", "local_v"},
                         "dpfpl": {"local_ctx"}, "dpfpl-no-residual": {"local_ctx"},
                         "dpfpl-full-rank": {"local_ctx"}}[method]
    assert set(personal[0]) == expected_personal
    if expected_personal:
        name = sorted(expected_personal)[0]
        assert not torch.equal(personal[0][name], personal[1][name])


class _Recorder:
    """Wraps the ClientApp and records what each train reply carries."""

    def __init__(self, tamper: dict[int, str] | None = None) -> None:
        self.sent: list[set[str]] = []
        self.tamper = tamper or {}
        self.app = ClientApp()
        self.app.train()(self._train)
        self.app.evaluate()(lambda msg, ctx: client_app(msg, ctx))

    def _train(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        arrays = reply.content["arrays"].to_torch_state_dict()
        self.sent.append(set(arrays))
        how = self.tamper.get(int(context.node_config["partition-id"]))
        if how is None:
            return reply
        name = next(iter(arrays))
        if how == "nan":
            arrays[name] = torch.full_like(arrays[name], float("nan"))
        elif how == "shape":
            arrays[name] = torch.zeros(3, 3)
        elif how == "extra":
            arrays["local_ctx"] = torch.zeros(2, 2)
        elif how == "huge":
            arrays[name] = torch.full_like(arrays[name], 1e9)
        elif how == "int":
            arrays[name] = torch.zeros_like(arrays[name], dtype=torch.int64)
        content = RecordDict({"arrays": ArrayRecord(arrays),
                              "metrics": MetricRecord(dict(reply.content["metrics"]))})
        return Message(content, reply_to=msg)


def test_updates_carry_shared_tensors_only(tmp_path: Path) -> None:
    recorder = _Recorder()
    run_inprocess(_config(tmp_path, "federation.method='dpfpl'", "data.num_clients=2"), 2,
                  client_app=recorder.app)
    assert recorder.sent and all(keys == {"global_ctx"} for keys in recorder.sent)


def test_invalid_replies_are_rejected_with_reasons_and_the_round_goes_on(tmp_path: Path) -> None:
    tamper = {0: "nan", 1: "shape", 2: "extra", 3: "huge", 4: "int"}
    recorder = _Recorder(tamper)
    config = _config(tmp_path, "federation.method='promptfl'", "data.num_clients=6",
                     "federation.rounds=1")
    data = _metrics(run_inprocess(config, 6, client_app=recorder.app))
    server = data["rounds"][0]["server"]
    assert server["accepted"] == 1
    reasons = {r["client"]: r["reason"] for r in server["rejected"]}
    assert "non-finite" in reasons[0] and "shape" in reasons[1]
    assert "unexpected ['local_ctx']" in reasons[2] and "sanity bound" in reasons[3]
    assert "dtype" in reasons[4]


def test_client_errors_are_logged_and_the_run_completes(tmp_path: Path) -> None:
    broken = ClientApp()

    @broken.train()
    def _train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("disk full")
        return client_app(msg, context)

    broken.evaluate()(lambda msg, ctx: client_app(msg, ctx))
    data = _metrics(run_inprocess(_config(tmp_path, "data.num_clients=3"), 3,
                                  client_app=broken))
    rejected = data["rounds"][0]["server"]["rejected"]
    assert len(rejected) == 1 and "disk full" in rejected[0]["reason"]
    assert data["final"]["clients_trained"] == 2


def test_local_dp_ledger_grows_and_spent_budget_declines(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.method='dpfpl'", "data.num_clients=2",
                     "privacy.mode='noise-multiplier'", "privacy.local_noise_multiplier=0.6",
                     "privacy.server_noise_multiplier=0.6", "privacy.epsilon=17",
                     "federation.rounds=4")
    out = run_inprocess(config)
    data = _metrics(out)
    eps = [[r["train"][c]["epsilon"] for c in r["train"]] for r in data["rounds"]]
    declined = [[r["train"][c]["declined"] for c in r["train"]] for r in data["rounds"]]
    trained_eps = [e for row, d in zip(eps, declined, strict=True) for e, x in zip(row, d,
                                                                                  strict=True)
                   if not x]
    assert trained_eps and all(e > 0 for e in trained_eps)
    # epsilon grows round over round for a client that keeps training
    first = [r["train"]["0"]["epsilon"] for r in data["rounds"] if not r["train"]["0"]["declined"]]
    assert first == sorted(first) and len(set(first)) == len(first)
    # with this little noise the budget of 17 runs out after two or three rounds
    assert any(any(row) for row in declined)
    last = data["rounds"][-1]
    assert last["summary"]["declined"] >= 1
    ledger = json.loads((out / "privacy_ledger.json").read_text())["ledgers"]
    parties = {lg["party"]: lg for lg in ledger}
    assert parties["server"]["private"] and parties["server"]["epsilon"] > 0
    client = parties["client-0"]
    assert [e["round"] for e in client["entries"]] == sorted(e["round"] for e in client["entries"])
    assert client["entries"][0]["tensors"] == ["global_ctx", "local_u", "local_v"]
    assert all(e["epsilon"] <= 17 for e in client["entries"])


def test_target_epsilon_is_met_over_the_planned_rounds(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.method='fedpgp'", "data.num_clients=2",
                     "privacy.mode='target-epsilon'", "privacy.epsilon=2.0")
    data = _metrics(run_inprocess(config))
    final = data["final"]
    assert 1.5 < final["local_epsilon_max"] <= 2.0 + 1e-6
    assert 1.5 < final["global_epsilon"] <= 2.0 + 1e-6


def test_nominal_recipe_is_labelled_and_reports_the_accountant(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.method='dpfpl'", "data.num_clients=2",
                     "privacy.mode='nominal'", "privacy.epsilon=1.0")
    out = run_inprocess(config)
    data = _metrics(out)
    assert data["privacy"]["label"] == "nominal" and data["privacy"]["nominal_epsilon"] == 1.0
    ledger = json.loads((out / "privacy_ledger.json").read_text())["ledgers"]
    client = next(lg for lg in ledger if lg["party"] == "client-0")
    # labelled as carrying no guarantee, at the ledger and at the run level
    assert client["valid"] is False and "NOT a guarantee" in client["note"]
    assert data["privacy"]["guarantee"].startswith("none")
    entry = client["entries"][-1]
    assert entry["nominal_epsilon"] == 1.0
    assert np.isclose(entry["noise_multiplier"], np.sqrt(2 * np.log(1e5)) / 1.0)
    # the epsilon beside it is the accountant's, over the steps actually taken
    from fedprompt.privacy.accounting import Accountant

    replay = Accountant("rdp")
    replay.step(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
    assert entry["epsilon"] == pytest.approx(replay.epsilon(1e-5), rel=1e-9)


def test_in_process_runs_are_deterministic(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.method='dpfpl'", "data.num_clients=2",
                     "privacy.mode='noise-multiplier'", "privacy.reproducible_noise=true")
    a = _metrics(run_inprocess(config))["rounds"]
    b = _metrics(run_inprocess(config))["rounds"]
    assert [r["summary"] for r in a] == [r["summary"] for r in b]


def test_a_site_with_its_own_data_folder(tmp_path: Path) -> None:
    from PIL import Image

    from strategies.inprocess import InProcessGrid

    rng = np.random.default_rng(0)
    sites = []
    for site in ("a", "b"):
        for split, count in (("train", 6), ("test", 2)):
            for cls in ("cat", "dog"):
                folder = tmp_path / site / split / cls
                folder.mkdir(parents=True)
                for i in range(count):
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                        folder / f"{i}.png")
        sites.append(str(tmp_path / site))
    config = _config(tmp_path, "federation.method='dpfpl'", "federation.rounds=1",
                     "data.max_train_per_class=0")
    from fedprompt.config import flatten

    grid = InProcessGrid(client_app, 2, run_config=flatten(config.to_dict()), node_configs=[
        {"partition-id": 0, "num-partitions": 2, "dataset": sites[0]},
        {"partition-id": 1, "num-partitions": 2, "dataset": sites[1]},
    ])
    data = _metrics(run_on_grid(grid, config, tmp_path / "out"))
    train = data["rounds"][0]["train"]
    assert {int(k) for k in train} == {0, 1}
    assert all(m["num-examples"] == 12 for m in train.values())  # each site's whole folder


def test_rounds_without_evaluation_complete(tmp_path: Path) -> None:
    """federation.evaluate_every > 1: the skipped evaluations address nobody and the run
    goes on (evaluated in round 2 and in the last round only)."""
    config = _config(tmp_path, "federation.method='promptfl'", "data.num_clients=2",
                     "federation.rounds=3", "federation.evaluate_every=2")
    rounds = _metrics(run_inprocess(config))["rounds"]
    assert [bool(r["evaluate"]) for r in rounds] == [False, True, True]
    assert all(len(r["train"]) == 2 for r in rounds)


def test_a_round_waits_for_min_available_clients(tmp_path: Path) -> None:
    """federation.min_available_clients: sampling waits until that many clients are
    connected (a restarted site coming back), and goes on without them after the round
    timeout."""
    from strategies.server_app import build_server
    from strategies.strategy import FedPromptStrategy

    class GrowingGrid:
        def __init__(self) -> None:
            self.calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return [1] if self.calls < 3 else [1, 2]

    config = _config(tmp_path, "federation.min_available_clients=2", "data.num_clients=2")
    grid = GrowingGrid()
    assert FedPromptStrategy(build_server(config, 2), tmp_path)._connected(grid) == [1, 2]
    assert grid.calls == 3
    late = _config(tmp_path, "federation.min_available_clients=3", "federation.timeout=1.0")
    start = time.monotonic()
    assert FedPromptStrategy(build_server(late, 2), tmp_path)._connected(GrowingGrid()) == [
        1, 2]
    assert 1.0 <= time.monotonic() - start < 5.0


def test_clients_train_with_the_configuration_the_server_resolved(tmp_path: Path) -> None:
    """The server sends its resolved configuration with every message; a node whose own
    run_config says otherwise (here: another epsilon) still trains under the server's."""
    from clients.app import app as client_app
    from fedprompt.config import flatten
    from strategies.inprocess import InProcessGrid

    config = _config(tmp_path, "federation.method='dpfpl'", "data.num_clients=2",
                     "federation.rounds=1", "privacy.mode='target-epsilon'",
                     "privacy.epsilon=2.0", "privacy.server=false",
                     "privacy.reproducible_noise=true")
    stale = config.with_overrides({"privacy.epsilon": 8.0})
    grid = InProcessGrid(client_app, 2, run_config=flatten(stale.to_dict()))
    out = run_on_grid(grid, config)
    ledgers = sorted(out.glob("client-state/run-*/client-*/privacy_ledger.json"))
    assert len(ledgers) == 2
    for path in ledgers:
        epsilon = json.loads(path.read_text())["entries"][-1]["epsilon"]
        assert 1.9 < epsilon <= 2.0 * (1 + 1e-6)


def test_config_toml_records_the_learner_that_ran_and_contradictions_are_refused(
        tmp_path: Path) -> None:
    from fedprompt.config import load_config as load
    from fedprompt.errors import ConfigError
    from fedprompt.federated.methods import resolve_method

    out = run_inprocess(_config(tmp_path, "federation.method='dpfpl-no-residual'",
                                "data.num_clients=2", "federation.rounds=1"))
    ran = load(out / "config.toml")
    assert (ran.prompt.learner, ran.prompt.residual) == ("dpfpl", False)
    with pytest.raises(ConfigError, match="contradicts federation.method = 'dpfpl'.*fedpgp"):
        resolve_method(_config(tmp_path, "prompt.learner='fedpgp'"))
    with pytest.raises(ConfigError, match="dpfpl-no-residual"):
        resolve_method(_config(tmp_path, "prompt.residual=false"))
    assert resolve_method(_config(tmp_path, "federation.method='promptfl'")).prompt.learner \
        == "coop"


class _FaultyApp:
    """The ClientApp, except that client ``train_fails`` raises in train and client
    ``evaluate_fails`` in evaluate (every round)."""

    def __init__(self, train_fails: int, evaluate_fails: int) -> None:
        self.app = ClientApp()

        @self.app.train()
        def _train(msg: Message, context: Context) -> Message:
            if int(context.node_config["partition-id"]) == train_fails:
                raise RuntimeError("disk full")
            return client_app(msg, context)

        @self.app.evaluate()
        def _evaluate(msg: Message, context: Context) -> Message:
            if int(context.node_config["partition-id"]) == evaluate_fails:
                raise RuntimeError("GPU fell off the bus")
            return client_app(msg, context)


class _SilentGrid(InProcessGrid):
    """An in-process grid whose node ``silent`` never replies from round ``from_round``
    on (its replies are dropped, as when a site goes quiet until the timeout), and whose
    node ``offline`` is not connected from round ``offline_from`` on."""

    def __init__(self, *args: object, silent: int = 0, from_round: int = 1, offline: int = 0,
                 offline_from: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.silent, self.from_round = silent, from_round
        self.offline, self.offline_from = offline, offline_from
        self.current = 1  # the round the server is in (evaluate ends a round)

    def get_node_ids(self) -> list[int]:
        nodes = list(super().get_node_ids())
        gone = self.current >= self.offline_from
        return [n for n in nodes if not (n == self.offline and gone)]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        if not messages:
            return []
        rnd = int(messages[0].content["config"]["server-round"])
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages[0].metadata.message_type == "evaluate":
            self.current = rnd + 1
        return [r for r in replies if not (r.metadata.src_node_id == self.silent
                                           and rnd >= self.from_round)]


def _statuses(record: dict, kind: str) -> dict[str, tuple[str, str]]:
    return {k: (v["status"], v.get("reason", "")) for k, v in record[kind].items()}


def test_every_addressed_client_gets_one_record_per_round_under_its_own_id(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Client 1 fails to train, client 2 fails to evaluate, client 3 goes silent in round
    2: each has exactly one train and one evaluate record per round, under its own id,
    with its status and reason; the failures are logged."""
    from fedprompt.config import flatten

    config = _config(tmp_path, "federation.method='promptfl'", "data.num_clients=4")
    grid = _SilentGrid(_FaultyApp(train_fails=1, evaluate_fails=2).app, 4,
                       run_config=flatten(config.to_dict()), silent=4, from_round=2)
    with caplog.at_level("WARNING", logger="fedprompt"):
        data = _metrics(run_on_grid(grid, config, tmp_path / "out"))
    timeout = "no reply within federation.timeout = 3600 s"
    for record in data["rounds"]:
        silent = record["round"] == 2
        train, evaluate = _statuses(record, "train"), _statuses(record, "evaluate")
        assert train == {"0": ("trained", ""), "1": ("failed", train["1"][1]),
                         "2": ("trained", ""),
                         "3": ("no reply", timeout) if silent else ("trained", "")}
        assert "RuntimeError: disk full" in train["1"][1]
        assert evaluate == {"0": ("evaluated", ""), "1": ("evaluated", ""),
                            "2": ("failed", evaluate["2"][1]),
                            "3": ("no reply", timeout) if silent else ("evaluated", "")}
        assert "RuntimeError: GPU fell off the bus" in evaluate["2"][1]
        assert record["ignored"] == []
        summary = record["summary"]
        assert (summary["clients_trained"], summary["failed"], summary["no_reply"]) == (
            (2, 1, 1) if silent else (3, 1, 0))
        assert [r["client"] for r in record["server"]["rejected"]] == [1]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("node 2" in m and "failed to train: 2: RuntimeError: disk full" in m
               for m in logged) == 2
    assert sum("client 2 (node 3) failed to evaluate" in m and "GPU fell off" in m
               for m in logged) == 2
    assert sum("client 3 (node 4) sent no" in m for m in logged) == 2  # train, evaluate


def test_a_client_that_never_replies_is_recorded_under_its_node(tmp_path: Path) -> None:
    """A node that never said who it is has its records under ``node-<id>``."""
    from fedprompt.config import flatten

    config = _config(tmp_path, "federation.method='promptfl'", "data.num_clients=2",
                     "federation.rounds=1")
    grid = _SilentGrid(client_app, 2, run_config=flatten(config.to_dict()), silent=2)
    record = _metrics(run_on_grid(grid, config, tmp_path / "out"))["rounds"][0]
    assert set(record["train"]) == set(record["evaluate"]) == {"0", "node-2"}
    assert record["train"]["node-2"]["status"] == "no reply"
    assert record["evaluate"]["node-2"]["status"] == "no reply"


def test_missing_clients_are_named_every_round(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Node 3 (client 2) is offline from round 2: each round says how many clients of
    data.num_clients are connected and which are missing; it is addressed no longer."""
    from fedprompt.config import flatten

    config = _config(tmp_path, "federation.method='promptfl'", "data.num_clients=3",
                     "federation.rounds=3")
    grid = _SilentGrid(client_app, 3, run_config=flatten(config.to_dict()), offline=3,
                       offline_from=2)
    with caplog.at_level("WARNING", logger="fedprompt"):
        data = _metrics(run_on_grid(grid, config, tmp_path / "out"))
    assert [sorted(r["train"]) for r in data["rounds"]] == [["0", "1", "2"], ["0", "1"],
                                                           ["0", "1"]]
    missing = [r.getMessage() for r in caplog.records if "are connected; missing" in
               r.getMessage()]
    assert missing == [f"round {r}: only 2 of the federation's 3 clients (data.num_clients) "
                       "are connected; missing: client 2 (node 3, offline)" for r in (2, 3)]
