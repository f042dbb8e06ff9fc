"""The local step for generative backbones (LLaVA): train a soft prompt, with or without
DP-SGD, and evaluate by exact match and class-name ranking.

:class:`GenerativeTrainer` and :class:`DPGenerativeTrainer` are the
:class:`~fedprompt.training.trainer.LocalTrainer` / :class:`~fedprompt.privacy.dp_sgd.
DPLocalTrainer` of a :class:`~fedprompt.tasks.generative.GenerativePromptModel`: the same
optimizer, schedule, state, Opacus clipping, noise and accounting; batches are index
tensors into an :class:`~fedprompt.tasks.generative.EncodedQA` (so the existing
``FeatureBatches`` / ``PoissonBatches`` draw them), and gradients come from per-sample
context gradients (:mod:`fedprompt.privacy.context_grads`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedprompt.config import TrainConfig
from fedprompt.privacy.context_grads import chain_to_parameters
from fedprompt.privacy.dp_sgd import DPLocalTrainer
from fedprompt.tasks.generative import EncodedQA, GenerativePromptModel
from fedprompt.training.trainer import LocalTrainer


class GenerativeTrainer(LocalTrainer):
    """Non-private local steps: mean loss over the batch, one LM forward/backward."""

    def __init__(self, model: GenerativePromptModel, data: EncodedQA, config: TrainConfig,
                 total_steps: int, chunk: int = 8) -> None:
        super().__init__(model, config, total_steps)  # type: ignore[arg-type]
        self.model = model
        self.data = data
        self.chunk = chunk

    def train_step(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        """``features`` are indices into :attr:`data` (``labels`` only count samples)."""
        self.learner.train()
        self.learner.prepare_step()
        self.optimizer.zero_grad(set_to_none=True)
        if len(features) == 0:
            return 0.0, 0
        batch = self.data.batch(features)
        ctx = self.learner()
        grads, losses, correct = self.model.context_gradients(ctx, batch, self.chunk)
        ctx.backward(grads.mean(dim=0).to(ctx.dtype))
        self.learner.finalize_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.steps_taken += 1
        return float(losses.sum()), int(correct.sum())

    @torch.no_grad()
    def evaluate_data(self, data: EncodedQA, batch_size: int,
                      generate: bool = True) -> dict[str, float | int]:
        return self.model.evaluate(data, batch_size, generate)


class DPGenerativeTrainer(DPLocalTrainer):
    """DP-SGD steps: exact per-sample gradients of the privatized tensors (by default every
    tensor the prompt differentiates, clipped jointly or per group (``clipping``) and noised
    by Opacus' DPOptimizer, accounted at the Poisson sampling rate); batch-mean gradients of
    the others (only in the nominal layout)."""

    def __init__(self, model: GenerativePromptModel, data: EncodedQA, config: TrainConfig,
                 total_steps: int, **dp: Any) -> None:
        super().__init__(model, config, total_steps, **dp)  # type: ignore[arg-type]
        self.model = model
        self.data = data

    def train_step(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        self.learner.train()
        self.learner.prepare_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dp_optimizer.zero_grad(set_to_none=True)
        ctx = self.learner()
        if len(features):
            batch = self.data.batch(features)
            grads, losses, correct = self.model.context_gradients(ctx, batch, self.chunk)
        else:  # Poisson sampling drew no sample: the step still adds noise and counts
            grads = torch.zeros(0, *ctx.shape, device=ctx.device)
            losses = correct = torch.zeros(0)
        per_sample, public = chain_to_parameters(ctx, grads.to(ctx.dtype), self.private,
                                                 self.public)
        self.apply_gradients(per_sample, public)
        return float(losses.sum()), int(correct.sum())
