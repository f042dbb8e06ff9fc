"""What an attacker computes from a released prompt: per-example outputs of the prompted
classifier, and a score from the prompt vector alone.

The threat is DP-FPL's "prompt as a service": the attacker holds the public backbone and
a client's released prompt (its context ``[K, n_ctx, width]``, what an export carries) and
queries candidate records. Everything here is a function of (backbone, context, record),
so it works for every learner.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedprompt.training.model import PromptedClassifier

#: softmax entries kept (sorted, largest first) in the shadow-model attack's features
TOP_K = 10


@torch.no_grad()
def class_embeddings(classifier: PromptedClassifier, context: Tensor) -> Tensor:
    """Normalised class text features ``[C, embed_dim]`` the backbone gives ``context``."""
    backbone = classifier.backbone
    features = backbone.encode_class_prompts(context.to(backbone.device), classifier.tokens)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def logits_under(classifier: PromptedClassifier, context: Tensor, features: Tensor,
                 batch: int = 1024) -> Tensor:
    """Logits ``[N, C]`` (float64, CPU) of ``features`` under ``context``."""
    text = class_embeddings(classifier, context)
    out = [classifier.logits(features[i:i + batch], text).double().cpu()
           for i in range(0, len(features), batch)]
    return torch.cat(out) if out else torch.zeros(0, text.shape[0], dtype=torch.float64)


def losses(logits: Tensor, labels: np.ndarray | Tensor) -> np.ndarray:
    """Per-example cross-entropy."""
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.cross_entropy(logits, target, reduction="none").numpy()


def confidence(logits: Tensor, labels: np.ndarray | Tensor) -> np.ndarray:
    """LiRA's statistic: ``log p_y - log(1 - p_y)``, computed stably from the logits."""
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    correct = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf"))
    return (correct - torch.logsumexp(others, dim=1)).numpy()


def attack_features(logits: Tensor, labels: np.ndarray | Tensor) -> np.ndarray:
    """The shadow-model attack's input per example: the softmax vector sorted (top
    :data:`TOP_K`, zero-padded), the probability of the true class and the loss."""
    probs = torch.softmax(logits, dim=1)
    top = probs.sort(dim=1, descending=True).values[:, :TOP_K]
    if top.shape[1] < TOP_K:
        top = F.pad(top, (0, TOP_K - top.shape[1]))
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    p_true = probs.gather(1, target[:, None])
    loss = torch.as_tensor(losses(logits, labels))[:, None]
    return torch.cat([top, p_true, loss], dim=1).numpy()


@torch.no_grad()
def embedding_shift(classifier: PromptedClassifier, released: Tensor, initial: Tensor,
                    features: Tensor, labels: np.ndarray | Tensor) -> np.ndarray:
    """The prompt-vector score, which never queries the classifier's outputs: decode the
    released and the initial (public, seeded) prompt into class embeddings with the
    public text encoder and measure how far the record's class embedding moved toward the
    record's own image feature, ``<normalize(f_x), t_y(released) - t_y(initial)>``.
    Training on ``(x, y)`` pulls ``t_y`` toward ``f_x``; a record not trained on moves it
    only as much as similar records do."""
    shift = class_embeddings(classifier, released) - class_embeddings(classifier, initial)
    target = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=shift.device)
    image = F.normalize(features.to(shift.device).float(), dim=-1)
    return (image * shift[target]).sum(dim=1).double().cpu().numpy()
