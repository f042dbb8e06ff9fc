"""The Minion protocol: a remote supervisor that never sees the context, a local worker that
does.

API-compatible with ``minions.minion.Minion`` (HazyResearch/minions): the constructor takes
``local_client, remote_client, max_rounds, callback, log_dir``; a call takes ``task,
context, max_rounds, doc_metadata, logging_id, is_privacy, images, is_follow_up``; the
result carries ``final_answer``, ``supervisor_messages``, ``worker_messages``,
``remote_usage``/``local_usage`` (:class:`~fedprompt.minion.usage.Usage`), ``timing``
(``local_call_time``, ``remote_call_time``, ``total_time``, ``overhead_time``),
``conversation_log`` and ``log_file``. It is a :class:`MinionResult` that also reads like
the original dict (``result["final_answer"]``).

The loop (as published):

1. the remote gets ``SUPERVISOR_INITIAL_PROMPT(task)`` and answers JSON
   ``{"reasoning", "message"}``; ``message`` becomes the worker's first user turn;
2. the worker's system message holds the context (joined by blank lines), the task and the
   images (``"images"``, Ollama style): they stay on the local side;
3. each round the worker answers; before the last round the remote reasons freely
   (``REMOTE_SYNTHESIS_COT``), then decides in JSON (``REMOTE_SYNTHESIS_FINAL``):
   ``{"decision": "provide_final_answer", "answer"}`` or ``{"decision":
   "request_additional_info", "message"}``; in the last round it must answer
   (``SUPERVISOR_FINAL_PROMPT``; without an answer: ``"No answer found."``).

Replies are parsed with ``json.loads``, else the last fenced ``json`` block, else the last
balanced ``{...}``; anything else raises :class:`SupervisorReplyError` quoting the reply.
Clients are duck-typed: a remote ``chat(messages, **kw) -> (texts, usage[, ...])`` (our
:class:`~fedprompt.minion.secure_client.SecureChatClient`, an OpenAI-style client, a stub)
and a local ``chat(messages) -> (texts, usage, done_reasons)``. Remote usage that a client
does not report (e.g. a callable enclave backend) is estimated like minions' ``SecureClient``
(``chars/4 + 3`` per message, ``chars/4`` for the reply) and flagged in ``timing``.
``is_privacy`` (spaCy PII shielding) is not implemented and raises.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedprompt.errors import FedPromptError
from fedprompt.minion.usage import Usage

Message = dict[str, Any]
Callback = Callable[..., Any]

SUPERVISOR_INITIAL_PROMPT = """We need to perform the following task.

### Task
{task}

### Instructions
You will not have direct access to the context, but can chat with a small language model \
which has read the entire thing. Ask it one short, specific question at a time.
{metadata}
Reply with a JSON object only:
{{"reasoning": "<why you ask this>", "message": "<your question to the small model>"}}"""

WORKER_SYSTEM_PROMPT = """You are helping answer a question about a private document.

### Context
{context}

### Question
{task}

Answer the supervisor's questions briefly, using only the context."""

REMOTE_SYNTHESIS_COT = """Here is the response from the small language model:

### Response
{response}

### Instructions
Think step by step: what do we know now, and is it enough to solve the task?"""

REMOTE_SYNTHESIS_FINAL = """Now decide. Reply with a JSON object only, either
{"decision": "provide_final_answer", "answer": "<the answer>"}
or
{"decision": "request_additional_info", "message": "<the next question to the small model>"}"""

SUPERVISOR_FINAL_PROMPT = """Here is the response from the small language model:

### Response
{response}

### Instructions
This was the last round: give your best final answer now. Reply with a JSON object only:
{{"decision": "provide_final_answer", "answer": "<the answer>"}}"""

NO_ANSWER = "No answer found."
_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL | re.IGNORECASE)


class MinionProtocolError(FedPromptError):
    """A client broke the Minion protocol (reply shape, JSON, decision)."""


class SupervisorReplyError(MinionProtocolError):
    """The remote supervisor's reply is not the JSON object the protocol asks for."""


def excerpt(text: str, n: int = 200) -> str:
    """A short ``repr`` of a reply for error messages."""
    return repr(text if len(text) <= n else text[:n] + "...")


def _last_balanced_object(text: str) -> str | None:
    end = text.rfind("}")
    while end != -1:
        depth = 0
        for start in range(end, -1, -1):
            ch = text[start]
            if ch == "}":
                depth += 1
            elif ch == "{":
                depth -= 1
                if depth == 0:
                    return text[start : end + 1]
        end = text.rfind("}", 0, end)
    return None


def parse_json_reply(text: str) -> dict[str, Any]:
    """The JSON object in a supervisor reply (whole text, last fenced block, last ``{...}``)."""
    candidates = [text.strip()]
    fenced = _FENCED.findall(text)
    if fenced:
        candidates.append(fenced[-1])
    balanced = _last_balanced_object(text)
    if balanced is not None:
        candidates.append(balanced)
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise SupervisorReplyError(f"the supervisor's reply holds no JSON object: {excerpt(text)}")


def _field(reply: dict[str, Any], key: str, raw: str) -> str:
    value = reply.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SupervisorReplyError(f"the supervisor's JSON lacks a non-empty string {key!r}: "
                                   f"{excerpt(raw)}")
    return value


@dataclass
class MinionResult:
    """What a Minion call returns; also readable as the original dict (``result[key]``)."""

    final_answer: str
    supervisor_messages: list[Message]
    worker_messages: list[Message]
    remote_usage: Usage
    local_usage: Usage
    timing: dict[str, Any]
    conversation_log: dict[str, Any] = field(default_factory=dict)
    log_file: str | None = None
    rounds: int = 0

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def keys(self) -> list[str]:
        return [f for f in self.__dataclass_fields__]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["remote_usage"] = self.remote_usage.to_dict()
        out["local_usage"] = self.local_usage.to_dict()
        return out


def accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def check_task_and_context(task: Any, context: list[str] | str) -> list[str]:
    """The context as a list of documents, after checking the task and the context."""
    if not isinstance(task, str) or not task.strip():
        raise MinionProtocolError("task must be a non-empty string")
    docs = [context] if isinstance(context, str) else list(context)
    if not all(isinstance(d, str) for d in docs):
        raise MinionProtocolError("context must be a string or a list of strings")
    return docs


def require_chat(client: Any, name: str) -> None:
    """Raise unless ``client`` has a callable ``chat``."""
    if client is None or not callable(getattr(client, "chat", None)):
        raise MinionProtocolError(f"{name} must have a chat(messages) method")


class CallLedger:
    """Calls the clients and accounts for them: ``timing`` and local/remote ``Usage``.

    Remote usage that a client does not report is estimated (``chars/4 + 3`` per message,
    ``chars/4`` for the reply, as minions' ``SecureClient``) and flagged in ``timing``.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timing: dict[str, Any] = {"local_call_time": 0.0, "remote_call_time": 0.0,
                                       "remote_usage_estimated": False}
        self.remote_usage = Usage()
        self.local_usage = Usage()

    def remote(self, client: Any, messages: list[Message], **kwargs: Any) -> str:
        """The first text of ``client.chat(messages, **kwargs)``."""
        t0 = time.perf_counter()
        out = client.chat(messages, **kwargs)
        self.timing["remote_call_time"] += time.perf_counter() - t0
        if not isinstance(out, tuple) or len(out) < 2:
            raise MinionProtocolError("remote_client.chat must return (responses, usage, ...)")
        texts, raw_usage = out[0], out[1]
        if not isinstance(texts, list) or not texts or not isinstance(texts[0], str):
            raise MinionProtocolError("remote_client.chat returned no text response")
        reported = Usage.coerce(raw_usage)
        if reported.total_tokens == 0:
            self.timing["remote_usage_estimated"] = True
            chars = sum(len(str(m.get("content", ""))) for m in messages)
            reported = Usage(completion_tokens=len(texts[0]) // 4,
                             prompt_tokens=chars // 4 + 3 * len(messages))
        self.remote_usage = self.remote_usage + reported
        return texts[0]

    def local(self, client: Any, messages: list[Message], **kwargs: Any) -> list[str]:
        """The texts of ``client.chat(messages, **kwargs)`` (done reasons: ``local_full``)."""
        return self.local_full(client, messages, **kwargs)[0]

    def local_full(self, client: Any, messages: Sequence[Any], **kwargs: Any
                   ) -> tuple[list[str], list[str] | None]:
        """``(texts, done_reasons or None)`` of ``client.chat(messages, **kwargs)``."""
        t0 = time.perf_counter()
        out = client.chat(messages, **kwargs)
        self.timing["local_call_time"] += time.perf_counter() - t0
        if not isinstance(out, tuple) or len(out) < 2:
            raise MinionProtocolError(
                "local_client.chat must return (responses, usage, done_reasons)")
        texts = out[0]
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise MinionProtocolError("local_client.chat must return a list of text responses")
        self.local_usage = self.local_usage + Usage.coerce(out[1])
        reasons = out[2] if len(out) > 2 else None
        if reasons is not None and (not isinstance(reasons, list) or len(reasons) != len(texts)):
            raise MinionProtocolError("local_client.chat returned done_reasons that do not "
                                      "match its responses one to one")
        return texts, reasons

    def finish(self) -> dict[str, Any]:
        """The timing dict with ``total_time`` and ``overhead_time`` filled in."""
        total = time.perf_counter() - self.start
        self.timing["total_time"] = total
        self.timing["overhead_time"] = (total - self.timing["local_call_time"]
                                        - self.timing["remote_call_time"])
        return self.timing


def write_log(log_dir: Path | None, logging_id: str | None, default_name: str,
              log: Mapping[str, Any]) -> str | None:
    """The log holds the private context: it is written only where ``log_dir`` says."""
    if log_dir is None:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", logging_id or default_name)
    path = log_dir / f"{stamp}_{name}.json"
    path.write_text(json.dumps(log, indent=2, default=str) + "\n")
    return str(path)


def _strip_images(messages: Sequence[Message]) -> list[Message]:
    return [{k: v for k, v in m.items() if k not in ("images", "image")} for m in messages]


class Minion:
    """The Minion protocol over any local and remote ``chat`` clients (see module doc).

    ``json_mode`` passes ``response_format={"type": "json_object"}`` on the JSON turns to
    remote clients whose ``chat`` accepts it (as the original does for OpenAI-style ones).
    ``log_dir=None`` writes no log file (the original always writes one).
    """

    def __init__(self, local_client: Any = None, remote_client: Any = None, max_rounds: int = 3,
                 callback: Callback | None = None, log_dir: str | Path | None = None, *,
                 json_mode: bool = True, **kwargs: Any) -> None:
        require_chat(local_client, "local_client")
        require_chat(remote_client, "remote_client")
        if max_rounds < 1:
            raise MinionProtocolError("max_rounds must be at least 1")
        if kwargs.get("mcp_client") is not None:
            raise MinionProtocolError("MCP tools are not supported by this implementation")
        self.local_client = local_client
        self.remote_client = remote_client
        self.max_rounds = max_rounds
        self.callback = callback
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.json_mode = json_mode and accepts_kwarg(remote_client.chat, "response_format")

    # ----------------------------------------------------------- client calls
    def _remote(self, messages: list[Message], json_reply: bool, ledger: CallLedger) -> str:
        kwargs: dict[str, Any] = {}
        if json_reply and self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        return ledger.remote(self.remote_client, messages, **kwargs)

    def _local(self, messages: list[Message], ledger: CallLedger) -> str:
        texts = ledger.local(self.local_client, messages)
        if len(texts) != 1:
            raise MinionProtocolError("local_client.chat must return exactly one text response "
                                      "for one conversation")
        return texts[0]

    def _notify(self, role: str, message: Any, is_final: bool = False) -> None:
        if self.callback is not None:
            self.callback(role, message, is_final=is_final)

    # ------------------------------------------------------------------- call
    def __call__(self, task: str, context: list[str] | str, max_rounds: int | None = None,
                 doc_metadata: str | None = None, logging_id: str | None = None,
                 is_privacy: bool = False, images: Sequence[Any] | None = None,
                 is_follow_up: bool = False) -> MinionResult:
        if is_privacy:
            raise MinionProtocolError("is_privacy (spaCy PII shielding) is not implemented; "
                                      "the context never leaves the local side either way")
        if is_follow_up:
            raise MinionProtocolError("multi-turn follow-ups are not implemented")
        docs = check_task_and_context(task, context)
        rounds = self.max_rounds if max_rounds is None else max_rounds
        if rounds < 1:
            raise MinionProtocolError("max_rounds must be at least 1")
        ledger = CallLedger()

        metadata = f"Metadata about the context: {doc_metadata}\n" if doc_metadata else ""
        supervisor: list[Message] = [{"role": "user", "content": SUPERVISOR_INITIAL_PROMPT.format(
            task=task, metadata=metadata)}]
        system: Message = {"role": "system", "content": WORKER_SYSTEM_PROMPT.format(
            context="\n\n".join(docs), task=task)}
        if images:
            system["images"] = list(images)
        worker: list[Message] = [system]

        raw = self._remote(supervisor, True, ledger)
        supervisor.append({"role": "assistant", "content": raw})
        first = parse_json_reply(raw)
        question = _field(first, "message", raw)
        self._notify("supervisor", first)
        worker.append({"role": "user", "content": question})

        final_answer = NO_ANSWER
        done_rounds = 0
        for round_idx in range(rounds):
            done_rounds = round_idx + 1
            self._notify("worker", None)
            answer = self._local(worker, ledger)
            worker.append({"role": "assistant", "content": answer})
            self._notify("worker", {"role": "assistant", "content": answer})
            last = round_idx == rounds - 1
            if last:
                supervisor.append({"role": "user",
                                   "content": SUPERVISOR_FINAL_PROMPT.format(response=answer)})
            else:
                supervisor.append({"role": "user",
                                   "content": REMOTE_SYNTHESIS_COT.format(response=answer)})
                thoughts = self._remote(supervisor, False, ledger)
                supervisor.append({"role": "assistant", "content": thoughts})
                supervisor.append({"role": "user", "content": REMOTE_SYNTHESIS_FINAL})
            raw = self._remote(supervisor, True, ledger)
            supervisor.append({"role": "assistant", "content": raw})
            reply = parse_json_reply(raw)
            decision = reply.get("decision")
            if decision == "provide_final_answer" or last:
                value = reply.get("answer")
                final_answer = value if isinstance(value, str) and value.strip() else NO_ANSWER
                if value is not None and not isinstance(value, str):
                    final_answer = json.dumps(value)
                self._notify("supervisor", reply, is_final=True)
                break
            if decision != "request_additional_info":
                raise SupervisorReplyError(
                    "the supervisor's decision must be 'provide_final_answer' or "
                    f"'request_additional_info', got {decision!r}: {excerpt(raw)}")
            self._notify("supervisor", reply)
            worker.append({"role": "user", "content": _field(reply, "message", raw)})

        timing = ledger.finish()
        conversation_log = {
            "task": task, "doc_metadata": doc_metadata, "images": len(images or []),
            "conversation": {"supervisor": supervisor, "worker": _strip_images(worker)},
            "generated_final_answer": final_answer,
            "usage": {"remote": ledger.remote_usage.to_dict(),
                      "local": ledger.local_usage.to_dict()},
            "timing": timing,
        }
        log_file = write_log(self.log_dir, logging_id, "minion", conversation_log)
        return MinionResult(final_answer, supervisor, worker, ledger.remote_usage,
                            ledger.local_usage, timing, conversation_log, log_file, done_rounds)
