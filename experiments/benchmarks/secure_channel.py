"""Overhead of the secure Minion channel versus plaintext, over TLS on loopback.

    python experiments/benchmarks/secure_channel.py [--tokens 1000 8000 32000]
        [--repeats 20] [--backend-ms 100] [--reply-tokens 256]

Two figures per message size (~4 bytes per token of prompt, one user message):

* crypto: microseconds per message for the channel work, on one side and for a full
  exchange (client seal + server open of the request, server seal + client open of a
  ``--reply-tokens`` reply), binary framing and the payload's JSON encoding included
  (the plaintext route pays that JSON too, so this over-counts the channel's own share);
* end to end: median latency of one request against a server process (uvicorn + TLS,
  loopback) whose backend answers after ``--backend-ms``; secure = attested session +
  ``/v1/message``, plaintext = the same server's unencrypted ``/plain/message`` route with
  the same JSON body. Overhead share = (secure - plaintext) / secure; crypto share =
  crypto exchange time / secure latency. Attestation and key exchange are per session and
  reported separately.

Prints a table, then as its last line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request

from fedprompt.minion.loopback import terminate


def _reply_text(tokens: int) -> str:
    return ("word " * tokens)[: tokens * 4]


def serve(port: int, cert: str, key: str, backend_ms: float, reply_tokens: int) -> None:
    import uvicorn
    from starlette.concurrency import run_in_threadpool

    from fedprompt.minion.attestation import InsecureMockAttestation
    from fedprompt.minion.enclave_server import CallableBackend, create_app

    reply = _reply_text(reply_tokens)

    def backend(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        time.sleep(backend_ms / 1000)
        return reply

    app = create_app(CallableBackend(backend), InsecureMockAttestation())

    @app.post("/plain/message")
    async def plain(request: Request) -> dict[str, Any]:
        body = await request.json()
        # Same work as the secure route minus the channel: parse, call the backend, answer.
        text = await run_in_threadpool(backend, body["messages"], body.get("params", {}))
        return {"content": text, "done_reason": "stop", "usage": {}}

    uvicorn.run(app, host="127.0.0.1", port=port, ssl_certfile=cert, ssl_keyfile=key,
                log_level="warning")


def crypto_micro(tokens: int, reply_tokens: int, repeats: int) -> dict[str, float]:
    from fedprompt.minion.channel import (
        ClientHandshake,
        FrameKind,
        ServerHandshake,
        decode_frame,
        encode_frame,
    )

    hs = ClientHandshake()
    srv = ServerHandshake.accept(hs.public_key, hs.nonce)
    client, server = hs.complete(srv.session_id, srv.server_public_key), srv.channel
    messages = [{"role": "user", "content": "x" * (4 * tokens)}]
    reply = json.dumps({"content": _reply_text(reply_tokens), "done_reason": "stop",
                        "usage": {}}).encode()
    seal_c, open_s, seal_s, open_c = [], [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        wire = encode_frame(client.session_id, client.seal(
            json.dumps({"messages": messages, "params": {}}).encode()))
        t1 = time.perf_counter()
        json.loads(server.open(decode_frame(wire)[1]))
        t2 = time.perf_counter()
        wire2 = encode_frame(server.session_id, server.seal(reply, FrameKind.MESSAGE))
        t3 = time.perf_counter()
        json.loads(client.open(decode_frame(wire2)[1]))
        t4 = time.perf_counter()
        seal_c.append(t1 - t0)
        open_s.append(t2 - t1)
        seal_s.append(t3 - t2)
        open_c.append(t4 - t3)
    us = 1e6
    med = statistics.median
    return {"seal_request_us": med(seal_c) * us, "open_request_us": med(open_s) * us,
            "seal_reply_us": med(seal_s) * us, "open_reply_us": med(open_c) * us,
            "exchange_us": (med(seal_c) + med(open_s) + med(seal_s) + med(open_c)) * us,
            "request_bytes": len(wire)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1000, 8000, 32000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend-ms", type=float, default=100.0)
    p.add_argument("--reply-tokens", type=int, default=256)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cert", default=None, help=argparse.SUPPRESS)
    p.add_argument("--key", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.cert, args.key, args.backend_ms, args.reply_tokens)
        return

    from fedprompt.minion.attestation import InsecureMockAttestation
    from fedprompt.minion.enclave_server import write_self_signed_cert
    from fedprompt.minion.secure_client import SecureChatClient

    results: dict[str, Any] = {"backend_ms": args.backend_ms, "reply_tokens": args.reply_tokens,
                               "repeats": args.repeats, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = write_self_signed_cert(Path(tmp))
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), "--cert", str(cert), "--key",
             str(key), "--backend-ms", str(args.backend_ms), "--reply-tokens",
             str(args.reply_tokens)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            url = f"https://127.0.0.1:{port}"
            client = SecureChatClient(url, InsecureMockAttestation(), allow_insecure_mock=True,
                                      ca_cert=cert)
            deadline = time.monotonic() + 30
            while True:
                try:
                    session = client.attest()
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.2)
            attest_s = []
            for _ in range(5):
                t0 = time.perf_counter()
                session = client.attest()
                attest_s.append(time.perf_counter() - t0)
            results["attestation_and_key_exchange_ms"] = statistics.median(attest_s) * 1e3
            results["key_exchange_ms"] = session.timing["key_exchange_s"] * 1e3
            plain_http = client._http  # same TLS connection pool, same server
            print(f"{'tokens':>7} {'req KiB':>8} {'seal us':>9} {'open us':>9} "
                  f"{'exch us':>9} {'plain ms':>9} {'secure ms':>10} {'overhead':>9} "
                  f"{'crypto%':>8}")
            for tokens in args.tokens:
                micro = crypto_micro(tokens, args.reply_tokens, max(args.repeats, 50))
                messages = [{"role": "user", "content": "x" * (4 * tokens)}]
                plain, secure = [], []
                client.send(messages)  # warm up
                plain_http.post("/plain/message", json={"messages": messages, "params": {}})
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    r = plain_http.post("/plain/message",
                                        json={"messages": messages, "params": {}})
                    r.raise_for_status()
                    r.json()
                    t1 = time.perf_counter()
                    client.send(messages)
                    t2 = time.perf_counter()
                    plain.append(t1 - t0)
                    secure.append(t2 - t1)
                p_ms = statistics.median(plain) * 1e3
                s_ms = statistics.median(secure) * 1e3
                row = {**micro, "plaintext_ms": p_ms, "secure_ms": s_ms,
                       "overhead_share": (s_ms - p_ms) / s_ms,
                       "crypto_share": micro["exchange_us"] / 1e3 / s_ms}
                results["sizes"][str(tokens)] = row
                print(f"{tokens:>7} {micro['request_bytes'] / 1024:>8.1f} "
                      f"{micro['seal_request_us']:>9.1f} {micro['open_request_us']:>9.1f} "
                      f"{micro['exchange_us']:>9.1f} {p_ms:>9.2f} {s_ms:>10.2f} "
                      f"{row['overhead_share']:>8.2%} {row['crypto_share']:>8.3%}")
            client.close()
        finally:
            terminate(proc)
    print(f"attestation + key exchange per session: "
          f"{results['attestation_and_key_exchange_ms']:.2f} ms (mock attestation)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
