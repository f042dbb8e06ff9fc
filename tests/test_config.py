from pathlib import Path

import pytest

from fedprompt.config import RunConfig, load_config, parse_override
from fedprompt.errors import ConfigError


def test_layers_defaults_toml_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('name = "x"\n[train]\nlr = 0.1\nepochs = 3\n[prompt]\nlearner = "dpfpl"\n')
    cfg = load_config(path, ["train.lr=0.5", "prompt.rank=4"])
    assert cfg.name == "x"
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3
    assert cfg.prompt.learner == "dpfpl" and cfg.prompt.rank == 4
    assert cfg.train.batch_size == RunConfig().train.batch_size


def test_flat_run_config_mapping() -> None:
    cfg = load_config(overrides={"train.epochs": 2, "data.num_clients": 3, "seed": 7})
    assert (cfg.train.epochs, cfg.data.num_clients, cfg.seed) == (2, 3, 7)


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_config(overrides=["train.lr=0.03", "prompt.ctx_init='a photo of a'",
                                 "prompt.n_ctx=4"])
    path = tmp_path / "resolved.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


def test_unknown_key_names_key_source_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlrr = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.lrr" in message and str(path) in message and "'train.lr'" in message


def test_unknown_section_and_cli_key() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'trian.lr'.*'train.lr'"):
        load_config(overrides=["trian.lr=0.1"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("prompt.n_ctx=0", "prompt.n_ctx"),
        ("prompt.rank=0", "prompt.rank"),
        ("train.lr=-1", "train.lr"),
        ("train.optimizer='adam'", "train.optimizer"),
        ("data.partition='random'", "data.partition"),
        ("train.epochs='many'", "train.epochs"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(overrides=[override])


def test_rank_above_n_ctx_is_rejected_with_fix() -> None:
    with pytest.raises(ConfigError, match=r"rank=8 exceeds n_ctx=4.*prompt.rank <= 4"):
        load_config(overrides=["prompt.learner='dpfpl'", "prompt.n_ctx=4", "prompt.rank=8"])


def test_client_must_exist() -> None:
    with pytest.raises(ConfigError, match="clients are numbered 0..2"):
        load_config(overrides=["data.num_clients=3", "data.client=3"])


def test_missing_file_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_override_values_are_toml_literals() -> None:
    assert parse_override("a=1") == ("a", 1)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=hello") == ("a", "hello")
    assert parse_override("a='x y'") == ("a", "x y")


def test_flower_app_config_is_runconfig_defaults_plus_the_default_preset() -> None:
    """One source of defaults: pyproject's app config lists every key at its RunConfig
    default (Flower accepts only listed keys), and names the default preset."""
    import tomllib

    from fedprompt.config import (
        flatten,
        flower_app_config,
        from_run_config,
        load_config,
        valid_keys,
    )

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert app_config == flower_app_config()  # regenerate: python scripts/app_config.py
    flat = flatten(app_config)
    assert set(flat) == set(valid_keys()) | {"config"}
    # `flwr run .` runs the default preset, value for value
    assert from_run_config(flat) == load_config("default")
    assert load_config("default").federation.method == "dpfpl"


def test_a_named_file_is_not_overridden_by_the_app_config(tmp_path: Path) -> None:
    """The bug of the first version: 14 app-config values silently replaced a named file's
    (a file with rounds=7, lr=0.5, n_ctx=16 ran with 3 / 0.02 / 8; a secfpp file lost its
    data.domains and privacy.mode)."""
    import tomllib

    from fedprompt.config import flatten, from_run_config

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    flat = flatten(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    path = tmp_path / "run.toml"
    path.write_text(
        "[federation]\nrounds = 7\nmethod = 'secfpp'\n[train]\nlr = 0.5\n"
        "[prompt]\nn_ctx = 16\n[privacy]\nmode = 'target-epsilon'\nepsilon = 3.0\n"
        "[data]\ndomains = ['digits', 'digits-inverted']\nnum_clients = 4\n")
    config = from_run_config(flat | {"config": str(path)})
    assert (config.federation.rounds, config.train.lr, config.prompt.n_ctx) == (7, 0.5, 16)
    assert config.federation.method == "secfpp" and config.privacy.mode == "target-epsilon"
    assert config.privacy.epsilon == 3.0 and config.data.num_clients == 4
    assert config.data.domains == ["digits", "digits-inverted"]
    # a --run-config override still applies on top of the file (lists given as strings)
    again = from_run_config(flat | {"config": str(path), "federation.rounds": 2,
                                    "data.domains": "digits"})
    assert again.federation.rounds == 2 and again.data.domains == ["digits"]
    assert again.train.lr == 0.5


def test_presets_load_by_name_and_unknown_names_say_what_exists() -> None:
    from fedprompt.config import load_config, presets

    assert "default" in presets()
    with pytest.raises(ConfigError, match="bundled preset"):
        load_config("no-such-preset")


def test_run_config_overrides_apply_on_top_of_a_named_file(tmp_path: Path) -> None:
    from fedprompt.config import flatten, from_run_config

    path = tmp_path / "run.toml"
    path.write_text("[federation]\nrounds = 7\nlocal_epochs = 3\n")
    flat = flatten(RunConfig().to_dict()) | {"config": str(path), "federation.local_epochs": 2}
    config = from_run_config(flat)
    assert config.federation.rounds == 7 and config.federation.local_epochs == 2


def test_the_servers_resolution_is_exact_and_round_trips_to_clients(tmp_path: Path) -> None:
    """With the run's own overrides (what a ServerApp reads from grid.run) an override
    equal to the default still beats the file; the TOML the server sends its clients
    gives back the very same configuration."""
    import tomllib

    from fedprompt.config import flatten, from_run_config, from_toml_text

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    flat = flatten(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    overrides = {"privacy.mode": "off", "federation.rounds": 2}  # "off" is the default
    fused = flat | overrides
    exact = from_run_config(fused, overrides)
    assert exact.privacy.mode == "off" and exact.federation.rounds == 2
    assert exact.federation.method == "dpfpl"  # the rest from the default preset
    # the fused mapping alone cannot see an override equal to the default
    assert from_run_config(fused).privacy.mode == "target-epsilon"
    for config in (exact, load_config("default"),
                   load_config(overrides=["data.domains='digits,digits-inverted'",
                                          "data.num_clients=4", "privacy.clipping='per-group'",
                                          "privacy.clip_shares='1,2,3'"])):
        assert from_toml_text(config.to_toml()) == config


def test_the_environment_names_the_file_unless_the_run_names_one(tmp_path: Path,
                                                                 monkeypatch) -> None:
    import tomllib

    from fedprompt.config import flatten, from_run_config

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    flat = flatten(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    env_file, run_file = tmp_path / "env.toml", tmp_path / "run.toml"
    env_file.write_text("[federation]\nrounds = 5\n")
    run_file.write_text("[federation]\nrounds = 6\n")
    monkeypatch.setenv("FEDPROMPT_CONFIG", str(env_file))
    assert from_run_config(flat).federation.rounds == 5
    assert from_run_config(flat, {}).federation.rounds == 5
    explicit = {"config": str(run_file)}
    assert from_run_config(flat | explicit).federation.rounds == 6
    assert from_run_config(flat | explicit, explicit).federation.rounds == 6
    monkeypatch.delenv("FEDPROMPT_CONFIG")
    assert from_run_config(flat, {}).federation.rounds == 4  # the default preset
