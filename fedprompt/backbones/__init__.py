"""Frozen vision-language backbones behind one small interface."""

from __future__ import annotations

from fedprompt.backbones.base import ClassPromptTokens, VisionLanguageBackbone, resolve_device
from fedprompt.backbones.clip import PRESETS, CLIPBackbone
from fedprompt.backbones.llava import PRESETS as LLAVA_PRESETS
from fedprompt.config import BackboneConfig
from fedprompt.errors import BackboneError

__all__ = [
    "LLAVA_PRESETS",
    "PRESETS",
    "CLIPBackbone",
    "ClassPromptTokens",
    "DualEncoderBackbone",
    "VisionLanguageBackbone",
    "build_backbone",
    "resolve_device",
]


def build_backbone(config: BackboneConfig) -> VisionLanguageBackbone:
    """The backbone a run's ``[backbone]`` section asks for: a dual encoder, or LLaVA
    (``llava-tiny``, ``llava-small``, or a LLaVA checkpoint) for generative tasks."""
    device = resolve_device(config.device)
    options = dict(precision=config.precision, text_chunk_size=config.text_chunk_size,
                   gradient_checkpointing=config.gradient_checkpointing)
    if config.model == "effnet-minilm":
        from fedprompt.backbones.dual_encoder import DualEncoderBackbone

        return DualEncoderBackbone(image_size=config.image_size or 224, **options).to(device)
    from fedprompt.backbones.llava import LlavaBackbone, is_llava_source

    if is_llava_source(config.model):
        if config.image_size:
            raise BackboneError("backbone.image_size applies to effnet-minilm only; LLaVA uses "
                                "its vision tower's input size: remove backbone.image_size")
        if config.model in LLAVA_PRESETS:
            return LlavaBackbone.from_preset(config.model, config.weights_seed, device,
                                             precision=config.precision)  # type: ignore[return-value]
        device_map = getattr(config, "device_map", "") or None
        return LlavaBackbone.from_pretrained(  # type: ignore[return-value]
            config.model, device, precision=config.precision, device_map=device_map)
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
