"""Exact per-sample gradients of prompt tensors from per-sample context gradients.

For a generative backbone every sample's loss depends on the learner's tensors only
through the context ``ctx = f(theta)`` (``[K, n_ctx, d]``), and samples never interact.
:meth:`~fedprompt.tasks.generative.GenerativePromptModel.context_gradients` gives
``G_i = dL_i/dctx`` for every sample with one backward pass (each sample reads its own
copy of the context). Then, by the chain rule,

    dL_i/dtheta = J_f(theta)^T G_i

is one vector-Jacobian product of the learner's (cheap, small) parametrisation per
sample, batched with ``is_grads_batched`` (vmap). For DP-FPL's ``p_G + u v + r`` that is
``grad_pG_i = G_i``, ``grad_u_i = G_i v^T`` and ``grad_v_i = u^T G_i``; for CoOp it is
``G_i`` itself. The language model runs once forward and once backward per step, whatever
the method and whichever tensors are privatized.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def chain_to_parameters(ctx: Tensor, per_sample_ctx_grads: Tensor,
                        private: list[nn.Parameter], public: list[nn.Parameter]
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """Per-sample gradients ``[B, *p.shape]`` of ``private`` and batch-mean gradients of
    ``public``, from ``G`` ``[B, *ctx.shape]`` and the learner output ``ctx`` (with its
    graph to the parameters)."""
    batch = per_sample_ctx_grads.shape[0]
    per_sample: list[Tensor] = []
    if private:
        if batch == 0:
            per_sample = [torch.zeros(0, *p.shape, device=p.device) for p in private]
        else:
            grads = torch.autograd.grad(ctx, private, grad_outputs=per_sample_ctx_grads,
                                        is_grads_batched=True, retain_graph=True,
                                        allow_unused=True)
            # autograd may hand the same tensor to two inputs of a sum (p_G + p_L): Opacus
            # marks per-sample tensors as processed one by one, so each gets its own
            per_sample, seen = [], set()
            for g, p in zip(grads, private, strict=True):
                if g is None:
                    g = torch.zeros(batch, *p.shape, device=p.device)
                elif id(g) in seen:
                    g = g.clone()
                seen.add(id(g))
                per_sample.append(g)
    public_grads: list[Tensor] = []
    if public:
        if batch == 0:
            public_grads = [torch.zeros_like(p) for p in public]
        else:
            grads = torch.autograd.grad(ctx, public, grad_outputs=per_sample_ctx_grads.mean(0),
                                        retain_graph=True, allow_unused=True)
            public_grads = [g if g is not None else torch.zeros_like(p)
                            for g, p in zip(grads, public, strict=True)]
    return per_sample, public_grads
