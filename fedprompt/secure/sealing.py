"""Client-side sealing of a reduced vector: fixed point, additive shares, one per compute
party, each encrypted to that party's X25519 public key. The server only relays bytes.

Sealed submission (all integers little-endian)::

    header  = "FPSS" | version u8 | parties u8 | round u64 | client i64 | dim u32
    part[i] = ephemeral X25519 public key (32) | nonce (12) | ChaCha20-Poly1305(share_i)

``share_i`` is ``dim`` uint64 values; the shares sum to the fixed-point encoding mod 2^64
(masks from the OS CSPRNG, so every share alone, and every set of fewer than all of them,
is uniformly random whatever the vector). The key of part ``i`` is
HKDF-SHA256(X25519(ephemeral, party_i), info = label | ephemeral pub | party pub), and the
AEAD's associated data is the header plus the party index, so a part cannot be replayed
into another round, client, party, size or party count without failing authentication.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.secure.clustering import ShareRejected
from fedprompt.secure.fixed_point import check_vector, encode

MAGIC = b"FPSS"
VERSION = 1
HEADER = struct.Struct("<4sBBQqI")  # magic, version, parties, round, client, dim
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_INFO = b"fedprompt secure-clustering share v1"


@dataclass(frozen=True)
class SealedHeader:
    parties: int
    round_id: int
    client_id: int
    dim: int


def part_size(dim: int) -> int:
    return KEY_BYTES + NONCE_BYTES + 8 * dim + TAG_BYTES


def sealed_size(dim: int, parties: int) -> int:
    return HEADER.size + parties * part_size(dim)


def public_key_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def material_keys(material: dict[str, bytes]) -> list[bytes]:
    """The compute parties' public keys in rank order, from client material."""
    try:
        parties = int(material["parties"].decode())
        keys = [bytes(material[f"party_key_{i}"]) for i in range(parties)]
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"secure clustering material is incomplete: {exc}") from exc
    if parties < 2 or any(len(k) != KEY_BYTES for k in keys):
        raise ValueError("secure clustering material has invalid party keys")
    return keys


def split_shares(encoded: np.ndarray, parties: int) -> list[np.ndarray]:
    """Additive shares mod 2^64 (uint64) of an int64 vector; masks from ``secrets``."""
    target = encoded.astype(np.int64).view(np.uint64)
    masks = [np.frombuffer(secrets.token_bytes(8 * len(target)), dtype="<u8").copy()
             for _ in range(parties - 1)]
    first = target.copy()
    for mask in masks:
        first -= mask  # uint64 arithmetic wraps mod 2^64
    return [first, *masks]


def _aad(header: bytes, party: int) -> bytes:
    return header + struct.pack("<B", party)


def _key(shared: bytes, eph_pub: bytes, party_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_INFO + eph_pub + party_pub).derive(shared)


def seal_vector(vector: np.ndarray, material: dict[str, bytes], round_id: int,
                client_id: int) -> bytes:
    """Client side: check range, encode, share and encrypt (see the module docstring)."""
    keys = material_keys(material)
    dim = int(material["dim"].decode())
    arr = check_vector(vector, dim, who=f"client {client_id}'s vector")
    return seal_encoded(encode(arr), keys, round_id, client_id)


def seal_encoded(encoded: np.ndarray, keys: list[bytes], round_id: int,
                 client_id: int) -> bytes:
    """Share and encrypt an already encoded (int64) vector. No range check: for tests
    that play a client who skips it (the compute parties' MPC range check must catch it)."""
    dim = len(encoded)
    shares = split_shares(np.asarray(encoded, dtype=np.int64), len(keys))
    header = HEADER.pack(MAGIC, VERSION, len(keys), round_id, client_id, dim)
    parts = [header]
    for party, (pub, share) in enumerate(zip(keys, shares, strict=True)):
        eph = X25519PrivateKey.generate()
        eph_pub = public_key_bytes(eph.public_key())
        key = _key(eph.exchange(X25519PublicKey.from_public_bytes(pub)), eph_pub, pub)
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = ChaCha20Poly1305(key).encrypt(nonce, share.astype("<u8").tobytes(),
                                           _aad(header, party))
        parts.append(eph_pub + nonce + ct)
    return b"".join(parts)


def parse_header(blob: bytes) -> SealedHeader:
    if not isinstance(blob, bytes | bytearray) or len(blob) < HEADER.size:
        raise ShareRejected("submission is too short to be a sealed share")
    magic, version, parties, rnd, cid, dim = HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION:
        raise ShareRejected("submission is not a sealed secure-clustering share (bad header)")
    return SealedHeader(parties, rnd, cid, dim)


def split_sealed(blob: bytes, round_id: int, client_id: int, dim: int,
                 parties: int) -> list[bytes]:
    """Server side (no key needed): check the envelope and cut it into one message per
    party (header + that party's part). Raises :class:`ShareRejected`."""
    head = parse_header(blob)
    if (head.round_id, head.client_id) != (round_id, client_id):
        raise ShareRejected(f"submission is for round {head.round_id}, client "
                            f"{head.client_id}; expected round {round_id}, client {client_id}")
    if (head.dim, head.parties) != (dim, parties):
        raise ShareRejected(f"submission has dim {head.dim} for {head.parties} parties; "
                            f"expected dim {dim} for {parties} parties")
    if len(blob) != sealed_size(dim, parties):
        raise ShareRejected(f"submission has {len(blob)} bytes, expected "
                            f"{sealed_size(dim, parties)} (dim {dim}, {parties} parties)")
    header = bytes(blob[: HEADER.size])
    size = part_size(dim)
    return [header + bytes(blob[HEADER.size + i * size: HEADER.size + (i + 1) * size])
            for i in range(parties)]


def open_part(message: bytes, private_key: X25519PrivateKey, party: int, round_id: int,
              client_id: int, dim: int, parties: int) -> np.ndarray:
    """Compute party side: decrypt this party's share (int64, the ring element).
    Raises :class:`ShareRejected` if anything does not match or authenticate."""
    head = parse_header(message)
    if (head.round_id, head.client_id, head.dim, head.parties) != (
            round_id, client_id, dim, parties):
        raise ShareRejected("share header does not match the round, client, dim or parties")
    if len(message) != HEADER.size + part_size(dim):
        raise ShareRejected(f"share part has {len(message) - HEADER.size} bytes, expected "
                            f"{part_size(dim)}")
    header = message[: HEADER.size]
    body = message[HEADER.size:]
    eph_pub = body[:KEY_BYTES]
    nonce = body[KEY_BYTES: KEY_BYTES + NONCE_BYTES]
    ct = body[KEY_BYTES + NONCE_BYTES:]
    own_pub = public_key_bytes(private_key.public_key())
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
        plain = ChaCha20Poly1305(_key(shared, eph_pub, own_pub)).decrypt(
            nonce, ct, _aad(header, party))
    except (InvalidTag, ValueError) as exc:
        raise ShareRejected(f"share for party {party} does not decrypt or authenticate "
                            f"({type(exc).__name__}): tampered, or sealed to another key") from exc
    return np.frombuffer(plain, dtype="<u8").astype(np.uint64).view(np.int64).copy()
