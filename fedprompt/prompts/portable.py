"""Portable trained prompts: one folder, safetensors for tensors, JSON for what they are.

Layout (format ``fedprompt.prompt``, version 1; the spec is in docs/llava.md)::

    <folder>/prompt.safetensors   every tensor of the learner by name (shared, personal and
                                  transient parts) and ``context``: the learner's output
                                  [K, n_ctx, ctx_dim] (K = 1, or one per class), which is
                                  all a consumer without fedprompt's learner classes needs.
                                  Its header metadata repeats prompt.json (self-contained).
    <folder>/prompt.json          metadata: format and version, backbone identity (kind,
                                  source, config hash, weights hash/fingerprint, ctx_dim),
                                  learner (kind, n_ctx, options, each tensor's role, shape,
                                  dtype), task, class names, privacy spent (epsilon, delta,
                                  accountant, which tensors were privatized), a description
                                  of the training data, and the SHA-256 of the tensor file.

Loading into a backbone whose config hash (or weights) differ from the recorded ones
raises :class:`PromptCompatibilityError`: a soft prompt only means something in the
embedding space of the exact model it was trained in. The same format serves CLIP-style
dual encoders and LLaVA (the Minion bridge loads its local worker's prompt from it).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import fedprompt
from fedprompt.atomic import replace_folder
from fedprompt.errors import PromptError
from fedprompt.prompts.base import PromptLearner, TensorRole

FORMAT = "fedprompt.prompt"
FORMAT_VERSION = 1
TENSORS_FILE = "prompt.safetensors"
METADATA_FILE = "prompt.json"
CONTEXT_KEY = "context"
_HEADER_KEY = "fedprompt_metadata"


class PromptCompatibilityError(PromptError):
    """A portable prompt does not fit the backbone (or learner) it is loaded into."""


def _learner_options(learner: PromptLearner) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name in ("rank", "residual"):
        if hasattr(learner, name):
            options[name] = getattr(learner, name)
    return options


def backbone_identity(backbone: Any) -> dict[str, Any]:
    identity = dict(backbone.identity())
    identity["ctx_dim"] = int(backbone.ctx_dim)
    return identity


def export_prompt(folder: str | Path, learner: PromptLearner, backbone: Any, *,
                  include_personal: bool = True, task: dict[str, Any] | None = None,
                  classnames: list[str] | None = None,
                  privacy: dict[str, Any] | None = None, data_description: str = "",
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``learner``'s tensors and metadata to ``folder`` (created if needed).

    Args:
        include_personal: also write the personal and transient tensors and the full
            context (a client exporting its personalized prompt). ``False`` writes only the
            shared tensors (e.g. a server's global prompt); the context is then omitted,
            because it would contain the personal part.
        task: how the prompt is used (LLaVA: the ``[task]`` section; CLIP: the template).
        privacy: what was spent: ``epsilon``, ``delta``, ``accountant``, ``mode``
            (``None``: trained without DP; recorded as such).
        data_description: free text about the training data (name, size, split).
    """
    out = Path(folder).expanduser()
    roles = learner.roles
    keep = [n for n, r in roles.items() if include_personal or r is TensorRole.SHARED]
    tensors = {n: getattr(learner, n).detach().float().cpu().clone() for n in keep}
    if include_personal:
        with torch.no_grad():
            was_training = learner.training
            learner.eval()
            tensors[CONTEXT_KEY] = learner().detach().float().cpu().clone()
            learner.train(was_training)
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fedprompt_version": fedprompt.__version__,
        "backbone": backbone_identity(backbone),
        "prompt": {
            "learner": learner.kind,
            "n_ctx": learner.n_ctx,
            "ctx_dim": learner.ctx_dim,
            "num_classes": learner.num_classes,
            "options": _learner_options(learner),
            "tensors": {n: {"role": roles[n].value, "shape": list(tensors[n].shape),
                            "dtype": "float32"} for n in keep},
            "context_shape": list(tensors[CONTEXT_KEY].shape) if include_personal else None,
            "personal": [n for n in keep if roles[n] is TensorRole.PERSONAL],
            "shared": [n for n in keep if roles[n] is TensorRole.SHARED],
            "includes_personal": include_personal,
        },
        "task": task or {},
        "classnames": list(classnames or []),
        "privacy": privacy if privacy is not None else {"epsilon": None, "delta": None,
                                                        "note": "trained without DP"},
        "data": {"description": data_description},
        "extra": extra or {},
    }

    def fill(folder: Path) -> None:
        tensor_path = folder / TENSORS_FILE
        save_file(tensors, str(tensor_path), metadata={
            "format": FORMAT, "format_version": str(FORMAT_VERSION),
            _HEADER_KEY: json.dumps(metadata, sort_keys=True),
        })
        metadata["tensors_sha256"] = _sha256(tensor_path)
        (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True)
                                            + "\n")

    # tensors and metadata replace the previous export together (a client re-exports every
    # round; a reader never sees new tensors with old metadata)
    return replace_folder(out, fill)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PortablePrompt:
    """A loaded prompt: its metadata and tensors (float32, CPU)."""

    metadata: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def context(self) -> Tensor:
        """The trained context ``[K, n_ctx, ctx_dim]``."""
        if CONTEXT_KEY not in self.tensors:
            raise PromptError("this prompt was exported without its personal parts, so it "
                              "carries no full context; export with include_personal=True")
        return self.tensors[CONTEXT_KEY]

    def check_backbone(self, backbone: Any, check_weights: bool = True) -> None:
        """Raise :class:`PromptCompatibilityError` unless ``backbone`` is the model the
        prompt was trained for (same config hash and width; same weights unless
        ``check_weights=False``)."""
        check_compatible(self.metadata, backbone, check_weights)

    def build_learner(self, backbone: Any, check_weights: bool = True) -> PromptLearner:
        """A learner of the recorded kind holding exactly the exported tensors (its forward
        gives the exported context), on the backbone's device."""
        from fedprompt.prompts import (
            CoOpPrompt,
            DPFPLPrompt,
            GlobalLocalPrompt,
            GlobalLowRankPrompt,
            HierarchicalPrompt,
        )

        self.check_backbone(backbone, check_weights)
        prompt = self.metadata["prompt"]
        kind, n_ctx, width, classes = (prompt["learner"], prompt["n_ctx"], prompt["ctx_dim"],
                                       prompt["num_classes"])
        options = prompt["options"]
        learner: PromptLearner
        if kind == "coop":
            shared = prompt["tensors"].get("ctx", {}).get("role") == "shared"
            learner = CoOpPrompt(n_ctx, width, classes, shared=shared)
        elif kind == "global-local":
            learner = GlobalLocalPrompt(n_ctx, width, classes)
        elif kind == "fedpgp":
            learner = GlobalLowRankPrompt(n_ctx, width, classes, rank=options["rank"])
        elif kind == "dpfpl":
            learner = DPFPLPrompt(n_ctx, width, classes, rank=options["rank"],
                                  residual=options["residual"])
        elif kind == "hierarchical":
            learner = HierarchicalPrompt(n_ctx, width, classes)
        else:
            raise PromptCompatibilityError(f"unknown learner kind {kind!r} in the prompt file")
        learner.load_shared_state({n: self.tensors[n] for n in learner.names_with(
            TensorRole.SHARED)})
        personal = learner.names_with(TensorRole.PERSONAL)
        if personal:
            missing = [n for n in personal if n not in self.tensors]
            if missing:
                raise PromptError(f"the prompt file has no personal tensors {missing} (it was "
                                  "exported with include_personal=False): only its shared "
                                  "part can be used; load it with load_shared_state")
            learner.load_personal_state({n: self.tensors[n] for n in personal})
        with torch.no_grad():  # transient carriers as exported (exact forward round trip)
            for name in learner.names_with(TensorRole.TRANSIENT):
                if name in self.tensors:
                    getattr(learner, name).copy_(self.tensors[name])
        return learner.to(backbone.device)


def check_compatible(metadata: dict[str, Any], backbone: Any, check_weights: bool = True
                     ) -> None:
    recorded = metadata["backbone"]
    current = backbone_identity(backbone)
    where = f"trained for {recorded.get('kind')} {recorded.get('source')!r}"
    if recorded.get("kind") != current.get("kind"):
        raise PromptCompatibilityError(
            f"this prompt was {where}, but the backbone is a {current.get('kind')} model "
            f"({current.get('source')!r}): load it into the backbone it was trained for")
    if recorded.get("config_sha256") != current.get("config_sha256"):
        raise PromptCompatibilityError(
            f"this prompt was {where} (config sha256 {recorded.get('config_sha256', '')[:12]}) "
            f"but the backbone {current.get('source')!r} has a different configuration "
            f"(config sha256 {current.get('config_sha256', '')[:12]}): a soft prompt only "
            "works in the embedding space of the exact model it was trained in")
    if int(recorded.get("ctx_dim", -1)) != current["ctx_dim"]:
        raise PromptCompatibilityError(
            f"the prompt's context width {recorded.get('ctx_dim')} differs from the "
            f"backbone's {current['ctx_dim']}")
    if check_weights:
        for key in ("weights_sha256", "weights_fingerprint"):
            if key in recorded and key in current and recorded[key] != current[key]:
                raise PromptCompatibilityError(
                    f"this prompt was {where}, whose weights differ from this backbone's "
                    f"({key} {recorded[key][:16]} vs {current[key][:16]}): same architecture, "
                    "other weights (another seed or a fine-tune). Pass check_weights=False "
                    "to load it anyway")


def load_prompt(folder: str | Path, backbone: Any = None, check_weights: bool = True
                ) -> PortablePrompt:
    """Read a prompt folder (or its ``prompt.safetensors``); with ``backbone``, also check
    that it fits (see :func:`check_compatible`)."""
    path = Path(folder).expanduser()
    tensor_path = path if path.is_file() else path / TENSORS_FILE
    if not tensor_path.is_file():
        raise PromptError(f"no {TENSORS_FILE} at {path}: give the folder export_prompt wrote")
    with safe_open(str(tensor_path), framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if header.get("format") != FORMAT or _HEADER_KEY not in header:
        raise PromptError(f"{tensor_path} is not a fedprompt prompt file (format "
                          f"{header.get('format')!r})")
    version = int(header.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise PromptError(f"{tensor_path} has format version {version}; this fedprompt reads "
                          f"up to {FORMAT_VERSION}: upgrade fedprompt")
    metadata = json.loads(header[_HEADER_KEY])
    meta_path = tensor_path.parent / METADATA_FILE
    if meta_path.is_file():
        sidecar = json.loads(meta_path.read_text())
        digest = _sha256(tensor_path)
        if sidecar.get("tensors_sha256") != digest:
            raise PromptError(f"{tensor_path} does not match {meta_path} (SHA-256 "
                              f"{digest[:12]} vs {str(sidecar.get('tensors_sha256'))[:12]}): "
                              "the files were changed or mixed up")
        metadata = sidecar
    for name, spec in metadata["prompt"]["tensors"].items():
        if name not in tensors or list(tensors[name].shape) != spec["shape"]:
            raise PromptError(f"tensor {name!r} is missing or has the wrong shape in "
                              f"{tensor_path}")
        if not torch.isfinite(tensors[name]).all():
            raise PromptError(f"tensor {name!r} in {tensor_path} has non-finite values")
    prompt = PortablePrompt(metadata, tensors)
    if backbone is not None:
        prompt.check_backbone(backbone, check_weights)
    return prompt
