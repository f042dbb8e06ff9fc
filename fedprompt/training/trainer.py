"""The local step: train and evaluate a prompt learner on image features.

This is the one-site trainer, and also the local step every federated method reuses
(a client builds a :class:`LocalTrainer` around its learner, loads its persistent
optimizer state, trains, and saves the state back).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedprompt.config import TrainConfig
from fedprompt.training.model import PromptedClassifier


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    steps: int


@dataclass
class EvalStats:
    loss: float
    accuracy: float
    samples: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy,
                f"{prefix}samples": self.samples}


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """LR multiplier: linear warm-up, then cosine decay to zero at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class LocalTrainer:
    """Optimizer, schedule and the train/evaluate loops for one prompted classifier.

    Args:
        classifier: backbone + learner + class names.
        config: the ``[train]`` section.
        total_steps: length of the LR schedule (epochs x batches per epoch).
    """

    def __init__(self, classifier: PromptedClassifier, config: TrainConfig,
                 total_steps: int) -> None:
        self.classifier = classifier
        self.learner = classifier.learner
        self.config = config
        self.optimizer = build_optimizer(self.learner.trainable_parameters(), config)
        warmup = config.warmup_steps

        def schedule(step: int) -> float:
            if config.scheduler == "cosine":
                return warmup_cosine(step, total_steps, warmup)
            return min(1.0, (step + 1) / warmup) if warmup else 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.steps_taken = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        """One optimizer step; returns (summed loss, correct predictions)."""
        self.learner.train()
        self.learner.prepare_step()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, labels.to(logits.device))
        loss.backward()
        self.learner.finalize_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.steps_taken += 1
        correct = int((logits.argmax(dim=-1) == labels.to(logits.device)).sum())
        return float(loss.detach()) * len(labels), correct

    def train_epoch(self, batches: Iterable[tuple[Tensor, Tensor]],
                    on_step: Callable[[float, float], None] | None = None) -> EpochStats:
        """One pass over ``batches``; ``on_step(running_loss, running_accuracy)`` after
        every step (progress display)."""
        total_loss, correct, samples, steps = 0.0, 0, 0, 0
        for features, labels in batches:
            loss, right = self.train_step(features, labels)
            total_loss += loss
            correct += right
            samples += len(labels)
            steps += 1
            if on_step is not None:
                on_step(total_loss / samples, correct / samples)
        if samples == 0:
            return EpochStats(float("nan"), float("nan"), 0, 0)
        return EpochStats(total_loss / samples, correct / samples, samples, steps)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[tuple[Tensor, Tensor]]) -> EvalStats:
        """Loss and accuracy; class text features are encoded once for all batches."""
        self.learner.eval()
        text = self.classifier.text_features()
        total_loss, correct, samples = 0.0, 0, 0
        for features, labels in batches:
            logits = self.classifier.logits(features, text)
            labels = labels.to(logits.device)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            samples += len(labels)
        if samples == 0:
            return EvalStats(float("nan"), float("nan"), 0)
        return EvalStats(total_loss / samples, correct / samples, samples)

    # Optimizer and schedule state persist per client across federated rounds.
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps_taken = int(state["steps_taken"])
