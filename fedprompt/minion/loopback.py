"""Start the reference enclave server as a local subprocess over TLS (demos and tests).

:class:`LoopbackEnclave` makes a self-signed certificate, starts
``python -m fedprompt.minion.enclave_server`` on a free loopback port with the given
backend, waits for ``/v1/health`` and stops the process on exit. ``insecure_mock=True``
starts it with the clearly labelled INSECURE mock attestation (opted in on the command
line); clients must opt in too (``SecureChatClient(..., allow_insecure_mock=True)``).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from fedprompt.errors import FedPromptError
from fedprompt.minion.enclave_server import write_self_signed_cert


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

class LoopbackEnclaveError(FedPromptError):
    """The enclave server process did not come up."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackEnclave:
    """Context manager: ``with LoopbackEnclave(backend) as enclave: enclave.url, .cert``."""

    def __init__(self, backend: str, *, insecure_mock: bool = True,
                 workdir: str | Path | None = None, extra_pythonpath: tuple[str, ...] = (),
                 startup_timeout_s: float = 60.0) -> None:
        self.backend = backend
        self.insecure_mock = insecure_mock
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="enclave-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.extra_pythonpath = extra_pythonpath
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = self.workdir / "server.log"
        self.cert, self.key = write_self_signed_cert(self.workdir / "tls")
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LoopbackEnclave:
        cmd = [sys.executable, "-m", "fedprompt.minion.enclave_server", "--host", "127.0.0.1",
               "--port", str(self.port), "--tls-cert", str(self.cert),
               "--tls-key", str(self.key), "--backend", self.backend, "--log-level", "warning"]
        if self.insecure_mock:
            cmd += ["--attestation", "insecure-mock", "--allow-insecure-mock-attestation"]
        repo = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join([*self.extra_pythonpath, repo,
                                os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = {**os.environ, "PYTHONPATH": path}
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          cwd=self.workdir)
        tls = ssl.create_default_context(cafile=str(self.cert))
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                if self._proc.poll() is not None:
                    raise LoopbackEnclaveError(
                        f"the enclave server exited with {self._proc.returncode}:\n"
                        f"{self.log.read_text(errors='replace')[-2000:]}")
                try:
                    if httpx.get(self.url + "/v1/health", verify=tls).status_code == 200:
                        return self
                except httpx.TransportError as exc:
                    if time.monotonic() > deadline:
                        raise LoopbackEnclaveError(
                            f"the enclave server did not answer within "
                            f"{self.startup_timeout_s:.0f} s") from exc
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
