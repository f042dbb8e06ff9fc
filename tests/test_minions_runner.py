"""MinionS: a scripted supervisor plans chunk x instruction jobs, the local worker runs them."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from fedprompt.backbones.llava import LlavaBackbone
from fedprompt.minion.local_worker import PromptedLocalClient
from fedprompt.minion.minions_runner import (
    JobManifest,
    JobPlanError,
    MinionS,
    Minions,
    chunk_by_section,
    parse_job_plan,
    read_job_output,
)
from fedprompt.minion.protocol import NO_ANSWER, MinionProtocolError, SupervisorReplyError
from fedprompt.minion.usage import Usage
from fedprompt.prompts import DPFPLPrompt
from fedprompt.prompts.portable import export_prompt
from fedprompt.tasks.config import TaskConfig

DOCUMENT = ("Invoice 4471 from Rivera Clinic for patient Ana Silva, account 88-1902. "
            "Services: two consultations and one blood panel. "
            "The total due is 312 euros, payable by March 9 to the clinic.")
TASK = "How much is due on the invoice, and by when?"
GOOD_PLAN = {"tasks": [{"instruction": "Find the total amount due.", "chunks": "all"},
                       {"instruction": "Find the payment deadline.", "chunks": [0, 2]}],
             "advice": "Amounts are in euros."}


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> PromptedLocalClient:
    llava = LlavaBackbone.from_preset("llava-tiny", weights_seed=0)
    learner = DPFPLPrompt(4, llava.ctx_dim, 1, rank=2, residual=True,
                          generator=torch.Generator().manual_seed(0))
    folder = export_prompt(tmp_path_factory.mktemp("prompt") / "p", learner, llava,
                           task=TaskConfig(kind="answer").model_dump())
    return PromptedLocalClient.from_folder(folder, llava, max_new_tokens=6)


class SpyLocal:
    """Delegates to a local client and records every chat call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        self.calls.append((list(messages), kwargs))
        return self.inner.chat(messages, **kwargs)


class FakeJSONWorker:
    """Answers each job alone, in the JSON the worker prompt asks for (no model)."""

    def chat(self, messages: list[dict[str, Any]]
             ) -> tuple[list[str], dict[str, int], list[str]]:
        out = []
        for m in messages:
            text = m["content"].split("\nInstruction:")[0]
            if "312" in text and "amount" in m["content"]:
                out.append(json.dumps({"explanation": "the chunk states it",
                                       "citation": "total due is 312", "answer": "312 euros"}))
            elif "March" in text and "deadline" in m["content"]:
                out.append(json.dumps({"explanation": "stated", "citation": None,
                                       "answer": "March 9"}))
            else:
                out.append(json.dumps({"explanation": "not here", "citation": None,
                                       "answer": None}))
        return out, {"prompt_tokens": 20 * len(messages), "completion_tokens": 5}, \
            ["stop"] * len(messages)


class ScriptedSupervisor:
    """Advice, a job plan, one request for more, then a final answer from the results."""

    def __init__(self, plans: list[Any] | None = None, rounds_before_answer: int = 1) -> None:
        self.plans = list(plans) if plans is not None else [GOOD_PLAN, GOOD_PLAN]
        self.rounds_before_answer = rounds_before_answer
        self.received: list[list[dict[str, Any]]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.decisions = 0

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any
             ) -> tuple[list[str], dict[str, int]]:
        self.received.append([dict(m) for m in messages])
        self.kwargs.append(kwargs)
        last = messages[-1]["content"]
        if "what should the small model look for" in last:
            text = "Look for the amount and the deadline in each chunk."
        elif "job plan" in last:
            plan = self.plans.pop(0)
            text = plan if isinstance(plan, str) else json.dumps(plan)
        elif "### Results" in last:
            text = "The results mention an amount."
        elif "last round" in last or self.decisions >= self.rounds_before_answer:
            results = [m["content"] for m in messages if "### Results" in m["content"]]
            answer = "312 euros by March 9" if "312 euros" in results[-1] else "unknown"
            text = json.dumps({"decision": "provide_final_answer", "explanation": "found",
                               "answer": answer})
        else:
            self.decisions += 1
            text = json.dumps({"decision": "request_additional_info",
                               "explanation": "need the deadline",
                               "feedback": "look for dates"})
        return [text], {"prompt_tokens": 10, "completion_tokens": 5}


def _sent(remote: ScriptedSupervisor) -> str:
    return "\n".join(str(m["content"]) for call in remote.received for m in call)


def test_chunking() -> None:
    chunks = chunk_by_section(DOCUMENT, 80, 10)
    assert len(chunks) == 3 and all(len(c) <= 80 for c in chunks)
    assert chunks[0][-10:] == chunks[1][:10]
    assert "".join(c if i == 0 else c[10:] for i, c in enumerate(chunks)) == DOCUMENT
    assert chunk_by_section("short", 80, 10) == ["short"]
    with pytest.raises(MinionProtocolError, match="overlap"):
        chunk_by_section("x", 10, 10)


def test_minions_round_trip_with_prompted_worker(worker: PromptedLocalClient) -> None:
    remote = ScriptedSupervisor()
    local = SpyLocal(worker)
    events: list[tuple[str, bool]] = []
    minions = MinionS(local, remote, max_rounds=3, chunk_size=80, chunk_overlap=10,
                      keep_truncated=True,
                      callback=lambda role, msg, is_final=False: events.append((role, is_final)))
    result = minions(TASK, "one invoice, plain text", [DOCUMENT])
    chunks = chunk_by_section(DOCUMENT, 80, 10)
    assert result.rounds == 2 and len(result.meta) == 2
    assert result["final_answer"] == result.final_answer
    # advice, then per round: plan, cot, decision
    assert len(remote.received) == 1 + 3 * 2
    assert remote.kwargs[0] == {} and remote.kwargs[1] == {
        "response_format": {"type": "json_object"}}
    # one local call per round, a list of single-message jobs with per-job semantics
    assert len(local.calls) == 2
    messages, kwargs = local.calls[0]
    assert kwargs == {"jobs": True} and len(messages) == 3 + 2
    jobs = result.meta[0]["local"]["jobs"]
    assert [(j["task_id"], j["chunk_id"]) for j in jobs] == [(0, 0), (0, 1), (0, 2),
                                                               (1, 0), (1, 2)]
    for message, job in zip(messages, jobs, strict=True):
        assert chunks[job["chunk_id"]] in message["content"]
        assert job["instruction"] in message["content"]
        assert sum(c in message["content"] for c in chunks) == 1  # one chunk per job
    # independent: each job answered as if alone
    alone = [worker.chat([m])[0][0] for m in messages[:2]]
    answers = [m["content"] for m in result.worker_messages if m["role"] == "assistant"]
    assert answers[:2] == alone and len(answers) == 10
    # the raw context never reaches the supervisor; the aggregated results do
    sent = _sent(remote)
    assert DOCUMENT not in sent and "Ana Silva" not in sent and "88-1902" not in sent
    assert not any(c in sent for c in chunks)
    results = result.meta[0]["remote"]["results"]
    assert f"### Results\n{results}" in sent and "## Task 0" in results
    assert "look for dates" in sent  # feedback starts round 2's plan
    assert TASK in sent and "3 chunk(s)" in sent
    assert result.remote_usage == Usage(completion_tokens=35, prompt_tokens=70)
    assert result.local_usage.prompt_tokens > 10 * 20 and result.local_usage.completion_tokens
    t = result.timing
    assert t["total_time"] >= t["local_call_time"] + t["remote_call_time"] > 0
    assert events[0] == ("supervisor", False) and events[-1] == ("supervisor", True)
    assert result.to_dict()["remote_usage"]["total_tokens"] == 105


def test_filtering_aggregation_and_final_round() -> None:
    remote = ScriptedSupervisor(rounds_before_answer=5)
    result = Minions(FakeJSONWorker(), remote, max_rounds=2, chunk_size=80,
                     chunk_overlap=10)(TASK, None, DOCUMENT)
    assert result.rounds == 2 and result.final_answer == "312 euros by March 9"
    assert "last round" in remote.received[-1][-1]["content"]
    results = result.meta[0]["remote"]["results"]
    assert "answer: 312 euros; explanation: the chunk states it; citation: total due is 312" \
        in results
    assert "March 9" in results
    kept = [j for j in result.meta[0]["local"]["jobs"] if j["kept"]]
    chunks = chunk_by_section(DOCUMENT, 80, 10)
    amount = next(i for i, c in enumerate(chunks) if "312" in c)
    date = next(i for i, c in enumerate(chunks) if "March" in c)
    assert [(j["task_id"], j["chunk_id"]) for j in kept] == [(0, amount), (1, date)]
    assert "not here" not in _sent(remote)  # null answers are filtered out


def test_truncated_jobs_are_skipped_by_default(worker: PromptedLocalClient) -> None:
    remote = ScriptedSupervisor()
    result = MinionS(worker, remote, max_rounds=1, chunk_size=80,
                     chunk_overlap=10)(TASK, None, [DOCUMENT])
    jobs = result.meta[0]["local"]["jobs"]
    assert all(j["done_reason"] in ("stop", "length") for j in jobs)
    assert all(not j["kept"] for j in jobs if j["done_reason"] == "length")
    assert result.final_answer in ("unknown", "312 euros by March 9")


def test_parse_job_plan_rejects_malformed_plans() -> None:
    plan = parse_job_plan(json.dumps(GOOD_PLAN), n_chunks=3, max_jobs=10)
    assert plan.tasks == [("Find the total amount due.", [0, 1, 2]),
                          ("Find the payment deadline.", [0, 2])]
    assert plan.advice == "Amounts are in euros." and len(plan.jobs(2)) == 10
    cases = {
        "def prepare_jobs(context):\n    return []": "not a JSON object",
        '{"plan": []}': "non-empty list 'tasks'",
        '{"tasks": []}': "non-empty list 'tasks'",
        '{"tasks": ["find it"]}': "must be an object",
        '{"tasks": [{"chunks": "all"}]}': "non-empty string 'instruction'",
        '{"tasks": [{"instruction": "x", "chunks": [0, 7]}]}': r"chunk ids \[7\] out of range",
        '{"tasks": [{"instruction": "x", "chunks": ["0"]}]}': "integer chunk ids",
        '{"tasks": [{"instruction": "x", "chunks": [1, 1]}]}': "repeated chunk ids",
        '{"tasks": [{"instruction": "x", "chunks": "some"}]}': "\"all\" or a non-empty list",
        '{"tasks": [{"instruction": "x", "code": "import os"}]}': r"unknown keys \['code'\]",
        '{"tasks": [{"instruction": "x"}], "advice": 3}': "'advice' must be a string",
    }
    for raw, message in cases.items():
        with pytest.raises(JobPlanError, match=message):
            parse_job_plan(raw, n_chunks=3, max_jobs=10)
    with pytest.raises(JobPlanError, match="makes 10 jobs, at most 8"):
        parse_job_plan(json.dumps(GOOD_PLAN), n_chunks=3, max_jobs=8, num_samples=2)
    with pytest.raises(JobPlanError, match="2 tasks, at most 1"):
        parse_job_plan(json.dumps(GOOD_PLAN), n_chunks=3, max_jobs=10, max_tasks=1)


def test_runner_rejects_or_retries_malformed_plans() -> None:
    bad = "```python\ndef prepare_jobs(context, a, b):\n    return []\n```"
    remote = ScriptedSupervisor(plans=[bad])
    with pytest.raises(JobPlanError, match="not a JSON object.*after 1 attempt"):
        MinionS(FakeJSONWorker(), remote, max_plan_attempts=1,
                chunk_size=80, chunk_overlap=10)(TASK, None, DOCUMENT)
    out_of_range = {"tasks": [{"instruction": "x", "chunks": [9]}]}
    remote = ScriptedSupervisor(plans=[out_of_range, GOOD_PLAN], rounds_before_answer=0)
    result = MinionS(FakeJSONWorker(), remote, max_plan_attempts=2, chunk_size=80,
                     chunk_overlap=10)(TASK, None, DOCUMENT)
    assert result.final_answer == "312 euros by March 9"
    retry = remote.received[2][-1]["content"]
    assert "rejected" in retry and "out of range" in retry and DOCUMENT[:30] not in retry


def test_protocol_errors(worker: PromptedLocalClient) -> None:
    class OneConversation:
        def chat(self, messages: list[dict[str, Any]]) -> tuple[list[str], None, list[str]]:
            return ["one answer"], None, ["stop"]

    with pytest.raises(MinionProtocolError, match="1 response.*per-job semantics"):
        MinionS(OneConversation(), ScriptedSupervisor(), chunk_size=80,
                chunk_overlap=10)(TASK, None, DOCUMENT)

    class BadDecision(ScriptedSupervisor):
        def chat(self, messages: list[dict[str, Any]], **kwargs: Any
                 ) -> tuple[list[str], dict[str, int]]:
            if "Now decide" in messages[-1]["content"]:
                return ['{"decision": "maybe"}'], {}
            return super().chat(messages, **kwargs)

    with pytest.raises(SupervisorReplyError, match="maybe"):
        MinionS(FakeJSONWorker(), BadDecision(), max_rounds=2, chunk_size=80)(TASK, None, DOCUMENT)

    class NeverJSON(ScriptedSupervisor):
        def chat(self, messages: list[dict[str, Any]], **kwargs: Any
                 ) -> tuple[list[str], dict[str, int]]:
            if "decide" in messages[-1]["content"] or ("JSON object only" in \
                    messages[-1]["content"] and "job plan" not in messages[-1]["content"]):
                return ["I would rather not say."], {}
            return super().chat(messages, **kwargs)

    with pytest.raises(SupervisorReplyError, match="after 2 attempt"):
        MinionS(FakeJSONWorker(), NeverJSON(), max_rounds=2, chunk_size=80,
                max_json_attempts=2)(TASK, None, DOCUMENT)

    class NoAnswer(ScriptedSupervisor):
        def chat(self, messages: list[dict[str, Any]], **kwargs: Any
                 ) -> tuple[list[str], dict[str, int]]:
            if "last round" in messages[-1]["content"]:
                return ['{"decision": "provide_final_answer"}'], {}
            return super().chat(messages, **kwargs)

    result = MinionS(FakeJSONWorker(), NoAnswer(), max_rounds=1,
                     chunk_size=80)(TASK, None, DOCUMENT)
    assert result.final_answer == NO_ANSWER and result.timing["remote_usage_estimated"]
    with pytest.raises(MinionProtocolError, match="chat"):
        MinionS(worker, object())
    with pytest.raises(MinionProtocolError, match="retrieval"):
        MinionS(worker, ScriptedSupervisor())(TASK, None, DOCUMENT, use_retrieval="bm25")
    with pytest.raises(MinionProtocolError, match="chunk_fn 'chunk_by_page'"):
        MinionS(worker, ScriptedSupervisor())(TASK, None, DOCUMENT, chunk_fn="chunk_by_page")
    with pytest.raises(MinionProtocolError, match="no chunks"):
        MinionS(worker, ScriptedSupervisor())(TASK, None, [""])
    with pytest.raises(MinionProtocolError, match="unknown done reason"):
        read_job_output(JobManifest(0, 0, 0, "x"), "text", "max_iterations")
