"""A client's persistent state and privacy ledger on its own disk.

Flower keeps ``context.state`` in the SuperNode's memory: a site that is restarted would
forget its personal prompt, its optimizer and, worst, the privacy budget it has spent.
So every client keeps its whole :class:`~fedprompt.federated.client.ClientState`
(personal tensors, optimizer and schedule state, accountant history, random-stream states,
rounds trained, the last round trained) **and its own privacy ledger** in one file on a
node-local folder, written atomically (:mod:`fedprompt.atomic`) *before* its reply leaves
the client, and reloaded before every message. The disk is the source of truth.

Where the folder is (:func:`state_root`):

* node config ``state-dir`` (an absolute path chosen by the site: ``flower-supernode
  --node-config "... state-dir='/srv/site/fedprompt-state'"``); always set it on a real
  site;
* otherwise (simulation: ``flwr run`` with Ray, the in-process runner) under the run's
  results folder: ``<output_dir>/<run-folder>/client-state``, where ``output_dir`` is the
  run config's and ``run-folder`` the name of the results folder, which the server sends
  in every message's config. The server names only that one folder: a value that is not a
  single plain folder name (``/``, ``..``, an empty or hidden name) is refused, so the
  server cannot make a client write outside ``output_dir``.

Under the root, the state of run ``r`` (Flower's run id) and client ``c`` lives in
``run-<r>/client-<c>/``: ``state.pt`` (state + ledger, the truth) and
``privacy_ledger.json`` (the ledger, for people). Two runs never mix.

:func:`train_and_persist` is a client's round with this store: lock the folder, load,
train (which refuses a round already trained and a stale message), record the round in
the client's ledger (which refuses a falling epsilon), save, and only then return the
outcome to be sent.
"""

from __future__ import annotations

import fcntl
import io
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedprompt.atomic import atomic_write_bytes, atomic_write_text
from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.federated.client import ClientSession, ClientState, TrainOutcome
from fedprompt.federated.cluster_backends import ClusteringRequest
from fedprompt.federated.methods import local_dp_names
from fedprompt.privacy.ledger import PrivacyLedger, client_party, client_round_entry

#: node config key of the site's state folder
STATE_DIR_KEY = "state-dir"
#: message config key with the name of the run's results folder (simulation default)
RUN_FOLDER_KEY = "run-folder"
#: the sub-folder of the results folder holding the clients' state in simulation
SIMULATION_SUBDIR = "client-state"
EXPORT_DIR = "prompt"
STATE_FILE = "state.pt"
LEDGER_FILE = "privacy_ledger.json"
FORMAT = "fedprompt.client-state/1"

_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class ClientStateError(FedPromptError, ValueError):
    """A client's saved state is unreadable or belongs to another run or client."""


def valid_run_folder(name: str) -> str:
    """``name`` if it is a single plain folder name (letters, digits, ``.``, ``_``, ``-``,
    not starting with ``.``), else :class:`ConfigError`."""
    if not _FOLDER_NAME.fullmatch(name):
        raise ConfigError(
            f"the server named the run folder {name!r}, which is not a single plain folder "
            "name (letters, digits, '.', '_', '-'; no '/', no '..', not hidden): refusing "
            "to keep client state there. Set node config state-dir to choose the folder")
    return name


def state_root(node_config: Mapping[str, Any], output_dir: str | Path,
               run_folder: str) -> Path:
    """The folder under which this node keeps client state (see the module docstring)."""
    configured = node_config.get(STATE_DIR_KEY)
    if configured not in (None, ""):
        path = Path(str(configured)).expanduser()
        if not path.is_absolute():
            raise ConfigError(
                f"node config {STATE_DIR_KEY}={configured!r} is not an absolute path: give "
                f"the site's state folder as one, e.g. {STATE_DIR_KEY}='/srv/site/state'")
        return path
    if not run_folder:
        raise ConfigError(
            f"this client has no state folder: start its SuperNode with --node-config "
            f"\"... {STATE_DIR_KEY}='/absolute/path'\" (simulation: the server names the "
            f"results folder in each message's {RUN_FOLDER_KEY!r}, which this message lacks)")
    base = Path(output_dir).expanduser().resolve()
    root = base / valid_run_folder(run_folder) / SIMULATION_SUBDIR
    if not root.resolve().is_relative_to(base):
        raise ConfigError(f"{root} leads outside output_dir {base} (a symbolic link?): "
                          f"refusing to keep client state there; set node config "
                          f"{STATE_DIR_KEY}")
    return root


@dataclass
class StoredClient:
    """What a client has on disk: its state (``None`` before its first round) and its
    ledger."""

    state: ClientState | None
    ledger: PrivacyLedger


class ClientStore:
    """The state folder of client ``client_id`` in Flower run ``run_id`` under ``root``."""

    def __init__(self, root: Path, run_id: int, client_id: int, delta: float | None = None
                 ) -> None:
        self.run_id = int(run_id)
        self.client_id = int(client_id)
        self.delta = delta
        self.folder = Path(root) / f"run-{self.run_id}" / f"client-{self.client_id}"

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    @property
    def ledger_file(self) -> Path:
        return self.folder / LEDGER_FILE

    @property
    def export_folder(self) -> Path:
        """Where the client's personalized prompt is exported (portable format)."""
        return self.folder / EXPORT_DIR

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this client's folder exclusively (one message at a time touches it)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.folder / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self) -> StoredClient:
        """The saved state and ledger (an empty ledger and no state before the first
        save)."""
        if not self.state_file.exists():
            return StoredClient(None, PrivacyLedger(client_party(self.client_id), self.delta))
        try:
            data = torch.load(io.BytesIO(self.state_file.read_bytes()), weights_only=True)
        except Exception as exc:
            raise ClientStateError(f"{self.state_file} is unreadable ({exc}); it is the "
                                   "client's spent privacy budget: restore it from a backup "
                                   "rather than deleting it") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ClientStateError(f"{self.state_file} is not a {FORMAT} file")
        if (data["run_id"], data["client_id"]) != (self.run_id, self.client_id):
            raise ClientStateError(
                f"{self.state_file} belongs to run {data['run_id']} client "
                f"{data['client_id']}, not to run {self.run_id} client {self.client_id}")
        return StoredClient(_state_from(data["state"], self.state_file),
                            PrivacyLedger.from_json(data["ledger"]))

    def save(self, state: ClientState, ledger: PrivacyLedger) -> None:
        """Write state and ledger in one atomic replace of ``state.pt``, then the
        human-readable ``privacy_ledger.json``."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "run_id": self.run_id, "client_id": self.client_id,
                    "state": _state_payload(state), "ledger": ledger.to_json()}, buffer)
        atomic_write_bytes(self.state_file, buffer.getvalue())
        atomic_write_text(self.ledger_file, ledger.to_json() + "\n")


def _state_payload(state: ClientState) -> dict[str, Any]:
    """``state`` in types ``torch.load(weights_only=True)`` reads back: tensors as they are,
    bytes as uint8 tensors, strings and integers as JSON."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    blobs: dict[str, torch.Tensor] = {}
    values: dict[str, str | int] = {}
    for f in fields(ClientState):
        value = getattr(state, f.name)
        if isinstance(value, dict):
            tensors[f.name] = {k: v.detach().cpu().contiguous() for k, v in value.items()}
        elif isinstance(value, bytes):
            blobs[f.name] = torch.from_numpy(np.frombuffer(value, dtype=np.uint8).copy())
        elif isinstance(value, str | int):
            values[f.name] = value
        else:
            raise TypeError(f"ClientState.{f.name} is a {type(value).__name__}; the state "
                            "store keeps tensors dicts, bytes, str and int")
    return {"tensors": tensors, "blobs": blobs, "values": json.dumps(values)}


def _state_from(payload: dict[str, Any], where: Path) -> ClientState:
    known = {f.name for f in fields(ClientState)}
    values: dict[str, Any] = json.loads(payload["values"])
    values |= {k: dict(v) for k, v in payload["tensors"].items()}
    values |= {k: v.numpy().tobytes() for k, v in payload["blobs"].items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ClientStateError(f"{where} has state fields this fedprompt does not know: "
                               f"{unknown} (written by a newer version?)")
    return ClientState(**values)


def train_and_persist(session: ClientSession, store: ClientStore,
                      shared: dict[str, torch.Tensor], server_round: int, *,
                      clustering: ClusteringRequest | None = None,
                      deadline: float | None = None) -> TrainOutcome:
    """One round of ``session`` whose state lives in ``store``.

    Under the folder's lock: load the state and ledger, train (``ClientSession.train``
    refuses a round at or before the last one trained and a message past ``deadline``),
    record the round in the client's own ledger (:class:`~fedprompt.privacy.ledger.
    LedgerRegression` if its epsilon or steps would fall), and save both atomically. Only
    then is the outcome returned, to be sent. A refusal or any error leaves the disk as it
    was. A declined round (budget spent) changes nothing.
    """
    with store.lock():
        stored = store.load()
        outcome = session.train(shared, stored.state, server_round, clustering=clustering,
                                deadline=deadline)
        if outcome.declined_reason:
            return outcome
        tensors = local_dp_names(session.config, session.learner)
        entry = client_round_entry(session.partition_id, session.config.privacy, tensors,
                                   outcome.metrics, server_round) if session.local_dp else None
        if entry is not None:
            stored.ledger.record(entry)
        store.save(outcome.state, stored.ledger)
        return outcome


def evaluate_and_export(session: ClientSession, store: ClientStore,
                        shared: dict[str, torch.Tensor],
                        server_epsilon: float | None = None) -> dict[str, float | int]:
    """Evaluate ``session``'s personalized prompt (``shared`` as the server sent it + the
    saved personal part) and, once the client has trained, export it to
    ``<state folder>/prompt/`` (portable format, replaced as a whole) with the guarantee
    that covers it: the client's record-level epsilon from its own ledger, and the server's
    user-level epsilon for the shared part where the server reported one."""
    with store.lock():
        stored = store.load()
        metrics = session.evaluate(shared, stored.state)
        if stored.state is not None and stored.state.rounds_trained > 0:
            session.export(store.export_folder, shared, stored.state, stored.ledger,
                           server_epsilon)
        return metrics


def load_state(store: ClientStore) -> ClientState | None:
    """The saved state (``None`` before the first round), read under the folder's lock."""
    with store.lock():
        return store.load().state
