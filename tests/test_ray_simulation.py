"""The in-process runner gives the same numbers as Flower's Ray simulation engine."""

import json
from pathlib import Path

import pytest

from fedprompt.config import load_config
from strategies.inprocess import run_inprocess

OVERRIDES = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
             "prompt.rank=2", "train.batch_size=16", "federation.rounds=2",
             "federation.method='dpfpl'", "data.num_clients=3",
             "privacy.mode='noise-multiplier'", "privacy.reproducible_noise=true",
             # a budget the run does not exhaust: every client trains (DP-SGD) every round
             "privacy.epsilon=1000.0"]


@pytest.mark.slow
def test_ray_simulation_equals_in_process_run(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from strategies.server_app import app as server_app

    config = load_config(overrides=[*OVERRIDES, f"output_dir='{tmp_path / 'ray'}'"])
    toml = tmp_path / "run.toml"
    toml.write_text(config.to_toml())
    monkeypatch.setenv("FEDPROMPT_CONFIG", str(toml))  # run_simulation passes no run_config
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "log_to_driver": False}})
    (ray_dir,) = (tmp_path / "ray").iterdir()
    ray_rounds = json.loads((ray_dir / "metrics.json").read_text())["rounds"]

    local = load_config(overrides=[*OVERRIDES, f"output_dir='{tmp_path / 'local'}'"])
    local_dir = run_inprocess(local)
    local_rounds = json.loads((local_dir / "metrics.json").read_text())["rounds"]
    assert len(ray_rounds) == len(local_rounds) == 2
    assert all(r["summary"]["clients_trained"] == 3 for r in ray_rounds)
    # on both engines every client kept its state and exported its prompt in the run folder
    for folder in (ray_dir, local_dir):
        assert len(list((folder / "client-state").glob("run-*/client-*/prompt"))) == 3
    for ray_round, local_round in zip(ray_rounds, local_rounds, strict=True):
        for key, value in local_round["summary"].items():
            assert ray_round["summary"][key] == pytest.approx(value, abs=1e-6), key
        for cid, metrics in local_round["evaluate"].items():
            assert ray_round["evaluate"][cid]["local-accuracy"] == pytest.approx(
                metrics["local-accuracy"], abs=1e-9)
