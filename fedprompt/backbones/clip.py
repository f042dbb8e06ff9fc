"""CLIP through Hugging Face ``transformers``: real checkpoints and offline presets.

* :meth:`CLIPBackbone.from_pretrained` loads ``CLIPModel`` + its processor from a local
  folder (offline) or a hub id (when the machine has network access).
* :meth:`CLIPBackbone.from_preset` builds a small CLIP from config with seeded random
  weights and the offline CLIP tokenizer: no file and no network needed.

The text path is CLIP's own (token + position embeddings, causal transformer, final layer
norm, pooling at the end-of-text token, text projection), run on embeddings so that
learned context vectors take the place of the ``X`` placeholder tokens. Prompts are padded
only to the longest class prompt, not to 77 tokens: with a causal mask and end-of-text
pooling, later padding never influences the pooled feature, so this is exact and cheaper.
"""

from __future__ import annotations

import hashlib
import inspect
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
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
)
from transformers.masking_utils import create_causal_mask

from fedprompt.backbones.base import (
    ClassPromptTokens,
    VisionLanguageBackbone,
    architecture_config,
)
from fedprompt.backbones.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    offline_clip_tokenizer,
)
from fedprompt.errors import BackboneError

#: transformers 5.24 renamed create_causal_mask's ``past_key_values`` to ``cache`` (the old
#: name warns and goes in 5.40); our pin allows both sides of the rename
_MASK_CACHE_ARGUMENT = ("cache" if "cache" in inspect.signature(create_causal_mask).parameters
                        else "past_key_values")

#: Offline presets: (text hidden, text layers, vision hidden, vision layers, image size,
#: patch size, projection dim, attention heads). Random weights, real CLIP tokenizer.
PRESETS: dict[str, dict[str, int]] = {
    "clip-tiny": dict(width=64, layers=2, vision_width=64, vision_layers=2, image_size=32,
                      patch_size=8, projection_dim=64, heads=4),
    "clip-small": dict(width=128, layers=4, vision_width=128, vision_layers=4, image_size=64,
                       patch_size=8, projection_dim=128, heads=4),
    "clip-small224": dict(width=192, layers=6, vision_width=192, vision_layers=6,
                          image_size=224, patch_size=16, projection_dim=256, heads=6),
}


def preset_config(name: str) -> CLIPConfig:
    """The ``CLIPConfig`` of an offline preset."""
    if name not in PRESETS:
        raise BackboneError(f"unknown CLIP preset {name!r}: choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    text = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=p["width"], intermediate_size=4 * p["width"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        max_position_embeddings=77, projection_dim=p["projection_dim"],
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID,
    )
    vision = CLIPVisionConfig(
        hidden_size=p["vision_width"], intermediate_size=4 * p["vision_width"],
        num_hidden_layers=p["vision_layers"], num_attention_heads=p["heads"],
        image_size=p["image_size"], patch_size=p["patch_size"],
        projection_dim=p["projection_dim"],
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        projection_dim=p["projection_dim"],
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_local(source: str) -> bool:
    """A hub id looks like ``owner/name``; anything else, or an existing path, is local."""
    return Path(source).expanduser().exists() or not _HUB_ID.match(source)


class CLIPBackbone(VisionLanguageBackbone):
    """A frozen ``transformers`` CLIP model."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer,
                 image_processor: CLIPImageProcessorPil, source: str,
                 precision: str = "fp32", text_chunk_size: int = 128,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(precision, text_chunk_size, gradient_checkpointing)
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.source = source
        text_config = model.config.text_config
        self.ctx_dim = text_config.hidden_size
        self.embed_dim = model.config.projection_dim
        self.max_text_length = text_config.max_position_embeddings
        self.eos_token_id = tokenizer.eos_token_id
        self._identity: dict[str, Any] | None = None
        #: encode a context shared by all classes once (exact; see encode_class_prompts)
        self.prefix_sharing = True
        self.freeze()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_preset(cls, name: str, weights_seed: int = 0, device: torch.device | str = "cpu",
                    **kwargs: Any) -> CLIPBackbone:
        """Build an offline preset (``clip-tiny``, ``clip-small``, ``clip-small224``)."""
        config = preset_config(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(weights_seed)
            model = CLIPModel(config)
        size = config.vision_config.image_size
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
        backbone = cls(model, offline_clip_tokenizer(), processor,
                       source=f"{name}@seed{weights_seed}", **kwargs)
        return backbone.to(device)

    @classmethod
    def from_pretrained(cls, path_or_id: str, device: torch.device | str = "cpu",
                        **kwargs: Any) -> CLIPBackbone:
        """Load a CLIP checkpoint from a local folder or a hub id.

        The folder needs what ``CLIPModel.save_pretrained`` and ``CLIPProcessor`` write
        (config.json, model.safetensors, tokenizer and preprocessor files).
        """
        local = Path(path_or_id).expanduser()
        if _is_local(path_or_id):
            if not local.is_dir():
                raise BackboneError(
                    f"CLIP checkpoint folder {local} does not exist: give a folder holding "
                    "config.json, model.safetensors, the tokenizer and preprocessor_config.json "
                    "(e.g. saved with CLIPModel/CLIPProcessor.save_pretrained), or an offline "
                    "preset such as backbone.model='clip-tiny'"
                )
            if not (local / "config.json").is_file():
                raise BackboneError(
                    f"{local} is not a CLIP checkpoint folder: it has no config.json. Point "
                    "backbone.model at the folder that holds config.json and the weights"
                )
            source = str(local.resolve())
        else:
            source = path_or_id
        try:
            model = CLIPModel.from_pretrained(source)
            tokenizer = CLIPTokenizer.from_pretrained(source)
            processor = CLIPImageProcessorPil.from_pretrained(source)
        except OSError as exc:
            raise BackboneError(
                f"could not load CLIP from {path_or_id!r}: {exc}. If this is a hub id and the "
                "machine has no network access (or HF_HUB_OFFLINE=1), download the checkpoint "
                "elsewhere and give its local folder as backbone.model; if you meant a local "
                f"folder, none exists at {local.resolve()}"
            ) from exc
        if not isinstance(model, CLIPModel):
            raise BackboneError(f"{path_or_id!r} is not a CLIP checkpoint")
        return cls(model, tokenizer, processor, source=source, **kwargs).to(device)

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            config = architecture_config(self.model.config)
            config_json = json.dumps(config, sort_keys=True, default=str)
            weights = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                weights.update(name.encode())
                weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            processor_json = json.dumps(self.image_processor.to_dict(), sort_keys=True,
                                        default=str)
            self._identity = {
                "kind": "clip",
                "source": self.source,
                "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
                "weights_sha256": weights.hexdigest(),
                "preprocess_sha256": hashlib.sha256(processor_json.encode()).hexdigest(),
                "transformers": transformers.__version__,
            }
        return dict(self._identity)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    # -------------------------------------------------------------------- images
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        with self.autocast():
            out = self.model.get_image_features(pixel_values=pixel_values.to(self.device))
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        return features.float()

    # ---------------------------------------------------------------------- text
    def token_embedding(self, input_ids: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(input_ids)

    # ------------------------------------------------------- shared-prefix text path
    def encode_class_prompts(self, ctx: Tensor, tokens: ClassPromptTokens,
                             chunk_size: int | None = None,
                             checkpoint: bool | None = None) -> Tensor:
        """As the base class, but when one context serves every class, the start token and
        the context (positions ``0..n_ctx``) are encoded once instead of once per class.

        CLIP's text encoder is causal: hidden states at a position depend only on earlier
        tokens, so the shared prefix ``[SOS] ctx`` has the same hidden states, keys and
        values for every class. We run it once per layer and let each class's suffix
        (class name, ".", end token) attend to the shared keys/values, like a KV cache.
        This is exact (tested against the full per-class pass) and makes both the forward
        and the backward pass several times cheaper when n_ctx is large relative to class
        names (the CoOp / DP-FPL setting).
        """
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)
        if ctx.shape[0] != 1 or not self.prefix_sharing or tokens.num_classes == 1:
            return super().encode_class_prompts(ctx, tokens, chunk_size, checkpoint)
        self._check_context(ctx, tokens)
        chunk = chunk_size or self.text_chunk_size
        use_checkpoint = self.gradient_checkpointing if checkpoint is None else checkpoint
        use_checkpoint = use_checkpoint and ctx.requires_grad and torch.is_grad_enabled()
        n_ctx = tokens.n_ctx
        frozen = tokens.embeddings
        prefix = torch.cat([frozen[:1, :1], ctx.to(frozen.dtype)], dim=1)  # [1, P, W]
        with self.autocast():
            prefix_kv = self._encode_prefix(prefix)
            features = []
            for start in range(0, tokens.num_classes, chunk):
                stop = min(start + chunk, tokens.num_classes)
                suffix = frozen[start:stop, 1 + n_ctx :]
                eos = tokens.eos_positions[start:stop] - (1 + n_ctx)
                if use_checkpoint:
                    out = torch.utils.checkpoint.checkpoint(
                        self._encode_suffix, suffix, eos, prefix_kv, use_reentrant=False
                    )
                else:
                    out = self._encode_suffix(suffix, eos, prefix_kv)
                features.append(out)
        return torch.cat(features).float()

    def _heads(self, x: Tensor, attn: nn.Module) -> Tensor:
        return x.view(*x.shape[:-1], attn.num_heads, attn.head_dim).transpose(1, 2)

    def _encode_prefix(self, prefix: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Run the shared prefix through every layer; keep each layer's keys/values."""
        text_model = self.model.text_model
        length = prefix.shape[1]
        hidden = prefix + text_model.embeddings.position_embedding.weight[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=prefix.device).tril()
        cache = []
        for layer in text_model.encoder.layers:
            attn = layer.self_attn
            normed = layer.layer_norm1(hidden)
            q = self._heads(attn.q_proj(normed), attn)
            k = self._heads(attn.k_proj(normed), attn)
            v = self._heads(attn.v_proj(normed), attn)
            cache.append((k, v))
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            out = (probs @ v).transpose(1, 2).reshape(hidden.shape)
            hidden = hidden + attn.out_proj(out)
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return cache

    def _encode_suffix(self, suffix: Tensor, eos: Tensor,
                       prefix_kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Per-class suffixes attending to the shared prefix keys/values (causally)."""
        text_model = self.model.text_model
        offset = prefix_kv[0][0].shape[2]
        length = suffix.shape[1]
        positions = text_model.embeddings.position_embedding.weight[offset : offset + length]
        hidden = suffix + positions
        causal = torch.ones(length, length, dtype=torch.bool, device=suffix.device).tril()
        for layer, (k_prefix, v_prefix) in zip(text_model.encoder.layers, prefix_kv,
                                               strict=True):
            attn = layer.self_attn
            normed = layer.layer_norm1(hidden)
            q = self._heads(attn.q_proj(normed), attn)
            k = self._heads(attn.k_proj(normed), attn)
            v = self._heads(attn.v_proj(normed), attn)
            to_prefix = (q @ k_prefix.transpose(-1, -2)) * attn.scale  # [c, h, S, P]
            to_self = ((q @ k.transpose(-1, -2)) * attn.scale).masked_fill(
                ~causal, float("-inf"))
            probs = torch.cat([to_prefix, to_self], dim=-1).softmax(dim=-1)
            out = probs[..., :offset] @ v_prefix + probs[..., offset:] @ v
            hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(hidden.shape))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        hidden = text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]
        return self.model.text_projection(pooled)

    def encode_prompt_embeddings(self, embeddings: Tensor, eos_positions: Tensor) -> Tensor:
        text_model = self.model.text_model
        with self.autocast():
            hidden = text_model.embeddings(inputs_embeds=embeddings)
            mask = create_causal_mask(
                config=text_model.config, inputs_embeds=hidden, attention_mask=None,
                **{_MASK_CACHE_ARGUMENT: None},
            )
            hidden = text_model.encoder(
                inputs_embeds=hidden, attention_mask=mask, is_causal=True
            ).last_hidden_state
            hidden = text_model.final_layer_norm(hidden)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_positions]
            features = self.model.text_projection(pooled)
        return features.float()
