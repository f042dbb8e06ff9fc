"""Run the same ServerApp and ClientApp code in one process, without Ray.

:class:`InProcessGrid` implements Flower's ``Grid`` by calling the ClientApp object
synchronously for every message, with one persistent ``Context`` per node (so
``context.state`` carries each client's personal state across rounds exactly as Flower's
engines do). Messages are deep-copied in both directions, replies are ordered by node,
a ClientApp exception becomes an ``Error`` reply (as on a real SuperNode), and the global
random generators are saved and restored around every client call so client code cannot
disturb the server's randomness. For a given seed the numbers equal those of a Ray
simulation of the same apps (tested). Every grid is a run of its own (a random Flower run
id), so clients never mix state between runs; :meth:`InProcessGrid.restart` forgets a
node's in-memory state as a restarted SuperNode would (its state folder on disk stays).

Before round 1 the runner checks every client's data (data set, partition, every image
decoded once while its features are computed, which the clients then reuse), so bad data
is one clear error. Exit codes: 0 done; 2 a clear error (``fedprompt-sim: error: ...``:
bad configuration or data, an ``output_dir`` that is a file, ``--clients`` below 1, or a
round in which no client succeeded, unless ``federation.allow_empty_rounds``); 130
Ctrl-C (``interrupted after round N; results so far in DIR``: the results files are
written atomically after every step, so they hold every round completed).

    fedprompt-sim --config run.toml --set federation.rounds=3 --clients 4
"""

from __future__ import annotations

import argparse
import copy
import random
import secrets
import sys
import traceback
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from rich.progress import Progress

from fedprompt.config import RunConfig, flatten, load_config
from fedprompt.console import make_progress, show_fedprompt_logs
from fedprompt.errors import ConfigError, FedPromptError, RunInterrupted
from fedprompt.federated.preflight import check_federation_data
from fedprompt.secure.clustering import ClusteringBackend
from strategies.server_app import run_server

SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (node ids 1..N)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 node_configs: list[dict] | None = None,
                 progress: Progress | None = None) -> None:
        self.client_app = client_app
        self.progress = progress
        self.node_ids = list(range(1, num_nodes + 1))
        self.run_id = secrets.randbits(62) + 1  # a run of its own (keys client state)
        self._node_configs = {node: dict(node_configs[node - 1] if node_configs else
                                         {"partition-id": node - 1,
                                          "num-partitions": num_nodes})
                              for node in self.node_ids}
        self._run_config = dict(run_config or {})
        self.contexts = {node: self._context(node) for node in self.node_ids}
        self._replies: dict[str, Message] = {}

    def _context(self, node: int) -> Context:
        return Context(run_id=self.run_id, node_id=node,
                       node_config=dict(self._node_configs[node]), state=RecordDict(),
                       run_config=dict(self._run_config))

    def node_configs(self) -> list[dict]:
        """Every node's node config, by node id (what the data check reads)."""
        return [dict(self._node_configs[node]) for node in self.node_ids]

    def restart(self, node: int) -> None:
        """Forget node ``node``'s in-memory ``context.state``, as when its SuperNode is
        killed and started again with the same key (same node id, same run)."""
        self.contexts[node] = self._context(node)

    # Grid interface ------------------------------------------------------------
    def set_run(self, run: object) -> None:  # the in-process grid has one fixed run
        return None

    @property
    def run(self) -> object:
        raise NotImplementedError("the in-process grid has no Run object")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            self._replies[message_id] = self._deliver(copy.deepcopy(message))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        task = None
        if self.progress is not None and messages:
            kind = messages[0].metadata.message_type
            group = messages[0].content["config"].get("server-round", "") if (
                "config" in messages[0].content) else ""
            task = self.progress.add_task(f"round {group} {kind}", total=len(messages),
                                          info="")
        ids = []
        for message in messages:
            ids.extend(self.push_messages([message]))
            if task is not None:
                self.progress.advance(task)
        replies = list(self.pull_messages(ids))
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

    # ----------------------------------------------------------------------------
    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        context = self.contexts[node]
        rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (self.run_id, node,
                                                                           node)
        try:
            reply = self.client_app(message, context)
        except Exception as exc:  # a SuperNode turns ClientApp exceptions into Error replies
            detail = "".join(traceback.format_exception_only(exc)).strip()
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=detail),
                            reply_to=message)
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.random.set_rng_state(rng[2])
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return copy.deepcopy(reply)


def inprocess_grid(config: RunConfig, num_clients: int | None = None,
                   client_app: ClientApp | None = None,
                   progress: Progress | None = None) -> InProcessGrid:
    """A grid of ``num_clients`` (default ``data.num_clients``) nodes whose run_config is
    ``config``, running ``client_app`` (default: fedprompt's ClientApp)."""
    if client_app is None:
        from clients.app import app as client_app
    n = config.data.num_clients if num_clients is None else _client_count(num_clients)
    return InProcessGrid(client_app, n, run_config=flatten(config.to_dict()),
                         progress=progress)


def _client_count(num_clients: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"--clients {num_clients!r}: a federation needs at least one "
                          "client; give a whole number >= 1 (or leave it out for "
                          "data.num_clients)")
    return num_clients


def run_inprocess(config: RunConfig, num_clients: int | None = None,
                  client_app: ClientApp | None = None, output_dir: Path | None = None,
                  progress: bool = False) -> Path:
    """Run ``config`` in-process; returns the results folder. ``progress`` shows a rich
    progress bar per round and message type. ``num_clients`` (default
    ``data.num_clients``) is the federation's size: it replaces ``data.num_clients``, so
    ``config.toml`` records it and the server does not miss clients that never existed."""
    if num_clients is not None and _client_count(num_clients) != config.data.num_clients:
        config = config.with_overrides({"data.num_clients": num_clients}, source="--clients")
    with make_progress(progress) as bar:
        grid = inprocess_grid(config, num_clients, client_app, bar if progress else None)
        return run_on_grid(grid, config, output_dir)


def run_on_grid(grid: InProcessGrid, config: RunConfig, output_dir: Path | None = None,
                backend: ClusteringBackend | None = None) -> Path:
    """Run the ServerApp's rounds on ``grid``; ``backend``: a clustering backend for a
    clustered method (default: the one ``[clustering]`` names). Every node's data is
    checked before round 1, images included (:mod:`fedprompt.federated.preflight`: the
    clients, in this process, then reuse the features it computed)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        grid.run_id, SERVER_NODE_ID, SERVER_NODE_ID)

    def check(resolved: RunConfig) -> None:
        check_federation_data(resolved, grid.node_configs(), images=True)

    return run_server(grid, config, output_dir, backend, check_data=check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedprompt-sim",
        description="Run a federated fedprompt experiment in this process (no Ray).")
    parser.add_argument("--config", "-c", help="TOML file")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key, e.g. federation.rounds=5")
    parser.add_argument("--clients", type=int, help="number of clients (default: "
                        "data.num_clients)")
    args = parser.parse_args(argv)
    show_fedprompt_logs()
    try:
        config = load_config(args.config, args.overrides)
        out = run_inprocess(config, args.clients, progress=True)
    except FedPromptError as exc:
        print(f"fedprompt-sim: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # Ctrl-C during the rounds: its files are complete
        print(f"fedprompt-sim: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before the results folder existed
        print("fedprompt-sim: interrupted before round 1; nothing was written",
              file=sys.stderr)
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
