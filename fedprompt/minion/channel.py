"""The secure channel between a Minion client and an attested enclave server.

Protocol (suite ``fedprompt-minion-v1``):

1. The client makes a fresh X25519 key pair and a random 32-byte nonce, and sends both
   public values to the server's attestation endpoint.
2. The server makes a fresh X25519 key pair and a random session id for this session
   only (forward secrecy: nothing static is used for key agreement) and returns its public
   key with attestation evidence whose report data is :func:`binding_digest` over the
   session id, both public keys and the client's nonce.
3. Both sides derive two 32-byte keys with HKDF-SHA256 (one per direction) from the X25519
   shared secret, salted with the nonce and bound to the whole transcript.
4. Every frame is sealed with ChaCha20-Poly1305. The AEAD nonce is the direction tag plus a
   64-bit counter; the associated data binds the suite, session id, direction, frame kind
   and counter. The receiver accepts only the exact next counter of its direction, so a
   replayed, dropped or reordered frame is rejected. A stream ends with an authenticated
   ``END`` frame, so a truncated stream is detected.

Every failure raises a subclass of :class:`ChannelError`; nothing returns error text.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.errors import FedPromptError

SUITE = b"fedprompt-minion-v1"
NONCE_BYTES = 32
SESSION_ID_BYTES = 16
PUBLIC_KEY_BYTES = 32
TAG_BYTES = 16
MAX_COUNTER = 2**64 - 1


class ChannelError(FedPromptError):
    """Base class of every secure-channel failure."""


class HandshakeError(ChannelError, ValueError):
    """A handshake value (public key, nonce, session id) is malformed or unusable."""


class FrameFormatError(ChannelError, ValueError):
    """A frame is malformed (bad kind, counter or length) before any decryption."""


class DecryptionError(ChannelError):
    """A frame failed authentication: tampered, for another session, direction or kind."""


class ReplayError(ChannelError):
    """A frame's counter was already used in its direction (replayed or duplicated)."""


class OutOfOrderError(ChannelError):
    """A frame's counter skips ahead: a frame was dropped or frames were reordered."""


class TruncatedStreamError(ChannelError):
    """A stream ended without its authenticated end-of-stream frame."""


class StreamProtocolError(ChannelError):
    """A frame arrived where the stream grammar does not allow it (e.g. after END)."""


class RemoteError(ChannelError):
    """The peer reported a failure in an authenticated ERROR frame."""


class ChannelClosedError(ChannelError):
    """The channel was closed after a failure, or its counter space is exhausted."""


class Direction(enum.IntEnum):
    """Who sent a frame; each direction has its own key and counter space."""

    CLIENT_TO_SERVER = 1
    SERVER_TO_CLIENT = 2


class FrameKind(enum.IntEnum):
    """What a frame carries (authenticated through the associated data)."""

    MESSAGE = 1  # a whole request or response
    DATA = 2  # one chunk of a streamed response
    END = 3  # authenticated end of a streamed response (carries final metadata)
    ERROR = 4  # authenticated failure report from the peer; the receiver raises


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class Frame:
    """One sealed frame as it travels: counter and kind in clear, authenticated by the AAD."""

    counter: int
    kind: FrameKind
    ciphertext: bytes


def _check_len(name: str, value: bytes, expected: int) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != expected:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise HandshakeError(f"{name} must be {expected} bytes, got {got}")


def public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes, name: str = "public key") -> X25519PublicKey:
    _check_len(name, raw, PUBLIC_KEY_BYTES)
    return X25519PublicKey.from_public_bytes(bytes(raw))


def binding_digest(
    session_id: bytes, server_public_key: bytes, client_public_key: bytes, nonce: bytes
) -> bytes:
    """SHA-256 over the session transcript; attestation evidence must carry exactly this.

    It binds the server's channel key (so a genuine report cannot front another key) and the
    client's nonce (freshness), plus the session id and the client's key.
    """
    _check_len("session id", session_id, SESSION_ID_BYTES)
    _check_len("server public key", server_public_key, PUBLIC_KEY_BYTES)
    _check_len("client public key", client_public_key, PUBLIC_KEY_BYTES)
    _check_len("nonce", nonce, NONCE_BYTES)
    h = hashlib.sha256()
    for part in (SUITE, b"attestation-binding", session_id, server_public_key,
                 client_public_key, nonce):
        h.update(struct.pack(">I", len(part)))
        h.update(part)
    return h.digest()


@dataclass(frozen=True)
class SessionKeys:
    session_id: bytes
    client_to_server: bytes
    server_to_client: bytes


def derive_session_keys(
    shared_secret: bytes,
    *,
    session_id: bytes,
    server_public_key: bytes,
    client_public_key: bytes,
    nonce: bytes,
) -> SessionKeys:
    """HKDF-SHA256: one 32-byte key per direction, bound to the full transcript."""
    if shared_secret == bytes(len(shared_secret)):
        raise HandshakeError("X25519 produced an all-zero shared secret (low-order peer key)")
    transcript = binding_digest(session_id, server_public_key, client_public_key, nonce)
    okm = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=nonce, info=SUITE + b"/keys/" + transcript
    ).derive(shared_secret)
    return SessionKeys(session_id, okm[:32], okm[32:])


class SecureChannel:
    """One side of an established session: seals outgoing and opens incoming frames.

    Counters start at 0 in each direction and must advance by exactly one per frame.
    Thread-safe; after an authentication or ordering failure on the receive side the
    channel closes (fail closed) and every later call raises :class:`ChannelClosedError`.
    The server side passes ``close_on_error=False`` so that unauthenticated garbage sent by
    a third party cannot tear down a legitimate session; failed frames never advance it.
    """

    def __init__(self, keys: SessionKeys, role: Role, *, close_on_error: bool = True) -> None:
        self.session_id = keys.session_id
        self.role = role
        if role is Role.CLIENT:
            self._send_dir, self._recv_dir = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
            send_key, recv_key = keys.client_to_server, keys.server_to_client
        else:
            self._send_dir, self._recv_dir = Direction.SERVER_TO_CLIENT, Direction.CLIENT_TO_SERVER
            send_key, recv_key = keys.server_to_client, keys.client_to_server
        self._send_aead = ChaCha20Poly1305(send_key)
        self._recv_aead = ChaCha20Poly1305(recv_key)
        self._send_counter = 0
        self._recv_counter = 0
        self._close_on_error = close_on_error
        self._closed: str | None = None
        self._lock = threading.Lock()

    @property
    def next_send_counter(self) -> int:
        return self._send_counter

    @property
    def next_recv_counter(self) -> int:
        return self._recv_counter

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self, reason: str) -> None:
        self._closed = reason

    def _aad(self, direction: Direction, kind: FrameKind, counter: int) -> bytes:
        return SUITE + self.session_id + struct.pack(">BBQ", direction, kind, counter)

    @staticmethod
    def _nonce(direction: Direction, counter: int) -> bytes:
        return struct.pack(">IQ", direction, counter)

    def _check_open(self) -> None:
        if self._closed is not None:
            raise ChannelClosedError(f"channel is closed: {self._closed}")

    def seal(self, plaintext: bytes, kind: FrameKind = FrameKind.MESSAGE) -> Frame:
        kind = FrameKind(kind)
        with self._lock:
            self._check_open()
            counter = self._send_counter
            if counter >= MAX_COUNTER:
                self._closed = "send counter exhausted"
                raise ChannelClosedError("send counter exhausted; start a new session")
            ct = self._send_aead.encrypt(
                self._nonce(self._send_dir, counter), bytes(plaintext),
                self._aad(self._send_dir, kind, counter),
            )
            self._send_counter = counter + 1
        return Frame(counter, kind, ct)

    def _fail(self, error: ChannelError) -> ChannelError:
        if self._close_on_error:
            self._closed = f"{type(error).__name__}: {error}"
        return error

    def open(self, frame: Frame) -> bytes:
        """Authenticate and decrypt the next incoming frame, enforcing its counter."""
        with self._lock:
            self._check_open()
            try:
                kind = FrameKind(frame.kind)
            except ValueError as exc:
                raise self._fail(FrameFormatError(f"unknown frame kind {frame.kind!r}")) from exc
            counter = frame.counter
            if not isinstance(counter, int) or isinstance(counter, bool) or not (
                0 <= counter < MAX_COUNTER
            ):
                raise self._fail(FrameFormatError(f"counter {counter!r} out of range"))
            if len(frame.ciphertext) < TAG_BYTES:
                raise self._fail(FrameFormatError("ciphertext shorter than the AEAD tag"))
            if counter < self._recv_counter:
                raise self._fail(ReplayError(
                    f"{self._recv_dir.name} counter {counter} already used "
                    f"(expected {self._recv_counter}): replayed frame"))
            if counter > self._recv_counter:
                raise self._fail(OutOfOrderError(
                    f"{self._recv_dir.name} counter {counter} skips ahead "
                    f"(expected {self._recv_counter}): frame dropped or reordered"))
            try:
                plaintext = self._recv_aead.decrypt(
                    self._nonce(self._recv_dir, counter), bytes(frame.ciphertext),
                    self._aad(self._recv_dir, kind, counter),
                )
            except InvalidTag as exc:
                raise self._fail(DecryptionError(
                    f"frame {counter} ({kind.name}) failed authentication: tampered, or sealed "
                    "for another session, direction or kind")) from exc
            self._recv_counter = counter + 1
        return plaintext


class ClientHandshake:
    """Client side of the handshake: fresh key pair and nonce for one session."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public_key = public_bytes(self._private.public_key())
        self.nonce = os.urandom(NONCE_BYTES)

    def expected_binding(self, session_id: bytes, server_public_key: bytes) -> bytes:
        return binding_digest(session_id, server_public_key, self.public_key, self.nonce)

    def complete(self, session_id: bytes, server_public_key: bytes) -> SecureChannel:
        """Derive the session keys; call only after the attestation evidence verified."""
        _check_len("session id", session_id, SESSION_ID_BYTES)
        shared = self._private.exchange(load_public_key(server_public_key, "server public key"))
        keys = derive_session_keys(
            shared, session_id=session_id, server_public_key=server_public_key,
            client_public_key=self.public_key, nonce=self.nonce,
        )
        return SecureChannel(keys, Role.CLIENT)


@dataclass
class ServerHandshake:
    """Server side: a fresh key pair and session id per attestation request."""

    session_id: bytes
    server_public_key: bytes
    binding: bytes
    channel: SecureChannel

    @classmethod
    def accept(cls, client_public_key: bytes, nonce: bytes) -> ServerHandshake:
        _check_len("nonce", nonce, NONCE_BYTES)
        peer = load_public_key(client_public_key, "client public key")
        private = X25519PrivateKey.generate()
        server_public = public_bytes(private.public_key())
        session_id = os.urandom(SESSION_ID_BYTES)
        shared = private.exchange(peer)
        keys = derive_session_keys(
            shared, session_id=session_id, server_public_key=server_public,
            client_public_key=bytes(client_public_key), nonce=bytes(nonce),
        )
        return cls(
            session_id=session_id,
            server_public_key=server_public,
            binding=binding_digest(session_id, server_public, bytes(client_public_key),
                                   bytes(nonce)),
            channel=SecureChannel(keys, Role.SERVER, close_on_error=False),
        )


FRAME_HEADER = struct.Struct(">16sQB")  # session id, counter, kind
RECORD_LENGTH = struct.Struct(">I")  # length prefix of a frame inside a stream
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode_frame(session_id: bytes, frame: Frame) -> bytes:
    """Wire form of one frame: ``session_id(16) || counter(8, BE) || kind(1) || ciphertext``."""
    return FRAME_HEADER.pack(session_id, frame.counter, int(frame.kind)) + frame.ciphertext


def decode_frame(data: bytes) -> tuple[bytes, Frame]:
    """Parse :func:`encode_frame`'s output; raise :class:`FrameFormatError` when malformed."""
    if len(data) < FRAME_HEADER.size + TAG_BYTES:
        raise FrameFormatError(
            f"frame of {len(data)} B is shorter than header + tag "
            f"({FRAME_HEADER.size + TAG_BYTES} B)")
    session_id, counter, kind = FRAME_HEADER.unpack_from(data)
    try:
        frame_kind = FrameKind(kind)
    except ValueError as exc:
        raise FrameFormatError(f"unknown frame kind {kind}") from exc
    return session_id, Frame(counter, frame_kind, bytes(data[FRAME_HEADER.size:]))


def encode_record(session_id: bytes, frame: Frame) -> bytes:
    """One length-prefixed frame of a stream."""
    body = encode_frame(session_id, frame)
    return RECORD_LENGTH.pack(len(body)) + body


class RecordSplitter:
    """Split a byte stream into length-prefixed frames, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, Frame]]:
        self._buffer += data
        out: list[tuple[bytes, Frame]] = []
        while len(self._buffer) >= RECORD_LENGTH.size:
            (length,) = RECORD_LENGTH.unpack_from(self._buffer)
            if length > MAX_FRAME_BYTES:
                raise FrameFormatError(f"stream record of {length} B exceeds the limit")
            end = RECORD_LENGTH.size + length
            if len(self._buffer) < end:
                break
            out.append(decode_frame(bytes(self._buffer[RECORD_LENGTH.size:end])))
            del self._buffer[:end]
        return out

    def finish(self) -> None:
        if self._buffer:
            raise TruncatedStreamError(
                f"stream ended inside a record ({len(self._buffer)} B left over)")


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def open_stream(channel: SecureChannel, frames: Iterable[Frame]) -> Iterator[bytes]:
    """Yield the plaintext of DATA frames; return after the authenticated END frame.

    The END frame's plaintext is yielded last as well (so callers can read its metadata);
    use :class:`StreamReader` for typed access. Raises :class:`TruncatedStreamError` when
    the frames run out before END, :class:`StreamProtocolError` on anything after END.
    """
    reader = StreamReader(channel)
    for frame in frames:
        chunk = reader.feed(frame)
        if chunk is not None:
            yield chunk
    reader.finish()
    if reader.end_payload is not None:
        yield reader.end_payload


class StreamReader:
    """Incremental stream decoder: DATA* END, nothing after END, END required."""

    def __init__(self, channel: SecureChannel) -> None:
        self.channel = channel
        self.end_payload: bytes | None = None
        self.frames = 0

    def feed(self, frame: Frame) -> bytes | None:
        """Return a DATA frame's plaintext, or None for the END frame."""
        if self.end_payload is not None:
            self.channel.close("frame after end of stream")
            raise StreamProtocolError("frame received after the authenticated end of stream")
        plaintext = self.channel.open(frame)
        self.frames += 1
        kind = FrameKind(frame.kind)
        if kind is FrameKind.DATA:
            return plaintext
        if kind is FrameKind.END:
            self.end_payload = plaintext
            return None
        if kind is FrameKind.ERROR:
            raise RemoteError(plaintext.decode("utf-8", errors="replace"))
        self.channel.close(f"unexpected {kind.name} frame in stream")
        raise StreamProtocolError(f"unexpected {kind.name} frame inside a stream")

    def finish(self) -> bytes:
        if self.end_payload is None:
            self.channel.close("stream truncated")
            raise TruncatedStreamError(
                f"stream ended after {self.frames} frame(s) without its authenticated "
                "end-of-stream frame (truncated)")
        return self.end_payload
