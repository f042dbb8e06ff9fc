"""Membership inference against a client's released prompt.

Members are the client's training records, non-members its held-out test records (same
classes, same distribution; at most as many as the members, drawn at random). The attacker
has the public backbone and the released prompt (DP-FPL's "prompt as a service") and
trains ``audit.shadows`` shadow prompts exactly like the client
(:func:`~fedprompt.audit.training.train_like_client`), each on a random subset of the
pooled members and non-members **of the client's own size** (so a shadow's sampling rate,
noise and steps are the client's), so that every record is "in" some shadows and "out" of
others (the online setting of Carlini et al.; with as many non-members as members a
record is in half of the shadows). Four attacks:

* ``loss``: the target's loss on the record, lower = member (Yeom et al.); no shadows;
* ``lira``: the likelihood-ratio attack (Carlini et al., S&P 2022): per record, Gaussians
  fitted to the shadows' in and out confidences ``log p_y - log(1 - p_y)`` (pooled
  variances, as they advise for few shadows), score = log-likelihood ratio;
* ``shadow-mlp``: DP-FPL's attacker (Shokri et al.): a two-layer MLP trained on the
  shadows' sorted output vectors labelled in/out, applied to the target's;
* ``prompt-vector``: the prompt alone, no queried outputs
  (:func:`~fedprompt.audit.scores.embedding_shift`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from fedprompt.audit.bounds import RocSummary, roc_summary
from fedprompt.audit.scores import (
    attack_features,
    confidence,
    embedding_shift,
    logits_under,
    losses,
)
from fedprompt.audit.training import STREAM_BASE, train_like_client
from fedprompt.config import RunConfig
from fedprompt.federated.client import ClientSession


@dataclass
class AttackResult:
    name: str
    summary: RocSummary
    fpr: np.ndarray
    tpr: np.ndarray


@dataclass
class MembershipAudit:
    attacks: list[AttackResult]
    shadows: int
    shadow_epsilon: float | None  # record-level epsilon of one shadow's training


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """Online LiRA with pooled variances. ``target[i]``: the target's confidence on record
    ``i``; ``shadow[s, i]``: shadow ``s``'s; ``shadow_in[s, i]``: whether ``i`` was in
    shadow ``s``'s training set. A record never in (or never out of) a shadow falls back
    to the mean over all records."""
    shadow_in = shadow_in.astype(bool)
    n_in = shadow_in.sum(axis=0)
    n_out = (~shadow_in).sum(axis=0)
    global_in = shadow[shadow_in].mean() if shadow_in.any() else shadow.mean()
    global_out = shadow[~shadow_in].mean() if (~shadow_in).any() else shadow.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (shadow * shadow_in).sum(axis=0) / np.maximum(n_in, 1),
                         global_in)
        mu_out = np.where(n_out > 0, (shadow * ~shadow_in).sum(axis=0) / np.maximum(n_out, 1),
                          global_out)
    resid_in = (shadow - mu_in)[shadow_in]
    resid_out = (shadow - mu_out)[~shadow_in]
    sd_in = max(float(resid_in.std()) if resid_in.size > 1 else 1.0, 1e-6)
    sd_out = max(float(resid_out.std()) if resid_out.size > 1 else 1.0, 1e-6)
    return (stats.norm.logpdf(target, mu_in, sd_in)
            - stats.norm.logpdf(target, mu_out, sd_out))


def mlp_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
               seed: int) -> np.ndarray:
    """DP-FPL's attack model: standardized features, an MLP with two hidden layers of 64,
    trained on the shadows' outputs; returns P(member) for ``test_x``."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=(64, 64), max_iter=400, random_state=seed))
    model.fit(train_x, train_y.astype(int))
    return model.predict_proba(test_x)[:, 1]


def run_membership(config: RunConfig, session: ClientSession, target: Tensor,
                   initial: Tensor, on_shadow: Callable[[int], None] | None = None
                   ) -> MembershipAudit:
    """Attack ``target`` (the client's released context) on ``session``'s training vs
    held-out test records, with ``audit.shadows`` shadows trained like the client."""
    audit = config.audit
    test_features, test_labels = session.local_test
    if len(test_labels) == 0:
        raise ValueError(f"client {audit.client} has no held-out test records to serve as "
                         "non-members: give it more data or raise data.test_fraction")
    rng = np.random.default_rng([audit.seed, 0xA0D1])
    members = len(session.train_labels)
    chosen = torch.as_tensor(rng.permutation(len(test_labels))[:members])
    features = torch.cat([session.train_features.cpu(), test_features.cpu()[chosen]])
    labels = np.concatenate([np.asarray(session.train_labels),
                             np.asarray(test_labels)[chosen.numpy()]])
    member = np.zeros(len(labels), dtype=bool)
    member[:members] = True
    classifier = session.classifier

    # each shadow trains on a random subset of the client's own size
    shadow_in = np.zeros((audit.shadows, len(labels)), dtype=bool)
    for s in range(audit.shadows):
        shadow_in[s, rng.choice(len(labels), size=members, replace=False)] = True
    shadow_conf = np.zeros(shadow_in.shape)
    shadow_feats = []
    shadow_epsilon = None
    for s in range(audit.shadows):
        mask = shadow_in[s]
        trained = train_like_client(config, audit.client, features[mask], labels[mask],
                                    stream=STREAM_BASE + 1 + s)
        shadow_epsilon = trained.epsilon
        logits = logits_under(classifier, trained.context, features)
        shadow_conf[s] = confidence(logits, labels)
        shadow_feats.append(attack_features(logits, labels))
        if on_shadow is not None:
            on_shadow(s)

    target_logits = logits_under(classifier, target, features)
    scores = {
        "loss": -losses(target_logits, labels),
        "lira": lira_scores(confidence(target_logits, labels), shadow_conf, shadow_in),
        "shadow-mlp": mlp_scores(np.concatenate(shadow_feats), shadow_in.reshape(-1),
                                 attack_features(target_logits, labels), audit.seed),
        "prompt-vector": embedding_shift(classifier, target, initial, features, labels),
    }
    results = []
    for name, values in scores.items():
        summary, fpr, tpr = roc_summary(values, member)
        results.append(AttackResult(name, summary, fpr, tpr))
    return MembershipAudit(results, audit.shadows, shadow_epsilon)
