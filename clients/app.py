"""fedprompt's Flower ClientApp (Message API).

* ``train``: load the shared tensors from the message and this client's persistent state
  and privacy ledger from its **state folder on the node's disk**
  (:mod:`fedprompt.federated.client_store`: personal prompt parts, optimizer and
  LR-schedule state, privacy accountant, random-stream states, the last round trained),
  train locally (DP-SGD where configured), record the round in the client's own ledger,
  save state and ledger atomically, and only then reply with the update of the shared
  tensors plus metrics. The disk is the source of truth, so a SuperNode that is killed
  and restarted (same key, same state folder) continues its budget. A message for a round
  the client already trained, or one past its Flower TTL (the server stopped waiting for
  that round), is refused with an exception (Flower sends an ``Error`` reply); nothing is
  trained, saved or sent. A client whose privacy budget is spent replies without an
  update, with ``declined = 1`` and the reason in its ``ConfigRecord``. In a clustering
  round of a clustered method (secfpp) the train config carries the clustering backend's
  public material; the client then also replies with its sealed, reduced domain prompt
  (``cluster-share``, bytes the server relays but cannot read).
* ``evaluate``: local and neighbor accuracy of the personalized prompt (received shared
  tensors + personal parts from the state folder).

The state folder is node config ``state-dir`` (an absolute path; set it on every real
site), else, in simulation, ``<output_dir>/<run-folder>/client-state`` with the results
folder's name that the server sends as ``run-folder`` (a single folder name, checked).
``context.state`` only mirrors the personal parts (``fedprompt.personal``) for
inspection; it is never read back.

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

from fedprompt.config import RUN_CONFIG_KEY, RunConfig, from_run_config, from_toml_text
from fedprompt.federated import ClientSession
from fedprompt.federated.client_store import (
    RUN_FOLDER_KEY,
    ClientStore,
    evaluate_and_export,
    state_root,
    train_and_persist,
)
from fedprompt.federated.cluster_backends import ClusteringRequest
from fedprompt.federated.clustered import (
    CLIENT_ID_KEY,
    ROUND_KEY,
    SHARE_KEY,
    material_from_config,
)
from fedprompt.federated.generative import open_client_session
from fedprompt.federated.preflight import node_data
from fedprompt.federated.server import SERVER_EPSILON_KEY

# Opacus calls logging.basicConfig() when imported, which would print Flower's log twice.
logging.getLogger("flwr").propagate = False

app = ClientApp()

_SESSIONS: dict[tuple[str, int, int, int], ClientSession] = {}
#: context.state key of the mirrored personal parts (never read back: the disk is the truth)
PERSONAL_KEY = "fedprompt.personal"


def _run_config(context: Context, msg: Message) -> RunConfig:
    """The configuration the server resolved and sent with the message (one resolution for
    the whole federation); a message without one falls back to this node's
    ``run_config``."""
    text = _config(msg).get(RUN_CONFIG_KEY)
    if text:
        return from_toml_text(str(text))
    return from_run_config(context.run_config)


def _session(context: Context, msg: Message) -> ClientSession:
    node = node_data(_run_config(context, msg), context.node_config)
    key = (node.config.model_dump_json(), node.partition_id, node.num_partitions,
           node.client_id)
    if key not in _SESSIONS:
        _SESSIONS[key] = open_client_session(node.config, node.partition_id,
                                             node.num_partitions, node.client_id)
    return _SESSIONS[key]


def _config(msg: Message) -> ConfigRecord:
    return msg.content["config"] if "config" in msg.content else ConfigRecord()


def _store(context: Context, session: ClientSession, msg: Message) -> ClientStore:
    """This client's state folder for the message's run (see the module docstring)."""
    config = _config(msg)
    root = state_root(context.node_config, session.config.output_dir,
                      str(config.get(RUN_FOLDER_KEY, "")))
    return ClientStore(root, context.run_id, session.partition_id,
                       delta=session.config.privacy.delta)


def _deadline(msg: Message) -> float:
    """When ``msg`` expires (UNIX time): Flower's ``created_at + ttl``; the server sets the
    TTL to ``federation.timeout``, the time it waits for the round's replies."""
    return float(msg.metadata.created_at) + float(msg.metadata.ttl)


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
    session = _session(context, msg)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    outcome = train_and_persist(session, _store(context, session, msg), _shared(msg),
                                server_round, clustering=_clustering_request(config),
                                deadline=_deadline(msg))
    if not outcome.declined_reason:
        context.state[PERSONAL_KEY] = ArrayRecord(outcome.state.personal)
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
    """Evaluate the personalized prompt and export it (the server's shared part + the
    personal part) to this client's state folder, with the guarantee that covers it."""
    session = _session(context, msg)
    server_epsilon = float(_config(msg).get(SERVER_EPSILON_KEY, -1.0))
    metrics = evaluate_and_export(session, _store(context, session, msg), _shared(msg),
                                  server_epsilon if server_epsilon >= 0 else None)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
