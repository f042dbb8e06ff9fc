"""The federated methods, one config key each (``federation.method``).

A method is a prompt learner plus what it shares; the learner itself declares which of
its tensors are shared, personal, and privatized under local DP, so the client and server
code never look inside a method.

| method | learner | shared | local DP on (joint clipping) | paper's (nominal) layout |
|---|---|---|---|---|
| local-only | CoOp, context personal | nothing | the context | the context |
| promptfl | CoOp | the context (FedAvg) | the context | the context |
| fedpgp | global + u v (u, v trained directly) | global | global, u, v | u, v |
| dpfpl | global + u v + r, re-factorized every step | global | global, u, v | u, v |
| dpfpl-no-residual | global + u v | global | global, u, v | u, v |
| dpfpl-full-rank | global + full-rank local | global | global, local | local |
| secfpp | domain + class level (SecFPP) | domain prompt, in its cluster | domain, class | class |

Local DP always clips and noises every tensor the client trains, jointly; the papers'
layout (noise on the personal part only) is used only by ``privacy.mode = "nominal"``
(:func:`local_dp_names`), whose outputs carry no valid guarantee.

``secfpp`` is *clustered*: the server keeps one domain-level prompt per cluster of
clients (:mod:`fedprompt.federated.clustered`) and clusters the clients with the
``[clustering]`` backend; the class-level prompts (one per class of the client's domain)
are personal and never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.backbones.base import VisionLanguageBackbone
from fedprompt.config import PromptConfig, RunConfig
from fedprompt.prompts import PromptLearner, build_prompt_learner


@dataclass(frozen=True)
class MethodSpec:
    name: str
    learner: str
    residual: bool = True
    shares: bool = True
    clustered: bool = False  # shared tensors are averaged within clusters of clients


METHODS: dict[str, MethodSpec] = {
    "local-only": MethodSpec("local-only", "coop", shares=False),
    "promptfl": MethodSpec("promptfl", "coop"),
    "fedpgp": MethodSpec("fedpgp", "fedpgp"),
    "dpfpl": MethodSpec("dpfpl", "dpfpl"),
    "dpfpl-no-residual": MethodSpec("dpfpl-no-residual", "dpfpl", residual=False),
    "dpfpl-full-rank": MethodSpec("dpfpl-full-rank", "global-local"),
    "secfpp": MethodSpec("secfpp", "hierarchical", clustered=True),
}


def method_prompt_config(config: RunConfig) -> PromptConfig:
    """``[prompt]`` with the learner and residual flag the method fixes."""
    spec = METHODS[config.federation.method]
    return config.prompt.model_copy(update={"learner": spec.learner,
                                            "residual": spec.residual})


def local_dp_names(config: RunConfig, learner: PromptLearner) -> list[str]:
    """The tensors a client privatizes under local DP: all it trains (jointly clipped),
    or, in ``privacy.mode = "nominal"`` only, the papers' layout."""
    if config.privacy.mode == "nominal":
        return learner.nominal_dp_names()
    return learner.local_dp_names()


def build_method_learner(config: RunConfig, backbone: VisionLanguageBackbone,
                         num_classes: int) -> PromptLearner:
    """The learner of ``federation.method``, initialised from the run seed (so the server
    and every client start from the same shared tensors)."""
    spec = METHODS[config.federation.method]
    return build_prompt_learner(method_prompt_config(config), backbone, num_classes,
                                seed=config.seed, share_context=spec.shares)
