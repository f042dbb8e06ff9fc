"""The Minion local worker: a frozen LLaVA steered by a trained soft prompt.

:class:`PromptedLocalClient` implements the minions *local* client contract
``chat(messages, **kwargs) -> (responses, usage, done_reasons)``:

* one conversation (``[{role, content[, images]}, ...]``, Minion's worker chat) gives one
  response;
* a list of independent jobs gives one response per job (MinionS semantics, which the
  published ``OllamaClient`` no longer honours): either a list of conversations
  (``[[msg, ...], [msg, ...]]``), or a flat list of single ``user`` messages (what MinionS
  sends), or any flat list with ``jobs=True``.

Every turn is rendered as ``role: content`` lines ending in ``assistant:``, tokenized with
the backbone's tokenizer and fed as input embeddings behind the trained context (the layout
the prompt was trained with, ``prefix`` or ``after-image``); answers are greedy, KV-cached,
up to EOS (done reason ``"stop"``) or the token limit (``"length"``). Images attached to
messages (``images``/``image``: paths, raw or base64 bytes, or PIL images) are encoded by
the local vision tower; an optional perception tool (e.g. :class:`ClipPerception`) turns
them into short text facts added to the conversation. Nothing leaves this process.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fedprompt.backbones.llava import LlavaBackbone
from fedprompt.errors import FedPromptError
from fedprompt.minion.usage import Usage
from fedprompt.prompts.portable import PortablePrompt, load_prompt

Message = dict[str, Any]
ImageLike = str | Path | bytes | Image.Image
Perception = Callable[[Sequence[Image.Image]], list[str]]

IMAGE_KEYS = ("images", "image")


class LocalWorkerError(FedPromptError):
    """The local worker cannot serve a request (bad messages, too long, unusable prompt)."""


def load_image(item: ImageLike) -> Image.Image:
    """A PIL image from a path, raw bytes, base64 text or a PIL image (loaded eagerly)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, bytes):
        data = item
    elif isinstance(item, Path) or (isinstance(item, str) and Path(item).is_file()):
        data = Path(item).read_bytes()
    elif isinstance(item, str):
        text = item.split(",", 1)[1] if item.startswith("data:") else item
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LocalWorkerError(f"image {item[:40]!r}... is neither an existing file nor "
                                   "base64 data") from exc
    else:
        raise LocalWorkerError(f"cannot read an image from a {type(item).__name__}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except OSError as exc:
        raise LocalWorkerError(f"not a readable image ({len(data)} bytes)") from exc
    return image


def message_images(messages: Sequence[Message]) -> list[Image.Image]:
    out: list[Image.Image] = []
    for message in messages:
        for key in IMAGE_KEYS:
            value = message.get(key)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple)) else [value]
            out.extend(load_image(item) for item in items)
    return out


def render(messages: Sequence[Message]) -> str:
    """``role: content`` lines, then ``assistant:`` (the turn to generate)."""
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LocalWorkerError(f"message #{i} must be a dict with role and content, got "
                                   f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise LocalWorkerError(f"message #{i} needs string 'role' and 'content'")
        lines.append(f"{role}: {content}")
    lines.append("assistant:")
    return "\n".join(lines)


class PromptedLocalClient:
    """A backbone plus a trained portable prompt, as a minions local client.

    Args:
        backbone: the frozen LLaVA the prompt was trained in (checked on construction).
        prompt: a :class:`PortablePrompt` with its full context (exported with
            ``include_personal=True``) and one context (``K = 1``).
        max_new_tokens: default answer limit (``chat(..., max_tokens=n)`` overrides).
        truncation: ``"error"`` (default) raises when a conversation does not fit the
            model's positions; ``"left"`` drops the oldest text tokens.
        perception: optional ``images -> [fact, ...]`` tool; its facts are added as text.
    """

    local = True  # minions clients mark local ones with this attribute

    def __init__(self, backbone: LlavaBackbone, prompt: PortablePrompt, *,
                 max_new_tokens: int = 32, truncation: str = "error",
                 perception: Perception | None = None, check_weights: bool = True) -> None:
        if truncation not in ("error", "left"):
            raise LocalWorkerError(f"truncation must be 'error' or 'left', got {truncation!r}")
        if max_new_tokens < 1:
            raise LocalWorkerError("max_new_tokens must be at least 1")
        prompt.check_backbone(backbone, check_weights)
        context = prompt.context
        if context.dim() != 3 or context.shape[0] != 1:
            raise LocalWorkerError(
                f"the prompt's context has shape {list(context.shape)}; generation needs one "
                "context [1, n_ctx, d] (per-class contexts can only score class names)")
        self.backbone = backbone
        self.prompt = prompt
        self.context = context.to(backbone.device)
        self.position = str(prompt.metadata.get("task", {}).get("prompt_position", "prefix"))
        if self.position not in ("prefix", "after-image"):
            raise LocalWorkerError(f"unknown prompt_position {self.position!r} in the prompt")
        self.max_new_tokens = max_new_tokens
        self.truncation = truncation
        self.perception = perception
        self.model_name = f"{backbone.source}+{prompt.metadata['prompt']['learner']}"

    @classmethod
    def from_folder(cls, folder: str | Path, backbone: LlavaBackbone, **kwargs: Any
                    ) -> PromptedLocalClient:
        """Load an exported prompt folder (checked against ``backbone``)."""
        check = kwargs.get("check_weights", True)
        return cls(backbone, load_prompt(folder, backbone, check_weights=check), **kwargs)

    # ------------------------------------------------------------------ chat
    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]], *,
             jobs: bool | None = None, max_tokens: int | None = None, **kwargs: Any
             ) -> tuple[list[str], Usage, list[str]]:
        """``(responses, usage, done_reasons)``: one entry per job (see module doc).

        Decoding is greedy; sampling options of other clients (``temperature``,
        ``response_format``...) are accepted for interface compatibility and have no effect.
        """
        conversations = self._split_jobs(messages, jobs)
        limit = max_tokens or self.max_new_tokens
        responses, reasons = [], []
        usage = Usage()
        for conversation in conversations:
            text, reason, job_usage = self._generate(conversation, limit)
            responses.append(text)
            reasons.append(reason)
            usage = usage + job_usage
        return responses, usage, reasons

    @staticmethod
    def _split_jobs(messages: Any, jobs: bool | None) -> list[list[Message]]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise LocalWorkerError("chat needs a non-empty list of messages (or of jobs)")
        if all(isinstance(m, (list, tuple)) for m in messages):
            return [list(m) for m in messages]
        if any(isinstance(m, (list, tuple)) for m in messages):
            raise LocalWorkerError("mix of messages and job lists: give either one "
                                   "conversation or a list of conversations")
        if jobs is None:
            jobs = len(messages) > 1 and all(
                isinstance(m, dict) and m.get("role") == "user" for m in messages)
        return [[m] for m in messages] if jobs else [list(messages)]

    def _image_embeds(self, images: list[Image.Image]) -> Tensor:
        d = self.backbone.ctx_dim
        if not images:
            return torch.zeros(1, 0, d, device=self.backbone.device)
        feats = self.backbone.encode_images(self.backbone.preprocess(images))  # [n, N, d]
        return feats.reshape(1, -1, d).to(self.backbone.device)

    @torch.no_grad()
    def _generate(self, conversation: list[Message], limit: int) -> tuple[str, str, Usage]:
        backbone = self.backbone
        images = message_images(conversation)
        text = render(conversation)
        if images and self.perception is not None:
            facts = self.perception(images)
            if facts:
                text = "image facts: " + "; ".join(facts) + "\n" + text
        ids = backbone.encode_text(text)
        image = self._image_embeds(images)
        fixed_len = self.context.shape[1] + 1 + image.shape[1]
        room = backbone.max_length - fixed_len - limit
        if len(ids) > room:
            if self.truncation == "error" or room <= 0:
                raise LocalWorkerError(
                    f"the conversation has {len(ids)} text tokens, but only {max(room, 0)} fit "
                    f"({backbone.max_length} positions - {self.context.shape[1]} soft prompt - "
                    f"1 BOS - {image.shape[1]} image - {limit} answer tokens): shorten the "
                    "context, lower max_tokens, or use truncation='left'")
            ids = ids[-room:]
        bos = backbone.token_embedding(torch.tensor([[backbone.bos_token_id]]))
        dtype = bos.dtype
        ctx = self.context.to(dtype)
        image = image.to(dtype)
        parts = [ctx, bos, image] if self.position == "prefix" else [bos, image, ctx]
        tokens = backbone.token_embedding(torch.tensor([ids], dtype=torch.long)).to(dtype)
        embeds = torch.cat([*parts, tokens], dim=1)
        hidden, cache = backbone.hidden_states(embeds, use_cache=True)
        position = embeds.shape[1]
        out: list[int] = []
        reason = "length"
        for _ in range(limit):
            token = int(backbone.lm_logits(hidden[:, -1]).argmax(dim=-1)[0])
            if token == backbone.eos_token_id:
                reason = "stop"
                break
            out.append(token)
            if len(out) == limit:
                break
            step = backbone.token_embedding(torch.tensor([[token]])).to(dtype)
            positions = torch.full((1, 1), position, device=backbone.device)
            hidden, cache = backbone.hidden_states(step, position_ids=positions,
                                                   past_key_values=cache, use_cache=True)
            position += 1
        usage = Usage(completion_tokens=len(out), prompt_tokens=embeds.shape[1])
        return backbone.decode(out), reason, usage
