"""Enclave server under abuse (issue 13 item 5): sessions, handshake rate, slow clients.

A flood of anonymous attestation handshakes used to evict every idle legitimate session
(one table, oldest dropped beyond ``max_sessions``). Now unconfirmed sessions have their
own pool, active ones are never evicted by handshakes nor, while recently used, by newly
confirmed sessions, and handshakes are rate-limited per TCP peer address. Slow headers and
slow bodies used to hold connections indefinitely; now both have deadlines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.requests import Request

from fedprompt.errors import ConfigError
from fedprompt.minion.attestation import InsecureMockAttestation
from fedprompt.minion.enclave_server import (
    ApiError,
    CallableBackend,
    EnclaveLimits,
    HandshakeRateLimiter,
    SessionStore,
    _read_body,
    build_parser,
    client_source,
    create_app,
    header_deadline_protocol,
    uvicorn_config,
)
from fedprompt.minion.secure_client import SecureChatClient, SecureClientError

MESSAGES = [{"role": "user", "content": "hello"}]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _channel() -> Any:
    """The store only reads ``session_id``; a stand-in keeps a 10k-session flood cheap."""
    return SimpleNamespace(session_id=os.urandom(16))


def _reply(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    return "ok: " + messages[-1]["content"]


# --------------------------------------------------------------------------- the store

def test_handshake_flood_only_evicts_unconfirmed_sessions() -> None:
    clock = Clock()
    store = SessionStore(EnclaveLimits(max_sessions=64, max_pending_sessions=32), clock=clock)
    legit = [_channel() for _ in range(64)]  # the active pool exactly full
    for ch in legit:
        store.add(ch)
        store.confirm(ch)
    clock.now += 3000  # idle for 50 minutes, within the 1 h TTL
    flood = [_channel() for _ in range(10_000)]  # ~10x the audit's 1,100, from anywhere
    for ch in flood:
        store.add(ch)
    assert store.active_count == 64 and store.pending_count == 32
    assert all(store.get(ch.session_id) is ch for ch in legit)
    assert all(store.get(ch.session_id) is ch for ch in flood[-32:])
    with pytest.raises(ApiError, match="re-attest") as info:
        store.get(flood[0].session_id)
    assert info.value.status == 404


def test_confirmation_never_evicts_a_recently_active_session() -> None:
    clock = Clock()
    limits = EnclaveLimits(max_sessions=4, max_pending_sessions=8, evict_idle_s=600)
    store = SessionStore(limits, clock=clock)
    legit = [_channel() for _ in range(4)]
    for ch in legit:
        store.add(ch)
        store.confirm(ch)
    clock.now += 599
    newcomer = _channel()
    store.add(newcomer)
    with pytest.raises(ApiError) as info:  # a session that just authenticated a message
        store.confirm(newcomer)
    assert info.value.status == 429 and info.value.code == "sessions_full"
    assert info.value.headers == {"Retry-After": "1"}
    assert store.pending_count == 0  # refused sessions are dropped: re-attest later
    store.confirm(legit[0])  # legit[0] is now the most recently used
    clock.now += 1
    late = _channel()
    store.add(late)
    store.confirm(late)  # legit[1] was idle 600 s: it, and only it, makes room
    with pytest.raises(ApiError):
        store.get(legit[1].session_id)
    assert [store.get(ch.session_id) for ch in (legit[0], legit[2], legit[3], late)]


def test_sessions_expire_per_pool() -> None:
    clock = Clock()
    store = SessionStore(EnclaveLimits(session_ttl_s=100, pending_session_ttl_s=10),
                         clock=clock)
    active, pending = _channel(), _channel()
    store.add(active)
    store.confirm(active)
    store.add(pending)
    clock.now += 11
    with pytest.raises(ApiError, match="expired"):
        store.get(pending.session_id)
    assert store.get(active.session_id) is active
    clock.now += 90  # get() does not refresh: only authenticated messages do
    with pytest.raises(ApiError, match="expired"):
        store.get(active.session_id)
    assert len(store) == 0


def test_token_bucket_per_source() -> None:
    clock = Clock()
    limiter = HandshakeRateLimiter(2.0, 3, max_sources=2, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # another source has its own bucket
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    limiter.acquire("c")  # a third source drops the least recently seen bucket ("b")
    assert len(limiter._buckets) == 2 and "b" not in limiter._buckets


def test_client_source_keys() -> None:
    assert client_source("203.0.113.7") == "203.0.113.7"
    assert client_source("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_source("2001:db8::1") == client_source("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_source("2001:db8:0:1::1") != client_source("2001:db8::1")
    assert client_source(None) == "unknown" and client_source("testclient") == "testclient"


@pytest.mark.parametrize("bad", [{"max_sessions": 0}, {"attest_burst": 1.5},
                                 {"attest_rate_per_s": 0}, {"session_ttl_s": float("nan")},
                                 {"evict_idle_s": -1}, {"max_pending_sessions": True}])
def test_limits_refuse_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        EnclaveLimits(**bad)


def test_cli_flags_reach_the_limits() -> None:
    args = build_parser().parse_args([
        "--tls-cert", "c", "--tls-key", "k", "--backend", "echo", "--max-sessions", "7",
        "--max-pending-sessions", "9", "--session-ttl", "60", "--pending-session-ttl", "5",
        "--evict-idle", "30", "--attest-rate", "0.5", "--attest-burst", "2",
        "--body-timeout", "3", "--header-timeout", "4", "--keep-alive-timeout", "1",
        "--limit-concurrency", "10", "--max-header-bytes", "2048"])
    assert (args.max_sessions, args.max_pending_sessions, args.session_ttl,
            args.pending_session_ttl, args.evict_idle, args.attest_rate,
            args.attest_burst, args.forwarded_allow_ips) == (7, 9, 60, 5, 30, 0.5, 2, None)
    assert (args.body_timeout, args.header_timeout, args.keep_alive_timeout,
            args.limit_concurrency, args.max_header_bytes) == (3, 4, 1, 10, 2048)


# --------------------------------------------------------------------------- the app

LEGIT = 8
LIMITS = EnclaveLimits(max_sessions=LEGIT, max_pending_sessions=16, attest_rate_per_s=0.01,
                       attest_burst=LEGIT)


@pytest.fixture()
def app() -> Any:
    return create_app(CallableBackend(_reply), InsecureMockAttestation(), limits=LIMITS)


def _peer(app: Any, host: str) -> TestClient:
    return TestClient(app, base_url="https://testserver", client=(host, 40000))


def _secure(http: TestClient) -> SecureChatClient:
    return SecureChatClient("https://testserver", InsecureMockAttestation(),
                            allow_insecure_mock=True, http_client=http)


@pytest.fixture()
def legit(app: Any) -> Iterator[list[SecureChatClient]]:
    """LEGIT active sessions, one per address, each having sent one message."""
    clients = [_secure(_peer(app, f"198.51.100.{i}")) for i in range(LEGIT)]
    for c in clients:
        assert c.send(MESSAGES).content == "ok: hello"
    assert app.state.sessions.active_count == LEGIT
    yield clients
    for c in clients:
        c.close()


def _attest(http: TestClient, **headers: str) -> Any:
    return http.post("/v1/attestation", json={"nonce": "A" * 43 + "=",
                                               "client_public_key": "B" * 43 + "="},
                     headers=headers)


def test_handshake_flood_from_one_address_is_rate_limited(app: Any,
                                                          legit: list[SecureChatClient]) -> None:
    """X-Forwarded-For is not trusted: 300 spoofed 'sources' share the peer's one bucket."""
    attacker = _peer(app, "203.0.113.66")
    answers = [_attest(attacker, **{"X-Forwarded-For": f"10.9.{i // 250}.{i % 250}"})
               for i in range(300)]
    codes = [r.status_code for r in answers]
    assert codes[:LIMITS.attest_burst] == [200] * LIMITS.attest_burst
    limited = answers[LIMITS.attest_burst:]
    assert {r.status_code for r in limited} == {429}
    reason = limited[0].json()
    assert reason["error"] == "rate_limited" and "\n" not in reason["detail"]
    assert int(limited[0].headers["Retry-After"]) >= 1
    for c in legit:
        assert c.send(MESSAGES).content == "ok: hello"


def test_handshake_flood_from_many_addresses_keeps_active_sessions(
        app: Any, legit: list[SecureChatClient]) -> None:
    """200 addresses x their whole burst (1,600 handshakes, 100x the unconfirmed pool)."""
    ok = 0
    for i in range(200):
        peer = _peer(app, f"10.{i // 250}.{i % 250}.1")
        ok += sum(_attest(peer).status_code == 200 for _ in range(LIMITS.attest_burst))
    assert ok == 200 * LIMITS.attest_burst
    store = app.state.sessions
    assert store.pending_count == LIMITS.max_pending_sessions
    assert store.active_count == LEGIT
    for c in legit:  # same sessions, no re-attestation
        session = c.session
        assert c.send(MESSAGES).content == "ok: hello" and c.session is session


def test_confirmed_newcomers_cannot_push_out_active_sessions(
        app: Any, legit: list[SecureChatClient]) -> None:
    """Attackers that complete the handshake and send a valid message get 429, not a slot."""
    for i in range(20):
        intruder = _secure(_peer(app, f"10.1.{i}.1"))
        with pytest.raises(SecureClientError) as info:
            intruder.send(MESSAGES)
        assert info.value.status == 429 and "re-attest later" in str(info.value)
    assert app.state.sessions.active_count == LEGIT
    for c in legit:
        session = c.session
        assert c.send(MESSAGES).content == "ok: hello" and c.session is session


# --------------------------------------------------------------------------- slow clients

def _request(receive: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/message", "headers": headers or []}
    return Request(scope, receive)


def test_read_body_deadline() -> None:
    """One byte, then nothing: 408 after the deadline, not a connection held forever."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"x", "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def read() -> bytes:
        return await _read_body(_request(receive), 100, 0.2)

    start = time.monotonic()
    with pytest.raises(ApiError) as info:
        asyncio.run(read())
    assert time.monotonic() - start < 5
    assert (info.value.status, info.value.code) == (408, "body_timeout")
    assert info.value.headers == {"Connection": "close"} and "1 B arrived" in info.value.detail


def test_slow_body_generator_gets_408() -> None:
    """Through the whole app (httpx ASGITransport), a body trickled at one byte per second."""
    app = create_app(CallableBackend(_reply), InsecureMockAttestation(),
                     limits=EnclaveLimits(body_timeout_s=0.3))

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"x"
            await asyncio.sleep(1.0)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as c:
            return await c.post("/v1/message", content=trickle())

    start = time.monotonic()
    resp = asyncio.run(post())
    assert time.monotonic() - start < 10
    assert resp.status_code == 408 and resp.json()["error"] == "body_timeout"
    assert resp.headers["connection"] == "close"


def test_client_disconnect_mid_body_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(CallableBackend(_reply), InsecureMockAttestation())
    events = iter([{"type": "http.request", "body": b"\x00" * 10, "more_body": True},
                   {"type": "http.disconnect"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(events)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "https", "path": "/v1/message", "raw_path": b"",
             "root_path": "", "query_string": b"", "headers": [], "client": ("192.0.2.1", 1),
             "server": ("testserver", 443)}
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400
    records = [r for r in caplog.records if r.name != "asyncio"]  # "Using selector: ..."
    assert [r.getMessage() for r in records] == ["rejected /v1/message: client_disconnected"]
    assert not any(r.exc_info for r in caplog.records)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def live() -> Iterator[int]:
    """The app under uvicorn with the server's config, short deadlines, plain HTTP."""
    limits = EnclaveLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.3)
    app = create_app(CallableBackend(_reply), InsecureMockAttestation(), limits=limits)
    port = _free_port()
    server = uvicorn.Server(uvicorn_config(app, limits, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte per 0.1 s)."""
    start = time.monotonic()
    sock.settimeout(0.1)
    pending = bytearray(trickle)
    while time.monotonic() - start < seconds:
        try:
            if not sock.recv(4096):
                return time.monotonic() - start
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        if pending:
            try:
                sock.send(bytes(pending[:1]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
            del pending[:1]
    raise AssertionError(f"connection still open after {seconds} s")


def test_server_closes_slow_headers(live: int) -> None:
    with socket.create_connection(("127.0.0.1", live)) as sock:
        sock.sendall(b"POST /v1/message HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert _closed_within(sock, 5) >= 0.4
    with socket.create_connection(("127.0.0.1", live)) as sock:  # one header byte / 0.1 s
        assert _closed_within(sock, 5, b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"a" * 200) < 5


def test_server_closes_slow_headers_after_a_response(live: int) -> None:
    """Trickling the next request's headers used to cancel the keep-alive timer for good."""
    with socket.create_connection(("127.0.0.1", live)) as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        assert _closed_within(sock, 5, b"GET /v1/health HTTP/1.1\r\nX-Pad: " + b"a" * 200) < 5


def test_server_answers_slow_body_with_408(live: int) -> None:
    with socket.create_connection(("127.0.0.1", live)) as sock:
        sock.sendall(b"POST /v1/message HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
        sock.settimeout(5)
        start = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer
        assert 0.4 <= time.monotonic() - start < 5
        assert _closed_within(sock, 5) < 5
    assert httpx.get(f"http://127.0.0.1:{live}/v1/health").status_code == 200


def test_uvicorn_config_limits_and_proxy_headers() -> None:
    app = create_app(CallableBackend(_reply), InsecureMockAttestation())
    limits = EnclaveLimits(limit_concurrency=7, max_header_bytes=2048, keep_alive_s=2)
    config = uvicorn_config(app, limits, host="127.0.0.1", port=1)
    assert not config.proxy_headers  # X-Forwarded-For is not trusted by default
    assert (config.limit_concurrency, config.h11_max_incomplete_event_size,
            config.timeout_keep_alive) == (7, 2048, 2)
    assert issubclass(config.http, header_deadline_protocol(1.0).__mro__[1])
    trusted = uvicorn_config(app, limits, host="127.0.0.1", port=1,
                             forwarded_allow_ips="10.0.0.2")
    assert trusted.proxy_headers and trusted.forwarded_allow_ips == "10.0.0.2"
