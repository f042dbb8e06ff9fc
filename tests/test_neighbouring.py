"""The neighbouring-dataset property test of local DP, for every method and both paths.

Recipe (../shared/notes/privacy-testing.md §2): one client, two data sets D and D' = D
minus one record x*, identical randomness (initial state, Poisson masks, noise, the
learner's own draws such as DP-FPL's power method). Both run the same DP-SGD steps; at
every step the run on D' is handed D's *released* value (its noisy gradient), so both
continue from the same released history. Then:

* the pre-noise update (the clipped per-sample gradient sum over every trained tensor)
  moves by exactly 0 on a step whose batch does not hold x*, and by at most the clip norm
  C on a step whose batch holds it;
* the client's whole state (shared and personal prompt parts) is identical after every
  step: everything the client keeps, sends or exports is a function of released values.

Before the joint DP-SGD fix, DP-FPL, FedPGP, the full-rank ablation and SecFPP trained
their shared tensor with plain batch-mean gradients, so the state diverged on steps with
x* and the private update then moved on steps without it (about 0.4-0.5 C here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from fedprompt.config import RunConfig, TrainConfig
from fedprompt.federated.methods import METHODS, build_method_learner
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.dp_sgd import DPLocalTrainer
from fedprompt.privacy.noise import SecureRandom
from fedprompt.training.model import PromptedClassifier

#: methods that train under local DP (all of them: local-only and PromptFL too)
LOCAL_DP_METHODS = sorted(METHODS)
CLIP = 0.5
#: "exactly 0" on a step without the record: both runs compute the same thing
ZERO_TOL = 1e-6 * CLIP


@dataclass
class StepTrace:
    holds_record: bool
    update_displacement: float  # || clipped sum (D) - clipped sum (D') ||, all DP tensors
    state_displacement: float  # || state (D) - state (D') || after the step


def _state(learner: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for _, p in sorted(
        learner.named_parameters())])


def _synchronise(trainer: DPLocalTrainer, role: str, shared: dict) -> None:
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


def neighbouring_trace(make_trainer: Callable[[], DPLocalTrainer], features: torch.Tensor,
                       labels: torch.Tensor, record: int, steps: int, sample_rate: float,
                       seed: int = 0) -> list[StepTrace]:
    """Run D and D' = D minus ``record`` in lock step (see the module docstring)."""
    run_d, run_dp = make_trainer(), make_trainer()
    assert torch.equal(_state(run_d.learner), _state(run_dp.learner))
    shared: dict = {}
    _synchronise(run_d, "D", shared)
    _synchronise(run_dp, "D'", shared)
    rng = np.random.default_rng(seed)
    trace = []
    for _ in range(steps):
        mask = rng.random(len(labels)) < sample_rate
        idx_d = torch.as_tensor(np.flatnonzero(mask))
        mask[record] = False
        idx_dp = torch.as_tensor(np.flatnonzero(mask))
        run_d.train_step(features[idx_d], labels[idx_d])
        run_dp.train_step(features[idx_dp], labels[idx_dp])
        pre = torch.cat(shared["pre-D"]) - torch.cat(shared["pre-D'"])
        trace.append(StepTrace(bool(len(idx_d) != len(idx_dp)), float(pre.norm()),
                               float((_state(run_d.learner) - _state(run_dp.learner)).norm())))
    return trace


def check_trace(trace: list[StepTrace]) -> None:
    assert any(s.holds_record for s in trace) and not all(s.holds_record for s in trace)
    for t, step in enumerate(trace):
        if step.holds_record:
            assert step.update_displacement <= CLIP * (1 + 1e-5), (t, step)
        else:
            assert step.update_displacement <= ZERO_TOL, (
                f"step {t} without the record moved the private update by "
                f"{step.update_displacement / CLIP:.3f} C")
        assert step.state_displacement <= ZERO_TOL, (
            f"step {t}: the state depends on the record outside the noised path "
            f"(displacement {step.state_displacement:.3g})")


def _method_config(method: str) -> RunConfig:
    return RunConfig.model_validate({
        "seed": 3, "prompt": {"n_ctx": 4, "rank": 2},
        "federation": {"method": method},
        "privacy": {"mode": "noise-multiplier", "clip_norm": CLIP},
    })


def _train_config() -> TrainConfig:
    # production defaults (SGD, momentum, weight decay, cosine), a large step size so that
    # any leak shows
    return TrainConfig(lr=0.5)


# ------------------------------------------------------------------------ CLIP path
@pytest.mark.parametrize("method", LOCAL_DP_METHODS)
def test_clip_path_moves_only_with_the_record(tiny_backbone, method: str) -> None:
    config = _method_config(method)
    names = [f"thing {i}" for i in range(6)]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(14, tiny_backbone.embed_dim, generator=gen)
    labels = torch.randint(0, len(names), (14,), generator=gen)

    def make_trainer() -> DPLocalTrainer:
        learner = build_method_learner(config, tiny_backbone, len(names))
        classifier = PromptedClassifier(tiny_backbone, learner, names)
        return DPLocalTrainer(classifier, _train_config(), 12, noise_multiplier=1.0,
                              clip_norm=CLIP, sample_rate=0.4, expected_batch_size=5.6,
                              accountant=Accountant("rdp"),
                              noise=SecureRandom.from_seed(5))

    check_trace(neighbouring_trace(make_trainer, features, labels, record=3, steps=12,
                                   sample_rate=0.4))


# ----------------------------------------------------------------------- LLaVA path
@pytest.fixture(scope="module")
def llava():
    from fedprompt.backbones.llava import LlavaBackbone

    return LlavaBackbone.from_preset("llava-tiny", weights_seed=0)


@pytest.fixture(scope="module")
def color_qa():
    from fedprompt.data.datasets import ArrayImages, DataSplits, ImageSet
    from fedprompt.data.synthetic import COLORS, coloured_squares
    from fedprompt.data.vqa import classification_qa

    pixels, labels = coloured_squares(16)
    names = list(COLORS)
    train = ImageSet("colors/train", ArrayImages(pixels[:12]), labels[:12], names)
    test = ImageSet("colors/test", ArrayImages(pixels[12:]), labels[12:], names)
    return classification_qa(DataSplits(train, test), "what color is the square? answer:")


@pytest.mark.parametrize("method", LOCAL_DP_METHODS)
def test_llava_path_moves_only_with_the_record(llava, color_qa, method: str) -> None:
    from fedprompt.tasks.config import TaskConfig
    from fedprompt.tasks.generative import GenerativePromptModel, encode_qa
    from fedprompt.training.generative import DPGenerativeTrainer

    config = _method_config(method)
    data = encode_qa(llava, color_qa.train)
    classnames = color_qa.classnames
    # SecFPP's class-level prompts and CoOp are ranked; the others answer (both losses)
    loss = "ranking" if method in ("secfpp", "promptfl", "fedpgp") else "answer"

    def make_trainer() -> DPLocalTrainer:
        learner = build_method_learner(config, llava, len(classnames))
        model = GenerativePromptModel(llava, learner, TaskConfig(loss=loss), classnames)
        return DPGenerativeTrainer(model, data, _train_config(), 8, noise_multiplier=1.0,
                                   clip_norm=CLIP, sample_rate=0.4, expected_batch_size=4.8,
                                   accountant=Accountant("rdp"),
                                   noise=SecureRandom.from_seed(5), chunk=4)

    index = torch.arange(len(data))
    check_trace(neighbouring_trace(make_trainer, index, torch.as_tensor(data.labels),
                                   record=2, steps=8, sample_rate=0.4))
