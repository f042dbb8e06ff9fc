"""Frozen vision-language backbones behind one small interface."""

from __future__ import annotations

from fedprompt.backbones.base import ClassPromptTokens, VisionLanguageBackbone, resolve_device
from fedprompt.backbones.clip import PRESETS, CLIPBackbone
from fedprompt.config import BackboneConfig
from fedprompt.errors import BackboneError

__all__ = [
    "PRESETS",
    "CLIPBackbone",
    "ClassPromptTokens",
    "DualEncoderBackbone",
    "VisionLanguageBackbone",
    "build_backbone",
    "resolve_device",
]


def build_backbone(config: BackboneConfig) -> VisionLanguageBackbone:
    """The backbone a run's ``[backbone]`` section asks for."""
    device = resolve_device(config.device)
    options = dict(precision=config.precision, text_chunk_size=config.text_chunk_size,
                   gradient_checkpointing=config.gradient_checkpointing)
    if config.model == "effnet-minilm":
        from fedprompt.backbones.dual_encoder import DualEncoderBackbone

        return DualEncoderBackbone(image_size=config.image_size or 224, **options).to(device)
    if config.image_size:
        raise BackboneError(
            f"backbone.image_size applies to effnet-minilm only; {config.model!r} has a fixed "
            "input size: remove backbone.image_size"
        )
    if config.model in PRESETS:
        return CLIPBackbone.from_preset(config.model, config.weights_seed, device, **options)
    return CLIPBackbone.from_pretrained(config.model, device, **options)


def __getattr__(name: str) -> object:
    if name == "DualEncoderBackbone":  # imported lazily: it loads two pretrained models
        from fedprompt.backbones.dual_encoder import DualEncoderBackbone

        return DualEncoderBackbone
    raise AttributeError(name)
