"""The audit's statistics: the one-run bound is sound (never above the epsilon of a
mechanism that is exactly epsilon-DP, beyond its stated failure rate) and tight enough to
be useful, and the ROC figures are right."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedprompt.audit.bounds import (
    best_bound,
    epsilon_lower_bound,
    guess,
    one_run_p_value,
    roc_summary,
)


def randomized_response(included: np.ndarray, epsilon: float,
                        rng: np.random.Generator) -> np.ndarray:
    """The output of an exactly epsilon-DP mechanism on each canary's bit: the bit, flipped
    with probability 1 / (1 + e^epsilon). Used directly as the score (1 = in)."""
    flip = rng.random(len(included)) < 1.0 / (1.0 + math.exp(epsilon))
    return (included ^ flip).astype(float) + 1e-9 * rng.random(len(included))


def test_p_value_is_the_binomial_tail_without_delta() -> None:
    from scipy import stats

    q = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 40, 30, 1.0, 0.0) == pytest.approx(stats.binom.sf(29, 40, q))
    # delta only adds; more epsilon makes a result more likely
    assert one_run_p_value(100, 40, 30, 1.0, 1e-3) > one_run_p_value(100, 40, 30, 1.0, 0.0)
    assert one_run_p_value(100, 40, 30, 2.0, 0.0) > one_run_p_value(100, 40, 30, 1.0, 0.0)
    with pytest.raises(ValueError):
        one_run_p_value(10, 20, 5, 1.0, 0.0)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses() -> None:
    assert epsilon_lower_bound(1000, 100, 50, 1e-5, 0.95) == 0.0
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5, 0.95) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # all 100 guesses right at 95%: q^100 = 0.05 at eps = ln(q / (1 - q)), q = 0.05^(1/100)
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.95) == pytest.approx(
        math.log(q / (1 - q)), rel=1e-3)


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 4.0])
def test_bound_of_an_exact_mechanism_is_sound_and_tight(epsilon: float) -> None:
    """Randomized response is exactly epsilon-DP per canary: the 95% bound may exceed epsilon
    in at most about 5% of trials (we allow 10 of 100), and with many canaries it comes
    close to epsilon."""
    rng = np.random.default_rng(1)
    m = 2000
    exceed, bounds = 0, []
    for trial in range(100):
        included = rng.random(m) < 0.5
        scores = randomized_response(included, epsilon, rng)
        best, _ = best_bound({"rr": scores}, included, [1.0], 0.0, 0.95, seed=trial)
        exceed += best.epsilon_lower_bound > epsilon
        bounds.append(best.epsilon_lower_bound)
    assert exceed <= 10
    assert np.median(bounds) > 0.8 * epsilon


def test_bonferroni_keeps_the_best_of_many_choices_sound() -> None:
    """Picking the best of 20 (score, fraction) choices on a mechanism that leaks nothing
    must not produce a positive bound more often than the stated 5%."""
    rng = np.random.default_rng(2)
    positives = 0
    for trial in range(100):
        included = rng.random(400) < 0.5
        scores = {f"s{i}": rng.random(400) for i in range(4)}
        best, rows = best_bound(scores, included, [0.02, 0.05, 0.1, 0.2, 0.5], 1e-5, 0.95,
                                seed=trial)
        assert len(rows) == 20
        positives += best.epsilon_lower_bound > 0
    assert positives <= 10


def test_guess_takes_the_extremes_and_counts_right() -> None:
    scores = np.arange(10, dtype=float)
    included = np.array([0, 0, 0, 1, 0, 1, 0, 1, 1, 1], dtype=bool)
    r, v = guess(scores, included, 0.4, np.random.default_rng(0))  # 2 in, 2 out
    assert (r, v) == (4, 4)
    r, v = guess(-scores, included, 0.4, np.random.default_rng(0))
    assert (r, v) == (4, 0)


def test_roc_summary_figures() -> None:
    member = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    perfect, _, _ = roc_summary(np.array([8, 7, 6, 5, 4, 3, 2, 1.0]), member)
    assert perfect.auc == 1.0 and perfect.accuracy == 1.0 and perfect.tpr_at_1pct_fpr == 1.0
    worst, _, _ = roc_summary(np.array([1, 2, 3, 4, 5, 6, 7, 8.0]), member)
    assert worst.auc == 0.0 and worst.tpr_at_1pct_fpr == 0.0
    assert (worst.members, worst.non_members) == (4, 4)
    with pytest.raises(ValueError):
        roc_summary(np.ones(3), np.ones(3, dtype=bool))
