"""fedprompt's Flower ServerApp.

Builds the initial shared tensors from the run seed (the same learner every client
builds), then runs :class:`~strategies.strategy.FedPromptStrategy` for
``federation.rounds`` rounds. Results go to ``<output_dir>/<name>-<time>/`` (an absolute
path is logged; under ``flwr run`` a relative ``output_dir`` is resolved against the
SuperLink's working directory, so prefer an absolute one).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedprompt.config import RunConfig, from_run_config
from fedprompt.console import show_fedprompt_logs
from fedprompt.federated import METHODS, FederatedServer, build_method_learner
from fedprompt.federated.client import cached_backbone
from fedprompt.federated.cluster_backends import build_backend
from fedprompt.federated.clustered import ClusteredServer
from fedprompt.federated.methods import local_dp_names, resolve_method
from fedprompt.results import create_run_dir, write_config
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


def run_server(grid: Grid, config: RunConfig, output_dir: Path | None = None,
               backend: ClusteringBackend | None = None) -> Path:
    """Run all rounds on ``grid``; returns the results folder. ``backend``: the clustering
    backend of a clustered method (default: the one ``[clustering]`` names)."""
    config = resolve_method(config)  # what runs is what config.toml records
    seed_everything(config.seed)
    num_clients = len(list(grid.get_node_ids()))
    if num_clients == 0:
        raise RuntimeError("no SuperNodes are connected: start at least one before the run")
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
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    show_fedprompt_logs()
    run_server(grid, from_run_config(context.run_config, _override_config(grid)))


def _override_config(grid: Grid) -> dict | None:
    """The run's own ``--run-config`` overrides, where the grid knows its run (SuperLink
    and simulation grids do); ``None`` otherwise."""
    try:
        run = grid.run
    except (NotImplementedError, AttributeError):
        return None
    overrides = getattr(run, "override_config", None)
    return dict(overrides) if overrides is not None else None
