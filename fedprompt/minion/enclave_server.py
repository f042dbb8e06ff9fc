"""Reference enclave server: attestation plus encrypted chat endpoints (FastAPI + uvicorn).

Endpoints (all JSON; binary fields base64):

* ``POST /v1/attestation``  ``{nonce, client_public_key}`` -> ``{suite, session_id,
  server_public_key, evidence}``. A fresh X25519 key pair and session per call; the
  evidence binds the session transcript (see :mod:`fedprompt.minion.channel`).
* ``POST /v1/message``  one binary frame (``session_id || counter || kind || ciphertext``,
  see :func:`~fedprompt.minion.channel.encode_frame`) -> one sealed frame. Binary, not
  JSON + base64: at 8k tokens the framing would cost more than the cipher.
* ``POST /v1/message/stream``  same request -> length-prefixed frames, one sealed ``DATA``
  frame per delta, then an authenticated ``END`` frame (or an authenticated ``ERROR``).
* ``GET /v1/health``.

The decrypted request ``{"messages": [{role, content}, ...], "params": {...}}`` goes to a
backend: an OpenAI-compatible server (vLLM, SGLang) inside the enclave or a local callable.
Malformed requests get a 4xx with a reason (never a 5xx); a failing backend gets 502 or an
authenticated ERROR frame. Plaintext is never logged. Sessions, handshakes and slow clients
are bounded by :class:`EnclaveLimits` (flags and defaults: docs/minion.md, "Abuse limits").

Run: ``python -m fedprompt.minion.enclave_server --host 0.0.0.0 --port 8443
--tls-cert cert.pem --tls-key key.pem --backend http://127.0.0.1:8000 --model NAME``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import importlib
import ipaddress
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from pydantic_core import from_json
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from fedprompt.errors import ConfigError, FedPromptError
from fedprompt.minion.attestation import (
    AttestationProvider,
    InsecureMockAttestation,
    NvidiaGpuAttestation,
)
from fedprompt.minion.channel import (
    NONCE_BYTES,
    PUBLIC_KEY_BYTES,
    SUITE,
    ChannelError,
    DecryptionError,
    FrameFormatError,
    FrameKind,
    HandshakeError,
    OutOfOrderError,
    ReplayError,
    SecureChannel,
    ServerHandshake,
    decode_frame,
    encode_frame,
    encode_record,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 48 * 1024 * 1024
MAX_ATTESTATION_BODY_BYTES = 4096
FRAME_MEDIA_TYPE = "application/vnd.fedprompt.minion-frame"
FRAME_STREAM_MEDIA_TYPE = "application/vnd.fedprompt.minion-frames"
MAX_MESSAGES = 4096
ALLOWED_PARAMS = {"temperature", "max_tokens", "top_p", "stop", "response_format", "seed"}
ROLES = {"system", "user", "assistant", "tool"}
MESSAGE_KEYS = {"role", "content"}
MAX_JSON_DEPTH = 32  # a chat request needs 3 levels; a JSON schema in response_format a few more
MAX_TOKENS_PARAM = 2**31 - 1
MAX_STOP = 16


class BackendError(FedPromptError):
    """The model backend failed; its details stay inside the enclave."""


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Completion:
    text: str
    done_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)


class ChatBackend(Protocol):
    def complete(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion: ...

    def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]: ...


BackendFn = Callable[[list[dict[str, Any]], dict[str, Any]], str | Iterable[str]]


class CallableBackend:
    """A local callable ``fn(messages, params) -> str | Iterable[str]`` (tests, local models)."""

    def __init__(self, fn: BackendFn) -> None:
        self.fn = fn

    def complete(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion:
        out = self.fn(messages, params)
        return Completion(out if isinstance(out, str) else "".join(out))

    def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]:
        out = self.fn(messages, params)
        if isinstance(out, str):
            yield out
        else:
            yield from out


class EchoBackend(CallableBackend):
    """Demo/benchmark backend: answers with the last user message after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        def echo(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
            time.sleep(delay_s)
            return str(messages[-1].get("content", "")) if messages else ""

        super().__init__(echo)


class OpenAICompatibleBackend:
    """An OpenAI-compatible chat endpoint inside the enclave (vLLM, SGLang)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 600.0) -> None:
        import httpx

        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                  timeout=timeout_s)

    def _body(self, messages: list[dict[str, Any]], params: dict[str, Any],
              stream: bool) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, "stream": stream, **params}

    def complete(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Completion:
        resp = self._http.post("/v1/chat/completions", json=self._body(messages, params, False))
        if resp.status_code != 200:
            raise BackendError(f"backend answered HTTP {resp.status_code}")
        data = resp.json()
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            reason = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError("backend answer is not an OpenAI chat completion") from exc
        usage = {k: int(v) for k, v in (data.get("usage") or {}).items()
                 if k in ("prompt_tokens", "completion_tokens") and isinstance(v, int)}
        return Completion(text, reason, usage)

    def stream(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]:
        body = self._body(messages, params, True)
        with self._http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise BackendError(f"backend answered HTTP {resp.status_code}")
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    delta = json.loads(payload)["choices"][0].get("delta", {}).get("content")
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise BackendError("backend stream chunk is malformed") from exc
                if delta:
                    yield delta
        raise BackendError("backend stream ended without [DONE]")


# --------------------------------------------------------------------------- wire models

class AttestationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nonce: Annotated[StrictStr, Field(max_length=64)]
    client_public_key: Annotated[StrictStr, Field(max_length=64)]


class ApiError(Exception):
    """A request problem answered with ``status`` and a reason (never plaintext)."""

    def __init__(self, status: int, code: str, detail: str, *,
                 retry_after_s: float | None = None, close: bool = False) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers: dict[str, str] = {}
        if retry_after_s is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
        if close:  # the rest of the request is not read: the connection cannot be reused
            self.headers["Connection"] = "close"


def _b64(value: str, name: str, length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise ApiError(400, "bad_base64", f"{name} is not valid base64") from exc
    if length is not None and len(raw) != length:
        raise ApiError(400, "bad_length", f"{name} must decode to {length} bytes")
    return raw


def _bad(detail: str) -> ApiError:
    return ApiError(400, "bad_payload", detail)


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (scalars 0, ``[]`` 1), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def load_json_payload(plaintext: bytes) -> Any:
    """Parse decrypted JSON with bounded nesting (:data:`MAX_JSON_DEPTH`), or raise a 400.

    ``pydantic_core.from_json`` parses without unbounded recursion (it stops at a fixed depth
    with an error), unlike ``json.loads``, whose ``RecursionError`` on deep input used to
    surface as HTTP 500; the result's depth is then checked against our tighter limit.
    NaN and Infinity are refused (they are not JSON and break backends).
    """
    too_deep = f"decrypted payload nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        data = from_json(plaintext, allow_inf_nan=False)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise _bad(too_deep) from exc
        raise _bad(f"decrypted payload is not UTF-8 JSON ({exc})") from exc
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise _bad(too_deep)
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise _bad(f"message {i} must be an object {{role, content}}")
    if set(m) - MESSAGE_KEYS:
        raise _bad(f"message {i} has unknown keys (allowed: {', '.join(sorted(MESSAGE_KEYS))})")
    role = m.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _bad(f"message {i}: role must be one of {', '.join(sorted(ROLES))}")
    if not isinstance(m.get("content"), str):
        raise _bad(f"message {i}: content must be a string")
    return m


def _check_params(params: Any) -> dict[str, Any]:
    """Each sampling parameter has one type and range; anything else would reach the backend."""
    if not isinstance(params, dict):
        raise _bad("params must be an object")
    unknown = set(params) - ALLOWED_PARAMS
    if unknown:
        raise _bad(f"params keys must be among {', '.join(sorted(ALLOWED_PARAMS))}")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "temperature": (lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]"),
        "top_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "max_tokens": (lambda v: _is_int(v) and 1 <= v <= MAX_TOKENS_PARAM,
                       f"an integer in [1, {MAX_TOKENS_PARAM}]"),
        "seed": (lambda v: _is_int(v) and -(2**63) <= v < 2**63, "a 64-bit integer"),
        "stop": (lambda v: isinstance(v, str) or (
            isinstance(v, list) and len(v) <= MAX_STOP and all(isinstance(x, str) for x in v)),
            f"a string or a list of at most {MAX_STOP} strings"),
        "response_format": (_valid_response_format,
                            '{"type": "text"|"json_object"} or '
                            '{"type": "json_schema", "json_schema": {...}}'),
    }
    for key, value in params.items():
        valid, expected = checks[key]
        if not valid(value):
            raise _bad(f"params.{key} must be {expected}")
    return params


def _valid_response_format(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return False
    if value["type"] in ("text", "json_object"):
        return set(value) == {"type"}
    return (value["type"] == "json_schema" and set(value) == {"type", "json_schema"}
            and isinstance(value["json_schema"], dict))


def parse_chat_payload(plaintext: bytes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Validate a decrypted request ``{"messages": [{role, content}, ...], "params": {...}}``.

    Every field is type-checked before anything else touches it (a list where a string
    belongs must give 400, not a ``TypeError`` and 500), and nesting is bounded. Errors name
    the field and the expected shape, never the content.
    """
    data = load_json_payload(plaintext)
    if not isinstance(data, dict) or set(data) - {"messages", "params"}:
        raise _bad("payload must be an object {messages, params}")
    messages, params = data.get("messages"), data.get("params", {})
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise _bad(f"messages must be a list of 1..{MAX_MESSAGES}")
    return [_check_message(i, m) for i, m in enumerate(messages)], _check_params(params)


# --------------------------------------------------------------------------- sessions

@dataclass(frozen=True)
class EnclaveLimits:
    """What one client can hold or cost the server (``fedprompt-enclave`` flags, docs/minion.md).

    Sessions live in two pools. *Unconfirmed* ones (handshake done, no authenticated message
    yet) are at most ``max_pending_sessions`` and expire after ``pending_session_ttl_s``; a
    handshake flood only ever evicts other unconfirmed sessions. *Active* ones (at least one
    message authenticated) are at most ``max_sessions`` and expire after ``session_ttl_s``
    idle; when full, a newly confirmed session may only replace one idle for at least
    ``evict_idle_s``, otherwise it is refused with 429. Handshakes are rate-limited per
    client address (token bucket: ``attest_rate_per_s`` sustained, ``attest_burst`` at once).
    With the defaults one address cannot even fill the unconfirmed pool
    (5/s x 120 s + 30 < 1024).

    Slow clients: a request body must arrive within ``body_timeout_s`` (else 408), request
    headers within ``header_timeout_s`` of the connection opening or of the previous
    response (else the connection is closed); idle keep-alive connections close after
    ``keep_alive_s``; uvicorn answers 503 beyond ``limit_concurrency`` connections or tasks
    and 400 to a header block over ``max_header_bytes``.
    """

    max_sessions: int = 1024
    session_ttl_s: float = 3600.0
    max_pending_sessions: int = 1024
    pending_session_ttl_s: float = 120.0
    evict_idle_s: float = 600.0
    attest_rate_per_s: float = 5.0
    attest_burst: int = 30
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    limit_concurrency: int = 512
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_pending_sessions", "attest_burst",
                     "limit_concurrency", "max_header_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("session_ttl_s", "pending_session_ttl_s", "evict_idle_s",
                     "attest_rate_per_s", "body_timeout_s", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclass
class _Entry:
    channel: SecureChannel
    last_used: float  # creation, then the last authenticated message


class SessionStore:
    """Bounded session table in two pools (see :class:`EnclaveLimits`).

    A session enters as unconfirmed (:meth:`add`) and becomes active on its first
    authenticated message (:meth:`confirm`). Only :meth:`confirm` refreshes a session:
    :meth:`get` happens before authentication, so frames from a third party that knows a
    session id can neither keep it alive nor promote it.
    """

    def __init__(self, limits: EnclaveLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or EnclaveLimits()
        self._clock = clock
        self._pending: OrderedDict[bytes, _Entry] = OrderedDict()  # oldest first
        self._active: OrderedDict[bytes, _Entry] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()

    def _purge(self, pool: OrderedDict[bytes, _Entry], ttl_s: float, now: float) -> None:
        while pool:
            entry = next(iter(pool.values()))
            if now - entry.last_used <= ttl_s:
                return
            pool.popitem(last=False)

    def add(self, channel: SecureChannel) -> None:
        """A freshly attested session; evicts only the oldest *unconfirmed* one when full."""
        with self._lock:
            now = self._clock()
            self._purge(self._pending, self.limits.pending_session_ttl_s, now)
            self._pending[channel.session_id] = _Entry(channel, now)
            while len(self._pending) > self.limits.max_pending_sessions:
                self._pending.popitem(last=False)

    def get(self, session_id: bytes) -> SecureChannel:
        """The session's channel (not refreshed), or 404 when unknown or expired."""
        with self._lock:
            now = self._clock()
            for pool, ttl_s in ((self._active, self.limits.session_ttl_s),
                                (self._pending, self.limits.pending_session_ttl_s)):
                entry = pool.get(session_id)
                if entry is None:
                    continue
                if now - entry.last_used > ttl_s:
                    del pool[session_id]
                    raise ApiError(404, "unknown_session", "session expired; re-attest")
                return entry.channel
        raise ApiError(404, "unknown_session", "unknown or expired session; re-attest")

    def confirm(self, channel: SecureChannel) -> None:
        """Record an authenticated message: refresh an active session or promote a new one.

        A promotion into a full active pool evicts the least recently used session only if
        it has been idle for ``evict_idle_s``; otherwise the new session is dropped and the
        request refused with 429 (the client re-attests later), so sessions in use are never
        pushed out by newcomers.
        """
        sid = channel.session_id
        with self._lock:
            now = self._clock()
            entry = self._active.get(sid)
            if entry is not None:
                entry.last_used = now
                self._active.move_to_end(sid)
                return
            self._pending.pop(sid, None)
            self._purge(self._active, self.limits.session_ttl_s, now)
            if len(self._active) >= self.limits.max_sessions:
                oldest_sid, oldest = next(iter(self._active.items()))
                idle = now - oldest.last_used
                if idle < self.limits.evict_idle_s:
                    raise ApiError(429, "sessions_full",
                                   "every active session is in recent use; re-attest later",
                                   retry_after_s=self.limits.evict_idle_s - idle)
                del self._active[oldest_sid]
                logger.info("session %s evicted after %.0f s idle", oldest_sid.hex()[:8], idle)
            self._active[sid] = _Entry(channel, now)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def __len__(self) -> int:
        return len(self._pending) + len(self._active)


def client_source(host: str | None) -> str:
    """The rate-limit key of a peer address: the IPv4 address, or the IPv6 /64.

    One IPv6 host usually owns a whole /64, so keying by address would give it 2**64
    buckets. IPv4-mapped IPv6 counts as IPv4; a non-IP peer name is used as is.
    """
    if not host:
        return "unknown"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class HandshakeRateLimiter:
    """Token bucket per source: ``rate_per_s`` handshakes per second, ``burst`` at once.

    At most ``max_sources`` buckets are kept (least recently seen dropped first), so the
    table itself stays bounded; a dropped source merely starts again with a full bucket.
    """

    def __init__(self, rate_per_s: float, burst: int, *, max_sources: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s, self.burst, self.max_sources = rate_per_s, burst, max_sources
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, time
        self._lock = threading.Lock()

    def acquire(self, source: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token is available."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.pop(source, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_s)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate_per_s
            self._buckets[source] = (tokens, now)
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
            return wait


# --------------------------------------------------------------------------- app

async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing more than ``limit`` bytes before buffering it all.

    The whole body must arrive within ``timeout_s`` (408 otherwise), so a client trickling
    bytes cannot hold a connection and a task indefinitely. A client that disconnects
    mid-body gets an ApiError too (nobody reads the answer), so it is logged in one line by
    the ApiError handler instead of a traceback.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "body_too_large", f"request body must be <= {limit} B", close=True)
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, "body_too_large", f"request body must be <= {limit} B",
                                   close=True)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(408, "body_timeout", f"request body not received within {timeout_s:g} s "
                       f"({total} B arrived)", close=True) from exc
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected",
                       f"client disconnected after {total} B of the body") from exc
    return b"".join(chunks)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def create_app(backend: ChatBackend, provider: AttestationProvider, *,
               limits: EnclaveLimits | None = None) -> FastAPI:
    """The enclave ASGI app; ``limits`` bounds sessions and handshakes (defaults if None).

    Handshakes are rate-limited by the TCP peer address (``request.client.host``). The app
    never reads ``X-Forwarded-For``; behind a proxy, let uvicorn rewrite the peer address
    (``--forwarded-allow-ips``), which :func:`main` leaves off by default.
    """
    limits = limits or EnclaveLimits()
    app = FastAPI(title="fedprompt Minion enclave", docs_url=None, redoc_url=None,
                  openapi_url=None)
    store = SessionStore(limits)
    limiter = HandshakeRateLimiter(limits.attest_rate_per_s, limits.attest_burst)
    app.state.sessions = store
    app.state.handshake_limiter = limiter
    if provider.insecure:
        logger.warning("enclave server uses INSECURE mock attestation (tests/demos only)")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        logger.info("rejected %s: %s", request.url.path, exc.code)
        response = _error(exc.status, exc.code, exc.detail)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Say where and what, never echo the input.
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()[:5])
        logger.info("rejected %s: invalid request", request.url.path)
        return _error(422, "invalid_request", reasons or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "suite": SUITE.decode(), "provider": provider.name,
                "insecure_attestation": provider.insecure}

    @app.post("/v1/attestation")
    async def attestation(request: Request) -> JSONResponse:
        # Before any work (body, key exchange, evidence): refusing must stay cheap.
        wait = limiter.acquire(client_source(request.client.host if request.client else None))
        if wait:
            raise ApiError(429, "rate_limited",
                           "too many attestation handshakes from this address; retry later",
                           retry_after_s=wait)
        raw = await _read_body(request, MAX_ATTESTATION_BODY_BYTES, limits.body_timeout_s)
        try:
            req = AttestationRequest.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        return JSONResponse(await run_in_threadpool(_attest, req))

    def _attest(req: AttestationRequest) -> dict[str, Any]:
        nonce = _b64(req.nonce, "nonce", NONCE_BYTES)
        client_pub = _b64(req.client_public_key, "client_public_key", PUBLIC_KEY_BYTES)
        try:
            hs = ServerHandshake.accept(client_pub, nonce)
        except HandshakeError as exc:
            raise ApiError(400, "bad_handshake", str(exc)) from exc
        except ValueError as exc:  # X25519 rejected the point
            raise ApiError(400, "bad_handshake", "client public key is unusable") from exc
        try:
            evidence = provider.generate(hs.binding, nonce)
        except Exception as exc:
            logger.error("attestation provider failed: %s", type(exc).__name__)
            raise ApiError(503, "attestation_unavailable",
                           f"attestation provider failed ({type(exc).__name__})") from exc
        store.add(hs.channel)
        logger.info("session %s attested (%s)", hs.session_id.hex()[:8], provider.name)
        return {"suite": SUITE.decode(),
                "session_id": base64.b64encode(hs.session_id).decode("ascii"),
                "server_public_key": base64.b64encode(hs.server_public_key).decode("ascii"),
                "evidence": evidence.to_json()}

    def _open_request(body: bytes) -> tuple[SecureChannel, list[dict[str, Any]],
                                            dict[str, Any]]:
        try:
            session_id, frame = decode_frame(body)
        except FrameFormatError as exc:
            raise ApiError(400, "FrameFormatError", str(exc)) from exc
        channel = store.get(session_id)
        if frame.kind is not FrameKind.MESSAGE:
            raise ApiError(400, "bad_frame", "requests must be MESSAGE frames")
        try:
            plaintext = channel.open(frame)
        except (ReplayError, OutOfOrderError) as exc:
            raise ApiError(409, type(exc).__name__, str(exc)) from exc
        except (DecryptionError, FrameFormatError) as exc:
            raise ApiError(400, type(exc).__name__, str(exc)) from exc
        store.confirm(channel)  # authenticated: the session is in use (may answer 429)
        messages, params = parse_chat_payload(plaintext)
        logger.info("session %s frame %d: %d message(s), %d B",
                    channel.session_id.hex()[:8], frame.counter, len(messages), len(plaintext))
        return channel, messages, params

    def _complete(body: bytes) -> bytes:
        channel, messages, params = _open_request(body)
        try:
            completion = backend.complete(messages, params)
        except Exception as exc:
            logger.error("backend failed: %s", type(exc).__name__)
            raise ApiError(502, "backend_error", f"backend failed ({type(exc).__name__})") from exc
        reply = json.dumps({"content": completion.text, "done_reason": completion.done_reason,
                            "usage": completion.usage}).encode()
        return encode_frame(channel.session_id, channel.seal(reply, FrameKind.MESSAGE))

    @app.post("/v1/message")
    async def message(request: Request) -> Response:
        """Body and answer: one binary frame (:func:`~fedprompt.minion.channel.encode_frame`)."""
        body = await _read_body(request, MAX_BODY_BYTES, limits.body_timeout_s)
        return Response(await run_in_threadpool(_complete, body), media_type=FRAME_MEDIA_TYPE)

    @app.post("/v1/message/stream")
    async def message_stream(request: Request) -> StreamingResponse:
        """Body: one binary frame. Answer: length-prefixed frames, DATA* then END or ERROR."""
        body = await _read_body(request, MAX_BODY_BYTES, limits.body_timeout_s)
        channel, messages, params = await run_in_threadpool(_open_request, body)
        sid = channel.session_id

        def records() -> Iterator[bytes]:
            chunks = 0
            try:
                for delta in backend.stream(messages, params):
                    if not delta:
                        continue
                    chunks += 1
                    payload = json.dumps({"delta": delta}).encode()
                    yield encode_record(sid, channel.seal(payload, FrameKind.DATA))
            except ChannelError:
                raise
            except Exception as exc:
                logger.error("backend stream failed: %s", type(exc).__name__)
                reason = f"backend failed ({type(exc).__name__})".encode()
                yield encode_record(sid, channel.seal(reason, FrameKind.ERROR))
                return
            end = json.dumps({"done_reason": "stop", "chunks": chunks}).encode()
            yield encode_record(sid, channel.seal(end, FrameKind.END))

        return StreamingResponse(records(), media_type=FRAME_STREAM_MEDIA_TYPE)

    return app


# --------------------------------------------------------------------------- http server

def header_deadline_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol plus a deadline for each request's headers.

    uvicorn has no header read timeout: a connection that never finishes its request
    headers (slowloris) is held until the client gives up, and trickling bytes after a
    response even cancels the keep-alive timer. The deadline starts when the connection
    opens and again after each response, and is cleared once a request's headers are
    complete; when it passes the connection is closed (there is no request to answer yet).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11Protocol(H11Protocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expired(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                logger.info("closed connection from %s: request headers not complete within "
                            "%g s", self.client[0] if self.client else "?", header_timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11Protocol


def uvicorn_config(app: FastAPI, limits: EnclaveLimits, **kwargs: Any) -> Any:
    """The ``uvicorn.Config`` that enforces the connection-level ``limits``.

    ``kwargs`` go to uvicorn as they are (host, port, TLS files, log level). WebSocket
    upgrades are off (the server has no WebSocket route). Proxy headers
    are off unless ``forwarded_allow_ips`` is given: uvicorn would otherwise trust
    ``X-Forwarded-For`` from 127.0.0.1, and a client must not choose the address its
    handshakes are rate-limited under.
    """
    import uvicorn

    kwargs.setdefault("forwarded_allow_ips", None)
    return uvicorn.Config(
        app, http=header_deadline_protocol(limits.header_timeout_s), ws="none",
        timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.limit_concurrency,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        proxy_headers=kwargs["forwarded_allow_ips"] is not None, **kwargs)


# --------------------------------------------------------------------------- command

def write_self_signed_cert(directory: Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                           days: int = 7) -> tuple[Path, Path]:
    """A self-signed P-256 certificate and key (PEM) for loopback demos and benchmarks."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def load_backend(spec: str, model: str | None = None, api_key: str | None = None,
                 echo_delay_s: float = 0.0) -> ChatBackend:
    """``http(s)://...`` (OpenAI-compatible), ``callable:module:attr`` or ``echo``."""
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ConfigError("an OpenAI-compatible backend needs --model")
        return OpenAICompatibleBackend(spec, model, api_key)
    if spec.startswith("callable:"):
        target = spec[len("callable:"):]
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise ConfigError("callable backend must be 'callable:package.module:function'")
        fn = getattr(importlib.import_module(module_name), attr)
        return fn if hasattr(fn, "complete") and hasattr(fn, "stream") else CallableBackend(fn)
    if spec == "echo":
        return EchoBackend(echo_delay_s)
    raise ConfigError(f"unknown backend {spec!r}: use http(s)://URL, callable:mod:attr or echo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedprompt.minion.enclave_server",
                                description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--tls-cert", required=True, help="PEM certificate (chain)")
    p.add_argument("--tls-key", required=True, help="PEM private key")
    p.add_argument("--backend", required=True,
                   help="http(s)://URL of a vLLM/SGLang server, callable:module:function, or echo")
    p.add_argument("--model", default=None, help="model name for an OpenAI-compatible backend")
    p.add_argument("--api-key-env", default=None,
                   help="name of an environment variable holding the backend's API key")
    p.add_argument("--echo-delay-ms", type=float, default=0.0)
    p.add_argument("--attestation", choices=["nvidia", "insecure-mock"], default="nvidia")
    p.add_argument("--allow-insecure-mock-attestation", action="store_true",
                   help="required with --attestation insecure-mock (tests and demos only)")
    d = EnclaveLimits()
    p.add_argument("--max-sessions", type=int, default=d.max_sessions,
                   help="active sessions (at least one authenticated message) kept at most")
    p.add_argument("--session-ttl", type=float, default=d.session_ttl_s, metavar="S",
                   help="an active session idle this long expires")
    p.add_argument("--max-pending-sessions", type=int, default=d.max_pending_sessions,
                   help="unconfirmed sessions (handshake, no message yet) kept at most; only "
                        "these are evicted by new handshakes")
    p.add_argument("--pending-session-ttl", type=float, default=d.pending_session_ttl_s,
                   metavar="S", help="an unconfirmed session expires this long after its handshake")
    p.add_argument("--evict-idle", type=float, default=d.evict_idle_s, metavar="S",
                   help="with the active pool full, a new session may replace one idle this long"
                        " (else 429)")
    p.add_argument("--attest-rate", type=float, default=d.attest_rate_per_s, metavar="PER_S",
                   help="attestation handshakes per second per client address (token bucket)")
    p.add_argument("--attest-burst", type=int, default=d.attest_burst,
                   help="attestation handshakes one client address may make at once")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="S",
                   help="a request body not received within this gets 408")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="S",
                   help="a connection whose request headers are not complete within this "
                        "(after opening or after the previous response) is closed")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s, metavar="S",
                   help="an idle keep-alive connection is closed after this")
    p.add_argument("--limit-concurrency", type=int, default=d.limit_concurrency,
                   help="connections or requests in progress beyond which uvicorn answers 503")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="largest request header block (h11 incomplete event size)")
    p.add_argument("--forwarded-allow-ips", default=None, metavar="IPS",
                   help="trust X-Forwarded-For/-Proto only from these proxy addresses "
                        "(comma-separated); off by default: rate limits key on the TCP peer")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> None:
    import os

    import uvicorn

    args = build_parser().parse_args(argv)
    if args.attestation == "insecure-mock":
        if not args.allow_insecure_mock_attestation:
            raise ConfigError("--attestation insecure-mock needs "
                              "--allow-insecure-mock-attestation (tests and demos only)")
        provider: AttestationProvider = InsecureMockAttestation()
    else:
        provider = NvidiaGpuAttestation()
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    backend = load_backend(args.backend, args.model, api_key, args.echo_delay_ms / 1000)
    limits = EnclaveLimits(
        max_sessions=args.max_sessions, session_ttl_s=args.session_ttl,
        max_pending_sessions=args.max_pending_sessions,
        pending_session_ttl_s=args.pending_session_ttl, evict_idle_s=args.evict_idle,
        attest_rate_per_s=args.attest_rate, attest_burst=args.attest_burst,
        body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive_timeout, limit_concurrency=args.limit_concurrency,
        max_header_bytes=args.max_header_bytes)
    app = create_app(backend, provider, limits=limits)
    logging.basicConfig(level=args.log_level.upper())
    config = uvicorn_config(app, limits, host=args.host, port=args.port,
                            ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                            log_level=args.log_level, forwarded_allow_ips=args.forwarded_allow_ips)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
