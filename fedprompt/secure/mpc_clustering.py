"""The server side of secure clustering: relays sealed shares to the compute parties and
learns only the DP clustering's releases (noisy cluster sums, silhouette scores and sizes;
exact with the noise off), the public centres and k derived from them, and each
client's label (a function of its own vector and the public centres).

:class:`SecureClustering` either spawns its compute parties and the TTP as child
processes on this machine (default; simulation and tests), or connects to parties already
running ``python -m fedprompt.secure.party`` (``ClusteringSettings.party_addresses``).
It never holds a private key: it learns each party's *public* key from the party itself
over the authenticated control channel (:mod:`fedprompt.secure.control`).

Faults: any party error, a closed connection or a reply missing its deadline makes
:meth:`SecureClustering.cluster` raise :class:`ClusteringError` (after at most
``timeout_s``); spawned processes are then killed and restarted on the next call, and
external parties are asked to restart. A client whose submission is malformed, does not
decrypt at some party, or is out of the fixed-point range (checked under MPC) is excluded
and logged, and the round goes on without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.secure.clustering import (
    ClusteringError,
    ClusteringResult,
    ClusteringSettings,
    ShareRejected,
    round_seed,
    single_cluster,
)
from fedprompt.secure.control import (
    AuthenticationFailed,
    ChannelError,
    pack_arrays,
    recv_message,
    send_message,
    server_handshake,
    unpack_arrays,
)
from fedprompt.secure.fixed_point import check_dims
from fedprompt.secure.kmeans import Releases
from fedprompt.secure.sealing import KEY_BYTES, seal_vector, split_sealed

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _kill(procs: list[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])


class SecureClustering:
    """Secure adaptive k-means by CrypTen compute parties; the server only relays."""

    insecure = False

    def __init__(self, settings: ClusteringSettings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else ClusteringSettings()
        self.settings = replace(base, **overrides) if overrides else base
        check_dims(self.settings.dim)
        self._spawn = not self.settings.party_addresses
        if not self._spawn and len(self.settings.auth_token) < 16:
            raise ValueError("connecting to running parties needs ClusteringSettings."
                             "auth_token (the parties' control token, >= 16 characters)")
        self._token = self.settings.auth_token or secrets.token_hex(32)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[socket.socket] = []
        self._keys: list[bytes] = []
        self._generation = 0
        self._closed = False
        self._state_dir = Path(tempfile.mkdtemp(prefix="fedprompt-parties-")) if (
            self._spawn) else None
        self._finalizer = weakref.finalize(self, SecureClustering._cleanup, self._procs,
                                           self._conns, self._state_dir)
        self._start()

    # -- public interface -----------------------------------------------------------------
    def client_material(self) -> dict[str, bytes]:
        material = {"backend": b"secure", "dim": str(self.settings.dim).encode(),
                    "parties": str(self.settings.n_parties).encode()}
        for rank, key in enumerate(self._keys):
            material[f"party_key_{rank}"] = key
        return material

    @staticmethod
    def seal(vector: np.ndarray, material: dict[str, bytes], round_id: int,
             client_id: int) -> bytes:
        return seal_vector(vector, material, round_id, client_id)

    def party_pids(self) -> list[int]:
        """Process ids of the spawned compute parties (rank order), then the TTP."""
        return [p.pid for p in self._procs]

    def _split_all(self, round_id: int, submissions: dict[int, bytes]) -> tuple[
        dict[int, list[bytes]], dict[int, str]
    ]:
        s = self.settings
        excluded: dict[int, str] = {}
        parts: dict[int, list[bytes]] = {}
        for cid in sorted(submissions):
            try:
                parts[cid] = split_sealed(submissions[cid], round_id, cid, s.dim, s.n_parties)
            except ShareRejected as exc:
                excluded[cid] = str(exc)
                log.warning("clustering round %d: client %d excluded: %s", round_id, cid, exc)
        check_dims(s.dim, len(parts))
        return parts, excluded

    def _request(self, round_id: int, header: dict[str, Any], parts: dict[int, list[bytes]],
                 tail: bytes = b"") -> list[tuple[dict[str, Any], bytes]]:
        if self._closed:
            raise ClusteringError("this SecureClustering is closed")
        if not self._conns:
            self._start()
        try:
            return self._exchange(round_id, header, parts, tail)
        except ClusteringError as exc:
            self._recover()
            raise ClusteringError(f"secure clustering of round {round_id} failed: {exc}; "
                                  "the compute parties are restarted for the next round"
                                  ) from exc

    def cluster(self, round_id: int, submissions: dict[int, bytes]) -> ClusteringResult:
        """The DP clustering of the valid submissions; the parties make the releases even
        when no submission is valid."""
        start = time.perf_counter()
        s = self.settings
        parts, excluded = self._split_all(round_id, submissions)
        if s.k_max == 1:
            return single_cluster(sorted(parts), excluded)
        stds = s.noise_stds()
        header = {"type": "cluster", "k_max": s.k_max, "iterations": s.iterations,
                  "seed": round_seed(s.seed, round_id), "min_silhouette": s.min_silhouette,
                  "stds": {"sums": stds.sums, "last": stds.last, "scores": stds.scores}}
        replies = self._request(round_id, header, parts)
        result = self._combine(round_id, replies, excluded)
        result.stats["seconds"] = time.perf_counter() - start
        return result

    def assign(self, round_id: int, submissions: dict[int, bytes],
               centres: np.ndarray) -> tuple[dict[int, int], dict[int, str]]:
        """Each valid submission's label against the public ``centres`` (k, dim)."""
        parts, excluded = self._split_all(round_id, submissions)
        if not parts:
            return {}, excluded
        centres = np.asarray(centres, dtype=np.float64)
        shapes, data = pack_arrays([centres])
        replies = self._request(round_id, {"type": "assign", "centres_shape": shapes[0]},
                                parts, data)
        first = self._agree(round_id, replies, ("clients", "labels"), "assigned")
        self._note_excluded(round_id, replies, excluded)
        return ({int(c): int(lab) for c, lab in zip(first["clients"], first["labels"],
                                                     strict=True)}, excluded)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(ChannelError, OSError):
                send_message(conn, {"type": "shutdown" if self._spawn else "bye"},
                             timeout=5.0)
                recv_message(conn, 10.0)
        if self._spawn:
            deadline = time.monotonic() + 15.0
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))
        self._finalizer()

    def __enter__(self) -> SecureClustering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes and connections ---------------------------------------------------------
    @staticmethod
    def _cleanup(procs: list[subprocess.Popen[bytes]], conns: list[socket.socket],
                 state_dir: Path | None) -> None:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.close()
        conns.clear()
        _kill(procs)
        procs.clear()
        if state_dir is not None:
            shutil.rmtree(state_dir, ignore_errors=True)

    def _start(self) -> None:
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout_s
        if self._spawn:
            addresses = self._spawn_parties()
            try:
                conns, keys, _ = self._handshakes(addresses, deadline, deadline)
            except ClusteringError as exc:
                self._cleanup(self._procs, [], None)
                raise ClusteringError(f"could not start the compute parties: {exc}"
                                      f"{self._logs_hint()}") from exc
        else:
            conns, keys = self._join_running(deadline)
        if self._keys and keys != self._keys:
            log.warning("the compute parties' public keys changed: clients must seal with "
                        "the new client_material()")
        self._conns[:] = conns
        self._keys = keys
        log.info("secure clustering: %d compute parties ready", len(conns))

    def _handshakes(self, addresses: list[tuple[str, int]], deadline: float,
                    reply_deadline: float) -> tuple[list[socket.socket], list[bytes],
                                                    list[str]]:
        conns: list[socket.socket] = []
        keys: list[bytes] = []
        groups: list[str] = []
        try:
            for rank, address in enumerate(addresses):
                conn = self._connect(rank, address, deadline)
                conns.append(conn)
                got_rank, key, group = server_handshake(
                    conn, self._token, max(0.5, reply_deadline - time.monotonic()))
                if got_rank != rank or len(key) != KEY_BYTES:
                    raise ClusteringError(f"the party at {address[0]}:{address[1]} says it is "
                                          f"rank {got_rank}, expected {rank}")
                keys.append(key)
                groups.append(group)
        except ClusteringError:
            for conn in conns:
                conn.close()
            raise
        return conns, keys, groups

    def _join_running(self, deadline: float) -> tuple[list[socket.socket], list[bytes]]:
        """Connect to external parties. They must all be members of one working CrypTen
        group; when one is missing (restarting, waiting at the rendezvous) or the groups
        differ (one was restarted), every reachable party is told to restart so that all
        of them (and the TTP, whose group then breaks) form a fresh group."""
        addresses = [self._parse(a) for a in self.settings.party_addresses]
        problem = "no attempt"
        # a party answers once its CrypTen group is up (a cold start takes 10-30 s); one
        # waiting at a stale rendezvous never does
        window = 60.0
        while time.monotonic() < deadline:
            reply_deadline = min(deadline, time.monotonic() + window)
            try:
                conns, keys, groups = self._handshakes(addresses, reply_deadline,
                                                       reply_deadline)
            except AuthenticationFailed as exc:
                raise ClusteringError(f"could not join the compute parties: {exc}") from exc
            except ClusteringError as exc:
                problem = str(exc)
            else:
                if len(set(groups)) == 1:
                    return conns, keys
                problem = f"the parties belong to different CrypTen groups {groups}"
                for conn in conns:
                    conn.close()
            log.warning("compute parties not ready (%s): asking them to restart", problem)
            self._restart_reachable(addresses)
            window = 120.0  # now give all of them time to restart and meet again
            time.sleep(3.0)
        raise ClusteringError(f"could not reach a working group of compute parties within "
                              f"{self.settings.startup_timeout_s:.0f} s: {problem}")

    def _restart_reachable(self, addresses: list[tuple[str, int]]) -> None:
        for address in addresses:
            with contextlib.suppress(OSError, ClusteringError):
                conn = socket.create_connection(address, timeout=2.0)
                with conn:
                    server_handshake(conn, self._token, 2.0)
                    send_message(conn, {"type": "restart"}, timeout=2.0)

    @staticmethod
    def _parse(address: str) -> tuple[str, int]:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"party address must be HOST:PORT, got {address!r}")
        return host, int(port)

    def _connect(self, rank: int, address: tuple[str, int], deadline: float) -> socket.socket:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._spawn and self._procs[rank].poll() is not None:
                raise ClusteringError(f"party {rank} exited with code "
                                      f"{self._procs[rank].returncode} during startup")
            try:
                return socket.create_connection(address, timeout=5.0)
            except OSError as exc:
                last = exc
                time.sleep(0.2)
        raise ClusteringError(f"party {rank} at {address[0]}:{address[1]} did not accept a "
                              f"connection within the startup timeout ({last})")

    def _spawn_parties(self) -> list[tuple[str, int]]:
        s = self.settings
        assert self._state_dir is not None
        self._generation += 1
        host = s.host
        if s.base_port:
            rdv_port = s.base_port
            ports = [s.base_port + 1 + r for r in range(s.n_parties)]
        else:
            rdv_port = _free_port(host)
            ports = [_free_port(host) for _ in range(s.n_parties)]
        env = dict(os.environ)
        env["FEDPROMPT_PARTY_TOKEN"] = self._token
        env.setdefault("OMP_NUM_THREADS", "1")
        common = ["--parties", str(s.n_parties), "--rendezvous", f"tcp://{host}:{rdv_port}"]
        commands = [[*common, "--rank", str(r), "--listen", f"{host}:{ports[r]}",
                     "--key-file", str(self._state_dir / f"party{r}.key")]
                    for r in range(s.n_parties)]
        commands.append([*common, "--ttp"])
        names = [f"party{r}" for r in range(s.n_parties)] + ["ttp"]
        for name, args in zip(names, commands, strict=True):
            logfile = self._state_dir / f"{name}.log"
            with open(logfile, "ab") as out:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fedprompt.secure.party", *args], env=env,
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
        return [(host, p) for p in ports]

    def _logs_hint(self) -> str:
        if self._state_dir is None:
            return ""
        tails = []
        for log_file in sorted(self._state_dir.glob("*.log")):
            tail = _tail(log_file, 4)
            if tail:
                tails.append(f"{log_file.stem}: {tail}")
        return ("; party logs: " + " || ".join(tails)) if tails else ""

    def _recover(self) -> None:
        """After a failed round: nothing of the broken CrypTen group may be reused."""
        if self._spawn:
            self._cleanup(self._procs, self._conns, None)
            return
        for conn in self._conns:
            with contextlib.suppress(ChannelError, OSError):
                send_message(conn, {"type": "restart"}, timeout=2.0)
            with contextlib.suppress(OSError):
                conn.close()
        self._conns.clear()

    # -- one round --------------------------------------------------------------------------
    def _exchange(self, round_id: int, request: dict[str, Any],
                  parts: dict[int, list[bytes]], tail: bytes
                  ) -> list[tuple[dict[str, Any], bytes]]:
        s = self.settings
        clients = sorted(parts)
        header = {**request, "round": round_id, "dim": s.dim,
                  "verify_range": s.verify_range, "clients": clients,
                  "deadline_s": s.timeout_s}
        deadline = time.monotonic() + s.timeout_s
        for rank, conn in enumerate(self._conns):
            blobs = [parts[c][rank] for c in clients]
            try:
                send_message(conn, {**header, "sizes": [len(b) for b in blobs]},
                             b"".join(blobs) + tail,
                             timeout=max(1.0, deadline - time.monotonic()))
            except ChannelError as exc:
                raise ClusteringError(f"party {rank}: {exc}{self._exit_note(rank)}") from exc
        replies = []
        for rank, conn in enumerate(self._conns):
            try:
                reply, data = recv_message(conn, max(0.1, deadline - time.monotonic()))
            except ChannelError as exc:
                raise ClusteringError(f"party {rank}: {exc}{self._exit_note(rank)}") from exc
            if reply.get("type") == "error":
                raise ClusteringError(f"party {rank} reported: {reply.get('message')}"
                                      f"{self._dead_note()}")
            expected = "result" if request["type"] == "cluster" else "assigned"
            if reply.get("type") != expected or reply.get("round") != round_id:
                raise ClusteringError(f"party {rank} sent an unexpected reply "
                                      f"{reply.get('type')!r} for round {reply.get('round')}")
            replies.append((reply, data))
        return replies

    def _exit_note(self, rank: int) -> str:
        if not self._spawn or rank >= len(self._procs):
            return ""
        code = self._procs[rank].poll()
        note = f" (its process exited with code {code})" if code is not None else ""
        return note + self._dead_note()

    def _dead_note(self) -> str:
        """Which spawned processes have exited (a killed party explains the others'
        errors)."""
        if not self._spawn:
            return ""
        time.sleep(0.2)  # let a dying process be reaped before we look
        names = [f"party {i}" for i in range(len(self._procs) - 1)] + ["the TTP"]
        dead = [f"{name} exited with code {p.poll()}"
                for name, p in zip(names, self._procs, strict=True) if p.poll() is not None]
        return f" [{'; '.join(dead)}]" if dead else ""

    @staticmethod
    def _agree(round_id: int, replies: list[tuple[dict[str, Any], bytes]],
               keys: tuple[str, ...], what: str) -> dict[str, Any]:
        """The first reply, after checking every party returned the same ``keys`` and the
        same payload (all parties open the same values and derive the same public
        state)."""
        first, data = replies[0]
        for rank, (reply, other) in enumerate(replies[1:], start=1):
            for key in (*keys, "dropped", "range_violations"):
                if reply.get(key) != first.get(key):
                    raise ClusteringError(f"compute parties 0 and {rank} disagree on {key!r} "
                                          f"in round {round_id} ({what})")
            if other != data:
                raise ClusteringError(f"compute parties 0 and {rank} disagree on the released "
                                      f"values in round {round_id} ({what})")
        return first

    @staticmethod
    def _note_excluded(round_id: int, replies: list[tuple[dict[str, Any], bytes]],
                       excluded: dict[int, str]) -> None:
        first = replies[0][0]
        reasons: dict[int, list[str]] = {}
        for rank, (reply, _) in enumerate(replies):
            for cid, why in reply["rejected"].items():
                reasons.setdefault(int(cid), []).append(f"party {rank}: {why}")
        for cid in first["dropped"]:
            excluded[int(cid)] = "; ".join(reasons.get(int(cid), ["rejected by a party"]))
        for cid in first["range_violations"]:
            excluded[int(cid)] = ("outside the fixed-point range of secure k-means (coordinate "
                                  "or norm bound, checked under MPC)")
        for cid in sorted(set(first["dropped"]) | set(first["range_violations"])):
            log.warning("clustering round %d: client %d excluded: %s", round_id, cid,
                        excluded[int(cid)])

    def _combine(self, round_id: int, replies: list[tuple[dict[str, Any], bytes]],
                 excluded: dict[int, str]) -> ClusteringResult:
        first = self._agree(round_id, replies, ("clients", "k", "labels", "shapes"),
                            "clustering")
        self._note_excluded(round_id, replies, excluded)
        clients = [int(c) for c in first["clients"]]
        stats: dict[str, float] = {"clients": float(len(clients))}
        for rank, (reply, _) in enumerate(replies):
            for key, value in reply["stats"].items():
                stats[f"party{rank}_{key}"] = float(value)
        # CrypTen counts every byte once at the sender and once at the receiver
        stats["comm_bytes"] = sum(float(r["stats"]["comm_bytes"]) for r, _ in replies) / 2
        try:
            arrays = unpack_arrays(first["shapes"], replies[0][1])
        except ChannelError as exc:
            raise ClusteringError(f"round {round_id}: {exc}") from exc
        s = self.settings
        n_sums = s.iterations - 1
        if len(arrays) != n_sums + 4 + int(bool(first["has_centres"])):
            raise ClusteringError(f"round {round_id}: the parties returned {len(arrays)} "
                                  "arrays, not the releases of this configuration")
        releases = Releases(sums=arrays[:n_sums], last=arrays[n_sums],
                            scores=arrays[n_sums + 1])
        counts, criterion = arrays[n_sums + 2], arrays[n_sums + 3]
        centres = arrays[n_sums + 4] if first["has_centres"] else None
        k = int(first["k"])
        labels = [int(v) for v in first["labels"]]
        if len(labels) != len(clients) or any(not 0 <= v < k for v in labels):
            raise ClusteringError(f"round {round_id}: the revealed labels are invalid "
                                  f"(k = {k}, {len(labels)} labels for {len(clients)} "
                                  "clients)")
        return ClusteringResult(
            k=k, assignments=dict(zip(clients, labels, strict=True)), excluded=excluded,
            centres=centres, counts=counts, criterion=criterion, releases=releases,
            private=s.private, stats=stats)
