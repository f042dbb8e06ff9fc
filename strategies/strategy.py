"""A Flower strategy around :class:`fedprompt.federated.FederatedServer`.

It follows Flower's Strategy steps (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) so ``Strategy.start`` drives the rounds,
while sampling, validation, clipping, equal-weight averaging, global DP noise and the
server accountant live in :mod:`fedprompt.federated`. After every round it writes the
results folder, so a run that stops keeps what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprompt.federated import ClientReply, FederatedServer

# Opacus calls logging.basicConfig() when imported, which would print Flower's log twice.
logging.getLogger("flwr").propagate = False

log = logging.getLogger("fedprompt.strategy")


def _reply(msg: Message) -> ClientReply:
    node = msg.metadata.src_node_id
    if msg.has_error():
        return ClientReply(node_id=node, error=f"{msg.error.code}: {msg.error.reason}")
    content = msg.content
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    update = None
    if "arrays" in content:
        update = {k: v.numpy() for k, v in content["arrays"].items()}
    declined = ""
    if "config" in content:
        declined = str(content["config"].get("declined-reason", ""))
    return ClientReply(node_id=node, metrics=metrics, update=update, declined_reason=declined)


def _summary_metrics(summary: dict) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in summary.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})


class FedPromptStrategy(Strategy):
    """Private, personalized federated prompt learning (all methods of fedprompt)."""

    def __init__(self, server: FederatedServer, output_dir: Path) -> None:
        self.server = server
        self.output_dir = output_dir

    def summary(self) -> None:
        s = self.server
        log.info("fedprompt strategy: method=%s, clients=%d, fraction_train=%.3g, "
                 "global DP=%s (noise multiplier %.4g), local DP=%s (mode %s)",
                 s.config.federation.method, s.num_clients, s.sample_rate, s.global_dp,
                 s.noise_multiplier, s.config.privacy.local and s.config.privacy.mode != "off",
                 s.config.privacy.mode)

    def _messages(self, nodes: list[int], message_type: str, server_round: int,
                  config: ConfigRecord) -> list[Message]:
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        content = RecordDict({"arrays": ArrayRecord(self.server.shared),
                              "config": config})
        return [Message(content=content, message_type=message_type, dst_node_id=node)
                for node in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        nodes = self.server.sample(list(grid.get_node_ids()))
        log.info("round %d: %d of %d clients sampled for training", server_round, len(nodes),
                 self.server.num_clients)
        return self._messages(nodes, MessageType.TRAIN, server_round, config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[
        ArrayRecord | None, MetricRecord | None
    ]:
        self.server.aggregate(server_round, [_reply(m) for m in replies])
        self.server.history.write(self.output_dir)
        return ArrayRecord(self.server.shared), None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        every = self.server.config.federation.evaluate_every
        last = server_round == self.server.config.federation.rounds
        if server_round % every and not last:
            return []
        return self._messages(sorted(grid.get_node_ids()), MessageType.EVALUATE, server_round,
                              config)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        self.server.record_evaluation(server_round, [_reply(m) for m in replies])
        self.server.history.write(self.output_dir)
        summary = self.server.history.summary(server_round)
        log.info("round %d: local acc %.4f +- %.4f, neighbor acc %s, local eps max %s, "
                 "global eps %s", server_round, summary["local_accuracy_mean"] or 0.0,
                 summary["local_accuracy_std"] or 0.0, summary["neighbor_accuracy_mean"],
                 summary["local_epsilon_max"], summary["global_epsilon"])
        return _summary_metrics(summary)

