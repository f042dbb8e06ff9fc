"""Prompt learners: CoOp context, global + low-rank + residual (DP-FPL), domain + class
levels (SecFPP). Each declares which tensors are shared and which are personal."""

from __future__ import annotations

import torch

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.config import PromptConfig
from fedprompt.prompts.base import PromptLearner, TensorRole
from fedprompt.prompts.coop import CoOpPrompt
from fedprompt.prompts.hierarchical import HierarchicalPrompt
from fedprompt.prompts.personalized import DPFPLPrompt, GlobalLocalPrompt, GlobalLowRankPrompt

__all__ = [
    "CoOpPrompt",
    "DPFPLPrompt",
    "GlobalLocalPrompt",
    "GlobalLowRankPrompt",
    "HierarchicalPrompt",
    "PromptLearner",
    "TensorRole",
    "build_prompt_learner",
]


def build_prompt_learner(config: PromptConfig, backbone: VisionLanguageBackbone,
                         num_classes: int, seed: int = 0,
                         share_context: bool = True) -> PromptLearner:
    """The learner a run's ``[prompt]`` section asks for, on the backbone's device.
    ``share_context=False`` makes CoOp's context personal (local-only training)."""
    generator = torch.Generator().manual_seed(seed)
    init = backbone.embed_text(config.ctx_init).cpu() if config.ctx_init else None
    common = dict(init_std=config.init_std, init_embeddings=init, generator=generator)
    n_ctx, width = config.n_ctx, backbone.ctx_dim
    learner: PromptLearner
    if config.learner == "coop":
        learner = CoOpPrompt(n_ctx, width, num_classes, shared=share_context, **common)
    elif config.learner == "global-local":
        learner = GlobalLocalPrompt(n_ctx, width, num_classes, **common)
    elif config.learner == "fedpgp":
        learner = GlobalLowRankPrompt(n_ctx, width, num_classes, rank=config.rank, **common)
    elif config.learner == "dpfpl":
        learner = DPFPLPrompt(n_ctx, width, num_classes, rank=config.rank,
                              residual=config.residual, **common)
    elif config.learner == "hierarchical":
        learner = HierarchicalPrompt(n_ctx, width, num_classes, **common)
    else:  # the config schema already restricts the names
        raise AssertionError(config.learner)
    return learner.to(backbone.device)
