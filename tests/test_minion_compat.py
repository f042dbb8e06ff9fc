"""Compatibility mode: SecureMinionsCompatClient against an in-test Secure Minions server.

``ReferenceServer`` implements the published wire protocol (GET /attestation, POST /message,
POST /message_stream; ECDH P-384 + HKDF "handshake data" + AES-256-GCM, ECDSA-signed
payloads, client counters from 1000, server counters per peer from 3000, stream chunk k =
initial + k, a plain {"eos": true}) behind an httpx.MockTransport, with knobs for attacks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedprompt.minion import compat
from fedprompt.minion.compat import (
    WEAKNESSES,
    CompatAttestation,
    CompatAttestationError,
    CompatDecryptionError,
    CompatError,
    CompatReplayError,
    CompatServerError,
    CompatSignatureError,
    CompatStreamError,
    SecureMinionsCompatClient,
    SecureMinionsCompatWarning,
    decrypt_and_verify,
    derive_key,
    encrypt_and_sign,
    pem_public_key,
    spki_hash_b64,
)
from fedprompt.minion.enclave_server import write_self_signed_cert
from fedprompt.minion.usage import Usage

SECRET = "PATIENT-7731 has stage II carcinoma"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'ES384', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def echo_model(messages: list[dict[str, Any]]) -> str:
    return f"echo: {messages[-1]['content']}"


class ReferenceServer:
    """The Secure Minions worker server's wire behaviour, in process."""

    def __init__(self, model: Callable[[list[dict[str, Any]]], str] = echo_model) -> None:
        self.model = model
        self.attestation_key = ec.generate_private_key(ec.SECP384R1())
        self.worker_key = ec.generate_private_key(ec.SECP384R1())  # static, as published
        self.counters: dict[str, int] = {}
        self.received: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.last_response: dict[str, Any] | None = None
        # attack knobs
        self.fixed_nonce: bytes | None = None
        self.report_nonce_override: str | None = None
        self.gpu_nonce_override: str | None = None
        self.timestamp_offset = 0.0
        self.corrupt_report_signature = False
        self.front_key: ec.EllipticCurvePrivateKey | None = None
        self.replay_last = False
        self.wrong_aes_key = False
        self.flip_ciphertext = False
        self.stream_mode = "ok"  # ok | truncate | reorder | after_eos
        self.fail_message = False
        self.tls_pubkey_hash = "not-checked-over-mock-transport"

    @property
    def attestor_pem(self) -> str:
        return pem_public_key(self.attestation_key.public_key())

    def attestation(self) -> dict[str, Any]:
        nonce = self.fixed_nonce or os.urandom(32)
        gpu_eat = json.dumps({
            "platform_token": _jwt({"eat_nonce": nonce.hex()}),
            "gpu_token": {"GPU-0": _jwt({
                "eat_nonce": self.gpu_nonce_override or nonce.hex(),
                "x-nvidia-gpu-attestation-report-signature-verified": True,
                "exp": time.time() + 600})},
        })
        report = {
            "agent_name": "remote-worker",
            "pubkey_hash": spki_hash_b64(self.attestation_key.public_key()),
            "snp_attestation_token": _jwt({"x-ms-attestation-type": "sevsnpvm",
                                           "x-ms-sevsnpvm-launchmeasurement": "abc123"}),
            "gpu_eat_hash": _b64(hashlib.sha256(gpu_eat.encode()).digest()),
            "tls_pubkey_hash": self.tls_pubkey_hash,
            "nonce": self.report_nonce_override or _b64(nonce),
            "timestamp": time.time() + self.timestamp_offset,
        }
        report_json = json.dumps(report, separators=(",", ":")).encode()
        signature = self.attestation_key.sign(report_json, ec.ECDSA(hashes.SHA256()))
        if self.corrupt_report_signature:
            signature = self.attestation_key.sign(b"other", ec.ECDSA(hashes.SHA256()))
        worker = self.front_key or self.worker_key
        return {"report": dict(sorted(report.items())), "report_json": report_json.decode(),
                "signature": _b64(signature),
                "public_key_worker": pem_public_key(worker.public_key()),
                "gpu_eat": gpu_eat, "nonce_b64": _b64(nonce)}

    def _peer(self, body: dict[str, Any]) -> tuple[str, ec.EllipticCurvePublicKey, bytes,
                                                   list[dict[str, Any]]]:
        peer_pem = body["peer_public_key"]
        peer = serialization.load_pem_public_key(peer_pem.encode())
        assert isinstance(peer, ec.EllipticCurvePublicKey)
        key = derive_key(self.worker_key, peer)
        _, plaintext = decrypt_and_verify(body["payload"], key, peer)
        messages = json.loads(plaintext)
        self.received.append(body)
        return peer_pem, peer, key, messages

    def _seal(self, text: str, key: bytes, counter: int) -> dict[str, Any]:
        if self.wrong_aes_key:
            key = bytes(32)
        payload = encrypt_and_sign(text, key, self.worker_key, counter)
        if self.flip_ciphertext:
            ct = bytearray(base64.b64decode(payload["ciphertext"]))
            ct[0] ^= 1
            payload["ciphertext"] = _b64(bytes(ct))
        return payload

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if request.method == "GET" and request.url.path == "/attestation":
            return httpx.Response(200, json=self.attestation())
        if self.fail_message:
            return httpx.Response(500, text="<html>Internal Server Error</html>",
                                  headers={"content-type": "text/html"})
        body = json.loads(request.content)
        peer_pem, _, key, messages = self._peer(body)
        counter = self.counters.setdefault(peer_pem, 3000)
        self.counters[peer_pem] = counter + 1
        if request.url.path == "/message":
            if self.replay_last and self.last_response is not None:
                return httpx.Response(200, json=self.last_response)
            self.last_response = self._seal(self.model(messages), key, counter)
            return httpx.Response(200, json=self.last_response)
        if request.url.path == "/message_stream":
            words = self.model(messages).split(" ")
            chunks = [self._seal(w + " ", key, counter + k) for k, w in enumerate(words)]
            if self.stream_mode == "reorder":
                chunks[0], chunks[1] = chunks[1], chunks[0]
            lines = [json.dumps(c) for c in chunks]
            if self.stream_mode != "truncate":
                lines.append(json.dumps({"eos": True}))
            if self.stream_mode == "after_eos":
                lines.append(json.dumps(chunks[-1]))
            return httpx.Response(200, content="\n".join(lines) + "\n",
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(404, text="not found")


@pytest.fixture(autouse=True)
def _fresh_warning() -> None:
    compat._reset_warning_for_tests()


@pytest.fixture
def server() -> ReferenceServer:
    return ReferenceServer()


def make_client(server: ReferenceServer, **kwargs: Any) -> SecureMinionsCompatClient:
    http = httpx.Client(base_url="https://worker.test:5056",
                        transport=httpx.MockTransport(server.handle))
    kwargs.setdefault("allow_unverified_tee_tokens", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecureMinionsCompatWarning)
        return SecureMinionsCompatClient("https://worker.test:5056", server.attestor_pem,
                                         http_client=http, **kwargs)


def quiet(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecureMinionsCompatWarning)
        return fn()


def test_round_trip_chat_and_wire_format(server: ReferenceServer) -> None:
    client = make_client(server, vm_launch_measurement="abc123")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": SECRET}]
    texts, usage = quiet(lambda: client.chat(msgs, response_format={"type": "json_object"}))
    assert texts == [f"echo: {SECRET}"]
    assert isinstance(usage, Usage) and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    body = server.received[0]
    assert set(body) == {"peer_public_key", "session_id", "payload"}
    assert set(body["payload"]) == {"nonce", "iv", "ciphertext", "signature"}
    assert body["payload"]["nonce"] == 1000
    assert SECRET not in json.dumps(body)  # encrypted on the wire
    # second request on the same session: client counter 1001, server counter 3001 accepted
    texts2, _ = quiet(lambda: client.chat([{"role": "user", "content": "again"}]))
    assert texts2 == ["echo: again"] and server.received[1]["payload"]["nonce"] == 1001
    assert server.requests.count("GET /attestation") == 1
    assert client.session is not None and client.session.last_server_counter == 3001


def test_stream_round_trip_and_counter_overlap(server: ReferenceServer) -> None:
    client = make_client(server)
    deltas = quiet(lambda: list(client.stream([{"role": "user", "content": "a b c"}])))
    assert "".join(deltas) == "echo: a b c "
    # the published server reuses counters (stream chunk k = initial + k, next request
    # initial + 1): that must stay compatible
    assert quiet(lambda: client.chat([{"role": "user", "content": "x"}]))[0] == ["echo: x"]


def test_minion_protocol_uses_compat_client(server: ReferenceServer) -> None:
    from fedprompt.minion.protocol import Minion
    from fedprompt.minion.scripted import supervisor

    server.model = lambda messages: supervisor(messages, {})

    class Local:
        def chat(self, messages: list[dict[str, Any]]) -> tuple[list[str], Usage, list[str]]:
            return ["The invoice total is 42 EUR."], Usage(1, 10), ["stop"]

    client = make_client(server)
    minion = Minion(local_client=Local(), remote_client=client, max_rounds=3)
    result = quiet(lambda: minion("What is the invoice total?", [SECRET]))
    answer = result["final_answer"] if isinstance(result, dict) else result.final_answer
    assert "42 EUR" in answer
    sent = json.dumps(server.received)
    assert SECRET not in sent


def test_warns_exactly_once_with_weaknesses(server: ReferenceServer) -> None:
    client = make_client(server)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.chat([{"role": "user", "content": "one"}])
        client.chat([{"role": "user", "content": "two"}])
        make_client(server).chat([{"role": "user", "content": "three"}])
    ours = [w for w in caught if issubclass(w.category, SecureMinionsCompatWarning)]
    assert len(ours) == 1
    text = str(ours[0].message)
    assert all(w in text for w in WEAKNESSES) and len(WEAKNESSES) >= 8
    assert "eos" in text and "replay" in text and "forward secrecy" in text


def test_bad_report_signature_sends_nothing(server: ReferenceServer) -> None:
    server.corrupt_report_signature = True
    with pytest.raises(CompatSignatureError, match="pinned attestation key"):
        quiet(lambda: make_client(server).chat([{"role": "user", "content": SECRET}]))
    assert server.requests == ["GET /attestation"] and not server.received


def test_report_from_another_attestor_rejected(server: ReferenceServer) -> None:
    other = pem_public_key(ec.generate_private_key(ec.SECP384R1()).public_key())
    http = httpx.Client(base_url="https://w", transport=httpx.MockTransport(server.handle))
    client = quiet(lambda: SecureMinionsCompatClient(
        "https://w", other, http_client=http, allow_unverified_tee_tokens=True))
    with pytest.raises(CompatSignatureError):
        quiet(client.attest)


def test_wrong_report_nonce_rejected(server: ReferenceServer) -> None:
    server.report_nonce_override = _b64(b"\x01" * 32)
    with pytest.raises(CompatAttestationError, match="nonce"):
        quiet(make_client(server).attest)


def test_wrong_gpu_token_nonce_rejected(server: ReferenceServer) -> None:
    server.gpu_nonce_override = "00" * 32
    with pytest.raises(CompatAttestationError, match="GPU token GPU-0 answers another nonce"):
        quiet(make_client(server).attest)


def test_replayed_attestation_nonce_rejected(server: ReferenceServer) -> None:
    server.fixed_nonce = b"\x07" * 32
    client = make_client(server)
    quiet(client.attest)
    with pytest.raises(CompatReplayError, match="already used"):
        quiet(client.attest)


def test_stale_report_rejected(server: ReferenceServer) -> None:
    server.timestamp_offset = -3600
    with pytest.raises(CompatAttestationError, match="old"):
        quiet(make_client(server).attest)


def test_wrong_snp_measurement_rejected(server: ReferenceServer) -> None:
    with pytest.raises(CompatAttestationError, match="launch measurement"):
        quiet(make_client(server, vm_launch_measurement="def456").attest)


def test_pinned_server_key_mismatch_rejected(server: ReferenceServer) -> None:
    server.front_key = ec.generate_private_key(ec.SECP384R1())  # genuine report, other key
    pin = pem_public_key(server.worker_key.public_key())
    with pytest.raises(CompatAttestationError, match="pinned server key"):
        quiet(make_client(server, server_key_pem=pin).attest)


def test_tee_verifier_called_and_required(server: ReferenceServer) -> None:
    seen: list[CompatAttestation] = []
    client = make_client(server, tee_verifier=seen.append, allow_unverified_tee_tokens=False)
    quiet(client.attest)
    assert len(seen) == 1 and "GPU-0" in seen[0].gpu_eat["gpu_token"]

    def reject(att: CompatAttestation) -> None:
        raise ValueError("NRAS says no")

    with pytest.raises(CompatAttestationError, match="NRAS says no"):
        quiet(make_client(server, tee_verifier=reject, allow_unverified_tee_tokens=False).attest)
    with pytest.raises(CompatAttestationError, match="tee_verifier"):
        SecureMinionsCompatClient("https://w", server.attestor_pem)


def test_tls_pin_required_when_enabled(server: ReferenceServer) -> None:
    with pytest.raises(CompatAttestationError, match="TLS"):
        quiet(make_client(server, check_tls_pin=True).attest)
    with pytest.raises(CompatServerError, match="https"):
        SecureMinionsCompatClient("http://w:5056", server.attestor_pem,
                                  allow_unverified_tee_tokens=True)


def test_tampered_response_signature_raises(server: ReferenceServer) -> None:
    server.flip_ciphertext = True
    client = make_client(server)
    with pytest.raises(CompatSignatureError):
        quiet(lambda: client.chat([{"role": "user", "content": "hi"}]))
    assert client.session is None  # dropped: the next call re-attests


def test_bad_gcm_tag_raises(server: ReferenceServer) -> None:
    server.wrong_aes_key = True  # signed correctly, but the tag does not verify
    with pytest.raises(CompatDecryptionError, match="tag"):
        quiet(lambda: make_client(server).chat([{"role": "user", "content": "hi"}]))


def test_replayed_response_rejected(server: ReferenceServer) -> None:
    client = make_client(server)
    quiet(lambda: client.chat([{"role": "user", "content": "first"}]))
    server.replay_last = True
    with pytest.raises(CompatReplayError, match="replayed"):
        quiet(lambda: client.chat([{"role": "user", "content": "second"}]))


def test_server_error_raised_not_returned(server: ReferenceServer) -> None:
    client = make_client(server)
    quiet(client.attest)
    server.fail_message = True
    with pytest.raises(CompatServerError, match="HTTP 500") as info:
        quiet(lambda: client.chat([{"role": "user", "content": "hi"}]))
    assert info.value.status == 500


@pytest.mark.parametrize("mode,match", [("truncate", "truncated"),
                                        ("reorder", "expected"),
                                        ("after_eos", "after the end")])
def test_stream_attacks_rejected(server: ReferenceServer, mode: str, match: str) -> None:
    server.stream_mode = mode
    client = make_client(server)
    with pytest.raises(CompatStreamError, match=match):
        quiet(lambda: list(client.stream([{"role": "user", "content": "a b c d"}])))


def test_malformed_payloads_raise() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    aes = derive_key(key, ec.generate_private_key(ec.SECP384R1()).public_key())
    good = encrypt_and_sign("hello", aes, key, 5)
    assert decrypt_and_verify(good, aes, key.public_key()) == (5, "hello")
    for bad in ({**good, "nonce": -1}, {**good, "iv": "!!"}, {**good, "iv": _b64(b"x" * 8)},
                {**good, "nonce": 6}, "not a dict"):
        with pytest.raises(CompatError):
            decrypt_and_verify(bad, aes, key.public_key())


def _self_signed(directory: Path) -> tuple[Path, Path, str]:
    """The loopback certificate of fedprompt's demos, and the SPKI hash of its key."""
    cert, key = write_self_signed_cert(directory)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return cert, key, spki_hash_b64(private.public_key())


@contextlib.contextmanager
def tls_server(server: ReferenceServer, cert: Path, key: Path) -> Iterator[str]:
    """Serve ``server.handle`` over real TLS on loopback (stdlib HTTP server, one thread)."""

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = httpx.Request(self.command, f"https://127.0.0.1{self.path}",
                                    content=self.rfile.read(length))
            response = server.handle(request)
            self.send_response(response.status_code)
            self.send_header("content-type", response.headers.get("content-type", ""))
            self.send_header("content-length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_real_tls_pin_checked_on_the_traffic_connection(server: ReferenceServer,
                                                        tmp_path: Path) -> None:
    cert, key, spki = _self_signed(tmp_path)
    server.tls_pubkey_hash = spki
    with tls_server(server, cert, key) as url:
        client = quiet(lambda: SecureMinionsCompatClient(
            url, server.attestor_pem, ca_cert=cert, allow_unverified_tee_tokens=True,
            timeout_s=10))
        assert client.check_tls_pin
        assert quiet(lambda: client.chat([{"role": "user", "content": "tls"}]))[0] == [
            "echo: tls"]
        assert "".join(quiet(lambda: list(client.stream([{"role": "user", "content": "s"}])))
                       ) == "echo: s "
        client.close()
        # a genuine report naming another TLS key (e.g. a proxy terminating TLS) is refused
        server.tls_pubkey_hash = _b64(b"\x00" * 32)
        other = quiet(lambda: SecureMinionsCompatClient(
            url, server.attestor_pem, ca_cert=cert, allow_unverified_tee_tokens=True,
            timeout_s=10))
        with pytest.raises(CompatAttestationError, match="tls_pubkey_hash"):
            quiet(other.attest)
        other.close()
