"""The small interface every frozen vision-language backbone implements.

A backbone is frozen: prompt learners own the only trainable tensors. It does three
things for prompt learning:

* turn images into pixel tensors (:meth:`preprocess`) and pixel tensors into features in
  the joint image-text space (:meth:`encode_images`);
* tokenize class prompts ``"X X ... X {class}."`` once (:meth:`tokenize_class_prompts`),
  keeping the frozen token embeddings around the learned context;
* encode class prompts whose context positions hold learned embeddings
  (:meth:`encode_class_prompts`), in chunks of classes so that memory does not grow with
  the number of classes beyond one chunk's activations (optionally recomputed in
  backward with gradient checkpointing).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from fedprompt.errors import BackboneError, PromptError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def precision_autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` to bf16/fp16 on ``device``, or nothing for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device.type, dtype=PRECISIONS[precision]):
        yield


@dataclass
class ClassPromptTokens:
    """Tokenized class prompts ``[SOS] X*n_ctx <class tokens> . [EOS] [pad...]``.

    ``embeddings`` are the frozen token embeddings of the template; positions
    ``1 .. n_ctx`` are replaced by learned context when the prompts are encoded.
    """

    classnames: list[str]
    n_ctx: int
    input_ids: Tensor  # [C, L] long
    eos_positions: Tensor  # [C] long
    embeddings: Tensor  # [C, L, width]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to(self, device: torch.device | str) -> ClassPromptTokens:
        return ClassPromptTokens(
            self.classnames,
            self.n_ctx,
            self.input_ids.to(device),
            self.eos_positions.to(device),
            self.embeddings.to(device),
        )


#: config keys that describe how a model was saved or loaded, not what it computes;
#: ``save_pretrained`` adds ``architectures`` and ``dtype`` to a live config
SERIALIZATION_KEYS = frozenset({"transformers_version", "_name_or_path", "_commit_hash",
                                "architectures", "dtype", "torch_dtype"})


def architecture_config(config: Any) -> dict[str, Any]:
    """A transformers config as a dict without serialization details (recursively), so a
    model's identity hash does not change when it is saved or reloaded."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in SERIALIZATION_KEYS}
        return value

    return strip(config.to_dict())


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when present; otherwise the device named."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise BackboneError(
            f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(
            f"device {spec!r} asked for but CUDA is not available here: use backbone.device=auto "
            "or cpu"
        )
    return device


class VisionLanguageBackbone(nn.Module, ABC):
    """A frozen dual encoder seen through the operations prompt learning needs."""

    #: width of token embeddings (the size of one context vector)
    ctx_dim: int
    #: dimension of the joint image-text feature space
    embed_dim: int
    #: longest token sequence the text encoder accepts
    max_text_length: int

    def __init__(self, precision: str = "fp32", text_chunk_size: int = 128,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise BackboneError(f"unknown precision {precision!r}: use one of {list(PRECISIONS)}")
        self.precision = precision
        self.text_chunk_size = text_chunk_size
        self.gradient_checkpointing = gradient_checkpointing

    # ----------------------------------------------------------------- device/dtype
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision for the frozen encoders when configured (bf16/fp16)."""
        return precision_autocast(self.device, self.precision)

    def freeze(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> VisionLanguageBackbone:
        # A frozen backbone stays in eval mode (no dropout), whatever its parent does.
        return super().train(False)

    # ------------------------------------------------------------------- identity
    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies this backbone's weights and preprocessing (used as cache keys
        and in exported prompts)."""

    # --------------------------------------------------------------------- images
    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images to a pixel tensor ``[B, 3, H, W]`` on the CPU."""

    @abstractmethod
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Pixel tensor to image features ``[B, embed_dim]`` (float32, not normalised)."""

    # ----------------------------------------------------------------------- text
    #: tokenizer with ``__call__(text, add_special_tokens=...)`` and ``pad_token_id``
    tokenizer: Any

    @abstractmethod
    def token_embedding(self, input_ids: Tensor) -> Tensor:
        """The frozen input embeddings ``[..., ctx_dim]`` of token ids."""

    def tokenize_class_prompts(self, classnames: Sequence[str], n_ctx: int) -> ClassPromptTokens:
        """Tokenize ``"X " * n_ctx + "{class}."`` for every class (the tokenizer adds its
        start and end tokens), pad to the longest prompt, and keep the frozen embeddings.
        Positions ``1..n_ctx`` must be the placeholders; the end token's position is kept
        for pooling (CLIP) or masking (BERT-style encoders)."""
        if n_ctx < 1:
            raise PromptError(f"n_ctx={n_ctx}: a prompt needs at least one context token")
        if not classnames:
            raise PromptError("no class names to build prompts for")
        placeholder = " ".join(["X"] * n_ctx)
        x_id = self.tokenizer("X", add_special_tokens=False)["input_ids"]
        if len(x_id) != 1:
            raise BackboneError("the tokenizer does not map 'X' to a single token")
        ids_per_class = [
            self.tokenizer(f"{placeholder} {name}.")["input_ids"] for name in classnames
        ]
        longest = max(range(len(classnames)), key=lambda i: len(ids_per_class[i]))
        if len(ids_per_class[longest]) > self.max_text_length:
            name_tokens = len(ids_per_class[longest]) - n_ctx - 2
            max_ctx = self.max_text_length - 2 - name_tokens
            raise PromptError(
                f"n_ctx={n_ctx} is out of range for class {classnames[longest]!r}: its prompt "
                f"needs {len(ids_per_class[longest])} tokens but the text encoder takes at most "
                f"{self.max_text_length}. Lower prompt.n_ctx to at most {max(max_ctx, 0)}"
                + (" or shorten the class name" if max_ctx < 1 else "")
            )
        length = len(ids_per_class[longest])
        input_ids = torch.full((len(classnames), length), self.tokenizer.pad_token_id,
                               dtype=torch.long)
        eos = torch.empty(len(classnames), dtype=torch.long)
        for i, ids in enumerate(ids_per_class):
            if ids[1 : 1 + n_ctx] != x_id * n_ctx:
                raise BackboneError(f"tokenizing class {classnames[i]!r} did not keep the "
                                    "context placeholders in positions 1..n_ctx")
            input_ids[i, : len(ids)] = torch.tensor(ids)
            eos[i] = len(ids) - 1
        device = self.device
        input_ids, eos = input_ids.to(device), eos.to(device)
        with torch.no_grad():
            embeddings = self.token_embedding(input_ids)
        return ClassPromptTokens(list(classnames), n_ctx, input_ids, eos, embeddings.detach())

    def embed_text(self, text: str) -> Tensor:
        """Token embeddings ``[T, ctx_dim]`` of ``text`` without start/end tokens (used to
        initialise context vectors from words such as "a photo of a")."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromptError(f"context init text {text!r} has no tokens")
        with torch.no_grad():
            emb = self.token_embedding(torch.tensor(ids, device=self.device))
        return emb.detach().clone()

    @abstractmethod
    def encode_prompt_embeddings(self, embeddings: Tensor, eos_positions: Tensor) -> Tensor:
        """Text encoder on token embeddings ``[N, L, ctx_dim]``; features ``[N, embed_dim]``."""

    def encode_class_prompts(self, ctx: Tensor, tokens: ClassPromptTokens,
                             chunk_size: int | None = None,
                             checkpoint: bool | None = None) -> Tensor:
        """Class text features ``[C, embed_dim]`` with ``ctx`` in the context positions.

        Args:
            ctx: ``[n_ctx, ctx_dim]`` or ``[1, n_ctx, ctx_dim]`` (one context for all
                classes) or ``[C, n_ctx, ctx_dim]`` (one per class).
            tokens: from :meth:`tokenize_class_prompts`.
            chunk_size: classes per text-encoder call (default: the backbone's setting).
            checkpoint: recompute each chunk's activations in backward (default: the
                backbone's setting); only matters when ``ctx`` requires grad.
        """
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        self._check_context(ctx, tokens)
        num_classes = tokens.num_classes
        chunk = chunk_size or self.text_chunk_size
        use_checkpoint = self.gradient_checkpointing if checkpoint is None else checkpoint
        use_checkpoint = use_checkpoint and ctx.requires_grad and torch.is_grad_enabled()
        ctx = ctx.to(tokens.embeddings.dtype)
        features = []
        for start in range(0, num_classes, chunk):
            stop = min(start + chunk, num_classes)
            part_ctx = ctx if ctx.shape[0] == 1 else ctx[start:stop]
            if use_checkpoint:
                out = torch.utils.checkpoint.checkpoint(
                    self._encode_chunk, part_ctx, tokens, start, stop, use_reentrant=False
                )
            else:
                out = self._encode_chunk(part_ctx, tokens, start, stop)
            features.append(out)
        return torch.cat(features, dim=0)

    def _check_context(self, ctx: Tensor, tokens: ClassPromptTokens) -> None:
        num_classes, n_ctx = tokens.num_classes, tokens.n_ctx
        if ctx.dim() != 3 or ctx.shape[1:] != (n_ctx, self.ctx_dim) or ctx.shape[0] not in (
            1, num_classes
        ):
            raise PromptError(
                f"context of shape {tuple(ctx.shape)} does not fit prompts tokenized with "
                f"n_ctx={n_ctx} for {num_classes} classes on a backbone of width "
                f"{self.ctx_dim}: expected [{n_ctx}, {self.ctx_dim}], [1, {n_ctx}, "
                f"{self.ctx_dim}] or [{num_classes}, {n_ctx}, {self.ctx_dim}]"
            )

    def _encode_chunk(self, ctx: Tensor, tokens: ClassPromptTokens, start: int,
                      stop: int) -> Tensor:
        frozen = tokens.embeddings[start:stop]
        n_ctx = tokens.n_ctx
        ctx = ctx.expand(stop - start, -1, -1)
        embeddings = torch.cat([frozen[:, :1], ctx, frozen[:, 1 + n_ctx :]], dim=1)
        return self.encode_prompt_embeddings(embeddings, tokens.eos_positions[start:stop])

    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """Temperature of the cosine-similarity logits (CLIP's exp(logit_scale))."""
