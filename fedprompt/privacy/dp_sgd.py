"""Local DP-SGD for prompt learners: our per-sample gradients, Opacus' clipping, noise and
accounting.

Per step:

1. the learner prepares its tensors (DP-FPL: re-factorize ``p_L`` into ``u``, ``v``);
2. :func:`~fedprompt.privacy.per_sample.per_sample_gradients` gives exact per-sample
   gradients of the privatized tensors with one text-encoder pass;
3. Opacus' :class:`~opacus.optimizers.DPOptimizer` clips every sample's gradient to
   ``C`` **jointly over all privatized tensors** (``privacy.clipping = "joint"``), or
   its :class:`~opacus.optimizers.DPPerLayerOptimizer` clips each privatized tensor ``i``
   to its own ``C_i = C sqrt(s_i / sum s)`` (``"per-group"``, shares ``s`` from
   ``privacy.clip_shares``) so that ``sum C_i^2 = C^2`` and the joint per-sample norm is
   still at most ``C``; either sums, adds ``N(0, (z C)^2)`` per coordinate (float64 noise
   from a CSPRNG, :mod:`fedprompt.privacy.noise`) and divides by the expected batch size;
   its step hook advances the accountant by one step at the real sampling rate;
4. the learner finishes its gradients (DP-FPL: Eq. 4 from the noisy ``u``, ``v``
   gradients to ``p_L``) and the learner's own optimizer steps.

Which tensors are privatized: by default **every tensor the forward pass differentiates**
(``learner.local_dp_names()``: for DP-FPL the shared ``p_G`` and the carriers ``u``,
``v``; for SecFPP the domain and class prompts). Every tensor the client trains is then a
function of noisy gradients only (and of data-independent randomness such as DP-FPL's
power method), so one record-level epsilon covers the client's update, its personal prompt
and anything exported from them (the neighbouring-dataset tests in
``tests/test_neighbouring.py`` check it step by step). A tensor left out (``public``)
would be trained with plain batch-mean gradients and would carry its data into every
later step un-noised: that happens only in DP-FPL's published layout
(``learner.nominal_dp_names()``, noise on ``u``, ``v`` only), which the client uses only in
``privacy.mode = "nominal"`` and labels as carrying no valid guarantee.

Batches are drawn by Poisson sampling (each example independently with probability
``q = batch_size / n``, from a CSPRNG), which is what the RDP/PRV accountants' subsampled
Gaussian analysis assumes; the batch size varies and may be zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor

from fedprompt.config import TrainConfig
from fedprompt.errors import ConfigError
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.noise import SecureRandom
from fedprompt.privacy.per_sample import per_sample_gradients
from fedprompt.training.model import PromptedClassifier
from fedprompt.training.trainer import LocalTrainer


class PoissonBatches:
    """``steps`` batches per pass, each example included with probability ``sample_rate``,
    the inclusions drawn from ``rng`` (a CSPRNG: which records a step used is as secret as
    its noise)."""

    def __init__(self, features: Tensor, labels: np.ndarray | Tensor, sample_rate: float,
                 steps: int, rng: SecureRandom | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.features = features.to(device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(device)
        self.sample_rate = sample_rate
        self.steps = steps
        self.rng = rng if rng is not None else SecureRandom()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.steps):
            mask = self.rng.uniform(len(self.labels)) < self.sample_rate
            idx = torch.as_tensor(np.flatnonzero(mask), device=self.features.device)
            yield self.features[idx], self.labels[idx]


def poisson_plan(num_examples: int, batch_size: int) -> tuple[float, int]:
    """Sampling rate ``q = min(1, B/n)`` and steps per epoch ``ceil(n/B)``."""
    return min(1.0, batch_size / num_examples), max(1, -(-num_examples // batch_size))


class SecureDPOptimizer(DPOptimizer):
    """Opacus' :class:`~opacus.optimizers.DPOptimizer` (per-sample clipping, summing,
    scaling, step hooks) whose Gaussian noise comes from :class:`SecureRandom`: float64,
    CSPRNG bits, Opacus' ``secure_mode`` construction. It replaces ``secure_mode=True``,
    which needs ``torchcsprng`` (no build for recent torch).

    The noise is ``N(0, (noise_multiplier * max_grad_norm)^2)`` per coordinate, where
    ``max_grad_norm`` bounds the joint per-sample norm; :class:`SecurePerLayerDPOptimizer`
    reuses this method through the method resolution order."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureRandom,
                 **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)  # type: ignore[arg-type]
        self.noise_source = noise_source

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            noise = self.noise_source.normal(summed.shape, std, device=summed.device)
            p.grad = (summed.double() + noise).to(summed.dtype).view_as(p)
            _mark_as_processed(p.summed_grad)


class SecurePerLayerDPOptimizer(SecureDPOptimizer, DPPerLayerOptimizer):
    """Opacus' :class:`~opacus.optimizers.DPPerLayerOptimizer` (each tensor clipped per
    sample to its own norm ``C_i``) with :class:`SecureDPOptimizer`'s CSPRNG noise.

    The MRO is ``SecurePerLayerDPOptimizer -> SecureDPOptimizer -> DPPerLayerOptimizer ->
    DPOptimizer``: clipping comes from the per-layer optimizer, noise from ours. Opacus sets
    ``max_grad_norm = ||(C_1, ..., C_k)||_2`` (the bound on the joint per-sample norm) and
    noises every coordinate with ``noise_multiplier * max_grad_norm``; it computes that norm
    in float32, so it is recomputed here in float64 (the noise must not fall below what the
    accountant assumes by a rounding error)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureRandom,
                 max_grad_norm: Sequence[float], **kwargs: object) -> None:
        norms = [float(c) for c in max_grad_norm]
        super().__init__(optimizer, noise_source=noise_source, max_grad_norm=norms,
                         **kwargs)
        self.max_grad_norms = norms
        self.max_grad_norm = math.sqrt(math.fsum(c * c for c in norms))


def group_clip_norms(clip_norm: float, shares: Sequence[float],
                     names: Sequence[str]) -> list[float]:
    """Per-tensor clipping norms of per-group clipping: ``C_i = C sqrt(s_i / sum s)`` for
    the privatized tensors ``names`` (in that order), equal shares where ``shares`` is
    empty. ``sum C_i^2 = C^2``, so a sample's joint gradient norm stays at most ``C``: the
    sensitivity, the noise ``z C`` and the accountant are those of joint clipping."""
    values = [float(s) for s in shares] if shares else [1.0] * len(names)
    if len(values) != len(names):
        raise ConfigError(
            f"privacy.clip_shares has {len(values)} value(s) {values} but local DP "
            f"privatizes {len(names)} tensor(s) {list(names)}: give one positive share per "
            f"tensor in that order (e.g. privacy.clip_shares = {[1.0] * len(names)}), or "
            "leave it empty for equal shares")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"privacy.clip_shares {values} must all be positive and finite "
                          f"(one per privatized tensor {list(names)})")
    total = math.fsum(values)
    return [clip_norm * math.sqrt(v / total) for v in values]


class DPLocalTrainer(LocalTrainer):
    """:class:`LocalTrainer` whose steps are DP-SGD steps on the privatized tensors.

    Args:
        private_names: the tensors that get per-sample clipping and noise (default: every
            tensor the forward pass differentiates, ``learner.local_dp_names()``: the only
            layout with a valid guarantee); the other differentiated tensors get plain
            batch-mean gradients.
        noise: the noise stream (default: a fresh CSPRNG stream).
        clipping: ``"joint"`` clips each sample's gradient over all privatized tensors
            together to ``clip_norm``; ``"per-group"`` clips each privatized tensor to its
            own share of it (:func:`group_clip_norms`), so one tensor with large gradients
            (DP-FPL's shared ``global_ctx``) cannot take the whole budget from the others.
            The noise and the accounting are the same.
        clip_shares: per-group clipping: one positive share per privatized tensor, in the
            order of ``private_names`` (empty: equal shares).
    """

    def __init__(self, classifier: PromptedClassifier, config: TrainConfig, total_steps: int,
                 *, noise_multiplier: float, clip_norm: float, sample_rate: float,
                 expected_batch_size: float, accountant: Accountant,
                 noise: SecureRandom | None = None, chunk: int = 4,
                 private_names: Sequence[str] | None = None,
                 clipping: Literal["joint", "per-group"] = "joint",
                 clip_shares: Sequence[float] = ()) -> None:
        super().__init__(classifier, config, total_steps)
        learner = classifier.learner
        names = list(learner.local_dp_names() if private_names is None else private_names)
        self.private = [getattr(learner, name) for name in names]
        self.public = [getattr(learner, name) for name in learner.gradient_names()
                       if name not in names]
        self.accountant = accountant
        self.sample_rate = sample_rate
        self.chunk = chunk
        self.noise = noise if noise is not None else SecureRandom()
        # Opacus does clipping, noise and accounting; its inner optimizer is never stepped
        # (the learner's own optimizer applies the update after Eq. 4, where it applies).
        inner = torch.optim.SGD(self.private, lr=0.0)
        common = dict(noise_source=self.noise, noise_multiplier=noise_multiplier,
                      expected_batch_size=max(1, round(expected_batch_size)),
                      loss_reduction="mean")
        self.dp_optimizer: SecureDPOptimizer
        if clipping == "per-group":
            self.clip_norms = group_clip_norms(clip_norm, clip_shares, names)
            self.dp_optimizer = SecurePerLayerDPOptimizer(
                inner, max_grad_norm=self.clip_norms, **common)  # type: ignore[arg-type]
        elif clipping == "joint":
            if clip_shares:
                raise ConfigError("privacy.clip_shares is set but privacy.clipping is "
                                  "'joint': set privacy.clipping = 'per-group' or drop the "
                                  "shares")
            self.clip_norms = [clip_norm]
            self.dp_optimizer = SecureDPOptimizer(inner, max_grad_norm=clip_norm,
                                                  **common)  # type: ignore[arg-type]
        else:
            raise ConfigError(f"unknown clipping {clipping!r}: use 'joint' or 'per-group'")
        self.dp_optimizer.attach_step_hook(
            lambda opt: accountant.step(opt.noise_multiplier, sample_rate)
        )

    @property
    def noise_multiplier(self) -> float:
        return float(self.dp_optimizer.noise_multiplier)

    def apply_gradients(self, per_sample: Sequence[Tensor], public: Sequence[Tensor]) -> None:
        """One DP-SGD update from per-sample gradients of the privatized tensors and plain
        gradients of the others: Opacus clips, sums, noises and accounts, then the learner
        finalizes its gradients (DP-FPL: Eq. 4) and the optimizer and schedule step."""
        for param, grads in zip(self.private, per_sample, strict=True):
            param.grad_sample = grads
        for param, grad in zip(self.public, public, strict=True):
            param.grad = grad
        self.dp_optimizer.pre_step()  # clip, sum, noise, scale; accountant.step
        for param in self.private:
            param.grad_sample = None
            param.summed_grad = None
        self.learner.finalize_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.steps_taken += 1

    def train_step(self, features: Tensor, labels: Tensor) -> tuple[float, int]:
        self.learner.train()
        self.learner.prepare_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.dp_optimizer.zero_grad(set_to_none=True)
        result = per_sample_gradients(self.classifier, features, labels, self.private,
                                      self.public, self.chunk)
        self.apply_gradients(result.per_sample, result.public)
        if len(labels) == 0:
            return 0.0, 0
        return result.loss * len(labels), result.correct
