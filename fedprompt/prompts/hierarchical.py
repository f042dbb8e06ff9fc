"""SecFPP's hierarchical prompt: domain-level part + class-level part.

``P_i[c] = domain_ctx + class_ctx[c]``: the domain-level context captures coarse
cross-domain differences and is shared only inside the client's cluster; the class-level
contexts (one per class) capture fine label differences and never leave the client.
The class-level part starts at zero, so training starts from the domain prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedprompt.prompts.base import PromptLearner, TensorRole, init_context


class HierarchicalPrompt(PromptLearner):
    kind = "hierarchical"

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, *, init_std: float = 0.02,
                 init_embeddings: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes)
        gen = generator or torch.Generator().manual_seed(0)
        self.domain_ctx = nn.Parameter(
            init_context(n_ctx, ctx_dim, init_std, gen, init_embeddings)
        )
        self.class_ctx = nn.Parameter(torch.zeros(num_classes, n_ctx, ctx_dim))
        self.register_role("domain_ctx", TensorRole.SHARED)
        self.register_role("class_ctx", TensorRole.PERSONAL)

    def forward(self) -> Tensor:
        return self.domain_ctx.unsqueeze(0) + self.class_ctx
