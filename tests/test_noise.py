"""The CSPRNG noise and sampling stream of every DP mechanism (fedprompt.privacy.noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedprompt.privacy.noise import SecureRandom


def test_gaussian_noise_has_the_requested_distribution() -> None:
    noise = SecureRandom.from_seed(0).normal((200_000,), 3.0)
    assert noise.dtype == torch.float64
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.03)
    assert float(noise.std()) == pytest.approx(3.0, rel=0.01)
    # a normal distribution, not just the right moments (Kolmogorov-Smirnov)
    assert stats.kstest(noise.numpy() / 3.0, "norm").pvalue > 1e-3


def test_uniform_draws_fill_the_unit_interval() -> None:
    u = SecureRandom.from_seed(1).uniform(100_000)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_secure_streams_are_fresh_and_keep_no_state() -> None:
    a, b = SecureRandom(), SecureRandom()
    assert not torch.equal(a.normal((8,), 1.0), b.normal((8,), 1.0))
    assert not a.reproducible and a.state() == ""  # its key is never written anywhere
    assert not SecureRandom.from_state("").reproducible


@pytest.mark.parametrize("skip", [0, 1, 63, 64, 65, 1000])
def test_a_reproducible_stream_continues_where_it_stopped(skip: int) -> None:
    whole = SecureRandom.from_seed(4, "noise")
    reference = whole.random_bytes(skip + 256)[skip:]
    first = SecureRandom.from_seed(4, "noise")
    first.random_bytes(skip)
    resumed = SecureRandom.from_state(first.state())
    assert resumed.random_bytes(256) == reference


def test_seeds_and_purposes_give_independent_streams() -> None:
    draws = [SecureRandom.from_seed(*p).random_bytes(32) for p in
             [(0, "noise"), (0, "sampling"), (1, "noise")]]
    assert len(set(draws)) == 3
    assert SecureRandom.from_seed(0, "noise").random_bytes(32) == draws[0]


def test_bad_keys_and_offsets_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(b"short")
    with pytest.raises(ValueError, match="negative"):
        SecureRandom(bytes(32), -1)
