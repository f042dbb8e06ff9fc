"""What leaves a client and what lands in the results is covered (issue 10, findings 5, 6).

* Under DP a train reply carries only fields an epsilon covers or that are public; the
  server's records carry no per-client norm; ``privacy.diagnostics`` releases them, and
  the results say so.
* Every client exports its personalized prompt: the shared part exactly as the server
  released it (never the client's local copy) plus its personal part, with the guarantee
  that covers it (record-level from the client's own ledger; user-level as the server
  reported it; nominal runs carry none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.app import app as client_app
from fedprompt.config import load_config
from fedprompt.federated.aggregation import UpdateRejected, validate_update
from fedprompt.privacy.coverage import (
    NOT_COVERED,
    REPLY_FIELDS,
    UNCOVERED_REPLY_METRICS,
    UNCOVERED_SERVER_FIELDS,
)
from fedprompt.prompts.portable import load_prompt
from strategies.inprocess import inprocess_grid, run_on_grid

BASE = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "prompt.rank=2", "train.batch_size=16", "federation.rounds=2", "data.num_clients=2",
        "federation.method='dpfpl'", "privacy.reproducible_noise=true"]
DP = ["privacy.mode='noise-multiplier'", "privacy.local_noise_multiplier=1.0",
      "privacy.server_noise_multiplier=1.0", "privacy.epsilon=1000.0"]


class Recorder:
    """The real ClientApp, with every train reply's metrics recorded."""

    def __init__(self) -> None:
        self.replies: list[dict] = []
        self.app = ClientApp()
        self.app.train()(self._train)
        self.app.evaluate()(lambda msg, ctx: client_app(msg, ctx))

    def _train(self, msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        if reply.has_content():
            self.replies.append(dict(reply.content["metrics"]))
        return reply


def _run(tmp_path: Path, *overrides: str) -> tuple[Path, Recorder]:
    config = load_config(overrides=[*BASE, f"output_dir='{tmp_path}'", *overrides])
    recorder = Recorder()
    grid = inprocess_grid(config, config.data.num_clients, recorder.app)
    return run_on_grid(grid, config, tmp_path / "run"), recorder


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_dp_replies_and_results_carry_only_covered_fields(tmp_path: Path) -> None:
    out, recorder = _run(tmp_path, *DP)
    assert len(recorder.replies) == 4  # 2 clients x 2 rounds
    covered = {k for k, v in REPLY_FIELDS.items() if v != NOT_COVERED}
    for metrics in recorder.replies:
        assert set(metrics) <= covered, sorted(set(metrics) - covered)
        assert not set(metrics) & set(UNCOVERED_REPLY_METRICS)
    data = _metrics(out)
    for record in data["rounds"]:
        for client in record["train"].values():
            assert not set(client) & set(UNCOVERED_REPLY_METRICS)
        assert not set(record["server"]) & set(UNCOVERED_SERVER_FIELDS)
    coverage = data["privacy"]["coverage"]
    assert coverage["diagnostics"] is False
    assert set(UNCOVERED_REPLY_METRICS) <= set(coverage["withheld"])
    assert coverage["train_reply"]["update"].startswith("the client's record-level epsilon")
    assert "record-level" in data["privacy"]["guarantee"]
    assert b"train-loss" not in (out / "clients.csv").read_bytes()


def test_diagnostics_are_released_only_when_asked_and_labelled(tmp_path: Path) -> None:
    out, recorder = _run(tmp_path, *DP, "privacy.diagnostics=true")
    assert all("train-loss" in m and "train-accuracy" in m for m in recorder.replies)
    data = _metrics(out)
    assert "update_norms" in data["rounds"][0]["server"]
    coverage = data["privacy"]["coverage"]
    assert coverage["withheld"] == []
    assert coverage["train_reply"]["train-loss"] == NOT_COVERED
    assert "NOT covered" in coverage["summary"]


def test_without_dp_nothing_is_withheld(tmp_path: Path) -> None:
    _, recorder = _run(tmp_path)  # privacy.mode defaults to off
    assert all("train-loss" in m for m in recorder.replies)


def test_rejection_reasons_carry_no_client_norm() -> None:
    with pytest.raises(UpdateRejected) as caught:
        validate_update({"g": torch.full((2, 3), 1234.5)}, {"g": (2, 3)}, 100.0)
    assert "sanity bound" in str(caught.value) and "3024" not in str(caught.value)


# ------------------------------------------------------------------------- exports
def _exports(out: Path) -> dict[int, Path]:
    folders = sorted((out / "client-state").glob("run-*/client-*/prompt"))
    return {int(f.parent.name.split("-")[1]): f for f in folders}


def _ledgers(out: Path) -> dict[str, dict]:
    return {lg["party"]: lg for lg in
            json.loads((out / "privacy_ledger.json").read_text())["ledgers"]}


def test_every_client_exports_the_released_shared_part_with_its_guarantee(
        tmp_path: Path, tiny_backbone) -> None:
    out, _ = _run(tmp_path, *DP, "privacy.server=true")
    exports = _exports(out)
    assert sorted(exports) == [0, 1]
    ledgers = _ledgers(out)
    shared = []
    for client, folder in exports.items():
        prompt = load_prompt(folder, tiny_backbone)
        privacy = prompt.metadata["privacy"]
        assert privacy["epsilon"] == pytest.approx(ledgers[f"client-{client}"]["epsilon"])
        assert privacy["record_level"]["valid"] is True
        assert set(privacy["record_level"]["privatized_tensors"]) == {
            "global_ctx", "local_u", "local_v"}
        assert privacy["unnoised_tensors"] == []
        assert privacy["user_level"]["epsilon"] == pytest.approx(ledgers["server"]["epsilon"])
        assert privacy["user_level"]["covers"] == ["global_ctx"]
        # the personal part is the client's own; the context is what its learner computes
        assert set(prompt.tensors) >= {"global_ctx", "local_ctx", "context"}
        shared.append(prompt.tensors["global_ctx"])
    # both clients export the same shared part: the server's release, not a local copy
    assert torch.equal(shared[0], shared[1])


def test_the_exported_shared_part_is_the_servers_not_the_clients_trained_copy(
        tmp_path: Path, tiny_backbone) -> None:
    out, _ = _run(tmp_path, *DP, "federation.rounds=1", "data.num_clients=1")
    (folder,) = _exports(out).values()
    exported = load_prompt(folder, tiny_backbone).tensors["global_ctx"]
    # one client, server noise reproducible from the seed: the release is initial + lr x
    # (update + noise); the client's trained copy is initial + update. Halving server_lr
    # halves the exported change exactly only if the export is the server's release.
    out2, _ = _run(tmp_path / "half", *DP, "federation.rounds=1", "data.num_clients=1",
                   "federation.server_lr=0.5")
    (folder2,) = _exports(out2).values()
    exported_half = load_prompt(folder2, tiny_backbone).tensors["global_ctx"]
    from fedprompt.federated.methods import build_method_learner

    config = load_config(overrides=[*BASE, "data.num_clients=1"])
    initial = build_method_learner(config, tiny_backbone, 1).global_ctx.detach()
    assert torch.allclose(exported_half - initial, 0.5 * (exported - initial), atol=1e-6)


def test_nominal_exports_carry_no_epsilon(tmp_path: Path, tiny_backbone) -> None:
    out, _ = _run(tmp_path, "privacy.mode='nominal'", "privacy.epsilon=50.0",
                  "privacy.server=false")
    for folder in _exports(out).values():
        privacy = load_prompt(folder, tiny_backbone).metadata["privacy"]
        assert privacy["epsilon"] is None and privacy["nominal_epsilon"] == 50.0
        assert privacy["guarantee"].startswith("none")
        assert privacy["record_level"]["valid"] is False
        assert set(privacy["unnoised_tensors"]) == {"global_ctx", "local_ctx"}
