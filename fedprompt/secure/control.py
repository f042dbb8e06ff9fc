"""The control channel between the server (relay) and each compute party.

Length-prefixed messages over TCP: ``u32 header length | u64 payload length | header
(UTF-8 JSON object) | payload bytes``. Every read has a deadline. On connect both sides
prove knowledge of a shared token (HMAC-SHA256 over fresh nonces, both directions), so
neither a stray process nor a wrong party can take part. The channel carries no secret
in the clear: shares are end-to-end encrypted to each party (:mod:`sealing`), and what a
party returns (k, assignments, noisy sums) is what the server learns anyway. Run it over
a private network or a TLS tunnel in a deployment to keep it from third parties.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedprompt.secure.errors import ClusteringError

PROTOCOL = "fedprompt-secure-clustering/2"  # 2: DP spherical k-means, releases
_PREFIX = struct.Struct("<IQ")
MAX_HEADER = 16 << 20
MAX_PAYLOAD = 1 << 32


class ChannelError(ClusteringError):
    """The peer closed the connection, sent garbage, failed authentication or timed out."""


class AuthenticationFailed(ChannelError):
    """The two ends do not share the control-channel token (retrying cannot help)."""


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    """``n`` bytes; ``deadline`` (time.monotonic) None waits without limit (a party idle
    between rounds)."""
    chunks = []
    got = 0
    while got < n:
        if deadline is None:
            sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChannelError(f"timed out waiting for {n - got} more bytes")
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError as exc:
            raise ChannelError(f"timed out waiting for {n - got} more bytes") from exc
        except OSError as exc:
            raise ChannelError(f"connection failed: {exc}") from exc
        if not chunk:
            raise ChannelError("the peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_message(sock: socket.socket, header: dict[str, Any], payload: bytes = b"",
                 timeout: float = 60.0) -> None:
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.settimeout(timeout)
    try:
        sock.sendall(_PREFIX.pack(len(data), len(payload)) + data)
        if payload:
            sock.sendall(payload)
    except OSError as exc:
        raise ChannelError(f"sending failed: {exc}") from exc


def recv_message(sock: socket.socket, timeout: float | None
                 ) -> tuple[dict[str, Any], bytes]:
    deadline = None if timeout is None else time.monotonic() + timeout
    head_len, payload_len = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size, deadline))
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise ChannelError(f"oversized message ({head_len} + {payload_len} bytes)")
    try:
        header = json.loads(_recv_exact(sock, head_len, deadline))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError(f"malformed message header: {exc}") from exc
    if not isinstance(header, dict) or "type" not in header:
        raise ChannelError("malformed message header: not an object with a type")
    payload = _recv_exact(sock, payload_len, deadline) if payload_len else b""
    return header, payload


def pack_arrays(arrays: Sequence[np.ndarray]) -> tuple[list[list[int]], bytes]:
    """Float64 arrays as (shapes, little-endian bytes) for a message payload."""
    shapes = [list(np.shape(a)) for a in arrays]
    data = b"".join(np.ascontiguousarray(a, dtype="<f8").tobytes() for a in arrays)
    return shapes, data


def unpack_arrays(shapes: Sequence[Sequence[int]], payload: bytes) -> list[np.ndarray]:
    """The arrays :func:`pack_arrays` packed; ChannelError if the sizes disagree."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if 8 * sum(sizes) != len(payload):
        raise ChannelError(f"payload of {len(payload)} bytes does not hold arrays of shapes "
                           f"{list(shapes)}")
    out, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(np.frombuffer(payload, dtype="<f8", count=size, offset=offset)
                   .reshape([int(d) for d in shape]).astype(np.float64))
        offset += 8 * size
    return out


def _mac(token: str, *parts: bytes) -> str:
    return hmac.new(token.encode(), b"|".join(parts), hashlib.sha256).hexdigest()


def party_handshake(sock: socket.socket, token: str, rank: int, public_key: bytes,
                    group: str, timeout: float) -> None:
    """Party side: challenge the server, then prove itself. ``group`` identifies the
    CrypTen group the party belongs to (all parties of a working group share it).
    Raises ChannelError."""
    nonce = secrets.token_bytes(16)
    send_message(sock, {"type": "challenge", "protocol": PROTOCOL, "nonce": nonce.hex()},
                 timeout=timeout)
    reply, _ = recv_message(sock, timeout)
    if reply.get("type") != "auth" or not hmac.compare_digest(
            str(reply.get("mac", "")), _mac(token, b"server", nonce)):
        with contextlib.suppress(ChannelError):
            send_message(sock, {"type": "refused", "message": "authentication failed: the "
                                "server does not hold this party's control token"},
                         timeout=timeout)
        raise AuthenticationFailed("the server failed authentication (wrong token?)")
    server_nonce = bytes.fromhex(str(reply.get("nonce", "")))
    send_message(sock, {"type": "hello", "protocol": PROTOCOL, "rank": rank,
                        "public_key": public_key.hex(), "group": group,
                        "mac": _mac(token, b"party", server_nonce, str(rank).encode(),
                                    public_key, group.encode())}, timeout=timeout)


def server_handshake(sock: socket.socket, token: str, timeout: float
                     ) -> tuple[int, bytes, str]:
    """Server side: answer the party's challenge, check its proof; returns (rank, public
    key, group). Raises ChannelError."""
    challenge, _ = recv_message(sock, timeout)
    if challenge.get("type") != "challenge" or challenge.get("protocol") != PROTOCOL:
        raise ChannelError(f"unexpected greeting {challenge.get('type')!r} "
                           f"(protocol {challenge.get('protocol')!r}, want {PROTOCOL})")
    nonce = bytes.fromhex(str(challenge.get("nonce", "")))
    server_nonce = secrets.token_bytes(16)
    send_message(sock, {"type": "auth", "mac": _mac(token, b"server", nonce),
                        "nonce": server_nonce.hex()}, timeout=timeout)
    hello, _ = recv_message(sock, timeout)
    if hello.get("type") == "refused":
        raise AuthenticationFailed(f"a party refused the connection: {hello.get('message')} "
                                   "(check ClusteringSettings.auth_token)")
    try:
        rank = int(hello["rank"])
        public_key = bytes.fromhex(hello["public_key"])
        group = str(hello["group"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ChannelError(f"malformed hello from a party: {exc}") from exc
    expected = _mac(token, b"party", server_nonce, str(rank).encode(), public_key,
                    group.encode())
    if hello.get("type") != "hello" or not hmac.compare_digest(str(hello.get("mac", "")),
                                                               expected):
        raise AuthenticationFailed(f"party {rank} failed authentication (wrong token?)")
    return rank, public_key, group
