"""Statistics of an audit: ROC figures of a membership attack, and the one-run epsilon lower
bound of Steinke, Nasr and Jagielski ("Privacy Auditing with One (1) Training Run",
NeurIPS 2023).

**The one-run bound.** ``m`` canaries are each inserted into the training set with
probability 1/2, independently; after one training run the auditor scores every canary,
guesses "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest, and
abstains on the rest (``r = k_in + k_out`` guesses). If the training run is
``(epsilon, delta)``-DP, the number ``W`` of correct guesses satisfies (their Theorem 3.1
and Proposition 5.2)::

    P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= B < v] / i

with ``q = e^eps / (1 + e^eps)`` and ``B ~ Binomial(r, q)``. An ``epsilon`` whose p-value at
the observed ``v`` is below ``1 - confidence`` is rejected; the lower bound is the largest
rejected epsilon (the p-value grows with epsilon, so bisection finds it). We write this
from the paper's statement (the formula is a few lines of scipy; the maintained
implementation, ``jax_privacy.auditing``, would pull in JAX).

Choosing the number of guesses or the score after looking at the results would void the
confidence, so :func:`best_bound` takes a fixed list of (score, fraction) choices and
applies a Bonferroni correction: each choice is tested at ``(1 - confidence) / choices``,
so the maximum over all of them still holds with the stated confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under an ``(epsilon, delta)``-DP training run, of at least ``v``
    correct guesses out of ``r`` among ``m`` canaries (Steinke et al., Prop. 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(special.expit(epsilon))  # accuracy of epsilon-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))
    slack = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        # P[v - i <= B < v] for i = 1..v, divided by i
        below = np.cumsum(stats.binom.pmf(v - i, r, q)) / i
        slack = 2.0 * m * delta * float(below.max())
    return min(1.0, tail + slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float,
                        iterations: int = 40) -> float:
    """The largest epsilon rejected at ``1 - confidence`` by :func:`one_run_p_value` for
    ``v`` correct guesses out of ``r``; 0 when even epsilon = 0 is not rejected."""
    level = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(m, r, v, high, delta) < level:
        low, high = high, 2.0 * high
        if high > 1e3:  # every guess right at tiny delta: the bound is "very large"
            return low
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        if one_run_p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class Guesses:
    """The auditor's guesses for one score and one fraction."""

    score: str
    fraction: float
    guesses: int  # r
    correct: int  # v
    epsilon_lower_bound: float  # at the Bonferroni-corrected level


def guess(scores: np.ndarray, included: np.ndarray, fraction: float,
          rng: np.random.Generator) -> tuple[int, int]:
    """Guess "in" on the top ``fraction * m / 2`` scores and "out" on as many of the
    lowest; ties are broken at random. Returns ``(r, v)``."""
    m = len(scores)
    k = max(1, round(fraction * m / 2))
    k = min(k, m // 2)
    order = np.lexsort((rng.random(m), scores))  # ascending score, random among ties
    out_guess, in_guess = order[:k], order[m - k:]
    correct = int(included[in_guess].sum()) + int((~included[out_guess]).sum())
    return 2 * k, correct


def best_bound(scores: Mapping[str, np.ndarray], included: np.ndarray,
               fractions: Sequence[float], delta: float, confidence: float,
               seed: int = 0) -> tuple[Guesses, list[Guesses]]:
    """The one-run lower bound over every (score, fraction), Bonferroni-corrected so that
    the best of them holds with ``confidence``. Returns the best and all choices."""
    included = np.asarray(included, dtype=bool)
    choices = len(scores) * len(fractions)
    corrected = 1.0 - (1.0 - confidence) / choices
    rng = np.random.default_rng(seed)
    rows = []
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64)
        if len(values) != len(included):
            raise ValueError(f"score {name!r} has {len(values)} values for "
                             f"{len(included)} canaries")
        for fraction in fractions:
            r, v = guess(values, included, fraction, rng)
            bound = epsilon_lower_bound(len(values), r, v, delta, corrected)
            rows.append(Guesses(name, float(fraction), r, v, bound))
    best = max(rows, key=lambda row: (row.epsilon_lower_bound, row.correct / row.guesses))
    return best, rows


@dataclass(frozen=True)
class RocSummary:
    """A membership attack's figures (members are the positive class)."""

    auc: float
    accuracy: float  # best balanced accuracy over thresholds
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    members: int
    non_members: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def roc_summary(scores: np.ndarray, is_member: np.ndarray) -> tuple[RocSummary, np.ndarray,
                                                                      np.ndarray]:
    """AUC, best balanced accuracy and TPR at 1% / 0.1% FPR of ``scores`` (higher =
    more likely a member); also the ROC curve (fpr, tpr). TPR at a FPR below
    ``1 / non_members`` is the TPR at zero false positives."""
    from sklearn.metrics import roc_auc_score, roc_curve

    is_member = np.asarray(is_member, dtype=bool)
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    if is_member.all() or not is_member.any():
        raise ValueError("a membership attack needs both members and non-members")
    fpr, tpr, _ = roc_curve(is_member, scores)
    auc = float(roc_auc_score(is_member, scores))
    accuracy = float(np.max(0.5 * (tpr + 1.0 - fpr)))

    def tpr_at(level: float) -> float:
        allowed = fpr <= level
        return float(tpr[allowed].max()) if allowed.any() else 0.0

    summary = RocSummary(auc, accuracy, tpr_at(0.01), tpr_at(0.001),
                         int(is_member.sum()), int((~is_member).sum()))
    return summary, fpr, tpr
