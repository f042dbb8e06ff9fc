"""Batched Beaver-tuple delivery for CrypTen's trusted third party (TTP).

CrypTen's TTP provider asks the TTP for every multiplication triple, comparison triple
and random bit separately: one round trip party 0 <-> TTP per MPC multiplication, which
dominated the secure k-means' time (about 15 ms each on a loaded 2-core machine, against
about 2 ms for the parties' own exchange). The *sequence* of tuple requests of our
algorithms depends only on public sizes (N, dim, k_max, iterations), never on the data,
so each party:

1. **traces** it once per problem size by a *dry run*: the algorithm runs locally on zero
   shares with a communicator that does not communicate and a provider that returns zero
   tuples while recording every request (no message is sent, nothing is revealed);
2. **prefetches** all tuples of the trace before the real run: party 0 sends the whole
   request list to the TTP in *one* message and receives all its tuple shares in one
   broadcast; every other party draws its shares from its TTP-shared generator in the
   same order, exactly as CrypTen's TTP protocol does per request;
3. runs the real computation, taking tuples from that cache (FIFO per request shape, in
   the same order on every party). A request missing from the cache falls back to an
   ordinary TTP request (counted in ``misses``; correct, only slower).

The TTP (:class:`BatchingTTPServer`) is CrypTen's ``TTPServer`` with a "batch" request and
without swallowing errors. The trust model is CrypTen's TTP model unchanged: the TTP
learns nothing about inputs (it never sees a share of data), but it knows every tuple,
so it must not collude with any compute party.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fedprompt.secure.crypten_compat import import_crypten

log = logging.getLogger(__name__)

_TRACEABLE = ("generate_additive_triple", "square", "generate_binary_triple", "wrap_rng",
              "B2A_rng")
_TTP_NAME = {"generate_additive_triple": "additive", "square": "square",
             "generate_binary_triple": "binary", "wrap_rng": "wraps", "B2A_rng": "B2A"}

Request = tuple[str, tuple[Any, ...], dict[str, Any]]


def _key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    return (name, tuple(args), frozenset((k, str(v)) for k, v in kwargs.items()))


def _zeros(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Zero tuples of the right sizes and types (dry runs only)."""
    crypten = import_crypten()
    prims = crypten.mpc.primitives
    ast, bst = prims.ArithmeticSharedTensor, prims.BinarySharedTensor
    bound = _bind(name, args, kwargs)
    if name == "generate_additive_triple":
        a = torch.zeros(bound["size0"], dtype=torch.long)
        b = torch.zeros(bound["size1"], dtype=torch.long)
        c = getattr(torch, bound["op"])(a, b, *bound["args"], **bound["kwargs"])
        return tuple(ast.from_shares(t, precision=0) for t in (a, b, c))
    if name == "square":
        r = torch.zeros(bound["size"], dtype=torch.long)
        return ast.from_shares(r, precision=0), ast.from_shares(r.clone(), precision=0)
    if name == "generate_binary_triple":
        a = torch.zeros(bound["size0"], dtype=torch.long)
        b = torch.zeros(bound["size1"], dtype=torch.long)
        c = torch.broadcast_tensors(a, b)[0].clone()
        return tuple(bst.from_shares(t) for t in (a, b, c))
    if name == "wrap_rng":
        r = torch.zeros(bound["size"], dtype=torch.long)
        return ast.from_shares(r, precision=0), ast.from_shares(r.clone(), precision=0)
    if name == "B2A_rng":
        r = torch.zeros(bound["size"], dtype=torch.long)
        return ast.from_shares(r, precision=0), bst.from_shares(r.clone())
    raise ValueError(f"unknown tuple request {name}")


@functools.cache
def _signature(name: str) -> inspect.Signature:
    crypten = import_crypten()
    return inspect.signature(getattr(crypten.mpc.provider.TrustedThirdParty, name))


def _bind(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = _signature(name).bind(None, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _ttp_message(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The message CrypTen's TTPClient.ttp_request would send for this request."""
    a = _bind(name, args, kwargs)
    device = None if a.get("device") is None else str(a["device"])
    if name == "generate_additive_triple":
        ttp_args: tuple[Any, ...] = (a["size0"], a["size1"], a["op"], *a["args"])
        ttp_kwargs = dict(a["kwargs"])
    elif name == "generate_binary_triple":
        ttp_args, ttp_kwargs = (a["size0"], a["size1"]), {}
    else:
        ttp_args, ttp_kwargs = (a["size"],), {}
    return {"function": _TTP_NAME[name], "device": device, "args": ttp_args,
            "kwargs": ttp_kwargs}


def make_provider_class() -> type:
    crypten = import_crypten()
    base = crypten.mpc.provider.TrustedThirdParty

    class PrefetchingTTP(base):  # type: ignore[misc, valid-type]
        """CrypTen's TTP provider plus dry-run tracing and batched prefetching."""

        def __init__(self) -> None:
            super().__init__()
            self.dry = False
            self.recorded: list[Request] = []
            self.cache: dict[tuple[Any, ...], deque[Any]] = {}
            self.misses = 0

        def _dispatch(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.dry:
                self.recorded.append((name, args, kwargs))
                return _zeros(name, args, kwargs)
            queue = self.cache.get(_key(name, args, kwargs))
            if queue:
                return queue.popleft()
            if self.cache:
                self.misses += 1
            return getattr(super(), name)(*args, **kwargs)

        def generate_additive_triple(self, *args: Any, **kwargs: Any) -> Any:
            return self._dispatch("generate_additive_triple", args, kwargs)

        def square(self, *args: Any, **kwargs: Any) -> Any:
            return self._dispatch("square", args, kwargs)

        def generate_binary_triple(self, *args: Any, **kwargs: Any) -> Any:
            return self._dispatch("generate_binary_triple", args, kwargs)

        def wrap_rng(self, *args: Any, **kwargs: Any) -> Any:
            return self._dispatch("wrap_rng", args, kwargs)

        def B2A_rng(self, *args: Any, **kwargs: Any) -> Any:
            return self._dispatch("B2A_rng", args, kwargs)

        def prefetch(self, trace: list[Request]) -> None:
            """Fill the cache with every tuple of ``trace`` (one TTP round trip)."""
            comm = crypten.comm.get()
            client = crypten.mpc.provider.ttp_provider.TTPClient.get()
            self.cache = {}
            self.misses = 0
            if not trace:
                return
            original = client.ttp_request
            if comm.get_rank() == 0:
                results = deque(_batch_request(client, [_ttp_message(*r) for r in trace]))

                def from_batch(func_name: str, device: Any, *args: Any, **kwargs: Any) -> Any:
                    return results.popleft()

                client.ttp_request = from_batch
            try:
                for name, args, kwargs in trace:
                    value = getattr(super(), name)(*args, **kwargs)
                    self.cache.setdefault(_key(name, args, kwargs), deque()).append(value)
            finally:
                client.ttp_request = original

        def leftover(self) -> int:
            """Tuples prefetched but not used (should be 0); clears the cache."""
            left = sum(len(q) for q in self.cache.values())
            self.cache = {}
            return left

    return PrefetchingTTP


def _batch_request(client: Any, messages: list[dict[str, Any]]) -> list[torch.Tensor]:
    crypten = import_crypten()
    comm = crypten.comm.get()
    ttp_rank = comm.get_ttp_rank()
    comm.send_obj({"function": "batch", "device": None, "args": (messages,), "kwargs": {}},
                  ttp_rank, client.ttp_group)
    sizes = comm.recv_obj(ttp_rank, client.ttp_group)
    total = sum(int(torch.Size(s).numel()) for s in sizes)
    flat = torch.empty(total, dtype=torch.long)
    comm.broadcast(flat, ttp_rank, client.comm_group)
    out = []
    offset = 0
    for size in sizes:
        n = int(torch.Size(size).numel())
        out.append(flat[offset: offset + n].reshape(size).clone())
        offset += n
    return out


def install_provider() -> Any:
    """Replace CrypTen's TTP provider instance by the prefetching one (after init)."""
    crypten = import_crypten()
    providers = vars(crypten.mpc)["__SUPPORTED_PROVIDERS"]
    current = providers["TTP"]
    if current.__class__.__name__ == "PrefetchingTTP":
        return current
    provider = make_provider_class()()
    providers["TTP"] = provider
    return provider


class _Done:
    def wait(self) -> None:
        return None

    def is_completed(self) -> bool:
        return True


def _local_comm_methods(comm: Any) -> dict[str, Callable[..., Any]]:
    """Communicator methods that keep shapes but send nothing (dry runs only)."""
    world = comm.get_world_size()
    rank = comm.get_rank()

    def all_reduce(inp: Any, op: Any = None, batched: bool = False) -> Any:
        return [x.clone() for x in inp] if batched else inp.clone()

    def reduce(inp: Any, dst: int, op: Any = None, batched: bool = False) -> Any:
        if dst != rank:
            return None
        return [x.clone() for x in inp] if batched else inp.clone()

    def broadcast(inp: Any, src: int, group: Any = None, batched: bool = False) -> Any:
        return inp

    def all_gather(tensor: Any) -> list[Any]:
        return [tensor.clone() for _ in range(world)]

    def gather(tensor: Any, dst: int) -> list[Any]:
        return [tensor.clone() for _ in range(world)] if dst == rank else [None]

    def broadcast_obj(obj: Any, src: int, group: Any = None) -> Any:
        if obj is None:
            raise RuntimeError("dry run: broadcast_obj from another party is unsupported")
        return obj

    def unsupported(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("dry run: point-to-point communication is unsupported")

    return {"all_reduce": all_reduce, "reduce": reduce, "broadcast": broadcast,
            "all_gather": all_gather, "gather": gather, "broadcast_obj": broadcast_obj,
            "send": unsupported, "recv": unsupported, "isend": unsupported,
            "irecv": unsupported, "scatter": unsupported, "send_obj": unsupported,
            "recv_obj": unsupported, "barrier": lambda: None}


@contextlib.contextmanager
def dry_run(provider: Any) -> Iterator[list[Request]]:
    """Inside: MPC ops run locally on whatever shares they get, communicate nothing and
    record their tuple requests into the yielded list. Values computed inside are
    meaningless; only their sizes and the request sequence are."""
    crypten = import_crypten()
    comm = crypten.comm.get()
    stats = comm.get_communication_stats()
    saved = {name: comm.__dict__[name] for name in _local_comm_methods(comm)
             if name in comm.__dict__}
    for name, fn in _local_comm_methods(comm).items():
        setattr(comm, name, fn)
    provider.dry, provider.recorded = True, []
    try:
        yield provider.recorded
    finally:
        provider.dry = False
        for name in _local_comm_methods(comm):
            delattr(comm, name)
        for name, fn in saved.items():
            setattr(comm, name, fn)
        comm.comm_rounds, comm.comm_bytes, comm.comm_time = (
            stats["rounds"], stats["bytes"], stats["time"])


def run_batching_ttp_server() -> None:
    """The TTP process: CrypTen's TTPServer loop plus "batch" requests. Returns on
    "terminate"; a communication error propagates (the process exits non-zero)."""
    crypten = import_crypten()
    # CrypTen seeds the TTP<->party generators with torch.randint from torch's default
    # generator, whose seed is a fixed constant unless set: seed it from the OS CSPRNG,
    # or every party could predict every other party's tuples.
    torch.manual_seed(secrets.randbits(63))
    server_cls = crypten.mpc.provider.ttp_provider.TTPServer
    comm_mod = crypten.communicator
    crypten.init()
    server = server_cls.__new__(server_cls)
    server.ttp_group = comm_mod.get().ttp_group
    server.comm_group = comm_mod.get().ttp_comm_group
    server.device = "cpu"
    server._setup_generators()
    ttp_rank = comm_mod.get().get_ttp_rank()
    log.info("TTP ready (rank %d)", ttp_rank)
    while True:
        message = comm_mod.get().recv_obj(0, server.ttp_group)
        if message == "terminate":
            log.info("TTP terminating on request")
            return
        server.device = message["device"]
        if message["function"] == "batch":
            results = []
            for item in message["args"][0]:
                server.device = item["device"]
                results.append(getattr(server, item["function"])(*item["args"],
                                                                 **item["kwargs"]))
            sizes = [tuple(r.size()) for r in results]
            flat = (torch.cat([r.reshape(-1) for r in results]) if results
                    else torch.empty(0, dtype=torch.long))
            comm_mod.get().send_obj(sizes, 0, server.ttp_group)
            comm_mod.get().broadcast(flat, ttp_rank, server.comm_group)
            continue
        if message["function"] not in ("additive", "square", "binary", "wraps", "B2A"):
            raise RuntimeError(f"TTP got an unknown request {message['function']!r}")
        result = getattr(server, message["function"])(*message["args"], **message["kwargs"])
        comm_mod.get().send_obj(result.size(), 0, server.ttp_group)
        comm_mod.get().broadcast(result, ttp_rank, server.comm_group)
