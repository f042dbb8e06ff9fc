"""A prompted classifier as the ``nn.Module`` Opacus' functorch mode expects.

Opacus computes per-sample gradients for the parameters a module owns directly. This
head registers the learner's privatized tensors as its own parameters (the same tensor
objects), keeps the frozen backbone outside (Opacus refuses trainable layers with
buffers), and reads the parameters it is handed inside ``forward`` (through
``torch.func.functional_call`` on the learner): an embedding hook that closed over the
original parameters would get all-zero per-sample gradients under functorch, silently.

It is the baseline our per-sample path is tested and benchmarked against: with
``GradSampleModule(head, force_functorch=True)`` Opacus re-runs the whole text encoder
for every sample.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call

from fedprompt.training.model import PromptedClassifier


class PromptLogitsHead(nn.Module):
    def __init__(self, classifier: PromptedClassifier, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        for name in self.names:
            self.register_parameter(name, getattr(classifier.learner, name))
        object.__setattr__(self, "_classifier", classifier)

    def forward(self, features: Tensor) -> Tensor:
        classifier: PromptedClassifier = self._classifier  # type: ignore[attr-defined]
        params = {name: getattr(self, name) for name in self.names}
        ctx = functional_call(classifier.learner, params, ())
        text = classifier.backbone.encode_class_prompts(ctx, classifier.tokens)
        return classifier.logits(features, nn.functional.normalize(text, dim=-1))
