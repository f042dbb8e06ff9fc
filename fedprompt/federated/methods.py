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
from fedprompt.errors import ConfigError
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


def resolve_method(config: RunConfig) -> RunConfig:
    """``config`` with ``[prompt]`` set to what ``federation.method`` trains (its learner
    and residual flag), so that the configuration written next to a run's results says
    what ran. A ``[prompt]`` that contradicts the method is refused: a learner other than
    the method's (the default, ``coop``, is read as "not set"), or ``residual = false``
    with a DP-FPL method that keeps the residual."""
    method = config.federation.method
    spec = METHODS[method]
    prompt = config.prompt
    default_learner = PromptConfig.model_fields["learner"].default
    if prompt.learner not in (spec.learner, default_learner):
        users = sorted(m for m, s in METHODS.items() if s.learner == prompt.learner)
        hint = (f", or choose the method that trains it ({', '.join(users)})" if users
                else "")
        raise ConfigError(
            f"prompt.learner = {prompt.learner!r} contradicts federation.method = "
            f"{method!r}, which trains the {spec.learner!r} learner: remove prompt.learner "
            f"(a federated run takes its method's learner){hint}")
    if spec.learner == "dpfpl" and spec.residual and not prompt.residual:
        raise ConfigError(
            f"prompt.residual = false contradicts federation.method = {method!r}, which "
            "keeps DP-FPL's residual: use federation.method = 'dpfpl-no-residual'")
    return config.with_overrides({"prompt.learner": spec.learner,
                                  "prompt.residual": spec.residual},
                                 source=f"federation.method = {method!r}")


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
