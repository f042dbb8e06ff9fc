"""experiments/sweep.py: a 2-cell grid (plus a column whose data set is missing) runs,
writes sweep.json, cells.csv, table.md and the plot, and resumes without rerunning."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("fedprompt_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _grid(tmp_path: Path) -> Path:
    (tmp_path / "base.toml").write_text(
        'name = "t"\n[backbone]\nmodel = "clip-tiny"\n'
        '[prompt]\nn_ctx = 4\nrank = 2\n'
        '[data]\ndataset = "digits"\nmax_train_per_class = 8\nnum_clients = 2\n'
        '[federation]\nrounds = 1\n'
        '[privacy]\nreproducible_noise = true\n')
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'name = "test-grid"\nbase = "base.toml"\nmethods = ["dpfpl"]\n'
        'epsilons = ["none", 1.0]\nseeds = [0]\n'
        '[[datasets]]\nlabel = "digits"\n'
        '[[datasets]]\nlabel = "absent"\nset = { "data.dataset" = "/nonexistent/data" }\n')
    return grid


def test_sweep_writes_index_table_csv_and_resumes(sweep, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = [str(_grid(tmp_path)), "--out", str(out), "--no-progress"]
    assert sweep.main(argv) == 0

    index = json.loads((out / "sweep.json").read_text())
    cells = index["cells"]
    assert set(cells) == {"digits/dpfpl/eps=none/seed=0", "digits/dpfpl/eps=1/seed=0",
                          "absent/dpfpl/eps=none/seed=0", "absent/dpfpl/eps=1/seed=0"}
    for key in ("digits/dpfpl/eps=none/seed=0", "digits/dpfpl/eps=1/seed=0"):
        assert cells[key]["status"] == "done"
        assert (Path(cells[key]["results"]) / "metrics.json").is_file()
        assert 0.0 <= cells[key]["local_accuracy"] <= 1.0
    assert cells["digits/dpfpl/eps=none/seed=0"]["privacy_label"] == "off"
    # the baseline of the gain: every client's initial prompt, evaluated
    assert 0.0 <= cells["digits/dpfpl/eps=none/seed=0"]["untrained_local_accuracy"] <= 1.0
    private = cells["digits/dpfpl/eps=1/seed=0"]
    assert private["privacy_label"] == "accountant"
    assert 0.0 < private["local_epsilon_max"] <= 1.0 + 1e-6
    for key in ("absent/dpfpl/eps=none/seed=0", "absent/dpfpl/eps=1/seed=0"):
        assert cells[key]["status"] == "skipped"
        assert "/nonexistent/data does not exist" in cells[key]["reason"]
    assert "skip" in capsys.readouterr().err  # the reason is printed, not only recorded

    with (out / "cells.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["dataset"], r["epsilon"], r["status"]) for r in rows] == [
        ("digits", "none", "done"), ("digits", "1", "done"),
        ("absent", "none", "skipped"), ("absent", "1", "skipped")]

    table = (out / "table.md").read_text()
    assert "| ε | digits | absent | ε spent |" in table
    local = table.split("### Neighbor")[0]
    assert "| untrained |" in local and "record-level" in table and "user-level" in table
    row = next(line for line in local.splitlines() if line.startswith("| 1 |"))
    assert row.split("|")[3].strip() == "–"  # the skipped column has no number
    assert float(row.split("|")[2].split("/")[0]) >= 0  # "DP-FPL" local accuracy in %
    assert "Skipped: data set folder /nonexistent/data does not exist" in table
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 0

    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 2
    assert sweep.main(argv) == 0  # resume: nothing new runs
    assert sorted((out / "runs").iterdir()) == runs
    again = json.loads((out / "sweep.json").read_text())
    assert again["counts"] == {"ran": 0, "already done": 2, "skipped": 2, "failed": 0}
    assert again["cells"]["digits/dpfpl/eps=1/seed=0"]["results"] == private["results"]


@pytest.mark.parametrize(("grid", "cells"), [("dpfpl/table2_3.toml", 360),
                                             ("dpfpl/table4.toml", 180),
                                             ("offline/table2_twin.toml", 54)])
def test_shipped_grids_resolve(sweep, tmp_path: Path, grid: str, cells: int) -> None:
    """Every shipped grid builds valid configs; the paper's placeholders are skipped."""
    path = SWEEP.parent / "configs" / grid
    built = sweep.build_cells(sweep.load_grid(path), tmp_path, [])
    assert len(built) == cells
    assert len({c.key for c in built}) == cells
    if grid.startswith("dpfpl/"):
        assert all(c.config.backbone.model == "/checkpoints/clip-vit-base-patch16"
                   for c in built)
        assert all(c.config.train.lr == 1e-3 and c.config.prompt.rank == 8 for c in built)
        if not Path("/data").exists():
            assert all("does not exist" in sweep.missing_input(c.config) for c in built)
    else:
        assert all(Path(c.config.data.dataset).is_absolute() for c in built)
        quick = sweep.build_cells(sweep.load_grid(path, quick=True), tmp_path, [])
        assert len(quick) == 18 and quick[0].config.federation.rounds == 5


def test_the_frontier_grid_is_record_level_and_gives_every_client_two_classes(
        sweep, tmp_path: Path) -> None:
    """experiments/configs/offline/frontier.toml: 504 cells (32 with --quick), local DP only,
    SecFPP only on the two-domain column, and, where the shared data sets are present, at
    least 2 classes per client in every single-domain column (pathological needs fewer
    clients than 10 for that; the file says so)."""
    from fedprompt.data import load_dataset, partition

    path = SWEEP.parent / "configs" / "offline" / "frontier.toml"
    built = sweep.build_cells(sweep.load_grid(path), tmp_path, [])
    quick = sweep.build_cells(sweep.load_grid(path, quick=True), tmp_path, [])
    assert len(built) == len({c.key for c in built}) == 504 and len(quick) == 32
    assert {c.column.label for c in built if c.method == "secfpp"} == {
        "two domains (cifar10-mini + flowers12) Dirichlet 0.3"}
    for cell in built:
        privacy = cell.config.privacy
        assert privacy.local and not privacy.server and privacy.delta == 1e-5
        assert cell.config.train.momentum == 0 and cell.config.train.lr == 0.5
    columns = {c.column.label: c.config for c in built}
    assert len(columns) == 5
    for label, config in columns.items():
        if sweep.missing_input(config) or config.data.domains:
            continue
        parts = partition(load_dataset(config.data), config.data)
        assert min(len(p.classes) for p in parts) >= 2, label


def test_a_piece_of_the_grid_then_the_audit_column(sweep, tmp_path: Path) -> None:
    """--epsilons runs a piece; a second invocation with --audit audits the done cell
    without retraining it and the table shows its bound beside its accountant epsilon."""
    out = tmp_path / "out"
    argv = [str(_grid(tmp_path)), "--out", str(out), "--no-progress", "--datasets", "digits",
            "--epsilons", "1", "--set", "audit.canaries=16"]
    assert sweep.main(argv) == 0
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert list(cells) == ["digits/dpfpl/eps=1/seed=0"]
    results = cells["digits/dpfpl/eps=1/seed=0"]["results"]
    assert sweep.main([*argv, "--audit", "one-run"]) == 0
    cell = json.loads((out / "sweep.json").read_text())["cells"]["digits/dpfpl/eps=1/seed=0"]
    assert cell["results"] == results  # not retrained
    assert 0.0 <= cell["audit_epsilon_lower_bound"] <= cell["audit_accountant_epsilon"] <= 1.0001
    assert (Path(results) / "audit.json").is_file()
    table = (out / "table.md").read_text()
    assert "### Audit (record-level" in table
    with pytest.raises(SystemExit, match="not in the grid"):
        sweep.main([*argv, "--methods", "promptfl", "--dry-run"])


def test_two_sweeps_into_one_folder_keep_each_others_cells(sweep, tmp_path: Path) -> None:
    """Each process writes only the cells it ran: a second process that loaded the index
    before the first wrote does not erase the first one's records."""
    path = tmp_path / "sweep.json"
    first = {"schema": sweep.SCHEMA, "cells": {"a": {"status": "running"}}}
    second = {"schema": sweep.SCHEMA, "cells": {"b": {"status": "running"}}}
    sweep.save_index(first, path, ["a"])
    first["cells"]["a"] = {"status": "done"}
    sweep.save_index(second, path, ["b"])  # loaded before "a" was done
    merged = sweep.save_index(first, path, ["a"])
    assert merged["cells"] == {"a": {"status": "done"}, "b": {"status": "running"}}
    assert json.loads(path.read_text())["cells"] == merged["cells"]


def test_the_search_grid_reads_a_validation_split_never_the_test_split(sweep, tmp_path) -> None:
    path = SWEEP.parent / "configs" / "offline" / "frontier_search.toml"
    built = sweep.build_cells(sweep.load_grid(path), tmp_path, [])
    assert len(built) == 15
    for cell in built:
        assert cell.config.data.validation_fraction == 0.2
        assert cell.config.privacy.local and not cell.config.privacy.server
        assert cell.config.privacy.epsilon == 1.0
