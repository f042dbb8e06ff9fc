"""The neighbouring-dataset property test of local DP, for every method and both paths.

The harness is :mod:`fedprompt.privacy.neighbouring` (recipe in its docstring and in
docs/privacy.md): D and D' = D minus one record, identical randomness, D' handed D's
released noisy sums. Asserted for every method on the CLIP and the LLaVA path: the
pre-noise update moves by exactly 0 on steps without the record and by at most C with it,
and the client's whole state is identical after every step.

Before the joint DP-SGD fix, DP-FPL, FedPGP, the full-rank and no-residual ablations and
SecFPP trained their shared tensor with plain batch-mean gradients, so the state diverged
on steps with the record and the private update then moved on steps without it (up to
0.66-1.32 C here); PromptFL and local-only were unaffected.
"""

from __future__ import annotations

import pytest
import torch

from fedprompt.config import RunConfig, TrainConfig
from fedprompt.federated.methods import METHODS, build_method_learner, local_dp_names
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.dp_sgd import DPLocalTrainer
from fedprompt.privacy.neighbouring import StepTrace, neighbouring_trace
from fedprompt.privacy.noise import SecureRandom
from fedprompt.prompts import TensorRole
from fedprompt.training.model import PromptedClassifier

#: methods that train under local DP (all of them: local-only and PromptFL too)
LOCAL_DP_METHODS = sorted(METHODS)
CLIP = 0.5
#: "exactly 0" on a step without the record: both runs compute the same thing
ZERO_TOL = 1e-6 * CLIP


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
def _clip_trace(backbone, config: RunConfig) -> list[StepTrace]:
    names = [f"thing {i}" for i in range(6)]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(14, backbone.embed_dim, generator=gen)
    labels = torch.randint(0, len(names), (14,), generator=gen)

    def make_trainer() -> DPLocalTrainer:
        learner = build_method_learner(config, backbone, len(names))
        return DPLocalTrainer(PromptedClassifier(backbone, learner, names), _train_config(),
                              12, noise_multiplier=1.0, clip_norm=CLIP, sample_rate=0.4,
                              expected_batch_size=5.6, accountant=Accountant("rdp"),
                              noise=SecureRandom.from_seed(5),
                              private_names=local_dp_names(config, learner))

    return neighbouring_trace(make_trainer, features, labels, record=3, steps=12,
                              sample_rate=0.4)


@pytest.mark.parametrize("method", LOCAL_DP_METHODS)
def test_clip_path_moves_only_with_the_record(tiny_backbone, method: str) -> None:
    check_trace(_clip_trace(tiny_backbone, _method_config(method)))


# ----------------------------------------------------------------------- LLaVA path
def _llava_trace(llava, color_qa, config: RunConfig) -> list[StepTrace]:
    from fedprompt.tasks.config import TaskConfig
    from fedprompt.tasks.generative import GenerativePromptModel, encode_qa
    from fedprompt.training.generative import DPGenerativeTrainer

    method = config.federation.method
    data = encode_qa(llava, color_qa.train)
    classnames = color_qa.classnames
    # SecFPP's class-level prompts and CoOp are ranked; the others answer (both losses)
    loss = "ranking" if method in ("secfpp", "promptfl", "fedpgp") else "answer"

    def make_trainer() -> DPLocalTrainer:
        learner = build_method_learner(config, llava, len(classnames))
        model = GenerativePromptModel(llava, learner, TaskConfig(loss=loss), classnames)
        return DPGenerativeTrainer(model, data, _train_config(), 6, noise_multiplier=1.0,
                                   clip_norm=CLIP, sample_rate=0.3, expected_batch_size=5.4,
                                   accountant=Accountant("rdp"),
                                   noise=SecureRandom.from_seed(5), chunk=4,
                                   private_names=local_dp_names(config, learner))

    return neighbouring_trace(make_trainer, torch.arange(len(data)),
                              torch.as_tensor(data.labels), record=2, steps=6, sample_rate=0.3)


@pytest.mark.parametrize("method", LOCAL_DP_METHODS)
def test_llava_path_moves_only_with_the_record(llava, color_qa, method: str) -> None:
    check_trace(_llava_trace(llava, color_qa, _method_config(method)))


# ----------------------------------------------------- the check can fail, and does
@pytest.mark.parametrize("method", ["dpfpl", "fedpgp", "dpfpl-full-rank", "secfpp"])
def test_the_papers_nominal_layout_fails_the_check(tiny_backbone, method: str) -> None:
    """privacy.mode = "nominal" (noise on the personal part only) leaks through the
    un-noised shared prompt: the check catches it, which is why nominal outputs are
    labelled as carrying no guarantee."""
    config = _method_config(method).with_overrides({"privacy.mode": "nominal"})
    trace = _clip_trace(tiny_backbone, config)
    assert max(s.state_displacement for s in trace) > 1e-3
    assert max(s.update_displacement for s in trace if not s.holds_record) > 1e-3


def test_the_nominal_layout_fails_the_check_on_the_llava_path_too(llava, color_qa) -> None:
    config = _method_config("dpfpl").with_overrides({"privacy.mode": "nominal"})
    trace = _llava_trace(llava, color_qa, config)
    assert max(s.update_displacement for s in trace if not s.holds_record) > 0.5 * CLIP


@pytest.mark.parametrize("method", LOCAL_DP_METHODS)
def test_clients_privatize_every_trained_tensor_outside_nominal_mode(tiny_backbone,
                                                                      method: str) -> None:
    for mode in ("target-epsilon", "noise-multiplier"):
        config = _method_config(method).with_overrides({"privacy.mode": mode})
        learner = build_method_learner(config, tiny_backbone, 4)
        assert local_dp_names(config, learner) == learner.gradient_names()
        assert set(learner.names_with(TensorRole.SHARED)) <= set(learner.gradient_names())
