"""A compute party, or CrypTen's trusted third party (TTP), as its own OS process.

Compute party ``r`` of ``P`` (holds its own X25519 key; the server never sees it)::

    python -m fedprompt.secure.party --rank 0 --parties 2 \\
        --rendezvous tcp://10.0.0.1:29500 --listen 0.0.0.0:29601 \\
        --key-file /var/lib/fedprompt/party0.key --supervise

The TTP (Beaver tuples; must not collude with any compute party)::

    python -m fedprompt.secure.party --ttp --parties 2 \\
        --rendezvous tcp://10.0.0.1:29500 --supervise

``--rendezvous`` is torch.distributed's ``init_method``: the same ``tcp://host:port`` for
all ``P + 1`` processes; party 0 hosts it (its host and port must be reachable by the
others; gloo then opens further connections between all processes, so allow TCP between
them, or set ``GLOO_SOCKET_IFNAME``). ``--listen`` is where the server's control channel
connects. The control-channel token comes from the environment variable named by
``--token-env`` (default ``FEDPROMPT_PARTY_TOKEN``), never from the command line.

A worker exits non-zero when a round fails (a peer died, a wait timed out, an MPC error):
its CrypTen group is broken then. ``--supervise`` restarts it (and the others restart
theirs the same way), which is how a deployment recovers; servers that spawn their own
parties (:class:`~fedprompt.secure.mpc_clustering.SecureClustering` without
``party_addresses``) restart them themselves.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprompt.secure.clustering import ShareRejected
from fedprompt.secure.control import (
    ChannelError,
    party_handshake,
    recv_message,
    send_message,
)
from fedprompt.secure.sealing import open_part, public_key_bytes

log = logging.getLogger("fedprompt.secure.party")

EXIT_OK = 0
EXIT_RESTART = 3
EXIT_ERROR = 70
EXIT_TIMEOUT = 75
DEFAULT_GLOO_TIMEOUT_S = 7 * 24 * 3600.0  # idle TTP waits in a gloo recv between rounds
TOKEN_ENV = "FEDPROMPT_PARTY_TOKEN"


class PartyFailure(RuntimeError):
    """This party cannot go on (its CrypTen group may be broken)."""


def load_or_create_key(path: Path) -> X25519PrivateKey:
    """The party's X25519 private key, created (mode 0600) on first use."""
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise PartyFailure(f"key file {path} holds {len(raw)} bytes, expected 32")
        return X25519PrivateKey.from_private_bytes(raw)
    key = X25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization

    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    return key


@contextlib.contextmanager
def gloo_timeout(seconds: float) -> Iterator[None]:
    """CrypTen creates its process groups without a timeout argument (torch's default is
    30 minutes, after which an idle TTP's pending receive fails); give them ours."""
    import torch.distributed as dist

    init, new_group = dist.init_process_group, dist.new_group
    limit = timedelta(seconds=seconds)

    def patched_init(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", limit)
        return init(*args, **kwargs)

    def patched_new_group(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", limit)
        return new_group(*args, **kwargs)

    dist.init_process_group, dist.new_group = patched_init, patched_new_group
    try:
        yield
    finally:
        dist.init_process_group, dist.new_group = init, new_group


def init_crypten(rank: int, parties: int, rendezvous: str, gloo_timeout_s: float) -> Any:
    os.environ.update(RENDEZVOUS=rendezvous, WORLD_SIZE=str(parties), RANK=str(rank),
                      DISTRIBUTED_BACKEND="gloo")
    from fedprompt.secure.crypten_runtime import configure

    crypten = configure(verbose=True)
    if rank < parties:
        with gloo_timeout(gloo_timeout_s):
            crypten.init()
    return crypten


class Watchdog:
    """Ends the process if a request outlives its deadline (a gloo wait cannot be
    interrupted from Python, so a hung protocol must not keep the party forever)."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def start(self, seconds: float, what: str) -> None:
        self.cancel()

        def expire() -> None:
            log.error("%s did not finish within %.0f s: exiting (code %d)", what, seconds,
                      EXIT_TIMEOUT)
            logging.shutdown()
            os._exit(EXIT_TIMEOUT)

        self._timer = threading.Timer(seconds, expire)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ComputeParty:
    def __init__(self, rank: int, parties: int, key: X25519PrivateKey, token: str,
                 listener: socket.socket, crypten: Any, state_file: Path) -> None:
        from fedprompt.secure.prefetch import install_provider

        self.rank, self.parties = rank, parties
        self.key = key
        self.public_key = public_key_bytes(key.public_key())
        self.token = token
        self.listener = listener
        self.crypten = crypten
        self.provider = install_provider()
        self.state_file = state_file
        self.seen = self._load_seen()
        self.traces: dict[tuple[Any, ...], list[Any]] = {}
        self.watchdog = Watchdog()
        # an id of this CrypTen group, the same at every party of it (party 0's draw): the
        # server restarts everyone when the parties it reaches are not all of one group
        group = torch.tensor(int.from_bytes(os.urandom(7), "little"), dtype=torch.long)
        self.group = f"{int(crypten.comm.get().broadcast(group, 0)):014x}"

    # -- replay protection: every sealed part is used at most once -----------------------
    # A part's ephemeral X25519 key is fresh for every seal, so its digest identifies the
    # part; the digests of all parts used are appended to the state file. A server that
    # relays old submissions again gets them excluded ("replayed").
    _DIGEST = 16

    def _load_seen(self) -> set[bytes]:
        try:
            raw = self.state_file.read_bytes()
        except FileNotFoundError:
            return set()
        if len(raw) % self._DIGEST:
            raise PartyFailure(f"state file {self.state_file} is corrupt (size {len(raw)})")
        return {raw[i: i + self._DIGEST] for i in range(0, len(raw), self._DIGEST)}

    @classmethod
    def _digest(cls, part: bytes) -> bytes:
        from fedprompt.secure.sealing import HEADER, KEY_BYTES

        return hashlib.sha256(part[HEADER.size: HEADER.size + KEY_BYTES]).digest()[
            : cls._DIGEST]

    def _remember(self, digests: list[bytes]) -> None:
        self.seen.update(digests)
        with open(self.state_file, "ab") as handle:
            handle.write(b"".join(digests))
            handle.flush()
            os.fsync(handle.fileno())

    # -- serving ----------------------------------------------------------------------------
    def serve(self) -> int:
        while True:
            conn, peer = self.listener.accept()
            log.info("control connection from %s:%d", *peer[:2])
            with conn:
                try:
                    party_handshake(conn, self.token, self.rank, self.public_key,
                                    self.group, 30.0)
                except ChannelError as exc:
                    log.warning("rejected a control connection from %s: %s", peer[0], exc)
                    continue
                code = self._session(conn)
            if code is not None:
                return code

    def _session(self, conn: socket.socket) -> int | None:
        """Serve one server connection; returns an exit code to stop, None to go on."""
        while True:
            try:
                header, payload = recv_message(conn, None)
            except ChannelError as exc:
                log.info("control connection ended: %s", exc)
                return None
            kind = header["type"]
            if kind == "ping":
                send_message(conn, {"type": "pong", "rank": self.rank})
            elif kind == "shutdown":
                send_message(conn, {"type": "bye"})
                self._shutdown()
                return EXIT_OK
            elif kind == "restart":
                send_message(conn, {"type": "bye"})
                return EXIT_RESTART
            elif kind == "bye":
                send_message(conn, {"type": "bye"})
                return None
            elif kind in ("cluster", "assign"):
                deadline = float(header.get("deadline_s", 120.0))
                self.watchdog.start(deadline + 10.0, f"clustering round {header.get('round')}")
                try:
                    handler = self._cluster if kind == "cluster" else self._assign
                    reply, data = handler(header, payload)
                except ShareRejected as exc:  # a refused request; the group is intact
                    self.watchdog.cancel()
                    send_message(conn, {"type": "error", "message": str(exc), "fatal": False})
                    continue
                except Exception as exc:
                    log.exception("clustering round %s failed", header.get("round"))
                    with contextlib.suppress(ChannelError):
                        send_message(conn, {"type": "error", "fatal": True,
                                            "message": f"{type(exc).__name__}: {exc}"})
                    return EXIT_ERROR
                self.watchdog.cancel()
                send_message(conn, reply, data)
            else:
                send_message(conn, {"type": "error", "fatal": False,
                                    "message": f"unknown request {kind!r}"})

    def _shutdown(self) -> None:
        self.watchdog.start(15.0, "shutdown")
        self.crypten.uninit()  # party 0 tells the TTP to terminate
        self.watchdog.cancel()

    # -- one clustering request -------------------------------------------------------------
    def _phase(self, signature: tuple[Any, ...], shape: tuple[int, ...],
               fn: Callable[[Any], Any], x: Any, stats: dict[str, float]) -> Any:
        """Trace (once per signature), prefetch the tuples, run ``fn(x)``."""
        from fedprompt.secure.prefetch import dry_run

        mpc = self.crypten.mpc.MPCTensor
        start = time.perf_counter()
        trace = self.traces.get(signature)
        if trace is None:
            zero = mpc.from_shares(torch.zeros(shape, dtype=torch.long), precision=16)
            with dry_run(self.provider) as recorded:
                fn(zero)
            trace = list(recorded)
            self.traces[signature] = trace
        traced = time.perf_counter()
        self.provider.prefetch(trace)
        fetched = time.perf_counter()
        result = fn(x)
        done = time.perf_counter()
        left = self.provider.leftover()
        name = str(signature[0])
        stats[f"{name}_trace_s"] = traced - start
        stats[f"{name}_prefetch_s"] = fetched - traced
        stats[f"{name}_run_s"] = done - fetched
        stats[f"{name}_tuple_misses"] = float(self.provider.misses)
        if left or self.provider.misses:
            log.warning("%s: %d prefetched tuples unused, %d fetched one by one", name, left,
                        self.provider.misses)
        return result

    def _inputs(self, h: dict[str, Any], payload: bytes, stats: dict[str, float]) -> tuple[
        list[int], list[int], list[np.ndarray], dict[int, str], list[int], list[int]
    ]:
        """Decrypt this party's parts of a request, agree with the other parties on who
        is dropped, and check the range under MPC: (clients, kept indices, rows,
        local failures, dropped clients, range violators)."""
        from fedprompt.secure.mpc_kmeans import range_violations

        comm = self.crypten.comm.get()
        round_id = int(h["round"])
        dim = int(h["dim"])
        clients = [int(c) for c in h["clients"]]
        sizes = [int(s) for s in h["sizes"]]
        if len(sizes) != len(clients) or sum(sizes) != len(payload):
            raise ShareRejected("request payload does not match its size list")
        rows: list[np.ndarray] = []
        local_bad: dict[int, str] = {}
        used: list[bytes] = []
        offset = 0
        for cid, size in zip(clients, sizes, strict=True):
            part = payload[offset: offset + size]
            offset += size
            digest = self._digest(part)
            try:
                if digest in self.seen or digest in used:
                    raise ShareRejected("this sealed share was already used (replayed)")
                rows.append(open_part(part, self.key, self.rank, round_id, cid, dim,
                                      self.parties))
                used.append(digest)
            except ShareRejected as exc:
                local_bad[cid] = str(exc)
                rows.append(np.zeros(dim, dtype=np.int64))
        self._remember(used)
        # every party must drop the same clients: agree on the union of local failures
        flags = torch.tensor([1 if c in local_bad else 0 for c in clients], dtype=torch.long)
        agreed = comm.all_reduce(flags) if clients else flags
        keep = [i for i in range(len(clients)) if int(agreed[i]) == 0]
        dropped = [clients[i] for i in range(len(clients)) if int(agreed[i])]
        range_bad: list[int] = []
        if keep and bool(h.get("verify_range", True)):
            share = torch.from_numpy(np.stack([rows[i] for i in keep]))
            x = self.crypten.mpc.MPCTensor.from_shares(share, precision=16)
            violated = self._phase(("range", len(keep), dim), tuple(share.shape),
                                   range_violations, x, stats)
            range_bad = [clients[keep[i]] for i in np.flatnonzero(violated)]
            keep = [keep[i] for i in range(len(keep)) if not violated[i]]
        return clients, keep, rows, local_bad, dropped, range_bad

    def _cluster(self, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """One clustering run: the DP releases are made whoever takes part (with nobody
        left, on one public zero row whose count is removed)."""
        from fedprompt.privacy.noise import SecureRandom
        from fedprompt.secure.control import pack_arrays
        from fedprompt.secure.kmeans import NoiseStds
        from fedprompt.secure.mpc_kmeans import secure_dp_kmeans

        comm = self.crypten.comm.get()
        comm.reset_communication_stats()
        started = time.perf_counter()
        stats: dict[str, float] = {}
        clients, keep, rows, local_bad, dropped, range_bad = self._inputs(h, payload, stats)
        dim, k_max, iterations = int(h["dim"]), int(h["k_max"]), int(h["iterations"])
        stds = NoiseStds(**{k: float(v) for k, v in h["stds"].items()})
        mpc = self.crypten.mpc.MPCTensor
        dummy = not keep
        share = (torch.zeros(1, dim, dtype=torch.long) if dummy
                 else torch.from_numpy(np.stack([rows[i] for i in keep])))
        x = mpc.from_shares(share, precision=16)
        noise = SecureRandom()  # this party's own noise stream, keyed from the OS
        outcome = self._phase(
            ("kmeans", int(share.shape[0]), dim, k_max, iterations), tuple(share.shape),
            lambda t: secure_dp_kmeans(t, k_max, iterations, int(h["seed"]),
                                       float(h["min_silhouette"]), stds, self.parties,
                                       noise, dummy=dummy), x, stats)
        releases = outcome.releases
        arrays = [*releases.sums, releases.last, releases.scores, outcome.counts,
                  outcome.criterion]
        if outcome.centres is not None:
            arrays.append(outcome.centres)
        shapes, data = pack_arrays(arrays)
        comm_stats = comm.get_communication_stats()
        stats.update(seconds=time.perf_counter() - started, comm_rounds=comm_stats["rounds"],
                     comm_bytes=float(comm_stats["bytes"]), comm_seconds=comm_stats["time"])
        return {"type": "result", "round": int(h["round"]), "rank": self.rank,
                "clients": [clients[i] for i in keep], "k": outcome.k,
                "labels": [int(v) for v in outcome.labels], "shapes": shapes,
                "has_centres": outcome.centres is not None,
                "rejected": {str(c): r for c, r in local_bad.items()},
                "dropped": dropped, "range_violations": range_bad, "stats": stats}, data

    def _assign(self, h: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
        """Labels of the clients against public centres (the payload's tail); nothing
        else is opened."""
        from fedprompt.secure.control import unpack_arrays
        from fedprompt.secure.mpc_kmeans import secure_assign

        comm = self.crypten.comm.get()
        comm.reset_communication_stats()
        started = time.perf_counter()
        stats: dict[str, float] = {}
        cut = len(payload) - 8 * int(np.prod(h["centres_shape"]))
        if cut < 0:
            raise ShareRejected("request payload is shorter than its centres")
        (centres,) = unpack_arrays([h["centres_shape"]], payload[cut:])
        clients, keep, rows, local_bad, dropped, range_bad = self._inputs(
            h, payload[:cut], stats)
        labels: list[int] = []
        if keep:
            share = torch.from_numpy(np.stack([rows[i] for i in keep]))
            x = self.crypten.mpc.MPCTensor.from_shares(share, precision=16)
            found = self._phase(("assign", len(keep), int(h["dim"]), centres.shape[0]),
                                tuple(share.shape), lambda t: secure_assign(t, centres), x,
                                stats)
            labels = [int(v) for v in found]
        comm_stats = comm.get_communication_stats()
        stats.update(seconds=time.perf_counter() - started, comm_rounds=comm_stats["rounds"],
                     comm_bytes=float(comm_stats["bytes"]), comm_seconds=comm_stats["time"])
        return {"type": "assigned", "round": int(h["round"]), "rank": self.rank,
                "clients": [clients[i] for i in keep], "labels": labels,
                "rejected": {str(c): r for c, r in local_bad.items()},
                "dropped": dropped, "range_violations": range_bad, "stats": stats}, b""


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedprompt.secure.party",
        description="A compute party (or the TTP) of fedprompt's secure clustering.")
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--rank", type=int, help="compute party rank, 0 .. parties-1")
    role.add_argument("--ttp", action="store_true", help="run CrypTen's trusted third party")
    parser.add_argument("--parties", type=int, required=True, help="number of compute parties")
    parser.add_argument("--rendezvous", required=True,
                        help="torch.distributed init method, e.g. tcp://10.0.0.1:29500")
    parser.add_argument("--listen", type=_parse_address, default=None,
                        help="HOST:PORT of the control channel (compute parties)")
    parser.add_argument("--key-file", type=Path, default=None,
                        help="this party's X25519 private key (created if missing)")
    parser.add_argument("--token-env", default=TOKEN_ENV,
                        help="environment variable holding the control-channel token")
    parser.add_argument("--gloo-timeout", type=float, default=DEFAULT_GLOO_TIMEOUT_S,
                        help="seconds a gloo wait may take (idle TTP included)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--supervise", action="store_true",
                        help="restart the worker whenever it exits non-zero")
    parser.add_argument("--restart-delay", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.parties < 2:
        parser.error("--parties must be at least 2")
    if not args.ttp:
        if not 0 <= args.rank < args.parties:
            parser.error(f"--rank must be in [0, {args.parties - 1}]")
        if args.listen is None or args.key_file is None:
            parser.error("a compute party needs --listen and --key-file")
    return args


def run_worker(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    name = "ttp" if args.ttp else f"party{args.rank}"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    if args.ttp:
        from fedprompt.secure.prefetch import run_batching_ttp_server

        init_crypten(args.parties, args.parties, args.rendezvous, args.gloo_timeout)
        try:
            with gloo_timeout(args.gloo_timeout):
                run_batching_ttp_server()
        except Exception:
            log.exception("TTP failed")
            return EXIT_ERROR
        return EXIT_OK
    token = os.environ.get(args.token_env, "")
    if len(token) < 16:
        log.error("the control-channel token (environment variable %s) is missing or "
                  "shorter than 16 characters", args.token_env)
        return EXIT_ERROR
    key = load_or_create_key(args.key_file)
    listener = socket.create_server(args.listen, reuse_port=False)
    port = listener.getsockname()[1]
    crypten = init_crypten(args.rank, args.parties, args.rendezvous, args.gloo_timeout)
    party = ComputeParty(args.rank, args.parties, key, token, listener, crypten,
                         args.key_file.with_suffix(".used"))
    print(json.dumps({"event": "ready", "rank": args.rank, "control_port": port,
                      "public_key": party.public_key.hex()}), flush=True)
    try:
        return party.serve()
    except Exception:
        log.exception("party %d failed", args.rank)
        return EXIT_ERROR


def supervise(argv: list[str], delay: float) -> int:
    """Run the worker in a child process, restarting it when it exits non-zero."""
    stop = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker_argv = [a for a in argv if a != "--supervise"]
    while True:
        child = subprocess.Popen([sys.executable, "-m", "fedprompt.secure.party",
                                  *worker_argv])
        code = child.wait()
        if stop.is_set() or code == EXIT_OK:
            return code
        print(f"fedprompt party worker exited with code {code}; restarting in {delay} s",
              file=sys.stderr, flush=True)
        if stop.wait(delay):
            return code


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.supervise:
        return supervise(raw, args.restart_delay)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
