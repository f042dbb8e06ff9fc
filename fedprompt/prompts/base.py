"""What every prompt learner is: trainable context tensors with declared roles.

A learner's ``forward()`` returns the context to place in the class prompts:
``[1, n_ctx, width]`` (one context shared by all classes) or ``[C, n_ctx, width]`` (one
per class). Each of its parameters has a :class:`TensorRole`:

* ``SHARED``: leaves the client (averaged globally, or within a cluster);
* ``PERSONAL``: never leaves the client; persisted in the client's own state;
* ``TRANSIENT``: recomputed from personal state at every step (the low-rank carriers
  ``u``, ``v`` of DP-FPL); never stored and never sent, but differentiated (and so
  privatized) in place of the tensor they carry.

Federation code only ever calls :meth:`PromptLearner.shared_state`,
:meth:`PromptLearner.personal_state` and their ``load_*`` twins, so it never needs to
know a method's internals. Training code calls :meth:`prepare_step` before the forward
pass and :meth:`finalize_gradients` after backward (both no-ops except where a learner
re-parametrizes, as DP-FPL does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import StrEnum

import torch
from torch import Tensor, nn

from fedprompt.errors import PromptError


class TensorRole(StrEnum):
    SHARED = "shared"
    PERSONAL = "personal"
    TRANSIENT = "transient"


class PromptLearner(nn.Module, ABC):
    """Base class of prompt learners."""

    #: registered name of the learner (the ``prompt.learner`` config value)
    kind: str = ""

    def __init__(self, n_ctx: int, ctx_dim: int, num_classes: int) -> None:
        super().__init__()
        if n_ctx < 1:
            raise PromptError(f"n_ctx={n_ctx}: a prompt needs at least one context token")
        if num_classes < 1:
            raise PromptError("a prompt learner needs at least one class")
        self.n_ctx = n_ctx
        self.ctx_dim = ctx_dim
        self.num_classes = num_classes
        self._roles: dict[str, TensorRole] = {}

    # ------------------------------------------------------------------ roles
    def register_role(self, name: str, role: TensorRole) -> None:
        if not isinstance(getattr(self, name, None), nn.Parameter):
            raise PromptError(f"{type(self).__name__} has no parameter {name!r}")
        self._roles[name] = TensorRole(role)

    @property
    def roles(self) -> dict[str, TensorRole]:
        """Role of every parameter, by name."""
        return dict(self._roles)

    def names_with(self, role: TensorRole) -> list[str]:
        return [name for name, r in self._roles.items() if r is role]

    def shared_state(self) -> dict[str, Tensor]:
        """Copies of the tensors this learner may send."""
        return {n: getattr(self, n).detach().clone() for n in self.names_with(TensorRole.SHARED)}

    def personal_state(self) -> dict[str, Tensor]:
        """Copies of the tensors that must stay on the client."""
        return {
            n: getattr(self, n).detach().clone() for n in self.names_with(TensorRole.PERSONAL)
        }

    def load_shared_state(self, state: Mapping[str, Tensor]) -> None:
        self._load(state, TensorRole.SHARED)

    def load_personal_state(self, state: Mapping[str, Tensor]) -> None:
        self._load(state, TensorRole.PERSONAL)

    def _load(self, state: Mapping[str, Tensor], role: TensorRole) -> None:
        expected = self.names_with(role)
        if set(state) != set(expected):
            raise PromptError(
                f"{self.kind} learner expects {role.value} tensors {sorted(expected)}, got "
                f"{sorted(state)}: the state was saved by a different learner or settings"
            )
        checked = {}
        for name in expected:
            param = getattr(self, name)
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != tuple(param.shape):
                raise PromptError(
                    f"{role.value} tensor {name!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(param.shape)} (n_ctx, width, rank or number of classes differ)"
                )
            if not torch.isfinite(value).all():
                raise PromptError(f"{role.value} tensor {name!r} has non-finite values")
            checked[name] = value
        with torch.no_grad():
            for name, value in checked.items():
                getattr(self, name).copy_(value.to(getattr(self, name)))
        self.after_load()

    def after_load(self) -> None:
        """Hook: recompute derived tensors after new state was loaded."""

    def gradient_names(self) -> list[str]:
        """Tensors the forward pass differentiates (that receive data gradients). Default:
        the trainable ones; a re-parametrizing learner (DP-FPL) names its carriers."""
        return [n for n, r in self._roles.items()
                if r in (TensorRole.SHARED, TensorRole.PERSONAL)]

    def local_dp_names(self) -> list[str]:
        """Tensors that get per-sample clipping and noise under local DP: every tensor the
        forward pass differentiates, clipped **jointly**. Every tensor the client trains
        is then a function of noisy gradients only, so one record-level epsilon covers its
        update, its personal prompt and anything exported from them."""
        return self.gradient_names()

    def nominal_dp_names(self) -> list[str]:
        """The tensors the papers noise for this kind of prompt (DP-FPL's layout: the
        personal part only). The others would be trained with plain gradients and feed
        the noised steps, so this layout carries **no valid guarantee**: it exists only
        for ``privacy.mode = "nominal"`` (comparison with the papers' tables)."""
        return self.names_with(TensorRole.PERSONAL)

    # --------------------------------------------------------------- training
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps: shared and personal tensors (not transient ones)."""
        return [
            getattr(self, n)
            for n, r in self._roles.items()
            if r in (TensorRole.SHARED, TensorRole.PERSONAL)
        ]

    def prepare_step(self) -> None:
        """Hook called before each training forward pass."""

    def finalize_gradients(self) -> None:
        """Hook called after backward, before the optimizer step."""

    @abstractmethod
    def forward(self) -> Tensor:
        """Context ``[1 | num_classes, n_ctx, ctx_dim]``."""


def init_context(n_ctx: int, ctx_dim: int, std: float, generator: torch.Generator,
                 init_embeddings: Tensor | None = None) -> Tensor:
    """Random ``N(0, std^2)`` context, or the given token embeddings (text init)."""
    if init_embeddings is not None:
        if tuple(init_embeddings.shape) != (n_ctx, ctx_dim):
            raise PromptError(
                f"context init text gives {init_embeddings.shape[0]} tokens but n_ctx={n_ctx}: "
                f"set prompt.n_ctx={init_embeddings.shape[0]} or change prompt.ctx_init"
            )
        return init_embeddings.detach().clone().float().cpu()
    return torch.randn(n_ctx, ctx_dim, generator=generator) * std
