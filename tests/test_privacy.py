"""Per-sample gradients, DP-SGD through Opacus, accountants, server aggregation."""

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedprompt.config import PromptConfig, TrainConfig
from fedprompt.federated.aggregation import (
    UpdateRejected,
    average_updates,
    clip_update,
    dp_average,
    noise_generator,
    update_norm,
    validate_update,
)
from fedprompt.privacy.accounting import Accountant, calibrate_noise, nominal_noise_multiplier
from fedprompt.privacy.dp_sgd import DPLocalTrainer, PoissonBatches
from fedprompt.privacy.noise import SecureRandom
from fedprompt.privacy.opacus_head import PromptLogitsHead
from fedprompt.privacy.per_sample import per_sample_gradients
from fedprompt.prompts import TensorRole, build_prompt_learner
from fedprompt.training import LocalTrainer, PromptedClassifier

NAMES = [f"thing {i}" for i in range(12)]


def _classifier(backbone, learner: str, **kw) -> PromptedClassifier:
    config = PromptConfig(learner=learner, n_ctx=4, rank=2, **kw)
    return PromptedClassifier(backbone, build_prompt_learner(config, backbone, len(NAMES), 3),
                              NAMES)


def _batch(backbone, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, backbone.embed_dim, generator=gen),
            torch.randint(0, len(NAMES), (n,), generator=gen))


def _functorch(classifier: PromptedClassifier, names, features, labels) -> list[torch.Tensor]:
    head = PromptLogitsHead(classifier, names)
    module = GradSampleModule(head, force_functorch=True, loss_reduction="sum")
    try:
        logits = module(features)
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        grads = [getattr(classifier.learner, n).grad_sample.clone() for n in names]
    finally:
        module._close()
        for n in names:
            getattr(classifier.learner, n).grad_sample = None
            getattr(classifier.learner, n).grad = None
    return grads


@pytest.mark.parametrize("learner", ["coop", "global-local", "fedpgp", "dpfpl", "hierarchical"])
def test_per_sample_gradients_equal_opacus_functorch(tiny_backbone, learner: str) -> None:
    classifier = _classifier(tiny_backbone, learner)
    names = classifier.learner.local_dp_names()
    features, labels = _batch(tiny_backbone)
    classifier.learner.prepare_step()
    expected = _functorch(classifier, names, features, labels)
    params = [getattr(classifier.learner, n) for n in names]
    for chunk in (1, 4):
        ours = per_sample_gradients(classifier, features, labels, params, [], chunk)
        for got, want in zip(ours.per_sample, expected, strict=True):
            assert got.shape == want.shape == (len(labels), *want.shape[1:])
            assert torch.allclose(got, want, atol=1e-5), (learner, (got - want).abs().max())
            assert want.abs().max() > 1e-4  # not trivially zero


def test_public_gradients_are_the_batch_mean(tiny_backbone) -> None:
    classifier = _classifier(tiny_backbone, "dpfpl")
    learner = classifier.learner
    features, labels = _batch(tiny_backbone, 8)
    learner.prepare_step()
    result = per_sample_gradients(classifier, features, labels,
                                  [learner.local_u, learner.local_v], [learner.global_ctx])
    learner.zero_grad()
    torch.nn.functional.cross_entropy(classifier(features), labels).backward()
    assert torch.allclose(result.public[0], learner.global_ctx.grad, atol=1e-6)
    # the mean of the per-sample gradients is the ordinary gradient
    assert torch.allclose(result.per_sample[0].mean(0), learner.local_u.grad, atol=1e-6)


def test_shared_prefix_path_equals_the_full_text_pass(tiny_backbone) -> None:
    tokens = tiny_backbone.tokenize_class_prompts(NAMES, 4)
    ctx = (torch.randn(4, tiny_backbone.ctx_dim) * 0.02).requires_grad_()
    weights = torch.randn(len(NAMES), tiny_backbone.embed_dim)
    tiny_backbone.prefix_sharing = True
    fast = tiny_backbone.encode_class_prompts(ctx, tokens)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), ctx)
    tiny_backbone.prefix_sharing = False
    try:
        full = tiny_backbone.encode_class_prompts(ctx, tokens)
        (g_full,) = torch.autograd.grad((full * weights).sum(), ctx)
    finally:
        tiny_backbone.prefix_sharing = True
    assert torch.allclose(fast, full, atol=1e-5)
    assert ((g_fast - g_full).norm() / g_full.norm()).item() < 1e-5


def _dp_trainer(classifier, noise: float, accountant: Accountant, clip: float = 1.0,
                seed: int = 0, private_names=None) -> DPLocalTrainer:
    config = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, scheduler="constant")
    return DPLocalTrainer(classifier, config, 10, noise_multiplier=noise, clip_norm=clip,
                          sample_rate=0.5, expected_batch_size=4, accountant=accountant,
                          noise=SecureRandom.from_seed(seed), private_names=private_names)


@pytest.mark.parametrize("learner", ["coop", "global-local", "fedpgp", "dpfpl", "hierarchical"])
def test_local_dp_covers_every_trained_tensor(tiny_backbone, learner: str) -> None:
    """Every tensor the forward pass differentiates is privatized; nothing is public."""
    classifier = _classifier(tiny_backbone, learner)
    trainer = _dp_trainer(classifier, noise=1.0, accountant=Accountant("rdp"))
    names = classifier.learner.local_dp_names()
    assert trainer.public == []
    assert {id(getattr(classifier.learner, n)) for n in names} == {id(p) for p in
                                                                    trainer.private}
    shared = set(classifier.learner.names_with(TensorRole.SHARED))
    assert shared and shared <= set(names)  # the shared prompt is inside the DP mechanism


def test_dp_step_clips_every_tensor_jointly(tiny_backbone) -> None:
    classifier = _classifier(tiny_backbone, "dpfpl")
    learner = classifier.learner
    features, labels = _batch(tiny_backbone, 4)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    accountant = Accountant("rdp")
    trainer = _dp_trainer(classifier, noise=0.0, accountant=accountant, clip=1e-3)
    # no noise, tiny clip: every sample's joint gradient (p_G, u, v) has norm <= 1e-3, so
    # the global prompt's step is as small as the local one's
    trainer.train_step(features, labels)
    assert accountant.steps == 1
    moved_global = (learner.global_ctx - before["global_ctx"]).norm()
    moved_local = (learner.local_ctx - before["local_ctx"]).norm()
    assert 0 < moved_global <= 0.1 * 1e-3 * 4 / 4 + 1e-9  # lr x clip x batch / expected
    assert 0 < moved_local <= 0.1 * 1e-3 * 4 / 4 * 2 + 1e-9  # x2: Eq. 4 of (u, v)


def test_nominal_layout_leaves_the_global_prompt_unclipped(tiny_backbone) -> None:
    """DP-FPL's published layout (privacy.mode = "nominal" only): noise on u, v; the global
    prompt follows its plain batch-mean gradient, which is why it carries no guarantee."""
    classifier = _classifier(tiny_backbone, "dpfpl")
    learner = classifier.learner
    features, labels = _batch(tiny_backbone, 4)
    before = learner.global_ctx.detach().clone()
    trainer = _dp_trainer(classifier, noise=0.0, accountant=Accountant("rdp"), clip=1e-3,
                          private_names=learner.nominal_dp_names())
    assert [id(p) for p in trainer.public] == [id(learner.global_ctx)]
    learner.prepare_step()
    result = per_sample_gradients(classifier, features, labels,
                                  [learner.local_u, learner.local_v], [learner.global_ctx])
    trainer.train_step(features, labels)
    assert torch.allclose(learner.global_ctx, before - 0.1 * result.public[0], atol=1e-6)
    assert (learner.global_ctx - before).norm() > 10 * 0.1 * 1e-3


def test_dp_noise_has_the_calibrated_scale(tiny_backbone) -> None:
    classifier = _classifier(tiny_backbone, "coop")
    learner = classifier.learner
    empty = (torch.zeros(0, tiny_backbone.embed_dim), torch.zeros(0, dtype=torch.long))
    trainer = _dp_trainer(classifier, noise=2.0, accountant=Accountant("rdp"), clip=0.5)
    steps = []
    for _ in range(5):
        start = learner.ctx.detach().clone()
        trainer.train_step(*empty)  # empty Poisson batch: the step is pure noise
        steps.append(((learner.ctx.detach() - start) / -0.1).flatten())
    noise = torch.cat(steps)
    # std of the averaged noise = z * C / expected batch = 2 * 0.5 / 4
    assert noise.std().item() == pytest.approx(0.25, rel=0.05)
    assert trainer.accountant.steps == 5


def test_poisson_batches_sample_each_example_independently() -> None:
    features = torch.arange(1000.0).unsqueeze(1)
    batches = PoissonBatches(features, np.zeros(1000, dtype=np.int64), 0.1, 200,
                             rng=SecureRandom.from_seed(1))
    sizes = [len(b[1]) for b in batches]
    assert len(sizes) == 200 and np.mean(sizes) == pytest.approx(100, rel=0.05)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.1 * 0.9), rel=0.2)


def test_accountant_round_trip_and_growth() -> None:
    accountant = Accountant("rdp")
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step(1.0, 0.1, 50)
    first = accountant.epsilon(1e-5)
    restored = Accountant.from_json(accountant.to_json())
    assert restored.epsilon(1e-5) == pytest.approx(first)
    assert restored.epsilon_after(1.0, 0.1, 50, 1e-5) > first
    assert restored.steps == 50  # epsilon_after does not change it
    restored.step(1.0, 0.1, 50)
    assert restored.epsilon(1e-5) > first


def test_calibration_reaches_the_target_and_nominal_formula() -> None:
    z = calibrate_noise(1.0, 1e-5, 0.05, 400)
    accountant = Accountant("rdp")
    accountant.step(z, 0.05, 400)
    assert 0.95 <= accountant.epsilon(1e-5) <= 1.0
    assert nominal_noise_multiplier(0.1, 1e-5, 100) == pytest.approx(
        math.sqrt(100 * math.log(1e5)) / 0.1)


def test_validation_rejects_bad_updates() -> None:
    expected = {"g": (2, 3)}
    good = validate_update({"g": np.ones((2, 3), np.float32)}, expected, 100)
    assert torch.equal(good["g"], torch.ones(2, 3))
    bad = [
        ({"h": np.ones((2, 3))}, "wrong keys"),
        ({"g": np.ones((3, 2))}, "shape"),
        ({"g": np.ones((2, 3), np.int32)}, "dtype"),
        ({"g": np.full((2, 3), np.inf)}, "non-finite"),
        ({"g": np.full((2, 3), 1e3)}, "sanity bound"),
    ]
    for update, reason in bad:
        with pytest.raises(UpdateRejected, match=reason):
            validate_update(update, expected, 100)


def test_server_dp_clips_averages_equally_and_calibrates_noise() -> None:
    template = {"g": torch.zeros(4)}
    updates = [{"g": torch.tensor([3.0, 4.0, 0.0, 0.0])}, {"g": torch.tensor([0.3, 0.4, 0, 0])}]
    clipped, norm = clip_update(updates[0], 1.0)
    assert norm == pytest.approx(5.0) and update_norm(clipped) == pytest.approx(1.0)
    result = dp_average(updates, template, clip_norm=1.0, noise_multiplier=0.0, denominator=2,
                        generator=noise_generator(0))
    assert torch.allclose(result.update["g"], torch.tensor([0.45, 0.6, 0, 0]))
    assert result.clipped == 1
    # equal weights, not example weights
    plain = average_updates(updates, template)
    assert torch.allclose(plain["g"], torch.tensor([1.65, 2.2, 0, 0]))
    # noise std on the average = z * C / n
    big = {"g": torch.zeros(20000)}
    noisy = dp_average([], big, clip_norm=2.0, noise_multiplier=1.5, denominator=10,
                       generator=noise_generator(1))
    assert noisy.noise_std == pytest.approx(0.3)
    assert noisy.update["g"].std().item() == pytest.approx(0.3, rel=0.03)


def test_noise_generator_is_keyed_from_the_os_unless_reproducible() -> None:
    a = noise_generator().normal((4,), 1.0)
    b = noise_generator().normal((4,), 1.0)
    assert not torch.equal(a, b)
    c = noise_generator(7).normal((4,), 1.0)
    d = noise_generator(7).normal((4,), 1.0)
    assert torch.equal(c, d) and c.dtype == torch.float64


def test_plain_trainer_and_dp_trainer_agree_without_noise_or_clipping(tiny_backbone) -> None:
    features, labels = _batch(tiny_backbone, 8)
    plain = _classifier(tiny_backbone, "coop")
    private = _classifier(tiny_backbone, "coop")
    config = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, scheduler="constant")
    LocalTrainer(plain, config, 10).train_step(features, labels)
    trainer = DPLocalTrainer(private, config, 10, noise_multiplier=0.0, clip_norm=1e6,
                             sample_rate=1.0, expected_batch_size=8,
                             accountant=Accountant("rdp"))
    trainer.train_step(features, labels)
    assert torch.allclose(plain.learner.ctx, private.learner.ctx, atol=1e-6)
