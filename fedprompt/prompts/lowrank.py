"""Low-rank reparametrization of a full-rank matrix (RGP, Yu et al. 2021; DP-FPL Eq. 4).

A full-rank local prompt ``W`` (``n_ctx x width``) is written ``W = u v + r`` with ``u``
(``n_ctx x k``, orthonormal columns) and ``v`` (``k x width``, orthonormal rows) found by
the one-step power method, and the residual ``r = W - u v``. Gradients are taken with
respect to the small factors ``u`` and ``v`` (where DP-FPL adds its local noise) and the
full-rank gradient is rebuilt from them (DP-FPL Eq. 4):

    grad_W = grad_u v + u grad_v - u u^T grad_u v

With orthonormal ``u`` and ``v`` this is the orthogonal projection of the true gradient
``G`` onto the tangent space ``{u A + B v}``: ``grad_u = G v^T`` and ``grad_v = u^T G``
give ``G v^T v + u u^T G - u u^T G v^T v``. When ``k = n_ctx`` (``u u^T = I``) it equals
``G`` exactly.

DP-FPL's public code differs in two places that we do not copy: it returns ``... + u u^T
grad_u v`` (a plus where the paper's Eq. 4 has a minus) and divides both factor gradients
by 10 (undocumented). We follow the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor


def orthonormal_columns(matrix: Tensor) -> Tensor:
    """An orthonormal basis of the column space (reduced QR, stable where Gram-Schmidt is
    not)."""
    q, _ = torch.linalg.qr(matrix, mode="reduced")
    return q


def power_factorize(weight: Tensor, rank: int,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One-step power method: ``u`` ``[m, k]`` and ``v`` ``[k, n]``, both orthonormal.

    ``v0 ~ N(0, 1)^{n x k}``; ``u = orth(W v0)``; ``v = orth(W^T u)^T``. ``u v`` spans the
    dominant rank-k subspace that one power iteration finds; the remainder goes to the
    residual ``W - u v``.
    """
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is out of range for a {m}x{n} matrix (1..{min(m, n)})")
    with torch.no_grad():
        w = weight.detach().float()
        v0 = torch.randn(n, rank, generator=generator, device="cpu").to(w.device)
        u = orthonormal_columns(w @ v0)
        v = orthonormal_columns(w.T @ u).T
    return u.to(weight.dtype), v.to(weight.dtype).contiguous()


def reconstruct_full_gradient(u: Tensor, v: Tensor, grad_u: Tensor, grad_v: Tensor) -> Tensor:
    """DP-FPL Eq. 4: ``grad_u v + u grad_v - u u^T grad_u v`` (shape of ``u v``)."""
    grad_u_v = grad_u @ v
    return grad_u_v + u @ grad_v - u @ (u.T @ grad_u_v)


def tangent_projection(grad: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """``G v^T v + u u^T G - u u^T G v^T v``: what Eq. 4 returns for a full gradient ``G``."""
    gvv = grad @ v.T @ v
    return gvv + u @ (u.T @ grad) - u @ (u.T @ gvv)
