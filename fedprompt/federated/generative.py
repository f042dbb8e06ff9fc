"""A federated client's round on a generative backbone (LLaVA), independent of Flower.

:class:`GenerativeClientSession` is a :class:`~fedprompt.federated.client.ClientSession`
whose data are image + question + answer records (classification as generation, or a
JSONL question-answer set) and whose local step is
:class:`~fedprompt.training.generative.GenerativeTrainer` (or its DP-SGD twin). Everything
a round exchanges is unchanged: the learner of ``federation.method`` declares its shared,
personal and privatized tensors, the client replies with the update of the shared tensors
and the same metrics (``local-accuracy``, ``epsilon``, ...), and its personal state stays
in :class:`~fedprompt.federated.client.ClientState`. Strategies need no LLaVA case.

:func:`open_client_session` picks the session class from ``backbone.model``.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from fedprompt.backbones.llava import LlavaBackbone, is_llava_source
from fedprompt.config import RunConfig
from fedprompt.data import load_dataset, partition
from fedprompt.data.vqa import QASplits, as_label_splits, classification_qa, jsonl_qa
from fedprompt.errors import ConfigError
from fedprompt.federated.client import (
    ClientSession,
    ClientState,
    _key,
    cached_backbone,
)
from fedprompt.federated.methods import build_method_learner
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.noise import SecureRandom
from fedprompt.tasks.config import TaskConfig
from fedprompt.tasks.generative import EncodedQA, GenerativePromptModel, encode_qa
from fedprompt.training.generative import DPGenerativeTrainer, GenerativeTrainer
from fedprompt.training.trainer import LocalTrainer

_QA: dict[str, QASplits] = {}
_ENCODED: dict[tuple[str, str], tuple[EncodedQA, EncodedQA]] = {}


def task_config(config: RunConfig) -> TaskConfig:
    """The run's ``[task]`` section (defaults where the config has none)."""
    task = getattr(config, "task", None)
    return task if isinstance(task, TaskConfig) else TaskConfig()


def is_generative(config: RunConfig) -> bool:
    return is_llava_source(config.backbone.model)


def load_qa(config: RunConfig) -> QASplits:
    """Question-answer splits of a run: JSONL (``task.kind = "answer"``) or a labelled
    image set asked ``task.question`` (``"classify"``)."""
    task = task_config(config)
    data = config.data
    key = json.dumps([_key(data.model_copy(update={"num_clients": 1, "client": -1})),
                      task.kind, task.question])
    if key not in _QA:
        if task.kind == "answer":
            _QA[key] = jsonl_qa(data.dataset, data.seed, data.test_fraction)
        else:
            _QA[key] = classification_qa(load_dataset(data), task.question)
    return _QA[key]


def _encoded(config: RunConfig, backbone: LlavaBackbone, qa: QASplits) -> tuple[EncodedQA,
                                                                                EncodedQA]:
    task = task_config(config)
    key = (_key(config.backbone), json.dumps([
        _key(config.data.model_copy(update={"num_clients": 1, "client": -1})),
        task.kind, task.question]))
    if key not in _ENCODED:
        size = config.backbone.image_batch_size
        _ENCODED[key] = (encode_qa(backbone, qa.train, size, backbone.device),
                         encode_qa(backbone, qa.test, size, backbone.device))
    return _ENCODED[key]


def check_generative_data(config: RunConfig, partition_id: int, num_partitions: int, *,
                          encode: bool) -> None:
    """What :class:`GenerativeClientSession` does with its data, without the model: load
    the question-answer splits, take the partition and, with ``encode``, encode the
    images (cached, so the session then reuses them). Raises where a client would."""
    if getattr(config.data, "domains", None):
        raise ConfigError("data.domains is not supported with a LLaVA backbone yet: give "
                          "one data.dataset")
    qa = load_qa(config)
    data_config = config.data.model_copy(update={"num_clients": num_partitions})
    partition(as_label_splits(qa), data_config)[partition_id]
    if encode:
        backbone = cached_backbone(config.backbone)
        if not isinstance(backbone, LlavaBackbone):
            raise ConfigError(f"backbone.model={config.backbone.model!r} is not a LLaVA model")
        _encoded(config, backbone, qa)


class GenerativeClientSession(ClientSession):
    """One client of a run on a LLaVA backbone (see the module docstring)."""

    def __init__(self, config: RunConfig, partition_id: int, num_partitions: int,
                 client_id: int | None = None) -> None:
        if getattr(config.data, "domains", None):
            raise ConfigError("data.domains is not supported with a LLaVA backbone yet: give "
                              "one data.dataset")
        self.config = config
        self.partition_id = partition_id if client_id is None else client_id
        self.domain = 0
        self.task = task_config(config)
        backbone = cached_backbone(config.backbone)
        if not isinstance(backbone, LlavaBackbone):
            raise ConfigError(f"backbone.model={config.backbone.model!r} is not a LLaVA model")
        self.backbone = backbone  # type: ignore[assignment]
        self.qa = load_qa(config)
        data_config = config.data.model_copy(update={"num_clients": num_partitions})
        self.part = partition(as_label_splits(self.qa), data_config)[partition_id]
        train_all, test_all = _encoded(config, backbone, self.qa)
        self.train_data = train_all.select(self.part.train)
        self.local_data = test_all.select(self.part.local_test)
        self.neighbor_data = test_all.select(self.part.neighbor_test)
        # held out of training for hyperparameter search (data.validation_fraction > 0)
        self.val_data = (train_all.select(self.part.validation) if len(self.part.validation)
                         else None)
        # batches are index tensors into train_data (FeatureBatches / PoissonBatches)
        self.train_features = torch.arange(len(self.part.train))
        self.train_labels = self.train_data.labels.numpy()
        classnames = self.qa.classnames if self.task.kind == "classify" else []
        self.learner = build_method_learner(config, backbone,  # type: ignore[arg-type]
                                            max(1, len(classnames)))
        self.model = GenerativePromptModel(backbone, self.learner, self.task, classnames)
        self._record_initial_state()

    # -------------------------------------------------------------------- train
    # ClientSession.train drives the round (budget check, batches, state, update); only
    # the trainers differ. Batches are index tensors into ``train_data``, on the CPU.
    batch_device = "cpu"

    def _trainer(self, total_steps: int) -> LocalTrainer:
        return GenerativeTrainer(self.model, self.train_data, self.config.train, total_steps,
                                 chunk=self.config.privacy.per_sample_chunk)

    def _dp_trainer(self, total_steps: int, noise: float, accountant: Accountant,
                    noise_source: SecureRandom) -> LocalTrainer:
        privacy = self.config.privacy
        return DPGenerativeTrainer(
            self.model, self.train_data, self.config.train, total_steps,
            noise_multiplier=noise, clip_norm=privacy.clip_norm, sample_rate=self.sample_rate,
            expected_batch_size=self.sample_rate * self.num_examples,
            accountant=accountant, noise=noise_source, chunk=privacy.per_sample_chunk,
            private_names=self.dp_names(), clipping=privacy.clipping,
            clip_shares=privacy.clip_shares,
        )

    def export_task(self) -> tuple[dict[str, Any], list[str]]:
        return self.task.model_dump(mode="json"), list(self.model.classnames)

    # ----------------------------------------------------------------- evaluate
    def evaluate(self, shared: dict[str, torch.Tensor], state: ClientState | None
                 ) -> dict[str, float | int]:
        self._load(shared, state)
        batch = self.config.train.eval_batch_size
        local = self.model.evaluate(self.local_data, batch)
        metrics: dict[str, float | int] = {
            "partition-id": self.partition_id, "num-examples": int(local["samples"]),
            "local-accuracy": local["accuracy"], "local-loss": local["loss"],
        }
        for name in ("exact_match", "ranking_accuracy"):
            if name in local:
                metrics[f"local-{name.replace('_', '-')}"] = local[name]
        if len(self.neighbor_data):
            neighbor = self.model.evaluate(self.neighbor_data, batch)
            metrics |= {"neighbor-accuracy": neighbor["accuracy"],
                        "neighbor-loss": neighbor["loss"]}
            for name in ("exact_match", "ranking_accuracy"):
                if name in neighbor:
                    metrics[f"neighbor-{name.replace('_', '-')}"] = neighbor[name]
        if self.val_data is not None:
            val = self.model.evaluate(self.val_data, batch)
            metrics |= {"val-accuracy": val["accuracy"], "val-loss": val["loss"]}
            for name in ("exact_match", "ranking_accuracy"):
                if name in val:
                    metrics[f"val-{name.replace('_', '-')}"] = val[name]
        return metrics


def open_client_session(config: RunConfig, partition_id: int, num_partitions: int,
                        client_id: int | None = None) -> ClientSession:
    """The session for ``backbone.model``: generative (LLaVA) or dual encoder."""
    if is_generative(config):
        return GenerativeClientSession(config, partition_id, num_partitions, client_id)
    if task_config(config).kind != "classify":
        raise ConfigError(f"task.kind={task_config(config).kind!r} needs a generative backbone "
                          f"(llava-tiny, llava-small or a LLaVA checkpoint); "
                          f"{config.backbone.model!r} is a dual encoder")
    return ClientSession(config, partition_id, num_partitions, client_id)
