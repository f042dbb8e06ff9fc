"""LLaVA through Hugging Face ``transformers``: a frozen multimodal LLM for soft prompts.

* :meth:`LlavaBackbone.from_pretrained` loads ``LlavaForConditionalGeneration`` and its
  processor from a local folder or a hub id (LLaVA-1.5 layout: CLIP vision tower,
  projector, Llama-family language model), with ``device_map`` and bf16 on CUDA.
* :meth:`LlavaBackbone.from_preset` builds ``llava-tiny`` / ``llava-small`` from config
  with seeded random weights (no file, no network), tokenized with the vendored CLIP BPE
  vocabulary (:mod:`fedprompt.backbones.tokenizer`): 49,408 text ids, one image token
  (id 49,408) on top; ``<|startoftext|>`` is BOS, ``<|endoftext|>`` is EOS and padding. That
  tokenizer lower-cases and covers any text, and is the same for every data set, so a
  preset's config (and its hash) never depends on the data.

Soft prompts enter the language model as input embeddings. The image tower and the
projector are frozen and run once per image (:meth:`encode_images`); the language model
then reads ``inputs_embeds`` that :mod:`fedprompt.tasks.generative` assembles
(soft prompt, BOS, image features, question, answer). This is exactly what
``LlavaModel.forward`` does with ``input_ids`` (it scatters the projected image features
into the image-token positions), minus the recomputation of the image features (tested).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from fedprompt.backbones.base import PRECISIONS, architecture_config, precision_autocast
from fedprompt.backbones.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    offline_clip_tokenizer,
)
from fedprompt.errors import BackboneError, PromptError

#: Offline presets (random weights): vision tower (CLIP) and language model (Llama) sizes.
PRESETS: dict[str, dict[str, int]] = {
    "llava-tiny": dict(vision_width=64, vision_layers=2, image_size=32, patch_size=8,
                       width=64, layers=2, heads=4, kv_heads=2),
    "llava-small": dict(vision_width=128, vision_layers=4, image_size=64, patch_size=8,
                        width=128, layers=4, heads=4, kv_heads=2),
}
IMAGE_TOKEN_ID = VOCAB_SIZE  # one id past the CLIP vocabulary
#: std of the presets' random weights. transformers' default (0.02) gives a language model
#: whose output barely depends on its input (near-uniform next-token distributions), so no
#: prompt could steer it; at 0.1 the random model is input-sensitive and soft prompts learn
#: (tiny: colour classification 33% -> 93% in 30 steps). Still plumbing, not a real LLM.
INIT_STD = 0.1
#: fingerprint every tensor in full up to this many parameters, else a sampled digest
_FULL_HASH_LIMIT = 50_000_000


def preset_config(name: str) -> LlavaConfig:
    """The ``LlavaConfig`` of an offline preset."""
    if name not in PRESETS:
        raise BackboneError(f"unknown LLaVA preset {name!r}: choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    vision = CLIPVisionConfig(
        hidden_size=p["vision_width"], intermediate_size=4 * p["vision_width"],
        num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
        image_size=p["image_size"], patch_size=p["patch_size"],
        projection_dim=p["vision_width"], initializer_range=INIT_STD,
    )
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE + 1, hidden_size=p["width"], intermediate_size=4 * p["width"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"], max_position_embeddings=512,
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
        tie_word_embeddings=True, initializer_range=INIT_STD,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       tie_word_embeddings=True, initializer_range=INIT_STD)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_llava_source(source: str) -> bool:
    """Whether ``backbone.model`` names a LLaVA model: a preset, a local folder whose
    config.json says ``model_type = "llava"``, or a hub id containing "llava"."""
    if source in PRESETS:
        return True
    local = Path(source).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            return False
        try:
            return json.loads(config.read_text()).get("model_type") == "llava"
        except json.JSONDecodeError as exc:
            raise BackboneError(f"{config} is not valid JSON: {exc}") from exc
    return bool(_HUB_ID.match(source)) and "llava" in source.lower()


class LlavaBackbone(nn.Module):
    """A frozen LLaVA model seen through what soft-prompt learning needs.

    Attributes used by prompt learners (the same as a dual encoder's): ``ctx_dim`` (width
    of the language model's input embeddings), ``device``, :meth:`embed_text`.
    """

    kind = "llava"

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: Any,
                 image_processor: Any, source: str, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise BackboneError(f"unknown precision {precision!r}: use one of {list(PRECISIONS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        self.precision = precision
        config = model.config
        self.ctx_dim = int(config.text_config.hidden_size)
        self.vocab_size = int(config.text_config.vocab_size)
        self.image_token_id = int(config.image_token_id)
        self.bos_token_id = _special_id(tokenizer, "bos", config.text_config.bos_token_id)
        self.eos_token_id = _special_id(tokenizer, "eos", config.text_config.eos_token_id)
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        strategy = config.vision_feature_select_strategy
        self.num_image_tokens = patches if strategy == "default" else patches + 1
        self.max_length = int(getattr(config.text_config, "max_position_embeddings", 4096))
        self._identity: dict[str, Any] | None = None
        self.freeze()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_preset(cls, name: str, weights_seed: int = 0, device: torch.device | str = "cpu",
                    precision: str = "fp32") -> LlavaBackbone:
        """Build ``llava-tiny`` or ``llava-small`` with seeded random weights."""
        config = preset_config(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights_seed)
            model = LlavaForConditionalGeneration(config)
        size = config.vision_config.image_size
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        tokenizer = offline_clip_tokenizer(model_max_length=512)
        backbone = cls(model, tokenizer, processor, source=f"{name}@seed{weights_seed}",
                       precision=precision)
        return backbone.to(device)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: torch.device | str = "cpu",
                        precision: str = "fp32", device_map: str | dict | None = None
                        ) -> LlavaBackbone:
        """Load a LLaVA checkpoint (``LlavaForConditionalGeneration`` + ``AutoProcessor``)
        from a local folder or a hub id. ``device_map`` (e.g. ``"auto"``) spreads the model
        over the available GPUs with accelerate; the weights are then loaded in the
        precision's dtype (bf16 halves GPU memory)."""
        from transformers import AutoProcessor

        local = Path(path_or_id).expanduser()
        if local.exists() or not _HUB_ID.match(path_or_id):
            if not (local / "config.json").is_file():
                raise BackboneError(
                    f"{local} is not a LLaVA checkpoint folder (no config.json): give a folder "
                    "saved with LlavaForConditionalGeneration/AutoProcessor.save_pretrained, a "
                    "hub id such as llava-hf/llava-1.5-7b-hf, or an offline preset "
                    f"({', '.join(sorted(PRESETS))})"
                )
            source = str(local.resolve())
        else:
            source = path_or_id
        kwargs: dict[str, Any] = {}
        if device_map:
            kwargs["device_map"] = device_map
            kwargs["dtype"] = PRECISIONS[precision]
        try:
            model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
            processor = AutoProcessor.from_pretrained(source)
        except OSError as exc:
            raise BackboneError(
                f"could not load LLaVA from {path_or_id!r}: {exc}. Without network access (or "
                "with HF_HUB_OFFLINE=1) download the checkpoint elsewhere and give its local "
                "folder as backbone.model"
            ) from exc
        backbone = cls(model, processor.tokenizer, processor.image_processor, source,
                       precision=precision)
        return backbone if device_map else backbone.to(device)

    # --------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (with ``device_map`` the
        model may span several devices)."""
        return self.model.get_input_embeddings().weight.device

    def freeze(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad_(False)

    def train(self, mode: bool = True) -> LlavaBackbone:
        return super().train(False)  # frozen: always eval (no dropout)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16/fp16 autocast of the frozen model when configured."""
        return precision_autocast(self.device, self.precision)

    def identity(self) -> dict[str, Any]:
        """What identifies this model (exported prompts record it and check it on load)."""
        if self._identity is None:
            config = architecture_config(self.model.config)
            config_json = json.dumps(config, sort_keys=True, default=str)
            self._identity = {
                "kind": self.kind,
                "source": self.source,
                "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
                "weights_fingerprint": weights_fingerprint(self.model),
                "tokenizer": f"{type(self.tokenizer).__name__}:{len(self.tokenizer)}",
                "ctx_dim": self.ctx_dim,
                "transformers": transformers.__version__,
            }
        return dict(self._identity)

    # --------------------------------------------------------------- images
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Projected image features ``[B, num_image_tokens, ctx_dim]`` (float32): what
        LLaVA places in the image-token positions. Frozen, so they can be cached."""
        config = self.model.config
        vision = self.model.model.vision_tower
        pixel_values = pixel_values.to(next(vision.parameters()).device,
                                       next(vision.parameters()).dtype)
        with self.autocast():
            out = self.model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        if features.shape[1] != self.num_image_tokens:
            raise BackboneError(
                f"the vision tower gave {features.shape[1]} image tokens, expected "
                f"{self.num_image_tokens}: this LLaVA variant (e.g. LLaVA-NeXT tiling) is "
                "not supported"
            )
        return features.float()

    # ----------------------------------------------------------------- text
    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def token_embedding(self, input_ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    def embed_text(self, text: str) -> Tensor:
        """Token embeddings ``[T, ctx_dim]`` of ``text`` (context initialisation)."""
        ids = self.encode_text(text)
        if not ids:
            raise PromptError(f"context init text {text!r} has no tokens")
        with torch.no_grad():
            return self.token_embedding(torch.tensor(ids)).detach().float().clone()

    # ------------------------------------------------------- language model
    def hidden_states(self, inputs_embeds: Tensor, position_ids: Tensor | None = None,
                      past_key_values: Any = None, use_cache: bool = False,
                      attention_mask: Tensor | None = None) -> tuple[Tensor, Any]:
        """The language model's last hidden states ``[B, L, ctx_dim]`` (and its cache)."""
        language_model = self.model.model.language_model
        with self.autocast():
            out = language_model(inputs_embeds=inputs_embeds, position_ids=position_ids,
                                 past_key_values=past_key_values, use_cache=use_cache,
                                 attention_mask=attention_mask)
        return out.last_hidden_state, out.past_key_values

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (float32) of hidden states (only where they are needed)."""
        with self.autocast():
            logits = self.model.lm_head(hidden.to(self.model.lm_head.weight.device))
        return logits.float()


def _special_id(tokenizer: Any, name: str, fallback: int | None) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        value = fallback
    if value is None:
        raise BackboneError(f"the tokenizer has no {name} token and the model config names none")
    return int(value)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape and dtype, and its values: all of them for
    models up to 50M parameters, else the first and last 4,096 values of each tensor (a
    fingerprint, cheap for 7B models, that still tells seeds and fine-tunes apart)."""
    state = model.state_dict()
    full = sum(t.numel() for t in state.values()) <= _FULL_HASH_LIMIT
    digest = hashlib.sha256(b"full" if full else b"sampled")
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        part = flat if full or flat.numel() <= 8192 else torch.cat([flat[:4096], flat[-4096:]])
        digest.update(part.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return ("" if full else "sampled:") + digest.hexdigest()
