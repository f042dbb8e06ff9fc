"""CoOp: one learned context shared by all classes (Zhou et al., IJCV 2022)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedprompt.prompts.base import PromptLearner, TensorRole, init_context


class CoOpPrompt(PromptLearner):
    """``[SOS] ctx_1 .. ctx_n {class} . [EOS]`` with one context for every class.

    Args:
        shared: the context is ``SHARED`` (PromptFL averages it) or, for local-only
            training, ``PERSONAL``.
        init_embeddings: token embeddings to start from (text init), else random.
    """

    kind = "coop"

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, *, init_std: float = 0.02,
                 init_embeddings: Tensor | None = None, shared: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes)
        gen = generator or torch.Generator().manual_seed(0)
        self.ctx = nn.Parameter(init_context(n_ctx, ctx_dim, init_std, gen, init_embeddings))
        self.register_role("ctx", TensorRole.SHARED if shared else TensorRole.PERSONAL)

    def nominal_dp_names(self) -> list[str]:
        # PromptFL privatized the whole prompt; local-only CoOp privatizes its only tensor.
        return ["ctx"]

    def forward(self) -> Tensor:
        return self.ctx.unsqueeze(0)
