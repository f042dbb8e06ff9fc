"""The neighbouring-dataset check of a local DP-SGD trainer (exact, deterministic).

Recipe (``../shared/notes/privacy-testing.md`` §2, ``docs/privacy.md``): one client, two
data sets ``D`` and ``D' = D minus one record x*``, identical randomness (initial state,
Poisson masks, noise, the learner's own draws such as DP-FPL's power method). Both run the
same DP-SGD steps; at every step the run on ``D'`` is handed ``D``'s *released* value
(its noisy gradient sum), so both continue from the same released history. A valid
mechanism then shows:

* the pre-noise update (the clipped per-sample gradient sum over every privatized tensor)
  moves by exactly 0 on a step whose batch does not hold ``x*``, and by at most the clip
  norm ``C`` on a step whose batch holds it;
* the client's whole state (shared and personal prompt parts) is identical after every
  step: everything the client keeps, sends or exports is a function of released values.

:func:`neighbouring_trace` runs the two trainers in lock step and returns the
displacements per step; the test suite asserts the two properties for every method
(``tests/test_neighbouring.py``) and the privacy audit can reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedprompt.privacy.dp_sgd import DPLocalTrainer


@dataclass
class StepTrace:
    holds_record: bool  # the step's batch on D held x*
    update_displacement: float  # || clipped sum (D) - clipped sum (D') ||, all DP tensors
    state_displacement: float  # || state (D) - state (D') || after the step


def learner_state(learner: nn.Module) -> Tensor:
    """Every parameter of the learner, flattened (float64)."""
    return torch.cat([p.detach().double().flatten()
                      for _, p in sorted(learner.named_parameters())])


def _synchronise(trainer: DPLocalTrainer, role: str, shared: dict[str, Any]) -> None:
    """Wrap the trainer's noise step: record the clipped sum before noise; the run on D
    releases its noisy sum, the run on D' is handed that release instead of its own."""
    optimizer = trainer.dp_optimizer
    add_noise = optimizer.add_noise

    def synchronised_add_noise() -> None:
        shared[f"pre-{role}"] = [p.summed_grad.detach().double().flatten().clone()
                                 for p in optimizer.params]
        if role == "D":
            add_noise()
            shared["released"] = [p.grad.detach().clone() for p in optimizer.params]
        else:
            for p, released in zip(optimizer.params, shared["released"], strict=True):
                p.grad = released.clone().view_as(p)

    optimizer.add_noise = synchronised_add_noise  # type: ignore[method-assign]


def neighbouring_trace(make_trainer: Callable[[], DPLocalTrainer], features: Tensor,
                       labels: Tensor, record: int, steps: int, sample_rate: float,
                       seed: int = 0) -> list[StepTrace]:
    """Run ``D = (features, labels)`` and ``D'`` = D minus ``record`` in lock step for
    ``steps`` Poisson-sampled DP-SGD steps; ``make_trainer`` must build two trainers with
    identical state and randomness."""
    run_d, run_dp = make_trainer(), make_trainer()
    if not torch.equal(learner_state(run_d.learner), learner_state(run_dp.learner)):
        raise ValueError("make_trainer built two trainers with different initial states")
    shared: dict[str, Any] = {}
    _synchronise(run_d, "D", shared)
    _synchronise(run_dp, "D'", shared)
    rng = np.random.default_rng(seed)  # the masks of this check need not be secret
    trace = []
    for _ in range(steps):
        mask = rng.random(len(labels)) < sample_rate
        idx_d = torch.as_tensor(np.flatnonzero(mask))
        mask[record] = False
        idx_dp = torch.as_tensor(np.flatnonzero(mask))
        run_d.train_step(features[idx_d], labels[idx_d])
        run_dp.train_step(features[idx_dp], labels[idx_dp])
        pre = torch.cat(shared["pre-D"]) - torch.cat(shared["pre-D'"])
        state = learner_state(run_d.learner) - learner_state(run_dp.learner)
        trace.append(StepTrace(bool(len(idx_d) != len(idx_dp)), float(pre.norm()),
                               float(state.norm())))
    return trace
