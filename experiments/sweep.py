"""Run a grid of federated experiments and tabulate it in DP-FPL's layout (Tables 2-4).

    python experiments/sweep.py GRID.toml [--dry-run] [--quick] [--out DIR]
        [--seeds 1 2 ...] [--methods M ...] [--epsilons E ...] [--datasets TEXT ...]
        [--set key=value ...] [--audit one-run|all] [--report-only] [--threads N]

A grid file names the axes; every cell (data set x method x epsilon x seed) is one
``strategies.inprocess.run_inprocess`` run::

    name = "table2"                          # default output: results/sweeps/<name>
    base = "base.toml"                       # optional: config shared by all data sets
    methods = ["promptfl", "fedpgp", "dpfpl"]
    epsilons = ["none", 0.4, 0.1]            # "none": privacy.mode = "off"
    seeds = [1, 2, 3]
    privacy_mode = "target-epsilon"          # mode of the non-"none" epsilons (or "nominal")
    report_last_rounds = 1                   # average accuracy over the last k evaluated rounds
    audit = "one-run"                        # optional: `fedprompt audit` each done cell
                                             # ("one-run" bound, or "all" with the attacks)
    set = { "federation.rounds" = 10 }       # overrides for every cell

    [[datasets]]                             # one table column each
    label = "Caltech101"
    config = "caltech101.toml"               # replaces `base` for this column
    set = { "data.num_clients" = 10 }        # overrides for this column
    methods = ["promptfl", "dpfpl"]          # optional: only these methods in this column

    [quick]                                  # --quick: these keys replace the ones above
    seeds = [0]                              # (`set` is merged instead)

Paths: ``base`` and ``config`` are relative to the grid file; a relative ``data.dataset`` or
a ``backbone.model`` that starts with ``.`` is relative to the repository root (the folder
holding ``experiments/``), whatever the working directory. A cell whose data set or
checkpoint folder does not exist is skipped with the reason printed and recorded.
Overrides apply in this order: config file, grid ``set``, column ``set``, the cell's axes,
then ``--set``. ``--methods``, ``--epsilons`` and ``--datasets`` run a piece of the grid
(cells already done are kept, so a grid can be filled in over several invocations).

Output folder (default ``results/sweeps/<name>``, ``-quick`` appended with ``--quick``):

* ``sweep.json``: one record per cell (status done/skipped/failed/running, reason, results
  folder, a fingerprint of the resolved config, the figures read from its metrics.json),
  rewritten after every cell; a second invocation skips cells done with the same config;
* ``runs/<cell>-<time>/``: each run's results folder (metrics.json, privacy ledger, plots);
* ``cells.csv``: one row per cell; ``table.md``: local and neighbor accuracy tables (rows
  epsilon, columns data sets, "PromptFL / FedPGP / DP-FPL" mean over seeds +- std) with
  the accountant epsilon spent beside each privacy level, and with ``audit`` a table of
  each cell's empirical epsilon lower bound beside its accountant epsilon (the cell's
  ``audit.json`` is in its results folder); ``accuracy_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import json
import logging
import math
import re
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.atomic import atomic_write_text
from fedprompt.config import RunConfig, flatten, load_config, parse_override
from fedprompt.console import console, make_progress
from fedprompt.data.datasets import BUNDLED
from fedprompt.results import create_run_dir

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "fedprompt.sweep/1"
METHOD_NAMES = {"promptfl": "PromptFL", "fedpgp": "FedPGP", "dpfpl": "DP-FPL", "secfpp": "SecFPP",
                "local-only": "Local", "dpfpl-no-residual": "DP-FPL w/o r",
                "dpfpl-full-rank": "DP-FPL full rank"}
CSV_COLUMNS = ["key", "dataset", "method", "epsilon", "seed", "status", "reason",
               "local_accuracy", "local_accuracy_client_std", "neighbor_accuracy",
               "neighbor_accuracy_client_std", "val_accuracy", "local_epsilon_max",
               "global_epsilon", "privacy_label", "nominal_epsilon", "clusters", "cluster_ari",
               "clustering_seconds", "untrained_local_accuracy",
               "untrained_neighbor_accuracy", "audit_epsilon_lower_bound",
               "audit_accountant_epsilon", "audit_best_auc", "seconds", "results"]


# ----------------------------------------------------------------------------- grid
@dataclass
class Column:
    label: str
    config: Path | None
    overrides: dict[str, Any] = field(default_factory=dict)
    methods: list[str] | None = None  # only these of the grid's methods (None: all)


@dataclass
class Grid:
    name: str
    path: Path
    columns: list[Column]
    methods: list[str]
    epsilons: list[float | None]  # None: no privacy
    seeds: list[int]
    privacy_mode: str = "target-epsilon"
    report_last_rounds: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    audit: str = "off"  # "off", "one-run" or "all" (see AUDIT_MODES)


#: grid key ``audit``: what ``fedprompt audit`` runs on each done cell (client
#: ``audit.client`` of the cell's run); "one-run": the one-run bound only (one extra
#: training per cell); "all": also the membership attacks (``audit.shadows`` more)
AUDIT_MODES = ("off", "one-run", "all")


def load_grid(path: Path, quick: bool = False) -> Grid:
    data = tomllib.loads(path.read_text())
    all_methods = list(data.get("methods", []))
    if quick:
        if "quick" not in data:
            raise SystemExit(f"{path} has no [quick] section, so --quick does not apply")
        for key, value in data["quick"].items():
            data[key] = {**data.get(key, {}), **value} if key == "set" else value
    here = path.parent

    def rel(p: str | None) -> Path | None:
        return None if p is None else (here / p).resolve()

    columns = []
    for entry in data.get("datasets", []):
        if isinstance(entry, str):  # a bare data set path
            entry = {"label": Path(entry).name, "set": {"data.dataset": entry}}
        only = entry.get("methods")
        if only is not None and set(only) - set(all_methods):
            raise SystemExit(f"{path}: column {entry['label']!r} names methods "
                             f"{sorted(set(only) - set(all_methods))} that the grid's "
                             "methods do not list")
        columns.append(Column(entry["label"], rel(entry.get("config", data.get("base"))),
                              flatten(entry.get("set", {})), only))
    if not columns:
        raise SystemExit(f"{path} lists no [[datasets]]")
    epsilons = [None if str(e).lower() == "none" else float(e)
                for e in data.get("epsilons", ["none"])]
    return Grid(name=data.get("name", path.stem) + ("-quick" if quick else ""), path=path,
                columns=columns, methods=list(data["methods"]), epsilons=epsilons,
                seeds=[int(s) for s in data.get("seeds", [0])],
                privacy_mode=data.get("privacy_mode", "target-epsilon"),
                report_last_rounds=int(data.get("report_last_rounds", 1)),
                overrides=flatten(data.get("set", {})), audit=_audit_mode(data, path))


def _audit_mode(data: dict[str, Any], path: Path) -> str:
    value = data.get("audit", "off")
    mode = {True: "one-run", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if mode not in AUDIT_MODES:
        raise SystemExit(f"{path}: audit = {value!r}; use one of {', '.join(AUDIT_MODES)} "
                         "(or true for one-run)")
    return str(mode)


# ----------------------------------------------------------------------------- cells
@dataclass
class Cell:
    column: Column
    method: str
    epsilon: float | None
    seed: int
    config: RunConfig

    @property
    def eps_label(self) -> str:
        return "none" if self.epsilon is None else f"{self.epsilon:g}"

    @property
    def key(self) -> str:
        return f"{self.column.label}/{self.method}/eps={self.eps_label}/seed={self.seed}"

    @property
    def fingerprint(self) -> str:
        """Hash of the settings that differ from the defaults (so a new config key with a
        default does not invalidate cells already done)."""
        defaults = flatten(RunConfig().to_dict())
        changed = {k: v for k, v in flatten(self.config.to_dict()).items()
                   if k not in ("name", "output_dir") and defaults.get(k, object()) != v}
        return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]


def _resolve(value: str, is_path: bool) -> str:
    """A relative path, resolved against the repository root."""
    path = Path(value).expanduser()
    return str((ROOT / path).resolve()) if is_path and not path.is_absolute() else str(path)


def resolve_paths(config: RunConfig) -> RunConfig:
    data, model = config.data.dataset, config.backbone.model
    return config.with_overrides({
        "data.dataset": _resolve(data, data not in BUNDLED),
        "data.domains": [_resolve(d, d not in BUNDLED) for d in config.data.domains],
        "backbone.model": _resolve(model, model.startswith((".", "~"))),
    }, source="sweep path resolution")


def missing_input(config: RunConfig) -> str | None:
    """Why ``config`` cannot run here (data set or checkpoint folder absent), or None."""
    data, model = config.data.dataset, config.backbone.model
    for folder, key in [(data, "data.dataset")] + [(d, "data.domains")
                                                   for d in config.data.domains]:
        if key == "data.dataset" and config.data.domains:
            continue  # data.domains replaces data.dataset
        if folder not in BUNDLED and not Path(folder).is_dir():
            return f"data set folder {folder} does not exist (edit {key})"
    if model.startswith(("/", ".", "~")) and not Path(model).is_dir():
        return f"checkpoint folder {model} does not exist (edit backbone.model)"
    return None


def build_cells(grid: Grid, out: Path, extra: list[str]) -> list[Cell]:
    cells = []
    for column in grid.columns:
        for eps in grid.epsilons:
            for method in grid.methods:
                if column.methods is not None and method not in column.methods:
                    continue
                for seed in grid.seeds:
                    privacy = ({"privacy.mode": "off"} if eps is None else
                               {"privacy.mode": grid.privacy_mode, "privacy.epsilon": eps})
                    eps_tag = "none" if eps is None else f"{eps:g}"
                    name = re.sub(r"[^\w.-]+", "_", f"{column.label}-{method}-eps{eps_tag}-s{seed}")
                    config = load_config(column.config, {
                        **grid.overrides, **column.overrides, **privacy,
                        "federation.method": method, "seed": seed, "name": name,
                        "output_dir": str(out / "runs")})
                    if extra:
                        config = config.with_overrides(dict(map(parse_override, extra)), "--set")
                    cells.append(Cell(column, method, eps, seed, resolve_paths(config)))
    return cells


# ----------------------------------------------------------------------------- running
def read_figures(results: Path, last_rounds: int) -> dict[str, Any]:
    """Accuracy (mean over clients, averaged over the last evaluated rounds) and the
    epsilon spent, from a run's metrics.json."""
    metrics = json.loads((results / "metrics.json").read_text())
    summaries = [r["summary"] for r in metrics["rounds"]]
    evaluated = [s for s in summaries if s.get("local_accuracy_mean") is not None]
    last = evaluated[-last_rounds:]

    def mean(key: str) -> float | None:
        values = [s[key] for s in last if s.get(key) is not None]
        return float(np.mean(values)) if values else None

    def most(key: str) -> float | None:
        values = [s[key] for s in summaries if s.get(key) is not None]
        return max(values) if values else None

    privacy = metrics["privacy"]
    final = summaries[-1] if summaries else {}
    clustering = [s["clustering_seconds"] for s in summaries
                  if s.get("clustering_seconds") is not None]
    clustered = {"clusters": final.get("clusters"), "cluster_ari": final.get("cluster_ari"),
                 "clustering_seconds": float(np.mean(clustering)) if clustering else None
                 } if "clusters" in final else {}
    return {**clustered, "local_accuracy": mean("local_accuracy_mean"),
            "local_accuracy_client_std": mean("local_accuracy_std"),
            "neighbor_accuracy": mean("neighbor_accuracy_mean"),
            "neighbor_accuracy_client_std": mean("neighbor_accuracy_std"),
            "val_accuracy": mean("val_accuracy_mean"),
            "local_epsilon_max": most("local_epsilon_max"),
            "global_epsilon": most("global_epsilon"),
            "privacy_label": privacy["label"] if privacy["mode"] != "off" else "off",
            "nominal_epsilon": privacy.get("nominal_epsilon"),
            "rounds_evaluated": [s["round"] for s in last]}


def untrained_figures(config: RunConfig) -> dict[str, float | None]:
    """Mean over clients of the local and neighbor accuracy of the **initial** prompt of
    ``config`` (its method, its seed): the baseline a method's gain is measured from. It
    evaluates every client's untrained prompt on its test split, as a round's evaluation
    does (no training data is touched)."""
    from fedprompt.federated.generative import open_client_session

    num = config.data.num_clients
    local, neighbor = [], []
    for client in range(num):
        session = open_client_session(config, client, num)
        metrics = session.evaluate(session.initial_shared, None)
        local.append(float(metrics["local-accuracy"]))
        if "neighbor-accuracy" in metrics:
            neighbor.append(float(metrics["neighbor-accuracy"]))
    return {"untrained_local_accuracy": float(np.mean(local)),
            "untrained_neighbor_accuracy": float(np.mean(neighbor)) if neighbor else None}


def baseline_cell(cell: Cell) -> dict[str, Any]:
    """:func:`untrained_figures` for a done cell; a failure is printed and recorded
    (``untrained_error``) and leaves the cell's own figures standing."""
    try:
        return untrained_figures(cell.config)
    except Exception as exc:  # the cell trained fine; say why its baseline is missing
        console.print(f"[red]untrained baseline failed[/] {cell.key}: {exc!r}")
        return {"untrained_error": repr(exc)}


def audit_cell(grid: Grid, cell: Cell, results: Path) -> dict[str, Any]:
    """Run ``fedprompt audit`` on a done cell's results folder; the figures for the table
    (an audit that fails is recorded as such and does not fail the cell)."""
    from fedprompt.audit.run import run_audit

    config = cell.config.with_overrides({"audit.membership": grid.audit == "all",
                                         "audit.one_run": True}, source="sweep audit")
    try:
        report_ = run_audit(config, results, progress=False).report
    except Exception as exc:  # the cell's training stands; say why its audit is missing
        console.print(f"[red]audit failed[/] {cell.key}: {exc!r}")
        return {"audit_error": repr(exc)}
    one = report_["one_run"]
    attacks = report_.get("membership", {}).get("attacks", {})
    figures = {"audit_epsilon_lower_bound": one["epsilon_lower_bound"],
               "audit_accountant_epsilon": one["accountant_epsilon"],
               "audit_best_auc": max((a["auc"] for a in attacks.values()), default=None)}
    console.print(f"[green]audit[/] {cell.key}: empirical epsilon >= "
                  f"{one['epsilon_lower_bound']:.3f} vs accountant "
                  f"{_epsilon_or_none(one['accountant_epsilon'])}")
    return figures


def _epsilon_or_none(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def save_index(index: dict[str, Any], path: Path, keys: list[str] | None = None) -> dict:
    """Write ``index`` to ``path`` atomically, merging under a lock with what other sweep
    processes wrote there meanwhile: only the cells named in ``keys`` (default: all of
    ``index``'s) are taken from ``index``, so two invocations that run different cells of a
    grid into one folder (``--methods``/``--epsilons``/``--datasets``) keep each other's
    records. Returns the merged index."""
    lock = path.with_suffix(".lock")
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = (json.loads(path.read_text()) if path.is_file()
                       else {"schema": SCHEMA, "cells": {}})
            cells = current.get("cells", {})
            for key in index["cells"] if keys is None else keys:
                cells[key] = index["cells"][key]
            merged = {**current, **{k: v for k, v in index.items() if k != "cells"},
                      "cells": cells}
            atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return merged


def run_cells(grid: Grid, cells: list[Cell], out: Path, show_progress: bool = True,
              verbose: bool = False) -> dict:
    from strategies.inprocess import run_inprocess  # imports flwr, which resets its logger

    if not verbose:
        for name in ("flwr", "fedprompt"):
            logging.getLogger(name).setLevel(logging.WARNING)

    index_path = out / "sweep.json"
    index = (json.loads(index_path.read_text()) if index_path.is_file()
             else {"schema": SCHEMA, "cells": {}})
    index |= {"grid": str(grid.path), "name": grid.name, "updated": time.ctime()}
    records: dict[str, dict[str, Any]] = index["cells"]
    counts = {"ran": 0, "already done": 0, "skipped": 0, "failed": 0}
    with make_progress(show_progress) as progress:
        task = progress.add_task(grid.name, total=len(cells), info="")
        for cell in cells:
            progress.update(task, info=cell.key)
            old = records.get(cell.key, {})
            if (old.get("status") == "done" and old.get("fingerprint") == cell.fingerprint
                    and Path(old.get("results", "")).joinpath("metrics.json").is_file()):
                counts["already done"] += 1
                if cell.epsilon is None and "untrained_local_accuracy" not in old:
                    old |= baseline_cell(cell)
                    save_index(index, index_path, [cell.key])
                if grid.audit != "off" and "audit_epsilon_lower_bound" not in old:
                    old |= audit_cell(grid, cell, Path(old["results"]))
                    save_index(index, index_path, [cell.key])
                progress.advance(task)
                continue
            if old.get("status") == "done":
                console.print(f"[yellow]rerun[/] {cell.key}: its configuration changed")
            record: dict[str, Any] = {
                "dataset": cell.column.label, "method": cell.method, "epsilon": cell.eps_label,
                "seed": cell.seed, "fingerprint": cell.fingerprint}
            reason = missing_input(cell.config)
            if reason:
                records[cell.key] = record | {"status": "skipped", "reason": reason}
                console.print(f"[yellow]skip[/] {cell.key}: {reason}")
                counts["skipped"] += 1
            else:
                results = create_run_dir(cell.config)
                records[cell.key] = record | {"status": "running", "results": str(results)}
                save_index(index, index_path, [cell.key])
                start = time.time()
                try:
                    run_inprocess(cell.config, output_dir=results)
                    figures = read_figures(results, grid.report_last_rounds)
                    records[cell.key] |= {"status": "done", **figures}
                    if cell.epsilon is None:
                        records[cell.key] |= baseline_cell(cell)
                    if grid.audit != "off":
                        records[cell.key] |= audit_cell(grid, cell, results)
                    counts["ran"] += 1
                    console.print(f"[green]done[/] {cell.key} in {time.time() - start:.0f} s: "
                                  f"local {_pct(figures['local_accuracy'])}, neighbor "
                                  f"{_pct(figures['neighbor_accuracy'])}")
                except Exception as exc:  # keep going; the record says what happened
                    records[cell.key] |= {"status": "failed", "reason": repr(exc),
                                          "traceback": traceback.format_exc()}
                    counts["failed"] += 1
                    console.print(f"[red]failed[/] {cell.key}: {exc!r}")
                records[cell.key]["seconds"] = time.time() - start
            save_index(index, index_path, [cell.key])
            progress.advance(task)
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()))
    index["counts"] = counts
    return save_index(index, index_path, [])


# ----------------------------------------------------------------------------- reporting
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _stats(values: list[float]) -> tuple[float, float | None] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def _cell_records(index: dict, cells: list[Cell]) -> list[dict[str, Any]]:
    return [{"key": c.key, **index["cells"].get(c.key, {"status": "not run"}),
             "dataset": c.column.label, "method": c.method, "epsilon": c.eps_label,
             "seed": c.seed} for c in cells]


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _group(records: list[dict[str, Any]], dataset: str, eps: str, method: str) -> list[dict]:
    return [r for r in records if r["dataset"] == dataset and r["epsilon"] == eps
            and r["method"] == method and r.get("status") == "done"]


def _spent(records: list[dict[str, Any]], eps: str) -> str:
    done = [r for r in records if r["epsilon"] == eps and r.get("status") == "done"]
    if eps == "none" or not done:
        return "–"
    local = [r["local_epsilon_max"] for r in done if r.get("local_epsilon_max") is not None]
    glob = [r["global_epsilon"] for r in done if r.get("global_epsilon") is not None]
    text = (f"{max(local):.3g}" if local else "–") + " / " + (f"{max(glob):.3g}" if glob
                                                                 else "–")
    nominal = any(r.get("privacy_label") == "nominal" for r in done)
    return f"nominal {eps}; accountant {text}" if nominal else text


def gain_kept(records: list[dict[str, Any]], dataset: str, eps: str, method: str
              ) -> float | None:
    """Mean over seeds of ``(acc(eps) - acc(untrained)) / (acc(none) - acc(untrained))``
    (local accuracy, paired by seed): the share of the non-private gain a private run
    keeps."""
    shares = []
    for private in _group(records, dataset, eps, method):
        for plain in _group(records, dataset, "none", method):
            base = plain.get("untrained_local_accuracy")
            if plain["seed"] != private["seed"] or base is None:
                continue
            gain = plain["local_accuracy"] - base
            if gain > 0 and private.get("local_accuracy") is not None:
                shares.append((private["local_accuracy"] - base) / gain)
    return float(np.mean(shares)) if shares else None


def gain_table(grid: Grid, records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the share of the non-private gain over the untrained prompt each
    private row keeps (empty when no pair of runs allows it)."""
    numeric = [f"{e:g}" for e in grid.epsilons if e is not None]
    datasets = [c.label for c in grid.columns]
    rows = []
    for eps in numeric:
        cells = []
        for dataset in datasets:
            parts = [gain_kept(records, dataset, eps, method) for method in grid.methods]
            cells.append(" / ".join("–" if p is None else f"{100 * p:.0f}%" for p in parts))
        if any(c.strip("–/ ") for c in cells):
            rows.append(f"| {eps} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["### Share of the non-private gain kept (local accuracy)", "",
            "(private - untrained) / (non-private - untrained), same method, same rounds, "
            "paired by seed.", "", "| ε | " + " | ".join(datasets) + " |",
            "|---" * (len(datasets) + 1) + "|", *rows, ""]


def markdown_tables(grid: Grid, records: list[dict[str, Any]]) -> str:
    datasets = [c.label for c in grid.columns]
    eps_labels = ["none" if e is None else f"{e:g}" for e in grid.epsilons]
    names = " / ".join(METHOD_NAMES.get(m, m) for m in grid.methods)
    seeds = ", ".join(str(s) for s in grid.seeds)
    lines = [f"Grid `{grid.name}` ({grid.path.name}); seeds {seeds}; each cell: {names}, "
             "accuracy in % (mean over clients"
             + (f", averaged over the last {grid.report_last_rounds} evaluated rounds"
                if grid.report_last_rounds > 1 else ", last round")
             + "), mean over seeds ± sample std over seeds. Privacy mode of the non-'none' "
             f"rows: `{grid.privacy_mode}`. \"ε spent\": the accountant's epsilon at "
             "δ from the run: **record-level** (local DP, max over clients) / "
             "**user-level** (server DP), max over the row's runs; '–' where that level "
             "is off. \"untrained\": the initial prompt of each method (same seeds).", ""]
    tables = [("local_accuracy", "Local accuracy (Table 2 layout)"),
              ("neighbor_accuracy", "Neighbor accuracy (Table 3 layout)")]
    if any(r.get("val_accuracy") is not None for r in records):
        tables.append(("val_accuracy", "Validation accuracy (held out from each client's "
                                       "training data: what a hyperparameter search reads)"))
    for metric, title in tables:
        lines += [f"### {title}", "", "| ε | " + " | ".join(datasets) + " | ε spent |",
                  "|---" * (len(datasets) + 2) + "|"]
        untrained = []
        for dataset in datasets:
            parts = []
            for method in grid.methods:
                stats = _stats([r.get(f"untrained_{metric}")
                                for r in _group(records, dataset, "none", method)])
                parts.append("–" if stats is None else f"{100 * stats[0]:.2f}")
            untrained.append(" / ".join(parts))
        if any(part.strip("–/ ") for part in untrained):
            lines.append("| untrained | " + " | ".join(untrained) + " | – |")
        for eps in eps_labels:
            cells = []
            for dataset in datasets:
                parts = []
                for method in grid.methods:
                    stats = _stats([r.get(metric) for r in _group(records, dataset, eps, method)])
                    if stats is None:
                        parts.append("–")
                    else:
                        mean, std = stats
                        parts.append(f"{100 * mean:.2f}" + ("" if std is None
                                                            else f" ± {100 * std:.2f}"))
                cells.append(" / ".join(parts))
            lines.append(f"| {eps} | " + " | ".join(cells) + f" | {_spent(records, eps)} |")
        lines.append("")
    lines += gain_table(grid, records)
    clustered = [r for r in records if r.get("status") == "done" and "clusters" in r]
    if clustered:
        lines += ["### Clustering (clustered methods, last round)", "",
                  "| data set | method | ε | seed | clusters | ARI vs domains | "
                  "mean clustering s |", "|---|---|---|---|---|---|---|"]
        for r in clustered:
            ari, secs = r.get("cluster_ari"), r.get("clustering_seconds")
            lines.append(f"| {r['dataset']} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                         f"{r['epsilon']} | {r['seed']} | {r.get('clusters')} | "
                         f"{'–' if ari is None else f'{ari:.2f}'} | "
                         f"{'–' if secs is None else f'{secs:.2f}'} |")
        lines.append("")
    audited = [r for r in records if r.get("status") == "done"
               and r.get("audit_epsilon_lower_bound") is not None]
    if audited:
        lines += ["### Audit (record-level, one client per cell)", "",
                  "Empirical epsilon lower bound of the one-run audit (Steinke et al. 2023, "
                  "95% confidence unless audit.confidence says otherwise) beside the "
                  "accountant's epsilon of the same canaried training; best membership AUC "
                  "where the grid ran the attacks (audit = \"all\").", "",
                  "| data set | method | ε | seed | lower bound | accountant ε | best AUC |",
                  "|---|---|---|---|---|---|---|"]
        for r in audited:
            auc = r.get("audit_best_auc")
            lines.append(f"| {r['dataset']} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                         f"{r['epsilon']} | {r['seed']} | "
                         f"{r['audit_epsilon_lower_bound']:.3f} | "
                         f"{_epsilon_or_none(r.get('audit_accountant_epsilon'))} | "
                         f"{'–' if auc is None else f'{auc:.3f}'} |")
        lines.append("")
    counts: dict[str, int] = {}
    for r in records:
        counts[r.get("status", "not run")] = counts.get(r.get("status", "not run"), 0) + 1
    lines.append("Cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".")
    skipped = sorted({r.get("reason", "") for r in records if r.get("status") == "skipped"})
    lines += [f"Skipped: {reason}" for reason in skipped]
    return "\n".join(lines) + "\n"


def plot(grid: Grid, records: list[dict[str, Any]], path: Path) -> None:
    """Local (top) and neighbor (bottom) accuracy against epsilon, one column per data
    set, one line per method; "none" (no privacy) drawn as a star at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = sorted(e for e in grid.epsilons if e is not None)
    none_x = numeric[-1] * 4 if numeric else 1.0
    fig, axes = plt.subplots(2, len(grid.columns), figsize=(4 * len(grid.columns), 6.5),
                             dpi=120, squeeze=False, sharex=True)
    for j, column in enumerate(grid.columns):
        for i, (metric, label) in enumerate([("local_accuracy", "local"),
                                             ("neighbor_accuracy", "neighbor")]):
            ax = axes[i][j]
            for k, method in enumerate(grid.methods):
                color = f"C{k}"
                points = []
                for eps in numeric:
                    stats = _stats([r.get(metric) for r in
                                    _group(records, column.label, f"{eps:g}", method)])
                    if stats:
                        points.append((eps, stats[0], stats[1] or 0.0))
                if points:
                    x, y, err = (np.array(v) for v in zip(*points, strict=True))
                    ax.errorbar(x, 100 * y, yerr=100 * err, marker="o", color=color,
                                capsize=3, label=METHOD_NAMES.get(method, method))
                base = _stats([r.get(metric) for r in
                               _group(records, column.label, "none", method)])
                if base:
                    ax.errorbar([none_x], [100 * base[0]], yerr=[100 * (base[1] or 0.0)],
                                marker="*", markersize=12, color=color, capsize=3,
                                label=None if points else METHOD_NAMES.get(method, method))
            ax.set_xscale("log")
            ax.set_xticks([*numeric, none_x], [f"{e:g}" for e in numeric] + ["none"])
            ax.minorticks_off()
            if numeric:
                ax.axvline(math.sqrt(numeric[-1] * none_x), color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            empty = not any(r["dataset"] == column.label and r.get("status") == "done"
                            for r in records)
            ax.set_title(f"{column.label}: {label}" + (" (no runs)" if empty else ""))
            if i == 1:
                ax.set_xlabel("ε (log scale; ★ = no privacy)")
            if j == 0:
                ax.set_ylabel(f"{label} accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path)
    plt.close(fig)


def report(grid: Grid, cells: list[Cell], index: dict, out: Path) -> str:
    records = _cell_records(index, cells)
    write_csv(records, out / "cells.csv")
    table = markdown_tables(grid, records)
    (out / "table.md").write_text(table)
    plot(grid, records, out / "accuracy_vs_epsilon.png")
    return table


# ----------------------------------------------------------------------------- command
def select(grid: Grid, methods: list[str] | None, epsilons: list[str] | None,
           datasets: list[str] | None) -> None:
    """Keep only the named methods, epsilons and columns of ``grid`` (a grid is run in
    pieces: fewer seeds or cells first, the rest later into the same folder)."""
    if methods:
        unknown = sorted(set(methods) - set(grid.methods))
        if unknown:
            raise SystemExit(f"--methods {unknown} are not in the grid's {grid.methods}")
        grid.methods = [m for m in grid.methods if m in methods]
    if epsilons:
        wanted = {None if e.lower() == "none" else float(e) for e in epsilons}
        if wanted - set(grid.epsilons):
            raise SystemExit(f"--epsilons {epsilons} are not all in the grid's "
                             f"{['none' if e is None else e for e in grid.epsilons]}")
        grid.epsilons = [e for e in grid.epsilons if e in wanted]
    if datasets:
        grid.columns = [c for c in grid.columns if any(t in c.label for t in datasets)]
        if not grid.columns:
            raise SystemExit(f"--datasets {datasets} match no column label")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grid", type=Path, help="grid TOML file")
    parser.add_argument("--out", type=Path, help="output folder (default: "
                        "results/sweeps/<grid name>)")
    parser.add_argument("--seeds", type=int, nargs="+", help="replace the grid's seeds")
    parser.add_argument("--methods", nargs="+", help="run only these of the grid's methods")
    parser.add_argument("--epsilons", nargs="+", help="run only these of the grid's epsilons "
                        "('none' or numbers)")
    parser.add_argument("--datasets", nargs="+", metavar="TEXT", help="run only the columns "
                        "whose label contains one of these texts")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override for every cell (applied last)")
    parser.add_argument("--quick", action="store_true", help="apply the grid's [quick] section")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild table.md, cells.csv and the plot from sweep.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--verbose", action="store_true", help="keep Flower's per-round log")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--audit", choices=AUDIT_MODES, help="audit every done cell (replaces "
                        "the grid's audit key): one-run bound, or all attacks")
    return parser


def plan(argv: list[str] | None = None) -> tuple[argparse.Namespace, Grid, Path, list[Cell]]:
    """Parse the command line and build the grid, output folder and cells it selects."""
    args = _parser().parse_args(argv)
    grid = load_grid(args.grid.resolve(), args.quick)
    if args.seeds:
        grid.seeds = args.seeds
    select(grid, args.methods, args.epsilons, args.datasets)
    if args.audit:
        grid.audit = args.audit
    out = (args.out or ROOT / "results" / "sweeps" / grid.name).resolve()
    return args, grid, out, build_cells(grid, out, args.overrides)


def main(argv: list[str] | None = None) -> int:
    args, grid, out, cells = plan(argv)
    index_path = out / "sweep.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"cells": {}}
    if args.dry_run:
        for cell in cells:
            old = index["cells"].get(cell.key, {})
            done = old.get("status") == "done" and old.get("fingerprint") == cell.fingerprint
            action = "done" if done else (missing_input(cell.config) and
                                          f"skip: {missing_input(cell.config)}") or "run"
            print(f"{cell.key}: {action}")
        print(f"{len(cells)} cells; output folder {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        index = run_cells(grid, cells, out, show_progress=not args.no_progress,
                          verbose=args.verbose)
    print(report(grid, cells, index, out))
    print(f"results in {out}")
    failed = [c.key for c in cells if index["cells"].get(c.key, {}).get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
