"""fedprompt's Flower ServerApp.

Builds the initial shared tensors from the run seed (the same learner every client
builds), then runs :class:`~strategies.strategy.FedPromptStrategy` for
``federation.rounds`` rounds. Results go to ``<output_dir>/<name>-<time>/`` (an absolute
path is logged; under ``flwr run`` a relative ``output_dir`` is resolved against the
SuperLink's working directory, so prefer an absolute one).

Before round 1 the results folder's parent is checked, and in a simulation the data set
and every client's partition (:mod:`fedprompt.federated.preflight`): bad data is one
clear error, not a run in which every client fails every round. A round in which no
client succeeds stops the run with an error (``federation.allow_empty_rounds`` lets it go
on), so ``flwr run`` reports it failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedprompt.config import RunConfig, from_run_config
from fedprompt.console import show_fedprompt_logs
from fedprompt.errors import RunError, RunInterrupted
from fedprompt.federated import METHODS, FederatedServer, build_method_learner
from fedprompt.federated.client import cached_backbone
from fedprompt.federated.cluster_backends import build_backend
from fedprompt.federated.clustered import ClusteredServer
from fedprompt.federated.methods import local_dp_names, resolve_method
from fedprompt.federated.preflight import check_federation_data
from fedprompt.results import check_folder, create_run_dir, write_config
from fedprompt.secure.clustering import ClusteringBackend
from fedprompt.seeding import seed_everything
from strategies.strategy import FedPromptStrategy

log = logging.getLogger("fedprompt.server_app")

app = ServerApp()


def build_server(config: RunConfig, num_clients: int,
                 backend: ClusteringBackend | None = None) -> FederatedServer:
    """The server with the initial shared tensors of ``federation.method``.

    Shared tensors do not depend on the number of classes, so the server needs the
    backbone (context width, text init) but no data. A clustered method (secfpp) gets a
    :class:`ClusteredServer` with ``backend``, or the backend ``[clustering]`` names
    (started here; the server closes it).
    """
    learner = build_method_learner(config, cached_backbone(config.backbone), num_classes=1)
    if METHODS[config.federation.method].clustered:
        if backend is None:
            backend = build_backend(config)
        if getattr(backend, "insecure", False):
            log.warning("clustering backend %s is INSECURE: the server reads every client's "
                        "reduced prompt (debugging and tests only)", type(backend).__name__)
        return ClusteredServer(config, learner.shared_state(), num_clients,
                               local_dp_names(config, learner), backend=backend)
    return FederatedServer(config, learner.shared_state(), num_clients,
                           local_dp_names(config, learner))


#: a check of the resolved configuration before round 1 (raises what is wrong)
DataCheck = Callable[[RunConfig], None]


def run_server(grid: Grid, config: RunConfig, output_dir: Path | None = None,
               backend: ClusteringBackend | None = None,
               check_data: DataCheck | None = None) -> Path:
    """Run all rounds on ``grid``; returns the results folder. ``backend``: the clustering
    backend of a clustered method (default: the one ``[clustering]`` names).
    ``check_data``: checks the data before anything is created (see
    :mod:`fedprompt.federated.preflight`); its error ends the run before round 1.

    Ctrl-C raises :class:`~fedprompt.errors.RunInterrupted` with the last round completed
    and the results folder (its files are written atomically after every step, so they
    hold everything done so far). A round in which no client succeeded raises
    :class:`~fedprompt.errors.RunError` unless ``federation.allow_empty_rounds``.
    """
    config = resolve_method(config)  # what runs is what config.toml records
    seed_everything(config.seed)
    num_clients = len(list(grid.get_node_ids()))
    if num_clients == 0:
        raise RunError("no SuperNodes are connected: start at least one before the run")
    check_folder(output_dir if output_dir is not None else config.output_dir)
    if check_data is not None:
        check_data(config)
    out: Path | None = None
    strategy: FedPromptStrategy | None = None
    try:
        out = (output_dir or create_run_dir(config)).resolve()
        write_config(config, out)
        log.info("fedprompt: %s with %d clients; results in %s", config.federation.method,
                 num_clients, out)
        server = build_server(config, num_clients, backend)
        strategy = FedPromptStrategy(server, out)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(server.result_arrays()),
                       num_rounds=config.federation.rounds, timeout=config.federation.timeout,
                       train_config=ConfigRecord(), evaluate_config=ConfigRecord())
        server.history.write(out)
    except KeyboardInterrupt as exc:
        done = strategy.completed_round if strategy is not None else 0
        raise RunInterrupted(done, out) from exc
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_fedprompt_logs()
    run_server(grid, from_run_config(context.run_config, _override_config(grid)),
               check_data=_simulation_data_check(grid))


def _simulation_data_check(grid: Grid) -> DataCheck | None:
    """In a simulation (all clients on this machine, node ``i`` of ``n`` on partition
    ``i``) the data set and every partition are checked before round 1; a deployment's
    data live on the sites, so the server cannot check them (a round in which every
    client fails then stops the run). Images are not decoded here: the clients run in
    other processes and would decode them again."""
    if not isinstance(grid, InMemoryGrid):
        return None

    def check(config: RunConfig) -> None:
        n = len(list(grid.get_node_ids()))
        check_federation_data(config, [{"partition-id": i, "num-partitions": n}
                                       for i in range(n)], images=False)

    return check


def _override_config(grid: Grid) -> dict | None:
    """The run's own ``--run-config`` overrides, where the grid knows its run (SuperLink
    and simulation grids do); ``None`` otherwise."""
    try:
        run = grid.run
    except (NotImplementedError, AttributeError):
        return None
    overrides = getattr(run, "override_config", None)
    return dict(overrides) if overrides is not None else None
