"""The ``[task]`` section: what a generative backbone (LLaVA) is trained to do.

Dual encoders (CLIP, effnet-minilm) always classify by image-text similarity and ignore
this section except for ``kind = "classify"`` (the default); ``kind = "answer"`` needs a
generative backbone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    """What the prompted model is trained and evaluated on."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: Literal["classify", "answer"] = Field(
        "classify",
        description="classify: image classification (on LLaVA: generate the class name); "
        "answer: free-form answers to questions about images, from a JSONL data set "
        "(data.dataset = folder with train.jsonl/test.jsonl, see docs/llava.md; LLaVA only)",
    )
    question: str = Field(
        "what is shown in the image? answer:",
        description="LLaVA classify: the question asked about every image (the answer is the "
        "class name)",
    )
    loss: Literal["answer", "ranking"] = Field(
        "answer",
        description="LLaVA classify: answer = next-token loss on the class name's tokens; "
        "ranking = cross-entropy over the class names' log-likelihoods (needed by learners "
        "with one context per class, e.g. hierarchical)",
    )
    prompt_position: Literal["prefix", "after-image"] = Field(
        "prefix",
        description="where the soft prompt enters the language model's input: prefix = "
        "before everything (peft prompt-tuning layout); after-image = between the image "
        "tokens and the question",
    )
    max_new_tokens: int = Field(8, ge=1, description="LLaVA: greedy generation length limit")
