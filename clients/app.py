"""fedprompt's Flower ClientApp (Message API).

* ``train``: load the shared tensors from the message and this client's persistent state
  from ``context.state`` (personal prompt parts, optimizer and LR-schedule state, privacy
  accountant, generator states), train locally (DP-SGD where configured), save the state
  back, and reply with the update of the shared tensors plus metrics. A client whose
  privacy budget is spent replies without an update, with ``declined = 1`` and the reason
  in its ``ConfigRecord``. In a clustering round of a clustered method (secfpp) the train
  config carries the clustering backend's public material; the client then also replies
  with its sealed, reduced domain prompt (``cluster-share``, bytes the server relays but
  cannot read).
* ``evaluate``: local and neighbor accuracy of the personalized prompt (received shared
  tensors + personal parts).

The client's partition comes from ``context.node_config`` (``partition-id``,
``num-partitions``: set by the simulation engine, or by ``flower-supernode
--node-config`` in a deployment). A site whose data lives in its own folder adds
``dataset="/path/to/imagefolder"`` to its node config: it then trains on all of that
folder, and ``partition-id`` only names the site.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedprompt.config import from_run_config
from fedprompt.federated import ClientSession, ClientState
from fedprompt.federated.cluster_backends import ClusteringRequest
from fedprompt.federated.clustered import (
    CLIENT_ID_KEY,
    ROUND_KEY,
    SHARE_KEY,
    material_from_config,
)
from fedprompt.federated.generative import open_client_session

# Opacus calls logging.basicConfig() when imported, which would print Flower's log twice.
logging.getLogger("flwr").propagate = False

app = ClientApp()

_SESSIONS: dict[tuple[str, int, int, int], ClientSession] = {}
PERSONAL_KEY = "fedprompt.personal"
STATE_KEY = "fedprompt.state"


def _session(context: Context) -> ClientSession:
    config = from_run_config(context.run_config)
    node = context.node_config
    try:
        partition_id = int(node["partition-id"])
        num_partitions = int(node["num-partitions"])
    except KeyError as exc:
        raise ValueError(
            f"node_config has no {exc.args[0]!r}: start the SuperNode with --node-config "
            "\"partition-id=<i> num-partitions=<n>\" (the simulation engine sets both)"
        ) from None
    client_id = partition_id
    if node.get("dataset"):  # a site with its own data folder trains on all of it
        config = config.model_copy(update={
            "data": config.data.model_copy(update={"dataset": str(node["dataset"]),
                                                   "domains": []})})
        partition_id, num_partitions = 0, 1
    key = (config.model_dump_json(), partition_id, num_partitions, client_id)
    if key not in _SESSIONS:
        _SESSIONS[key] = open_client_session(config, partition_id, num_partitions, client_id)
    return _SESSIONS[key]


def _load_state(context: Context) -> ClientState | None:
    if STATE_KEY not in context.state:
        return None
    blobs = context.state[STATE_KEY]
    personal = context.state[PERSONAL_KEY].to_torch_state_dict()
    return ClientState(
        personal=dict(personal), optimizer=blobs["optimizer"], accountant=blobs["accountant"],
        generator=blobs["generator"], learner_rng=blobs["learner_rng"],
        batch_rng=blobs["batch_rng"],
        rounds_trained=int(blobs["rounds_trained"]),
        first_update=blobs.get("first_update", b""),
    )


def _save_state(context: Context, state: ClientState) -> None:
    context.state[PERSONAL_KEY] = ArrayRecord(state.personal)
    context.state[STATE_KEY] = ConfigRecord({
        "optimizer": state.optimizer, "accountant": state.accountant,
        "generator": state.generator, "learner_rng": state.learner_rng,
        "batch_rng": state.batch_rng,
        "rounds_trained": state.rounds_trained,
        "first_update": state.first_update,
    })


def _shared(msg: Message) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in msg.content["arrays"].to_torch_state_dict().items()}


def _clustering_request(config: ConfigRecord) -> ClusteringRequest | None:
    """The server's clustering request in a train config (clustered methods), if any."""
    if ROUND_KEY not in config:
        return None
    return ClusteringRequest(round_id=int(config[ROUND_KEY]),
                             client_id=int(config[CLIENT_ID_KEY]),
                             material=material_from_config(config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    session = _session(context)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    outcome = session.train(_shared(msg), _load_state(context), server_round,
                            clustering=_clustering_request(config))
    if not outcome.declined_reason:
        _save_state(context, outcome.state)
    reply_config = ConfigRecord({"declined-reason": outcome.declined_reason})
    if outcome.submission:
        reply_config[SHARE_KEY] = outcome.submission
    content = RecordDict({
        "arrays": ArrayRecord(outcome.update),
        "metrics": MetricRecord(outcome.metrics),
        "config": reply_config,
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    session = _session(context)
    metrics = session.evaluate(_shared(msg), _load_state(context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
