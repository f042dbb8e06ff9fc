"""Per-group clipping of local DP-SGD (``privacy.clipping = "per-group"``).

Each privatized tensor ``i`` is clipped per sample to ``C_i = C sqrt(s_i / sum s)``, so
``sum C_i^2 = C^2``: a sample's joint gradient norm is still at most ``C``, the noise per
coordinate is still ``z C`` and the accountant is unchanged. Checked here: (a) the clipped
per-sample norms (per tensor and joint), (b) the neighbouring-dataset property for DP-FPL
on both paths, (c) the noise scale, and the configuration's errors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedprompt.config import RunConfig, TrainConfig, from_run_config, load_config
from fedprompt.errors import ConfigError
from fedprompt.federated.methods import build_method_learner, local_dp_names
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.dp_sgd import (
    DPLocalTrainer,
    SecureDPOptimizer,
    SecurePerLayerDPOptimizer,
    group_clip_norms,
)
from fedprompt.privacy.neighbouring import StepTrace, neighbouring_trace
from fedprompt.privacy.noise import SecureRandom
from fedprompt.training.model import PromptedClassifier

NAMES = [f"thing {i}" for i in range(6)]
CLIP = 0.5
SHARES = [2.0, 1.0, 1.0]  # DP-FPL: global_ctx, local_u, local_v


def _config(method: str = "dpfpl", **privacy: Any) -> RunConfig:
    return RunConfig.model_validate({
        "seed": 3, "prompt": {"n_ctx": 4, "rank": 2}, "federation": {"method": method},
        "privacy": {"mode": "noise-multiplier", "clip_norm": CLIP, "clipping": "per-group",
                    "clip_shares": SHARES} | privacy,
    })


def _trainer(backbone, config: RunConfig, *, clip: float = CLIP, noise: float = 1.0,
             expected_batch_size: float = 5.6, train: TrainConfig | None = None,
             seed: int = 5) -> DPLocalTrainer:
    learner = build_method_learner(config, backbone, len(NAMES))
    privacy = config.privacy
    return DPLocalTrainer(
        PromptedClassifier(backbone, learner, NAMES), train or TrainConfig(lr=0.5), 12,
        noise_multiplier=noise, clip_norm=clip, sample_rate=0.4,
        expected_batch_size=expected_batch_size, accountant=Accountant("rdp"),
        noise=SecureRandom.from_seed(seed), private_names=local_dp_names(config, learner),
        clipping=privacy.clipping, clip_shares=privacy.clip_shares)


def _capture_clipped_sums(trainer: DPLocalTrainer) -> list[list[torch.Tensor]]:
    """Record each step's clipped per-tensor sums (before noise)."""
    optimizer = trainer.dp_optimizer
    add_noise = optimizer.add_noise
    sums: list[list[torch.Tensor]] = []

    def recording_add_noise() -> None:
        sums.append([p.summed_grad.detach().double().clone() for p in optimizer.params])
        add_noise()

    optimizer.add_noise = recording_add_noise  # type: ignore[method-assign]
    return sums


# ------------------------------------------------------------------- the norms
def test_group_norms_split_the_clip_norm_by_shares() -> None:
    norms = group_clip_norms(1.0, [2, 1, 1], ["global_ctx", "local_u", "local_v"])
    assert norms == pytest.approx([math.sqrt(0.5), 0.5, 0.5])
    assert math.fsum(c * c for c in norms) == pytest.approx(1.0, rel=1e-15)
    assert group_clip_norms(2.0, [], ["a", "b", "c", "d"]) == pytest.approx([1.0] * 4)
    assert group_clip_norms(0.7, [], ["ctx"]) == pytest.approx([0.7])


@pytest.mark.parametrize("clip", [1e-3, CLIP])
def test_each_tensor_is_clipped_to_its_share_and_the_sample_to_c(tiny_backbone,
                                                                   clip: float) -> None:
    """(a) One sample per step, so the clipped sum is that sample's clipped gradient: each
    tensor's norm is at most C_i (equal to it where C_i binds, as with clip 1e-3), the joint
    norm at most C."""
    config = _config()
    trainer = _trainer(tiny_backbone, config, clip=clip)
    assert isinstance(trainer.dp_optimizer, SecurePerLayerDPOptimizer)
    limits = group_clip_norms(clip, SHARES, local_dp_names(config, trainer.learner))
    assert trainer.clip_norms == pytest.approx(limits)
    sums = _capture_clipped_sums(trainer)
    gen = torch.Generator().manual_seed(1)
    features = 30 * torch.randn(8, tiny_backbone.embed_dim, generator=gen)
    labels = torch.randint(0, len(NAMES), (8,), generator=gen)
    for i in range(len(labels)):
        trainer.train_step(features[i:i + 1], labels[i:i + 1])
    assert len(sums) == len(labels)
    for step in sums:
        norms = [float(s.norm()) for s in step]
        for norm, limit in zip(norms, limits, strict=True):
            assert norm <= limit * (1 + 1e-5)
            if clip == 1e-3:  # every tensor's gradient exceeds its tiny share
                assert norm == pytest.approx(limit, rel=1e-4)
        assert math.sqrt(sum(n * n for n in norms)) <= clip * (1 + 1e-5)


def test_joint_clipping_lets_the_largest_tensor_take_the_budget(tiny_backbone) -> None:
    """What per-group clipping changes: under joint clipping the clipped norms follow the
    raw gradients' proportions; per group, every tensor gets its share."""
    config = _config(clipping="joint", clip_shares=[])
    trainer = _trainer(tiny_backbone, config, clip=1e-3)
    assert type(trainer.dp_optimizer) is SecureDPOptimizer
    sums = _capture_clipped_sums(trainer)
    gen = torch.Generator().manual_seed(1)
    features = 30 * torch.randn(1, tiny_backbone.embed_dim, generator=gen)
    trainer.train_step(features, torch.tensor([2]))
    norms = [float(s.norm()) for s in sums[0]]
    assert math.sqrt(sum(n * n for n in norms)) == pytest.approx(1e-3, rel=1e-4)
    # joint: the split of C follows the gradients, not the shares
    assert norms != pytest.approx([c * 1e-3 for c in (math.sqrt(0.5), 0.5, 0.5)], rel=1e-2)


# --------------------------------------------------- the neighbouring property
def _check(trace: list[StepTrace]) -> None:
    assert any(s.holds_record for s in trace) and not all(s.holds_record for s in trace)
    for t, step in enumerate(trace):
        bound = CLIP * (1 + 1e-5) if step.holds_record else 1e-6 * CLIP
        assert step.update_displacement <= bound, (t, step)
        assert step.state_displacement <= 1e-6 * CLIP, (t, step)


@pytest.mark.parametrize("method", ["dpfpl", "fedpgp", "secfpp"])
def test_clip_path_moves_only_with_the_record_under_per_group_clipping(tiny_backbone,
                                                                        method: str) -> None:
    """(b) The neighbouring-dataset property with per-group clipping (shares [2, 1, 1] for
    DP-FPL and FedPGP, equal shares for SecFPP's two tensors)."""
    config = _config(method, clip_shares=SHARES if method != "secfpp" else [])
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(14, tiny_backbone.embed_dim, generator=gen)
    labels = torch.randint(0, len(NAMES), (14,), generator=gen)
    trace = neighbouring_trace(lambda: _trainer(tiny_backbone, config), features, labels,
                               record=3, steps=12, sample_rate=0.4)
    _check(trace)


def test_llava_path_moves_only_with_the_record_under_per_group_clipping(llava,
                                                                         color_qa) -> None:
    from fedprompt.tasks.config import TaskConfig
    from fedprompt.tasks.generative import GenerativePromptModel, encode_qa
    from fedprompt.training.generative import DPGenerativeTrainer

    config = _config()
    data = encode_qa(llava, color_qa.train)
    classnames = color_qa.classnames

    def make_trainer() -> DPLocalTrainer:
        learner = build_method_learner(config, llava, len(classnames))
        model = GenerativePromptModel(llava, learner, TaskConfig(loss="answer"), classnames)
        return DPGenerativeTrainer(
            model, data, TrainConfig(lr=0.5), 6, noise_multiplier=1.0, clip_norm=CLIP,
            sample_rate=0.3, expected_batch_size=5.4, accountant=Accountant("rdp"),
            noise=SecureRandom.from_seed(5), chunk=4,
            private_names=local_dp_names(config, learner), clipping="per-group",
            clip_shares=SHARES)

    _check(neighbouring_trace(make_trainer, torch.arange(len(data)),
                              torch.as_tensor(data.labels), record=2, steps=6,
                              sample_rate=0.3))


# ---------------------------------------------------------------- the noise
def test_noise_std_per_coordinate_is_z_times_c(tiny_backbone) -> None:
    """(c) Per-group clipping noises every coordinate of every tensor with std z C (the
    joint bound), exactly as joint clipping does."""
    z = 2.0
    trainer = _trainer(tiny_backbone, _config(), noise=z, expected_batch_size=1)
    optimizer = trainer.dp_optimizer
    assert optimizer.max_grad_norm == pytest.approx(CLIP, rel=1e-12)
    assert optimizer.noise_multiplier * optimizer.max_grad_norm == pytest.approx(z * CLIP,
                                                                                 rel=1e-12)
    draws: list[list[torch.Tensor]] = [[] for _ in optimizer.params]
    for _ in range(300):  # a zero-gradient batch: the released sum is pure noise
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.params:
            p.grad_sample = torch.zeros(3, *p.shape)
        optimizer.pre_step()
        for store, p in zip(draws, optimizer.params, strict=True):
            store.append(p.grad.detach().double().flatten().clone())  # / expected size 1
    for store in draws:
        noise = torch.cat(store)
        assert noise.mean().item() == pytest.approx(0.0, abs=6 * z * CLIP / len(noise) ** 0.5)
        assert noise.std().item() == pytest.approx(z * CLIP, rel=6 / (2 * len(noise)) ** 0.5)


# ------------------------------------------------------------------- config
def test_config_accepts_shares_as_a_string_and_checks_them() -> None:
    config = load_config(overrides={"privacy.clipping": "per-group",
                                    "privacy.clip_shares": "2, 1,1"})
    assert config.privacy.clip_shares == [2.0, 1.0, 1.0]
    flat = {"privacy.clipping": "per-group", "privacy.clip_shares": "3,1,1"}
    assert from_run_config(flat).privacy.clip_shares == [3.0, 1.0, 1.0]
    assert from_run_config({"privacy.clip_shares": ""}).privacy.clip_shares == []
    with pytest.raises(ConfigError, match="positive"):
        load_config(overrides={"privacy.clipping": "per-group", "privacy.clip_shares": "1,0"})
    with pytest.raises(ConfigError, match="per-group"):
        load_config(overrides={"privacy.clip_shares": "1,1,1"})  # joint clipping


def test_wrong_number_of_shares_names_the_tensors(tiny_backbone) -> None:
    config = _config(clip_shares=[1.0, 1.0])
    with pytest.raises(ConfigError, match=r"2 value.*3 tensor.*global_ctx.*local_u"):
        _trainer(tiny_backbone, config)
