"""fedprompt-sim (``python -m strategies.inprocess``): exit codes and one clear line for
bad data, bad arguments, rounds in which no client succeeds, and Ctrl-C."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from PIL import Image

from clients.app import app as client_app
from strategies.inprocess import main

BASE = ["backbone.model='clip-tiny'", "data.max_train_per_class=12", "prompt.n_ctx=4",
        "federation.rounds=2", "federation.method='promptfl'", "data.feature_cache=false"]


@pytest.fixture(autouse=True)
def _fedprompt_logger() -> Iterator[None]:
    """main() prints fedprompt's logs on the console (no propagation): undo it after."""
    logger = logging.getLogger("fedprompt")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _image_tree(root: Path, images: dict[str, int]) -> Path:
    """An ImageFolder tree ``root/<class>/<i>.png`` with ``images[class]`` 32x32 PNGs."""
    rng = np.random.default_rng(0)
    for cls, count in images.items():
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _sim(capsys: pytest.CaptureFixture[str], out: Path, *sets: str,
         clients: str | None = None) -> tuple[int, list[str], str]:
    """Run fedprompt-sim; returns its exit code, its own lines on stderr, all of stderr."""
    argv = [arg for s in [*BASE, f"output_dir='{out}'", *sets] for arg in ("--set", s)]
    if clients is not None:
        argv.append(f"--clients={clients}")
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("fedprompt-sim:")], err


def _nothing_created(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_a_missing_data_set_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, lines, _ = _sim(capsys, out, f"data.dataset='{tmp_path / 'nowhere'}'",
                          "data.num_clients=2")
    assert code == 2
    assert lines == [f"fedprompt-sim: error: data set folder {tmp_path / 'nowhere'} does not "
                     "exist: set data.dataset to the root of an ImageFolder tree, or to "
                     "'digits' for the bundled data set"]
    assert _nothing_created(out)


def test_an_empty_data_set_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code, lines, _ = _sim(capsys, tmp_path / "out", f"data.dataset='{tmp_path / 'empty'}'",
                          "data.num_clients=2")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"fedprompt-sim: error: {tmp_path / 'empty'} has no class "
                               "folders")
    assert _nothing_created(tmp_path / "out")


def test_a_class_folder_without_images(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_tree(tmp_path / "data", {"cat": 4, "dog": 0})
    code, lines, _ = _sim(capsys, tmp_path / "out", f"data.dataset='{root}'",
                          "data.num_clients=2")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"fedprompt-sim: error: empty class folder(s): {root / 'dog'} "
                               "hold no images")
    assert _nothing_created(tmp_path / "out")


def test_a_truncated_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    bad = root / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:100])
    code, lines, _ = _sim(capsys, tmp_path / "out", f"data.dataset='{root}'",
                          "data.num_clients=2")
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"fedprompt-sim: error: 1 unreadable image(s): {bad} ")
    assert "Replace these files with valid images or delete them" in lines[0]
    assert _nothing_created(tmp_path / "out")


def test_more_clients_than_classes_for_a_pathological_split(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    code, lines, _ = _sim(capsys, tmp_path / "out", f"data.dataset='{root}'",
                          "data.partition='pathological'", clients="3")
    assert code == 2
    assert lines == ["fedprompt-sim: error: a pathological split gives each client classes of "
                     "its own, so it needs at least as many classes (2) as clients (3): lower "
                     "data.num_clients or use data.partition='dirichlet'"]
    assert _nothing_created(tmp_path / "out")


def test_an_image_folder_that_is_fine_runs(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = _image_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    code, lines, _ = _sim(capsys, tmp_path / "out", f"data.dataset='{root}'",
                          "data.partition='pathological'", clients="2")
    assert (code, lines) == (0, [])
    (run,) = (tmp_path / "out").iterdir()
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["summary"]["clients_trained"] for r in rounds] == [2, 2]


def test_output_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    code, lines, _ = _sim(capsys, target, "data.num_clients=2")
    assert code == 2
    assert lines == [f"fedprompt-sim: error: output_dir {target} is a file, not a folder: set "
                     "output_dir to a folder (it is created if missing)"]
    code, lines, _ = _sim(capsys, target / "below", "data.num_clients=2")
    assert code == 2
    assert lines == [f"fedprompt-sim: error: output_dir {target / 'below'} lies under "
                     f"{target}, which is a file, not a folder: set output_dir to a folder (it "
                     "is created if missing)"]
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("clients", ["-1", "0"])
def test_clients_below_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           clients: str) -> None:
    code, lines, _ = _sim(capsys, tmp_path / "out", clients=clients)
    assert code == 2
    assert lines == [f"fedprompt-sim: error: --clients {clients}: a federation needs at least "
                     "one client; give a whole number >= 1 (or leave it out for "
                     "data.num_clients)"]
    assert _nothing_created(tmp_path / "out")


def _failing_app(exc: BaseException, from_round: int = 1) -> ClientApp:
    """The ClientApp, except that train raises ``exc`` from round ``from_round`` on."""
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        if int(msg.content["config"]["server-round"]) >= from_round:
            raise exc
        return client_app(msg, context)

    app.evaluate()(lambda msg, ctx: client_app(msg, ctx))
    return app


def test_a_round_in_which_no_client_trained_stops_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clients.app.app", _failing_app(RuntimeError("disk full")))
    code, lines, _ = _sim(capsys, tmp_path / "out", "data.num_clients=2")
    (run,) = (tmp_path / "out").iterdir()
    assert code == 2
    assert lines == ["fedprompt-sim: error: round 1: no client trained (2 addressed, all "
                     "failed: 2: RuntimeError: disk full). Results so far are in "
                     f"{run}. Fix the cause and run again, or set "
                     "federation.allow_empty_rounds=true to go on through such rounds"]
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 1 and rounds[0]["summary"]["failed"] == 2

    # allowed: the run goes on through both rounds and ends normally
    code, lines, _ = _sim(capsys, tmp_path / "allowed", "data.num_clients=2",
                          "federation.allow_empty_rounds=true")
    assert (code, lines) == (0, [])
    (run,) = (tmp_path / "allowed").iterdir()
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["summary"]["failed"] for r in rounds] == [2, 2]


def test_ctrl_c_stops_cleanly_with_the_results_so_far(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clients.app.app", _failing_app(KeyboardInterrupt(), from_round=2))
    code, lines, _ = _sim(capsys, tmp_path / "out", "data.num_clients=2",
                          "federation.rounds=3")
    (run,) = (tmp_path / "out").iterdir()
    assert code == 130
    assert lines == [f"fedprompt-sim: interrupted after round 1; results so far in {run}"]
    data = json.loads((run / "metrics.json").read_text())  # intact
    assert [r["round"] for r in data["rounds"]] == [1]
    assert data["rounds"][0]["summary"]["clients_trained"] == 2
    assert set(data["rounds"][0]["evaluate"]) == {"0", "1"}


def test_a_sites_own_missing_folder_is_named_with_its_client(tmp_path: Path) -> None:
    from fedprompt.config import flatten, load_config
    from fedprompt.errors import DataError
    from strategies.inprocess import InProcessGrid, run_on_grid

    config = load_config(overrides=[*BASE, f"output_dir='{tmp_path / 'out'}'"])
    grid = InProcessGrid(client_app, 1, run_config=flatten(config.to_dict()), node_configs=[
        {"partition-id": 4, "num-partitions": 5, "dataset": str(tmp_path / "site")}])
    with pytest.raises(DataError, match=r"^client 4 \(its node config's dataset .*site\): "
                       r"data set folder .*site does not exist"):
        run_on_grid(grid, config)
    assert _nothing_created(tmp_path / "out")


def test_the_serverapp_checks_the_data_of_a_simulation_only(tmp_path: Path) -> None:
    """In a simulation (an in-memory grid) the ServerApp checks the data set and every
    partition before round 1; a deployment's data are on the sites: no check."""
    from flwr.superlink.grid import InMemoryGrid

    from fedprompt.config import load_config
    from fedprompt.errors import DataError
    from strategies.server_app import _simulation_data_check

    class ThreeNodes(InMemoryGrid):
        def __init__(self) -> None:  # no SuperLink state: only the node ids are asked
            pass

        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

    root = _image_tree(tmp_path / "data", {"cat": 4, "dog": 4})
    config = load_config(overrides=[*BASE, f"data.dataset='{root}'",
                                    "data.partition='pathological'"])
    check = _simulation_data_check(ThreeNodes())
    assert check is not None
    with pytest.raises(DataError, match=r"as many classes \(2\) as clients \(3\)"):
        check(config)
    assert _simulation_data_check(object()) is None  # type: ignore[arg-type]
