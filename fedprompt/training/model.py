"""A frozen backbone + a prompt learner + class names = a classifier over image features."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.prompts.base import PromptLearner


class PromptedClassifier:
    """Cosine-similarity classifier whose class weights are prompted text features.

    The class prompts are tokenized once; every call encodes them with the learner's
    current context (once per step, whatever the batch size) and scores image features
    against them: ``logits = scale * normalize(image) @ normalize(text)^T``.
    """

    def __init__(self, backbone: VisionLanguageBackbone, learner: PromptLearner,
                 classnames: Sequence[str]) -> None:
        if learner.num_classes != len(classnames):
            raise ValueError(f"learner built for {learner.num_classes} classes, "
                             f"{len(classnames)} class names given")
        self.backbone = backbone
        self.learner = learner
        self.classnames = list(classnames)
        self.tokens = backbone.tokenize_class_prompts(self.classnames, learner.n_ctx)
        self.logit_scale = backbone.logit_scale

    def text_features(self) -> Tensor:
        """Normalised class text features ``[C, embed_dim]`` for the current context."""
        features = self.backbone.encode_class_prompts(self.learner(), self.tokens)
        return F.normalize(features, dim=-1)

    def logits(self, image_features: Tensor, text_features: Tensor | None = None) -> Tensor:
        text = self.text_features() if text_features is None else text_features
        image = F.normalize(image_features.to(text.device, text.dtype), dim=-1)
        return self.logit_scale * image @ text.T

    __call__ = logits
