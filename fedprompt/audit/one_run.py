"""The one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023) of a client's record-level DP.

``audit.canaries`` canary records are each inserted into the client's training set with
probability 1/2 (the auditor's randomness, independent of the training's); the client is
trained once, exactly as it trains in the federation
(:func:`~fedprompt.audit.training.train_like_client`); every canary is scored from the
released prompt, and the guesses on the most confident ones give an epsilon lower bound
(:func:`~fedprompt.audit.bounds.best_bound`) that is compared with the accountant's epsilon
of that same training. A bound above the accountant's epsilon means the guarantee does not
hold: a bug to fix.

Canaries (``audit.canary_kind``) are image *features*: the image tower is frozen and
public, and the client's DP mechanism takes the feature as its record, so a feature
chosen freely is a valid record for the mechanism (the bound audits the mechanism, which
is what the accountant's epsilon claims about):

* ``random-feature``: a random direction of the feature space, scaled to the mean norm
  of the client's features, with a random label. Nothing else in the data resembles it,
  so its pull on the prompt is the most distinguishable an input can make;
* ``mislabelled``: a real held-out image of the data set (not one of the client's test
  records) with a wrong label.

Two scores, both higher for canaries the prompt was trained on:

* ``loss``: the canary's loss under the initial (public, seeded) prompt minus its loss
  under the released one;
* ``prompt-vector``: :func:`~fedprompt.audit.scores.embedding_shift`, the prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedprompt.audit.bounds import Guesses, RocSummary, best_bound, roc_summary
from fedprompt.audit.scores import embedding_shift, logits_under, losses
from fedprompt.audit.training import STREAM_BASE, TrainedPrompt, train_like_client
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError
from fedprompt.federated.client import ClientSession, cached_features


@dataclass
class OneRunAudit:
    canaries: int
    inserted: int
    trained: TrainedPrompt
    best: Guesses
    choices: list[Guesses]
    separation: dict[str, RocSummary]  # AUC etc. of each score, canaries in vs out
    scores: dict[str, np.ndarray]
    included: np.ndarray


def make_canaries(config: RunConfig, session: ClientSession,
                  rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    """``audit.canaries`` canary records (features, labels) of ``audit.canary_kind``."""
    audit = config.audit
    num_classes = len(session.splits.classnames)
    reference = session.train_features.float()
    if audit.canary_kind == "random-feature":
        directions = torch.as_tensor(rng.standard_normal((audit.canaries, reference.shape[1])),
                                     dtype=torch.float32)
        scale = float(reference.norm(dim=1).mean())
        features = torch.nn.functional.normalize(directions, dim=1) * scale
        labels = rng.integers(0, num_classes, audit.canaries)
        return features.to(reference.dtype), labels
    # mislabelled: held-out images that are not the client's own test records
    _, test_all = cached_features(session.config, session.backbone, session.splits)
    pool = np.setdiff1d(np.arange(len(session.splits.test.labels)), session.part.local_test)
    if len(pool) < audit.canaries or num_classes < 2:
        raise ConfigError(
            f"audit.canary_kind = 'mislabelled' needs {audit.canaries} held-out images outside "
            f"client {audit.client}'s test records and at least 2 classes; the data set has "
            f"{len(pool)}: lower audit.canaries or use canary_kind = 'random-feature'")
    chosen = rng.choice(pool, size=audit.canaries, replace=False)
    true = np.asarray(session.splits.test.labels)[chosen]
    labels = (true + rng.integers(1, num_classes, audit.canaries)) % num_classes
    return test_all[torch.as_tensor(chosen)].to(reference.dtype), labels


def run_one_run(config: RunConfig, session: ClientSession, initial: Tensor) -> OneRunAudit:
    """Insert canaries into client ``audit.client``'s data, train once, bound epsilon."""
    audit = config.audit
    rng = np.random.default_rng([audit.seed, 0x0E1])
    features, labels = make_canaries(config, session, rng)
    included = rng.random(audit.canaries) < 0.5
    keep = torch.as_tensor(np.flatnonzero(included))
    train_features = torch.cat([session.train_features.cpu(),
                                features[keep].to(session.train_features.dtype)])
    train_labels = np.concatenate([np.asarray(session.train_labels), labels[included]])
    trained = train_like_client(config, audit.client, train_features, train_labels,
                                stream=STREAM_BASE)
    classifier = session.classifier
    before = losses(logits_under(classifier, initial, features), labels)
    after = losses(logits_under(classifier, trained.context, features), labels)
    scores = {
        "loss": before - after,
        "prompt-vector": embedding_shift(classifier, trained.context, initial, features,
                                         labels),
    }
    best, choices = best_bound(scores, included, audit.guess_fractions, config.privacy.delta,
                               audit.confidence, seed=audit.seed)
    separation = ({name: roc_summary(values, included)[0] for name, values in scores.items()}
                  if 0 < included.sum() < len(included) else {})
    return OneRunAudit(audit.canaries, int(included.sum()), trained, best, choices,
                       separation, scores, included)
