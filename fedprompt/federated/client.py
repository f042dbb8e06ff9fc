"""What a federated client does in a round, independent of Flower.

:class:`ClientSession` holds one client's data partition, cached image features and
prompt learner. :meth:`ClientSession.train` loads the shared tensors the server sent and
the client's persistent :class:`ClientState` (personal tensors, optimizer and schedule
state, privacy accountant, random generator states), trains for
``federation.local_epochs`` (DP-SGD where configured), and returns the update of the
shared tensors, metrics, and the new state. Nothing personal leaves in the update.

Heavy objects (backbone, data set, image features) are cached per process and shared by
all clients a process serves (the in-process runner, Ray actors).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedprompt.backbones import VisionLanguageBackbone, build_backbone
from fedprompt.config import BackboneConfig, DataConfig, RunConfig
from fedprompt.data import FeatureBatches, FeatureCache, load_dataset, partition
from fedprompt.data.datasets import DataSplits
from fedprompt.data.domains import domain_slot
from fedprompt.data.features import default_cache_dir
from fedprompt.data.partition import ClientPartition
from fedprompt.errors import FedPromptError
from fedprompt.federated.cluster_backends import (
    ClusteringRequest,
    PromptTrace,
    seal_submission,
)
from fedprompt.federated.methods import build_method_learner, local_dp_names
from fedprompt.privacy.accounting import (
    Accountant,
    calibrate_noise,
    nominal_noise_multiplier,
)
from fedprompt.privacy.coverage import covered_reply_metrics, export_privacy
from fedprompt.privacy.dp_sgd import DPLocalTrainer, PoissonBatches, poisson_plan
from fedprompt.privacy.ledger import PrivacyLedger
from fedprompt.privacy.noise import SecureRandom
from fedprompt.prompts import TensorRole
from fedprompt.prompts.portable import export_prompt
from fedprompt.seeding import batch_seed
from fedprompt.training.model import PromptedClassifier
from fedprompt.training.trainer import LocalTrainer

_BACKBONES: dict[str, VisionLanguageBackbone] = {}
_SPLITS: dict[str, DataSplits] = {}
_FEATURES: dict[tuple[str, str], Tensor] = {}
_PARTITIONS: dict[str, tuple[DataSplits, list[ClientPartition]]] = {}


def _key(model: Any) -> str:
    return json.dumps(model.model_dump(mode="json"), sort_keys=True)


def cached_backbone(config: BackboneConfig) -> VisionLanguageBackbone:
    key = _key(config)
    if key not in _BACKBONES:
        _BACKBONES[key] = build_backbone(config)
    return _BACKBONES[key]


def cached_splits(config: DataConfig) -> DataSplits:
    relevant = config.model_copy(update={"num_clients": 1, "client": -1})
    key = _key(relevant)
    if key not in _SPLITS:
        _SPLITS[key] = load_dataset(config)
    return _SPLITS[key]


def cached_partitions(splits: DataSplits, config: DataConfig,
                      num_partitions: int) -> list[ClientPartition]:
    """Every client's partition of ``splits`` (those of ``config``) into
    ``num_partitions``, computed once per data set and client count."""
    data = config.model_copy(update={"num_clients": num_partitions})
    key = _key(data.model_copy(update={"client": -1}))
    cached = _PARTITIONS.get(key)
    if cached is None or cached[0] is not splits:
        cached = _PARTITIONS[key] = (splits, partition(splits, data))
    return cached[1]


def client_data(config: RunConfig, partition_id: int, num_partitions: int) -> tuple[
    RunConfig, DataSplits, ClientPartition, int
]:
    """What partition ``partition_id`` of ``num_partitions`` trains on: the run's config
    for its data (with ``data.domains``: its domain's), the data set's splits, its
    partition and its domain (0 without domains). Raises
    :class:`~fedprompt.errors.DataError` where the data cannot give it one."""
    domain = 0
    if config.data.domains:  # multi-domain: this client's domain and partition in it
        slot = domain_slot(config.data, partition_id, num_partitions)
        config = config.model_copy(update={"data": slot.data})
        partition_id, num_partitions, domain = (slot.partition_id, slot.num_partitions,
                                                slot.domain)
    splits = cached_splits(config.data)
    return config, splits, cached_partitions(splits, config.data, num_partitions)[
        partition_id], domain


def cached_features(config: RunConfig, backbone: VisionLanguageBackbone,
                    splits: DataSplits) -> tuple[Tensor, Tensor]:
    key = (_key(config.backbone), _key(config.data.model_copy(update={"num_clients": 1})))
    if key not in _FEATURES:
        cache_dir = (Path(config.data.cache_dir).expanduser() if config.data.cache_dir
                     else default_cache_dir()) if config.data.feature_cache else None
        cache = FeatureCache(backbone, cache_dir, config.backbone.image_batch_size)
        _FEATURES[key] = (cache.get(splits.train), cache.get(splits.test))
    return _FEATURES[key]


@dataclass
class ClientState:
    """Everything a client keeps between rounds; never sent to the server."""

    personal: dict[str, Tensor] = field(default_factory=dict)
    optimizer: bytes = b""  # optimizer + LR schedule state (torch.save)
    accountant: str = ""  # accountant history (JSON)
    generator: bytes = b""  # DP noise stream state (reproducible streams only)
    learner_rng: bytes = b""  # the learner's own generator (DP-FPL's power method)
    batch_rng: str = ""  # batch-order generator / Poisson-sampling stream state (JSON)
    rounds_trained: int = 0
    first_update: bytes = b""  # shared-tensor change of the first round (clustering input)
    last_round: int = 0  # the last server round trained; a message for it or before is refused


class RoundRefused(FedPromptError):
    """A train message the client will not train (nothing is trained, saved or sent)."""


class RoundAlreadyTrained(RoundRefused):
    """The message's round is not after the last round the client trained (a replayed,
    duplicated or out-of-order message)."""


class StaleMessage(RoundRefused):
    """The message expired: the server stopped waiting for its round."""


def check_round(state: ClientState | None, server_round: int) -> None:
    """Refuse a round at or before the last one ``state`` trained (or a round < 1)."""
    if server_round < 1:
        raise RoundAlreadyTrained(f"train message for round {server_round}: rounds start at "
                                  "1 (the message carries no valid server-round)")
    last = state.last_round if state is not None else 0
    if server_round <= last:
        raise RoundAlreadyTrained(
            f"refusing to train round {server_round}: this client already trained round "
            f"{last} (a replayed or out-of-order message; nothing was trained or sent)")


def check_fresh(server_round: int, deadline: float | None, *, finished: bool = False) -> None:
    """Refuse a message past ``deadline`` (UNIX time), at the start or, with
    ``finished``, at the end of training."""
    if deadline is None:
        return
    late = time.time() - deadline
    if late > 0:
        when = ("finished training" if finished else "received the message")
        raise StaleMessage(
            f"refusing round {server_round}: the client {when} {late:.1f} s after the "
            "message expired (the server no longer waits for this round); "
            + ("the update is discarded and nothing is sent" if finished
               else "nothing was trained or sent"))


@dataclass
class TrainOutcome:
    update: dict[str, Tensor]
    metrics: dict[str, float | int]
    state: ClientState
    declined_reason: str = ""
    submission: bytes = b""  # sealed clustering submission, when the server asked for one


class ClientSession:
    """One client's data, features and learner: partition ``partition_id`` of
    ``num_partitions`` of ``data.dataset``. ``client_id`` (default: the partition id)
    names the client in metrics and seeds its random streams; a site with its own data
    folder uses partition 0 of 1 under its own client id. With ``data.domains`` the client
    first picks its domain (:mod:`fedprompt.data.domains`) and is then partitioned within
    it; ``self.config`` is then the domain's configuration."""

    def __init__(self, config: RunConfig, partition_id: int, num_partitions: int,
                 client_id: int | None = None) -> None:
        self.partition_id = partition_id if client_id is None else client_id
        config, self.splits, self.part, self.domain = client_data(config, partition_id,
                                                                  num_partitions)
        self.config = config
        self.backbone = cached_backbone(config.backbone)
        # from here on, partition_id names the client (metrics, seeds)
        train_all, test_all = cached_features(config, self.backbone, self.splits)
        self.train_features = train_all[torch.as_tensor(self.part.train)]
        self.train_labels = self.splits.train.labels[self.part.train]
        self.local_test = (test_all[torch.as_tensor(self.part.local_test)],
                           self.splits.test.labels[self.part.local_test])
        self.neighbor_test = (test_all[torch.as_tensor(self.part.neighbor_test)],
                              self.splits.test.labels[self.part.neighbor_test])
        # held out of training for hyperparameter search (empty unless
        # data.validation_fraction > 0)
        self.validation = (train_all[torch.as_tensor(self.part.validation)],
                           self.splits.train.labels[self.part.validation])
        self.learner = build_method_learner(config, self.backbone, len(self.splits.classnames))
        self.classifier = PromptedClassifier(self.backbone, self.learner,
                                             self.splits.classnames)
        self._record_initial_state()

    def _record_initial_state(self) -> None:
        """What a client starts from before its first round (the learner and the training
        labels must exist): initial prompt parts, learner stream, sampling plan."""
        self.initial_personal = self.learner.personal_state()
        self.initial_shared = {k: v.cpu() for k, v in self.learner.shared_state().items()}
        rng = getattr(self.learner, "generator", None)
        # the learner's own stream (DP-FPL's power method) starts where initialisation left
        # it, exactly as in a one-site run
        self.initial_learner_rng = (_dump(rng.get_state()) if isinstance(rng, torch.Generator)
                                    else b"")
        self._plan()

    def _plan(self) -> None:
        """The Poisson sampling plan for the current training set (its size is public)."""
        self.sample_rate, self.steps_per_epoch = poisson_plan(len(self.train_labels),
                                                              self.config.train.batch_size)

    def use_training_set(self, features: Tensor, labels: Any) -> None:
        """Train on these examples instead of the partition's (the privacy audit inserts
        canaries and trains shadow models on other subsets); the sampling plan and the
        noise calibration follow the new size, as they would for a client holding them."""
        labels = np.asarray(labels)
        if len(features) != len(labels) or len(labels) == 0:
            raise ValueError(f"a training set needs as many labels as features and at least "
                             f"one example (got {len(features)} and {len(labels)})")
        self.train_features = features
        self.train_labels = labels
        self._plan()

    def context(self, shared: dict[str, Tensor], state: ClientState | None) -> Tensor:
        """The context ``[K, n_ctx, width]`` of this client's prompt with the server's
        ``shared`` tensors and its ``state``: what an export of that state releases."""
        self._load(shared, state)
        with torch.no_grad():
            return self.learner().detach().clone()

    # ------------------------------------------------------------------ helpers
    @property
    def num_examples(self) -> int:
        return len(self.train_labels)

    @property
    def round_steps(self) -> int:
        return self.config.federation.local_epochs * self.steps_per_epoch

    @property
    def planned_steps(self) -> int:
        return self.config.federation.rounds * self.round_steps

    @property
    def local_dp(self) -> bool:
        privacy = self.config.privacy
        return privacy.mode != "off" and privacy.local

    def local_noise_multiplier(self) -> float:
        privacy = self.config.privacy
        if privacy.mode == "noise-multiplier":
            return privacy.local_noise_multiplier
        if privacy.mode == "nominal":
            return nominal_noise_multiplier(privacy.epsilon, privacy.delta,
                                            self.config.federation.rounds)
        return calibrate_noise(privacy.epsilon, privacy.delta, self.sample_rate,
                               self.planned_steps, privacy.accountant)

    def _load(self, shared: dict[str, Tensor], state: ClientState | None) -> ClientState:
        state = state or ClientState(personal=self.initial_personal)
        if self.learner.names_with(TensorRole.SHARED):
            self.learner.load_shared_state(shared)
        self.learner.load_personal_state(state.personal or self.initial_personal)
        learner_rng = getattr(self.learner, "generator", None)
        if isinstance(learner_rng, torch.Generator):
            # DP-FPL's power method draws from the client's own stream across rounds, so
            # results do not depend on which process served earlier messages.
            learner_rng.set_state(_load_tensor(state.learner_rng or self.initial_learner_rng))
        return state

    def _dp_random(self, saved: str, purpose: str) -> SecureRandom:
        """The DP randomness (noise, Poisson sampling) of this client: a CSPRNG stream
        keyed from the OS, or, where noise must be reproducible, a stream keyed by the run
        seed that continues across rounds from ``saved``."""
        if saved:
            return SecureRandom.from_state(saved)
        if self.config.privacy.reproducible_noise:
            return SecureRandom.from_seed(self.config.seed, purpose, self.partition_id)
        return SecureRandom()

    # -------------------------------------------------------------------- train
    @property
    def batch_device(self) -> torch.device | str:
        """Where training batches live (cached features: on the backbone's device)."""
        return self.backbone.device

    def _trainer(self, total_steps: int) -> LocalTrainer:
        """The non-private local trainer (subclasses with another model override it)."""
        return LocalTrainer(self.classifier, self.config.train, total_steps)

    def dp_names(self) -> list[str]:
        """The tensors local DP clips (jointly) and noises: every tensor this client
        trains, except in the labelled nominal mode (the papers' layout)."""
        return local_dp_names(self.config, self.learner)

    def _dp_trainer(self, total_steps: int, noise: float, accountant: Accountant,
                    noise_source: SecureRandom) -> LocalTrainer:
        """The DP-SGD local trainer (subclasses with another model override it)."""
        privacy = self.config.privacy
        return DPLocalTrainer(
            self.classifier, self.config.train, total_steps, noise_multiplier=noise,
            clip_norm=privacy.clip_norm, sample_rate=self.sample_rate,
            expected_batch_size=self.sample_rate * self.num_examples,
            accountant=accountant, noise=noise_source, chunk=privacy.per_sample_chunk,
            private_names=self.dp_names(), clipping=privacy.clipping,
            clip_shares=privacy.clip_shares,
        )

    def train(self, shared: dict[str, Tensor], state: ClientState | None,
              server_round: int, clustering: ClusteringRequest | None = None,
              deadline: float | None = None) -> TrainOutcome:
        """One round of local training. With ``clustering`` (a clustering round of a
        clustered method) the outcome also carries the client's sealed submission.

        Refused with :class:`RoundRefused` (nothing trained, nothing to save or send) when
        ``server_round`` is not after ``state.last_round`` (:class:`RoundAlreadyTrained`)
        or when the message is stale: past ``deadline`` (UNIX time at which the message
        expires, i.e. when the server stops waiting for the round) at the start or at the
        end of training (:class:`StaleMessage`)."""
        config = self.config
        check_round(state, server_round)
        check_fresh(server_round, deadline)
        state = self._load(shared, state)
        received = {k: v.detach().clone() for k, v in self.learner.shared_state().items()}
        accountant = (Accountant.from_json(state.accountant) if state.accountant
                      else Accountant(config.privacy.accountant))
        metrics: dict[str, float | int] = {
            "partition-id": self.partition_id, "num-examples": self.num_examples,
            "server-round": server_round,
        }
        total_steps = self.planned_steps
        noise_source = self._dp_random(state.generator.decode(), "noise")
        device = self.batch_device
        if self.local_dp:
            noise = self.local_noise_multiplier()
            budget_check = config.privacy.mode != "nominal"
            projected = accountant.epsilon_after(noise, self.sample_rate, self.round_steps,
                                                 config.privacy.delta)
            metrics |= {"noise-multiplier": noise, "sample-rate": self.sample_rate}
            if budget_check and projected > config.privacy.epsilon * (1 + 1e-6):
                reason = (f"privacy budget spent: epsilon would reach {projected:.4f} > "
                          f"{config.privacy.epsilon} after this round; declining to train")
                metrics |= {"declined": 1, "epsilon": accountant.epsilon(config.privacy.delta),
                            "steps": 0}
                return TrainOutcome({}, metrics, state, reason)
            trainer = self._dp_trainer(total_steps, noise, accountant, noise_source)
            sampling = self._dp_random(state.batch_rng, "sampling")
            batches: Any = PoissonBatches(self.train_features, self.train_labels,
                                          self.sample_rate, self.steps_per_epoch,
                                          rng=sampling, device=device)
        else:
            trainer = self._trainer(total_steps)
            batches = FeatureBatches(self.train_features, self.train_labels,
                                     config.train.batch_size, shuffle=True,
                                     seed=batch_seed(config.seed, self.partition_id),
                                     device=device)
            if state.batch_rng:  # batch order continues across rounds, as epochs do
                batches.rng.bit_generator.state = json.loads(state.batch_rng)
        if state.optimizer:
            trainer.load_state_dict(torch.load(io.BytesIO(state.optimizer), weights_only=True))
        learner_rng = getattr(self.learner, "generator", None)
        loss_sum, correct, samples = 0.0, 0, 0
        for _ in range(config.federation.local_epochs):
            stats = trainer.train_epoch(batches)
            loss_sum += stats.loss * stats.samples if stats.samples else 0.0
            correct += round(stats.accuracy * stats.samples) if stats.samples else 0
            samples += stats.samples
        trained = {k: v.detach().cpu() for k, v in self.learner.shared_state().items()}
        start = {k: v.cpu() for k, v in received.items()}
        update = {k: v - start[k] for k, v in trained.items()}
        first_update = (_load_tensor(state.first_update) if state.first_update
                        else update)
        submission = b""
        if clustering is not None:
            trace = PromptTrace(self.initial_shared, start, trained, first_update)
            submission = seal_submission(config, clustering, trace)
        new_state = ClientState(
            personal={k: v.cpu() for k, v in self.learner.personal_state().items()},
            optimizer=_dump(trainer.state_dict()),
            accountant=accountant.to_json(),
            generator=noise_source.state().encode(),
            learner_rng=_dump(learner_rng.get_state())
            if isinstance(learner_rng, torch.Generator) else b"",
            batch_rng=(batches.rng.state() if isinstance(batches, PoissonBatches)
                       else json.dumps(batches.rng.bit_generator.state)),
            rounds_trained=state.rounds_trained + 1,
            last_round=server_round,
            first_update=state.first_update or (_dump(update) if update else b""),
        )
        metrics |= {
            "declined": 0, "steps": trainer.steps_taken,
            "train-loss": loss_sum / samples if samples else float("nan"),
            "train-accuracy": correct / samples if samples else float("nan"),
            "epsilon": accountant.epsilon(config.privacy.delta) if self.local_dp else -1.0,
        }
        if self.local_dp and config.privacy.mode == "nominal":
            metrics["nominal-epsilon"] = config.privacy.epsilon
        check_fresh(server_round, deadline, finished=True)
        # under DP the reply carries only what an epsilon covers or what is public
        metrics = covered_reply_metrics(metrics, config.privacy)
        return TrainOutcome(update, metrics, new_state, submission=submission)

    # ----------------------------------------------------------------- evaluate
    def evaluate(self, shared: dict[str, Tensor], state: ClientState | None) -> dict[
        str, float | int
    ]:
        self._load(shared, state)
        trainer = LocalTrainer(self.classifier, self.config.train, 1)
        batch = self.config.train.eval_batch_size
        device = self.backbone.device
        local = trainer.evaluate(FeatureBatches(*self.local_test, batch, shuffle=False,
                                                device=device))
        metrics: dict[str, float | int] = {
            "partition-id": self.partition_id, "num-examples": local.samples,
            "local-accuracy": local.accuracy, "local-loss": local.loss,
        }
        if len(self.neighbor_test[1]):
            neighbor = trainer.evaluate(FeatureBatches(*self.neighbor_test, batch,
                                                       shuffle=False, device=device))
            metrics |= {"neighbor-accuracy": neighbor.accuracy,
                        "neighbor-loss": neighbor.loss}
        if len(self.validation[1]):
            val = trainer.evaluate(FeatureBatches(*self.validation, batch, shuffle=False,
                                                  device=device))
            metrics |= {"val-accuracy": val.accuracy, "val-loss": val.loss}
        return metrics

    # ------------------------------------------------------------------- export
    def export_task(self) -> tuple[dict[str, Any], list[str]]:
        """The ``task`` block and class names of this client's exported prompt."""
        return {}, list(self.splits.classnames)

    def export(self, folder: Path, shared: dict[str, Tensor], state: ClientState,
               ledger: PrivacyLedger, server_epsilon: float | None = None) -> Path:
        """Write this client's personalized prompt in the portable format: the shared part
        **as the server released it** (``shared``, never the client's local copy) plus its
        personal part, with the guarantee that covers it
        (:func:`~fedprompt.privacy.coverage.export_privacy`: record-level from ``ledger``,
        user-level as the server reported it)."""
        self._load(shared, state)
        learner = self.learner
        privacy = export_privacy(
            self.config.privacy, party=ledger.party, record_epsilon=ledger.epsilon,
            steps=ledger.steps, dp_tensors=self.dp_names(),
            shared=learner.names_with(TensorRole.SHARED),
            personal=learner.names_with(TensorRole.PERSONAL),
            server_epsilon=server_epsilon)
        task, classnames = self.export_task()
        return export_prompt(
            folder, learner, self.backbone, task=task, classnames=classnames, privacy=privacy,
            data_description=f"client {self.partition_id}: {self.num_examples} training "
            f"examples of {self.config.data.dataset} (federated method "
            f"{self.config.federation.method}, {state.rounds_trained} rounds trained)")


def _dump(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load_tensor(data: bytes) -> Tensor:
    return torch.load(io.BytesIO(data), weights_only=True)
