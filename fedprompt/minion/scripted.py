"""A deterministic, rule-based Minion supervisor (for demos and tests, no model needed).

Serve it from the enclave server with ``--backend
callable:fedprompt.minion.scripted:supervisor``. It follows the protocol of
:mod:`fedprompt.minion.protocol`: asks the worker the task, asks one follow-up, then gives
as final answer what the worker said. It only ever sees the supervisor conversation (the
task and the worker's answers), never the worker's context.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TASK = re.compile(r"### Task\n(.*?)\n\n", re.DOTALL)
_RESPONSE = re.compile(r"### Response\n(.*?)\n\n### Instructions", re.DOTALL)


def _worker_answers(messages: list[dict[str, Any]]) -> list[str]:
    return [m.group(1).strip() for msg in messages if msg.get("role") == "user"
            for m in [_RESPONSE.search(str(msg.get("content", "")))] if m]


def supervisor(messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """One supervisor turn (``fn(messages, params) -> str``, the enclave callable shape)."""
    last = str(messages[-1].get("content", ""))
    if len(messages) == 1:
        found = _TASK.search(last)
        task = found.group(1).strip() if found else last
        return json.dumps({"reasoning": "the worker has the document; ask it directly",
                           "message": task})
    answers = _worker_answers(messages)
    if "Think step by step" in last:
        return (f"The worker has answered {len(answers)} time(s); "
                + ("one confirmation will help." if len(answers) < 2 else "that is enough."))
    if "last round" in last or len(answers) >= 2:
        final = answers[-1] if answers and answers[-1] else "the worker found nothing"
        return json.dumps({"decision": "provide_final_answer",
                           "answer": f"According to the local worker: {final}"})
    return json.dumps({"decision": "request_additional_info",
                       "message": "Quote the sentence of the document that supports that."})
