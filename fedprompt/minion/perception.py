"""A CLIP backbone with its trained prompt as the local worker's perception tool.

:class:`ClipPerception` scores each local image against the prompt's class names (the
prompted cosine classifier the prompt was trained as) and returns short text facts, e.g.
``"image 1: red (p=0.71), then green (p=0.20)"``. Pass it as
``PromptedLocalClient(..., perception=ClipPerception.from_folder(folder, clip))``: the facts
join the worker's conversation as text; the images never leave the machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.errors import FedPromptError
from fedprompt.prompts.portable import PortablePrompt, load_prompt
from fedprompt.training.model import PromptedClassifier


class PerceptionError(FedPromptError):
    """The perception tool cannot be built or run."""


class ClipPerception:
    """Images -> ``["image i: label (p=..), then label (p=..)", ...]``.

    Args:
        backbone: the CLIP-style backbone the prompt was trained in (checked).
        prompt: a portable prompt whose metadata lists its ``classnames``.
        top_k: labels per image (at most the number of classes).
        min_probability: labels below it are left out (the best one is always kept).
    """

    def __init__(self, backbone: VisionLanguageBackbone, prompt: PortablePrompt, *,
                 top_k: int = 2, min_probability: float = 0.05,
                 check_weights: bool = True) -> None:
        classnames = list(prompt.metadata.get("classnames") or [])
        if not classnames:
            raise PerceptionError("the prompt lists no class names: export it with "
                                  "classnames=[...] to use it for perception")
        if top_k < 1:
            raise PerceptionError("top_k must be at least 1")
        learner = prompt.build_learner(backbone, check_weights=check_weights)
        learner.eval()
        self.backbone = backbone
        self.classifier = PromptedClassifier(backbone, learner, classnames)
        self.classnames = classnames
        self.top_k = min(top_k, len(classnames))
        self.min_probability = min_probability
        with torch.no_grad():
            self._text = self.classifier.text_features()

    @classmethod
    def from_folder(cls, folder: str | Path, backbone: VisionLanguageBackbone,
                    **kwargs: Any) -> ClipPerception:
        check = kwargs.get("check_weights", True)
        return cls(backbone, load_prompt(folder, backbone, check_weights=check), **kwargs)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[n_images, n_classes]`` class probabilities."""
        if not images:
            return torch.zeros(0, len(self.classnames))
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        features = self.backbone.encode_images(self.backbone.preprocess(rgb))
        return self.classifier.logits(features, self._text).float().softmax(dim=-1).cpu()

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        facts = []
        for i, row in enumerate(self.probabilities(images), start=1):
            values, indices = row.topk(self.top_k)
            labels = [f"{self.classnames[int(j)]} (p={float(v):.2f})"
                      for rank, (v, j) in enumerate(zip(values, indices, strict=True))
                      if rank == 0 or float(v) >= self.min_probability]
            facts.append(f"image {i}: " + ", then ".join(labels))
        return facts
