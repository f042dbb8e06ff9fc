import json
from pathlib import Path

import pytest

from fedprompt.cli import main


def test_bad_config_key_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "trian.lr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "fedprompt: error: unknown config key 'trian.lr'" in err and "'train.lr'" in err


def test_missing_data_folder_exits_2_and_keeps_the_resolved_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "-q", "--set", "backbone.model='clip-tiny'", "--set",
                 f"data.dataset='{tmp_path / 'missing'}'", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    (run,) = (tmp_path / "out").iterdir()
    assert (run / "config.toml").is_file()  # what was asked for is kept


def test_config_prints_resolved_toml_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "train.lr=0.5"]) == 0
    assert "lr = 0.5" in capsys.readouterr().out
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.lr = 0.1" in out and "prompt.learner" in out


def test_train_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "-q", "--set", "backbone.model='clip-tiny'", "--set",
                 "train.epochs=1", "--set", "data.max_train_per_class=5", "--set",
                 "prompt.n_ctx=2", "--output", str(tmp_path)])
    assert code == 0
    out_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((out_dir / "metrics.json").read_text())["epochs"][0]["epoch"] == 1
