"""Secure Minion channel: real TLS server on loopback, attacks each rejected, endpoint fuzz."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedprompt.minion.attestation import (
    AttestationEvidence,
    AttestationVerifier,
    InsecureAttestationError,
    InsecureMockAttestation,
    KeyBindingError,
    NonceMismatchError,
    StaleAttestationError,
    verify_evidence,
)
from fedprompt.minion.channel import (
    FRAME_HEADER,
    RECORD_LENGTH,
    ChannelClosedError,
    ClientHandshake,
    DecryptionError,
    Frame,
    FrameKind,
    OutOfOrderError,
    ReplayError,
    ServerHandshake,
    StreamProtocolError,
    TruncatedStreamError,
    binding_digest,
    encode_frame,
    open_stream,
)
from fedprompt.minion.enclave_server import write_self_signed_cert
from fedprompt.minion.loopback import terminate
from fedprompt.minion.secure_client import SecureChatClient, SecureClientError

REPO = Path(__file__).resolve().parents[1]
SECRET = "PATIENT-7731 has stage II carcinoma"  # plaintext that must never be logged

STUB_BACKEND = '''
def reply(messages, params):
    return ["stub ", "answer ", "to: ", messages[-1]["content"]]
'''


def stub_reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> list[str]:
    return ["stub ", "answer ", "to: ", messages[-1]["content"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, url: str, cert: Path, log: Path) -> None:
        self.url, self.cert, self.log = url, cert, log


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("enclave")
    cert, key = write_self_signed_cert(tmp)
    (tmp / "stub_backend.py").write_text(STUB_BACKEND)
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{tmp}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedprompt.minion.enclave_server", "--host", "127.0.0.1",
             "--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key),
             "--backend", "callable:stub_backend:reply", "--attestation", "insecure-mock",
             "--allow-insecure-mock-attestation", "--log-level", "debug"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                if httpx.get(url + "/v1/health", verify=ctx).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield Server(url, cert, log)
    finally:
        terminate(proc)


Mutator = Callable[[str, bytes], bytes]


class Mitm(httpx.BaseTransport):
    """An active attacker between client and server: rewrites response bodies per path."""

    def __init__(self, cert: Path, mutate: Mutator | None = None) -> None:
        self.inner = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=str(cert)))
        self.mutate = mutate or (lambda path, body: body)
        self.paths: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        resp = self.inner.handle_request(request)
        body = self.mutate(request.url.path, resp.read())
        headers = {k: v for k, v in resp.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding")}
        return httpx.Response(resp.status_code, headers=headers, content=body, request=request)


def _client(server: Server, mutate: Mutator | None = None,
            verifier: AttestationVerifier | None = None, allow: bool = True
            ) -> tuple[SecureChatClient, Mitm]:
    mitm = Mitm(server.cert, mutate)
    http = httpx.Client(base_url=server.url, transport=mitm)
    client = SecureChatClient(server.url, verifier or InsecureMockAttestation(),
                              allow_insecure_mock=allow, http_client=http)
    return client, mitm


def _edit_attestation(edit: Callable[[dict[str, Any]], None]) -> Mutator:
    def mutate(path: str, body: bytes) -> bytes:
        if path != "/v1/attestation":
            return body
        data = json.loads(body)
        edit(data)
        return json.dumps(data).encode()
    return mutate


MESSAGES = [{"role": "user", "content": SECRET}]


# --------------------------------------------------------------------------- round trip

def test_round_trip_over_tls_with_real_server(server: Server) -> None:
    client = SecureChatClient(server.url, InsecureMockAttestation(), allow_insecure_mock=True,
                              ca_cert=server.cert)
    reply = client.send(MESSAGES, temperature=0.0)
    assert reply.content == f"stub answer to: {SECRET}"
    assert client.chat(MESSAGES)[0] == [f"stub answer to: {SECRET}"]
    chunks = list(client.stream(MESSAGES))
    assert chunks == ["stub ", "answer ", "to: ", SECRET]
    assert client.session is not None and client.session.channel.next_recv_counter == 7
    client.close()
    time.sleep(0.2)
    log = server.log.read_text()
    assert "/v1/message" in log  # the server does log requests ...
    assert SECRET not in log and "PATIENT" not in log  # ... never their plaintext


def test_client_refuses_plain_http() -> None:
    with pytest.raises(SecureClientError, match="https"):
        SecureChatClient("http://127.0.0.1:1", InsecureMockAttestation(),
                         allow_insecure_mock=True)


# --------------------------------------------------------------------------- attacks

def test_tampered_ciphertext_rejected_by_server(server: Server) -> None:
    client, _ = _client(server)
    session = client.attest()
    body = bytearray(client._request_body(session.channel, MESSAGES, {}))
    body[FRAME_HEADER.size + 3] ^= 0x01
    resp = client._http.post("/v1/message", content=bytes(body))
    assert resp.status_code == 400 and resp.json()["error"] == "DecryptionError"


def test_tampered_response_rejected_by_client(server: Server) -> None:
    def flip(path: str, body: bytes) -> bytes:
        if path != "/v1/message":
            return body
        return body[:-1] + bytes([body[-1] ^ 0x80])

    client, _ = _client(server, flip)
    with pytest.raises(DecryptionError):
        client.send(MESSAGES)
    assert client.session is None  # fail closed: the next call re-attests


def test_replayed_message_rejected(server: Server) -> None:
    client, _ = _client(server)
    session = client.attest()
    body = client._request_body(session.channel, MESSAGES, {})
    assert client._http.post("/v1/message", content=body).status_code == 200
    replay = client._http.post("/v1/message", content=body)
    assert replay.status_code == 409 and replay.json()["error"] == "ReplayError"


def test_replayed_response_rejected_by_client(server: Server) -> None:
    first: dict[str, bytes] = {}

    def replay(path: str, body: bytes) -> bytes:
        if path == "/v1/message":
            return first.setdefault("frame", body)
        return body

    client, _ = _client(server, replay)
    client.send(MESSAGES)
    with pytest.raises(ReplayError):
        client.send(MESSAGES)


def _stream_lines(edit: Callable[[list[bytes]], list[bytes]]) -> Mutator:
    """Rewrite the stream's length-prefixed records (one list entry per record)."""
    def mutate(path: str, body: bytes) -> bytes:
        if path != "/v1/message/stream":
            return body
        records, rest = [], body
        while rest:
            (n,) = RECORD_LENGTH.unpack_from(rest)
            records.append(rest[:RECORD_LENGTH.size + n])
            rest = rest[RECORD_LENGTH.size + n:]
        return b"".join(edit(records))
    return mutate


def test_reordered_stream_chunk_rejected(server: Server) -> None:
    def swap(lines: list[bytes]) -> list[bytes]:
        lines[1], lines[2] = lines[2], lines[1]
        return lines

    client, _ = _client(server, _stream_lines(swap))
    with pytest.raises(OutOfOrderError):
        list(client.stream(MESSAGES))


def test_truncated_stream_rejected(server: Server) -> None:
    client, _ = _client(server, _stream_lines(lambda lines: lines[:-1]))  # drop END
    received: list[str] = []
    with pytest.raises(TruncatedStreamError):
        received.extend(client.stream(MESSAGES))
    assert received == ["stub ", "answer ", "to: ", SECRET]


def test_truncated_stream_inside_a_record_rejected(server: Server) -> None:
    client, _ = _client(server, _stream_lines(lambda recs: [*recs[:-1], recs[-1][:-5]]))
    with pytest.raises(TruncatedStreamError):
        list(client.stream(MESSAGES))


def test_forged_end_of_stream_rejected(server: Server) -> None:
    kind_at = RECORD_LENGTH.size + FRAME_HEADER.size - 1

    def forge(records: list[bytes]) -> list[bytes]:
        relabelled = bytearray(records[1])  # a DATA frame relabelled as END
        relabelled[kind_at] = int(FrameKind.END)
        return [records[0], bytes(relabelled)]

    client, _ = _client(server, _stream_lines(forge))
    with pytest.raises(DecryptionError):
        list(client.stream(MESSAGES))


def test_wrong_nonce_rejected(server: Server) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["evidence"]["nonce"] = base64.b64encode(os.urandom(32)).decode()

    client, mitm = _client(server, _edit_attestation(edit))
    with pytest.raises(NonceMismatchError):
        client.send(MESSAGES)
    assert mitm.paths == ["/v1/attestation"]  # nothing sent before attestation verified


def test_attestation_for_another_key_rejected(server: Server) -> None:
    attacker = ClientHandshake()  # any X25519 key the attacker holds

    def edit(data: dict[str, Any]) -> None:
        data["server_public_key"] = base64.b64encode(attacker.public_key).decode()

    client, mitm = _client(server, _edit_attestation(edit))
    with pytest.raises(KeyBindingError):
        client.send(MESSAGES)
    assert mitm.paths == ["/v1/attestation"]


def test_stale_attestation_rejected(server: Server) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["evidence"]["timestamp"] -= 3600

    client, mitm = _client(server, _edit_attestation(edit))
    with pytest.raises(StaleAttestationError):
        client.send(MESSAGES)
    assert mitm.paths == ["/v1/attestation"]


class StrictVerifier(AttestationVerifier):
    """Stands in for a real hardware verifier (e.g. NVIDIA) on the client."""

    name = "nvidia-gpu-cc"

    def verify(self, evidence: AttestationEvidence, expected_report_data: bytes) -> None:
        raise AssertionError("must not be reached for mock evidence")


def test_mock_attestation_without_opt_in_rejected(server: Server) -> None:
    with pytest.raises(InsecureAttestationError):
        SecureChatClient(server.url, InsecureMockAttestation(), ca_cert=server.cert)
    client, mitm = _client(server, verifier=StrictVerifier(), allow=False)
    with pytest.raises(InsecureAttestationError):
        client.send(MESSAGES)
    assert mitm.paths == ["/v1/attestation"]


# --------------------------------------------------------------------------- channel units

def _pair() -> tuple[Any, Any]:
    hs = ClientHandshake()
    server = ServerHandshake.accept(hs.public_key, hs.nonce)
    assert server.binding == hs.expected_binding(server.session_id, server.server_public_key)
    return hs.complete(server.session_id, server.server_public_key), server.channel


def test_channel_binds_direction_kind_and_session() -> None:
    client, server = _pair()
    frame = client.seal(b"hello")
    reflected = Frame(frame.counter, frame.kind, frame.ciphertext)
    with pytest.raises(DecryptionError):
        client.open(reflected)  # a client frame reflected back at the client
    _client2, server2 = _pair()
    with pytest.raises(DecryptionError):
        server2.open(frame)  # another session
    relabelled = Frame(frame.counter, FrameKind.END, frame.ciphertext)
    with pytest.raises(DecryptionError):
        server.open(relabelled)
    assert server.open(frame) == b"hello"  # failures did not advance the server side


def test_client_channel_closes_after_failure() -> None:
    client, server = _pair()
    a, b = server.seal(b"a", FrameKind.DATA), server.seal(b"b", FrameKind.DATA)
    with pytest.raises(OutOfOrderError):
        client.open(b)
    with pytest.raises(ChannelClosedError):
        client.open(a)


def test_stream_grammar() -> None:
    client, server = _pair()
    frames = [server.seal(b"x", FrameKind.DATA), server.seal(b"{}", FrameKind.END),
              server.seal(b"late", FrameKind.DATA)]
    with pytest.raises(StreamProtocolError):
        list(open_stream(client, frames))


def test_verify_evidence_checks_window_and_binding() -> None:
    mock = InsecureMockAttestation(clock=lambda: 1000.0)
    nonce, sid, key = os.urandom(32), os.urandom(16), os.urandom(32)
    binding = binding_digest(sid, key, key, nonce)
    ev = mock.generate(binding, nonce)
    ok = verify_evidence(ev, mock, expected_nonce=nonce, expected_report_data=binding,
                         allow_insecure_mock=True, now=1010.0)
    assert ok.insecure
    with pytest.raises(StaleAttestationError):  # from the future beyond the skew
        verify_evidence(ev, mock, expected_nonce=nonce, expected_report_data=binding,
                        allow_insecure_mock=True, now=990.0)


# --------------------------------------------------------------------------- fuzz

@pytest.fixture(scope="module")
def app_client() -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from fedprompt.minion.enclave_server import CallableBackend, EnclaveLimits, create_app

    # The fuzz attests hundreds of times from one address: lift the per-address limit here
    # (tests/test_minion_enclave_limits.py checks it).
    limits = EnclaveLimits(attest_rate_per_s=1e6, attest_burst=10**6)
    app = create_app(CallableBackend(stub_reply), InsecureMockAttestation(), limits=limits)
    with TestClient(app, raise_server_exceptions=True) as tc:
        yield tc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
field_values = st.one_of(
    json_values, st.binary(max_size=80).map(_b64), st.integers(min_value=-2, max_value=2**65),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
            max_size=60),
)
ENDPOINTS = ["/v1/attestation", "/v1/message", "/v1/message/stream"]
FIELDS = ["nonce", "client_public_key", "session_id", "counter", "kind", "ciphertext"]
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
frame_headers = st.builds(
    lambda sid, counter, kind: FRAME_HEADER.pack(sid, counter, kind),
    st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1), st.integers(0, 255))


def _assert_4xx(resp: httpx.Response) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text)
    reason = resp.json()
    assert reason["error"] and reason["detail"]


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=200)
       | st.tuples(frame_headers, st.binary(max_size=64)).map(lambda t: t[0] + t[1]),
       content_type=st.sampled_from(["application/json", "application/octet-stream", ""]))
def test_fuzz_raw_bodies(app_client: Any, endpoint: str, raw: bytes, content_type: str) -> None:
    resp = app_client.post(endpoint, content=raw, headers={"content-type": content_type})
    _assert_4xx(resp)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS),
       body=st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=6) | json_values)
def test_fuzz_json_bodies(app_client: Any, endpoint: str, body: Any) -> None:
    resp = app_client.post(endpoint, json=body)  # JSON is wrong for the frame endpoints
    if resp.status_code == 200:  # only a well-formed attestation request may succeed
        assert endpoint == "/v1/attestation"
        return
    _assert_4xx(resp)


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS[1:]), plaintext=st.one_of(
    st.binary(max_size=100),
    json_values.map(lambda v: json.dumps({"messages": v, "note": SECRET}).encode()),
    json_values.map(lambda v: json.dumps({"messages": [{"role": "user", "content": SECRET}],
                                          "params": v}).encode()),
    st.lists(json_values, max_size=3).map(lambda v: json.dumps({"messages": v}).encode()),
), counter_shift=st.sampled_from([0, 0, 0, -1, 1]), flip=st.booleans())
def test_fuzz_authenticated_session(app_client: Any, caplog: pytest.LogCaptureFixture,
                                    endpoint: str, plaintext: bytes, counter_shift: int,
                                    flip: bool) -> None:
    """Malformed frames and malformed (encrypted) payloads on a live session: 4xx, no leak."""
    caplog.set_level(logging.DEBUG)
    client = SecureChatClient("https://testserver", InsecureMockAttestation(),
                              allow_insecure_mock=True, http_client=app_client)
    session = client.attest()
    if counter_shift == -1:
        client._http.post("/v1/message",
                          content=client._request_body(session.channel, MESSAGES, {}))
    frame = session.channel.seal(plaintext + SECRET.encode() * flip)
    ct = bytearray(frame.ciphertext)
    if flip:
        ct[0] ^= 1
    forged = Frame(max(0, frame.counter + counter_shift), FrameKind.MESSAGE, bytes(ct))
    resp = app_client.post(endpoint, content=encode_frame(session.session_id, forged))
    if resp.status_code == 200:  # the fuzzer found a valid request: fine, but not leaked
        assert SECRET not in caplog.text
        return
    _assert_4xx(resp)
    assert SECRET not in resp.text and SECRET not in caplog.text


# ------------------------------------------------- nesting depth and type confusion (issue 13)

VALID_PAYLOAD: dict[str, Any] = {
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": SECRET}],
    "params": {"temperature": 0.5, "top_p": 1.0, "max_tokens": 16, "seed": 1,
               "stop": ["\n\n"], "response_format": {"type": "json_object"}},
}
# Every field of the decrypted payload, plus one unknown key at each object level.
PAYLOAD_PATHS: list[tuple[Any, ...]] = [
    (), ("messages",), ("messages", 0), ("messages", 1), ("messages", 0, "role"),
    ("messages", 1, "role"), ("messages", 1, "content"), ("messages", 0, "name"),
    ("params",), ("params", "temperature"), ("params", "top_p"), ("params", "max_tokens"),
    ("params", "seed"), ("params", "stop"), ("params", "stop", 0),
    ("params", "response_format"), ("params", "response_format", "type"),
    ("params", "response_format", "json_schema"), ("params", "logit_bias"), ("extra",),
]
HOLE = "\x00hole\x00"


def _nested(depth: int, opener: str) -> str:
    """``depth`` levels of arrays or objects around 0, as text (``json.dumps`` would recurse)."""
    close = "]" if opener == "[" else "}"
    return opener * depth + "0" + close * depth


json_fragments = st.one_of(
    json_values.map(json.dumps),  # type confusion: any JSON value where one field belongs
    st.builds(_nested, st.sampled_from([1, 2, 31, 32, 33, 199, 200, 201, 5_000, 100_000])
              | st.integers(1, 300), st.sampled_from(["[", '{"k":'])),
    st.sampled_from(["NaN", "-Infinity", "1e400", "-0", "9" * 5000, "true", "null", '"\\ud800"',
                     '"user"', '"tool"', '"json_schema"', "[]", "{}", '["a", 1]', "4294967296"]),
)


def _with_fragment(base: Any, path: tuple[Any, ...], fragment: str) -> bytes:
    """``base`` as JSON text with the value at ``path`` replaced by the raw ``fragment``."""
    if not path:
        return fragment.encode()
    doc = json.loads(json.dumps(base))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = HOLE
    return json.dumps(doc).replace(json.dumps(HOLE), fragment).encode()


def _parses(plaintext: bytes) -> bool:
    from fedprompt.minion.enclave_server import ApiError, parse_chat_payload

    try:
        parse_chat_payload(plaintext)
    except ApiError as exc:
        assert 400 <= exc.status < 500 and exc.detail and SECRET not in exc.detail
        return False
    return True


def _seal_and_post(app_client: Any, endpoint: str, plaintext: bytes) -> httpx.Response:
    client = SecureChatClient("https://testserver", InsecureMockAttestation(),
                              allow_insecure_mock=True, http_client=app_client)
    session = client.attest()
    frame = session.channel.seal(plaintext)
    return app_client.post(endpoint, content=encode_frame(session.session_id, frame))


@pytest.mark.parametrize("endpoint", ENDPOINTS[1:])
@pytest.mark.parametrize("plaintext", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    json.dumps({"messages": [{"role": ["user"], "content": "x"}]}).encode(),
    json.dumps({"messages": [{"role": {"user": 1}, "content": "x"}]}).encode(),
], ids=["deep-100k", "deep-messages", "role-list", "role-object"])
def test_audit_payload_shapes_get_400(app_client: Any, endpoint: str, plaintext: bytes) -> None:
    """The three request shapes of issue 13 item 5 that used to answer 500 with a traceback."""
    resp = _seal_and_post(app_client, endpoint, plaintext)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_payload" and "\n" not in resp.json()["detail"]


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(PAYLOAD_PATHS), fragment=json_fragments)
def test_fuzz_parse_chat_payload(path: tuple[Any, ...], fragment: str) -> None:
    """Any field replaced by any JSON (or near-JSON): a 4xx ApiError or a well-typed result."""
    from fedprompt.minion.enclave_server import ROLES, parse_chat_payload

    plaintext = _with_fragment(VALID_PAYLOAD, path, fragment)
    if not _parses(plaintext):
        return
    messages, params = parse_chat_payload(plaintext)
    assert all(set(m) == {"role", "content"} and isinstance(m["role"], str)
               and m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
    assert isinstance(params, dict) and len(fragment) < 1000  # nothing deep got through


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS[1:]), path=st.sampled_from(PAYLOAD_PATHS),
       fragment=json_fragments)
def test_fuzz_payload_depth_and_type_confusion(app_client: Any, caplog: pytest.LogCaptureFixture,
                                               endpoint: str, path: tuple[Any, ...],
                                               fragment: str) -> None:
    """Sealed in a live session: never a 5xx, a 4xx exactly when the payload is invalid."""
    caplog.set_level(logging.DEBUG)
    plaintext = _with_fragment(VALID_PAYLOAD, path, fragment)
    resp = _seal_and_post(app_client, endpoint, plaintext)
    assert resp.status_code < 500, resp.text
    if _parses(plaintext):
        assert resp.status_code == 200, resp.text
    else:
        _assert_4xx(resp)
        assert SECRET not in resp.text
    assert SECRET not in caplog.text


VALID_ATTESTATION = {"nonce": _b64(bytes(32)), "client_public_key": _b64(bytes(range(32)))}


@FUZZ
@given(path=st.sampled_from([(), ("nonce",), ("client_public_key",), ("extra",)]),
       fragment=json_fragments)
def test_fuzz_attestation_depth_and_type_confusion(app_client: Any, path: tuple[Any, ...],
                                                   fragment: str) -> None:
    """Each attestation field (and the whole body) replaced by deep or wrongly typed JSON."""
    body = _with_fragment(VALID_ATTESTATION, path, fragment)
    resp = app_client.post("/v1/attestation", content=body,
                           headers={"content-type": "application/json"})
    assert resp.status_code < 500, resp.text
    _assert_4xx(resp)


# --------------------------------------------------------------------------- configuration

def test_nvidia_provider_without_sdk_raises_dependency_error() -> None:
    from fedprompt.errors import DependencyError
    from fedprompt.minion.attestation import NvidiaGpuAttestation

    try:
        import nv_attestation_sdk  # noqa: F401
    except ImportError:
        with pytest.raises(DependencyError, match="nv-attestation-sdk"):
            NvidiaGpuAttestation(policy={})
    else:
        pytest.skip("nv_attestation_sdk is installed here")


def test_server_command_refuses_mock_attestation_without_flag() -> None:
    from fedprompt.errors import ConfigError
    from fedprompt.minion.enclave_server import main

    with pytest.raises(ConfigError, match="allow-insecure-mock-attestation"):
        main(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--backend", "echo",
              "--attestation", "insecure-mock"])
