"""Frozen vision-language backbones behind one small interface."""

from __future__ import annotations

from fedprompt.backbones.base import ClassPromptTokens, VisionLanguageBackbone, resolve_device
from fedprompt.backbones.clip import PRESETS, CLIPBackbone
from fedprompt.config import BackboneConfig

__all__ = [
    "PRESETS",
    "CLIPBackbone",
    "ClassPromptTokens",
    "VisionLanguageBackbone",
    "build_backbone",
    "resolve_device",
]


def build_backbone(config: BackboneConfig) -> VisionLanguageBackbone:
    """The backbone a run's ``[backbone]`` section asks for."""
    device = resolve_device(config.device)
    options = dict(precision=config.precision, text_chunk_size=config.text_chunk_size,
                   gradient_checkpointing=config.gradient_checkpointing)
    if config.model in PRESETS:
        return CLIPBackbone.from_preset(config.model, config.weights_seed, device, **options)
    return CLIPBackbone.from_pretrained(config.model, device, **options)
