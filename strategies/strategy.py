"""A Flower strategy around :class:`fedprompt.federated.FederatedServer`.

It follows Flower's Strategy steps (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) so ``Strategy.start`` drives the rounds,
while sampling, validation, clipping, equal-weight averaging, global DP noise and the
server accountant live in :mod:`fedprompt.federated`. After every round it writes the
results folder, so a run that stops keeps what it did.

Every node gets its own message: the shared tensors the server has for it (for secfpp,
its cluster's domain prompt) and, in a clustering round, the clustering backend's public
material; a train reply's sealed clustering submission is relayed to the server as bytes.
The strategy owns the server's lifetime: :meth:`FedPromptStrategy.start` closes it (and
with it the clustering backend and its compute parties) when the rounds end or fail.

Every message lives for ``federation.timeout`` seconds (its Flower TTL), the time the
strategy waits for the round's replies: the SuperLink drops it after that, and a client
refuses it (a restarted site must not train a round the server has closed). Its config
also carries ``run-folder``, the results folder's name, under which clients without a
``state-dir`` keep their state in simulation (:mod:`fedprompt.federated.client_store`).
The server is told which nodes each round's messages went to, and takes replies only
from them, keyed by the node (``src_node_id``) they came from; every addressed node gets
one record per round (a missing reply included), and each round warns when fewer clients
are connected than ``data.num_clients``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedprompt.config import RUN_CONFIG_KEY, RunConfig
from fedprompt.errors import RunError
from fedprompt.federated import ClientReply, FederatedServer
from fedprompt.federated.client_store import RUN_FOLDER_KEY
from fedprompt.federated.clustered import SHARE_KEY

# Opacus calls logging.basicConfig() when imported, which would print Flower's log twice.
logging.getLogger("flwr").propagate = False

log = logging.getLogger("fedprompt.strategy")

#: errors the SuperLink answers itself for an addressed node: no reply came from it
_UNREACHABLE = {
    ErrorCode.NODE_UNAVAILABLE: "node unavailable",
    ErrorCode.MESSAGE_UNAVAILABLE: "timeout: the message expired before the node took it",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "timeout: the node's reply expired",
}


def _reply(msg: Message, sent_to: dict[str, int]) -> ClientReply:
    """The server's view of one reply. ``sent_to``: message id -> the node it was sent to.

    The reply is the node's it came from (``src_node_id``, authenticated by the
    SuperLink), except an error the SuperLink answers itself for a node it could not
    reach ("node unavailable", ``src_node_id`` = the SuperLink): that one is the
    addressed node's, recorded as *no reply* (as is the SuperLink's "message/reply
    unavailable": the message expired), not as a failure of the client. A reply from one
    node to a message sent to another is untrusted.
    """
    node = msg.metadata.src_node_id
    addressed = sent_to.get(msg.metadata.reply_to_message_id)
    from_superlink = msg.has_error() and node == SUPERLINK_NODE_ID and addressed is not None
    if from_superlink:
        node = addressed
    if addressed is not None and node != addressed:
        return ClientReply(node_id=node, untrusted=f"a reply from node {node} to the "
                           f"message sent to node {addressed}")
    if msg.has_error():
        code, reason = msg.error.code, msg.error.reason
        if from_superlink and code in _UNREACHABLE:
            return ClientReply(node_id=node, no_reply=f"{_UNREACHABLE[code]} (the SuperLink "
                               f"answered {code}: {reason})")
        return ClientReply(node_id=node, error=f"{code}: {reason}")
    content = msg.content
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    update = None
    if "arrays" in content:
        update = {k: v.numpy() for k, v in content["arrays"].items()}
    declined, submission = "", b""
    if "config" in content:
        declined = str(content["config"].get("declined-reason", ""))
        share = content["config"].get(SHARE_KEY, b"")
        submission = share if isinstance(share, bytes) else b""
    return ClientReply(node_id=node, metrics=metrics, update=update, declined_reason=declined,
                       submission=submission)


def run_folder_name(config: RunConfig, output_dir: Path) -> str:
    """The results folder's name when it lies directly in ``output_dir`` (where clients
    without a ``state-dir`` look for it), else '' (they then need a ``state-dir``)."""
    base = Path(config.output_dir).expanduser().resolve()
    return output_dir.name if output_dir.resolve().parent == base else ""


def _rounded(value: float | None, spread: float | None = None) -> str:
    """A figure for the log: 4 significant digits, "-" when nobody reported it (not 0)."""
    if value is None:
        return "-"
    return f"{value:.4g}" + ("" if spread is None else f" +- {spread:.2g}")


def _summary_metrics(summary: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in summary.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})


class FedPromptStrategy(Strategy):
    """Private, personalized federated prompt learning (all methods of fedprompt)."""

    def __init__(self, server: FederatedServer, output_dir: Path) -> None:
        self.server = server
        self.output_dir = output_dir
        self.run_folder = run_folder_name(server.config, output_dir)
        self._sent: dict[tuple[int, str], list[Message]] = {}  # this round's messages
        self.completed_round = 0  # the last round whose train and evaluate steps ended
        # clients train with the configuration the server resolved (one resolution)
        self._run_config = server.config.to_toml()
        if not self.run_folder:
            log.warning("results folder %s is not directly in output_dir %s: clients "
                        "without a state-dir in their node config will refuse to train",
                        output_dir, server.config.output_dir)

    def summary(self) -> None:
        s = self.server
        log.info("fedprompt strategy: method=%s, clients=%d, fraction_train=%.3g, "
                 "global DP=%s (noise multiplier %.4g), local DP=%s (mode %s)",
                 s.config.federation.method, s.num_clients, s.sample_rate, s.global_dp,
                 s.noise_multiplier, s.config.privacy.local and s.config.privacy.mode != "off",
                 s.config.privacy.mode)

    def start(self, *args: Any, **kwargs: Any) -> Result:
        """Flower's round loop; the server (and its clustering backend, whose compute
        parties it may have started) is closed when it ends, however it ends."""
        try:
            return super().start(*args, **kwargs)
        finally:
            self.server.close()

    def _messages(self, nodes: list[int], message_type: str, server_round: int,
                  config: ConfigRecord) -> list[Message]:
        """One message per node: the shared tensors of that node (its cluster's, for a
        clustered method) and the round config (plus per-node clustering fields), alive
        for ``federation.timeout`` seconds. The server notes who was addressed."""
        self.server.address(server_round, message_type, nodes)
        ttl = self.server.config.federation.timeout
        messages = []
        for node in nodes:
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config[RUN_FOLDER_KEY] = self.run_folder
            node_config[RUN_CONFIG_KEY] = self._run_config
            extra = (self.server.train_config(node, server_round)
                     if message_type == MessageType.TRAIN else self.server.evaluate_config(node))
            for key, value in extra.items():
                node_config[key] = value
            content = RecordDict({"arrays": ArrayRecord(self.server.shared_for(node)),
                                  "config": node_config})
            messages.append(Message(content=content, message_type=message_type,
                                    dst_node_id=node, ttl=ttl))
        # the grid gives each message its id when it pushes it; the replies name it
        self._sent[(server_round, message_type)] = messages
        return messages

    def _replies(self, server_round: int, message_type: str,
                 replies: Iterable[Message]) -> list[ClientReply]:
        sent = self._sent.pop((server_round, message_type), [])
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        return [_reply(m, sent_to) for m in replies]

    def _connected(self, grid: Grid) -> list[int]:
        """The connected nodes, once ``federation.min_available_clients`` are connected or
        ``federation.timeout`` has passed (then whoever is connected, with a warning)."""
        fed = self.server.config.federation
        deadline, next_log = time.monotonic() + fed.timeout, 0.0
        while len(nodes := list(grid.get_node_ids())) < fed.min_available_clients:
            now = time.monotonic()
            if now >= deadline:
                log.warning("only %d of the %d clients required by "
                            "federation.min_available_clients connected within %.0f s; "
                            "going on with them", len(nodes), fed.min_available_clients,
                            fed.timeout)
                break
            if now >= next_log:
                log.info("waiting for clients to connect: %d of %d", len(nodes),
                         fed.min_available_clients)
                next_log = now + 10.0
            time.sleep(0.5)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self._connected(grid)
        self.server.check_connected(server_round, node_ids)  # warns about missing clients
        self.server.begin_round(server_round, node_ids)
        nodes = self.server.sample(node_ids)
        log.info("round %d: %d of %d connected clients sampled for training", server_round,
                 len(nodes), len(node_ids))
        return self._messages(nodes, MessageType.TRAIN, server_round, config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        self.server.aggregate(server_round,
                              self._replies(server_round, MessageType.TRAIN, replies))
        self.server.history.write(self.output_dir)
        self._require_progress(server_round, "train")
        return ArrayRecord(self.server.result_arrays()), None

    def _require_progress(self, server_round: int, kind: str) -> None:
        """Stop the run (results written) after a step in which clients were addressed
        but none succeeded, unless ``federation.allow_empty_rounds``: then warn."""
        problem = self.server.empty_round(server_round, kind)
        if not problem:
            return
        if self.server.config.federation.allow_empty_rounds:
            log.warning("%s; going on (federation.allow_empty_rounds)", problem)
            return
        raise RunError(f"{problem}. Results so far are in {self.output_dir}. Fix the cause "
                       "and run again, or set federation.allow_empty_rounds=true to go on "
                       "through such rounds")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        every = self.server.config.federation.evaluate_every
        last = server_round == self.server.config.federation.rounds
        # a round without evaluation addresses no node (so no reply can claim to be one)
        nodes = [] if server_round % every and not last else sorted(grid.get_node_ids())
        return self._messages(nodes, MessageType.EVALUATE, server_round, config)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        self.server.record_evaluation(
            server_round, self._replies(server_round, MessageType.EVALUATE, replies))
        self.server.history.write(self.output_dir)
        self._require_progress(server_round, "evaluate")
        self.completed_round = server_round
        summary = self.server.history.summary(server_round)
        log.info("round %d: local acc %s, neighbor acc %s, record-level eps (max over "
                 "clients) %s, user-level eps %s", server_round,
                 _rounded(summary["local_accuracy_mean"], summary["local_accuracy_std"]),
                 _rounded(summary["neighbor_accuracy_mean"], summary["neighbor_accuracy_std"]),
                 _rounded(summary["local_epsilon_max"]), _rounded(summary["global_epsilon"]))
        return _summary_metrics(summary)

