"""Minion protocol with the prompted tiny-LLaVA local worker and a scripted remote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedprompt.backbones.llava import LlavaBackbone
from fedprompt.minion.local_worker import LocalWorkerError, PromptedLocalClient
from fedprompt.minion.protocol import (
    NO_ANSWER,
    Minion,
    MinionProtocolError,
    SupervisorReplyError,
    parse_json_reply,
)
from fedprompt.minion.usage import Usage, UsageError
from fedprompt.prompts import DPFPLPrompt, HierarchicalPrompt
from fedprompt.prompts.portable import export_prompt
from fedprompt.tasks.config import TaskConfig

DOCUMENT = ("Invoice 4471 from Rivera Clinic: patient Ana Silva, account 88-1902, "
            "total due 312 euros by March 9.")
TASK = "How much is due on the invoice?"


@pytest.fixture(scope="module")
def llava() -> LlavaBackbone:
    return LlavaBackbone.from_preset("llava-tiny", weights_seed=0)


@pytest.fixture(scope="module")
def worker(llava: LlavaBackbone, tmp_path_factory: pytest.TempPathFactory
           ) -> PromptedLocalClient:
    learner = DPFPLPrompt(4, llava.ctx_dim, 1, rank=2, residual=True,
                          generator=torch.Generator().manual_seed(0))
    folder = export_prompt(tmp_path_factory.mktemp("prompt") / "p", learner, llava,
                           task=TaskConfig(kind="answer").model_dump())
    return PromptedLocalClient.from_folder(folder, llava, max_new_tokens=8)


@pytest.fixture()
def image_path(tmp_path: Path) -> Path:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 8:24] = (220, 30, 30)
    path = tmp_path / "receipt.png"
    Image.fromarray(pixels).save(path)
    return path


class ScriptedRemote:
    """Follows the protocol: asks, asks once more, then answers; records what it receives."""

    def __init__(self, fenced: bool = False) -> None:
        self.received: list[list[dict[str, Any]]] = []
        self.kwargs: list[dict[str, Any]] = []
        self.fenced = fenced

    def _json(self, obj: dict[str, Any]) -> str:
        text = json.dumps(obj)
        return f"Sure.\n```json\n{text}\n```\nDone." if self.fenced else text

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any
             ) -> tuple[list[str], dict[str, int]]:
        self.received.append([dict(m) for m in messages])
        self.kwargs.append(kwargs)
        last = messages[-1]["content"]
        if len(messages) == 1:
            text = self._json({"reasoning": "need the amount",
                               "message": "what total is due?"})
        elif "Think step by step" in last:
            text = "The worker answered; one more question will help."
        elif "last round" in last:
            text = self._json({"decision": "provide_final_answer", "answer": "312 euros"})
        else:
            asked = sum("request_additional_info" in m["content"] for m in messages
                        if m["role"] == "assistant")
            text = self._json({"decision": "request_additional_info",
                               "message": "by when?"} if asked == 0 else
                              {"decision": "provide_final_answer", "answer": "312 euros"})
        return [text], {"prompt_tokens": 10, "completion_tokens": 5}


def _sent_text(remote: ScriptedRemote) -> str:
    return "\n".join(f"{m}" for call in remote.received for m in call)


def test_minion_round_trip_keeps_context_local(worker: PromptedLocalClient,
                                               image_path: Path) -> None:
    remote = ScriptedRemote()
    events: list[tuple[str, bool]] = []
    minion = Minion(worker, remote, max_rounds=3,
                    callback=lambda role, msg, is_final=False: events.append((role, is_final)))
    result = minion(TASK, [DOCUMENT], doc_metadata="one invoice", images=[str(image_path)])
    assert result.final_answer == "312 euros" == result["final_answer"]
    assert result.rounds == 2
    # remote: initial, (cot, decide) x 2 rounds
    assert len(remote.received) == 5
    assert remote.kwargs[0] == {"response_format": {"type": "json_object"}}
    assert remote.kwargs[1] == {}
    sent = _sent_text(remote)
    assert DOCUMENT not in sent and "Ana Silva" not in sent and "88-1902" not in sent
    assert str(image_path) not in sent and "images" not in sent
    assert TASK in sent and "one invoice" in sent
    # the worker saw the document, the image and both supervisor questions
    assert DOCUMENT in result.worker_messages[0]["content"]
    assert result.worker_messages[0]["images"] == [str(image_path)]
    assert [m["content"] for m in result.worker_messages if m["role"] == "user"] == [
        "what total is due?", "by when?"]
    for m in result.worker_messages:
        if m["role"] == "assistant":
            assert repr(m["content"])[1:-1] in sent  # worker answers are what the remote gets
    assert result.remote_usage == Usage(completion_tokens=25, prompt_tokens=50)
    assert result.local_usage.prompt_tokens > 2 * (4 + 1 + 16)
    assert 0 < result.local_usage.completion_tokens <= 16
    t = result.timing
    assert t["total_time"] >= t["local_call_time"] + t["remote_call_time"] > 0
    assert not t["remote_usage_estimated"]
    assert events[0] == ("supervisor", False) and events[-1] == ("supervisor", True)
    assert result.to_dict()["local_usage"]["total_tokens"] == result.local_usage.total_tokens


def test_last_round_forces_answer_and_fenced_json(worker: PromptedLocalClient) -> None:
    remote = ScriptedRemote(fenced=True)
    result = Minion(worker, remote, max_rounds=1)(TASK, DOCUMENT)
    assert result.final_answer == "312 euros" and result.rounds == 1
    assert len(remote.received) == 2
    assert "last round" in remote.received[-1][-1]["content"]


def test_worker_jobs_and_usage(worker: PromptedLocalClient, image_path: Path) -> None:
    conv = [{"role": "system", "content": "context: the total is 312."},
            {"role": "user", "content": "what is the total?"}]
    texts, usage, reasons = worker.chat(conv)
    assert len(texts) == 1 and reasons[0] in ("stop", "length")
    jobs = [{"role": "user", "content": "job one"}, {"role": "user", "content": "job two"}]
    texts2, usage2, reasons2 = worker.chat(jobs)
    assert len(texts2) == len(reasons2) == 2
    alone = [worker.chat([job])[0][0] for job in jobs]
    assert texts2 == alone  # independent: job two does not see job one
    as_lists, _, _ = worker.chat([[jobs[0]], [jobs[1]]])
    assert as_lists == alone
    one_conv, _, _ = worker.chat(jobs, jobs=False)
    assert len(one_conv) == 1
    _, usage3, _ = worker.chat([{**conv[0], "images": [str(image_path)]}, conv[1]])
    assert usage3.prompt_tokens == usage.prompt_tokens + 16
    assert usage2.total_tokens == usage2.prompt_tokens + usage2.completion_tokens


def test_worker_errors(worker: PromptedLocalClient, llava: LlavaBackbone,
                       tmp_path: Path) -> None:
    with pytest.raises(LocalWorkerError, match="only .* fit"):
        worker.chat([{"role": "user", "content": "word " * 600}])
    with pytest.raises(LocalWorkerError, match="role"):
        worker.chat([{"content": "x"}])
    with pytest.raises(LocalWorkerError, match="neither an existing file nor base64"):
        worker.chat([{"role": "user", "content": "x", "images": ["/no/such.png"]}])
    per_class = export_prompt(tmp_path / "pc", HierarchicalPrompt(4, llava.ctx_dim, 3), llava)
    with pytest.raises(LocalWorkerError, match="one context"):
        PromptedLocalClient.from_folder(per_class, llava)
    left = PromptedLocalClient(worker.backbone, worker.prompt, max_new_tokens=2,
                               truncation="left")
    texts, _, _ = left.chat([{"role": "user", "content": "word " * 600}])
    assert len(texts) == 1


def test_parse_json_reply_and_protocol_errors(worker: PromptedLocalClient) -> None:
    assert parse_json_reply('{"a": 1}') == {"a": 1}
    assert parse_json_reply('x {"a": {"b": 2}} y') == {"a": {"b": 2}}
    assert parse_json_reply('```json\n{"a": 1}\n``` then {"b": 2}') == {"a": 1}
    with pytest.raises(SupervisorReplyError, match="no JSON object"):
        parse_json_reply("I think the answer is 4")

    class Chatty:
        def chat(self, messages: list[dict[str, Any]]) -> tuple[list[str], None]:
            return ["no json here"], None

    with pytest.raises(SupervisorReplyError, match="no json here"):
        Minion(worker, Chatty())(TASK, DOCUMENT)

    class BadDecision:
        def chat(self, messages: list[dict[str, Any]]) -> tuple[list[str], None]:
            if len(messages) == 1:
                return ['{"message": "q?"}'], None
            return ['{"decision": "maybe"}'], None

    with pytest.raises(SupervisorReplyError, match="maybe"):
        Minion(worker, BadDecision(), max_rounds=2)(TASK, DOCUMENT)

    class NoAnswer:
        def chat(self, messages: list[dict[str, Any]]) -> tuple[list[str], None]:
            return ['{"message": "q?", "decision": "provide_final_answer"}'], None

    result = Minion(worker, NoAnswer(), max_rounds=1)(TASK, DOCUMENT)
    assert result.final_answer == NO_ANSWER
    assert result.timing["remote_usage_estimated"] and result.remote_usage.prompt_tokens > 0
    with pytest.raises(MinionProtocolError, match="chat"):
        Minion(worker, object())
    with pytest.raises(MinionProtocolError, match="is_privacy"):
        Minion(worker, NoAnswer())(TASK, DOCUMENT, is_privacy=True)
    with pytest.raises(UsageError):
        Usage.coerce({"prompt_tokens": -1})


# ------------------------------------------------------------- through the enclave
def test_minion_through_secure_enclave_server(worker: PromptedLocalClient) -> None:
    from fedprompt.minion.attestation import InsecureMockAttestation
    from fedprompt.minion.loopback import LoopbackEnclave
    from fedprompt.minion.secure_client import SecureChatClient

    with LoopbackEnclave("callable:fedprompt.minion.scripted:supervisor") as enclave:
        remote = SecureChatClient(enclave.url, InsecureMockAttestation(),
                                  allow_insecure_mock=True, ca_cert=enclave.cert)
        try:
            result = Minion(worker, remote, max_rounds=3)(TASK, [DOCUMENT])
        finally:
            remote.close()
        log = enclave.log.read_text()
    worker_answers = [m["content"] for m in result.worker_messages if m["role"] == "assistant"]
    assert len(worker_answers) == 2 and result.rounds == 2
    assert result.final_answer == f"According to the local worker: {worker_answers[-1]}" or (
        not worker_answers[-1] and "found nothing" in result.final_answer)
    assert result.supervisor_messages[1]["content"].count(TASK) == 1
    sent = _sent_text_messages(result.supervisor_messages)
    assert DOCUMENT not in sent and "Ana Silva" not in sent
    assert DOCUMENT not in log and TASK not in log
    assert result.timing["remote_usage_estimated"] and result.remote_usage.total_tokens > 0
    assert remote.session is None or remote.session.attestation is not None


def _sent_text_messages(messages: list[dict[str, Any]]) -> str:
    return "\n".join(str(m["content"]) for m in messages)


def test_clip_perception_adds_text_facts(worker: PromptedLocalClient, image_path: Path,
                                         tmp_path: Path) -> None:
    from fedprompt.backbones import CLIPBackbone
    from fedprompt.minion.perception import ClipPerception, PerceptionError
    from fedprompt.prompts import CoOpPrompt

    clip = CLIPBackbone.from_preset("clip-tiny", weights_seed=0)
    names = ["red", "green", "blue"]
    folder = export_prompt(tmp_path / "clip", CoOpPrompt(4, clip.ctx_dim, 3), clip,
                           classnames=names)
    perception = ClipPerception.from_folder(folder, clip, top_k=3, min_probability=0.0)
    image = Image.open(image_path)
    probs = perception.probabilities([image, image])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    facts = perception([image])
    assert len(facts) == 1 and facts[0].startswith("image 1: ")
    assert sum(name in facts[0] for name in names) == 3
    seeing = PromptedLocalClient(worker.backbone, worker.prompt, max_new_tokens=2,
                                 perception=perception)
    msg = [{"role": "user", "content": "what color?", "images": [str(image_path)]}]
    _, with_facts, _ = seeing.chat(msg)
    _, without, _ = PromptedLocalClient(worker.backbone, worker.prompt,
                                        max_new_tokens=2).chat(msg)
    assert with_facts.prompt_tokens > without.prompt_tokens
    bare = export_prompt(tmp_path / "bare", CoOpPrompt(4, clip.ctx_dim, 3), clip)
    with pytest.raises(PerceptionError, match="class names"):
        ClipPerception.from_folder(bare, clip)
