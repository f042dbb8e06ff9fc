"""Adaptive k-means on CrypTen secret shares: :mod:`fedprompt.secure.kmeans`, step for step.

Runs inside every compute party (all parties call the same functions on their shares).
Every value is an ``MPCTensor``; the only values ever opened are (a) one bit per client
from the range check, (b) the one-hot assignment of the chosen k, and (c) where configured,
the cluster sums with Gaussian noise. Everything else (distances, centres, counts,
silhouettes, the scores of each k) stays shared.

Encodings (CrypTen): comparison results and one-hots are *integer* encoded (scale 1),
data are fixed point (scale 2^16). We keep that explicit:

* integer x fixed products (one-hot selections, ``where``) need no truncation and are
  exact; integer x integer stays integer;
* integer tensors are moved to fixed point with :func:`to_fixed` (a local, exact share
  rescaling), never by multiplying with public fractional constants (which CrypTen
  would round to integers);
* divisions by counts use :func:`reciprocal_counts` (Newton-Raphson started at the
  public ``1/n_max``, which converges for every count in ``(0, n_max]``; CrypTen's own
  reciprocal starts from an ``exp`` whose approximation overflows for counts > 256).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedprompt.secure.crypten_compat import import_crypten
from fedprompt.secure.fixed_point import COORD_BOUND, NORM_BOUND, PRECISION_BITS
from fedprompt.secure.kmeans import (
    PAD_SCORE,
    SILHOUETTE_EPS,
    candidate_count,
    slot_padding,
    start_index,
)

MPC = Any  # crypten.mpc.MPCTensor (CrypTen is imported lazily, through the shim)


@dataclass
class SecureOutcome:
    chosen: np.ndarray  # (N, K) revealed one-hot assignment of the chosen k
    noisy_sums: np.ndarray | None  # (K, dim) revealed cluster sums + noise, if configured


def _crypten() -> Any:
    return import_crypten()


def to_fixed(t: MPC) -> MPC:
    """An integer-encoded MPCTensor as fixed point (local share rescaling, exact)."""
    crypten = _crypten()
    out = t.clone()
    if out.encoder.scale == 1:
        out._tensor.encode_(crypten.encoder.FixedPointEncoder(precision_bits=PRECISION_BITS))
    return out


def less_than(a: MPC, b: MPC | float | torch.Tensor) -> MPC:
    """Integer-encoded ``a < b`` (one comparison, 8 rounds, for the whole tensor)."""
    return (a - b)._ltz()


def shared_constant(value: torch.Tensor) -> MPC:
    """A public integer tensor as an integer-encoded share (party 0 holds it)."""
    crypten = _crypten()
    rank = crypten.comm.get().get_rank()
    share = value.long() if rank == 0 else torch.zeros_like(value, dtype=torch.long)
    return crypten.mpc.MPCTensor.from_shares(share, precision=0)


def product(factors: MPC) -> MPC:
    """Product along the last dim by a tree (ceil(log2 m) multiplication rounds)."""
    crypten = _crypten()
    while factors.size(-1) > 1:
        m = factors.size(-1)
        half = m // 2
        prod = factors[..., :half] * factors[..., half: 2 * half]
        factors = crypten.cat([prod, factors[..., 2 * half:]], dim=-1) if m % 2 else prod
    return factors.squeeze(-1)


@functools.lru_cache(maxsize=64)
def _pair_index(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs (i < j) and, per element i, where its m-1 factors sit in cat([t, 1 - t])."""
    ii, jj = torch.triu_indices(m, m, offset=1)
    pos = {(int(i), int(j)): p for p, (i, j) in enumerate(zip(ii, jj, strict=True))}
    n_pairs = len(pos)
    idx = torch.empty(m, m - 1, dtype=torch.long)
    for i in range(m):
        col = 0
        for j in range(m):
            if j < i:
                idx[i, col] = pos[(j, i)]  # t(j, i) = [v_i < v_j]
            elif j > i:
                idx[i, col] = n_pairs + pos[(i, j)]  # 1 - t(i, j) = [v_i <= v_j]
            else:
                continue
            col += 1
    return ii, jj, idx


def first_argmin(values: MPC) -> MPC:
    """Integer-encoded one-hot of the first minimum along the last dim: all pairwise
    comparisons in one round of comparisons, then element i wins iff it is below every
    earlier element and not above any later one (a product of m-1 bits), so ties go to
    the lower index exactly as ``np.argmin``."""
    crypten = _crypten()
    m = values.size(-1)
    if m == 1:
        return shared_constant(torch.ones(tuple(values.size()), dtype=torch.long))
    ii, jj, idx = _pair_index(m)
    t = less_than(values[..., jj], values[..., ii])  # t(i, j) = [v_j < v_i], i < j
    both = crypten.cat([t, 1 - t], dim=-1)
    return product(both[..., idx])


def minimum(values: MPC) -> MPC:
    """Minimum along the last dim."""
    return (first_argmin(values) * values).sum(-1)


def reciprocal_counts(counts: MPC, n_max: int) -> MPC:
    """1/c for fixed-point counts c in (0, n_max], by Newton-Raphson from 1/n_max
    (monotone convergence; c = 0 gives a bounded 2^iters / n_max, always masked)."""
    iters = math.ceil(math.log2(max(n_max, 2))) + 4
    y = counts * 0 + 1.0 / n_max
    for _ in range(iters):
        y = y * 2 - y.square() * counts
    return y


def squared_norms(x: MPC) -> MPC:
    return x.square().sum(-1)


def range_violations(x: MPC) -> np.ndarray:
    """(N,) bool, opened: client rows with a coordinate outside [-COORD_BOUND, COORD_BOUND]
    or a squared norm above NORM_BOUND^2 (the ring comparison is exact for any shared
    value, so a client cannot pass a wrapped value)."""
    crypten = _crypten()
    n = x.size(0)
    coord = crypten.cat([x * -1 + COORD_BOUND, x + COORD_BOUND], dim=0)  # >= 0 when in range
    bad_coord = coord._ltz().sum(-1)  # (2N,)
    bad_coord = bad_coord[:n] + bad_coord[n:]
    bad_norm = less_than(squared_norms(x) * -1, -(NORM_BOUND ** 2))  # |x|^2 > bound^2
    bad = bad_coord + bad_norm  # integer counts
    flag = 1 - (bad - 1)._ltz()  # bad >= 1
    return flag.get_plain_text().numpy() > 0.5


def farthest_first(x: MPC, sq: MPC, n_cand: int, seed: int) -> MPC:
    crypten = _crypten()
    n = x.size(0)
    centre = x[start_index(n, seed)]
    centres = [centre]
    mind = sq - x.matmul(centre) * 2 + centre.square().sum()
    for _ in range(1, n_cand):
        pick = first_argmin(mind * -1)  # (N,) farthest point
        centre = pick.matmul(x)
        centres.append(centre)
        dist = sq - x.matmul(centre) * 2 + centre.square().sum()
        mind = mind + less_than(dist, mind) * (dist - mind)
    return crypten.stack(centres)


def assign(x: MPC, centres: MPC, padding: torch.Tensor) -> MPC:
    """(N, K, K) integer one-hot: nearest slot per group (see kmeans.assign)."""
    n, dim = x.size()
    groups, slots = padding.shape
    cc = centres.square().sum(-1)  # (K, K)
    xc = x.matmul(centres.reshape(groups * slots, dim).t()).reshape(n, groups, slots)
    scores = cc.unsqueeze(0) - xc * 2 + padding.unsqueeze(0)
    return first_argmin(scores)


def lloyd(x: MPC, init: MPC, iterations: int, n_max: int) -> MPC:
    n, dim = x.size()
    n_cand = init.size(0)
    padding = torch.tensor(slot_padding(n_cand), dtype=torch.float64).float()
    real = (padding == 0).long()
    centres = init.unsqueeze(0) * real.unsqueeze(-1)  # (K, K, dim), public 0/1 mask
    for _ in range(iterations):
        onehot = assign(x, centres, padding)  # (N, K, K)
        counts = to_fixed(onehot.sum(0))  # (K, K)
        sums = onehot.reshape(n, n_cand * n_cand).t().matmul(x).reshape(n_cand, n_cand, dim)
        recip = reciprocal_counts(counts, n_max).unsqueeze(-1)
        scaled = _crypten().cat([sums, counts.unsqueeze(-1)], dim=-1) * recip
        means, kept = scaled[..., :dim], 1 - scaled[..., dim:]
        # kept = 1 - count/count: 0 for a non-empty cluster (up to fixed-point rounding),
        # exactly 1 for an empty one (0 * bounded 1/0), which keeps its centre.
        centres = means + kept * centres
    return assign(x, centres, padding)


def silhouettes(x: MPC, sq: MPC, onehot: MPC, n_max: int) -> MPC:
    """(K,) mean silhouettes (see kmeans.silhouettes), shared."""
    crypten = _crypten()
    n = x.size(0)
    n_cand = onehot.size(-1)
    dist = sq.unsqueeze(1) + sq.unsqueeze(0) - x.matmul(x.t()) * 2  # (N, N)
    sums = dist.matmul(onehot.reshape(n, n_cand * n_cand)).reshape(n, n_cand, n_cand)
    counts = to_fixed(onehot.sum(0))  # (K, K)
    flags = less_than(crypten.stack([counts, counts]),
                      torch.tensor([0.5, 1.5]).reshape(2, 1, 1))
    empty, single = flags[0], flags[1]
    recips = reciprocal_counts(crypten.stack([counts - 1 + single, counts + empty]), n_max)
    own_mean = sums * recips[0].unsqueeze(0)
    other_mean = sums * recips[1].unsqueeze(0) + (onehot + empty.unsqueeze(0)) * int(
        PAD_SCORE)
    a = (onehot * own_mean).sum(-1)  # (N, K)
    b = minimum(other_mean)
    cmp = less_than(crypten.stack([a, b]), crypten.stack([b, b * 0 + PAD_SCORE / 2]))
    a_lt_b, has_other = cmp[0], cmp[1]
    larger = a + a_lt_b * (b - a)
    with crypten.cfg.temp_override({"functions.reciprocal_all_pos": True}):
        s = (b - a) * (larger + SILHOUETTE_EPS).reciprocal()
    in_single = (onehot * single.unsqueeze(0)).sum(-1)
    keep = has_other * (1 - in_single)
    return (keep * s).sum(0).div(n)


def secure_adaptive_kmeans(x: MPC, k_max: int, iterations: int, seed: int,
                           min_silhouette: float, n_max: int,
                           noise_std_share: float = 0.0) -> SecureOutcome:
    """Run on every party with its share ``x`` (N, dim), fixed point. Opens only the
    one-hot assignment of the chosen k (and noisy cluster sums when
    ``noise_std_share`` > 0: each party adds its own Gaussian noise of that std, drawn
    from the OS CSPRNG-seeded generator, to its share of the sums before they are opened)."""
    n = x.size(0)
    n_cand = candidate_count(n, k_max)
    sq = squared_norms(x)
    if n_cand == 1:
        chosen_mpc = shared_constant(torch.ones(n, 1, dtype=torch.long))
    else:
        onehot = lloyd(x, farthest_first(x, sq, n_cand, seed), iterations, n_max)
        sil = silhouettes(x, sq, onehot, n_max)  # (K,)
        first = torch.zeros(n_cand)
        first[0] = min_silhouette
        not_first = torch.ones(n_cand, dtype=torch.long)
        not_first[0] = 0
        criterion = sil * not_first + first
        choice = first_argmin(criterion * -1)  # (K,) first maximum
        chosen_mpc = (choice.reshape(1, n_cand, 1) * onehot).sum(1)  # (N, K)
    chosen = chosen_mpc.get_plain_text().numpy()
    noisy = None
    if noise_std_share > 0:
        sums = chosen_mpc.t().matmul(x)  # (K, dim)
        rng = np.random.default_rng(int.from_bytes(_urandom(16), "little"))
        noise = rng.normal(0.0, noise_std_share, size=tuple(sums.size()))
        encoded = torch.from_numpy(np.rint(noise * (1 << PRECISION_BITS)).astype(np.int64))
        sums._tensor.share = sums._tensor.share + encoded  # this party's own noise share
        noisy = sums.get_plain_text().numpy().astype(np.float64)
    return SecureOutcome(chosen=chosen, noisy_sums=noisy)


def _urandom(n: int) -> bytes:
    return os.urandom(n)
