"""The server's side of a federated run, independent of Flower.

:class:`FederatedServer` holds the shared tensors, samples clients, validates and
aggregates their updates (with global DP where configured), keeps the server-side
accountant for the shared prompt, and records everything in a
:class:`~fedprompt.federated.history.FederatedHistory`.

Who a reply is from: the **node** it came from (Flower's authenticated node id, the
reply's ``src_node_id``), never what the reply says about itself. The first reply of a
node that names a client id (its ``partition-id`` metric) binds that node to that client
for the rest of the run (trust on first use; a client id is bound to one node only).
Afterwards a reply is *untrusted* (rejected with a logged reason, recorded under its own
node, counted for nobody) when it comes from a node the server did not address in that
round, is a second reply of a node in a round, names another client than its node's, or
names a client bound to another node, or when its epsilon or step count is below what
its client's ledger already holds. Records and ledgers are keyed by the bound client id
(:meth:`FederatedServer.client_of`).

Every node addressed in a round (train or evaluate) gets exactly one record of that
round, under the node's client (:meth:`FederatedServer.label`; a node that binds later
has its earlier ``node-<id>`` records renamed to its client id): its own first reply, or,
where none came, a *no reply* placeholder (:meth:`FederatedServer.complete`). Replies
that are nobody's record (unaddressed nodes, second replies, a reply to a message sent to
another node) are kept apart as *ignored*. Every failure, rejection and missing reply is
logged at warning level, for train and evaluate alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fedprompt.config import RunConfig
from fedprompt.federated.aggregation import (
    GlobalDP,
    UpdateRejected,
    combine_updates,
    noise_generator,
    validate_update,
)
from fedprompt.federated.history import FederatedHistory, node_label
from fedprompt.privacy.accounting import Accountant, calibrate_noise, nominal_noise_multiplier
from fedprompt.privacy.ledger import LedgerError
from fedprompt.privacy.noise import SecureRandom
from fedprompt.seeding import derived_seed

log = logging.getLogger("fedprompt.server")

#: evaluate-config key: the server's user-level epsilon for the shared tensors it sends
#: (-1: none), accounted in its "server" ledger
SERVER_EPSILON_KEY = "server-epsilon"


@dataclass
class ClientReply:
    """What the strategy hands over from one reply message."""

    node_id: int
    metrics: dict[str, float | int] = field(default_factory=dict)
    update: dict[str, np.ndarray | Tensor] | None = None
    error: str = ""
    declined_reason: str = ""
    submission: bytes = b""  # sealed clustering submission (clustered methods)
    #: why no reply came from the node (the round's deadline passed, or the SuperLink
    #: answered that the node is unavailable); then nothing else is set
    no_reply: str = ""
    # set by the server's screening (FederatedServer.identify, FederatedServer.screen):
    client: int | None = None  # the client its node is bound to (None: not bound yet)
    untrusted: str = ""  # why its claims were not believed (then it counts for nobody)
    rejected: str = ""  # why its update failed validation (shape, dtype, finite, norm)
    #: the addressed node's one reply of the round (its record); False: an ignored reply
    answers: bool = False

    def status(self, kind: str) -> tuple[str, str]:
        """What became of the node this round and why: ``trained`` (train) or
        ``evaluated`` (evaluate), ``declined``, ``rejected``, ``failed`` (the error text)
        or ``no reply``; the reason is '' for a success."""
        if self.no_reply:
            return "no reply", self.no_reply
        if self.untrusted:
            return "rejected", f"untrusted: {self.untrusted}"
        if self.error:
            return "failed", self.error
        if self.declined_reason:
            return "declined", self.declined_reason
        if self.rejected:
            return "rejected", self.rejected
        return ("trained" if kind == "train" else "evaluated"), ""


@dataclass
class Accepted:
    """A reply whose update passed validation."""

    reply: ClientReply
    update: dict[str, Tensor]
    weight: float  # the client's number of examples (used only without global DP)


class FederatedServer:
    def __init__(self, config: RunConfig, shared: dict[str, Tensor], num_clients: int,
                 local_dp_names: Sequence[str] = ()) -> None:
        self.config = config
        self.shared = {k: v.detach().cpu().float().clone() for k, v in shared.items()}
        self.expected = {k: tuple(v.shape) for k, v in self.shared.items()}
        self.num_clients = num_clients
        privacy = config.privacy
        fed = config.federation
        self.sample_rate = fed.fraction_train
        self.global_dp = privacy.mode != "off" and privacy.server and bool(self.shared)
        self.accountant = Accountant(privacy.accountant)
        self.noise_multiplier = 0.0
        if self.global_dp:
            if privacy.mode == "noise-multiplier":
                self.noise_multiplier = privacy.server_noise_multiplier
            elif privacy.mode == "nominal":
                self.noise_multiplier = nominal_noise_multiplier(privacy.epsilon,
                                                                 privacy.delta, fed.rounds)
            else:
                self.noise_multiplier = calibrate_noise(privacy.epsilon, privacy.delta,
                                                        self.sample_rate, fed.rounds,
                                                        privacy.accountant)
        reproducible = privacy.reproducible_noise or privacy.mode == "off"
        self.generator = noise_generator(
            derived_seed(config.seed, "server-noise") if reproducible else None)
        # which clients a round samples is as secret as the noise (privacy amplification
        # by sampling assumes it): a CSPRNG stream as well
        self.sampler = (SecureRandom.from_seed(config.seed, "client-sampling") if reproducible
                        else SecureRandom())
        self.history = FederatedHistory(config, num_clients, self.noise_multiplier,
                                        list(self.shared), local_dp_names)
        self._node_clients: dict[int, int] = {}  # authenticated node id -> client id
        self._client_nodes: dict[int, int] = {}  # client id -> node id
        self._addressed: dict[tuple[int, str], set[int]] = {}  # (round, kind) -> nodes

    # ------------------------------------------------------------------ sampling
    def sample(self, node_ids: Sequence[int]) -> list[int]:
        """Poisson sampling at rate ``federation.fraction_train`` (all nodes at 1.0)."""
        nodes = sorted(node_ids)
        if self.sample_rate >= 1.0:
            return nodes
        keep = self.sampler.uniform(len(nodes)) < self.sample_rate
        return [n for n, k in zip(nodes, keep, strict=True) if k]

    # ------------------------------------------------------------- per-node hooks
    def begin_round(self, server_round: int, node_ids: Sequence[int]) -> None:
        """Called before sampling with every connected node (a hook for subclasses)."""

    def shared_for(self, node_id: int) -> dict[str, Tensor]:
        """The shared tensors sent to ``node_id`` (everyone gets the global ones here)."""
        return self.shared

    def train_config(self, node_id: int, server_round: int) -> dict[str, int | str | bytes]:
        """Extra round config for ``node_id``'s train message (none here)."""
        return {}

    def evaluate_config(self, node_id: int) -> dict[str, float]:
        """Extra config of ``node_id``'s evaluate message: the user-level guarantee of the
        shared tensors it receives (the client records it in its exported prompt)."""
        if not self.global_dp:
            return {SERVER_EPSILON_KEY: -1.0}
        return {SERVER_EPSILON_KEY: self.accountant.epsilon(self.config.privacy.delta)}

    def result_arrays(self) -> dict[str, Tensor]:
        """What the run's final "model" is (the global shared tensors here)."""
        return self.shared

    def close(self) -> None:
        """Release what the server holds (nothing here)."""

    # ------------------------------------------------------------- who is who
    def address(self, server_round: int, kind: str, node_ids: Sequence[int]) -> None:
        """Record that ``kind`` ("train" or "evaluate") messages of ``server_round`` go to
        ``node_ids``: only their replies are taken (the strategy calls this)."""
        self._addressed.setdefault((server_round, kind), set()).update(int(n) for n in
                                                                       node_ids)

    def client_of(self, node_id: int) -> int | None:
        """The client id node ``node_id`` is bound to (``None`` before its first reply)."""
        return self._node_clients.get(node_id)

    def label(self, node_id: int) -> int | str:
        """How results name node ``node_id``: its client id, else ``node-<id>``."""
        client = self.client_of(node_id)
        return node_label(node_id) if client is None else client

    def complete(self, server_round: int, kind: str,
                 replies: Sequence[ClientReply]) -> list[ClientReply]:
        """The round's replies, identified (:meth:`identify`), plus a *no reply* record
        for every addressed node that sent no reply of its own (a message whose deadline,
        ``federation.timeout``, passed without an answer). Every addressed node has
        exactly one reply with ``answers`` set in the result; logs every missing reply."""
        replies = list(replies)
        self.identify(server_round, kind, replies)
        answered = {r.node_id for r in replies if r.answers}
        timeout = self.config.federation.timeout
        for node in sorted(self._addressed[(server_round, kind)] - answered):
            missing = ClientReply(node_id=node, answers=True, client=self.client_of(node),
                                  no_reply=f"no reply within federation.timeout = "
                                  f"{timeout:g} s")
            log.warning("round %d: %s sent no %s reply: %s", server_round, self.who(node),
                        kind, missing.no_reply)
            replies.append(missing)
        return replies

    def who(self, node_id: int) -> str:
        """A node for the log: ``client 3 (node 17)``, or ``node 17 (client not known
        yet)`` before its first valid reply."""
        client = self.client_of(node_id)
        return (f"node {node_id} (client not known yet)" if client is None
                else f"client {client} (node {node_id})")

    def identify(self, server_round: int, kind: str, replies: Sequence[ClientReply]) -> None:
        """Set each reply's ``client`` (binding a node on its first valid claim),
        ``untrusted`` reason and ``answers`` (the addressed node's own first reply: its
        record of the round); see the module docstring. Logs every untrusted, failed or
        missing reply."""
        expected = self._addressed.get((server_round, kind))
        if expected is None:
            raise RuntimeError(f"round {server_round}: replies to {kind} messages that were "
                               f"never addressed: call FederatedServer.address(round, "
                               f"{kind!r}, nodes) when sending them")
        seen: set[int] = set()
        for reply in sorted(replies, key=lambda r: r.node_id):
            node = reply.node_id
            if not reply.untrusted:  # (the transport may have found a reason already)
                reply.untrusted = self._admit(server_round, kind, reply, expected, seen)
            reply.client = self.client_of(node)
            who = self.who(node)
            if reply.untrusted:
                log.warning("round %d: rejected the %s reply from %s: %s", server_round, kind,
                            who, reply.untrusted)
            elif reply.no_reply:
                log.warning("round %d: %s sent no %s reply: %s", server_round, who, kind,
                            reply.no_reply)
            elif reply.error:
                log.warning("round %d: %s failed to %s: %s", server_round, who, kind,
                            reply.error)

    def _admit(self, server_round: int, kind: str, reply: ClientReply, expected: set[int],
               seen: set[int]) -> str:
        """'' if the reply may be taken (binding its node on first use), else why not.
        The first reply of an addressed node is its record (``answers``), trusted or
        not; any other reply is ignored."""
        node = reply.node_id
        if node not in expected:
            return f"node {node} was not sent a {kind} message in round {server_round}"
        if node in seen:
            return f"a second {kind} reply from node {node} in round {server_round}"
        seen.add(node)
        reply.answers = True
        return "" if reply.error or reply.no_reply else self._claim(reply)

    def _claim(self, reply: ClientReply) -> str:
        """Check (and on first use bind) the client id a reply names; '' if it holds."""
        node = reply.node_id
        claimed = reply.metrics.get("partition-id")
        if claimed is None:
            return "the reply names no client (no partition-id metric)"
        if (isinstance(claimed, bool) or not isinstance(claimed, int | float)
                or not math.isfinite(claimed) or claimed != int(claimed) or claimed < 0):
            return f"partition-id {claimed!r} is not a client id (an integer >= 0)"
        claimed = int(claimed)
        bound = self._node_clients.get(node)
        if bound is not None:
            return "" if claimed == bound else (
                f"it claims to be client {claimed}, but node {node} is client {bound}")
        owner = self._client_nodes.get(claimed)
        if owner is not None:
            return f"it claims to be client {claimed}, which is node {owner}"
        self._node_clients[node] = claimed
        self._client_nodes[claimed] = node
        self.history.rename(node_label(node), claimed)  # its records before it said so
        log.info("node %d is client %d", node, claimed)
        return ""

    def check_connected(self, server_round: int, node_ids: Sequence[int]) -> list[int]:
        """Log a warning when fewer nodes are connected than the federation has clients
        (``data.num_clients``), naming the missing clients as far as the bindings tell.
        Returns the client ids known to be missing."""
        total = self.config.data.num_clients
        connected = set(int(n) for n in node_ids)
        if len(connected) >= total:
            return []
        present = {c for n in connected if (c := self.client_of(n)) is not None}
        unknown = len(connected) - len(present)  # connected, not identified yet
        absent = [c for c in range(total) if c not in present]
        gone = [c for c in absent if c in self._client_nodes]  # seen before, now offline
        if unknown == 0:
            which = ", ".join(
                f"client {c}" + (f" (node {self._client_nodes[c]}, offline)" if c in gone
                                 else " (not seen yet)") for c in absent)
        else:
            which = (f"{total - len(connected)} of clients {absent} ({unknown} connected "
                     f"node(s) have not identified themselves yet)")
            if gone:
                which += "; offline: " + ", ".join(
                    f"client {c} (node {self._client_nodes[c]})" for c in gone)
        log.warning("round %d: only %d of the federation's %d clients (data.num_clients) "
                    "are connected; missing: %s", server_round, len(connected), total, which)
        return absent if unknown == 0 else gone

    def empty_round(self, server_round: int, kind: str) -> str:
        """'' unless clients were addressed for ``kind`` in ``server_round`` and none
        succeeded (trained or declined; evaluated): then what became of them, in one
        line (identical outcomes once, else client by client)."""
        records = self.history.rounds.get(server_round, {}).get(kind, {})
        ok = ("trained", "declined") if kind == "train" else ("evaluated",)
        if not records or any(m.get("status") in ok for m in records.values()):
            return ""
        outcomes = [(k, m.get("status", "?"), m.get("reason", "")) for k, m in
                    sorted(records.items(), key=lambda item: str(item[0]))]
        verb = "trained" if kind == "train" else "was evaluated"
        head = f"round {server_round}: no client {verb} ({len(records)} addressed"
        if len({(status, reason) for _, status, reason in outcomes}) == 1:
            _, status, reason = outcomes[0]
            return f"{head}, all {status}: {reason})"
        shown = "; ".join(f"client {k} {status}: {reason}" for k, status, reason in
                          outcomes[:5])
        more = f"; and {len(outcomes) - 5} more" if len(outcomes) > 5 else ""
        return f"{head}: {shown}{more})"

    # --------------------------------------------------------------- aggregation
    @property
    def global_dp_settings(self) -> GlobalDP | None:
        if not self.global_dp:
            return None
        return GlobalDP(self.config.privacy.server_clip_norm, self.noise_multiplier)

    def screen(self, server_round: int, replies: Sequence[ClientReply]) -> tuple[
        list[Accepted], list[dict[str, object]]
    ]:
        """Validate every reply of :meth:`complete`: the accepted updates (ordered by
        client) and the rejected ones with their reasons (logged). Untrusted replies
        (:meth:`identify`), errors, missing replies and declines are never accepted; nor
        is a reply whose epsilon or step count is below its client's ledger (it is marked
        untrusted)."""
        accepted: list[Accepted] = []
        rejected: list[dict[str, object]] = []
        for reply in sorted(replies, key=lambda r: (r.client is None, r.client or 0,
                                                    r.node_id)):
            who = self.label(reply.node_id)
            if reply.no_reply:
                continue  # (logged by complete/identify)
            if not reply.untrusted and not reply.error and reply.client is not None:
                try:
                    self.history.check_client_entry(reply.client, reply.metrics,
                                                    server_round)
                except LedgerError as exc:
                    reply.untrusted = str(exc)
                    log.warning("round %d: rejected the reply of client %s: %s",
                                server_round, who, exc)
            if reply.untrusted:
                rejected.append({"client": who, "reason": f"untrusted: {reply.untrusted}"})
                continue
            if reply.error:
                rejected.append({"client": who, "reason": f"client error: {reply.error}"})
                continue  # (logged by identify)
            if reply.declined_reason:
                log.info("round %d: client %s declined: %s", server_round, who,
                         reply.declined_reason)
                continue
            if not self.shared:
                continue
            try:
                update = validate_update(reply.update or {}, self.expected,
                                         self.config.federation.max_update_norm)
            except UpdateRejected as exc:
                reply.rejected = str(exc)
                rejected.append({"client": who, "reason": str(exc)})
                log.warning("round %d: rejected the update of client %s: %s", server_round,
                            who, exc)
                continue
            accepted.append(Accepted(reply, update,
                                     float(reply.metrics.get("num-examples", 1))))
        return accepted, rejected

    def combine(self, accepted: Sequence[Accepted], template: dict[str, Tensor],
                denominator: float) -> tuple[dict[str, Tensor], dict[str, object]]:
        """Mean update of ``accepted`` (clipped and noised with global DP)."""
        return combine_updates(
            [a.update for a in accepted], [a.weight for a in accepted], template,
            dp=self.global_dp_settings, denominator=denominator,
            equal_weights=self.config.federation.weighting == "equal",
            generator=self.generator)

    def aggregate(self, server_round: int, replies: Sequence[ClientReply]) -> None:
        """Validate the round's replies and update the shared tensors."""
        replies = self.complete(server_round, "train", replies)
        accepted, rejected = self.screen(server_round, replies)
        info: dict[str, object] = {"accepted": len(accepted), "rejected": rejected}
        if self.shared:
            mean, details = self.combine(accepted, self.shared,
                                         self.sample_rate * self.num_clients)
            info |= details
            if self.global_dp:
                self.accountant.step(self.noise_multiplier, self.sample_rate)
            lr = self.config.federation.server_lr
            self.shared = {k: v + lr * mean[k] for k, v in self.shared.items()}
        info["global_epsilon"] = (self.accountant.epsilon(self.config.privacy.delta)
                                  if self.global_dp else None)
        self.history.record_train(server_round, replies, info)

    def record_evaluation(self, server_round: int, replies: Sequence[ClientReply]) -> None:
        """Record the round's evaluate replies (one record per addressed node)."""
        self.history.record_evaluate(server_round,
                                     self.complete(server_round, "evaluate", replies))

    def shared_numpy(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.shared.items()}


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
