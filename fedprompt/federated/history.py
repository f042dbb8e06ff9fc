"""Per-round, per-client record of a federated run, and its results folder.

Files written (all updated after every round, so an interrupted run keeps what it did):

* ``metrics.json``: schema ``fedprompt.federated/1``; ``rounds`` holds, per round, one
  ``train`` and one ``evaluate`` record of every client addressed that round, each with
  its ``status`` (``trained``/``evaluated``, ``declined``, ``rejected``, ``failed`` or
  ``no reply``) and, unless it succeeded, the ``reason`` (the decline, the rejection, the
  client's error text, the timeout or unavailability), beside its metrics (loss,
  accuracy, steps, epsilon, declined; local and neighbor accuracy/loss); ``ignored``:
  replies that are no client's record (from a node not addressed, a second reply, a
  reply to another node's message); the server's aggregation info (accepted, rejected
  with reasons, clipped, noise std, global epsilon) and a ``summary`` (mean and standard
  deviation across clients; counts of trained, declined, rejected, failed and missing);
* ``rounds.csv`` (one row per round) and ``clients.csv`` (one row per round and client);
* ``privacy_ledger.json``: each client's and the server's accountant epsilon per round,
  with the nominal epsilon beside it when the nominal recipe is used (clustered methods:
  the clustering's accounted releases are entries of the server ledger, beside the
  domain-prompt releases they compose with);
* clustered methods (secfpp) add, per round, ``server.clusters`` (members, accepted,
  clipping, noise std and epsilon of every cluster), ``server.cluster_of`` (the cluster
  each client trained in), ``server.clustering`` (k, assignments, excluded clients,
  seconds, backend stats, ``fallback`` with the error), ``server.assignments_next`` and
  ``server.cluster_ari`` (adjusted Rand index against the known domains of
  ``data.domains``); the same figures go to extra columns of ``rounds.csv`` and
  ``clients.csv`` (``cluster``, ``cluster_next``);
* ``accuracy.png``: local and neighbor accuracy per round (mean and spread).

Clients are keyed by the client id the server bound their authenticated node to
(:meth:`~fedprompt.federated.server.FederatedServer.client_of`), never by what a reply
says about itself; a node not bound yet appears as ``node-<id>`` until it binds (then its
earlier records move to its client id). An addressed node's *untrusted* reply (a claim
that disagrees with the binding, a falling epsilon) is its record, with status
``rejected``, ``untrusted`` (the reason) and its claims prefixed ``claimed-``; it enters
no ledger and no summary. The server's copy of a client's ledger
is built from the same entries the client records in its own
(:func:`~fedprompt.privacy.ledger.client_round_entry`) and, like it, never decreases.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import fedprompt
from fedprompt.atomic import atomic_write_bytes, atomic_write_text
from fedprompt.config import RunConfig
from fedprompt.data.domains import client_domains
from fedprompt.privacy.coverage import coverage_report, covered_server_info, privacy_guarantee
from fedprompt.privacy.ledger import (
    LedgerEntry,
    LedgerRegression,
    PrivacyLedger,
    client_party,
    client_round_entry,
)
from fedprompt.results import write_json

if TYPE_CHECKING:
    from fedprompt.federated.server import ClientReply

ROUND_COLUMNS = [
    "round", "clients_trained", "declined", "rejected", "failed", "no_reply",
    "train_loss_mean",
    "local_accuracy_mean", "local_accuracy_std", "neighbor_accuracy_mean",
    "neighbor_accuracy_std", "local_epsilon_max", "global_epsilon",
]
#: extra rounds.csv columns of clustered methods (secfpp)
CLUSTER_COLUMNS = ["clusters", "clustering_k", "clustering_seconds", "clustering_fallback",
                   "cluster_ari"]
#: extra rounds.csv columns of runs with a validation split (data.validation_fraction)
VALIDATION_COLUMNS = ["val_accuracy_mean", "val_accuracy_std"]


def node_label(node_id: int) -> str:
    """How results name a node that is not (or not trusted as) a bound client."""
    return f"node-{node_id}"


def _client_order(key: int | str) -> tuple[int, int | str]:
    """Sort key of client ids (first, by number) and node labels (after them)."""
    return (0, key) if isinstance(key, int) else (1, str(key))


def _stats(values: list[float]) -> tuple[float | None, float | None]:
    clean = [v for v in values if v is not None and math.isfinite(v)]
    if not clean:
        return None, None
    return float(np.mean(clean)), float(np.std(clean))


class FederatedHistory:
    def __init__(self, config: RunConfig, num_clients: int, server_noise: float,
                 shared_names: Sequence[str] = (), local_dp_names: Sequence[str] = ()) -> None:
        self.config = config
        self.shared_names = sorted(shared_names)
        self.local_dp_names = list(local_dp_names)
        self.num_clients = num_clients
        self.server_noise = server_noise
        self.started = time.time()
        self.rounds: dict[int, dict[str, Any]] = {}
        self.client_ledgers: dict[int, PrivacyLedger] = {}
        self.server_ledger = PrivacyLedger("server", config.privacy.delta)
        #: known domain of every client (multi-domain data), for the adjusted Rand index
        self.domains = client_domains(config.data, num_clients) if config.data.domains else None

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.rounds.setdefault(server_round, {"round": server_round, "train": {},
                                                     "evaluate": {}, "ignored": [],
                                                     "server": {}})

    @staticmethod
    def _key(reply: ClientReply) -> int | str:
        """The client id of the reply's node, or ``node-<id>`` (a node not bound yet)."""
        return node_label(reply.node_id) if reply.client is None else reply.client

    @staticmethod
    def _metrics(reply: ClientReply, kind: str) -> dict[str, Any]:
        status, reason = reply.status(kind)
        head: dict[str, Any] = {"status": status} | ({"reason": reason} if reason else {})
        if reply.untrusted:  # its claims are kept for the record, under other names
            return head | {"untrusted": reply.untrusted,
                           **{f"claimed-{k}": v for k, v in reply.metrics.items()}}
        metrics = head | dict(reply.metrics)
        if reply.error:
            metrics["error"] = reply.error
        return metrics

    def _record(self, server_round: int, kind: str,
                replies: Sequence[ClientReply]) -> list[ClientReply]:
        """File each addressed node's reply under its client; the others under
        ``ignored``. Returns the filed (answering) replies."""
        record = self._round(server_round)
        filed = []
        for reply in replies:
            if not reply.answers:
                record["ignored"].append({"kind": kind, "node": reply.node_id,
                                          "reason": reply.untrusted or "not addressed",
                                          **{f"claimed-{k}": v
                                             for k, v in reply.metrics.items()}})
                continue
            key = self._key(reply)
            if key in record[kind]:
                raise RuntimeError(f"round {server_round}: two {kind} records for client "
                                   f"{key}: the server must take one reply per node")
            record[kind][key] = self._metrics(reply, kind)
            filed.append(reply)
        return filed

    def rename(self, old: str, new: int) -> None:
        """Move the records filed under ``old`` (``node-<id>``) to client ``new``, when
        that node binds to a client after rounds in which it had not said who it is."""
        for record in self.rounds.values():
            for kind in ("train", "evaluate"):
                if old in record[kind]:
                    if new in record[kind]:
                        raise RuntimeError(f"round {record['round']}: client {new} has a "
                                           f"{kind} record already; cannot file {old}'s")
                    record[kind][new] = record[kind].pop(old)
            for entry in record["server"].get("rejected", []):
                if entry.get("client") == old:
                    entry["client"] = new

    def client_ledger(self, client: int) -> PrivacyLedger:
        """The server's copy of client ``client``'s ledger (created empty)."""
        return self.client_ledgers.setdefault(
            client, PrivacyLedger(client_party(client), self.config.privacy.delta))

    def client_entry(self, client: int, metrics: dict[str, Any],
                     server_round: int) -> LedgerEntry | None:
        """The ledger entry a train reply of ``client`` reports (``None``: none)."""
        return client_round_entry(client, self.config.privacy, self.local_dp_names, metrics,
                                  server_round)

    def check_client_entry(self, client: int, metrics: dict[str, Any],
                           server_round: int) -> None:
        """:class:`~fedprompt.privacy.ledger.LedgerError` unless the entry a train reply
        reports may be recorded in ``client``'s ledger (records nothing). A trained round
        adds at least one step, so a client's cumulative step count must grow strictly
        (a client that forgot its budget reports its old count again)."""
        entry = self.client_entry(client, metrics, server_round)
        if entry is None:
            return
        ledger = self.client_ledgers.get(client) or PrivacyLedger(client_party(client))
        ledger.check(entry)
        if ledger.entries and entry.steps <= ledger.steps:
            raise LedgerRegression(
                f"{ledger.party}: round {server_round} reports {entry.steps} steps in all, no "
                f"more than the {ledger.steps} already accounted by round "
                f"{ledger.entries[-1].round}; a trained round adds steps")

    def record_train(self, server_round: int, replies: Sequence[ClientReply],
                     info: dict[str, Any]) -> None:
        record = self._round(server_round)
        privacy = self.config.privacy
        for reply in self._record(server_round, "train", replies):
            if reply.declined_reason and not reply.untrusted:
                record["train"][self._key(reply)]["declined_reason"] = reply.declined_reason
            if reply.untrusted or reply.error or reply.no_reply or reply.client is None:
                continue
            entry = self.client_entry(reply.client, reply.metrics, server_round)
            if entry is not None:
                self.client_ledger(reply.client).record(entry)
        if info.get("global_epsilon") is not None:
            self.server_ledger.record(self._aggregate_entry(
                "server", "Gaussian noise on the clipped mean of shared updates",
                float(info.get("aggregate_epsilon", info["global_epsilon"])), server_round,
                info.get("aggregate_steps")))
        for entry in info.get("ledger_entries", ()):  # further accounted releases (secfpp)
            self.server_ledger.record(LedgerEntry(**entry))
        if "assignments_next" in info:
            info["cluster_ari"] = self.adjusted_rand_index(info["assignments_next"])
        # per-client figures no epsilon covers stay out of the results under DP
        record["server"] = covered_server_info(info, privacy)

    def _aggregate_entry(self, party: str, mechanism: str, epsilon: float,
                         server_round: int, steps: int | None = None) -> LedgerEntry:
        """A server-side release of the shared tensors (global, or one cluster's);
        ``steps``: the accountant's total (default: one per round)."""
        privacy = self.config.privacy
        return LedgerEntry(
            party=party, mechanism=mechanism, tensors=self.shared_names,
            noise_multiplier=self.server_noise, clipping_norm=privacy.server_clip_norm,
            sample_rate=self.config.federation.fraction_train,
            steps=server_round if steps is None else int(steps),
            accountant=privacy.accountant, epsilon=epsilon, delta=privacy.delta,
            round=server_round,
            nominal_epsilon=privacy.epsilon if privacy.mode == "nominal" else None,
        )

    def adjusted_rand_index(self, assignment: dict[Any, int]) -> float | None:
        """ARI of a client -> cluster assignment against the clients' known domains (None
        without data.domains)."""
        if self.domains is None:
            return None
        clients = sorted(c for c in assignment if isinstance(c, int)
                         and 0 <= c < len(self.domains))
        if len(clients) < 2:
            return None
        from sklearn.metrics import adjusted_rand_score

        return float(adjusted_rand_score([self.domains[c] for c in clients],
                                         [assignment[c] for c in clients]))

    def record_evaluate(self, server_round: int, replies: Sequence[ClientReply]) -> None:
        self._record(server_round, "evaluate", replies)

    # ------------------------------------------------------------------ summary
    def summary(self, server_round: int) -> dict[str, Any]:
        record = self.rounds[server_round]
        statuses = [m.get("status") for m in record["train"].values()]
        train = [m for m in record["train"].values() if m.get("status") == "trained"]
        evaluate = [m for m in record["evaluate"].values() if m.get("status") == "evaluated"]
        local_mean, local_std = _stats([m.get("local-accuracy") for m in evaluate])
        neighbor_mean, neighbor_std = _stats([m.get("neighbor-accuracy") for m in evaluate])
        validation = {}
        if any("val-accuracy" in m for m in evaluate):
            val_mean, val_std = _stats([m.get("val-accuracy") for m in evaluate])
            validation = {"val_accuracy_mean": val_mean, "val_accuracy_std": val_std}
        loss_mean, _ = _stats([m.get("train-loss") for m in train])
        # what every trusted reply says its client has spent (declined, or its update
        # rejected, included: their ledgers record it)
        spent = [m for m in record["train"].values() if "untrusted" not in m
                 and m.get("status") in ("trained", "declined", "rejected")]
        eps = [m.get("epsilon", -1.0) for m in spent if m.get("epsilon", -1.0) >= 0]
        server = record["server"]
        clustered = {}
        if "clusters" in server:
            clustering = server.get("clustering") or {}
            clustered = {
                "clusters": len(set(server["assignments_next"].values())),
                "clustering_k": clustering.get("k"),
                "clustering_seconds": clustering.get("seconds"),
                "clustering_fallback": clustering.get("fallback") if clustering else None,
                "cluster_ari": server.get("cluster_ari"),
            }
        return {
            "round": server_round,
            "clients_trained": statuses.count("trained"),
            "declined": statuses.count("declined"),
            "rejected": len(record["server"].get("rejected", [])),
            "failed": statuses.count("failed"),
            "no_reply": statuses.count("no reply"),
            "train_loss_mean": loss_mean,
            "local_accuracy_mean": local_mean, "local_accuracy_std": local_std,
            "neighbor_accuracy_mean": neighbor_mean, "neighbor_accuracy_std": neighbor_std,
            "local_epsilon_max": max(eps) if eps else None,
            "global_epsilon": record["server"].get("global_epsilon"),
            **validation,
            **clustered,
        }

    def to_dict(self) -> dict[str, Any]:
        privacy = self.config.privacy
        rounds = []
        for r in sorted(self.rounds):
            record = dict(self.rounds[r])
            record["summary"] = self.summary(r)
            rounds.append(record)
        final = rounds[-1]["summary"] if rounds else {}
        return {
            "schema": "fedprompt.federated/1",
            "run": {"name": self.config.name, "method": self.config.federation.method,
                    "seed": self.config.seed, "clients": self.num_clients,
                    "rounds": self.config.federation.rounds,
                    "seconds": time.time() - self.started, "fedprompt": fedprompt.__version__},
            "privacy": {"mode": privacy.mode, "local": privacy.local and privacy.mode != "off",
                        "server": privacy.server and privacy.mode != "off",
                        "label": "nominal" if privacy.mode == "nominal" else "accountant",
                        "nominal_epsilon": privacy.epsilon if privacy.mode == "nominal"
                        else None,
                        "target_epsilon": privacy.epsilon
                        if privacy.mode == "target-epsilon" else None,
                        "delta": privacy.delta, "server_noise_multiplier": self.server_noise,
                        "guarantee": privacy_guarantee(privacy),
                        "coverage": coverage_report(privacy)},
            "rounds": rounds,
            "final": final,
        }

    # ------------------------------------------------------------------- output
    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        write_json(out / "metrics.json", data)
        clustered = any("clusters" in r["server"] for r in data["rounds"])
        validated = any("val_accuracy_mean" in r["summary"] for r in data["rounds"])
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=ROUND_COLUMNS
                                + (VALIDATION_COLUMNS if validated else [])
                                + (CLUSTER_COLUMNS if clustered else []))
        writer.writeheader()
        for record in data["rounds"]:
            writer.writerow(record["summary"])
        atomic_write_text(out / "rounds.csv", table.getvalue())
        rows = []
        for record in data["rounds"]:
            clients = set(record["train"]) | set(record["evaluate"])
            for cid in sorted(clients, key=_client_order):
                row = {"round": record["round"], "client": cid}
                server = record["server"]
                if "cluster_of" in server:  # the cluster it trained in, the one it goes to
                    row["cluster"] = server["cluster_of"].get(cid)
                    row["cluster_next"] = server["assignments_next"].get(cid)
                row |= {f"train_{k}": v for k, v in record["train"].get(cid, {}).items()}
                row |= {f"eval_{k}": v for k, v in record["evaluate"].get(cid, {}).items()}
                rows.append(row)
        columns = sorted({k for row in rows for k in row} - {"round", "client"})
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=["round", "client", *columns])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "clients.csv", table.getvalue())
        ledgers = [self.server_ledger] + [self.client_ledgers[c] for c in sorted(
            self.client_ledgers, key=_client_order)]
        PrivacyLedger.write_all(ledgers, out / "privacy_ledger.json")
        plot_rounds(data, out / "accuracy.png")


def plot_rounds(data: dict[str, Any], path: Path) -> None:
    """Local and neighbor accuracy per round: mean across clients, +- one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    summaries = [r["summary"] for r in data["rounds"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key, label in [("local_accuracy", "local"), ("neighbor_accuracy", "neighbor")]:
        points = [(s["round"], s[f"{key}_mean"], s[f"{key}_std"]) for s in summaries
                  if s[f"{key}_mean"] is not None]
        if not points:
            continue
        x, mean, std = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        ax.plot(x, mean, marker="o", label=f"{label} accuracy")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    privacy = data["privacy"]
    tag = "no DP" if privacy["mode"] == "off" else (
        f"nominal eps {privacy['nominal_epsilon']}" if privacy["label"] == "nominal"
        else privacy["mode"])
    ax.set_title(f"{data['run']['name']}: {data['run']['method']}, "
                 f"{data['run']['clients']} clients ({tag})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (mean +- std over clients)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
