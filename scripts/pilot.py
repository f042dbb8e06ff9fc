"""fedprompt on Flower's deployment engine (flwr 1.41): SuperLink, SuperNodes, ``flwr run``.

A small process manager for the multi-site pilot and its rehearsal on one machine:

* :meth:`Pilot.start_superlink`: ``flower-superlink`` with TLS (``--ssl-ca-certfile``,
  ``--ssl-certfile``, ``--ssl-keyfile``), SuperNode authentication
  (``--enable-supernode-auth``), a file database, ``--disable-runtime-dependency-
  installation``, on ``host:port`` (Fleet, Control and Runtime APIs share that one port
  in 1.41). Writes the connection ``[superlink.<name>]`` (address + ``root-certificates``)
  into ``$FLWR_HOME/config.toml`` for the ``flwr`` CLI.
* :meth:`Pilot.register_supernode`: ``flwr supernode register <key.pub> <connection>``.
* :meth:`Pilot.start_supernode`: ``flower-supernode --root-certificates ...
  --auth-supernode-private-key ... --node-config "partition-id=i num-partitions=N
  state-dir='<work_dir>/state/<key name>'" --port <own runtime port>``;
  :meth:`Pilot.wait_online` waits until it is activated. Every SuperNode gets a state
  folder of its own (keyed by its key, so a SuperNode restarted with the same key finds
  its state and spent privacy budget again); :meth:`Pilot.kill` kills one (a crash).
* :meth:`Pilot.run`: ``flwr run <app> <connection> --run-config ... --stream``, then the
  run's final status from ``flwr list --run-id`` (:meth:`Pilot.start_run` and
  :meth:`Pilot.wait_run` do the same in two steps, to act on nodes during the run).
* :meth:`Pilot.stop`: SIGTERM, then SIGKILL, to every process started here and to all
  their descendants (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``; the
  SuperLink starts its SuperExec in a new session, so process groups alone miss it).
  Every process started here carries a marker environment variable, so descendants that
  were re-parented are still found; nothing else on the machine is touched.

Every wait has a timeout; every subprocess writes to ``<work_dir>/logs/<name>.log``; a
failure raises :class:`PilotError` with the tail of the relevant logs.

Command line (a rehearsal on one machine; see docs/deployment.md for real sites)::

    python scripts/pilot.py --certs certs --supernodes 2 --work-dir /tmp/pilot \\
        --run-config "federation.rounds=2 output_dir='/tmp/pilot/results'"

This module imports no Flower code: it drives the installed ``flwr`` executables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

REPO = Path(__file__).resolve().parents[1]
MARKER = "FEDPROMPT_PILOT_TAG"
#: Environment for offline, quiet Flower processes (set unless already set).
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}
ACTIVATED = re.compile(r"SuperNode ID: (\d+)")
RUN_ID = re.compile(r"(?:Successfully started run|run_id `?)\s*`?(\d+)")


class PilotError(RuntimeError):
    """A step of the pilot failed; the message ends with the tails of the relevant logs."""


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def format_config(config: str | Mapping[str, Any] | Iterable[str] | None) -> str:
    """``{"federation.rounds": 2, "backbone.model": "clip-tiny"}`` -> ``k=v`` pairs."""
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping):
        return " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())
    return " ".join(config)


def _json_from(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the output")
    obj, _ = json.JSONDecoder().raw_decode(text[start:])
    return obj


def find_bin_dir() -> Path:
    """The folder holding ``flower-superlink`` (this interpreter's, else the PATH's)."""
    here = Path(sys.executable).parent  # not resolved: keep the virtualenv's bin
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found is None:
        raise PilotError("flower-superlink is not installed (activate the virtualenv)")
    return Path(found).parent


def configure_connection(flwr_home: Path, name: str, address: str,
                         root_certificates: Path | None, default: bool = False) -> Path:
    """Add/replace ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``; keep the rest."""
    path = Path(flwr_home) / "config.toml"
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if default or "default" not in links:
        links["default"] = name
    links.setdefault("local", {"address": ":local:"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


@dataclass
class ManagedProcess:
    """A long-running process started by :class:`Pilot` (its own session/process group)."""

    name: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code; :class:`PilotError` (with the log tail) on timeout."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PilotError(f"{self.name} still running after {timeout:.0f} s\n"
                             f"--- {self.log} ---\n{self.tail()}") from None


@dataclass
class RunResult:
    run_id: int | None
    status: str
    returncode: int
    log: Path
    seconds: float


class Pilot:
    """One SuperLink and N SuperNodes on this machine, with TLS and node authentication.

    ``certs_dir`` is what ``scripts/make_certificates.sh`` writes (``ca.crt``,
    ``server.crt``, ``server.key``, ``supernode-keys/supernode-<i>[.pub]``). ``flwr_home``
    (default ``<work_dir>/flwr-home``) holds the CLI connection and installed FABs.
    Use as a context manager: ``__exit__`` stops everything.
    """

    def __init__(self, work_dir: Path, certs_dir: Path, *, host: str = "127.0.0.1",
                 port: int | None = None, flwr_home: Path | None = None,
                 connection: str = "pilot", app_dir: Path = REPO,
                 bin_dir: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.certs = Path(certs_dir).resolve()
        self.host = host
        self.port = port or free_port(host)
        self.flwr_home = Path(flwr_home or self.work_dir / "flwr-home").resolve()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.connection = connection
        self.app_dir = Path(app_dir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.extra_env = dict(env or {})
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex}"
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[ManagedProcess] = []
        self.processes: list[ManagedProcess] = []
        self._counter = 0

    # ---------------------------------------------------------------- plumbing
    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in OFFLINE_ENV.items():
            env.setdefault(key, value)
        env.update(self.extra_env)
        env["FLWR_HOME"] = str(self.flwr_home)
        # flower-superlink/-supernode start flower-superexec, flwr-serverapp and
        # flwr-clientapp by name: they must be on PATH
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env[MARKER] = self.tag
        return env

    def _exe(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(self, name: str, cmd: list[str], cwd: Path | None = None) -> ManagedProcess:
        """Start ``cmd`` in a new session, output to ``logs/<name>.log``."""
        log = self._log_path(name)
        with log.open("ab") as handle:
            handle.write(f"$ {' '.join(cmd)}\n".encode())
            handle.flush()
            popen = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env(),
                                     cwd=str(cwd or self.work_dir), start_new_session=True)
        proc = ManagedProcess(name, popen, log, cmd)
        self.processes.append(proc)
        return proc

    def flwr(self, args: list[str], timeout: float = 120.0,
             name: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run one ``flwr`` CLI command (output also in ``logs/flwr-<n>-<cmd>.log``)."""
        self._counter += 1
        log = self._log_path(name or f"flwr-{self._counter:02d}-{args[0]}")
        cmd = [self._exe("flwr"), *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=self.env(),
                                  cwd=str(self.work_dir), timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            text = "\n".join(part.decode(errors="replace") if isinstance(part, bytes)
                             else str(part) for part in (exc.stdout, exc.stderr) if part)
            log.write_text(f"$ {' '.join(cmd)}\n{text}\n[timed out after {timeout} s]\n")
            raise PilotError(f"`flwr {' '.join(args)}` timed out after {timeout:.0f} s\n"
                             f"--- {log} ---\n{tail(log)}") from None
        log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}\n"
                       f"[exit {done.returncode}]\n")
        return done

    def _failure(self, message: str, *procs: ManagedProcess | Path, lines: int = 40) -> None:
        parts = [message]
        for item in procs:
            log = item.log if isinstance(item, ManagedProcess) else item
            parts.append(f"--- {log} ---\n{tail(log, lines)}")
        raise PilotError("\n".join(parts))

    # ---------------------------------------------------------------- SuperLink
    def start_superlink(self, timeout: float = 90.0, database: Path | None = None,
                        extra_args: Iterable[str] = ()) -> ManagedProcess:
        """Start the SuperLink and wait until it accepts connections."""
        if self.superlink is not None and self.superlink.alive():
            raise PilotError("a SuperLink is already running")
        if _port_open(self.host, self.port):
            raise PilotError(f"{self.address} is already in use")
        for name in ("ca.crt", "server.crt", "server.key"):
            if not (self.certs / name).is_file():
                raise PilotError(f"{self.certs / name} is missing: run "
                                 "scripts/make_certificates.sh first")
        database = Path(database or self.work_dir / "superlink.db").resolve()
        cmd = [self._exe("flower-superlink"),
               "--ssl-ca-certfile", str(self.certs / "ca.crt"),
               "--ssl-certfile", str(self.certs / "server.crt"),
               "--ssl-keyfile", str(self.certs / "server.key"),
               "--enable-supernode-auth",
               "--database", str(database),
               "--disable-runtime-dependency-installation",
               "--host", self.host, "--port", str(self.port), *extra_args]
        proc = self.start("superlink", cmd)
        self.superlink = proc
        configure_connection(self.flwr_home, self.connection, self.address,
                             self.certs / "ca.crt", default=True)
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if not proc.alive():
                self._failure(f"the SuperLink exited with code {proc.popen.returncode}", proc)
            if time.monotonic() > deadline:
                self._failure(f"the SuperLink did not open {self.address} in {timeout:.0f} s",
                              proc)
            time.sleep(0.3)
        return proc

    # ---------------------------------------------------------------- SuperNodes
    def register_supernode(self, public_key: Path, timeout: float = 120.0) -> int | None:
        """Register a SuperNode's public key; its node ID (None if it was registered)."""
        done = self.flwr(["supernode", "register", str(Path(public_key).resolve()),
                          self.connection, "--format", "json"], timeout=timeout)
        try:
            reply = _json_from(done.stdout)
        except ValueError:
            reply = {"success": False, "error-message": done.stdout + done.stderr}
        if reply.get("success"):
            return int(reply["node-id"])
        message = str(reply.get("error-message", ""))
        if "already in use" in message:
            return None
        raise PilotError(f"registering {public_key} failed: {message.strip()}\n"
                         f"--- superlink ---\n{self.superlink.tail() if self.superlink else ''}")

    def list_supernodes(self, timeout: float = 120.0) -> list[dict[str, Any]]:
        """``flwr supernode list --format json``: node-id, status, ... per node."""
        done = self.flwr(["supernode", "list", self.connection, "--format", "json"],
                         timeout=timeout)
        try:
            reply = _json_from(done.stdout)
        except ValueError:
            reply = {"success": False, "error-message": done.stdout + done.stderr}
        if not reply.get("success"):
            raise PilotError(f"flwr supernode list failed: {reply.get('error-message')}")
        return list(reply["nodes"])

    def key_paths(self, index: int) -> tuple[Path, Path]:
        """``(private, public)`` key of SuperNode ``index`` in ``certs/supernode-keys``."""
        private = self.certs / "supernode-keys" / f"supernode-{index}"
        return private, private.with_name(private.name + ".pub")

    def start_supernode(self, partition_id: int, num_partitions: int, *,
                        private_key: Path | None = None, port: int | None = None,
                        node_config: Mapping[str, Any] | None = None,
                        name: str | None = None, insecure: bool = False,
                        state_dir: Path | None = None,
                        extra_args: Iterable[str] = ()) -> ManagedProcess:
        """Start one SuperNode (not waiting for it; see :meth:`wait_online`).

        ``private_key`` defaults to ``certs/supernode-keys/supernode-<partition_id>``;
        ``port`` (its own Runtime API port, where its SuperExec and ClientApp processes
        connect) defaults to a free one. ``state_dir`` (node config ``state-dir``: where
        its clients keep their state and privacy ledgers) defaults to
        ``<work_dir>/state/<key file name>`` (``<name>`` without a key), so a SuperNode
        started again with the same key continues where it stopped. ``insecure=True``
        starts a node without TLS and without a key (only useful to check that the
        SuperLink refuses it).
        """
        port = port or free_port("127.0.0.1")
        name = name or f"supernode-{partition_id}"
        cmd = [self._exe("flower-supernode"), "--superlink", self.address]
        key: Path | None = None
        if insecure:
            cmd.append("--insecure")
        else:
            key = Path(private_key or self.key_paths(partition_id)[0]).resolve()
            if not key.is_file():
                raise PilotError(f"{key} is missing: run scripts/make_certificates.sh -n N")
            cmd += ["--root-certificates", str(self.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(key)]
        state = Path(state_dir or self.work_dir / "state" / (key.name if key else name))
        state = state.resolve()
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = {"partition-id": partition_id, "num-partitions": num_partitions,
                  "state-dir": str(state), **(node_config or {})}
        cmd += ["--node-config", format_config(config), "--host", "127.0.0.1",
                "--port", str(port), *extra_args]
        proc = self.start(name, cmd)
        proc.info.update(partition_id=partition_id, port=port, state_dir=state)
        self.supernodes.append(proc)
        return proc

    def kill(self, proc: ManagedProcess, sig: int = signal.SIGKILL) -> None:
        """Kill ``proc`` and everything below it at once (default SIGKILL: a crash, no
        clean-up), and wait until they are gone."""
        victims: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            victims[root.pid] = root
            victims.update({c.pid: c for c in root.children(recursive=True)})
        if proc.alive():
            _killpg(proc.pid, sig)
        _signal_all(victims.values(), sig)
        psutil.wait_procs(list(victims.values()), timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=10)

    def wait_online(self, nodes: Iterable[ManagedProcess], timeout: float = 120.0) -> dict[
            str, int]:
        """Wait until each SuperNode is activated at the SuperLink (it logs its node ID)."""
        pending = list(nodes)
        ids: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for proc in list(pending):
                match = ACTIVATED.search(proc.log.read_text(errors="replace"))
                if match:
                    ids[proc.name] = proc.info["node_id"] = int(match.group(1))
                    pending.remove(proc)
                elif not proc.alive():
                    self._failure(f"{proc.name} exited with code {proc.popen.returncode} "
                                  "before joining the SuperLink", proc, *self._link())
            if pending and time.monotonic() > deadline:
                self._failure(f"not online after {timeout:.0f} s: "
                              f"{', '.join(p.name for p in pending)}", *pending, *self._link())
            if pending:
                time.sleep(0.5)
        return ids

    def _link(self) -> list[ManagedProcess]:
        return [self.superlink] if self.superlink is not None else []

    # ---------------------------------------------------------------- runs
    def run(self, run_config: str | Mapping[str, Any] | Iterable[str] | None = None,
            timeout: float = 1800.0, federation_config: str | None = None) -> RunResult:
        """``flwr run <app> <connection> --run-config ... --stream``; wait for the end.

        Raises :class:`PilotError` (with the run's, the SuperLink's and the SuperNodes'
        log tails) on a timeout, a non-zero exit or a final status other than
        ``finished:completed``.
        """
        return self.wait_run(self.start_run(run_config, federation_config), timeout)

    def start_run(self, run_config: str | Mapping[str, Any] | Iterable[str] | None = None,
                  federation_config: str | None = None) -> ManagedProcess:
        """Start ``flwr run ... --stream`` without waiting (see :meth:`wait_run`)."""
        args = [self._exe("flwr"), "run", str(self.app_dir), self.connection, "--stream"]
        config = format_config(run_config)
        if config:
            args += ["--run-config", config]
        if federation_config:
            args += ["--federation-config", federation_config]
        self._counter += 1
        proc = self.start(f"flwr-run-{self._counter:02d}", args, cwd=self.work_dir)
        proc.info["started"] = time.monotonic()
        return proc

    def wait_run(self, proc: ManagedProcess, timeout: float = 1800.0) -> RunResult:
        """Wait for the ``flwr run`` of :meth:`start_run` to end; as :meth:`run`."""
        start = float(proc.info["started"])
        try:
            returncode = proc.popen.wait(timeout=max(1.0, start + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            run_id = self._run_id(proc.log)
            if run_id is not None:
                with contextlib.suppress(PilotError):
                    self.flwr(["stop", str(run_id), self.connection], timeout=60)
            self._terminate([proc], grace=5.0)
            self._failure(f"`flwr run` did not finish in {timeout:.0f} s (run {run_id})",
                          proc, *self._link(), *self.supernodes, lines=25)
        seconds = time.monotonic() - start
        run_id = self._run_id(proc.log)
        status = "unknown"
        if run_id is not None:
            status = self.run_status(run_id)
            settle = time.monotonic() + 60.0  # the stream may end just before the status
            while not status.startswith("finished") and time.monotonic() < settle:
                time.sleep(2.0)
                status = self.run_status(run_id)
        if returncode != 0 or status != "finished:completed":
            self._failure(f"`flwr run` exited with {returncode}, run {run_id} status "
                          f"{status!r}", proc, *self._link(), *self.supernodes, lines=25)
        return RunResult(run_id, status, returncode, proc.log, seconds)

    @staticmethod
    def _run_id(log: Path) -> int | None:
        match = RUN_ID.search(tail(log, 100_000))
        return int(match.group(1)) if match else None

    def run_status(self, run_id: int, timeout: float = 120.0) -> str:
        """``finished:completed``, ``finished:failed``, ``running``, ... of one run."""
        done = self.flwr(["list", self.connection, "--run-id", str(run_id), "--format",
                          "json"], timeout=timeout)
        try:
            runs = _json_from(done.stdout).get("runs", [])
        except ValueError:
            return "unknown"
        return str(runs[0]["status"]) if runs else "unknown"

    # ---------------------------------------------------------------- stopping
    def descendants(self) -> list[psutil.Process]:
        """Every live process started here or below (by tree and by marker)."""
        found: dict[int, psutil.Process] = {}
        for proc in self.processes:
            if not proc.alive():
                continue
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.pid)
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
        for other in psutil.process_iter():
            if other.pid in found or other.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if other.environ().get(MARKER) == self.tag:
                    found[other.pid] = other
        return [p for p in found.values() if _running(p)]

    def leftovers(self) -> list[psutil.Process]:
        """Processes carrying this pilot's marker that are still alive (not zombies)."""
        return self.descendants()

    def _terminate(self, procs: list[ManagedProcess], grace: float) -> None:
        victims: dict[int, psutil.Process] = {}
        leaders = [proc for proc in procs if proc.alive()]  # not reaped: pid is still ours
        for proc in leaders:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.pid)
                victims[root.pid] = root
                victims.update({c.pid: c for c in root.children(recursive=True)})
            _killpg(proc.pid, signal.SIGTERM)
        _signal_all(victims.values(), signal.SIGTERM)
        _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
        for proc in leaders:
            if proc.alive():
                _killpg(proc.pid, signal.SIGKILL)
        _signal_all(alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)

    def stop(self, grace: float = 15.0, timeout: float = 60.0) -> list[psutil.Process]:
        """Stop everything started here (SuperNodes first); returns survivors (none)."""
        deadline = time.monotonic() + timeout
        # snapshot the whole tree before any parent dies (orphans leave the tree)
        snapshot = self.descendants()
        order = [p for p in self.processes if p is not self.superlink] + self._link()
        self._terminate(order, grace)
        _signal_all(snapshot, signal.SIGTERM)
        _, alive = psutil.wait_procs(snapshot, timeout=min(grace, 5.0))
        _signal_all(alive, signal.SIGKILL)
        while True:
            left = self.descendants()
            if not left or time.monotonic() > deadline:
                break
            _signal_all(left, signal.SIGKILL)
            psutil.wait_procs(left, timeout=2)
        return left

    def __enter__(self) -> Pilot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_all(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def results_dir(output_dir: Path) -> Path:
    """The single ``<name>-<time>`` folder a run wrote under ``output_dir``."""
    runs = sorted(p for p in Path(output_dir).iterdir() if (p / "metrics.json").exists())
    if len(runs) != 1:
        raise PilotError(f"expected one results folder with metrics.json in {output_dir}, "
                         f"found {[p.name for p in runs]}")
    return runs[0]


def run_pilot(certs_dir: Path, work_dir: Path, num_supernodes: int,
              run_config: str | Mapping[str, Any] | None = None, *, port: int | None = None,
              run_timeout: float = 1800.0, start_timeout: float = 180.0) -> RunResult:
    """SuperLink + ``num_supernodes`` SuperNodes (partition i of N), one run, stop all."""
    with Pilot(work_dir, certs_dir, port=port) as pilot:
        pilot.start_superlink(timeout=start_timeout)
        for i in range(num_supernodes):
            pilot.register_supernode(pilot.key_paths(i)[1])
        nodes = [pilot.start_supernode(i, num_supernodes) for i in range(num_supernodes)]
        pilot.wait_online(nodes, timeout=start_timeout)
        return pilot.run(run_config, timeout=run_timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Rehearse the fedprompt pilot on this machine: a TLS SuperLink with "
                    "SuperNode authentication, N authenticated SuperNodes (partition i of "
                    "N), one `flwr run`, then stop everything.")
    parser.add_argument("--certs", type=Path, required=True,
                        help="folder written by scripts/make_certificates.sh -n N")
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("pilot-work"),
                        help="logs, SuperLink database, FLWR_HOME (default: pilot-work)")
    parser.add_argument("--port", type=int, default=None,
                        help="SuperLink port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--run-config", default="",
                        help="fedprompt dotted keys, e.g. \"federation.rounds=2 "
                             "output_dir='/abs/results'\"")
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    try:
        result = run_pilot(args.certs, args.work_dir, args.supernodes, args.run_config,
                           port=args.port, run_timeout=args.run_timeout)
    except PilotError as exc:
        print(f"pilot failed: {exc}", file=sys.stderr)
        return 1
    print(f"run {result.run_id}: {result.status} in {result.seconds:.0f} s "
          f"(log: {result.log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
