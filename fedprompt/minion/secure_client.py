"""Client of the enclave server: attest first, then chat over the secure channel.

Nothing but the handshake values (a fresh X25519 public key and a random nonce) leaves
the client before the attestation evidence verifies: provider allowed (insecure mock only
with ``allow_insecure_mock=True``), nonce ours, evidence bound to the offered channel key
and session, fresh. Every violation raises; error text is never returned as model output.
After any channel failure the session is dropped and the next call re-attests.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedprompt.errors import FedPromptError
from fedprompt.minion.attestation import (
    DEFAULT_MAX_AGE_S,
    AttestationEvidence,
    AttestationVerifier,
    InsecureAttestationError,
    VerifiedAttestation,
    verify_evidence,
)
from fedprompt.minion.channel import (
    SUITE,
    ChannelError,
    ClientHandshake,
    DecryptionError,
    FrameKind,
    RecordSplitter,
    SecureChannel,
    StreamProtocolError,
    StreamReader,
    decode_frame,
    encode_frame,
)

_BINARY = {"content-type": "application/vnd.fedprompt.minion-frame"}


class SecureClientError(FedPromptError):
    """The server answered outside the protocol (HTTP error, malformed response)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SecureSession:
    session_id: bytes
    channel: SecureChannel
    attestation: VerifiedAttestation
    established_at: float
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SecureReply:
    content: str
    done_reason: str
    usage: dict[str, int]


def _b64d(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise SecureClientError(f"server response field {name!r} must be a base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise SecureClientError(f"server response field {name!r} is not valid base64") from exc


class SecureChatClient:
    """Attested, end-to-end encrypted chat with a :mod:`~fedprompt.minion.enclave_server`.

    ``base_url`` must be ``https://`` unless ``http_client`` is given (tests pass an
    in-process client). ``ca_cert`` pins the TLS trust anchor (e.g. the server's
    self-signed certificate); TLS protects metadata, the channel protects content.
    """

    def __init__(
        self,
        base_url: str,
        verifier: AttestationVerifier,
        *,
        allow_insecure_mock: bool = False,
        ca_cert: str | Path | None = None,
        max_attestation_age_s: float = DEFAULT_MAX_AGE_S,
        session_timeout_s: float = 3600.0,
        timeout_s: float = 600.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        if verifier.insecure and not allow_insecure_mock:
            raise InsecureAttestationError(
                "this verifier is INSECURE mock attestation; pass allow_insecure_mock=True "
                "only for tests and demos")
        if http_client is None and not base_url.startswith("https://"):
            raise SecureClientError(f"the enclave URL must be https://, got {base_url!r}")
        self.verifier = verifier
        self.allow_insecure_mock = allow_insecure_mock
        self.max_attestation_age_s = max_attestation_age_s
        self.session_timeout_s = session_timeout_s
        if http_client is None:
            tls = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
            http_client = httpx.Client(base_url=base_url, verify=tls, timeout=timeout_s)
        self._http = http_client
        self._session: SecureSession | None = None

    # -- session ------------------------------------------------------------
    @property
    def session(self) -> SecureSession | None:
        return self._session

    def attest(self) -> SecureSession:
        """Run a fresh handshake; raise unless the evidence verifies."""
        self._session = None
        t0 = time.perf_counter()
        hs = ClientHandshake()
        resp = self._post("/v1/attestation", {
            "nonce": base64.b64encode(hs.nonce).decode("ascii"),
            "client_public_key": base64.b64encode(hs.public_key).decode("ascii"),
        })
        t1 = time.perf_counter()
        data = self._json(resp)
        if data.get("suite") != SUITE.decode():
            raise SecureClientError(f"server speaks suite {data.get('suite')!r}, not {SUITE!r}")
        session_id = _b64d(data.get("session_id"), "session_id")
        server_pub = _b64d(data.get("server_public_key"), "server_public_key")
        evidence = AttestationEvidence.from_json(data.get("evidence"))
        verified = verify_evidence(
            evidence, self.verifier,
            expected_nonce=hs.nonce,
            expected_report_data=hs.expected_binding(session_id, server_pub),
            allow_insecure_mock=self.allow_insecure_mock,
            max_age_s=self.max_attestation_age_s,
        )
        t2 = time.perf_counter()
        channel = hs.complete(session_id, server_pub)
        t3 = time.perf_counter()
        self._session = SecureSession(
            session_id, channel, verified, time.monotonic(),
            {"attestation_request_s": t1 - t0, "attestation_verify_s": t2 - t1,
             "key_exchange_s": t3 - t2})
        return self._session

    def _ensure_session(self) -> SecureSession:
        s = self._session
        if (s is None or s.channel.closed
                or time.monotonic() - s.established_at > self.session_timeout_s):
            s = self.attest()
        return s

    # -- chat ---------------------------------------------------------------
    def _request_body(self, channel: SecureChannel, messages: list[dict[str, Any]],
                      params: dict[str, Any]) -> bytes:
        plaintext = json.dumps({"messages": messages, "params": params}).encode()
        return encode_frame(channel.session_id, channel.seal(plaintext, FrameKind.MESSAGE))

    @staticmethod
    def _check_session(channel: SecureChannel, session_id: bytes) -> None:
        if session_id != channel.session_id:
            raise DecryptionError("frame carries another session id")

    def send(self, messages: list[dict[str, Any]], **params: Any) -> SecureReply:
        """One encrypted request, one encrypted response."""
        session = self._ensure_session()
        channel = session.channel
        try:
            resp = self._post("/v1/message", self._request_body(channel, messages, params))
            session_id, frame = decode_frame(resp.content)
            self._check_session(channel, session_id)
            if frame.kind is not FrameKind.MESSAGE:
                raise StreamProtocolError(f"expected a MESSAGE frame, got {frame.kind.name}")
            payload = json.loads(channel.open(frame))
        except (ChannelError, SecureClientError, ValueError, httpx.HTTPError) as exc:
            channel.close(f"{type(exc).__name__}")
            self._session = None
            raise
        return _reply(payload)

    def stream(self, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        """Encrypted request; yield decrypted deltas; raise unless the END frame verifies."""
        session = self._ensure_session()
        channel = session.channel
        body = self._request_body(channel, messages, params)
        reader = StreamReader(channel)
        try:
            with self._http.stream("POST", "/v1/message/stream", content=body,
                                   headers=_BINARY) as resp:
                if resp.status_code != 200:
                    resp.read()
                    self._raise_http(resp)
                splitter = RecordSplitter()
                for data in resp.iter_bytes():
                    for session_id, frame in splitter.feed(data):
                        self._check_session(channel, session_id)
                        chunk = reader.feed(frame)
                        if chunk is not None:
                            delta = json.loads(chunk).get("delta")
                            if not isinstance(delta, str):
                                raise StreamProtocolError("DATA frame lacks a string delta")
                            yield delta
                splitter.finish()
            reader.finish()
        except (ChannelError, SecureClientError, ValueError, httpx.HTTPError) as exc:
            channel.close(f"{type(exc).__name__}")
            self._session = None
            raise

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> tuple[list[str],
                                                                           dict[str, int]]:
        """Minion remote-client shape: ``([text], usage)``."""
        reply = self.send(messages, **params)
        return [reply.content], reply.usage

    def close(self) -> None:
        self._session = None
        self._http.close()

    # -- http ---------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
        if isinstance(body, bytes):
            resp = self._http.post(path, content=body, headers=_BINARY)
        else:
            resp = self._http.post(path, json=body)
        if resp.status_code != 200:
            self._raise_http(resp)
        return resp

    @staticmethod
    def _raise_http(resp: httpx.Response) -> None:
        try:
            data = resp.json()
            reason = f"{data.get('error')}: {data.get('detail')}"
        except ValueError:
            reason = "no reason given"
        raise SecureClientError(f"server answered HTTP {resp.status_code} ({reason})",
                                resp.status_code)

    @staticmethod
    def _json(resp: httpx.Response) -> dict[str, Any]:
        try:
            data = resp.json()
        except ValueError as exc:
            raise SecureClientError("server response is not JSON") from exc
        if not isinstance(data, dict):
            raise SecureClientError("server response must be a JSON object")
        return data


def _reply(payload: Any) -> SecureReply:
    if not isinstance(payload, dict) or not isinstance(payload.get("content"), str):
        raise SecureClientError("decrypted response lacks string 'content'")
    usage = payload.get("usage") or {}
    if not isinstance(usage, dict):
        raise SecureClientError("decrypted response 'usage' must be an object")
    return SecureReply(payload["content"], str(payload.get("done_reason") or "stop"),
                       {str(k): int(v) for k, v in usage.items() if isinstance(v, int)})
