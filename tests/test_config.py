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


def test_flower_app_config_lists_every_key_and_loads() -> None:
    import tomllib

    from fedprompt.config import flatten, from_run_config, valid_keys

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    flat = flatten(app_config)
    assert set(flat) == set(valid_keys()) | {"config"}  # Flower accepts only listed keys
    config = from_run_config(flat)
    assert config.federation.method == "dpfpl"


def test_run_config_overrides_apply_on_top_of_a_named_file(tmp_path: Path) -> None:
    from fedprompt.config import flatten, from_run_config

    path = tmp_path / "run.toml"
    path.write_text("[federation]\nrounds = 7\nlocal_epochs = 3\n")
    flat = flatten(RunConfig().to_dict()) | {"config": str(path), "federation.local_epochs": 2}
    config = from_run_config(flat)
    assert config.federation.rounds == 7 and config.federation.local_epochs == 2
