"""Personalized prompts ``p_i = p_G + local_i`` (global part shared, local part personal).

* :class:`GlobalLocalPrompt`: full-rank local part (FedOTP without transport; DP-FPL's
  "full-rank local" ablation).
* :class:`GlobalLowRankPrompt`: FedPGP-style, ``local = u v`` with ``u``, ``v`` trained
  directly (the factorization is fixed at initialisation).
* :class:`DPFPLPrompt`: DP-FPL, ``local = u v + r`` where the full-rank local prompt is
  re-factorized at every step by the one-step power method, gradients are taken on the
  low-rank carriers ``u``, ``v`` and the full-rank gradient is rebuilt with Eq. 4. Under
  local DP the carriers and the global part are clipped jointly and noised; DP-FPL's paper
  noised the carriers only (``nominal_dp_names``), which leaves the global part un-noised.
  With ``residual=False`` (the paper's ablation) the forward pass uses ``u v`` only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fedprompt.errors import PromptError
from fedprompt.prompts.base import PromptLearner, TensorRole, init_context
from fedprompt.prompts.lowrank import power_factorize, reconstruct_full_gradient


class _GlobalPlusLocal(PromptLearner):
    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, init_std: float,
                 init_embeddings: Tensor | None, generator: torch.Generator | None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.init_std = init_std
        self.global_ctx = nn.Parameter(
            init_context(n_ctx, ctx_dim, init_std, self.generator, init_embeddings)
        )
        self.register_role("global_ctx", TensorRole.SHARED)

    def _check_rank(self, rank: int) -> None:
        if not 1 <= rank <= min(self.n_ctx, self.ctx_dim):
            raise PromptError(
                f"rank={rank} is out of range: the local prompt is {self.n_ctx}x{self.ctx_dim}, "
                f"so prompt.rank must be between 1 and {min(self.n_ctx, self.ctx_dim)}"
            )


class GlobalLocalPrompt(_GlobalPlusLocal):
    """``p_G + p_L`` with a full-rank personal ``p_L``."""

    kind = "global-local"

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, *, init_std: float = 0.02,
                 init_embeddings: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes, init_std, init_embeddings, generator)
        self.local_ctx = nn.Parameter(init_context(n_ctx, ctx_dim, init_std, self.generator))
        self.register_role("local_ctx", TensorRole.PERSONAL)

    def forward(self) -> Tensor:
        return (self.global_ctx + self.local_ctx).unsqueeze(0)


class GlobalLowRankPrompt(_GlobalPlusLocal):
    """FedPGP-style ``p_G + u v`` with personal ``u`` ``[n_ctx, k]``, ``v`` ``[k, width]``."""

    kind = "fedpgp"

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, *, rank: int = 8,
                 init_std: float = 0.02, init_embeddings: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes, init_std, init_embeddings, generator)
        self._check_rank(rank)
        self.rank = rank
        self.local_u = nn.Parameter(torch.randn(n_ctx, rank, generator=self.generator) * init_std)
        self.local_v = nn.Parameter(
            torch.randn(rank, ctx_dim, generator=self.generator) * init_std
        )
        self.register_role("local_u", TensorRole.PERSONAL)
        self.register_role("local_v", TensorRole.PERSONAL)

    def forward(self) -> Tensor:
        return (self.global_ctx + self.local_u @ self.local_v).unsqueeze(0)


class DPFPLPrompt(_GlobalPlusLocal):
    """DP-FPL's ``p_G + u v + r`` with per-step re-factorization of the local prompt.

    Tensors: ``global_ctx`` (shared), ``local_ctx`` (the full-rank personal prompt
    ``p_L``), ``local_u``/``local_v`` (transient carriers, re-computed from ``p_L`` by
    :meth:`prepare_step`). The forward value is exactly ``p_G + p_L`` (with the
    residual) while gradients flow only into ``u`` and ``v``; :meth:`finalize_gradients`
    turns them into ``p_L``'s gradient (Eq. 4). Noise for local DP is added to the
    carriers' (and ``p_G``'s) gradients between backward and :meth:`finalize_gradients`.
    """

    kind = "dpfpl"

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int, *, rank: int = 8,
                 residual: bool = True, init_std: float = 0.02,
                 init_embeddings: Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(n_ctx, ctx_dim, num_classes, init_std, init_embeddings, generator)
        self._check_rank(rank)
        self.rank = rank
        self.residual = residual
        self.local_ctx = nn.Parameter(init_context(n_ctx, ctx_dim, init_std, self.generator))
        self.local_u = nn.Parameter(torch.zeros(n_ctx, rank))
        self.local_v = nn.Parameter(torch.zeros(rank, ctx_dim))
        self.register_role("local_ctx", TensorRole.PERSONAL)
        self.register_role("local_u", TensorRole.TRANSIENT)
        self.register_role("local_v", TensorRole.TRANSIENT)
        self.refactorize()

    def refactorize(self) -> None:
        """``u, v <- power_factorize(p_L)``; clears their gradients."""
        u, v = power_factorize(self.local_ctx, self.rank, self.generator)
        with torch.no_grad():
            self.local_u.copy_(u)
            self.local_v.copy_(v)
        self.local_u.grad = None
        self.local_v.grad = None

    def gradient_names(self) -> list[str]:
        # the forward pass reads p_L only through the carriers u, v (and the detached
        # residual), so they receive its data gradients
        return ["global_ctx", "local_u", "local_v"]

    def nominal_dp_names(self) -> list[str]:
        # DP-FPL's paper adds local noise to the low-rank carriers only (never to the
        # residual or the global prompt)
        return ["local_u", "local_v"]

    def residual_ctx(self) -> Tensor:
        """``r = p_L - u v`` (never noised; excluded from gradient reconstruction)."""
        return (self.local_ctx - self.local_u @ self.local_v).detach()

    def local_prompt(self) -> Tensor:
        uv = self.local_u @ self.local_v
        if not self.residual:
            return uv
        # Value exactly p_L (uv - uv.detach() is exactly zero); gradient only to u and v.
        return self.local_ctx.detach() + (uv - uv.detach())

    def forward(self) -> Tensor:
        return (self.global_ctx + self.local_prompt()).unsqueeze(0)

    def prepare_step(self) -> None:
        self.refactorize()

    def finalize_gradients(self) -> None:
        if self.local_u.grad is None or self.local_v.grad is None:
            return
        full = reconstruct_full_gradient(
            self.local_u.detach(), self.local_v.detach(), self.local_u.grad, self.local_v.grad
        )
        self.local_ctx.grad = full if self.local_ctx.grad is None else self.local_ctx.grad + full

    def after_load(self) -> None:
        self.refactorize()
