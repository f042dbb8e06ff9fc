"""The MinionS protocol: the remote supervisor decomposes the task into independent
chunk x instruction jobs, the local worker runs them over the private context, the
supervisor synthesizes from the filtered results or asks for another round.

API-compatible with ``minions.minions.Minions`` (HazyResearch/minions): the constructor
takes ``local_client, remote_client, max_rounds, callback, log_dir`` (plus
``max_jobs_per_round``); a call takes ``task, doc_metadata, context, max_rounds,
max_jobs_per_round, num_tasks_per_round, num_samples_per_task, use_retrieval, log_path,
logging_id, retrieval_model, chunk_fn``; the result carries ``final_answer``, ``meta``
(per round: the plan, the jobs, the aggregate sent back), ``supervisor_messages``,
``worker_messages``, ``remote_usage``/``local_usage``, ``timing`` and ``conversation_log``
(a :class:`MinionsResult`, readable like a dict; ``to_dict()`` gives the usages as dicts,
the shape the original returns).

The loop (as published, one deliberate deviation in step 2):

1. **advice**: the remote gets ``ADVICE_PROMPT`` (task + ``doc_metadata`` + the number of
   chunks) and answers in free text;
2. **decompose**: the remote answers a **JSON job plan** (:func:`parse_job_plan`)::

       {"tasks": [{"instruction": "Find the total due.", "chunks": "all"},
                  {"instruction": "...", "chunks": [0, 2]}],
        "advice": "optional extra hint for the worker"}

   The original asks the supervisor for *Python* (``prepare_jobs`` / ``transform_outputs``)
   and ``exec()``s it on the local side, where the private context lives: remote-generated
   code runs next to the data. Here the plan is data: it is validated (instructions,
   chunk ids in range, job budget) and a malformed plan raises :class:`JobPlanError`, or is
   sent back to the supervisor with the validation error (not the context) for another try
   (``max_plan_attempts``). Filtering and aggregation are fixed (step 4) instead of
   supervisor code;
3. **workers**: one single-message job per (instruction, chunk, sample)
   (``WORKER_PROMPT_SHORT``: the chunk, the instruction, the advice), all in **one**
   ``local_client.chat(jobs)`` call answered one entry per job (our
   :class:`~fedprompt.minion.local_worker.PromptedLocalClient` gets ``jobs=True``; other
   clients must honour the per-job semantics, checked by the count of answers). Done
   reason ``"length"``: skipped (as published) unless ``keep_truncated``; otherwise the
   answer is read as the JSON ``{"explanation", "citation", "answer"}`` the worker is asked
   for, or, leniently (small models), as a plain-text answer;
4. **aggregate**: jobs without an answer (empty, ``null``, ``"none"``) are dropped; the rest
   are grouped by task, then chunk; only this text (worker answers, explanations,
   citations) goes back to the remote, never the chunks;
5. **synthesis**: ``REMOTE_SYNTHESIS_COT`` (free text), then ``REMOTE_SYNTHESIS_JSON``
   (the last round: ``REMOTE_SYNTHESIS_FINAL``) answered as ``{"decision":
   "provide_final_answer", "answer"}`` or ``{"decision": "request_additional_info",
   "explanation"/"feedback"}``; the feedback starts the next round's decomposition. Replies
   that hold no JSON get ``max_json_attempts`` tries in total.

Not implemented (raise :class:`~fedprompt.minion.protocol.MinionProtocolError`):
retrieval (``use_retrieval``), MCP tools, and named chunkers other than
``"chunk_by_section"`` (a callable ``chunk_fn(text) -> [chunk, ...]`` is accepted).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprompt.minion.protocol import (
    NO_ANSWER,
    CallLedger,
    Message,
    MinionProtocolError,
    MinionResult,
    SupervisorReplyError,
    accepts_kwarg,
    check_task_and_context,
    excerpt,
    parse_json_reply,
    require_chat,
    write_log,
)

Callback = Callable[..., Any]
ChunkFn = Callable[[str], list[str]]

ADVICE_PROMPT = """We need to answer the following question about a private document.

### Question
{task}

### Document
{metadata}The document is split into {n_chunks} chunk(s) (ids 0 to {last_chunk}). You \
cannot read it, but a small language model can run simple, independent instructions on \
each chunk.

### Instructions
In a few sentences: how would you approach the question, and what should the small model \
look for in each chunk?"""

DECOMPOSE_PROMPT = """Now write the job plan for round {round}. Each task is one short, \
self-contained instruction that the small model runs on every selected chunk, alone \
(it sees one chunk and one instruction at a time). Use at most {num_tasks} task(s) and \
{max_jobs} job(s) in all (tasks x selected chunks x {num_samples} sample(s)).
{feedback}
Reply with a JSON object only:
{{"tasks": [{{"instruction": "<instruction>", "chunks": "all" or [<chunk id>, ...]}}], \
"advice": "<optional short hint for the small model>"}}"""

PLAN_RETRY_PROMPT = """That job plan was rejected: {error}
Reply with a corrected JSON job plan only."""

JSON_RETRY_PROMPT = """That reply held no valid JSON object ({error}). Reply with the JSON \
object only."""

WORKER_PROMPT_SHORT = """Text: {context}
Instruction: {task}
{advice}Reply as JSON {{"explanation": "...", "citation": "...", "answer": "..."}}; \
answer null if the text does not say."""

REMOTE_SYNTHESIS_COT = """Here are the small model's results, grouped by task and chunk \
(jobs without an answer are left out):

### Results
{results}

### Instructions
Think step by step: what do we know now, and is it enough to answer the question?"""

REMOTE_SYNTHESIS_JSON = """Now decide. Reply with a JSON object only, either
{"decision": "provide_final_answer", "explanation": "<why>", "answer": "<the answer>"}
or
{"decision": "request_additional_info", "explanation": "<what is missing>", \
"feedback": "<what the next round's jobs should look for>"}"""

REMOTE_SYNTHESIS_FINAL = """This was the last round: give your best final answer now. \
Reply with a JSON object only:
{"decision": "provide_final_answer", "explanation": "<why>", "answer": "<the answer>"}"""

NO_RESULTS = "(no job produced an answer)"
_EMPTY_ANSWERS = {"", "none", "null", "n/a", "not found", "unknown"}


class JobPlanError(SupervisorReplyError):
    """The supervisor's job plan is malformed (shape, instructions, chunk ids, budget)."""


@dataclass(frozen=True)
class JobManifest:
    """One job: an instruction on one chunk (``sample`` counts repeats of the same job)."""

    job_id: int
    task_id: int
    chunk_id: int
    instruction: str
    sample: int = 0


@dataclass
class JobOutput:
    """A job's worker answer (``answer is None``: nothing found, filtered out)."""

    job: JobManifest
    raw: str
    done_reason: str | None
    explanation: str | None = None
    citation: str | None = None
    answer: str | None = None
    kept: bool = False


@dataclass
class JobPlan:
    """A validated plan: ``tasks`` as ``(instruction, chunk ids)`` and optional advice."""

    tasks: list[tuple[str, list[int]]]
    advice: str | None = None

    def jobs(self, num_samples: int) -> list[JobManifest]:
        out: list[JobManifest] = []
        for task_id, (instruction, chunk_ids) in enumerate(self.tasks):
            for chunk_id in chunk_ids:
                for sample in range(num_samples):
                    out.append(JobManifest(len(out), task_id, chunk_id, instruction, sample))
        return out


@dataclass
class MinionsResult(MinionResult):
    """A :class:`MinionResult` plus ``meta``: per round its plan, jobs and aggregate."""

    meta: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------ chunking
def chunk_by_section(text: str, max_chunk_size: int = 3000, overlap: int = 20) -> list[str]:
    """Character windows of ``max_chunk_size`` overlapping by ``overlap`` (minions' default)."""
    if max_chunk_size < 1 or not 0 <= overlap < max_chunk_size:
        raise MinionProtocolError("need max_chunk_size >= 1 and 0 <= overlap < max_chunk_size")
    if not text:
        return []
    step = max_chunk_size - overlap
    return [text[i : i + max_chunk_size] for i in range(0, max(len(text) - overlap, 1), step)]


# ------------------------------------------------------------------ job plan
def parse_job_plan(reply: str | dict[str, Any], n_chunks: int, max_jobs: int,
                   num_samples: int = 1, max_tasks: int | None = None) -> JobPlan:
    """Validate a supervisor's JSON job plan (see module doc); raise :class:`JobPlanError`.

    Accepts ``"tasks"`` (or ``"jobs"``) as a non-empty list of ``{"instruction"`` (or
    ``"task"``) ``: str, "chunks": "all" | [int, ...]}`` (``"chunks"`` missing: all), plus an
    optional string ``"advice"``. Code is never accepted: this is a data format.
    """
    raw = reply if isinstance(reply, str) else json.dumps(reply)
    try:
        plan = parse_json_reply(reply) if isinstance(reply, str) else reply
    except SupervisorReplyError as exc:
        raise JobPlanError(f"the job plan is not a JSON object: {excerpt(raw)}") from exc
    if not isinstance(plan, dict):
        raise JobPlanError(f"the job plan must be a JSON object: {excerpt(raw)}")
    tasks = plan.get("tasks", plan.get("jobs"))
    if not isinstance(tasks, list) or not tasks:
        raise JobPlanError(f"the job plan needs a non-empty list 'tasks': {excerpt(raw)}")
    if max_tasks is not None and len(tasks) > max_tasks:
        raise JobPlanError(f"the job plan has {len(tasks)} tasks, at most {max_tasks} allowed")
    parsed: list[tuple[str, list[int]]] = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise JobPlanError(f"task #{i} must be an object with 'instruction' and 'chunks', "
                               f"got {type(task).__name__}")
        unknown = set(task) - {"instruction", "task", "chunks", "chunk_ids", "task_id"}
        if unknown:
            raise JobPlanError(f"task #{i} has unknown keys {sorted(unknown)} (allowed: "
                               "instruction, chunks)")
        instruction = task.get("instruction", task.get("task"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise JobPlanError(f"task #{i} needs a non-empty string 'instruction'")
        chunks = task.get("chunks", task.get("chunk_ids", "all"))
        if chunks == "all":
            ids = list(range(n_chunks))
        elif isinstance(chunks, list) and chunks:
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in chunks):
                raise JobPlanError(f"task #{i}: 'chunks' must be \"all\" or a list of integer "
                                   f"chunk ids, got {chunks!r}"[:300])
            bad = [c for c in chunks if not 0 <= c < n_chunks]
            if bad:
                raise JobPlanError(f"task #{i}: chunk ids {bad[:10]} out of range (the context "
                                   f"has {n_chunks} chunks, ids 0 to {n_chunks - 1})")
            if len(set(chunks)) != len(chunks):
                raise JobPlanError(f"task #{i}: repeated chunk ids in {chunks!r}"[:300])
            ids = list(chunks)
        else:
            raise JobPlanError(f"task #{i}: 'chunks' must be \"all\" or a non-empty list of "
                               f"chunk ids, got {chunks!r}"[:300])
        parsed.append((instruction.strip(), ids))
    advice = plan.get("advice")
    if advice is not None and not isinstance(advice, str):
        raise JobPlanError("'advice' must be a string")
    n_jobs = sum(len(ids) for _, ids in parsed) * num_samples
    if n_jobs > max_jobs:
        raise JobPlanError(f"the job plan makes {n_jobs} jobs, at most {max_jobs} allowed per "
                           "round: select fewer chunks or tasks")
    return JobPlan(parsed, (advice.strip() or None) if advice else None)


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value)
    return None if text.strip().lower() in _EMPTY_ANSWERS else text.strip()


def read_job_output(job: JobManifest, text: str, done_reason: str | None,
                    keep_truncated: bool = False) -> JobOutput:
    """A worker's answer to a job: JSON ``{explanation, citation, answer}``, else plain text."""
    out = JobOutput(job, text, done_reason)
    if done_reason not in (None, "stop", "length"):
        raise MinionProtocolError(f"job {job.job_id}: unknown done reason {done_reason!r}")
    if done_reason == "length" and not keep_truncated:
        return out
    try:
        reply: dict[str, Any] | None = parse_json_reply(text)
    except SupervisorReplyError:
        reply = None
    if reply is not None and "answer" in reply:
        out.explanation = _text_or_none(reply.get("explanation"))
        out.citation = _text_or_none(reply.get("citation"))
        out.answer = _text_or_none(reply.get("answer"))
    else:
        out.answer = _text_or_none(text)
    out.kept = out.answer is not None
    return out


def aggregate(outputs: Sequence[JobOutput], plan: JobPlan) -> str:
    """The kept outputs grouped by task then chunk (what the supervisor gets back)."""
    lines: list[str] = []
    for task_id, (instruction, _) in enumerate(plan.tasks):
        kept = [o for o in outputs if o.job.task_id == task_id and o.kept]
        if not kept:
            continue
        lines.append(f"## Task {task_id}: {instruction}")
        for o in sorted(kept, key=lambda o: (o.job.chunk_id, o.job.sample)):
            parts = [f"answer: {o.answer}"]
            if o.explanation:
                parts.append(f"explanation: {o.explanation}")
            if o.citation:
                parts.append(f"citation: {o.citation}")
            flag = " (truncated)" if o.done_reason == "length" else ""
            lines.append(f"- chunk {o.job.chunk_id}{flag}: " + "; ".join(parts))
    return "\n".join(lines) if lines else NO_RESULTS


# ------------------------------------------------------------------ runner
class MinionS:
    """The MinionS protocol over any local and remote ``chat`` clients (see module doc).

    Args:
        max_rounds: rounds of decompose -> work -> synthesize (the original's default 5).
        max_jobs_per_round: budget a plan may not exceed (rejected, not truncated).
        chunk_size, chunk_overlap: the default chunker's character windows.
        max_plan_attempts: plans the supervisor may propose per round before
            :class:`JobPlanError` is raised (each rejection is sent back with its reason).
        max_json_attempts: tries for a synthesis reply holding JSON (the original: 5).
        keep_truncated: also aggregate answers cut at the token limit (``"length"``).
        json_mode: pass ``response_format={"type": "json_object"}`` on JSON turns to remote
            clients that accept it.
        log_dir: where to write the conversation log (holds the private context);
            ``None`` writes none. A call's ``log_path`` (a folder) overrides it.
    """

    def __init__(self, local_client: Any = None, remote_client: Any = None, max_rounds: int = 5,
                 callback: Callback | None = None, log_dir: str | Path | None = None, *,
                 max_jobs_per_round: int = 2048, chunk_size: int = 3000,
                 chunk_overlap: int = 20, max_plan_attempts: int = 3,
                 max_json_attempts: int = 5, keep_truncated: bool = False,
                 json_mode: bool = True, **kwargs: Any) -> None:
        require_chat(local_client, "local_client")
        require_chat(remote_client, "remote_client")
        if max_rounds < 1 or max_jobs_per_round < 1:
            raise MinionProtocolError("max_rounds and max_jobs_per_round must be at least 1")
        if max_plan_attempts < 1 or max_json_attempts < 1:
            raise MinionProtocolError("max_plan_attempts and max_json_attempts must be >= 1")
        if kwargs.get("mcp_client") is not None:
            raise MinionProtocolError("MCP tools are not supported by this implementation")
        chunk_by_section("x", chunk_size, chunk_overlap)  # validates the window
        self.local_client = local_client
        self.remote_client = remote_client
        self.max_rounds = max_rounds
        self.max_jobs_per_round = max_jobs_per_round
        self.callback = callback
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.max_plan_attempts = max_plan_attempts
        self.max_json_attempts = max_json_attempts
        self.keep_truncated = keep_truncated
        self.json_mode = json_mode and accepts_kwarg(remote_client.chat, "response_format")
        self.local_jobs_kwarg = accepts_kwarg(local_client.chat, "jobs")

    # -------------------------------------------------------------- helpers
    def _notify(self, role: str, message: Any, is_final: bool = False) -> None:
        if self.callback is not None:
            self.callback(role, message, is_final=is_final)

    def _remote(self, supervisor: list[Message], prompt: str, ledger: CallLedger,
                json_reply: bool) -> str:
        supervisor.append({"role": "user", "content": prompt})
        kwargs: dict[str, Any] = {}
        if json_reply and self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        text = ledger.remote(self.remote_client, supervisor, **kwargs)
        supervisor.append({"role": "assistant", "content": text})
        return text

    def _chunks(self, docs: list[str], chunk_fn: str | ChunkFn) -> list[str]:
        if callable(chunk_fn):
            fn: ChunkFn = chunk_fn
        elif chunk_fn == "chunk_by_section":
            def fn(text: str) -> list[str]:
                return chunk_by_section(text, self.chunk_size, self.chunk_overlap)
        else:
            raise MinionProtocolError(f"chunk_fn {chunk_fn!r} is not implemented: use "
                                      "'chunk_by_section' or a callable text -> [chunk, ...]")
        chunks = [c for doc in docs for c in fn(doc)]
        if not chunks or not all(isinstance(c, str) for c in chunks):
            raise MinionProtocolError("the context gives no chunks (empty context, or a "
                                      "chunk_fn that returns no list of strings)")
        return chunks

    def _plan(self, supervisor: list[Message], prompt: str, ledger: CallLedger, n_chunks: int,
              max_jobs: int, num_tasks: int, num_samples: int) -> JobPlan:
        for attempt in range(1, self.max_plan_attempts + 1):
            raw = self._remote(supervisor, prompt, ledger, json_reply=True)
            try:
                return parse_job_plan(raw, n_chunks, max_jobs, num_samples, max_tasks=num_tasks)
            except JobPlanError as exc:
                if attempt == self.max_plan_attempts:
                    raise JobPlanError(f"{exc} (after {attempt} attempt(s))") from exc
                prompt = PLAN_RETRY_PROMPT.format(error=exc)
        raise AssertionError("unreachable")

    def _decide(self, supervisor: list[Message], prompt: str, ledger: CallLedger
                ) -> dict[str, Any]:
        for attempt in range(1, self.max_json_attempts + 1):
            raw = self._remote(supervisor, prompt, ledger, json_reply=True)
            try:
                return parse_json_reply(raw)
            except SupervisorReplyError as exc:
                if attempt == self.max_json_attempts:
                    raise SupervisorReplyError(f"{exc} (after {attempt} attempt(s))") from exc
                prompt = JSON_RETRY_PROMPT.format(error="no JSON object found")
        raise AssertionError("unreachable")

    def _run_jobs(self, jobs: list[JobManifest], chunks: list[str], advice: str | None,
                  ledger: CallLedger) -> tuple[list[Message], list[JobOutput]]:
        hint = f"Hint: {advice}\n" if advice else ""
        messages = [{"role": "user", "content": WORKER_PROMPT_SHORT.format(
            context=chunks[job.chunk_id], task=job.instruction, advice=hint)} for job in jobs]
        kwargs = {"jobs": True} if self.local_jobs_kwarg else {}
        texts, reasons = ledger.local_full(self.local_client, messages, **kwargs)
        if len(texts) != len(jobs):
            raise MinionProtocolError(
                f"local_client.chat answered {len(texts)} response(s) to {len(jobs)} "
                "independent jobs: MinionS needs one response per job (per-job semantics; "
                "a client that sends the list as one conversation cannot serve MinionS)")
        outputs = [read_job_output(job, text, reasons[i] if reasons else None,
                                   self.keep_truncated)
                   for i, (job, text) in enumerate(zip(jobs, texts, strict=True))]
        transcript: list[Message] = []
        for message, text in zip(messages, texts, strict=True):
            transcript += [message, {"role": "assistant", "content": text}]
        return transcript, outputs

    # ----------------------------------------------------------------- call
    def __call__(self, task: str, doc_metadata: str | None, context: list[str] | str,
                 max_rounds: int | None = None, max_jobs_per_round: int | None = None,
                 num_tasks_per_round: int = 3, num_samples_per_task: int = 1,
                 use_retrieval: str | None = None, log_path: str | Path | None = None,
                 logging_id: str | None = None, retrieval_model: Any = None,
                 chunk_fn: str | ChunkFn = "chunk_by_section", **kwargs: Any) -> MinionsResult:
        if use_retrieval is not None or retrieval_model is not None:
            raise MinionProtocolError("retrieval (use_retrieval) is not implemented")
        if kwargs.get("mcp_tools_info") is not None:
            raise MinionProtocolError("MCP tools are not supported by this implementation")
        docs = check_task_and_context(task, context)
        rounds = self.max_rounds if max_rounds is None else max_rounds
        max_jobs = self.max_jobs_per_round if max_jobs_per_round is None else max_jobs_per_round
        if rounds < 1 or max_jobs < 1 or num_tasks_per_round < 1 or num_samples_per_task < 1:
            raise MinionProtocolError("max_rounds, max_jobs_per_round, num_tasks_per_round "
                                      "and num_samples_per_task must be at least 1")
        ledger = CallLedger()
        chunks = self._chunks(docs, chunk_fn)
        metadata = f"{doc_metadata}\n" if doc_metadata else ""
        supervisor: list[Message] = []
        worker: list[Message] = []
        meta: list[dict[str, Any]] = []

        advice_text = self._remote(supervisor, ADVICE_PROMPT.format(
            task=task, metadata=metadata, n_chunks=len(chunks), last_chunk=len(chunks) - 1),
            ledger, json_reply=False)
        self._notify("supervisor", advice_text)

        final_answer = NO_ANSWER
        feedback: str | None = None
        done_rounds = 0
        for round_idx in range(rounds):
            done_rounds = round_idx + 1
            note = f"Feedback from the last round: {feedback}\n" if feedback else ""
            plan = self._plan(supervisor, DECOMPOSE_PROMPT.format(
                round=done_rounds, num_tasks=num_tasks_per_round, max_jobs=max_jobs,
                num_samples=num_samples_per_task, feedback=note), ledger, len(chunks),
                max_jobs, num_tasks_per_round, num_samples_per_task)
            jobs = plan.jobs(num_samples_per_task)
            self._notify("supervisor", {"tasks": plan.tasks, "advice": plan.advice})
            self._notify("worker", None)
            transcript, outputs = self._run_jobs(jobs, chunks, plan.advice, ledger)
            worker += transcript
            results = aggregate(outputs, plan)
            self._notify("worker", results)
            meta.append({"round": done_rounds, "plan": {"tasks": plan.tasks,
                                                        "advice": plan.advice},
                         "local": {"jobs": [{**job.__dict__, "answer": o.answer,
                                             "explanation": o.explanation,
                                             "citation": o.citation, "kept": o.kept,
                                             "done_reason": o.done_reason}
                                            for job, o in zip(jobs, outputs, strict=True)]},
                         "remote": {"results": results}})
            last = round_idx == rounds - 1
            self._remote(supervisor, REMOTE_SYNTHESIS_COT.format(results=results), ledger,
                         json_reply=False)
            reply = self._decide(supervisor, REMOTE_SYNTHESIS_FINAL if last
                                 else REMOTE_SYNTHESIS_JSON, ledger)
            decision = reply.get("decision")
            if decision == "provide_final_answer" or last:
                value = reply.get("answer")
                if isinstance(value, str) and value.strip():
                    final_answer = value
                elif value is not None and not isinstance(value, str):
                    final_answer = json.dumps(value)
                self._notify("supervisor", reply, is_final=True)
                break
            if decision != "request_additional_info":
                raise SupervisorReplyError(
                    "the supervisor's decision must be 'provide_final_answer' or "
                    f"'request_additional_info', got {decision!r}: "
                    f"{excerpt(json.dumps(reply))}")
            self._notify("supervisor", reply)
            fb = reply.get("feedback") or reply.get("explanation")
            feedback = fb if isinstance(fb, str) and fb.strip() else None

        timing = ledger.finish()
        conversation_log = {
            "task": task, "doc_metadata": doc_metadata, "context": docs,
            "n_chunks": len(chunks), "conversation": {"supervisor": supervisor,
                                                      "worker": worker},
            "meta": meta, "generated_final_answer": final_answer,
            "usage": {"remote": ledger.remote_usage.to_dict(),
                      "local": ledger.local_usage.to_dict()},
            "timing": timing,
        }
        log_dir = Path(log_path) if log_path is not None else self.log_dir
        log_file = write_log(log_dir, logging_id, "minions", conversation_log)
        return MinionsResult(final_answer, supervisor, worker, ledger.remote_usage,
                             ledger.local_usage, timing, conversation_log, log_file,
                             done_rounds, meta)


#: The original package's class name (``minions.minions.Minions``).
Minions = MinionS
