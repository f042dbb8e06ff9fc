"""Compatibility mode: talk to existing Secure Minions servers over their published protocol.

``SecureMinionsCompatClient`` speaks the wire protocol of HazyResearch/minions'
``secure/remote/worker_server.py`` (see ``docs/minion.md``):

* ``GET /attestation`` -> ``report`` / ``report_json`` (compact JSON signed with ECDSA
  P-384/SHA-256 by the attestation key), ``signature``, ``public_key_worker`` (PEM, the
  server's static P-384 key), ``gpu_eat`` (JSON string of NVIDIA tokens), ``nonce_b64``;
* ECDH P-384 with a fresh client key per session, HKDF-SHA256 (salt None, info
  ``b"handshake data"``, 32 bytes) -> AES-256-GCM key (random 12-byte IV, no AAD);
* ``POST /message`` and ``POST /message_stream`` with ``{"peer_public_key", "session_id",
  "payload": {"nonce", "iv", "ciphertext", "signature"}}``; every payload is signed with
  ECDSA-SHA256 over ``nonce(8 B, big endian) || iv || ciphertext`` by the sender's ECDH key;
  the plaintext request is the whole conversation as a JSON array, the response the raw
  model text; the stream is NDJSON of signed payloads ending with a plain ``{"eos": true}``.

That protocol has weaknesses our own channel (:mod:`fedprompt.minion.secure_client`) does not
(:data:`WEAKNESSES`); the first use in a process emits one
:class:`SecureMinionsCompatWarning` (and a log record) listing them. Within what stays
compatible this client adds checks the reference client lacks: the attestation key pin and
``pubkey_hash``, the report's ``nonce``/``gpu_eat_hash``/freshness window, a never-reused
server nonce, the GPU tokens' ``eat_nonce`` and verified claims (signature verification of
those tokens is delegated to ``tee_verifier``: without one the client refuses unless
``allow_unverified_tee_tokens=True``), an optional out-of-band pin of the server's static key,
the TLS pin checked on the very connection that carries each request, strictly increasing
server counters across responses and consecutive counters within a stream, a required
end-of-stream marker, nothing accepted after it, and every failure raised
(:class:`CompatError` subclasses), never returned as model text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import ssl
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.errors import FedPromptError
from fedprompt.minion.usage import Usage

logger = logging.getLogger(__name__)

HKDF_INFO = b"handshake data"
CLIENT_INITIAL_COUNTER = 1000
IV_BYTES = 12
TAG_BYTES = 16
DEFAULT_MAX_ATTESTATION_AGE_S = 300.0
DEFAULT_CLOCK_SKEW_S = 5.0
GPU_VERIFIED_CLAIM = "x-nvidia-gpu-attestation-report-signature-verified"
SNP_MEASUREMENT_CLAIM = "x-ms-sevsnpvm-launchmeasurement"

WEAKNESSES: tuple[str, ...] = (
    "the server's channel key (public_key_worker) is not inside the signed attestation "
    "report, so a genuine report can front any key; the attestation nonce is chosen by the "
    "server, not the client",
    "no replay protection on the server: an identical /message is accepted twice and "
    "counters are signed but never checked",
    "streaming counters collide: chunk k uses initial+k, overlapping the next request",
    "the end of a stream ({\"eos\": true}) is unauthenticated, so an on-path attacker "
    "can truncate a stream undetected",
    "the reference client accepts a GPU token verified only by the x5c leaf inside it (no "
    "chain check), never verifies platform_token, and does not bind the SNP report to the "
    "session",
    "the reference implementation returns errors as text ('Invalid Signature') instead of "
    "raising; the server answers them with HTML 500",
    "the server's ECDH/ECDSA key is static and stored unencrypted on disk: no forward "
    "secrecy",
    "the reference client checks the TLS pin on a separate connection (TOCTOU)",
    "AES-GCM without associated data: direction and counter are not bound to the "
    "ciphertext",
)


class SecureMinionsCompatWarning(UserWarning):
    """Emitted once per process when the Secure Minions compatibility protocol is first used."""


_warned = False
_warn_lock = threading.Lock()


def weakness_report() -> str:
    lines = "\n".join(f"  {i}. {w}" for i, w in enumerate(WEAKNESSES, 1))
    return (
        "Secure Minions compatibility mode: the published Secure Minions protocol (a research "
        "prototype, not audited) has known weaknesses; prefer fedprompt's own channel "
        f"(SecureChatClient) where the server supports it:\n{lines}"
    )


def warn_once() -> bool:
    """Warn (and log) the protocol's weaknesses once per process; True if it warned now."""
    global _warned
    with _warn_lock:
        if _warned:
            return False
        _warned = True
    text = weakness_report()
    logger.warning(text)
    warnings.warn(text, SecureMinionsCompatWarning, stacklevel=3)
    return True


def _reset_warning_for_tests() -> None:
    global _warned
    with _warn_lock:
        _warned = False


# --------------------------------------------------------------------------- errors

class CompatError(FedPromptError):
    """Base class of every compatibility-mode failure."""


class CompatAttestationError(CompatError):
    """The server's attestation was rejected; nothing was sent to it."""


class CompatSignatureError(CompatError):
    """An ECDSA signature (report or payload) did not verify."""


class CompatDecryptionError(CompatError):
    """AES-GCM authentication failed: the ciphertext or IV was tampered with."""


class CompatReplayError(CompatError):
    """A server counter was not strictly increasing (replayed or reordered payload)."""


class CompatStreamError(CompatError):
    """A stream was truncated (no end marker), had a gap, or continued after its end."""


class CompatServerError(CompatError):
    """The server answered outside the protocol (HTTP error, malformed JSON)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- primitives

def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(value: Any, name: str, error: type[CompatError] = CompatServerError) -> bytes:
    if not isinstance(value, str):
        raise error(f"field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise error(f"field {name!r} is not valid base64") from exc


def spki_der(key: ec.EllipticCurvePublicKey | Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def spki_hash_b64(key: Any) -> str:
    """Base64 SHA-256 of a public key's DER SubjectPublicKeyInfo (the protocol's key hash)."""
    return _b64e(hashlib.sha256(spki_der(key)).digest())


def pem_public_key(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_p384_public_key(pem: str | bytes, name: str,
                         error: type[CompatError] = CompatServerError
                         ) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError) as exc:
        raise error(f"{name} is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                       ec.SECP384R1):
        raise error(f"{name} must be an EC P-384 (secp384r1) key")
    return key


def derive_key(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """ECDH P-384, then HKDF-SHA256 (salt None, info ``b"handshake data"``, 32 bytes)."""
    shared = private.exchange(ec.ECDH(), peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(shared)


def _signed_bytes(counter: int, iv: bytes, ciphertext: bytes) -> bytes:
    return counter.to_bytes(8, "big") + iv + ciphertext


def encrypt_and_sign(plaintext: str, key: bytes, signing_key: ec.EllipticCurvePrivateKey,
                     counter: int) -> dict[str, Any]:
    """One protocol payload: AES-256-GCM (random IV, no AAD), ECDSA-SHA256 signature."""
    iv = os.urandom(IV_BYTES)
    ciphertext = AESGCM(key).encrypt(iv, plaintext.encode("utf-8"), None)
    signature = signing_key.sign(_signed_bytes(counter, iv, ciphertext),
                                 ec.ECDSA(hashes.SHA256()))
    return {"nonce": counter, "iv": _b64e(iv), "ciphertext": _b64e(ciphertext),
            "signature": _b64e(signature)}


def decrypt_and_verify(payload: Any, key: bytes,
                       verifying_key: ec.EllipticCurvePublicKey) -> tuple[int, str]:
    """Verify and decrypt one payload; return ``(counter, plaintext)``. Raises on any failure."""
    if not isinstance(payload, dict):
        raise CompatServerError("encrypted payload must be a JSON object")
    counter = payload.get("nonce")
    if not isinstance(counter, int) or isinstance(counter, bool) or not 0 <= counter < 2**64:
        raise CompatServerError(f"payload counter {counter!r} is not a 64-bit unsigned int")
    iv = _b64d(payload.get("iv"), "iv")
    ciphertext = _b64d(payload.get("ciphertext"), "ciphertext")
    signature = _b64d(payload.get("signature"), "signature")
    if len(iv) != IV_BYTES:
        raise CompatServerError(f"payload IV must be {IV_BYTES} bytes, got {len(iv)}")
    if len(ciphertext) < TAG_BYTES:
        raise CompatServerError("payload ciphertext is shorter than the GCM tag")
    try:
        verifying_key.verify(signature, _signed_bytes(counter, iv, ciphertext),
                             ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise CompatSignatureError(f"payload {counter}: signature does not verify") from exc
    try:
        plaintext = AESGCM(key).decrypt(iv, ciphertext, None)
    except InvalidTag as exc:
        raise CompatDecryptionError(f"payload {counter}: AES-GCM tag does not verify") from exc
    try:
        return counter, plaintext.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CompatServerError(f"payload {counter}: plaintext is not UTF-8") from exc


def jwt_claims(token: Any, name: str) -> dict[str, Any]:
    """The claims of a JWT, **unverified** (signature checks belong to ``tee_verifier``)."""
    if not isinstance(token, str) or token.count(".") != 2:
        raise CompatAttestationError(f"{name} is not a JWT")
    part = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise CompatAttestationError(f"{name} has an unreadable claim set") from exc
    if not isinstance(claims, dict):
        raise CompatAttestationError(f"{name} claims must be a JSON object")
    return claims


# --------------------------------------------------------------------------- attestation

@dataclass(frozen=True)
class CompatAttestation:
    """What ``GET /attestation`` returned, after the checks of :meth:`verify` passed."""

    report: dict[str, Any]
    report_json: bytes
    nonce: bytes
    gpu_eat: dict[str, Any]
    server_key: ec.EllipticCurvePublicKey
    timestamp: float


TeeVerifier = Callable[[CompatAttestation], None]


@dataclass
class CompatSession:
    session_id: str
    private_key: ec.EllipticCurvePrivateKey
    aes_key: bytes
    attestation: CompatAttestation
    established_at: float
    next_counter: int = CLIENT_INITIAL_COUNTER
    last_server_counter: int = -1
    timing: dict[str, float] = field(default_factory=dict)


def _read_pem(value: str | bytes | Path) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Path) or "-----BEGIN" not in value:
        return Path(value).read_bytes()
    return value.encode("ascii")


_TLS_HASH_EXTENSION = "fedprompt.tls_spki_sha256"


def _record_peer_spki(resp: httpx.Response) -> None:
    """httpx response hook: read the peer certificate while the connection is still open
    (a server that closes after the body would otherwise leave nothing to check)."""
    seen = peer_spki_hash_b64(resp)
    if seen is not None:
        resp.extensions[_TLS_HASH_EXTENSION] = seen


def peer_spki_hash_b64(resp: httpx.Response) -> str | None:
    """Base64 SHA-256 of the SPKI of the TLS certificate on the connection of ``resp``."""
    recorded = resp.extensions.get(_TLS_HASH_EXTENSION)
    if isinstance(recorded, str):
        return recorded
    stream = resp.extensions.get("network_stream")
    if stream is None:
        return None
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(True)  # ssl.SSLObject or the low-level _SSLSocket
    if not der:
        return None
    return spki_hash_b64(x509.load_der_x509_certificate(der).public_key())


class SecureMinionsCompatClient:
    """Remote client for existing Secure Minions servers (``chat(messages) -> (texts, usage)``).

    ``trusted_attestor_pem``: the attestation public key (PEM text, bytes or a path) obtained
    out of band; the signed report must verify under it and name its hash. ``tee_verifier``
    verifies the TEE tokens' signatures (NVIDIA NRAS / Azure MAA); without one the client
    refuses unless ``allow_unverified_tee_tokens=True`` (tests, or where that trust gap is
    accepted). ``server_key_pem`` optionally pins the server's static channel key out of band
    (the report does not bind it). ``check_tls_pin`` compares the report's ``tls_pubkey_hash``
    with the certificate of the connection that carries each response; it needs real TLS, so
    it is off by default only when ``http_client`` is injected.
    """

    def __init__(
        self,
        endpoint_url: str,
        trusted_attestor_pem: str | bytes | Path,
        *,
        tee_verifier: TeeVerifier | None = None,
        allow_unverified_tee_tokens: bool = False,
        vm_launch_measurement: str | None = None,
        server_key_pem: str | bytes | Path | None = None,
        check_tls_pin: bool | None = None,
        ca_cert: str | Path | None = None,
        max_attestation_age_s: float = DEFAULT_MAX_ATTESTATION_AGE_S,
        session_timeout_s: float = 3600.0,
        timeout_s: float = 600.0,
        http_client: httpx.Client | None = None,
        model_name: str = "secure-model",
    ) -> None:
        if tee_verifier is None and not allow_unverified_tee_tokens:
            raise CompatAttestationError(
                "no tee_verifier given: the GPU/SNP tokens' signatures would go unverified; "
                "pass a verifier (NRAS/MAA) or allow_unverified_tee_tokens=True explicitly")
        if http_client is None and not endpoint_url.startswith("https://"):
            raise CompatServerError(f"the Secure Minions URL must be https://, got "
                                    f"{endpoint_url!r}")
        self.attestor_key = load_p384_public_key(_read_pem(trusted_attestor_pem),
                                                 "trusted attestation key",
                                                 CompatAttestationError)
        self.server_key_pin = (None if server_key_pem is None else spki_hash_b64(
            load_p384_public_key(_read_pem(server_key_pem), "pinned server key",
                                 CompatAttestationError)))
        self.tee_verifier = tee_verifier
        self.vm_launch_measurement = vm_launch_measurement
        self.check_tls_pin = (http_client is None) if check_tls_pin is None else check_tls_pin
        self.max_attestation_age_s = max_attestation_age_s
        self.session_timeout_s = session_timeout_s
        self.model_name = model_name
        if http_client is None:
            tls = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
            http_client = httpx.Client(base_url=endpoint_url, verify=tls, timeout=timeout_s)
        if self.check_tls_pin:
            http_client.event_hooks["response"] = [*http_client.event_hooks["response"],
                                                   _record_peer_spki]
        self._http = http_client
        self._session: CompatSession | None = None
        self._seen_nonces: set[bytes] = set()
        self._lock = threading.RLock()

    @property
    def session(self) -> CompatSession | None:
        return self._session

    # -- attestation --------------------------------------------------------
    def verify(self, data: Any, tls_hash: str | None, now: float | None = None
               ) -> CompatAttestation:
        """Every check that the published protocol permits; raise on the first failure."""
        err = CompatAttestationError
        if not isinstance(data, dict):
            raise err("attestation response must be a JSON object")
        report_json_s = data.get("report_json")
        if not isinstance(report_json_s, str):
            raise err("attestation response lacks the signed 'report_json' string")
        report_json = report_json_s.encode("utf-8")
        signature = _b64d(data.get("signature"), "signature", err)
        try:
            self.attestor_key.verify(signature, report_json, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise CompatSignatureError(
                "attestation report signature does not verify under the pinned attestation "
                "key") from exc
        try:
            report = json.loads(report_json)
        except ValueError as exc:
            raise err("signed report_json is not JSON") from exc
        if not isinstance(report, dict):
            raise err("signed report must be a JSON object")
        if report.get("pubkey_hash") != spki_hash_b64(self.attestor_key):
            raise err("report pubkey_hash does not name the pinned attestation key")
        nonce = _b64d(data.get("nonce_b64"), "nonce_b64", err)
        if len(nonce) != 32 or report.get("nonce") != _b64e(nonce):
            raise err("report nonce does not match the 32-byte nonce_b64")
        if nonce in self._seen_nonces:
            raise CompatReplayError("attestation nonce was already used: replayed report")
        timestamp = report.get("timestamp")
        if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            raise err("report timestamp must be a number")
        age = (time.time() if now is None else now) - float(timestamp)
        if age > self.max_attestation_age_s or age < -DEFAULT_CLOCK_SKEW_S:
            raise err(f"attestation report is {age:.1f} s old; allowed window is "
                      f"[-{DEFAULT_CLOCK_SKEW_S}, {self.max_attestation_age_s}] s")
        gpu_eat_s = data.get("gpu_eat")
        if not isinstance(gpu_eat_s, str):
            raise err("attestation response lacks the 'gpu_eat' string")
        if report.get("gpu_eat_hash") != _b64e(hashlib.sha256(gpu_eat_s.encode()).digest()):
            raise err("report gpu_eat_hash does not match gpu_eat")
        try:
            gpu_eat = json.loads(gpu_eat_s)
        except ValueError as exc:
            raise err("gpu_eat is not JSON") from exc
        if not isinstance(gpu_eat, dict) or not isinstance(gpu_eat.get("gpu_token"), dict) \
                or not gpu_eat["gpu_token"]:
            raise err("gpu_eat must hold a non-empty 'gpu_token' object")
        for gpu_id, token in gpu_eat["gpu_token"].items():
            claims = jwt_claims(token, f"GPU token {gpu_id}")
            if claims.get("eat_nonce") != nonce.hex():
                raise err(f"GPU token {gpu_id} answers another nonce")
            if claims.get(GPU_VERIFIED_CLAIM) is not True:
                raise err(f"GPU token {gpu_id} does not claim a verified attestation report")
            exp = claims.get("exp")
            if isinstance(exp, int | float) and exp < (time.time() if now is None else now):
                raise err(f"GPU token {gpu_id} has expired")
        if self.vm_launch_measurement is not None:
            snp = jwt_claims(report.get("snp_attestation_token"), "SNP token")
            if snp.get("x-ms-attestation-type") != "sevsnpvm":
                raise err("SNP token is not an SEV-SNP VM attestation")
            if snp.get(SNP_MEASUREMENT_CLAIM) != self.vm_launch_measurement:
                raise err("SNP launch measurement differs from the expected one")
        if self.check_tls_pin:
            if tls_hash is None:
                raise err("no TLS certificate on the attestation connection to check the pin")
            if not hmac.compare_digest(str(report.get("tls_pubkey_hash")), tls_hash):
                raise err("report tls_pubkey_hash does not match this connection's certificate")
        server_pem = data.get("public_key_worker")
        if not isinstance(server_pem, str):
            raise err("attestation response lacks 'public_key_worker'")
        server_key = load_p384_public_key(server_pem, "public_key_worker", err)
        if self.server_key_pin is not None and spki_hash_b64(server_key) != self.server_key_pin:
            raise err("public_key_worker differs from the pinned server key")
        att = CompatAttestation(report, report_json, nonce, gpu_eat, server_key,
                                float(timestamp))
        if self.tee_verifier is not None:
            try:
                self.tee_verifier(att)
            except CompatError:
                raise
            except Exception as exc:
                raise err(f"TEE token verification failed: {exc}") from exc
        self._seen_nonces.add(nonce)
        return att

    def attest(self) -> CompatSession:
        """Fetch and verify a fresh report, then make a fresh ephemeral ECDH key."""
        warn_once()
        with self._lock:
            self._session = None
            t0 = time.perf_counter()
            resp = self._http.get("/attestation")
            self._check_http(resp)
            t1 = time.perf_counter()
            att = self.verify(self._json(resp), peer_spki_hash_b64(resp))
            t2 = time.perf_counter()
            private = ec.generate_private_key(ec.SECP384R1())
            key = derive_key(private, att.server_key)
            t3 = time.perf_counter()
            self._session = CompatSession(
                str(uuid.uuid4()), private, key, att, time.monotonic(),
                timing={"attestation_request_s": t1 - t0, "attestation_verify_s": t2 - t1,
                        "key_exchange_s": t3 - t2})
            return self._session

    def _ensure_session(self) -> CompatSession:
        s = self._session
        if s is None or time.monotonic() - s.established_at > self.session_timeout_s:
            s = self.attest()
        return s

    # -- messages -----------------------------------------------------------
    @staticmethod
    def _wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) \
                    or not isinstance(m.get("role"), str):
                raise CompatError(f"message {i} needs string 'role' and 'content'")
            item = {"role": m["role"], "content": m["content"]}
            if isinstance(m.get("image_url"), str):
                item["image_url"] = m["image_url"]
            out.append(item)
        return out

    def _request(self, session: CompatSession, messages: list[dict[str, Any]]
                 ) -> dict[str, Any]:
        counter = session.next_counter
        session.next_counter += 1
        payload = encrypt_and_sign(json.dumps(self._wire_messages(messages)), session.aes_key,
                                   session.private_key, counter)
        return {"peer_public_key": pem_public_key(session.private_key.public_key()),
                "session_id": session.session_id, "payload": payload}

    def _check_tls(self, session: CompatSession, resp: httpx.Response) -> None:
        if not self.check_tls_pin:
            return
        seen = peer_spki_hash_b64(resp)
        if seen is None or not hmac.compare_digest(
                seen, str(session.attestation.report.get("tls_pubkey_hash"))):
            raise CompatAttestationError(
                "the connection carrying this message does not present the attested TLS key")

    def _open(self, session: CompatSession, payload: Any, expected: int | None) -> str:
        counter, text = decrypt_and_verify(payload, session.aes_key,
                                           session.attestation.server_key)
        if expected is not None and counter != expected:
            raise CompatStreamError(f"stream chunk counter {counter}, expected {expected}: "
                                    "chunk dropped, reordered or replayed")
        if expected is None and counter <= session.last_server_counter:
            raise CompatReplayError(
                f"server counter {counter} is not above the last one "
                f"({session.last_server_counter}): replayed or reordered response")
        return text

    def send(self, messages: list[dict[str, Any]]) -> str:
        """``POST /message``: the whole conversation in, the raw model text out."""
        warn_once()
        with self._lock:
            session = self._ensure_session()
            try:
                resp = self._http.post("/message", json=self._request(session, messages))
                self._check_http(resp)
                self._check_tls(session, resp)
                payload = self._json(resp)
                text = self._open(session, payload, None)
                session.last_server_counter = int(payload["nonce"])
            except (CompatError, httpx.HTTPError):
                self._session = None
                raise
            return text

    def stream(self, messages: list[dict[str, Any]]) -> Iterator[str]:
        """``POST /message_stream``: yield decrypted deltas; raise unless ``eos`` arrives."""
        warn_once()
        with self._lock:
            session = self._ensure_session()
            body = self._request(session, messages)
            try:
                with self._http.stream("POST", "/message_stream", json=body) as resp:
                    if resp.status_code != 200:
                        resp.read()
                        self._check_http(resp)
                    self._check_tls(session, resp)
                    expected: int | None = None
                    ended = False
                    for line in resp.iter_lines():
                        if not line.strip():
                            continue
                        if ended:
                            raise CompatStreamError("data after the end-of-stream marker")
                        try:
                            item = json.loads(line)
                        except ValueError as exc:
                            raise CompatServerError("stream line is not JSON") from exc
                        if isinstance(item, dict) and item.get("eos") is True and len(item) == 1:
                            ended = True
                            continue
                        if isinstance(item, dict) and "error" in item:
                            raise CompatServerError(f"server stream error: {item['error']}")
                        text = self._open(session, item, expected)
                        counter = int(item["nonce"])
                        if expected is None:
                            session.last_server_counter = counter
                        expected = counter + 1
                        yield text
                    if not ended:
                        raise CompatStreamError(
                            "stream ended without its end-of-stream marker (truncated)")
            except (CompatError, httpx.HTTPError):
                self._session = None
                raise

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> tuple[list[str], Usage]:
        """Minion remote-client shape ``([text], usage)``; extra kwargs are ignored (the
        server takes none). Usage is estimated as the reference ``SecureClient`` does."""
        text = self.send(messages)
        prompt = sum(len(m.get("content", "")) for m in messages) // 4 + 3 * len(messages)
        return [text], Usage(completion_tokens=len(text) // 4, prompt_tokens=prompt)

    def close(self) -> None:
        self._session = None
        self._http.close()

    # -- http ---------------------------------------------------------------
    @staticmethod
    def _check_http(resp: httpx.Response) -> None:
        if resp.status_code != 200:
            ctype = resp.headers.get("content-type", "?").split(";")[0]
            raise CompatServerError(
                f"server answered HTTP {resp.status_code} ({ctype}); the Secure Minions "
                "server reports decryption and signature failures this way", resp.status_code)

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError as exc:
            raise CompatServerError("server response is not JSON") from exc
        if not isinstance(data, dict):
            raise CompatServerError("server response must be a JSON object")
        if "error" in data and "ciphertext" not in data:
            raise CompatServerError(f"server reported an error: {data['error']}")
        return data
