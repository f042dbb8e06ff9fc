"""Exact per-sample gradients of prompt tensors, with the class prompts encoded once.

A prompted classifier scores image ``i`` against the normalised class text features
``T(theta)`` (``C x D``, one text-encoder pass for all classes, shared by the batch):
``logits_i = s * f_i @ T^T`` with ``f_i`` the normalised image feature. The gradient of
sample ``i``'s cross-entropy with respect to ``T`` is the rank-one matrix

    dL_i/dT = s * (softmax(logits_i) - onehot(y_i)) f_i^T

so sample ``i``'s gradient with respect to the prompt tensors is one vector-Jacobian
product of the text side with that cotangent. We run the text encoder once, keep its graph,
and take the ``B`` VJPs in chunks (``torch.autograd.grad(..., is_grads_batched=True)``:
vmap over the cotangents). Opacus' functorch mode instead re-runs the text encoder for
every sample (its forward is vmapped over the batch), so it pays ``B`` forward passes for
all classes on top of the ``B`` backward passes.

Exact per-sample gradients need one VJP per sample (each sample's cotangent is a
different direction), so a DP step still costs about ``B`` backward passes of the text
side, whichever prompt tensors they end in: privatizing every trained tensor (the global
prompt too) costs no more encoder passes than privatizing a subset. Tensors outside the
privatized set (``public``: only in DP-FPL's nominal layout) get the ordinary batch-mean
gradient from one more VJP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedprompt.training.model import PromptedClassifier


@dataclass
class PerSampleResult:
    per_sample: list[Tensor]  # one [B, *p.shape] tensor per private parameter
    public: list[Tensor]  # batch-mean gradients of the public parameters
    loss: float  # mean cross-entropy of the batch
    correct: int


def logit_cotangents(image_features: Tensor, text_features: Tensor, labels: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """Logits ``[B, C]`` and the gradients of the per-sample cross-entropies with respect
    to the normalised text features ``[B, C, D]``."""
    image = F.normalize(image_features, dim=-1)
    logits = scale * image @ text_features.T
    residual = logits.softmax(dim=-1) - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return logits, scale * residual.unsqueeze(-1) * image.unsqueeze(1)


def per_sample_gradients(classifier: PromptedClassifier, features: Tensor, labels: Tensor,
                         private: list[nn.Parameter], public: list[nn.Parameter],
                         chunk: int = 8) -> PerSampleResult:
    """Per-sample gradients of ``private`` and batch-mean gradients of ``public``.

    The learner's context must already be prepared for this step (``prepare_step``).
    """
    batch = len(labels)
    if batch == 0:  # Poisson sampling can draw an empty batch
        return PerSampleResult([torch.zeros(0, *p.shape, device=p.device) for p in private],
                               [torch.zeros_like(p) for p in public], float("nan"), 0)
    text = classifier.text_features()  # one pass of the text encoder, graph kept
    labels = labels.to(text.device)
    with torch.no_grad():
        logits, cotangents = logit_cotangents(features.to(text.device), text.detach(), labels,
                                              classifier.logit_scale)
        loss = float(F.cross_entropy(logits, labels))
        correct = int((logits.argmax(dim=-1) == labels).sum())
    per_sample: list[list[Tensor]] = [[] for _ in private]
    retain = bool(public)
    for start in range(0, batch, chunk):
        part = cotangents[start : start + chunk]
        last = start + chunk >= batch
        grads = torch.autograd.grad(
            text, private, grad_outputs=part, is_grads_batched=True,
            retain_graph=retain or not last, allow_unused=True,
        )
        for store, grad, param in zip(per_sample, grads, private, strict=True):
            store.append(grad if grad is not None else
                         torch.zeros(len(part), *param.shape, device=param.device))
    public_grads: list[Tensor] = []
    if public:
        grads = torch.autograd.grad(text, public, grad_outputs=cotangents.mean(dim=0),
                                    allow_unused=True)
        public_grads = [g if g is not None else torch.zeros_like(p)
                        for g, p in zip(grads, public, strict=True)]
    return PerSampleResult([torch.cat(s) for s in per_sample], public_grads, loss, correct)
