import pytest
import torch

from fedprompt.backbones import CLIPBackbone
from fedprompt.config import PromptConfig
from fedprompt.errors import PromptError
from fedprompt.prompts import (
    CoOpPrompt,
    DPFPLPrompt,
    GlobalLocalPrompt,
    GlobalLowRankPrompt,
    HierarchicalPrompt,
    TensorRole,
    build_prompt_learner,
)
from fedprompt.prompts.lowrank import (
    power_factorize,
    reconstruct_full_gradient,
    tangent_projection,
)
from fedprompt.training import PromptedClassifier

N_CTX, WIDTH, CLASSES = 8, 64, 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_uv_plus_residual_reproduces_the_local_prompt() -> None:
    learner = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=3, generator=_gen())
    for _ in range(3):
        learner.prepare_step()
        u, v, r = learner.local_u.detach(), learner.local_v.detach(), learner.residual_ctx()
        assert torch.allclose(u @ v + r, learner.local_ctx, atol=1e-6)
        # the prompt the text encoder sees is exactly p_G + p_L, bit for bit
        assert torch.equal(learner()[0], learner.global_ctx + learner.local_ctx)
        assert torch.allclose(u.T @ u, torch.eye(3), atol=1e-5)
        assert torch.allclose(v @ v.T, torch.eye(3), atol=1e-5)


def _loss_and_full_gradient(learner: DPFPLPrompt, target: torch.Tensor) -> torch.Tensor:
    """Backward a nonlinear loss through the learner; return autograd's gradient with
    respect to the full-rank local prompt for the same loss."""
    out = learner()[0]
    (torch.tanh(out) * target).sum().backward()
    p_l = learner.local_ctx.detach().clone().requires_grad_()
    full = learner.global_ctx.detach() + p_l
    (torch.tanh(full) * target).sum().backward()
    return p_l.grad


def test_eq4_equals_autograd_on_the_full_rank_prompt_at_full_rank() -> None:
    """With k = n_ctx and no noise, Eq. 4 rebuilds exactly autograd's full-rank gradient."""
    learner = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=N_CTX, generator=_gen(1))
    target = torch.randn(N_CTX, WIDTH, generator=_gen(2))
    learner.prepare_step()
    expected = _loss_and_full_gradient(learner, target)
    learner.finalize_gradients()
    assert learner.local_ctx.grad is not None
    assert torch.allclose(learner.local_ctx.grad, expected, atol=1e-5)
    assert learner.global_ctx.grad is not None  # the global part trains as usual


def test_eq4_is_the_tangent_projection_of_autograd_at_low_rank() -> None:
    learner = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=2, generator=_gen(3))
    target = torch.randn(N_CTX, WIDTH, generator=_gen(4))
    learner.prepare_step()
    full = _loss_and_full_gradient(learner, target)
    learner.finalize_gradients()
    u, v = learner.local_u.detach(), learner.local_v.detach()
    assert torch.allclose(learner.local_ctx.grad, tangent_projection(full, u, v), atol=1e-5)
    assert not torch.allclose(learner.local_ctx.grad, full, atol=1e-3)  # truly low rank
    # the paper's minus sign: a "+" (as in DP-FPL's public code) would not match
    wrong = (full @ v.T @ v) + u @ (u.T @ full) + u @ (u.T @ full @ v.T @ v)
    assert not torch.allclose(learner.local_ctx.grad, wrong, atol=1e-3)


def test_reconstruction_is_linear_so_noise_on_factors_maps_through() -> None:
    u, v = power_factorize(torch.randn(6, 20, generator=_gen(5)), 3, _gen(6))
    gu, gv = torch.randn(6, 3, generator=_gen(7)), torch.randn(3, 20, generator=_gen(8))
    nu, nv = torch.randn(6, 3, generator=_gen(9)), torch.randn(3, 20, generator=_gen(10))
    lhs = reconstruct_full_gradient(u, v, gu + nu, gv + nv)
    rhs = reconstruct_full_gradient(u, v, gu, gv) + reconstruct_full_gradient(u, v, nu, nv)
    assert torch.allclose(lhs, rhs, atol=1e-5)


def test_without_residual_the_prompt_is_low_rank() -> None:
    learner = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=2, residual=False, generator=_gen())
    local = learner()[0] - learner.global_ctx
    assert torch.linalg.matrix_rank(local.detach()) == 2


@pytest.mark.parametrize(
    ("learner", "shared", "personal", "transient"),
    [
        (CoOpPrompt(N_CTX, WIDTH, CLASSES), ["ctx"], [], []),
        (CoOpPrompt(N_CTX, WIDTH, CLASSES, shared=False), [], ["ctx"], []),
        (GlobalLocalPrompt(N_CTX, WIDTH, CLASSES), ["global_ctx"], ["local_ctx"], []),
        (GlobalLowRankPrompt(N_CTX, WIDTH, CLASSES, rank=2), ["global_ctx"],
         ["local_u", "local_v"], []),
        (DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=2), ["global_ctx"], ["local_ctx"],
         ["local_u", "local_v"]),
        (HierarchicalPrompt(N_CTX, WIDTH, CLASSES), ["domain_ctx"], ["class_ctx"], []),
    ],
)
def test_roles_partition_every_parameter(learner, shared, personal, transient) -> None:
    names = {n for n, _ in learner.named_parameters()}
    assert set(learner.roles) == names
    assert learner.names_with(TensorRole.SHARED) == shared
    assert learner.names_with(TensorRole.PERSONAL) == personal
    assert learner.names_with(TensorRole.TRANSIENT) == transient
    assert set(learner.shared_state()) == set(shared)
    assert set(learner.personal_state()) == set(personal)
    trainable = {id(p) for p in learner.trainable_parameters()}
    assert trainable == {id(getattr(learner, n)) for n in shared + personal}


def test_shared_and_personal_state_round_trip_and_only_move_their_part() -> None:
    a = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=2, generator=_gen(1))
    b = DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=2, generator=_gen(2))
    b_local = b.local_ctx.detach().clone()
    b.load_shared_state(a.shared_state())
    assert torch.equal(b.global_ctx, a.global_ctx)
    assert torch.equal(b.local_ctx, b_local)  # personal part untouched
    b.load_personal_state(a.personal_state())
    assert torch.equal(b.local_ctx, a.local_ctx)
    assert torch.equal(b(), a())


def test_loading_foreign_state_is_rejected_without_partial_update() -> None:
    learner = HierarchicalPrompt(N_CTX, WIDTH, CLASSES)
    before = learner.domain_ctx.detach().clone()
    with pytest.raises(PromptError, match="expects shared tensors"):
        learner.load_shared_state({"global_ctx": torch.zeros(N_CTX, WIDTH)})
    with pytest.raises(PromptError, match="shape"):
        learner.load_shared_state({"domain_ctx": torch.zeros(N_CTX + 1, WIDTH)})
    with pytest.raises(PromptError, match="non-finite"):
        learner.load_shared_state({"domain_ctx": torch.full((N_CTX, WIDTH), float("nan"))})
    assert torch.equal(learner.domain_ctx, before)


def test_rank_out_of_range() -> None:
    with pytest.raises(PromptError, match="prompt.rank must be between 1 and 8"):
        DPFPLPrompt(N_CTX, WIDTH, CLASSES, rank=9)
    with pytest.raises(PromptError, match="rank=0 is out of range"):
        GlobalLowRankPrompt(N_CTX, WIDTH, CLASSES, rank=0)


def test_hierarchical_gives_one_context_per_class() -> None:
    learner = HierarchicalPrompt(N_CTX, WIDTH, CLASSES)
    with torch.no_grad():
        learner.class_ctx[2] += 1.0
    ctx = learner()
    assert ctx.shape == (CLASSES, N_CTX, WIDTH)
    assert torch.equal(ctx[0], learner.domain_ctx)
    assert torch.equal(ctx[2], learner.domain_ctx + 1.0)


def test_text_init_and_mismatch(tiny_backbone: CLIPBackbone) -> None:
    config = PromptConfig(learner="coop", n_ctx=4, ctx_init="a photo of a")
    learner = build_prompt_learner(config, tiny_backbone, 3)
    assert torch.equal(learner.ctx, tiny_backbone.embed_text("a photo of a"))
    # CoOp's text init reproduces the hand-written prompt "a photo of a {class}."
    classifier = PromptedClassifier(tiny_backbone, learner, ["cat", "dog", "car"])
    batch = tiny_backbone.tokenizer(["a photo of a cat.", "a photo of a dog.",
                                     "a photo of a car."], padding=True, return_tensors="pt")
    ref = tiny_backbone.model.get_text_features(input_ids=batch["input_ids"]).pooler_output
    assert torch.allclose(classifier.text_features(),
                          torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    with pytest.raises(PromptError, match="set prompt.n_ctx=4"):
        build_prompt_learner(PromptConfig(n_ctx=16, ctx_init="a photo of a"), tiny_backbone, 3)


def test_every_learner_trains_through_the_backbone(tiny_backbone: CLIPBackbone) -> None:
    for name in ["coop", "global-local", "fedpgp", "dpfpl", "hierarchical"]:
        learner = build_prompt_learner(PromptConfig(learner=name, n_ctx=4, rank=2),
                                       tiny_backbone, 3, seed=0)
        classifier = PromptedClassifier(tiny_backbone, learner, ["cat", "dog", "car"])
        learner.prepare_step()
        logits = classifier(torch.randn(5, tiny_backbone.embed_dim, generator=_gen()))
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
        learner.finalize_gradients()
        for param in learner.trainable_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, param.shape)
